"""Restoring the embedded broker from the archive (consumers/restore.py) on a real, fresh Tansu broker: every record
back in its partition and order with key, value, headers and timestamp; consumer groups at their translated
positions; the archive continuing in a new epoch; a damaged archive refused before anything starts. And the plain
pieces: offset translation, the recorded positions' safety rule, the dedupe ledger's distrusted window."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from consumers.archiver import (GENERATION_FILE, GROUP_ID as ARCHIVER_GROUP, GROUP_OFFSETS_FILE, ArchiveSettings,
                                ArchiveWriter, GroupPositions, read_restore_file, series_files, write_restore_file)
from consumers.audit import verify_archive
from consumers.restore import ArchiveVerificationFailed, restore_platform, translate
from streams import topics
from streams.blobs import LocalBlobStore
from streams.embedded import TansuBroker
from streams.kafka import admin_config, consumer_config, ensure_topics
from streams.ledger import ProcessedLedger
from streams.settings import Settings

REQUESTED, PROGRESS, CHANGELOG = topics.REQUESTED.name, topics.STEP_PROGRESS.name, topics.TRACKER_CHANGELOG.name


def archived(root: Path) -> dict[tuple[str, int], list[dict]]:
    """What the test archive holds: 5 requests on partition 0, 3 progress records on partition 1 and 2 tracker
    state changes (JSON) on partition 2, with the offsets a first broker gave them."""
    writer = ArchiveWriter(ArchiveSettings(root))
    content = {(REQUESTED, 0): 5, (PROGRESS, 1): 3, (CHANGELOG, 2): 2}
    records = {}
    for (topic, partition), count in content.items():
        records[(topic, partition)] = []
        for offset in range(count):
            record = dict(key=f"job-{offset}".encode(), value=b"\x00\x00\x00\x00\x01" + os.urandom(40),
                          timestamp=1_700_000_000_000 + 1000 * offset,
                          headers=[("traceparent", f"00-{offset}".encode()), ("empty", None)])
            writer.append(topic, partition, offset, record["timestamp"], 1, record["key"], record["value"],
                          record["headers"])
            records[(topic, partition)].append(record)
    writer.flush()
    writer.close()
    return records


@pytest.fixture
def fresh_broker(tmp_path):
    broker = TansuBroker(tmp_path / "broker.log")
    settings = Settings(var_dir=tmp_path / "var", kafka_bootstrap=broker.start(), embedded=True)
    ensure_topics(settings)
    yield settings
    broker.stop()


def read_partition(settings, topic: str, partition: int) -> list:
    consumer = Consumer({**consumer_config(settings, "test-reader"), "enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, partition, 0)])
    messages, deadline = [], time.monotonic() + 20
    while time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                break
            raise RuntimeError(msg.error())
        messages.append(msg)
    consumer.close()
    return messages


def group_offsets(settings, group: str) -> dict[str, int]:
    admin = AdminClient(admin_config(settings))
    future = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group]
    return {f"{tp.topic}/{tp.partition}": tp.offset for tp in future.result().topic_partitions if tp.offset >= 0}


def test_every_record_comes_back_in_order_with_the_groups_where_they_were(tmp_path, fresh_broker):
    root = tmp_path / "archive"
    records = archived(root)
    write_restore_file(root, GROUP_OFFSETS_FILE, {"generation": 0, "taken_at_ms": 1_700_000_000_500, "groups": {
        "vidgen.prompt-encoder": {f"{REQUESTED}/0": 3},
        "vidgen.tracker": {f"{PROGRESS}/1": 3, f"{REQUESTED}/0": 9},  # 9: written but never archived → the end
        ARCHIVER_GROUP: {f"{REQUESTED}/0": 1},  # the archiver always continues after what it archived
    }})
    progress = []
    report = restore_platform(fresh_broker, root, progress=progress.append)

    assert (report.records, report.partitions, report.topics, report.generation) == (10, 3, 3, 1)
    for (topic, partition), expected in records.items():
        got = read_partition(fresh_broker, topic, partition)
        assert [m.offset() for m in got] == list(range(len(expected)))
        assert [(m.key(), m.value(), m.timestamp()[1], m.headers()) for m in got] == [
            (r["key"], r["value"], r["timestamp"], r["headers"]) for r in expected]
    assert group_offsets(fresh_broker, "vidgen.prompt-encoder") == {f"{REQUESTED}/0": 3}
    assert group_offsets(fresh_broker, "vidgen.tracker") == {f"{PROGRESS}/1": 3, f"{REQUESTED}/0": 5}
    assert group_offsets(fresh_broker, ARCHIVER_GROUP) == {f"{REQUESTED}/0": 5, f"{PROGRESS}/1": 3,
                                                           f"{CHANGELOG}/2": 2}
    generation = read_restore_file(root, GENERATION_FILE)
    assert generation["generation"] == 1 and generation["horizon_ms"] == 1_700_000_000_500
    assert generation["partitions"][f"{REQUESTED}/0"] == {"start": 0, "end": 5, "epoch": 1}
    assert report.window_ms == [1_700_000_000_500, report.restored_at_ms]
    status = json.loads((fresh_broker.run_dir / "restore.json").read_text())
    assert status["state"] == "done" and status["records"] == 10 and progress[-1]["state"] == "done"

    # The archiver continues in a new epoch whose offsets are the new log's; restored copies are not kept twice.
    writer = ArchiveWriter(ArchiveSettings(root))
    assert not writer.append(REQUESTED, 0, 4, 1, 1, b"job-4", b"copy")  # a restored copy
    assert writer.append(REQUESTED, 0, 5, 1_700_000_009_000, 1, b"job-5", b"new")
    writer.flush()
    writer.close()
    names = [p.name for p in series_files(root / REQUESTED / "0")]
    assert names[-1] == "000001-00000000000000000005.avro"
    result = verify_archive(root)
    assert result.ok, result.problems


def test_a_second_restore_translates_positions_of_the_first(tmp_path, fresh_broker):
    root = tmp_path / "archive"
    archived(root)
    # Generation 1 restored 5 records of requests/0 at offsets 0-4 and archived one more at offset 5 (epoch 1).
    write_restore_file(root, GENERATION_FILE, {"generation": 1, "restored_at_ms": 0, "horizon_ms": None,
                                                "partitions": {f"{REQUESTED}/0": {"start": 0, "end": 5, "epoch": 1}}})
    writer = ArchiveWriter(ArchiveSettings(root))
    assert writer.append(REQUESTED, 0, 5, 1_700_000_009_000, 1, b"job-5", b"new")
    writer.flush()
    writer.close()
    write_restore_file(root, GROUP_OFFSETS_FILE, {"generation": 1, "taken_at_ms": 5, "groups": {
        "vidgen.prompt-encoder": {f"{REQUESTED}/0": 6}}})
    report = restore_platform(fresh_broker, root)
    assert report.generation == 2 and report.records == 11
    assert [m.value() for m in read_partition(fresh_broker, REQUESTED, 0)][-1] == b"new"
    assert group_offsets(fresh_broker, "vidgen.prompt-encoder") == {f"{REQUESTED}/0": 6}
    assert read_restore_file(root, GENERATION_FILE)["partitions"][f"{REQUESTED}/0"]["epoch"] == 2


def test_positions_of_another_generation_are_not_used(tmp_path, fresh_broker):
    root = tmp_path / "archive"
    archived(root)
    write_restore_file(root, GROUP_OFFSETS_FILE, {"generation": 7, "taken_at_ms": 5, "groups": {
        "vidgen.prompt-encoder": {f"{REQUESTED}/0": 3}}})
    report = restore_platform(fresh_broker, root)
    assert report.horizon_ms is None and report.window_ms is None
    assert group_offsets(fresh_broker, "vidgen.prompt-encoder") == {}


def test_a_damaged_archive_is_refused_before_anything_is_restored(tmp_path, fresh_broker):
    root = tmp_path / "archive"
    archived(root)
    newest = series_files(root / REQUESTED / "0")[-1]
    data = bytearray(newest.read_bytes())
    data[-30] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(ArchiveVerificationFailed) as failure:
        restore_platform(fresh_broker, root)
    assert f"vidgen audit verify --archive {root}" in str(failure.value)
    assert f"{REQUESTED}/0" in str(failure.value)
    status = json.loads((fresh_broker.run_dir / "restore.json").read_text())
    assert status["state"] == "failed" and "vidgen audit verify" in status["error"]
    assert read_partition(fresh_broker, REQUESTED, 0) == []
    assert read_restore_file(root, GENERATION_FILE) is None


def test_an_empty_archive_restores_nothing_and_starts_generation_one(tmp_path, fresh_broker):
    report = restore_platform(fresh_broker, tmp_path / "archive")
    assert (report.records, report.groups, report.generation) == (0, 0, 1)


def test_translation_keeps_positions_across_retention():
    assert translate(3, old_start=0, new_start=0, new_end=5) == 3
    assert translate(3, old_start=10, new_start=12, new_end=20) == 1  # two more records went to retention
    assert translate(1, old_start=10, new_start=12, new_end=20) == 0  # its next record was removed: the first kept
    assert translate(30, old_start=0, new_start=0, new_end=20) == 20  # never archived: the end


class FakeAdmin:
    def __init__(self, groups):
        self.groups = groups


class FakeConsumer:
    def __init__(self, watermarks):
        self.watermarks = watermarks

    def assignment(self):
        return [TopicPartition(t.name, p) for t in topics.ARCHIVED for p in range(t.partitions)]

    def get_watermark_offsets(self, tp, cached=True):
        return 0, self.watermarks.get((tp.topic, tp.partition), 0)


def test_positions_are_written_only_once_the_archive_holds_what_they_rest_on(tmp_path, monkeypatch):
    positions = GroupPositions(tmp_path, FakeAdmin(None), generation=3, every_s=1.0, margin_s=0.3)
    monkeypatch.setattr(positions, "read_groups", lambda: {"g": {f"{REQUESTED}/0": 4}})
    consumer = FakeConsumer({(REQUESTED, 0): 7})
    assert not positions.step(consumer, {}, True, now=100.0)  # 1. offsets read at T0 = 100
    assert not positions.step(consumer, {}, True, now=100.1)  # the margin has not passed: no targets yet
    consumer.watermarks[(REQUESTED, 0)] = 9  # written before T0, seen by a fetch after it
    assert not positions.step(consumer, {(REQUESTED, 0): 7}, True, now=100.5)  # 2. targets: 9; archived only 7
    assert not positions.step(consumer, {(REQUESTED, 0): 9}, False, now=100.6)  # read, not yet durable
    assert read_restore_file(tmp_path, GROUP_OFFSETS_FILE) is None
    assert positions.step(consumer, {(REQUESTED, 0): 9}, True, now=100.7)  # 3. durable: written with T0
    assert read_restore_file(tmp_path, GROUP_OFFSETS_FILE) == {
        "generation": 3, "taken_at_ms": 100_000, "groups": {"g": {f"{REQUESTED}/0": 4}}}
    assert not positions.step(consumer, {}, True, now=100.8)  # the next round waits for its time


def test_marks_made_in_the_restore_window_are_not_trusted(tmp_path):
    blobs = LocalBlobStore(tmp_path)
    trusting = ProcessedLedger(blobs, "compliance")
    trusting.mark("before")
    trusting.mark("inside")
    now = time.time()
    for key, age_s in (("before", 100), ("inside", 10)):
        os.utime(blobs.local_file(blobs.key(*trusting._segments(key))), (now - age_s, now - age_s))
    window = (round((now - 50) * 1000), round((now - 5) * 1000))
    ledger = ProcessedLedger(blobs, "compliance", window)
    assert ledger.seen("before") and not ledger.seen("inside") and not ledger.seen("never")
    assert trusting.seen("inside")
    ledger.mark("inside")  # handled again after the restore: a fresh mark counts
    assert ledger.seen("inside")


def test_records_removed_by_retention_shift_the_log_and_the_groups_with_it(tmp_path, fresh_broker):
    from consumers.archive_retention import apply_retention, read_retention_anchor, retention_policy

    root = tmp_path / "archive"
    writer = ArchiveWriter(ArchiveSettings(root, rotate_bytes=1))  # a file per flush
    for offset in range(6):
        writer.append(PROGRESS, 0, offset, 1_700_000_000_000 + offset, 1, b"job", f"step {offset}".encode())
        writer.flush()
    writer.close()
    removed = apply_retention(root, retention_policy({}), now_ms=1_800_000_000_000)  # years later
    kept_from = read_retention_anchor(root / PROGRESS / "0")["removed_records"]
    assert removed and 0 < kept_from < 6
    write_restore_file(root, GROUP_OFFSETS_FILE, {"generation": 0, "taken_at_ms": 1, "groups": {
        "vidgen.progress-reader": {f"{PROGRESS}/0": 5}}})
    report = restore_platform(fresh_broker, root)
    assert [m.value() for m in read_partition(fresh_broker, PROGRESS, 0)] == [
        f"step {offset}".encode() for offset in range(kept_from, 6)]
    assert report.records == 6 - kept_from
    assert group_offsets(fresh_broker, "vidgen.progress-reader") == {f"{PROGRESS}/0": 5 - kept_from}
    assert read_restore_file(root, GENERATION_FILE)["partitions"][f"{PROGRESS}/0"]["start"] == kept_from


def test_the_platform_does_not_start_on_a_damaged_archive_and_says_how_to_look(tmp_path):
    from streams.supervisor import PlatformNotStarted, PlatformProcesses

    var = tmp_path / "var"
    archived(var / "archive")
    first = series_files(var / "archive" / PROGRESS / "1")[0]
    first.write_bytes(first.read_bytes().replace(b"job-1", b"job-X"))
    platform = PlatformProcesses(var, stages=("prompt-encoder",))
    seen = []
    with pytest.raises(PlatformNotStarted) as failure:
        platform.start(on_restore=seen.append)
    assert "failed verification" in str(failure.value) and "vidgen audit verify --archive" in str(failure.value)
    assert f"{PROGRESS}/1" in str(failure.value)
    assert platform.stages == {}  # no stage was started
    assert platform.broker.returncode == 3


def test_a_group_missing_from_a_later_reading_keeps_its_positions(tmp_path, monkeypatch):
    positions = GroupPositions(tmp_path, FakeAdmin(None), generation=1, every_s=1.0, margin_s=0.0)
    consumer = FakeConsumer({})
    readings = iter([{"a": {"t/0": 4}, "b": {"t/0": 2, "t/1": 1}}, {"b": {"t/0": 3}}])
    monkeypatch.setattr(positions, "read_groups", lambda: next(readings))
    for now, consumed in ((10.0, {}), (10.0, {}), (12.0, {("t", 0): 5}), (12.0, {("t", 0): 5})):
        positions.step(consumer, consumed, True, now=now)
    assert read_restore_file(tmp_path, GROUP_OFFSETS_FILE)["groups"] == {"a": {"t/0": 4}, "b": {"t/0": 3, "t/1": 1}}


def test_while_no_record_arrives_the_groups_are_read_only_every_idle_interval(tmp_path, monkeypatch):
    """An idle broker is not asked for every group's offsets every second (issue 23: that was a fifth of its CPU)."""
    positions = GroupPositions(tmp_path, FakeAdmin(None), generation=1, every_s=1.0, margin_s=0.0, idle_every_s=30.0)
    consumer, readings = FakeConsumer({}), []
    monkeypatch.setattr(positions, "read_groups", lambda: readings.append(1) or {"a": {"t/0": len(readings)}})

    def rounds(now: float, consumed: dict) -> int:
        positions.step(consumer, consumed, True, now=now)  # takes T0
        positions.step(consumer, consumed, True, now=now)  # records
        return len(readings)

    assert rounds(10.0, {("t", 0): 1}) == 1
    assert rounds(12.0, {("t", 0): 1}) == 1  # nothing arrived: no round
    assert rounds(39.0, {("t", 0): 1}) == 1
    assert rounds(40.5, {("t", 0): 1}) == 2  # the idle interval is over
    assert rounds(42.0, {("t", 0): 2}) == 3  # a record arrived: every second again
    assert rounds(43.5, {("t", 0): 2, ("vidgen.agents", 0): 9, ("vidgen.stats", 1): 4}) == 3  # no group reads those
    assert read_restore_file(tmp_path, GROUP_OFFSETS_FILE)["groups"] == {"a": {"t/0": 3}}


