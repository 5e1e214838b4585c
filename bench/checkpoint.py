"""`vidgen bench checkpoint`: what checkpointing every N steps costs a denoising job, as a share of its time.

The agent's own handler runs the same job twice per round, with checkpoints every N steps and with none, against a
real blob store (no Kafka: the events it emits are only counted). Rounds alternate the two so drift hits both.
Reported: the wall-time share (with − without) / without, and the share spent on the denoising thread itself
(capturing the state and queueing it; serialising and writing happen on the writer thread).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

from gpu_agents import agent as agent_module
from gpu_agents.agent import DenoisingAgent
from gpu_agents.encoding import encode_prompts
from gpu_agents.models import ModelCatalogue
from producers.requests import parse_size, video_request
from streams import topics
from streams.blobs import LocalBlobStore
from streams.settings import load_settings
from streams.stage import SourceMessage, StageContext

from .common import format_table, median, print_result


def _encoded_job(blobs: LocalBlobStore, catalogue: ModelCatalogue, job_id: str, params: dict) -> dict:
    request = video_request("a checkpointed fox", job_id=job_id, **params)
    text = catalogue.text_encoder(request["params"]["model"])
    embeds = {name: blobs.put_tensor(encode_prompts(text, [prompt]), job_id, f"{name}.safetensors")
              for name, prompt in (("prompt", request["prompt"]), ("negative", ""))}
    return {**request, "prompt_embeds": embeds["prompt"], "negative_prompt_embeds": embeds["negative"]}


class CountingCapture:
    """Wraps the agent's capture() to time what checkpointing costs the denoising thread."""

    def __init__(self, capture):
        self.capture = capture
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.capture(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen bench checkpoint")
    parser.add_argument("--model", default="tiny-wan-5m")
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    width, height = parse_size(args.size)
    params = dict(model=args.model, width=width, height=height, num_frames=args.frames, steps=args.steps,
                  guidance_scale=5.0, seed=7)

    root = tempfile.mkdtemp(prefix="vidgen-bench-checkpoint-")
    settings = replace(load_settings({"VIDGEN_VAR_DIR": root}), checkpoint_every_s=0.0)
    blobs = LocalBlobStore(f"{root}/blobs")
    agents = {
        "with": DenoisingAgent(replace(settings, checkpoint_every_steps=args.every), blobs),
        "without": DenoisingAgent(replace(settings, checkpoint_every_steps=10**9), blobs),
    }
    catalogue = agents["with"].models
    counting = CountingCapture(agent_module.capture)
    agent_module.capture = counting  # the agent looks capture() up in its module at each checkpoint

    emitted: list[str] = []
    times: dict[str, list[float]] = {"with": [], "without": []}
    on_path: list[float] = []
    checkpoints = 0
    for run in range(args.runs + 1):  # run 0 warms up (model build, first allocations)
        for mode in ("without", "with") if run % 2 else ("with", "without"):
            job = _encoded_job(blobs, catalogue, f"bench-{mode}-{run}", params)
            ctx = StageContext("gpu-agent", SourceMessage(topics.ENCODED["standard"].name, 0, run, job["job_id"]),
                               blobs, lambda topic, event, key, headers: emitted.append(topic.name))
            counting.seconds = 0.0
            started = time.perf_counter()
            agents[mode].handle(job, ctx)
            elapsed = time.perf_counter() - started
            if run:
                times[mode].append(elapsed)
                if mode == "with":
                    on_path.append(counting.seconds)
                    checkpoints = sum(1 for name in emitted if name == topics.LATENT_CHECKPOINTED.name)
    rows = [(i + 1, times["without"][i], times["with"][i], on_path[i] * 1000) for i in range(args.runs)]
    print(format_table(("run", "without s", "with s", "on-path ms"), rows))
    without, with_ = median(times["without"]), median(times["with"])
    share = (with_ - without) / without
    on_path_share = median(on_path) / without
    per_job = checkpoints // (args.runs + 1)
    print(f"{per_job} checkpoints per job; wall share {share:+.2%}, on the denoising thread {on_path_share:.3%}")
    print_result(share=round(share, 4), on_path_share=round(on_path_share, 5), every=args.every,
                 checkpoints_per_job=per_job, with_s=round(with_, 3), without_s=round(without, 3),
                 model=args.model, size=args.size, frames=args.frames, steps=args.steps)
    return 0
