"""Agent groups on a real broker: one job across two processes (gloo), acting as one agent towards the scheduler.

One platform: the scheduler places tiny-wan-5m jobs on agents of 2 devices only (VIDGEN_MODEL_DEVICES), every other
model on the one-device agent; two agent groups of 2 ranks (`vidgen stage gpu-agent --devices 2`, torchrun) and one
single agent. Checked from the events on the broker and the blobs: a group's result equals the one-device result;
a rank killed (either one), hung, or the group drained — the job resumes on the other group from a checkpoint, bit
for bit; a cancellation stops every rank at the same step.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from streams import topics
from tests.fleet import (LONG_JOB, decisions, final_latent, pid_of, published_once, reference_latent, reports,
                         running_fleet, steps_of, wait_for_idle_agents)

pytestmark = pytest.mark.integration

GROUP_MODEL = "tiny-wan-5m"  # needs 2 devices here
GROUP_JOB = dict(LONG_JOB, steps=80)
SINGLE_JOB = dict(LONG_JOB, model="tiny-wan", steps=40)
GROUP_TIMEOUT_S = 8.0
CHECKPOINT_EVERY = 20


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    for fleet in running_fleet(tmp_path_factory.mktemp("groups"), ("prompt-encoder", "scheduler", "gpu-agent",
                                                                     "vae-decoder", "compliance"),
                               VIDGEN_MODEL_DEVICES=f"{GROUP_MODEL}=2", VIDGEN_AGENT_TIMEOUT_S="3",
                               VIDGEN_CHECKPOINT_EVERY_STEPS=str(CHECKPOINT_EVERY),
                               VIDGEN_GROUP_TIMEOUT_S=str(GROUP_TIMEOUT_S)):
        fleet["groups"] = [add_group(fleet) for _ in range(2)]
        wait_for_idle_agents(fleet["log"], 3)
        yield fleet


def add_group(platform):
    return platform["processes"].add_stage("gpu-agent", args=("--devices", "2"))


def ranks_of(launcher_pid: int) -> list[int]:
    """The rank processes torchrun started (its children), rank 0 first."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        return sorted(int(pid) for pid in f.read().split())


def group_running(platform, job_id: str):
    """(torchrun process, rank 0 pid, rank 1 pid) of the group whose rank 0 runs the job."""
    leader = pid_of(steps_of(platform["log"], job_id)[0]["agent_id"])
    for launcher in platform["groups"]:
        ranks = ranks_of(launcher.pid) if launcher.poll() is None else []
        if leader in ranks:
            return launcher, leader, next(pid for pid in ranks if pid != leader)
    raise AssertionError(f"no group has rank 0 pid {leader}")


def devices_of(log, agent_id: str) -> int:
    return reports(log, agent_id)[-1]["devices"]


def assert_resumed_on_the_other_group(platform, job_id: str, prompt: str, seed: int, job: dict, first_agent: str):
    log = platform["log"]
    resumed = log.wait_for(lambda l: [s for s in steps_of(l, job_id) if s["attempt"] > 1], 120, "a resume")
    assert resumed[0]["agent_id"] != first_agent and devices_of(log, resumed[0]["agent_id"]) == 2
    saved = {c["step"] for c in log.of(job_id, topics.LATENT_CHECKPOINTED) if c["attempt"] == 1}
    assert resumed[0]["resumed_from_step"] in saved, "a resume starts at a checkpoint rank 0 took"
    published_once(log, job_id)
    assert torch.equal(final_latent(platform["settings"], log, job_id), reference_latent(prompt, seed, job))


def wait_for_three_idle_agents(platform):
    """Back to two groups and the single agent (torchrun restarts a broken group; a drained one is started again)."""
    wait_for_idle_agents(platform["log"], 3, timeout_s=180)


def test_a_group_job_equals_the_one_device_result_and_only_groups_take_it(platform):
    log, requests = platform["log"], platform["requests"]
    prompt, seed = "a lighthouse in a storm", 1
    group_job = requests.submit(prompt, tier="premium", seed=seed, **GROUP_JOB)
    single_job = requests.submit("a red kite over a field", tier="premium", seed=2, **SINGLE_JOB)
    published_once(log, group_job)
    published_once(log, single_job)
    group_agent, single_agent = steps_of(log, group_job)[0]["agent_id"], steps_of(log, single_job)[0]["agent_id"]
    assert devices_of(log, group_agent) == 2 and devices_of(log, single_agent) == 1
    steps = steps_of(log, group_job)
    assert [s["step"] for s in steps] == list(range(1, GROUP_JOB["steps"] + 1)) and {s["agent_id"] for s in steps} == {
        group_agent}, "one agent towards the scheduler: every step reported once, by rank 0"
    checkpoints = [c for c in log.of(group_job, topics.LATENT_CHECKPOINTED)]
    assert [c["step"] for c in checkpoints] == list(range(CHECKPOINT_EVERY, GROUP_JOB["steps"], CHECKPOINT_EVERY))
    assert {c["agent_id"] for c in checkpoints} == {group_agent}
    assert torch.equal(final_latent(platform["settings"], log, group_job), reference_latent(prompt, seed, GROUP_JOB))
    assert torch.equal(final_latent(platform["settings"], log, single_job),
                       reference_latent("a red kite over a field", 2, SINGLE_JOB))