def test_what_a_crash_left_unfinished_is_cut_not_refused(tmp_path, fresh_broker):
    root = tmp_path / "archive"
    archived(root)
    (root / REQUESTED / "0" / "000000-00000000000000000005.avro").write_bytes(b"")  # opened, then SIGKILL
    newest = series_files(root / PROGRESS / "1")[-1]
    newest.write_bytes(newest.read_bytes() + b"\x08half a block")  # a block torn by the crash
    report = restore_platform(fresh_broker, root)
    assert report.records == 10
    assert [m.offset() for m in read_partition(fresh_broker, PROGRESS, 1)] == [0, 1, 2]


def test_no_consumer_group_reads_the_ungrouped_topics():
    """The archiver skips position rounds while only UNGROUPED topics get records: no stage's group and not the
    tracker may read them, or that group's recorded positions would lag by up to the idle interval."""
    import importlib

    from consumers.job_state import FOLDED_TOPICS
    from vidgen.cli import STAGES

    for name, module in STAGES.items():
        stage = getattr(importlib.import_module(module), "STAGE", None)
        if stage is not None:  # the tracker is a faust app: FOLDED_TOPICS below
            assert not set(stage.consumes) & set(topics.UNGROUPED), name
    assert not set(FOLDED_TOPICS) & set(topics.UNGROUPED)


