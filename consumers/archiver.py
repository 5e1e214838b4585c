"""archiver: every catalogue topic into durable, hash-chained Avro object container files (fastavro).

Consumer group ``vidgen.archiver`` reads every topic of ``streams.topics.ARCHIVED`` (the catalogue and the tracker's
state topics) as raw bytes (nothing is
decoded: a value is kept exactly as it was on the broker, with its key, headers, timestamp and position).

Layout (one file series per topic-partition, so a partition's order is the files' order)::

    <archive>/<topic>/<partition>/<epoch:06d>-<first offset:020d>.avro   container files, oldest first by name
    <archive>/<topic>/<partition>/HEAD.json                               newest durable record: offset and chain
    <archive>/_schemas/<schema id>.json                                   writer schemas named by archived values

Each file holds ``ArchivedRecord`` records (schema ``RECORD_SCHEMA``): topic, partition, offset, timestamp (ms),
timestamp_type, key, value, headers, plus the chain fields ``prev_offset``, ``digest`` and ``chain``:

* ``digest = sha256(canonical bytes of the record's content, prev_offset included)`` (``record_digest``);
* ``chain = sha256(previous record's chain || digest)``; the first record of a partition chains from
  ``genesis(topic, partition)``. Every block fastavro writes therefore ends with a hash chained to the previous one,
  and every record can be checked on its own.
* Each file's header metadata links it to its predecessor: the previous file's name, its last offset, its record
  count and its final chain hash (``vidgen.archive.prev_*``). A removed, truncated or reordered file breaks that link.
* ``HEAD.json`` holds the newest durable record (epoch, file, offset, chain), so a truncated newest file is seen too.
  It is a local anchor only: an attacker who rewrites a whole suffix of a chain *and* HEAD is detected only against
  a copy of the heads kept elsewhere (``vidgen audit verify`` prints them).

``vidgen audit verify`` (consumers/audit.py) recomputes all of it and names the topic/partition@offset of an
altered, removed or reordered record and of a broken link between files.

Delivery. Records are buffered and written as one Avro block per partition at each flush (every ``flush_s``
seconds or ``flush_records`` records); a flush fsyncs the file (and its directory when the file is new), then
rewrites HEAD.json, and only then are the Kafka offsets committed. A crash therefore loses nothing: what was not
committed is redelivered, and a redelivered record whose offset is at or below the newest archived offset of its
partition is skipped — after checking, once per run of redeliveries, that the archived record at that offset is
the same record. When it is not (a memory-only broker restarted and its offsets began again at 0), the partition
starts a new *epoch*: a new file series whose offsets may restart, chained to the previous epoch.

On start (and whenever a partition is assigned) the newest file of a partition is read to recover the chain; a
torn last block left by a crash (never committed) is cut off. Every process start opens new files (never appends).
Files rotate by size (``VIDGEN_ARCHIVE_ROTATE_BYTES``) or age (``VIDGEN_ARCHIVE_ROTATE_S``). SIGTERM flushes,
fsyncs, commits and leaves the group. Several archiver processes may share the group if they share the directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import fastavro
from fastavro.write import Writer

from streams import topics
from streams.settings import Settings

log = logging.getLogger(__name__)

GROUP_ID = "vidgen.archiver"
FORMAT_VERSION = "1"
SCHEMAS_DIR = "_schemas"
HEAD_FILE = "HEAD.json"
#: What ties the archive to the embedded broker's logs (consumers/restore.py): the broker generation the archive was
#: last restored into, and the consumer groups' positions the archiver last saw safely archived.
RESTORE_DIR = "_restore"
GENERATION_FILE = "generation.json"
GROUP_OFFSETS_FILE = "group-offsets.json"
_FILE_NAME = re.compile(r"^(\d{6})-(\d{20})\.avro$")
_META = "vidgen.archive."

RECORD_SCHEMA = {
    "type": "record",
    "name": "ArchivedRecord",
    "namespace": "io.vidgen.archive",
    "doc": "One Kafka record as the broker held it, with its place in the partition's hash chain.",
    "fields": [
        {"name": "topic", "type": "string"},
        {"name": "partition", "type": "int"},
        {"name": "offset", "type": "long"},
        {"name": "timestamp", "type": "long", "doc": "Record timestamp, epoch milliseconds."},
        {"name": "timestamp_type", "type": "int", "doc": "0 none, 1 create time, 2 log-append time (librdkafka)."},
        {"name": "key", "type": ["null", "bytes"], "default": None},
        {"name": "value", "type": ["null", "bytes"], "default": None},
        {"name": "headers", "type": {"type": "array", "items": {
            "type": "record", "name": "ArchivedHeader",
            "fields": [{"name": "key", "type": "string"},
                       {"name": "value", "type": ["null", "bytes"], "default": None}],
        }}, "default": []},
        {"name": "prev_offset", "type": "long", "doc": "Offset of the previous archived record of the partition; -1."},
        {"name": "digest", "type": "bytes", "doc": "sha256 of the record's canonical bytes (record_digest)."},
        {"name": "chain", "type": "bytes", "doc": "sha256(previous chain || digest)."},
    ],
}
PARSED_SCHEMA = fastavro.parse_schema(RECORD_SCHEMA)


# -- settings -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchiveSettings:
    dir: Path
    rotate_bytes: int = 64 * 1024 * 1024
    rotate_s: float = 3600.0
    flush_s: float = 1.0  # a record is durable (and its offset committed) at most this long after it is read
    flush_records: int = 5000
    codec: str = "null"  # or "deflate"
    retention_check_s: float = 3600.0  # how often the retention policy (consumers/archive_retention.py) is applied
    positions_every_s: float = 1.0  # how often the consumer groups' positions are recorded (GroupPositions)


def archive_settings(settings: Settings | None = None, environ: dict[str, str] | None = None) -> ArchiveSettings:
    """From VIDGEN_ARCHIVE_DIR (default <var>/archive), VIDGEN_ARCHIVE_ROTATE_BYTES, VIDGEN_ARCHIVE_ROTATE_S,
    VIDGEN_ARCHIVE_FLUSH_S, VIDGEN_ARCHIVE_CODEC (null or deflate) and VIDGEN_ARCHIVE_RETENTION_CHECK_S."""
    env = dict(os.environ if environ is None else environ)
    var_dir = settings.var_dir if settings is not None else Path(env.get("VIDGEN_VAR_DIR") or "var").resolve()
    directory = Path(env["VIDGEN_ARCHIVE_DIR"]).resolve() if env.get("VIDGEN_ARCHIVE_DIR") else var_dir / "archive"
    defaults = ArchiveSettings(directory)
    result = ArchiveSettings(
        dir=directory,
        rotate_bytes=int(env.get("VIDGEN_ARCHIVE_ROTATE_BYTES") or defaults.rotate_bytes),
        rotate_s=float(env.get("VIDGEN_ARCHIVE_ROTATE_S") or defaults.rotate_s),
        flush_s=float(env.get("VIDGEN_ARCHIVE_FLUSH_S") or defaults.flush_s),
        codec=env.get("VIDGEN_ARCHIVE_CODEC") or defaults.codec,
        retention_check_s=float(env.get("VIDGEN_ARCHIVE_RETENTION_CHECK_S") or defaults.retention_check_s),
    )
    if result.rotate_bytes < 1 or result.rotate_s <= 0 or result.flush_s <= 0:
        raise ValueError("archive rotation size, rotation age and flush interval must be positive")
    if result.codec not in ("null", "deflate"):
        raise ValueError(f"VIDGEN_ARCHIVE_CODEC must be null or deflate, not {result.codec!r}")
    return result


# -- the chain -------------------------------------------------------------------------------------------------------
def _lp(data: bytes | None) -> bytes:
    return struct.pack(">q", -1) if data is None else struct.pack(">q", len(data)) + bytes(data)


def record_digest(record: dict) -> bytes:
    """sha256 of a record's canonical bytes: every field but digest and chain, length-prefixed, in schema order."""
    parts = [b"vidgen-archive-1\0", _lp(record["topic"].encode()),
             struct.pack(">qqqqq", record["partition"], record["offset"], record["timestamp"],
                         record["timestamp_type"], record["prev_offset"]),
             _lp(record["key"]), _lp(record["value"]), struct.pack(">q", len(record["headers"]))]
    for header in record["headers"]:
        parts += [_lp(header["key"].encode()), _lp(header["value"])]
    return hashlib.sha256(b"".join(parts)).digest()


