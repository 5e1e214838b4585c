"""The GPU agent on a real broker: long jobs, SIGKILL and resume, drain, cancellation, failures.

One platform (prompt encoder, two agents, decoder, compliance) with a short session timeout and a
max.poll.interval.ms shorter than the long jobs it runs; every check reads the events back from the broker.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from confluent_kafka import Producer

from gpu_agents.models import ModelCatalogue
from gpu_agents.video import join_latent_chunks
from producers.requests import VideoRequests
from streams import topics
from streams.blobs import open_blob_store
from streams.events import new_event
from streams.kafka import producer_config
from streams.supervisor import PlatformProcesses
from consumers.progress import EventLog

pytestmark = pytest.mark.integration

MODEL = "tiny-wan-5m"
# ~40-70 ms per CFG step here: 80 steps outlast max.poll.interval.ms below by far.
LONG_JOB = dict(model=MODEL, width=128, height=128, num_frames=17, steps=80, guidance_scale=5.0)
MAX_POLL_INTERVAL_MS = 4000  # librdkafka needs it >= session.timeout.ms


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    var_dir = tmp_path_factory.mktemp("agents")
    processes = PlatformProcesses(var_dir, stages=("prompt-encoder", "gpu-agent", "gpu-agent", "vae-decoder",
                                                   "compliance"), env={
        "VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000",
        "VIDGEN_KAFKA_MAX_POLL_INTERVAL_MS": str(MAX_POLL_INTERVAL_MS),
        "VIDGEN_CHECKPOINT_EVERY_STEPS": "10",
    })
    settings = processes.start()
    log = EventLog(settings)
    requests = VideoRequests(settings)
    yield dict(processes=processes, settings=settings, log=log, requests=requests)
    requests.close()
    log.close()
    processes.stop()


def _agent_pid(step_event: dict) -> int:
    return int(step_event["agent_id"].rsplit("-", 1)[1].split(".")[0])  # <host>-<pid>.<random>


def _published_once(log: EventLog, job_id: str, timeout_s: float = 180) -> dict:
    log.wait_for(lambda l: l.terminal(job_id), timeout_s, f"job {job_id} to end")
    time.sleep(0.5)
    ends = log.terminal(job_id)
    assert [t for t, _ in ends] == [topics.PUBLISHED.name], ends
    return ends[0][1]


def _final_latent(settings, log: EventLog, job_id: str) -> torch.Tensor:
    blobs = open_blob_store(settings.blob_url)
    chunks = sorted(log.of(job_id, topics.LATENT_CHUNKS), key=lambda c: c["chunk_index"])
    unique = {c["chunk_index"]: c for c in chunks}
    return join_latent_chunks([blobs.get_tensor(unique[i]["latent"]) for i in sorted(unique)])


def _reference_latent(prompt: str, seed: int) -> torch.Tensor:
    catalogue = ModelCatalogue()
    with torch.inference_mode():
        return catalogue.pipeline(MODEL)(
            prompt=prompt, negative_prompt="", height=LONG_JOB["height"], width=LONG_JOB["width"],
            num_frames=LONG_JOB["num_frames"], num_inference_steps=LONG_JOB["steps"],
            guidance_scale=LONG_JOB["guidance_scale"], generator=torch.Generator().manual_seed(seed),
            output_type="latent", max_sequence_length=catalogue.max_sequence_length(MODEL),
        ).frames


def test_long_job_outlasting_max_poll_interval_costs_no_rebalance(platform):
    log, requests = platform["log"], platform["requests"]
    job_id = requests.submit("a lighthouse in a storm", tier="premium", seed=1, **LONG_JOB)
    _published_once(log, job_id)
    steps = log.of(job_id, topics.STEP_PROGRESS)
    duration_s = (steps[-1]["timestamp"] - steps[0]["timestamp"]).total_seconds()
    assert duration_s * 1000 > MAX_POLL_INTERVAL_MS, f"the job took only {duration_s:.1f} s; make it longer"
    assert {s["attempt"] for s in steps} == {1} and len({s["agent_id"] for s in steps}) == 1
    assert [s["step"] for s in steps] == list(range(1, LONG_JOB["steps"] + 1))
    checkpoints = [c["step"] for c in log.of(job_id, topics.LATENT_CHECKPOINTED)]
    assert checkpoints == list(range(10, LONG_JOB["steps"], 10))


def test_sigkill_mid_job_resumes_from_the_checkpoint_bit_identical(platform):
    log, requests, processes = platform["log"], platform["requests"], platform["processes"]
    prompt, seed = "a glacier calving into the sea", 2
    job_id = requests.submit(prompt, tier="standard", seed=seed, **LONG_JOB)
    first = log.wait_for(lambda l: l.of(job_id, topics.LATENT_CHECKPOINTED), 120, "a first checkpoint")[0]
    victim = _agent_pid(log.of(job_id, topics.STEP_PROGRESS)[0])
    processes.signal_stage(victim, signal.SIGKILL)
    killed_at = time.time()

    def resumed(l):
        return [s for s in l.of(job_id, topics.STEP_PROGRESS) if s["attempt"] > 1]

    resumed_steps = log.wait_for(resumed, 60, "the survivor to resume")
    resume_s = resumed_steps[0]["timestamp"].timestamp() - killed_at
    print(f"resume after SIGKILL: {resume_s:.2f} s")
    assert _agent_pid(resumed_steps[0]) != victim
    saved = {c["step"] for c in log.of(job_id, topics.LATENT_CHECKPOINTED) if c["attempt"] == 1}
    assert resumed_steps[0]["resumed_from_step"] in saved and resumed_steps[0]["resumed_from_step"] >= first["step"]
    assert resumed_steps[0]["step"] == resumed_steps[0]["resumed_from_step"] + 1
    _published_once(log, job_id)
    assert torch.equal(_final_latent(platform["settings"], log, job_id), _reference_latent(prompt, seed))
    processes.add_stage("gpu-agent")  # back to two agents for the tests that follow


def test_sigterm_drains_with_a_checkpoint_and_the_next_agent_resumes(platform):
    log, requests = platform["log"], platform["requests"]
    job_id = requests.submit("a hot air balloon over hills", tier="free", seed=3, **LONG_JOB)
    log.wait_for(lambda l: len(l.of(job_id, topics.STEP_PROGRESS)) >= 13, 120, "step 13")
    worker = _agent_pid(log.of(job_id, topics.STEP_PROGRESS)[0])
    process = platform["processes"].signal_stage(worker, signal.SIGTERM)
    assert process.wait(30) == 0, "a drained agent exits cleanly"
    attempt_one = [s["step"] for s in log.of(job_id, topics.STEP_PROGRESS) if s["attempt"] == 1]
    drain_checkpoint = [c for c in log.of(job_id, topics.LATENT_CHECKPOINTED) if c["attempt"] == 1][-1]
    assert drain_checkpoint["step"] == attempt_one[-1], "checkpointed at the step it stopped after"
    resumed = log.wait_for(lambda l: [s for s in l.of(job_id, topics.STEP_PROGRESS) if s["attempt"] > 1], 60,
                           "another agent to resume")
    assert resumed[0]["resumed_from_step"] == drain_checkpoint["step"]
    _published_once(log, job_id)
    platform["processes"].add_stage("gpu-agent")


def test_cancelling_a_running_job_stops_it_within_a_step(platform):
    log, requests = platform["log"], platform["requests"]
    job_id = requests.submit("a train crossing a bridge", tier="premium", seed=4, **LONG_JOB)
    log.wait_for(lambda l: len(l.of(job_id, topics.STEP_PROGRESS)) >= 5, 120, "step 5")
    requests.cancel(job_id, reason="changed my mind", requested_by="test")
    cancelled_at = time.time()
    log.wait_for(lambda l: l.terminal(job_id), 30, "the cancellation")
    time.sleep(0.5)
    [(topic, event)] = log.terminal(job_id)
    assert topic == topics.CANCELLED.name and event["reason"] == "changed my mind"
    steps_after = [s for s in log.of(job_id, topics.STEP_PROGRESS) if s["timestamp"].timestamp() > cancelled_at]
    step_ms = max(s["step_ms"] for s in log.of(job_id, topics.STEP_PROGRESS))
    # The request takes a hop or two to arrive; then the job stops at the next step boundary.
    assert len(steps_after) <= 2, f"{len(steps_after)} steps ran after the cancellation (step {step_ms:.0f} ms)"
    assert event["stopped_at_step"] == log.of(job_id, topics.STEP_PROGRESS)[-1]["step"]
    assert not log.of(job_id, topics.LATENT_CHUNKS)


def test_a_failing_job_is_retried_then_failed_without_blocking_its_partition(platform):
    log, requests, settings = platform["log"], platform["requests"], platform["settings"]
    bad_job = "job-with-a-missing-blob"
    missing = {"uri": (settings.var_dir / "blobs" / bad_job / "gone.safetensors").as_uri(), "sha256": "0" * 64,
               "bytes": 10, "shape": [1, 32, 32], "dtype": "float32"}
    params = dict(width=32, height=32, num_frames=5, fps=8, steps=3, guidance_scale=1.0, seed=5, model="tiny-wan",
                  preset="quality")
    encoded = new_event(bad_job, tenant="t", tier="FREE", params=params, prompt_sha256="0" * 64, encoder="x",
                        prompt_embeds=missing, negative_prompt_embeds=None, requested_at=None)
    producer = Producer(producer_config(settings, "test-bad-job"))
    from streams.serde import event_codec

    topic = topics.encoded_topic("free").name
    producer.produce(topic, key=bad_job.encode(), value=event_codec(settings).encode(topic, encoded), partition=0)
    producer.flush(10)
    good_job = requests.submit("a kite on a beach", tier="free", seed=6, width=32, height=32, num_frames=5, steps=3,
                               guidance_scale=1.0)
    failed = log.wait_for(lambda l: l.of(bad_job, topics.FAILED), 60, "the bad job to fail")[0]
    assert failed["stage"] == "gpu-agent" and failed["attempts"] == 3 and "does not exist" in failed["reason"]
    _published_once(log, good_job)
    platform["processes"].check_alive()


def test_an_agent_frozen_past_its_session_loses_the_job_and_the_new_owner_resumes_it(platform):
    """SIGSTOP the agent running a job past the session timeout: the group gives its partitions to the other
    agent, which resumes the job from the newest checkpoint; the frozen one, woken, is a zombie until librdkafka
    reports its partitions lost (then it stops at a step boundary, after a checkpoint). Whatever the zombie did,
    the job is published once and bit-identical to an uninterrupted run."""
    log, requests, processes = platform["log"], platform["requests"], platform["processes"]
    prompt, seed = "a heron standing in reeds", 7
    job_id = requests.submit(prompt, tier="premium", seed=seed, **LONG_JOB)
    log.wait_for(lambda l: l.of(job_id, topics.LATENT_CHECKPOINTED), 120, "a first checkpoint")
    sleeper = _agent_pid(log.of(job_id, topics.STEP_PROGRESS)[0])
    os.kill(sleeper, signal.SIGSTOP)
    try:
        taken_over = log.wait_for(lambda l: [s for s in l.of(job_id, topics.STEP_PROGRESS) if s["attempt"] > 1],
                                  60, "the other agent to take the job over")
    finally:
        os.kill(sleeper, signal.SIGCONT)
    assert _agent_pid(taken_over[0]) != sleeper
    saved = {c["step"] for c in log.of(job_id, topics.LATENT_CHECKPOINTED) if c["attempt"] == 1}
    assert taken_over[0]["resumed_from_step"] in saved
    _published_once(log, job_id)
    assert torch.equal(_final_latent(platform["settings"], log, job_id), _reference_latent(prompt, seed))
    processes.check_alive()
