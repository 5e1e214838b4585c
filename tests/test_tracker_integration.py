"""The job tracker for real: the embedded broker and registry (`vidgen broker`), the tracker as its own process.

A job's lifecycle events go on the topics with redeliveries and garbage among them; the tracker folds them into
its table, and the states are read back from the table's changelog the way the gateway reads them. Then the tracker
is stopped and started again: the first job's state must come back exactly (table recovery), a late event for it
must fold onto that state, and a second job must be folded too.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from confluent_kafka import Producer

from consumers.job_state import PUBLISHED, to_public
from consumers.progress import read_events
from consumers.tracker import (CHANGELOG_TOPIC, JobStateReader, build_tracker_app, changelog_topic_name,
                               read_job_states)
from streams import topics
from streams.kafka import producer_config
from streams.serde import encode_key, event_codec
from streams.supervisor import PlatformProcesses
from tests.platforms import running_platform
from tests.test_job_state import flagged, job_lifecycle, step

pytestmark = pytest.mark.integration

WAIT_S = 30


@pytest.fixture
def platform(tmp_path):
    with running_platform(tmp_path / "var") as running:
        yield running


def start_tracker(platform: PlatformProcesses, run: int) -> subprocess.Popen:
    """`python -m consumers.tracker` with the platform's environment (what `vidgen stage tracker` will run)."""
    platform.log_dir.mkdir(parents=True, exist_ok=True)
    with open(platform.log_dir / f"tracker-{run}.log", "ab") as log_file:
        tracker = subprocess.Popen([sys.executable, "-m", "consumers.tracker"], env=platform.env, stdout=log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=os.getcwd())
    tracker.args_log = platform.log_dir / f"tracker-{run}.log"
    return tracker


def stop_tracker(tracker: subprocess.Popen) -> int:
    tracker.send_signal(signal.SIGTERM)
    return tracker.wait(20)


def publish(settings, events: list[tuple[str, dict]], garbage: bytes | None = None) -> None:
    codec = event_codec(settings)
    producer = Producer(producer_config(settings, "test-tracker"))
    for topic_name, event in events:
        producer.produce(topic_name, key=encode_key(event["job_id"]), value=codec.encode(topic_name, event))
    if garbage is not None:
        producer.produce(topics.REQUESTED.name, key=b"garbage", value=garbage)
    assert producer.flush(10) == 0
    producer.close()


def wait_for_state(reader: JobStateReader, job_id: str, predicate, what: str, tracker: subprocess.Popen) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        state = reader.catch_up().get(job_id)
        if state is not None and predicate(state):
            return state
        assert tracker.poll() is None, f"the tracker exited with {tracker.returncode}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last state: {reader.states.get(job_id)}\n"
                         f"the tracker's log ends:\n{log_tail(tracker)}")


def log_tail(tracker: subprocess.Popen, lines: int = 80) -> str:
    """The end of the tracker's log (its stdout file, without faust's tables): on a failure, what the tracker did."""
    try:
        with open(tracker.args_log, encoding="utf-8", errors="replace") as log_file:
            kept = [line for line in log_file if not line.startswith(("|", "+"))]  # faust's ASCII tables
        return "".join(kept[-lines:])
    except (AttributeError, OSError) as exc:
        return f"(no log: {exc})"


def count_changes(settings) -> Counter:
    """How many state changes of each job the changelog holds."""
    changes = Counter()
    with JobStateReader(settings, on_change=lambda job_id, state: changes.update([job_id])) as reader:
        reader.catch_up()
    return changes


def test_tracker_folds_jobs_and_survives_a_restart_with_its_table_intact(platform):
    platform, settings = platform
    assert changelog_topic_name(build_tracker_app(settings)) == CHANGELOG_TOPIC  # what readers read is faust's
    first = job_lifecycle("job-a", total=4, segments=2)
    redelivered = [first[3], first[-1], first[0]]  # a step, the publication and the request, again
    publish(settings, first + redelivered, garbage=b"not avro at all")

    tracker = start_tracker(platform, 1)
    try:
        with JobStateReader(settings) as reader:
            wait_for_state(reader, "job-a", lambda s: s["status"] == PUBLISHED, "job-a published", tracker)
        states = read_job_states(settings)
        job_a = to_public(states["job-a"])
        assert job_a["status"] == PUBLISHED and job_a["step"] == job_a["total_steps"] == 4
        assert [s["index"] for s in job_a["segments"]] == [0, 1]
        assert job_a["outputs"]["video"]["uri"].endswith("video.mp4")
        assert job_a["checkpoints"] == {"count": 1, "last_step": 2}
        assert (job_a["tier"], job_a["tenant"]) == ("premium", "acme")

        # The garbage went to the dead-letter topic, and the tracker kept going.
        for job_event in read_events(settings, lifecycle=(topics.DEAD_LETTER,)):
            assert job_event is not None, "no dead letter from the tracker"
            if job_event.event["stage"] == "tracker":
                assert job_event.event["raw_value"] == b"not avro at all"
                assert job_event.event["source_topic"] == topics.REQUESTED.name
                break
        assert stop_tracker(tracker) == 0
    finally:
        if tracker.poll() is None:
            tracker.kill()
    changes_before_restart = count_changes(settings)

    # While the tracker is down: a second job, and a late event of the first (a reviewer's annotation) plus a
    # stray old step, which must land on job-a's recovered state, not on an empty one.
    second = job_lifecycle("job-b", total=3, segments=1)
    late_for_a = [flagged("job-a", "REVIEW", ends_job=False), step("job-a", 2)]
    publish(settings, second + late_for_a)

    tracker = start_tracker(platform, 2)
    try:
        with JobStateReader(settings) as reader:
            wait_for_state(reader, "job-b", lambda s: s["status"] == PUBLISHED, "job-b published", tracker)
            recovered_a = wait_for_state(reader, "job-a", lambda s: s["flags"], "job-a's late flag", tracker)
            recovered = to_public(recovered_a)
            assert recovered["status"] == PUBLISHED and recovered["flags"][0]["decision"] == "REVIEW"
            assert {k: v for k, v in recovered.items() if k not in ("flags", "updated_at")} == \
                   {k: v for k, v in job_a.items() if k not in ("flags", "updated_at")}
            job_b = to_public(reader.states["job-b"])
            assert job_b["step"] == job_b["total_steps"] == 3 and len(job_b["segments"]) == 1

            # Latency from an event on a lifecycle topic to the state on the changelog, through both hops.
            started = time.monotonic()
            publish(settings, [flagged("job-b", "REVIEW", ends_job=False)])
            wait_for_state(reader, "job-b", lambda s: s["flags"], "job-b's flag", tracker)
            print(f"event → changelog: {time.monotonic() - started:.2f} s")
        assert stop_tracker(tracker) == 0
    finally:
        if tracker.poll() is None:
            tracker.kill()
    # Exactly one more change of job-a (the flag; the stray step changes nothing): the restarted tracker folded
    # onto the recovered state, rather than rebuilding job-a (or part of it) from events.
    assert count_changes(settings)["job-a"] == changes_before_restart["job-a"] + 1