def chain_next(previous: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(previous + digest).digest()


def genesis(topic: str, partition: int) -> bytes:
    """Where a partition's chain starts."""
    return hashlib.sha256(f"vidgen-archive-genesis/{topic}/{partition}".encode()).digest()


# -- files ----------------------------------------------------------------------------------------------------------
def file_name(epoch: int, first_offset: int) -> str:
    return f"{epoch:06d}-{first_offset:020d}.avro"


def parse_file_name(name: str) -> tuple[int, int] | None:
    match = _FILE_NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def series_dirs(root: Path) -> Iterator[tuple[str, int, Path]]:
    """(topic, partition, directory) of every file series under an archive, sorted."""
    root = Path(root)
    if not root.is_dir():
        return
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in (SCHEMAS_DIR, RESTORE_DIR)):
        for part_dir in sorted((p for p in topic_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                               key=lambda p: int(p.name)):
            yield topic_dir.name, int(part_dir.name), part_dir


def series_files(directory: Path) -> list[Path]:
    """A series' container files in chain order (epoch, first offset)."""
    named = [(parse_file_name(p.name), p) for p in Path(directory).glob("*.avro")]
    return [p for key, p in sorted((k, p) for k, p in named if k is not None)]


def file_meta(metadata: dict) -> dict:
    """The vidgen.archive.* header fields of a container file, typed."""
    def get(name, default=None):
        return metadata.get(_META + name, default)

    return {
        "version": get("version"), "topic": get("topic"), "partition": int(get("partition", -1)),
        "epoch": int(get("epoch", 0)), "first_offset": int(get("first_offset", -1)),
        "prev_file": get("prev_file", ""), "prev_chain": get("prev_chain", ""),
        "prev_last_offset": int(get("prev_last_offset", -1)), "prev_records": int(get("prev_records", 0)),
        "epoch_reason": get("epoch_reason", ""),
    }


def read_head(directory: Path) -> dict | None:
    try:
        return json.loads((Path(directory) / HEAD_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("archive: unreadable %s: %s", Path(directory) / HEAD_FILE, exc)
        return None


def read_restore_file(root: Path, name: str) -> dict | None:
    """A file of ``<archive>/_restore`` (GENERATION_FILE, GROUP_OFFSETS_FILE), or None when there is none."""
    try:
        return json.loads((Path(root) / RESTORE_DIR / name).read_text())
    except FileNotFoundError:
        return None


def write_restore_file(root: Path, name: str, content: dict) -> None:
    directory = Path(root) / RESTORE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / name, json.dumps(content, sort_keys=True).encode())


def read_file(path: Path) -> tuple[dict, list[dict], int, Exception | None]:
    """(file meta, readable records, end of the last good block, error after them or None)."""
    records: list[dict] = []
    end = 0
    metadata: dict = {}
    try:
        with open(path, "rb") as fo:
            reader = fastavro.block_reader(fo)
            metadata = dict(reader.metadata)
            end = fo.tell()
            for block in reader:
                records.extend(block)
                end = block.offset + block.size
    except Exception as exc:  # noqa: BLE001 - a torn or altered file: the caller reports or repairs it
        return file_meta(metadata), records, end, exc
    return file_meta(metadata), records, end, None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# -- one partition's series -------------------------------------------------------------------------------------------
class PartitionSeries:
    """The file series of one topic-partition: recovers its chain from disk, appends, flushes, rotates."""

    def __init__(self, root: Path, topic: str, partition: int, config: ArchiveSettings,
                 restored: dict | None = None):
        self.topic, self.partition, self.config = topic, partition, config
        self.dir = Path(root) / topic / str(partition)
        self.epoch = 0
        self.last_offset: int | None = None  # newest record appended (durable or not)
        self.chain = genesis(topic, partition)
        self.last_file = ""  # name of the newest file with records
        self.last_file_records = 0
        self.durable: tuple[int, int, str, bytes] | None = None  # (epoch, offset, file, chain) fsynced
        #: A record of this partition arrived since the last commit (archived or skipped as a copy). Only then is
        #: an offset committed: a partition that sent nothing keeps its committed offset (its log may be new).
        self.commit_due = False
        self._fo = None
        self._writer: Writer | None = None
        self._opened_at = 0.0
        self._pending = 0
        self._new_file = False
        self._epoch_reason = ""
        self._verified_run = False  # redeliveries since the last check are known copies
        self._prev_seen: int | None = None
        self._recover()
        # After a restore (consumers/restore.py) the broker's log of this partition begins with the archived records
        # re-produced at offsets 0..end-1, and what is new continues from ``end``: a new epoch, whose offsets are the
        # new log's. Offsets below ``end`` in that epoch are the restored copies, never archived twice.
        self.restored_epoch = self.restored_end = None
        if restored is not None:
            self.restored_epoch, self.restored_end = int(restored["epoch"]), int(restored["end"])
            if self.epoch < self.restored_epoch:
                self.epoch = self.restored_epoch
                self._epoch_reason = (f"restored into broker generation {restored.get('generation')}: offsets "
                                      f"below {self.restored_end} are the archive's records re-produced")

    # recovery
    def _recover(self) -> None:
        head = read_head(self.dir)
        files = series_files(self.dir)
        while files:
            path = files[-1]
            meta, records, end, error = read_file(path)
            in_head = head is not None and head.get("file") == path.name
            if error is not None and not records and not in_head and end == 0:
                log.warning("archive: removing %s, unreadable and never committed (%s)", path, error)
                path.unlink()
                files.pop()
                continue
            if error is not None:
                committed = head.get("last_offset", -1) if in_head else -1
                if records and records[-1]["offset"] >= committed or not in_head:
                    log.warning("archive: cutting the torn end of %s after offset %s (%s)", path,
                                records[-1]["offset"] if records else None, error)
                    os.truncate(path, end)
                    with open(path, "rb+") as f:
                        os.fsync(f.fileno())
                else:
                    log.error("archive: %s is damaged below its committed head (%s); left for `vidgen audit "
                              "verify` to report", path, error)
            if not records:
                if in_head:
                    log.error("archive: %s has no records although HEAD names it", path)
                else:
                    path.unlink()  # a header without records: created just before a crash
                    files.pop()
                    continue
                self.epoch = meta["epoch"]
                self.last_offset = meta["prev_last_offset"] if meta["prev_last_offset"] >= 0 else None
                self.chain = bytes.fromhex(meta["prev_chain"]) if meta["prev_chain"] else self.chain
                self.last_file, self.last_file_records = path.name, 0
                break
            last = records[-1]
            self.epoch = meta["epoch"]
            self.last_offset, self.chain = last["offset"], bytes(last["chain"])
            self.last_file, self.last_file_records = path.name, len(records)
            break
        if self.last_offset is not None:
            self.durable = (self.epoch, self.last_offset, self.last_file, self.chain)
            log.info("archive: %s/%s continues after offset %s (epoch %d)", self.topic, self.partition,
                     self.last_offset, self.epoch)

    # appending
    def append(self, offset: int, timestamp: int, timestamp_type: int, key: bytes | None, value: bytes | None,
               headers: list[tuple[str, bytes | None]] | None) -> bool:
        """Archive one record; False when it was skipped as a copy of one archived already."""
        headers = [{"key": k, "value": None if v is None else bytes(v)} for k, v in (headers or [])]
        self.commit_due = True
        if self.epoch == self.restored_epoch and offset < self.restored_end:
            return False  # a restored copy of an archived record
        in_new_epoch = self._epoch_reason != "" and self._writer is None
        if self.last_offset is not None and offset <= self.last_offset and not in_new_epoch:
            went_back = self._prev_seen is None or offset <= self._prev_seen
            if self._verified_run and not went_back:
                self._prev_seen = offset
                return False
            if self._same_as_archived(offset, timestamp, key, value, headers):
                self._verified_run, self._prev_seen = True, offset
                return False
            log.warning("archive: %s/%s offset %d differs from the record archived at that offset: the partition's "
                        "log was reset (a memory-only broker restarted); starting epoch %d", self.topic,
                        self.partition, offset, self.epoch + 1)
            self._close_file()
            self.epoch += 1
            self._epoch_reason = f"log reset: offset {offset} arrived after offset {self.last_offset}"
        self._verified_run = False
        self._prev_seen = offset
        if self._writer is None:
            self._open(offset)
        record = {"topic": self.topic, "partition": self.partition, "offset": offset, "timestamp": int(timestamp),
                  "timestamp_type": int(timestamp_type), "key": None if key is None else bytes(key),
                  "value": None if value is None else bytes(value), "headers": headers,
                  "prev_offset": -1 if self.last_offset is None else self.last_offset}
        record["digest"] = record_digest(record)
        record["chain"] = chain_next(self.chain, record["digest"])
        self._writer.write(record)
        self.last_offset, self.chain = offset, record["chain"]
        self.last_file_records += 1
        self._pending += 1
        return True

    def _same_as_archived(self, offset: int, timestamp: int, key, value, headers) -> bool:
        if self._writer is not None:
            self._writer.flush()  # so the open file holds every record appended so far
        candidates = [p for p in series_files(self.dir) if parse_file_name(p.name)[0] == self.epoch
                      and parse_file_name(p.name)[1] <= offset]
        if not candidates:
            return False
        _, records, _, _ = read_file(candidates[-1])
        for record in records:
            if record["offset"] == offset:
                return (record["timestamp"], record["key"], record["value"], record["headers"]) == (
                    int(timestamp), key, value, headers)
        return False

    def _open(self, first_offset: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = file_name(self.epoch, first_offset)
        path = self.dir / name
        metadata = {
            "version": FORMAT_VERSION, "topic": self.topic, "partition": str(self.partition),
            "epoch": str(self.epoch), "first_offset": str(first_offset), "prev_file": self.last_file,
            "prev_chain": self.chain.hex(),
            "prev_last_offset": str(-1 if self.last_offset is None else self.last_offset),
            "prev_records": str(self.last_file_records), "epoch_reason": self._epoch_reason,
        }
        self._fo = open(path, "xb")
        self._writer = Writer(self._fo, PARSED_SCHEMA, codec=self.config.codec, sync_interval=1 << 40,
                              metadata={_META + k: v for k, v in metadata.items()})
        self._opened_at = time.monotonic()
        self._new_file = True
        self._epoch_reason = ""
        self.last_file, self.last_file_records = name, 0

    # durability
    @property
    def pending(self) -> int:
        return self._pending

    def _sync(self) -> None:
        """Write the buffered records as one block, fsync the file (and its directory when new), update HEAD."""
        if self._writer is None or not (self._pending or self._new_file):
            return
        self._writer.flush()
        self._fo.flush()
        os.fsync(self._fo.fileno())
        if self._new_file:
            _fsync_dir(self.dir)
            self._new_file = False
        if self._pending:
            self.durable = (self.epoch, self.last_offset, self.last_file, self.chain)
            _write_atomic(self.dir / HEAD_FILE, json.dumps({
                "topic": self.topic, "partition": self.partition, "epoch": self.epoch, "file": self.last_file,
                "last_offset": self.last_offset, "chain": self.chain.hex(),
            }, sort_keys=True).encode())
            self._pending = 0

    def flush(self) -> int | None:
        """Make every appended record durable; the newest durable offset (None: nothing archived yet)."""
        self._sync()
        self.maybe_rotate()
        return None if self.durable is None else self.durable[1]

    def maybe_rotate(self, now: float | None = None) -> None:
        if self._writer is None or self._pending:
            return
        age = (time.monotonic() if now is None else now) - self._opened_at
        if self._fo.tell() >= self.config.rotate_bytes or age >= self.config.rotate_s:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is None:
            return
        self._sync()
        self._fo.close()
        self._fo, self._writer = None, None

    def close(self) -> None:
        self._close_file()


def recover_series(root: Path, config: ArchiveSettings) -> None:
    """Cut what a crash left after each series' last fsync (a torn block, a file without its header), as the
    archiver does when it starts: nothing cut was ever durable or committed."""
    for topic, partition, _ in series_dirs(root):
        PartitionSeries(root, topic, partition, config).close()


class ArchiveWriter:
    """Every partition's series under one archive directory (what the archiver and the tests write with)."""

    def __init__(self, config: ArchiveSettings):
        self.config = config
        self.root = Path(config.dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.series: dict[tuple[str, int], PartitionSeries] = {}
        #: The broker generation this archive was last restored into (consumers/restore.py), if any.
        self.generation = read_restore_file(self.root, GENERATION_FILE) or {"generation": 0, "partitions": {}}
        self._first_pending_at: float | None = None
        self.pending = 0

    def _series(self, topic: str, partition: int) -> PartitionSeries:
        key = (topic, partition)
        if key not in self.series:
            restored = self.generation["partitions"].get(f"{topic}/{partition}")
            if restored is not None:
                restored = {**restored, "generation": self.generation["generation"]}
            self.series[key] = PartitionSeries(self.root, topic, partition, self.config, restored)
        return self.series[key]

    def append(self, topic: str, partition: int, offset: int, timestamp: int, timestamp_type: int = 1,
               key: bytes | None = None, value: bytes | None = None,
               headers: list[tuple[str, bytes | None]] | None = None) -> bool:
        written = self._series(topic, partition).append(offset, timestamp, timestamp_type, key, value, headers)
        if written:
            self.pending += 1
            if self._first_pending_at is None:
                self._first_pending_at = time.monotonic()
        return written

    def flush_due(self) -> bool:
        return self.pending >= self.config.flush_records or (
            self._first_pending_at is not None and time.monotonic() - self._first_pending_at >= self.config.flush_s)

    def flush(self, only: set[tuple[str, int]] | None = None) -> dict[tuple[str, int], int]:
        """Make what was appended durable; (topic, partition) → next offset to commit, for partitions that
        advanced since the last call."""
        positions = {}
        for key, series in self.series.items():
            if only is not None and key not in only:
                continue
            durable = series.flush()
            if series.commit_due and durable is not None:
                positions[key] = durable + 1
            series.commit_due = False
        if only is None or not any(s.pending for s in self.series.values()):
            self.pending = 0
            self._first_pending_at = None
        return positions

    def rotate_aged(self) -> None:
        now = time.monotonic()
        for series in self.series.values():
            series.maybe_rotate(now)

    def close(self, only: set[tuple[str, int]] | None = None) -> None:
        for key in list(self.series):
            if only is None or key in only:
                self.series.pop(key).close()


# -- writer schemas, so the archive can be read without a registry ---------------------------------------------------
class SchemaKeeper:
    """Copies the writer schema of every schema id seen in an archived value into <archive>/_schemas/<id>.json."""

    def __init__(self, root: Path, registry=None):
        self.dir = Path(root) / SCHEMAS_DIR
        self.registry = registry
        self.known = {int(p.stem) for p in self.dir.glob("*.json") if p.stem.isdigit()} if self.dir.is_dir() else set()
        self._retry_after: dict[int, float] = {}

    def note(self, value: bytes | None) -> None:
        if self.registry is None or not value or len(value) < 5 or value[0] != 0:
            return
        schema_id = int.from_bytes(value[1:5], "big")
        if schema_id in self.known or time.monotonic() < self._retry_after.get(schema_id, 0.0):
            return
        try:
            schema = self.registry.get_schema(schema_id)
        except Exception as exc:  # noqa: BLE001 - the registry keeps it too; try again later
            log.warning("archive: could not fetch schema %d: %s", schema_id, exc)
            self._retry_after[schema_id] = time.monotonic() + 30
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.dir / f"{schema_id}.json", json.dumps(
            {"id": schema_id, "schema_type": schema.schema_type or "AVRO", "schema": schema.schema_str},
            sort_keys=True).encode())
        self.known.add(schema_id)


# -- the consumer groups' positions -----------------------------------------------------------------------------------
UNGROUPED_NAMES = frozenset(t.name for t in topics.UNGROUPED)


class GroupPositions:
    """Records every consumer group's committed offsets once the archive holds everything those offsets rest on.

    A committed offset promises that the outputs of every input below it were acknowledged by the broker. A restore
    (consumers/restore.py) puts the groups back at recorded positions, so it may only use positions whose outputs
    are archived. One round:

    1. at T0, read every group's committed offsets (admin API);
    2. at T0 + ``margin_s``, take every archived partition's high watermark from the archiver's own fetches (a fetch
       answered after T0 counts every record acknowledged before T0, so every output behind the offsets of step 1);
    3. once the archiver has consumed up to those watermarks and made it durable, write the offsets of step 1 with
       T0 to ``<archive>/_restore/group-offsets.json``. T0 is the restore's *horizon*: a stage's dedupe mark made
       after it may name an input whose outputs never reached the archive (streams/ledger.py).

    Recorded only while this archiver holds every archived partition (one archiver: the embedded mode).
    """

    def __init__(self, root: Path, admin, generation: int, every_s: float = 1.0, margin_s: float = 0.3,
                 idle_every_s: float = 30.0):
        self.root, self.admin, self.generation = root, admin, generation
        self.every_s, self.margin_s = every_s, margin_s
        # While no record a group reads arrives, the groups' offsets can hardly move (a group that consumes without
        # emitting commits a little further): a round then every ``idle_every_s`` keeps an idle broker quiet — a
        # round lists every group and reads each one's offsets — and a restore from an older round only replays more.
        self.idle_every_s = idle_every_s
        self.consumed_at_round: dict[tuple[str, int], int] | None = None
        self.taken: tuple[float, dict] | None = None  # (T0, group → {"topic/partition": offset})
        self.targets: dict[tuple[str, int], int] | None = None
        self.next_round_at = 0.0
        self.recorded_at: float | None = None  # T0 of the newest positions written

    def read_groups(self, timeout_s: float = 5.0) -> dict[str, dict[str, int]]:
        from confluent_kafka import ConsumerGroupTopicPartitions

        listed = self.admin.list_consumer_groups(request_timeout=timeout_s).result()
        if listed.errors:
            raise RuntimeError(f"listing the consumer groups: {listed.errors[0]}")
        futures = {}
        for group in sorted(g.group_id for g in listed.valid):
            futures.update(self.admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                                                  request_timeout=timeout_s))
        groups = {}
        for group, future in futures.items():
            offsets = {f"{tp.topic}/{tp.partition}": tp.offset
                       for tp in future.result().topic_partitions if tp.offset >= 0}
            if offsets:
                groups[group] = offsets
        return groups

    def step(self, consumer, consumed: dict[tuple[str, int], int], all_durable: bool, now: float | None = None,
             force: bool = False) -> bool:
        """Advance the round; ``consumed``: next offset per partition read so far; ``all_durable``: everything
        read is durable now. True when positions were written in this call."""
        from confluent_kafka import TopicPartition

        now = time.time() if now is None else now
        if self.taken is None:
            if now < self.next_round_at and not force:
                return False
            grouped = {tp: offset for tp, offset in consumed.items() if tp[0] not in UNGROUPED_NAMES}
            if grouped == self.consumed_at_round and now < (self.recorded_at or 0.0) + self.idle_every_s and not force:
                return False
            self.consumed_at_round = grouped
            assignment = consumer.assignment()
            if len(assignment) < sum(t.partitions for t in topics.ARCHIVED):
                return False  # another archiver holds some partitions: positions would not be safe
            try:
                self.taken, self.targets = (now, self.read_groups()), None
            except Exception as exc:  # noqa: BLE001 - try again next round; the previous positions stay
                log.warning("archiver: could not read the consumer groups' offsets: %s", exc)
                self.next_round_at = now + self.every_s
            return False
        if self.targets is None:
            if now < self.taken[0] + self.margin_s:
                return False
            self.targets = {}
            for tp in consumer.assignment():
                _low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)
                if high > 0:
                    self.targets[(tp.topic, tp.partition)] = high
        if not all_durable or any(consumed.get(tp, 0) < high for tp, high in self.targets.items()):
            return False
        taken_at, groups = self.taken
        # A group the broker no longer lists (a broker going down answers with less) keeps its last positions.
        recorded = read_restore_file(self.root, GROUP_OFFSETS_FILE) or {}
        if recorded.get("generation") == self.generation:
            before = recorded.get("groups", {})
            groups = {g: {**before.get(g, {}), **groups.get(g, {})} for g in {*before, *groups}}
        write_restore_file(self.root, GROUP_OFFSETS_FILE, {
            "generation": self.generation, "taken_at_ms": round(taken_at * 1000), "groups": groups})
        self.taken, self.targets, self.recorded_at = None, None, taken_at
        self.next_round_at = taken_at + self.every_s
        return True


# -- the consumer group ----------------------------------------------------------------------------------------------
class Archiver:
    def __init__(self, settings: Settings, config: ArchiveSettings | None = None,
                 stopping: threading.Event | None = None):
        self.settings = settings
        self.config = config or archive_settings(settings)
        self.stopping = stopping or threading.Event()
        self.writer = ArchiveWriter(self.config)
        self.consumer = None
        self.counters = {"consumed": 0, "archived": 0, "duplicates": 0, "commits": 0, "positions": 0}
        #: next offset to read per partition (from the committed offset on assignment, then each record read)
        self.consumed: dict[tuple[str, int], int] = {}
        self.positions: GroupPositions | None = None
        registry = None
        if settings.schema_registry_url:
            from streams.serde import registry_client

            registry = registry_client(settings)
        self.schemas = SchemaKeeper(self.config.dir, registry)

    def _commit(self, positions: dict[tuple[str, int], int]) -> None:
        from confluent_kafka import TopicPartition

        if not positions or self.consumer is None:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in sorted(positions.items())],
                                 asynchronous=False)
            self.counters["commits"] += 1
        except Exception as exc:  # noqa: BLE001 - an uncommitted offset only means a redelivery, which is skipped
            log.warning("archiver: commit failed: %s", exc)

    def flush_and_commit(self, only: set[tuple[str, int]] | None = None) -> None:
        self._commit(self.writer.flush(only))

    def _on_assign(self, consumer, partitions) -> None:
        log.info("archiver: assigned %d partitions", len(partitions))
        try:
            for tp in consumer.committed(partitions, timeout=10):
                self.consumed.setdefault((tp.topic, tp.partition), max(tp.offset, 0))
        except Exception as exc:  # noqa: BLE001 - positions are then recorded once records arrive
            log.warning("archiver: could not read the committed offsets: %s", exc)

    def _on_revoke(self, consumer, partitions) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        for tp in revoked:
            self.consumed.pop(tp, None)
        self.flush_and_commit(revoked)
        self.writer.close(revoked)  # the next owner recovers the chain from the files
        log.info("archiver: revoked %d partitions", len(revoked))

    def _on_lost(self, consumer, partitions) -> None:
        lost = {(p.topic, p.partition) for p in partitions}
        self.writer.flush(lost)  # durable, but not committable any more: the new owner skips the copies
        self.writer.close(lost)

    def run(self) -> dict:
        from confluent_kafka import Consumer
        from confluent_kafka.admin import AdminClient

        from streams.kafka import Latency, admin_config, consumer_config
        from streams.metrics import LagMonitor, serve_metrics

        # A background reader (it fetches every partition there is); its fetch wait adds to the flush interval.
        conf = consumer_config(self.settings, GROUP_ID, "vidgen.archiver", Latency.BACKGROUND)
        if serve_metrics(self.settings.metrics_port, self.settings.metrics_host):  # how far behind the log the archive is, per partition
            conf["statistics.interval.ms"] = 5000
            conf["stats_cb"] = LagMonitor("archiver").on_stats
        self.consumer = Consumer(conf)
        self.consumer.subscribe([t.name for t in topics.ARCHIVED], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        self.positions = GroupPositions(self.config.dir, AdminClient(admin_config(self.settings)),
                                        self.writer.generation["generation"], self.config.positions_every_s)
        log.info("archiver: archiving %d topics into %s", len(topics.ARCHIVED), self.config.dir)
        next_retention = 0.0
        drain_deadline = None
        try:
            while True:
                if self.stopping.is_set() and drain_deadline is None:
                    # Stopping: the platform's other processes have stopped (the supervisor stops the archiver
                    # last), so one more round records the groups' final positions exactly.
                    drain_deadline = time.monotonic() + 10.0
                    self.positions.taken = self.positions.targets = None
                    stop_requested_at = time.time()
                if drain_deadline is not None and (
                        time.monotonic() > drain_deadline
                        or (self.positions.recorded_at or 0) >= stop_requested_at):
                    break
                self._consume_batch()
                if self.writer.flush_due() or drain_deadline is not None:
                    self.flush_and_commit()
                self.writer.rotate_aged()
                if self.positions.step(self.consumer, self.consumed, self.writer.pending == 0,
                                       force=drain_deadline is not None):
                    self.counters["positions"] += 1
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + self.config.retention_check_s
                    self.apply_retention()
        finally:
            self.flush_and_commit()
            self.writer.close()
            self.consumer.close()
            self.consumer = None
            log.info("archiver: stopped %s", json.dumps(self.counters))
        return self.counters

    def apply_retention(self) -> None:
        from .archive_retention import apply_retention, retention_policy

        try:
            for change in apply_retention(self.config.dir, retention_policy(), round(time.time() * 1000)):
                log.info("archiver: retention removed %s", json.dumps(change, sort_keys=True))
        except Exception as exc:  # noqa: BLE001 - archiving goes on; the next check tries again
            log.error("archiver: applying the retention policy failed: %s", exc)

    def _consume_batch(self) -> None:
        from confluent_kafka import KafkaError

        for msg in self.consumer.consume(num_messages=1000, timeout=0.1):
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("archiver: consumer error: %s", msg.error())
                continue
            self.counters["consumed"] += 1
            self.consumed[(msg.topic(), msg.partition())] = msg.offset() + 1
            timestamp_type, timestamp = msg.timestamp()
            if self.writer.append(msg.topic(), msg.partition(), msg.offset(), timestamp, timestamp_type,
                                  msg.key(), msg.value(), msg.headers()):
                self.counters["archived"] += 1
                self.schemas.note(msg.value())
            else:
                self.counters["duplicates"] += 1


def run_archiver(settings: Settings, stopping: threading.Event | None = None,
                 install_signal_handlers: bool = True) -> int:
    """`vidgen stage archiver`: archive until SIGTERM/SIGINT (or ``stopping``), then flush, fsync, commit, exit 0."""
    archiver = Archiver(settings, stopping=stopping)
    if install_signal_handlers:
        def request_stop(signum, _frame):
            log.info("archiver: %s received, flushing", signal.Signals(signum).name)
            archiver.stopping.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    archiver.run()
    return 0


def main() -> int:
    """`python -m consumers.archiver`: the archiver with the settings from the environment."""
    from streams.settings import load_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_archiver(load_settings())


if __name__ == "__main__":
    raise SystemExit(main())
