"""`vidgen bench streaming`: from the final latent to the first playable segment, against to the complete video.

The real platform decodes jobs whose VAE decoding dominates (256x256, 33 frames: 9 latent frames) in K latent
chunks. Times come from the events themselves: the first LatentChunk (the latent is final), the first
VideoDecoded (a segment can be played) and the last one (the video is complete). Jobs run one at a time.
Goal: first/full <= 1/K + 0.2.
"""
from __future__ import annotations

import argparse
import math
import tempfile

from consumers.progress import EventLog
from producers.requests import VideoRequests, parse_size
from streams import topics
from streams.supervisor import PlatformProcesses

from .common import format_table, median, print_result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen bench streaming")
    parser.add_argument("--chunks", type=int, default=3, help="K: latent chunks per video")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    width, height = parse_size(args.size)
    latent_frames = (args.frames - 1) // 4 + 1
    per_chunk = math.ceil(latent_frames / args.chunks)
    chunks = math.ceil(latent_frames / per_chunk)
    if chunks != args.chunks:
        print(f"{latent_frames} latent frames split {per_chunk} per chunk make {chunks} chunks, not {args.chunks}")

    platform = PlatformProcesses(tempfile.mkdtemp(prefix="vidgen-bench-streaming-"),
                                 env={"VIDGEN_LATENT_CHUNK_FRAMES": str(per_chunk)})
    settings = platform.start()
    log = EventLog(settings)
    rows = []
    try:
        with VideoRequests(settings) as requests:
            for run in range(args.runs + 1):  # run 0 warms up the decoder
                job_id = requests.submit("fireworks over a harbour", seed=run, width=width, height=height,
                                         num_frames=args.frames, steps=2, guidance_scale=1.0)
                log.wait_for(lambda l: l.terminal(job_id), 600, f"job {run}")
                if run == 0:
                    continue
                latent_ready = min(c["timestamp"] for c in log.of(job_id, topics.LATENT_CHUNKS))
                segments = sorted(log.of(job_id, topics.DECODED), key=lambda d: d["segment_index"])
                first = (segments[0]["timestamp"] - latent_ready).total_seconds()
                full = (segments[-1]["timestamp"] - latent_ready).total_seconds()
                rows.append((run, len(segments), first, full, first / full))
    finally:
        log.close()
        platform.stop()

    print(format_table(("run", "segments", "first s", "full s", "first/full"), rows))
    ratio = median([r[4] for r in rows])
    goal = 1 / chunks + 0.2
    print(f"first playable segment after {median([r[2] for r in rows]):.3f} s, complete video after "
          f"{median([r[3] for r in rows]):.3f} s; goal first/full <= 1/K + 0.2 = {goal:.3f}")
    print_result(first_over_full=round(ratio, 3), chunks=chunks, goal=round(goal, 3),
                 first_s=round(median([r[2] for r in rows]), 3), full_s=round(median([r[3] for r in rows]), 3),
                 size=args.size, frames=args.frames)
    return 0
