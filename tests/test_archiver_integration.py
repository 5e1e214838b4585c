"""The archiver for real: the embedded broker and registry, the archiver as its own process (`python -m
consumers.archiver`, what `vidgen stage archiver` runs). Records on several topics are archived and verify; the
archiver is SIGKILLed mid-stream and restarted: nothing is lost and nothing is archived twice. Then a job's real
(Avro, registry-encoded) events are replayed from the archive alone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from confluent_kafka import Producer

from consumers.audit import iter_archive, main_replay, verify_archive
from streams import topics
from streams.kafka import producer_config
from streams.serde import encode_key, event_codec
from streams.supervisor import PlatformProcesses
from tests.platforms import running_platform
from tests.test_job_state import job_lifecycle

pytestmark = pytest.mark.integration

WAIT_S = 40


@pytest.fixture
def platform(tmp_path):
    with running_platform(tmp_path / "var", VIDGEN_ARCHIVE_FLUSH_S="0.2",
                          VIDGEN_ARCHIVE_ROTATE_BYTES="20000") as running:
        yield running


def start_archiver(platform: PlatformProcesses, run: int, env: dict | None = None) -> subprocess.Popen:
    platform.log_dir.mkdir(parents=True, exist_ok=True)
    with open(platform.log_dir / f"archiver-{run}.log", "ab") as log_file:
        return subprocess.Popen([sys.executable, "-m", "consumers.archiver"], env={**platform.env, **(env or {})},
                                stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=os.getcwd())


def produce_raw(settings, topic_name: str, start: int, count: int) -> None:
    producer = Producer(producer_config(settings, "test-archiver"))
    for n in range(start, start + count):
        producer.produce(topic_name, key=f"job-{n % 7}".encode(), value=b"raw-%d" % n,
                         headers=[("n", str(n).encode())])
        if n % 500 == 0:
            producer.poll(0)
    assert producer.flush(10) == 0
    producer.close()


def archived(root) -> list[tuple[str, int, int]]:
    return [(r["topic"], r["partition"], r["offset"]) for r in iter_archive(root)]


def wait_for_records(root, count: int, archiver: subprocess.Popen) -> list:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        positions = archived(root)
        if len(positions) >= count:
            return positions
        assert archiver.poll() is None, f"the archiver exited with {archiver.returncode}"
        time.sleep(0.1)
    raise AssertionError(f"timed out: {len(archived(root))} of {count} records archived")


def test_archive_survives_a_crash_without_loss_or_duplicates_and_replays(platform, monkeypatch):
    platform, settings = platform
    root = platform.var_dir / "archive"
    # a job's events, encoded as the stages encode them, plus raw bytes on other topics
    codec = event_codec(settings)
    producer = Producer(producer_config(settings, "test-archiver"))
    events = job_lifecycle("job-archived")
    for topic_name, event in events:
        producer.produce(topic_name, key=encode_key(event["job_id"]), value=codec.encode(topic_name, event),
                         headers=[("traceparent", b"00-trace")])
    assert producer.flush(10) == 0
    producer.close()
    produce_raw(settings, topics.DEAD_LETTER.name, 0, 50)
    expected = len(events) + 50

    archiver = start_archiver(platform, 1)
    wait_for_records(root, expected, archiver)
    result = verify_archive(root)
    assert result.ok, result.problems

    # mid-stream: a burst arrives and the archiver is killed while it is archiving it
    produce_raw(settings, topics.STEP_PROGRESS.name, 0, 3000)
    wait_for_records(root, expected + 1, archiver)
    archiver.send_signal(signal.SIGKILL)
    archiver.wait(10)
    produce_raw(settings, topics.CONTROL.name, 0, 20)
    expected += 3000 + 20

    # The worst case of a crash is records fsynced whose offsets were never committed. Worse still: restart with
    # no committed offsets at all (a group of another name, through the client pass-through), so every record
    # archived so far is delivered again and must be recognised as a copy.
    archiver = start_archiver(platform, 2, {"VIDGEN_KAFKA_GROUP_ID": "vidgen.archiver-offsets-lost"})
    positions = wait_for_records(root, expected, archiver)
    time.sleep(0.5)  # anything extra (a duplicate) would show up by now
    positions = archived(root)
    duplicates = [p for p, n in Counter(positions).items() if n > 1]
    assert not duplicates, duplicates[:5]
    assert len(positions) == expected
    per_topic = Counter(t for t, _p, _o in positions)
    assert per_topic[topics.STEP_PROGRESS.name] == 3000 + sum(t == topics.STEP_PROGRESS.name for t, _ in events)
    archiver.send_signal(signal.SIGTERM)
    assert archiver.wait(20) == 0
    stats = (platform.log_dir / "archiver-2.log").read_text()
    assert '"duplicates": 0,' not in stats, "every record archived before the crash came again and was skipped"
    result = verify_archive(root)
    assert result.ok, result.problems
    assert result.records == expected

    # the job's history from the archive alone (writer schemas kept in the archive): every invariant holds
    assert any((root / "_schemas").glob("*.json"))
    monkeypatch.setenv("VIDGEN_VAR_DIR", str(platform.var_dir))
    monkeypatch.delenv("VIDGEN_SCHEMA_REGISTRY_URL", raising=False)
    report = platform.var_dir / "audit" / "archive.json"
    assert main_replay(["--source", "archive", "--no-blobs", "--report", str(report)]) == 0
    assert '"job-archived"' in report.read_text()
    assert main_replay(["--source", "kafka", "--no-blobs", "--report", str(report) + ".kafka"]) == 0
