"""The scheduler on a real broker: any idle agent takes the next job whatever partition it came on, a premium job
preempts a free one (which resumes bit-identical), and a standby scheduler takes over from a killed active one.

One platform: prompt encoder, two schedulers (an active one and a standby), two agents. No decoder: a job is done
when its latent chunks are out (exactly one set of them). Every check reads the events back from the broker.
"""
from __future__ import annotations

import signal

import pytest
import torch

from streams import topics
from tests.fleet import (LONG_JOB, chunked_once, decisions, final_latent, job_ids_on_partition, pid_of,
                         reference_latent, running_fleet, steps_of)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    yield from running_fleet(tmp_path_factory.mktemp("scheduler"),
                             ("prompt-encoder", "scheduler", "scheduler", "gpu-agent", "gpu-agent"),
                             VIDGEN_CHECKPOINT_EVERY_STEPS="20",
                             VIDGEN_PREEMPT_AFTER_S="0")  # a premium job that finds no idle agent preempts at once


def _span(log, job_id):
    steps = steps_of(log, job_id)
    return steps[0]["timestamp"].timestamp(), steps[-1]["timestamp"].timestamp(), steps[0]["agent_id"]


def test_any_idle_agent_takes_work_whatever_partition_it_came_on(platform):
    log, requests = platform["log"], platform["requests"]
    job = dict(LONG_JOB, steps=100)
    job_ids = job_ids_on_partition("standard", 2, 4)
    for i, job_id in enumerate(job_ids):
        requests.submit(f"a lantern on a pier, take {i}", job_id=job_id, tier="standard", seed=10 + i, **job)
    for job_id in job_ids:
        chunked_once(log, job_id)

    sources = {(d["source_topic"], d["source_partition"]) for j in job_ids for d in decisions(log, "QUEUED", j)}
    assert sources == {(topics.encoded_topic("standard").name, 2)}, "the jobs all came on one partition"
    assigned = {j: decisions(log, "ASSIGNED", j) for j in job_ids}
    assert all(len(a) == 1 for a in assigned.values()), assigned
    assert len({a[0]["agent_id"] for a in assigned.values()}) == 2, "both agents took work"
    spans = [_span(log, j) for j in job_ids]
    concurrent = [(a, b) for a in spans for b in spans if a[2] != b[2] and a[0] < b[1] and b[0] < a[1]]
    assert concurrent, f"no two jobs ran at once on different agents: {spans}"


def test_a_premium_job_preempts_a_free_one_which_resumes_bit_identical(platform):
    log, requests, settings = platform["log"], platform["requests"], platform["settings"]
    prompts = {requests.submit(f"a field of wheat in the wind, take {i}", tier="free", seed=20 + i, **LONG_JOB):
               (f"a field of wheat in the wind, take {i}", 20 + i) for i in range(2)}
    free = list(prompts)
    log.wait_for(lambda l: all(len(steps_of(l, j)) >= 3 for j in free), 120, "both free jobs to run")
    running_on = {steps_of(log, j)[0]["agent_id"] for j in free}
    assert len(running_on) == 2, "every agent is busy with a free job"

    premium = requests.submit("a fanfare of trumpets", tier="premium", seed=30, **dict(LONG_JOB, steps=20))
    [preempt] = log.wait_for(lambda l: decisions(l, "PREEMPT"), 60, "a preemption")
    victim, victim_agent = preempt["job_id"], preempt["agent_id"]
    assert victim in free and victim_agent in running_on
    first = log.wait_for(lambda l: steps_of(l, premium), 60, "the premium job to start")[0]
    assert first["agent_id"] == victim_agent, "the premium job runs on the agent that yielded"
    yielded = sorted(s["step_ms"] for s in steps_of(log, victim) if s["attempt"] == 1)
    step_s = yielded[len(yielded) // 2] / 1000.0  # the median: one slow step on a shared machine says little
    delay_s = first["timestamp"].timestamp() - preempt["timestamp"].timestamp()
    print(f"preemption → the premium job's first step: {delay_s:.2f} s (step {step_s:.3f} s)")
    # The victim finishes its step and checkpoints it (≤ 2 steps from the order), hands back; the premium job
    # starts (a few hops) and runs its own first step.
    assert delay_s < 2 * step_s + first["step_ms"] / 1000.0 + 1.5, f"{delay_s:.2f} s (step {step_s:.3f} s)"

    chunked_once(log, premium)
    for job_id in free:
        chunked_once(log, job_id)
    [requeued] = decisions(log, "REQUEUED", victim)
    assert requeued["reason"] == "preempted" and requeued["agent_id"] == victim_agent
    attempt_one = [s["step"] for s in steps_of(log, victim) if s["attempt"] == 1]
    yielded_at = [c["step"] for c in log.of(victim, topics.LATENT_CHECKPOINTED) if c["attempt"] == 1][-1]
    assert yielded_at == attempt_one[-1] < LONG_JOB["steps"], "checkpointed at the step it yielded after"
    resumed = [s for s in steps_of(log, victim) if s["attempt"] > 1]
    assert resumed[0]["resumed_from_step"] == yielded_at and resumed[0]["step"] == yielded_at + 1
    assert [d["job_id"] for d in decisions(log, "REQUEUED")] == [victim], "nothing else was interrupted"
    prompt, seed = prompts[victim]
    assert torch.equal(final_latent(settings, log, victim), reference_latent(prompt, seed))


def test_a_standby_scheduler_takes_over_from_a_killed_active_one(platform):
    log, requests, processes = platform["log"], platform["requests"], platform["processes"]
    schedulers = {p.pid for p in processes.stages["scheduler"]}
    assert len(schedulers) == 2
    job = dict(LONG_JOB, steps=100)
    before = [requests.submit(f"a paper boat on a stream, take {i}", tier="standard", seed=40 + i, **job)
              for i in range(4)]
    log.wait_for(lambda l: all(decisions(l, "QUEUED", j) for j in before)
                 and sum(bool(decisions(l, "ASSIGNED", j)) for j in before) == 2, 60, "two running, two waiting")
    waiting = [j for j in before if not decisions(log, "ASSIGNED", j)]
    assert waiting
    leader = decisions(log, "LEADER")[-1]  # the active one: "<host>-<pid>"
    active = pid_of(leader["scheduler_id"])
    assert active in schedulers
    processes.signal_stage(active, signal.SIGKILL)
    after = [requests.submit(f"a paper kite in the sky, take {i}", tier="standard", seed=50 + i, **job)
             for i in range(2)]

    epoch = leader["leader_epoch"] + 1
    new_leader = log.wait_for(lambda l: [d for d in decisions(l, "LEADER") if d["leader_epoch"] == epoch], 60,
                              "the standby to lead")[0]
    assert pid_of(new_leader["scheduler_id"]) == (schedulers - {active}).pop()
    for job_id in before + after:
        chunked_once(log, job_id)
    for job_id in waiting + after:  # the new leader started them: nothing that waited was lost
        assert [d["leader_epoch"] for d in decisions(log, "ASSIGNED", job_id)] == [epoch], job_id
    log.wait_for(lambda l: all(decisions(l, "DONE", j) for j in before + after), 30, "every job's DONE decision")
    for job_id in before + after:
        assert len(decisions(log, "DONE", job_id)) == 1, job_id
    assert not [d for d in decisions(log, "REQUEUED") if d["job_id"] in before + after], "none was interrupted"
    assert [d["leader_epoch"] for d in decisions(log, "LEADER")][-2:] == [epoch - 1, epoch]