@pytest.mark.parametrize("rank", [1, 0])
def test_a_killed_rank_fails_the_group_over_and_the_job_resumes_on_the_other_group(platform, rank):
    log, requests = platform["log"], platform["requests"]
    prompt, seed = f"a glacier calving, rank {rank} killed", 3 + rank
    job_id = requests.submit(prompt, tier="standard", seed=seed, **GROUP_JOB)
    log.wait_for(lambda l: l.of(job_id, topics.LATENT_CHECKPOINTED), 120, "a first checkpoint")
    first_agent = steps_of(log, job_id)[0]["agent_id"]
    launcher, leader, follower = group_running(platform, job_id)
    os.kill(follower if rank == 1 else leader, signal.SIGKILL)
    [requeued] = log.wait_for(lambda l: decisions(l, "REQUEUED", job_id), 60, "the job to be requeued")
    if rank == 1:  # rank 0 saw its peer go and handed the job back at once
        assert "group broken" in requeued["reason"], requeued["reason"]
    else:  # rank 0 is gone: its reports stop, the scheduler declares it dead
        assert requeued["reason"] == "agent dead"
    assert_resumed_on_the_other_group(platform, job_id, prompt, seed, GROUP_JOB, first_agent)
    assert launcher.poll() is None, "torchrun restarts the whole group rather than exiting"
    # No wait for the restarted group: the next job goes to the other one, and any resume waits for it to be back.


def test_a_cancellation_stops_every_rank_at_the_same_step(platform):
    log, requests, processes = platform["log"], platform["requests"], platform["processes"]
    endless = dict(GROUP_JOB, steps=1000)
    job_id = requests.submit("a queue nobody wanted", tier="premium", seed=7, **endless)
    log.wait_for(lambda l: len(steps_of(l, job_id)) >= 5, 120, "the job to run")
    requests.cancel(job_id, reason="changed my mind")
    [cancelled] = log.wait_for(lambda l: l.of(job_id, topics.CANCELLED), 60, "the cancellation")
    assert cancelled["stopped_at_step"] == steps_of(log, job_id)[-1]["step"] < 1000
    # the other rank stopped after that same step (it says so), and the group goes on taking jobs
    group_logs = [path.read_text(errors="replace") for path in processes.log_dir.glob("gpu-agent-*.log")]
    assert any(f"job {job_id} stopped with rank 0 (cancelled)" in text for text in group_logs)


def test_a_hung_rank_breaks_the_group_at_its_deadline_and_the_job_resumes_elsewhere(platform):
    log, requests = platform["log"], platform["requests"]
    prompt, seed = "a frozen waterfall", 9
    job_id = requests.submit(prompt, tier="standard", seed=seed, **GROUP_JOB)
    log.wait_for(lambda l: l.of(job_id, topics.LATENT_CHECKPOINTED), 120, "a first checkpoint")
    first_agent = steps_of(log, job_id)[0]["agent_id"]
    _, _, follower = group_running(platform, job_id)
    os.kill(follower, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        [requeued] = log.wait_for(lambda l: decisions(l, "REQUEUED", job_id), GROUP_TIMEOUT_S + 30, "a requeue")
        waited = requeued["timestamp"].timestamp() - stopped_at
        assert "group broken" in requeued["reason"] and GROUP_TIMEOUT_S - 1 < waited < GROUP_TIMEOUT_S + 10, waited
        assert_resumed_on_the_other_group(platform, job_id, prompt, seed, GROUP_JOB, first_agent)
    finally:
        os.kill(follower, signal.SIGKILL)  # torchrun would wait 30 s on a stopped process before killing it


def test_sigterm_drains_every_rank_and_the_job_resumes_on_the_other_group(platform):
    """Last of the module: the drained group is not started again."""
    log, requests = platform["log"], platform["requests"]
    wait_for_three_idle_agents(platform)  # the group the hang test broke is back
    prompt, seed = "a hot air balloon over hills", 8
    job_id = requests.submit(prompt, tier="free", seed=seed, **GROUP_JOB)
    log.wait_for(lambda l: len(steps_of(l, job_id)) >= 13, 120, "step 13")
    first_agent = steps_of(log, job_id)[0]["agent_id"]
    launcher, leader, follower = group_running(platform, job_id)
    platform["processes"].signal_stage(launcher.pid, signal.SIGTERM)
    launcher.wait(60)
    for pid in (leader, follower):
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    drain = [c for c in log.of(job_id, topics.LATENT_CHECKPOINTED) if c["attempt"] == 1][-1]
    assert drain["step"] == [s["step"] for s in steps_of(log, job_id) if s["attempt"] == 1][-1]
    assert decisions(log, "REQUEUED", job_id)[0]["reason"] == "drained"
    assert_resumed_on_the_other_group(platform, job_id, prompt, seed, GROUP_JOB, first_agent)
