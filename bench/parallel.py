"""`vidgen bench parallel`: the same job on one process and on an agent group of two, side by side, in one run.

The job: a Wan-layout transformer with random weights (seeded: every process builds the same one) denoising a fixed
noise with classifier-free guidance — the agent's own code path (gpu_agents/agent.py JobRun.steps, the parallel
modes of gpu_agents/parallel.py), without Kafka, so the figure is the computation's and not the platform's.

Runs, each in fresh processes, timed after a warm-up step:
1. one process, one thread (one device's worth of a two-core machine) — the reference and the baseline;
2. one process, all cores (the best one process can do here);
3. a group of two, CFG parallelism (each rank one thread);
4. a group of two, Ulysses context parallelism (each rank one thread).
With two or more CUDA devices (``--device cuda``): a Wan-1.3B-sized model (30 layers, dim 1536) on one GPU against two.

Ends with ``RESULT equal=true|false speedup=… ranks=2 mode=cfg speedup_ulysses=… speedup_vs_all_cores=…``:
``speedup`` = one device's time / the group's in the mode auto picks for this model (cfg), ``equal`` = both groups'
results equal the one-process result bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import format_table, print_result

ROOT = Path(__file__).resolve().parent.parent
#: A Wan 2.1 layout big enough for the work to dominate on CPU (~0.1 s a pass at 128x128x17 on one core).
CPU_MODEL = {"num_attention_heads": 8, "attention_head_dim": 64, "ffn_dim": 2048, "num_layers": 4}
#: Wan 2.1 T2V 1.3B's transformer sizes (random weights).
GPU_MODEL = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30}


def build(model: dict, device: str):
    from gpu_agents.families.wan import _TINY_EULER, _TINY_TRANSFORMER_KWARGS, _TINY_VAE_KWARGS, WanFamily, _recipe

    denoiser = WanFamily().load_denoiser(_recipe({**_TINY_TRANSFORMER_KWARGS, **model}, _TINY_VAE_KWARGS,
                                                 _TINY_EULER))
    if device != "cpu":  # bf16 on GPUs, as Wan runs there
        for module in denoiser.modules():
            module.to(device=device, dtype=torch.bfloat16)
    return denoiser


def worker(spec: dict, out: str) -> None:
    """One process of a run (a group's rank when WORLD_SIZE is set): denoise, time, save."""
    from gpu_agents.denoise import denoise
    from gpu_agents.families.base import Guidance
    from gpu_agents.parallel import DeviceGroup, SoloDevice, parallelize

    torch.set_num_threads(spec["threads"])
    group = DeviceGroup(120.0) if "WORLD_SIZE" in os.environ else SoloDevice(torch.device(spec["device"]))
    device = group.device if spec["device"] == "cuda" else torch.device("cpu")
    denoiser = build(spec["model"], str(device))
    if group.size > 1:
        parallelize(denoiser, group, spec["mode"])
    width, height, frames, steps = spec["width"], spec["height"], spec["frames"], spec["steps"]
    generator = torch.Generator().manual_seed(3)
    text = torch.randn(2, 1, 32, denoiser.transformer.config.text_dim, generator=generator).to(device, denoiser.dtype)
    latents = denoiser.prepare_latents(width, height, frames, seed=5).to(device)

    def run(num_steps: int) -> tuple[torch.Tensor, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        result = denoise(denoiser, denoiser.new_scheduler(), latents, text[0], text[1], Guidance(5.0), num_steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result, time.perf_counter() - started

    run(1)  # warm-up: kernels, allocations, the first exchange
    result, seconds = run(steps)
    if group.leader:
        torch.save(result.float().cpu(), os.path.join(out, "latents.pt"))
        Path(out, "time.json").write_text(json.dumps({"seconds": seconds}))


def launch(spec: dict, ranks: int, out: Path) -> float:
    """Run ``spec`` in ``ranks`` fresh processes (as torchrun would start them); the leader's seconds."""
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    processes = [subprocess.Popen([sys.executable, "-m", "bench.parallel", "--worker", json.dumps(spec), str(out)],
                                  cwd=ROOT, env={**env, **({"RANK": str(r), "LOCAL_RANK": str(r)} if ranks > 1
                                                           else {})}) for r in range(ranks)]
    for process in processes:
        if process.wait(1800) != 0:
            raise RuntimeError(f"a process of the {ranks}-process run failed ({process.returncode})")
    return json.loads((out / "time.json").read_text())["seconds"]


def compare(model: dict, device: str, args, work: Path, label: str) -> dict:
    base = dict(model=model, device=device, width=args.width, height=args.height, frames=args.frames,
                steps=args.steps, mode=None)
    cores = os.cpu_count() or 1
    runs = [("one process, 1 thread", dict(base, threads=1), 1),
            (f"one process, {cores} threads", dict(base, threads=cores), 1),
            ("group of 2, cfg", dict(base, threads=1, mode="cfg"), 2),
            ("group of 2, ulysses", dict(base, threads=1, mode="ulysses"), 2)]
    if device == "cuda":  # one GPU against two: threads do not matter
        runs = [runs[0], runs[2], runs[3]]
    seconds, latents = {}, {}
    for name, spec, ranks in runs:
        out = work / f"{label}-{len(seconds)}"
        seconds[name] = launch(spec, ranks, out)
        latents[name] = torch.load(out / "latents.pt")
        print(f"{label}: {name}: {seconds[name]:.2f} s", flush=True)
    one = seconds["one process, 1 thread"]
    equal = {name: torch.equal(latents[name], latents["one process, 1 thread"]) for name in seconds}
    rows = [(name, seconds[name], one / seconds[name], "yes" if equal[name] else
             f"no (max {(latents[name] - latents['one process, 1 thread']).abs().max().item():.2g})")
            for name in seconds]
    print(format_table(("run", "seconds", "speedup", "equal"), rows))
    return dict(seconds=seconds, equal=equal, one=one)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vidgen bench parallel", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: also a Wan-1.3B-sized model on one GPU against two (needs 2 GPUs)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker[0]), args.worker[1])
        return
    with tempfile.TemporaryDirectory(prefix="vidgen-bench-parallel-") as tmp:
        print(f"Wan layout {CPU_MODEL}, {args.width}x{args.height}x{args.frames}, {args.steps} guided steps, on CPU "
              f"({os.cpu_count()} cores)", flush=True)
        cpu = compare(CPU_MODEL, "cpu", args, Path(tmp), "cpu")
        fields = dict(equal=str(all(cpu["equal"][n] for n in cpu["equal"] if n.startswith("group"))).lower(),
                      speedup=cpu["one"] / cpu["seconds"]["group of 2, cfg"], ranks=2, mode="cfg",
                      speedup_ulysses=cpu["one"] / cpu["seconds"]["group of 2, ulysses"],
                      speedup_vs_all_cores=cpu["seconds"][f"one process, {os.cpu_count() or 1} threads"]
                      / cpu["seconds"]["group of 2, cfg"])
        if args.device == "cuda":
            if torch.cuda.device_count() < 2:
                raise SystemExit("--device cuda needs two GPUs")
            gpu_args = argparse.Namespace(**{**vars(args), "width": 832, "height": 480, "frames": 81})
            gpu = compare(GPU_MODEL, "cuda", gpu_args, Path(tmp), "gpu")
            fields.update(gpu_speedup=gpu["one"] / gpu["seconds"]["group of 2, cfg"],
                          gpu_speedup_ulysses=gpu["one"] / gpu["seconds"]["group of 2, ulysses"],
                          gpu_allclose=str(all(gpu["equal"].values())).lower())
    print_result(**fields)


if __name__ == "__main__":
    main()
