"""`vidgen bench families`: one job per built-in model through the real platform, grouped by model family.

Every built-in model (but the benchmark-sized duplicates) gets one small job on the embedded broker — text-to-video,
and image-to-video for the models that take an image — and each job must be published with a video that decodes to
the requested frames and size; a model whose family makes audio must deliver an audio track as long as the video
(within one frame). A family passes when every one of its jobs does. Ends with
`RESULT families=N passed=N audio=true|false i2v=true|false` (audio / i2v: a job of that modality passed).
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections import defaultdict

import numpy as np
from PIL import Image

from consumers.progress import EventLog
from gpu_agents.families.base import AUDIO, I2V, T2V
from gpu_agents.models import BUILTIN_MODELS, ModelCatalogue
from gpu_agents.video import probe_mp4, read_mp4
from producers.requests import VideoRequests
from streams import topics
from streams.blobs import open_blob_store
from streams.supervisor import PlatformProcesses

from .common import format_table, print_result

#: Built-ins that only differ from another in size (for other benchmarks): no new family behaviour to exercise.
SKIPPED = {"tiny-wan-5m"}
TIMEOUT_S = 300
FPS = 8


def input_png(width: int = 80, height: int = 56) -> bytes:
    """A synthetic input image (a colour gradient with a disc), as a PNG upload."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    pixels[(x - width // 2) ** 2 + (y - height // 2) ** 2 < (height // 4) ** 2] = (250, 240, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def planned_jobs(catalogue: ModelCatalogue) -> list[dict]:
    """(model, modality) pairs: one text-to-video job per model that takes text, one image-to-video job per model that
    takes an image; the smallest size the model's rules allow above 32 px."""
    jobs = []
    for model_id in BUILTIN_MODELS:
        if model_id in SKIPPED:
            continue
        facts = catalogue.facts(model_id)
        side = max(32, facts.rules.spatial_multiple)
        frames = 2 * facts.rules.temporal_multiple + 1
        for modality in (T2V, I2V):
            if modality in facts.modalities:
                jobs.append(dict(model=model_id, family=facts.family, modality=modality, audio=AUDIO in facts.modalities,
                                 width=side * 2, height=side, num_frames=frames))
    return jobs


def check_output(job: dict, published: dict, blobs) -> str:
    """'' when the published video is what was asked for, else what is wrong."""
    data = blobs.get(published["video"])
    frames = read_mp4(data)
    if frames.shape != (job["num_frames"], job["height"], job["width"], 3):
        return f"video is {frames.shape}, asked for {job['num_frames']} frames of {job['width']}x{job['height']}"
    if job["audio"]:
        audio = probe_mp4(data).get("audio")
        if not audio:
            return "no audio track"
        video_s = job["num_frames"] / FPS
        if abs(audio["duration_s"] - video_s) > 1 / FPS:
            return f"audio lasts {audio['duration_s']:.3f} s, the video {video_s:.3f} s"
    return ""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen bench families")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    catalogue = ModelCatalogue(device="cpu")
    jobs = planned_jobs(catalogue)
    image = input_png()

    platform = PlatformProcesses(tempfile.mkdtemp(prefix="vidgen-bench-families-"))
    settings = platform.start()
    log = EventLog(settings)
    blobs = open_blob_store(settings)
    rows = []
    try:
        with VideoRequests(settings) as requests:
            for job in jobs:
                started = time.monotonic()
                job_id = requests.submit(f"a {job['family']} test pattern", model=job["model"], width=job["width"],
                                         height=job["height"], num_frames=job["num_frames"], steps=args.steps,
                                         guidance_scale=5.0, fps=FPS, seed=7,
                                         image=image if job["modality"] == I2V else None)
                try:
                    [(topic, ended)] = log.wait_for(lambda l: l.terminal(job_id), TIMEOUT_S,
                                                    f"{job['model']} ({job['modality']})")
                except TimeoutError as exc:
                    problem = str(exc)
                else:
                    problem = check_output(job, ended, blobs) if topic == topics.PUBLISHED.name else \
                        f"{topic}: {ended.get('reason') or ended.get('reasons')}"
                job["passed"] = not problem
                rows.append((job["family"], job["model"], job["modality"], "yes" if job["audio"] else "no",
                             time.monotonic() - started, problem or "ok"))
    finally:
        log.close()
        platform.stop()

    print(format_table(("family", "model", "input", "audio", "s", "result"), rows, float_format="{:.1f}"))
    by_family: dict[str, list[dict]] = defaultdict(list)
    for job in jobs:
        by_family[job["family"]].append(job)
    passed = sum(all(job["passed"] for job in family_jobs) for family_jobs in by_family.values())
    print_result(families=len(by_family), passed=passed,
                 audio=str(any(job["passed"] and job["audio"] for job in jobs)).lower(),
                 i2v=str(any(job["passed"] and job["modality"] == I2V for job in jobs)).lower())
    return 0 if passed == len(by_family) else 1
