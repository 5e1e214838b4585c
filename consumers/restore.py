"""restore: the embedded broker comes back from the archive, with every consumer group where it was.

The embedded Tansu broker keeps its logs in memory; the archive (consumers/archiver.py) keeps every record of every
archived topic (``streams.topics.ARCHIVED``: the catalogue and the tracker's state topics) with its key, value,
headers and timestamp, hash-chained. ``vidgen broker`` calls ``restore_platform`` on the fresh broker before it
announces the platform (``<var>/run/platform.json``), so no stage starts before the restore has finished:

1. cut what a crash left after each partition's last fsync (as the archiver does on start), then verify the archive
   (``vidgen audit verify``'s checks): a failure stops here, with the problems and the command
   that shows them; nothing is produced and no stage starts;
2. re-produce every archived record of each partition, in order, into the same partition of the fresh broker
   (idempotent producer; key, value, headers and timestamp as archived). Each partition's last record goes alone
   in its batch: the embedded broker answers "latest offset" look-ups with the base offset of the last batch + 1,
   and faust's table recovery relies on that look-up;
3. put the consumer groups back: the archiver records their committed offsets whenever the archive holds what
   they rest on (``GroupPositions``); each is translated into the new log (below), the archiver's own group
   starts after the restored records;
4. write the new broker generation to ``<archive>/_restore/generation.json``: per partition where the archive's
   records now start and end in the broker's log, and the epoch the archiver continues in (one epoch per broker
   lifetime, so an archived offset is always an offset of one log).

Offsets. A partition's records form one sequence across epochs; a record's *position* is its index in it, counting
records retention removed (``RETENTION.json``'s ``removed_records``). Generation g's log holds the positions from
``start_g`` on at offsets 0, 1, …, so an offset c recorded in generation g is position ``start_g + c``, and offset
``position − start_{g+1}`` of the new log (clamped to it). Positions the archive never received (written in the
last moments before a crash) map to the end.

The horizon. Recorded positions are up to a second or two old, so a group re-reads what it handled in that time;
the stages' dedupe ledgers skip such inputs, but a mark made after the positions were taken may name an input whose
outputs died with the broker. The restore therefore hands the platform a window (horizon, restored at) in which
marks are not trusted (``restore_window_ms`` in platform.json, read by streams/ledger.py): those inputs run again,
with the same event ids.

Progress and the outcome go to ``<var>/run/restore.json`` (read by `vidgen up`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from streams import topics
from streams.settings import Settings
from streams.supervisor import RESTORE_STATUS_FILE  # where `vidgen up` reads the progress

from .archive_retention import live_files, read_retention_anchor
from .archiver import (GENERATION_FILE, GROUP_ID as ARCHIVER_GROUP, GROUP_OFFSETS_FILE, archive_settings,
                       parse_file_name, read_file, read_restore_file, recover_series, series_dirs, series_files,
                       write_restore_file)

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5


class ArchiveVerificationFailed(RuntimeError):
    def __init__(self, archive: Path, problems: list[str]):
        self.archive, self.problems = archive, problems
        shown = "\n  ".join(problems[:10]) + (f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else "")
        super().__init__(f"the archive at {archive} failed verification, so the platform was not started:\n  {shown}"
                         f"\ninspect it with: vidgen audit verify --archive {archive}")


class RestoreFailed(RuntimeError):
    """The broker did not take the records back as archived (it was not empty, or a produce failed)."""


@dataclass
class RestoreReport:
    generation: int = 0
    records: int = 0
    topics: int = 0
    partitions: int = 0
    groups: int = 0
    bytes: int = 0
    verify_s: float = 0.0
    produce_s: float = 0.0
    seconds: float = 0.0
    horizon_ms: int | None = None
    restored_at_ms: int = 0
    skipped_topics: list[str] = field(default_factory=list)
    state: str = "done"

    @property
    def window_ms(self) -> list[int] | None:
        """Dedupe marks made in [horizon, restored at) are not trusted (see the module docstring)."""
        return None if self.horizon_ms is None else [self.horizon_ms, self.restored_at_ms]

    def summary(self) -> str:
        rate = f", {self.records / self.produce_s:,.0f} records/s" if self.produce_s > 0 else ""
        return (f"restored {self.records:,} records of {self.topics} topics ({self.partitions} partitions) and "
                f"{self.groups} consumer groups in {self.seconds:.2f} s (verify {self.verify_s:.2f} s{rate})")


def _status(settings: Settings, content: dict) -> None:
    path = settings.run_dir / RESTORE_STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, sort_keys=True))
    os.replace(tmp, path)


def translate(offset: int, old_start: int, new_start: int, new_end: int) -> int:
    """An offset of the previous broker generation in the new log: positions are kept, retention shifts them."""
    return min(max(old_start + offset - new_start, 0), new_end)


def restore_platform(settings: Settings, archive_dir: Path | None = None,
                     progress: Callable[[dict], None] | None = None) -> RestoreReport:
    """Restore the archive into the (empty) broker of ``settings``; see the module docstring for the steps."""
    began = time.perf_counter()
    root = Path(archive_dir) if archive_dir else archive_settings(settings).dir
    report = RestoreReport(restored_at_ms=round(time.time() * 1000))
    previous = read_restore_file(root, GENERATION_FILE) or {"generation": 0, "partitions": {}}
    report.generation = previous["generation"] + 1

    def tell(state: str, **extra) -> None:
        status = {"archive": str(root), "records": report.records, "partitions": report.partitions, **extra,
                  "state": state, "elapsed_s": round(time.perf_counter() - began, 3)}
        _status(settings, status)
        if progress:
            progress(status)

    try:
        # 1. verify (after cutting what a crash left unfinished: it was never durable)
        recover_series(root, archive_settings(settings))
        series = [(t, p, d) for t, p, d in series_dirs(root) if series_files(d)]
        if series:
            tell("verifying", series=len(series))
            verify(root)
            report.verify_s = time.perf_counter() - began
        # 2. re-produce
        produce_began = time.perf_counter()
        partitions = reproduce(settings, root, series, report, lambda topic: tell("restoring", topic=topic))
        report.produce_s = time.perf_counter() - produce_began
        # 3. consumer groups
        groups, report.horizon_ms = group_positions(read_restore_file(root, GROUP_OFFSETS_FILE), previous,
                                                    partitions)
        if series and report.horizon_ms is None:
            log.warning("restore: no recorded consumer-group positions for broker generation %s; the groups start "
                        "from the beginning (their dedupe ledgers skip what they handled)", previous["generation"])
        commit_positions(settings, groups)
        report.groups = len(groups)
    except (ArchiveVerificationFailed, RestoreFailed) as exc:
        tell("failed", error=str(exc), problems=getattr(exc, "problems", [])[:50])
        raise
    # 4. the new generation
    write_restore_file(root, GENERATION_FILE, {
        "generation": report.generation, "restored_at_ms": report.restored_at_ms, "horizon_ms": report.horizon_ms,
        "partitions": partitions,
    })
    report.seconds = time.perf_counter() - began
    tell("done", **{k: v for k, v in asdict(report).items() if k != "state"})
    log.info("restore: %s", report.summary())
    return report


def verify(root: Path) -> None:
    from .audit import verify_archive

    result = verify_archive(root)
    if not result.ok:
        raise ArchiveVerificationFailed(root, result.problems)


def reproduce(settings: Settings, root: Path, series: list[tuple[str, int, Path]], report: RestoreReport,
              on_progress: Callable[[str], None]) -> dict[str, dict]:
    """Every archived record back into its partition, in order. Returns, per partition restored ("topic/p"), where
    its records start in the partition's sequence (records retention removed come first), how many there are (the
    new log's end) and the epoch the archiver continues in."""
    from confluent_kafka import Producer

    from streams.kafka import producer_config

    producer = Producer({**producer_config(settings, "vidgen.restore"), "linger.ms": 20, "batch.size": 1 << 20,
                         "queue.buffering.max.messages": 1_000_000, "queue.buffering.max.kbytes": 1 << 20})
    failures: list[str] = []
    ends: dict[str, int] = {}  # "topic/partition" → offset of the last record delivered + 1
    # The broker's partitions, not the catalogue's: the platform creates what the archive holds (archived_partitions)
    on_broker = {name: len(meta.partitions) for name, meta in producer.list_topics(timeout=10).topics.items()}

    def delivered(err, msg) -> None:
        where = f"{msg.topic()}/{msg.partition()}"
        if err is not None:
            failures.append(f"{where}: {err}")
        else:
            ends[where] = max(ends.get(where, 0), msg.offset() + 1)

    def produce(record: dict) -> None:
        while True:
            try:
                producer.produce(record["topic"], value=record["value"], key=record["key"],
                                 partition=record["partition"], timestamp=record["timestamp"],
                                 headers=[(h["key"], h["value"]) for h in record["headers"]], on_delivery=delivered)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.05)

    partitions: dict[str, dict] = {}
    last_records: list[dict] = []
    next_progress = 0.0
    known_topics: set[str] = set()
    for topic_name, partition, part_dir in series:
        topic = topics.BY_NAME.get(topic_name)
        if topic is None or partition >= on_broker.get(topic_name, topic.partitions):
            log.warning("restore: %s/%s is not in the catalogue or on the broker; its archived records stay in the "
                        "archive only", topic_name, partition)
            if topic_name not in report.skipped_topics:
                report.skipped_topics.append(topic_name)
            continue
        files, anchor = live_files(part_dir), read_retention_anchor(part_dir)
        held: dict | None = None  # a partition's last record waits for the second pass
        count = 0
        for path in files:
            _meta, records, _end, error = read_file(path)
            if error is not None:  # verified a moment ago: only a file changed since then gets here
                raise ArchiveVerificationFailed(root, [f"{topic_name}/{partition}: {path.name}: {error}"])
            report.bytes += path.stat().st_size
            for record in records:
                if held is not None:
                    produce(held)
                held = record
                count += 1
            report.records += len(records)
            producer.poll(0)
            if time.perf_counter() >= next_progress:
                next_progress = time.perf_counter() + PROGRESS_EVERY_S
                on_progress(topic_name)
        if held is None:
            continue
        last_records.append(held)
        known_topics.add(topic_name)
        report.partitions += 1
        partitions[f"{topic_name}/{partition}"] = {
            "start": anchor["removed_records"] if anchor else 0, "end": count,
            "epoch": parse_file_name(files[-1].name)[0] + 1,
        }
    producer.flush()
    for record in last_records:  # each alone in its partition's batch (see the module docstring)
        produce(record)
    producer.flush()
    report.topics = len(known_topics)
    wrong = [f"{where}: {ends.get(where, 0)} records in the broker's log, {p['end']} restored"
             for where, p in partitions.items() if ends.get(where, 0) != p["end"]]
    if failures or wrong:
        raise RestoreFailed("restoring into the broker failed (was it empty?): " + "; ".join((failures + wrong)[:10]))
    return partitions


