"""`vidgen bench compliance`: the compliance stage's time per job, and where it goes.

The stage's own handler runs on generated-looking clips (decoded MP4 in a real blob store, no Kafka): read, the
detector ensemble, watermark, master encode + C2PA signature, renditions (encode, HLS remux, two signatures each),
and storing. Each size runs several times; the median is reported.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np

from consumers.compliance_stage import ComplianceStage
from gpu_agents.video import encode_mp4
from producers.requests import parse_size
from streams import topics
from streams.blobs import LocalBlobStore
from streams.settings import load_settings
from streams.stage import SourceMessage, StageContext

from .common import format_table, median, print_result


def moving_clip(width: int, height: int, frames: int, seed: int) -> np.ndarray:
    """A smooth moving pattern with grain: cheap to make, realistic enough for the encoders and the detectors."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    clip = [128 + 60 * np.sin((x + 4 * t) / 23.0)[..., None] * np.cos((y - 2 * t) / 31.0)[..., None]
            * np.array([1.0, 0.8, 0.6]) for t in range(frames)]
    return np.clip(np.stack(clip) + rng.normal(0, 3, (frames, height, width, 3)), 0, 255).astype(np.uint8)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen bench compliance")
    parser.add_argument("--sizes", default="256x256,512x512")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--runs", type=int, default=3,
                        help="runs per size, the first a warm-up that is not measured (at least 2)")
    args = parser.parse_args(argv)
    if args.runs < 2:
        parser.error(f"--runs must be at least 2 (the first run only warms up), got {args.runs}")

    rows, per_job = [], {}
    with tempfile.TemporaryDirectory(prefix="vidgen-bench-compliance-") as tmp:
        settings = load_settings({"VIDGEN_VAR_DIR": tmp})
        blobs = LocalBlobStore(f"{tmp}/blobs")
        stage = ComplianceStage(settings, blobs)
        for size in args.sizes.split(","):
            width, height = parse_size(size)
            phases: dict[str, list[float]] = {}
            for run in range(args.runs):
                job_id = f"bench-{size}-{run}"
                params = dict(width=width, height=height, num_frames=args.frames, fps=16, steps=30, seed=run,
                              guidance_scale=5.0, model="tiny-wan", preset="quality", input_reference=None)
                video = blobs.put(encode_mp4(moving_clip(width, height, args.frames, run), 16), job_id, "v.mp4")
                decoded = dict(job_id=job_id, tenant="bench", segment_index=0, is_last=True, segment=video,
                               frame_start=0, frames=args.frames, video=video, params=params, init_segment=None,
                               playlist=None, decoder_id="bench", prompt_sha256="0" * 64, timestamp=0)
                emitted = []
                ctx = StageContext("compliance", SourceMessage(topics.DECODED.name, 0, 0, job_id), blobs,
                                   lambda topic, event, key, headers: emitted.append(topic.name))
                stage.handle(decoded, ctx)
                assert topics.PUBLISHED.name in emitted, f"expected a publication, got {emitted}"
                if run == 0:
                    continue  # warm-up: first-use costs (encoder set-up, detector models) are not per job
                for name, ms in {**stage.timings, "total": sum(stage.timings.values())}.items():
                    phases.setdefault(name, []).append(ms)
            per_job[size] = median(phases["total"])
            rows.append([size, args.frames] + [median(phases[name]) for name in PHASES])
    print(format_table(["size", "frames", *[f"{name}_ms" for name in PHASES]], rows, float_format="{:.0f}"))
    print_result(**{f"ms_per_job_{size}": ms for size, ms in per_job.items()}, frames=args.frames)
    return 0


PHASES = ("read", "detectors", "watermark", "master", "renditions", "store", "total")
