"""An agent group: `vidgen stage gpu-agent --devices N` — one agent towards Kafka and the scheduler, N processes
(one per device) that run each of its jobs together (gpu_agents/parallel.py says how).

The launcher is torchrun (torch.distributed.run, standalone: one machine, a free port): it starts the N ranks, gives
each its RANK / LOCAL_RANK / WORLD_SIZE, and when one rank fails it stops all of them and starts the group again,
up to ``--restarts`` times (then it exits non-zero, for the supervisor — Kubernetes, systemd — to restart the pod).
A SIGTERM to it reaches every rank: rank 0 drains as any agent does (checkpoint at the next step boundary, hand the
job back, report STOPPED) and then tells the other ranks to exit; they ignore the signal itself, because stopping
on their own in the middle of a step would leave rank 0 waiting on them.

Each rank runs ``main()`` below (torchrun starts `vidgen stage gpu-agent --devices N` again in each):
1. join the group (the device backend for tensors, gloo for rank 0's decisions; every collective with a deadline);
2. rank 0 runs the gpu-agent stage (Kafka, blobs, reports with ``devices=N``); the others follow its decisions;
3. leave: exit 0 after an orderly stop, 1 when the group broke (a rank died or went silent), so torchrun restarts
   the whole group and the interrupted job resumes from its newest checkpoint, here or elsewhere.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys

from streams.settings import Settings

log = logging.getLogger(__name__)

EXIT_BROKEN = 1


def is_rank() -> bool:
    """True in a process torchrun started as a rank of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ


def launch(devices: int, restarts: int = 3) -> None:
    """Replace this process with torchrun running ``devices`` ranks of the same command (the pid stays: a
    supervisor's SIGTERM reaches torchrun, which passes it to every rank)."""
    if devices < 2:
        raise ValueError(f"an agent group has at least 2 devices, got {devices}")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
            f"--max-restarts={restarts}", "--module", "vidgen", "stage", "gpu-agent", f"--devices={devices}"]
    os.execv(sys.executable, argv)


def main(settings: Settings) -> int:
    """One rank of the group (see the module doc for the steps)."""
    from streams.runtime import run_stage

    from .agent import STAGE, DenoisingAgent, follow_leader
    from .parallel import DeviceGroup, GroupBroken

    # 1. Join the group.
    group = DeviceGroup(settings.group_timeout_s)
    log.info("gpu-agent group: %s", group.describe())
    try:
        if group.leader:
            # 2a. Rank 0: the agent the scheduler sees.
            agents: list[DenoisingAgent] = []

            def build(settings, blobs) -> DenoisingAgent:
                agents.append(DenoisingAgent(settings, blobs, group=group))
                return agents[-1]

            run_stage(dataclasses.replace(STAGE, build=build), settings)
            for agent in agents:
                agent.leader.close()  # the other ranks exit too
        else:
            # 2b. The others: rank 0 decides when they stop (see the module doc).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            follow_leader(settings, group)
    except GroupBroken as exc:
        log.error("gpu-agent group: %s", exc)
    # 3. Leave.
    if group.broken:
        log.error("gpu-agent group broken (%s): exiting for the launcher to restart every rank", group.broken)
        return EXIT_BROKEN
    group.close()
    return 0
