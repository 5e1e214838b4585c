"""GPU agents on a real broker, taking their work from the scheduler: long jobs, an agent killed (declared dead, its
job resumes elsewhere), drained, frozen (a zombie, fenced), cancellations, failures.

One platform (prompt encoder, scheduler, two agents, decoder, compliance) with a short agent timeout; every check
reads the events back from the broker.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from confluent_kafka import Producer

from gpu_agents.video import read_mp4
from streams import topics
from streams.blobs import open_blob_store
from streams.events import new_event
from streams.kafka import producer_config
from streams.serde import event_codec
from tests.fleet import (LONG_JOB, LONG_JOBS_BY_LAYOUT, chunked_once, decisions, final_latent, orders, pid_of, published_once,
                         reference_latent, reports, running_fleet, steps_of, wait_for_idle_agents)

pytestmark = pytest.mark.integration

AGENT_TIMEOUT_S = 3.0
CHECKPOINT_EVERY = 20


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    yield from running_fleet(tmp_path_factory.mktemp("agents"), ("prompt-encoder", "scheduler", "gpu-agent",
                                                                   "gpu-agent", "vae-decoder", "compliance"),
                             VIDGEN_AGENT_TIMEOUT_S=str(AGENT_TIMEOUT_S),
                             VIDGEN_CHECKPOINT_EVERY_STEPS=str(CHECKPOINT_EVERY))


def _first_agent(log, job_id) -> str:
    return steps_of(log, job_id)[0]["agent_id"]


def test_a_long_job_runs_once_on_one_agent_with_periodic_checkpoints(platform):
    log, requests = platform["log"], platform["requests"]
    job_id = requests.submit("a lighthouse in a storm", tier="premium", seed=1, **LONG_JOB)
    published_once(log, job_id)
    steps = steps_of(log, job_id)
    assert {s["attempt"] for s in steps} == {1} and len({s["agent_id"] for s in steps}) == 1
    assert [s["step"] for s in steps] == list(range(1, LONG_JOB["steps"] + 1))
    checkpoints = [c["step"] for c in log.of(job_id, topics.LATENT_CHECKPOINTED)]
    assert checkpoints == list(range(CHECKPOINT_EVERY, LONG_JOB["steps"], CHECKPOINT_EVERY))
    [assigned] = decisions(log, "ASSIGNED", job_id)
    assert assigned["agent_id"] == steps[0]["agent_id"] and assigned["epoch"] == 1
    log.wait_for(lambda l: decisions(l, "DONE", job_id), 10, "the job's DONE decision")
    assert len(decisions(log, "DONE", job_id)) == 1


@pytest.mark.parametrize("layout", sorted(LONG_JOBS_BY_LAYOUT))
def test_a_killed_agent_is_declared_dead_and_its_job_resumes_elsewhere_bit_identical(platform, layout):
    log, requests, processes = platform["log"], platform["requests"], platform["processes"]
    prompt, seed, job = "a glacier calving into the sea", 2, LONG_JOBS_BY_LAYOUT[layout]
    job_id = requests.submit(prompt, tier="standard", seed=seed, **job)
    first = log.wait_for(lambda l: l.of(job_id, topics.LATENT_CHECKPOINTED), 120, "a first checkpoint")[0]
    victim = _first_agent(log, job_id)
    processes.signal_stage(pid_of(victim), signal.SIGKILL)
    killed_at = time.time()

    [requeued] = log.wait_for(lambda l: decisions(l, "REQUEUED", job_id), 30, "the job to be requeued")
    assert requeued["reason"] == "agent dead" and requeued["agent_id"] == victim and requeued["epoch"] == 1
    dead_after_s = requeued["timestamp"].timestamp() - killed_at
    assert AGENT_TIMEOUT_S - 1.5 < dead_after_s < AGENT_TIMEOUT_S + 5, f"declared dead after {dead_after_s:.1f} s"
    dead = log.wait_for(lambda l: [d for d in decisions(l, "AGENT_DEAD") if d["timestamp"].timestamp() >= killed_at],
                        10, "the agent to be declared dead")
    assert [d["agent_id"] for d in dead] == [victim]
    resumed = log.wait_for(lambda l: [s for s in steps_of(l, job_id) if s["attempt"] > 1], 60, "another agent")
    print(f"declared dead after {dead_after_s:.2f} s; resumed after "
          f"{resumed[0]['timestamp'].timestamp() - killed_at:.2f} s")
    assert resumed[0]["agent_id"] != victim
    assert [d["epoch"] for d in decisions(log, "ASSIGNED", job_id)] == [1, 2]
    saved = {c["step"] for c in log.of(job_id, topics.LATENT_CHECKPOINTED) if c["attempt"] == 1}
    assert resumed[0]["resumed_from_step"] in saved and resumed[0]["resumed_from_step"] >= first["step"]
    assert resumed[0]["step"] == resumed[0]["resumed_from_step"] + 1
    published_once(log, job_id)
    chunked_once(log, job_id)
    assert torch.equal(final_latent(platform["settings"], log, job_id), reference_latent(prompt, seed, job))
    processes.add_stage("gpu-agent")  # back to two agents for the tests that follow


def test_sigterm_drains_with_a_checkpoint_and_the_next_agent_resumes(platform):
    log, requests, processes = platform["log"], platform["requests"], platform["processes"]
    job_id = requests.submit("a hot air balloon over hills", tier="free", seed=3, **LONG_JOB)
    log.wait_for(lambda l: len(steps_of(l, job_id)) >= 13, 120, "step 13")
    worker = _first_agent(log, job_id)
    process = processes.signal_stage(pid_of(worker), signal.SIGTERM)
    assert process.wait(30) == 0, "a drained agent exits cleanly"
    attempt_one = [s["step"] for s in steps_of(log, job_id) if s["attempt"] == 1]
    drain_checkpoint = [c for c in log.of(job_id, topics.LATENT_CHECKPOINTED) if c["attempt"] == 1][-1]
    assert drain_checkpoint["step"] == attempt_one[-1] < LONG_JOB["steps"], "checkpointed at the step it stopped after"
    resumed = log.wait_for(lambda l: [s for s in steps_of(l, job_id) if s["attempt"] > 1], 60,
                           "another agent to resume")
    assert resumed[0]["resumed_from_step"] == drain_checkpoint["step"] and resumed[0]["agent_id"] != worker
    [requeued] = decisions(log, "REQUEUED", job_id)
    assert requeued["reason"] == "drained" and requeued["agent_id"] == worker
    published_once(log, job_id)
    processes.add_stage("gpu-agent")


def test_cancelling_a_waiting_job_and_a_running_one(platform):
    """Both agents busy: a third job waits. Cancelled, it ends at the scheduler without ever starting; a running job
    cancelled stops within a step or two on its agent."""
    log, requests = platform["log"], platform["requests"]
    wait_for_idle_agents(log, 2)
    endless = dict(LONG_JOB, steps=1000)  # the most a request may ask; cancelled long before its end
    running = [requests.submit(f"a train crossing a bridge, take {i}", tier="premium", seed=4 + i, **endless)
               for i in range(2)]
    log.wait_for(lambda l: all(len(steps_of(l, j)) >= 5 for j in running), 120, "both agents to be busy")
    assert len({_first_agent(log, j) for j in running}) == 2
    waiting = requests.submit("a queue nobody wanted", tier="premium", seed=6, **endless)
    log.wait_for(lambda l: decisions(l, "QUEUED", waiting), 60, "the third job to wait")
    requests.cancel(waiting, reason="too slow", requested_by="test")
    requests.cancel(running[0], reason="changed my mind", requested_by="test")
    cancelled_at = time.time()

    log.wait_for(lambda l: l.terminal(waiting) and l.terminal(running[0]), 30, "the cancellations")
    requests.cancel(running[1], reason="no longer needed")
    log.wait_for(lambda l: l.terminal(running[1]), 30, "the other cancellation")
    [(topic, event)] = log.terminal(waiting)
    assert topic == topics.CANCELLED.name and event["stage"] == "scheduler" and event["stopped_at_step"] is None
    assert event["reason"] == "too slow" and event["requested_by"] == "test"
    log.wait_for(lambda l: decisions(l, "CANCELLED", waiting), 10, "the scheduler's decision")
    assert [d["kind"] for d in decisions(log, job_id=waiting)] == ["QUEUED", "CANCELLED"], "it never started"
    assert not steps_of(log, waiting) and not log.of(waiting, topics.LATENT_CHUNKS)

    job_id = running[0]
    [(topic, event)] = log.terminal(job_id)
    assert topic == topics.CANCELLED.name and event["stage"] == "gpu-agent" and event["reason"] == "changed my mind"
    steps = steps_of(log, job_id)
    step_s = sorted(s["step_ms"] for s in steps)[len(steps) // 2] / 1000.0
    ran_on_s = steps[-1]["timestamp"].timestamp() - cancelled_at
    # The request takes a hop or two to arrive (tens of ms; more on a busy machine); then the job stops at the
    # next step boundary.
    assert ran_on_s < 2 * step_s + 1.0, f"it ran on {ran_on_s:.2f} s after the cancellation (step {step_s:.3f} s)"
    assert event["stopped_at_step"] == steps_of(log, job_id)[-1]["step"]
    assert not log.of(job_id, topics.LATENT_CHUNKS)
    log.wait_for(lambda l: decisions(l, "DONE", job_id), 10, "the agent to be freed")
    assert [d["kind"] for d in decisions(log, job_id=job_id)] == ["QUEUED", "ASSIGNED", "DONE"]


def test_cancelling_a_video_mid_stream_keeps_its_segments_and_ends_it_cancelled(platform):
    """A model that streams while generating: chunks already out stay playable segments; the job stops at the next
    step and ends cancelled, not published; the decoder lets go of it (a later job on the fleet is published)."""
    log, requests, settings = platform["log"], platform["requests"], platform["settings"]
    wait_for_idle_agents(log, 2)
    job = dict(LONG_JOBS_BY_LAYOUT["helios"], steps=400)  # 5 chunks; cancelled during the second
    job_id = requests.submit("a river delta from above", tier="standard", seed=8, **job)
    log.wait_for(lambda l: [d for d in l.of(job_id, topics.DECODED) if d["segment_index"] == 0], 120,
                 "the first segment")
    requests.cancel(job_id, reason="seen enough", requested_by="test")
    log.wait_for(lambda l: l.terminal(job_id), 30, "the cancellation")
    [(topic, event)] = log.terminal(job_id)
    assert topic == topics.CANCELLED.name and event["stage"] == "gpu-agent"
    chunk_count = steps_of(log, job_id)[-1]["chunk_count"]
    segments = {d["segment_index"]: d for d in log.of(job_id, topics.DECODED)}
    assert 1 <= len(segments) < chunk_count and not log.of(job_id, topics.PUBLISHED)
    blobs = open_blob_store(settings)
    first = segments[0]
    frames = read_mp4(blobs.get(first["init_segment"]) + blobs.get(first["segment"]))
    assert frames.shape == (first["frames"], job["height"], job["width"], 3), "a segment out stays playable"
    after = requests.submit("the fleet goes on", tier="standard", seed=9, **dict(job, num_frames=33, steps=2))
    log.wait_for(lambda l: l.of(after, topics.PUBLISHED), 120, "a later streaming job to be published")


def test_a_failing_job_is_retried_then_failed_without_blocking_the_fleet(platform):
    log, requests, settings = platform["log"], platform["requests"], platform["settings"]
    bad_job = "job-with-a-missing-blob"
    missing = {"uri": (settings.var_dir / "blobs" / bad_job / "gone.safetensors").as_uri(), "sha256": "0" * 64,
               "bytes": 10, "shape": [1, 32, 32], "dtype": "float32"}
    params = dict(width=32, height=32, num_frames=5, fps=8, steps=3, guidance_scale=1.0, seed=5, model="tiny-wan",
                  preset="quality", input_reference=None)
    encoded = new_event(bad_job, tenant="t", tier="FREE", params=params, prompt_sha256="0" * 64, encoder="x",
                        prompt_embeds=missing, negative_prompt_embeds=None, requested_at=None)
    producer = Producer(producer_config(settings, "test-bad-job"))
    topic = topics.encoded_topic("free").name
    producer.produce(topic, key=bad_job.encode(), value=event_codec(settings).encode(topic, encoded), partition=0)
    producer.flush(10)
    good_job = requests.submit("a kite on a beach", tier="free", seed=6, width=32, height=32, num_frames=5, steps=3,
                               guidance_scale=1.0)
    failed = log.wait_for(lambda l: l.of(bad_job, topics.FAILED), 60, "the bad job to fail")[0]
    assert failed["stage"] == "gpu-agent" and failed["attempts"] == 3 and "does not exist" in failed["reason"]
    published_once(log, good_job)
    log.wait_for(lambda l: decisions(l, "DONE", bad_job), 30, "the failed job to free its agent")
    platform["processes"].check_alive()


def test_a_frozen_agent_is_fenced_and_the_job_finished_once_by_another(platform):
    """SIGSTOP the agent running a job past the agent timeout: the scheduler declares it dead, requeues the job and
    sends it a REVOKE; the other agent resumes the job from the newest checkpoint and finishes it. Woken, the
    zombie reads the REVOKE and stops at its next step boundary without a result, then takes new work."""
    log, requests, processes = platform["log"], platform["requests"], platform["processes"]
    prompt, seed = "a heron standing in reeds", 7
    wait_for_idle_agents(log, 2)
    job_id = requests.submit(prompt, tier="premium", seed=seed, **LONG_JOB)
    log.wait_for(lambda l: l.of(job_id, topics.LATENT_CHECKPOINTED), 120, "a first checkpoint")
    zombie = _first_agent(log, job_id)
    os.kill(pid_of(zombie), signal.SIGSTOP)
    try:
        [requeued] = log.wait_for(lambda l: decisions(l, "REQUEUED", job_id), 30, "the job to be requeued")
        assert requeued["reason"] == "agent dead" and requeued["agent_id"] == zombie
        log.wait_for(lambda l: orders(l, "REVOKE", zombie, job_id), 10, "the frozen agent to be fenced")
        chunked_once(log, job_id)  # finished by the other agent while the zombie sleeps
    finally:
        os.kill(pid_of(zombie), signal.SIGCONT)
    woke_at = time.time()
    zombie_attempt = steps_of(log, job_id, zombie)[0]["attempt"]
    taken_over = [s for s in steps_of(log, job_id) if s["attempt"] > zombie_attempt]
    assert taken_over and {s["agent_id"] for s in taken_over} != {zombie}
    saved = {c["step"] for c in log.of(job_id, topics.LATENT_CHECKPOINTED) if c["attempt"] == zombie_attempt}
    assert taken_over[0]["resumed_from_step"] in saved

    fenced = log.wait_for(lambda l: [r for r in reports(l, zombie) if r["finished_job_id"] == job_id], 30,
                          "the zombie to report how the job ended")[0]
    assert (fenced["state"], fenced["finished_outcome"], fenced["finished_reason"]) == ("IDLE", "INTERRUPTED", "fenced")
    # The zombie takes new work: two jobs at once on two idle agents.
    assert zombie in wait_for_idle_agents(log, 2)
    later = [requests.submit(f"a frog on a lily pad, take {i}", tier="standard", seed=8 + i,
                             **dict(LONG_JOB, steps=40)) for i in range(2)]
    for later_job in later:
        published_once(log, later_job)
    assert zombie in {_first_agent(log, j) for j in later}, "the woken agent takes work again"

    published_once(log, job_id)
    chunked_once(log, job_id)  # still exactly one set
    assert {c["attempt"] for c in log.of(job_id, topics.LATENT_CHUNKS)} != {zombie_attempt}
    woke_steps = [s for s in steps_of(log, job_id, zombie) if s["timestamp"].timestamp() > woke_at]
    assert len(woke_steps) <= 2, f"the zombie ran {len(woke_steps)} steps after it woke"
    assert [d["epoch"] for d in decisions(log, "ASSIGNED", job_id)] == [1, 2]
    assert torch.equal(final_latent(platform["settings"], log, job_id), reference_latent(prompt, seed))
    processes.check_alive()


def test_a_zombie_woken_on_its_last_step_confirms_and_leaves_the_result_to_the_new_owner(platform):
    """The agent is frozen during the job's last step, declared dead, and the job finished by the other agent.
    Woken, the zombie completes that step; before its result becomes final it catches up on the assignments topic
    (ctx.confirm), finds the REVOKE, and emits no chunk: the job is published once, by the new owner."""
    log, requests = platform["log"], platform["requests"]
    slow = dict(model=LONG_JOB["model"], width=256, height=256, num_frames=17, steps=4, guidance_scale=5.0)
    for take in range(3):  # the freeze must land inside the last step (~0.3 s here); try again if it came late
        wait_for_idle_agents(log, 2)
        prompt, seed = f"an owl on a branch at night, take {take}", 70 + take
        job_id = requests.submit(prompt, tier="standard", seed=seed, **slow)
        log.wait_for(lambda l: [s for s in steps_of(l, job_id) if s["step"] == slow["steps"] - 1], 120,
                     "the last step to begin")
        zombie = _first_agent(log, job_id)
        os.kill(pid_of(zombie), signal.SIGSTOP)
        time.sleep(0.3)  # anything it emitted before it froze arrives
        if max(s["step"] for s in steps_of(log, job_id, zombie)) < slow["steps"]:
            break
        os.kill(pid_of(zombie), signal.SIGCONT)  # too late: it finished; the next take
        published_once(log, job_id)
    else:
        pytest.fail("the agent could not be frozen inside a last step")
    try:
        [requeued] = log.wait_for(lambda l: decisions(l, "REQUEUED", job_id), 30, "the job to be requeued")
        assert requeued["reason"] == "agent dead" and requeued["agent_id"] == zombie
        chunked_once(log, job_id)
    finally:
        os.kill(pid_of(zombie), signal.SIGCONT)
    fenced = log.wait_for(lambda l: [r for r in reports(l, zombie) if r["finished_job_id"] == job_id], 30,
                          "the zombie to report how the job ended")[0]
    assert (fenced["finished_outcome"], fenced["finished_reason"]) == ("INTERRUPTED", "fenced")
    published_once(log, job_id)
    chunks = chunked_once(log, job_id)  # one set, from the new owner's attempt
    zombie_attempt = steps_of(log, job_id, zombie)[0]["attempt"]
    assert chunks[0]["attempt"] != zombie_attempt
    assert torch.equal(final_latent(platform["settings"], log, job_id), reference_latent(prompt, seed, slow))
