"""One rank of a two-process device group, for tests/test_parallel.py: ``python -m tests.parallel_ranks SCENARIO OUT``
with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (as torchrun sets them).

Scenario ``equality``: every case of CASES denoised by the group in its mode; rank 0 saves each final latent to OUT,
and every rank what its models did (forward passes, tokens seen).
"""
from __future__ import annotations

import json
import os
import sys

import torch

from gpu_agents.denoise import denoise
from gpu_agents.families.base import Guidance
from gpu_agents.models import ModelCatalogue
from gpu_agents.parallel import DeviceGroup, ParallelModels

#: (model, mode, width, height, frames): every family layout with a parallel mode, in each of its modes.
CASES = [
    ("tiny-wan-5m", "cfg", 64, 64, 9),
    ("tiny-wan-5m", "ulysses", 64, 64, 9),
    ("tiny-wan2.2-a14b", "cfg", 64, 64, 9),
    ("tiny-wan2.2-a14b", "ulysses", 64, 64, 9),
    ("tiny-wan2.2-ti2v-5b", "ulysses", 64, 64, 9),
    ("tiny-helios", "cfg", 64, 64, 33),
    ("tiny-helios", "ulysses", 64, 64, 33),
]
STEPS, SEED, GUIDANCE = 3, 11, Guidance(5.0, 3.0)


def final_latent(models: ModelCatalogue, model_id: str, width: int, height: int, frames: int) -> torch.Tensor:
    """The case's job, denoised by ``models`` (parallelised or not): the same inputs on every rank and in the test."""
    family = models.family(model_id)
    encoder = models.text_encoder(model_id)
    prompt, negative = family.encode_prompts(encoder, ["a red ball bouncing"]), family.encode_prompts(encoder, [""])
    denoiser = models.denoiser(model_id)
    _, total = denoiser.chunk_plan(width, height, frames, STEPS)
    guidance = GUIDANCE if models.facts(model_id).experts > 1 else Guidance(GUIDANCE.scale)
    latents = denoiser.prepare_latents(width, height, frames, SEED)
    return denoise(denoiser, denoiser.new_scheduler(), latents, prompt, negative, guidance, total)


def count_work(models: ModelCatalogue, model_id: str) -> dict:
    """Hooks that count what this process's denoising models do: forward passes, and the tokens the first
    block's attention projects (a Ulysses rank: its shard of the sequence). Filled in as the job runs."""
    work = {"forwards": 0, "block_tokens": 0}

    def forward(module, args, kwargs):
        work["forwards"] += 1

    def block(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        work["block_tokens"] = max(work["block_tokens"], hidden.shape[1])

    for module in models.denoiser(model_id).modules():
        module.register_forward_pre_hook(forward, with_kwargs=True)
        # Below the block and its attention, whose own hooks split the sequence in Ulysses mode.
        module.blocks[0].attn1.to_q.register_forward_pre_hook(block, with_kwargs=True)
    return work


def equality(group: DeviceGroup, out: str) -> None:
    for model_id, mode, width, height, frames in CASES:
        models = ModelCatalogue(device="cpu")  # a fresh catalogue: each case parallelises its own copy
        ParallelModels(models, group, mode).setup(model_id, mode)
        work = count_work(models, model_id)
        result = final_latent(models, model_id, width, height, frames)
        if group.leader:
            torch.save(result, os.path.join(out, f"{model_id}.{mode}.pt"))
        with open(os.path.join(out, f"{model_id}.{mode}.rank{group.rank}.json"), "w") as f:
            json.dump(work, f)


def main(scenario: str, out: str) -> None:
    torch.set_num_threads(1)
    group = DeviceGroup(60.0)
    if scenario != "equality":
        raise SystemExit(f"unknown scenario {scenario!r}")
    equality(group, out)
    group.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