def test_an_archive_from_a_catalogue_with_more_partitions_restores_every_partition(tmp_path):
    """vidgen.encoded.* had 12 partitions before issue 23 (3 now): an archive made then holds jobs on partition 7,
    and a restart must not forget them — the new broker gets the partitions the archive holds."""
    from consumers.archiver import archive_settings
    from consumers.restore import archived_partitions

    settings = Settings(var_dir=tmp_path / "var", embedded=True)
    encoded = topics.ENCODED["free"].name
    writer = ArchiveWriter(archive_settings(settings))
    for offset in range(2):
        writer.append(encoded, 7, offset, 1_700_000_000_000 + offset, 1, b"job-%d" % offset,
                      b"\x00\x00\x00\x00\x01" + os.urandom(20), [])
    writer.flush()
    writer.close()
    assert topics.ENCODED["free"].partitions <= 7 and archived_partitions(settings) == {encoded: 8}

    broker = TansuBroker(tmp_path / "broker.log")
    try:
        settings.kafka_bootstrap = broker.start()
        ensure_topics(settings, at_least=archived_partitions(settings))
        report = restore_platform(settings)
        assert report.records == 2 and not report.skipped_topics
        assert [m.key() for m in read_partition(settings, encoded, 7)] == [b"job-0", b"job-1"]
    finally:
        broker.stop()