def group_positions(recorded: dict | None, previous: dict, partitions: dict[str, dict]
                    ) -> tuple[dict[str, dict[str, int]], int | None]:
    """Where each consumer group goes in the new log ({group: {"topic/p": offset}}), and the horizon (None: no
    positions recorded for the previous generation, so only the archiver's own group is placed)."""
    groups: dict[str, dict[str, int]] = {}
    horizon = None
    if recorded and recorded.get("generation") == previous["generation"]:
        horizon = int(recorded["taken_at_ms"])
        for group, offsets in recorded["groups"].items():
            moved = {where: translate(offset, previous["partitions"].get(where, {}).get("start", 0),
                                      partitions[where]["start"], partitions[where]["end"])
                     for where, offset in offsets.items()
                     if where in partitions}  # a partition with nothing restored: its log starts empty
            if moved:
                groups[group] = moved
    if partitions:  # the archiver continues right after what it archived, whatever it had recorded
        groups[ARCHIVER_GROUP] = {where: p["end"] for where, p in partitions.items()}
    else:
        groups.pop(ARCHIVER_GROUP, None)
    return groups, horizon


def commit_positions(settings: Settings, groups: dict[str, dict[str, int]]) -> None:
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    from streams.kafka import admin_config

    if not groups:
        return
    admin = AdminClient(admin_config(settings))
    futures = {}
    for group, offsets in groups.items():
        partitions = [TopicPartition(w.rpartition("/")[0], int(w.rpartition("/")[2]), o) for w, o in offsets.items()]
        futures.update(admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, partitions)]))
    for group, future in futures.items():
        for tp in future.result(timeout=30).topic_partitions:
            if tp.error is not None:
                raise RestoreFailed(f"putting consumer group {group} back at {tp.topic}/{tp.partition}@{tp.offset} "
                                    f"failed: {tp.error}")


def archived_partitions(settings: Settings) -> dict[str, int]:
    """Partitions per catalogue topic that the archive holds records of: a broker restored from it needs at least
    these (the catalogue asked more partitions of some topics in earlier versions)."""
    counts: dict[str, int] = {}
    for topic_name, partition, part_dir in series_dirs(archive_settings(settings).dir):
        if topic_name in topics.BY_NAME and series_files(part_dir):
            counts[topic_name] = max(counts.get(topic_name, 0), partition + 1)
    return counts


def restore_before_start(settings: Settings) -> dict:
    """``vidgen broker``'s prepare step on the embedded broker: restore, and tell the stages the distrusted window."""
    report = restore_platform(settings)
    return {"restore_window_ms": report.window_ms, "generation": report.generation}
