"""`vidgen audit`: check the archive's hash chains, and replay the event log against the platform's invariants.

``verify_archive(dir)`` recomputes every record digest and chain link of an archive written by consumers/archiver.py
and names what is wrong as ``topic/partition@offset: altered|removed|reordered|chain broken|truncated: ...``.
A series that retention shortened (consumers/archive_retention.py) is checked from its ``RETENTION.json`` anchor
instead of genesis; an anchor the retention policy does not allow, or one that does not link to the first kept
file, is a problem.

``replay(events, blobs)`` is pure: it takes decoded events as ``(topic, partition, offset, timestamp_ms, event)``
in log order (per partition) and rebuilds each job's timeline, checking that

* ``terminal``: a job has exactly one terminal event — VideoPublished, JobFailed, JobCancelled on vidgen.cancelled,
  or a VideoFlagged that ends the job (``ends_job``; when an old event has no such field, decision BLOCK ends it,
  so a REVIEW that lets the job go on is not terminal). Two *different* terminal events (distinct event ids) are a
  violation; redelivered copies of one event (same event_id, at-least-once) are not, and are counted once.
  A job with none is ``unfinished``: a violation while ``require_terminal`` is on (the default; turn it off for a
  window that is still open, e.g. a live log);
* ``steps``: within an attempt, StepProgress steps strictly increase in log order;
* ``resume``: an attempt that resumed from step N (``resumed_from_step``) has a LatentCheckpointed of the job at
  step N from an earlier attempt;
* ``publish-order``: a VideoPublished comes after (by event time) a VideoDecoded with ``is_last``;
* ``flagged-published``: a job flagged with a flag that ends it is never published;
* ``blob``: every BlobRef ({uri, sha256, bytes}) any event names exists with that size and sha256 — unless the
  lifecycle deleted it (consumers/lifecycle.py): a ref whose key a BlobsDeleted on vidgen.blob-lifecycle names
  (any copy of it, anywhere in what is read, so before the audit's end) and that is missing or different is
  *expired*, counted as such and no violation. The lifecycle sends that event before it deletes, so a ref missing
  without one is still a violation.

Windows: ``--from/--to`` select the jobs whose *first* event falls inside [from, to); all of such a job's events
are replayed, also those after ``to`` (a job cut in half would look broken). ``--job`` selects one job.
The report is deterministic: sorted keys, no wall-clock time in it (only the window asked for), so replaying the
same log twice gives byte-identical JSON.

Sources: ``kafka`` reads the lifecycle topics without a consumer group from the beginning to the end each partition
had when the read reached it (``enable.partition.eof``; never a "latest" offset look-up, which the embedded broker
answers wrongly); ``archive`` reads the archive, decoding values with the writer schemas the archiver kept in
``<archive>/_schemas`` (no registry needed) and falling back to the project's EventCodec.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

from streams import topics

from .archive_retention import RETENTION_FILE, kept_files, live_files, read_retention_anchor, retention_policy
from .archiver import (HEAD_FILE, SCHEMAS_DIR, chain_next, genesis, parse_file_name, read_file, read_head,
                       record_digest, series_dirs, series_files)
from .job_state import LIFECYCLE_TOPICS, epoch_ms, request_fingerprint

#: What the replay reads: the jobs' lifecycle, and what the blob lifecycle deleted.
AUDITED_TOPICS = (*LIFECYCLE_TOPICS, topics.BLOB_LIFECYCLE)
#: What a BlobChecker-style check reports for a blob the lifecycle deleted (see ``replay``).
EXPIRED = "expired by the lifecycle"

# -- verify -----------------------------------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    ok: bool
    files: int
    records: int
    problems: list[str] = field(default_factory=list)
    #: "topic/partition" → hex chain hash of its newest record: keep a copy elsewhere to anchor the archive.
    heads: dict[str, str] = field(default_factory=dict)
    #: "topic/partition" → what retention removed from its front (RETENTION.json): files, records, up to where.
    retained: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "files": self.files, "records": self.records, "problems": self.problems,
                "heads": dict(sorted(self.heads.items())), "retained": dict(sorted(self.retained.items()))}


def verify_archive(directory: Path | str, policy: dict[str, int | None] | None = None) -> VerifyResult:
    """Check every file series of an archive; problems name topic/partition@offset and what is wrong. ``policy``
    (topic → archive retention ms, None: forever) says where retention may have removed records; default: the
    environment's (``retention_policy()``)."""
    result = VerifyResult(ok=True, files=0, records=0)
    root = Path(directory)
    if not root.is_dir():
        result.ok = False
        result.problems.append(f"{root}: no archive there")
        return result
    if policy is None:
        try:
            policy = retention_policy()
        except ValueError as exc:
            result.problems.append(f"retention policy: {exc}")
            policy = retention_policy({})
    for topic, partition, part_dir in series_dirs(root):
        _verify_series(topic, partition, part_dir, result, policy)
    result.ok = not result.problems
    return result


def _verify_series(topic: str, partition: int, part_dir: Path, result: VerifyResult,
                   policy: dict[str, int | None] | None = None) -> None:
    where = f"{topic}/{partition}"
    problems: list[str] = []
    files = series_files(part_dir)
    names = {p.name for p in files}
    for stray in sorted(p.name for p in part_dir.iterdir() if p.name not in names
                        and p.name not in (HEAD_FILE, RETENTION_FILE) and not p.name.startswith(".")):
        problems.append(f"{where}: unexpected file {stray}")
    head = read_head(part_dir)
    prev_chain, prev_offset, prev_epoch, prev_name = genesis(topic, partition), -1, None, ""
    prev_desc = ""  # how the problems name the predecessor of the first file, when it is not the series' start
    try:
        anchor = read_retention_anchor(part_dir)
    except ValueError as exc:
        anchor = None
        problems.append(f"{where}: altered: {exc}")
    if anchor is not None:
        # Retention removed a prefix of the series: its chain goes on from the anchor instead of genesis.
        prev_chain, prev_name = bytes.fromhex(anchor["chain"]), anchor["last_removed_file"]
        prev_offset, prev_epoch = anchor["last_removed_offset"], anchor["last_removed_epoch"]
        prev_desc = f"the records removed by retention ({RETENTION_FILE}, up to {prev_name})"
        removed_at = (f"{where}@{prev_offset}: removed: {anchor['removed_records']} records up to offset "
                      f"{prev_offset} were removed by retention ({RETENTION_FILE})")
        if (anchor["topic"], anchor["partition"]) != (topic, partition):
            problems.append(f"{where}: altered: {RETENTION_FILE} is the anchor of {anchor['topic']}/"
                            f"{anchor['partition']}")
        if (retention_policy({}) if policy is None else policy).get(topic) is None:
            problems.append(f"{removed_at}, but the retention policy keeps {topic} forever")
        kept = kept_files(files, anchor)
        if not kept:
            problems.append(f"{removed_at}, and every file after them is missing")
        result.retained[where] = {k: anchor[k] for k in ("removed_files", "removed_records", "last_removed_file",
                                                         "last_removed_epoch", "last_removed_offset")}
        result.retained[where]["leftover_files"] = len(files) - len(kept)  # an interrupted removal: skipped
        files = kept
    seen: set[tuple[int, int]] = set()
    claimed: list[tuple[int, int, int, int]] = []  # (epoch of predecessor, claimed predecessor, actual one, record)
    reordered: dict[tuple[int, int], str] = {}
    head_found: bytes | None = None
    last_epoch, last_offset = None, None
    for path in files:
        result.files += 1
        epoch, first_offset = parse_file_name(path.name)
        meta, records, _end, error = read_file(path)
        if meta["version"] is None:
            problems.append(f"{where}@{prev_offset}: chain broken: {path.name} is unreadable ({error})")
            continue
        if (meta["topic"], meta["partition"], meta["epoch"], meta["first_offset"]) != (
                topic, partition, epoch, first_offset):
            problems.append(f"{where}@{first_offset}: altered: {path.name} header says {meta['topic']}/"
                            f"{meta['partition']} epoch {meta['epoch']} first offset {meta['first_offset']}")
        # The link from the previous file.
        after = prev_desc or prev_name
        if meta["prev_file"] != prev_name:
            if meta["prev_file"] and meta["prev_file"] not in names:
                problems.append(f"{where}@{meta['prev_last_offset']}: chain broken: file {meta['prev_file']} is "
                                f"missing {f'between {prev_desc} and' if prev_desc else 'before'} {path.name} "
                                f"(records after offset {prev_offset} up to {meta['prev_last_offset']} removed)")
            else:
                problems.append(f"{where}@{first_offset}: chain broken: {path.name} follows "
                                f"{meta['prev_file'] or 'nothing'} but comes after {after or 'nothing'}")
        elif meta["prev_chain"] != prev_chain.hex():
            if meta["prev_last_offset"] != prev_offset:
                problems.append(f"{where}@{prev_offset}: truncated: {after or 'the series'} ends at "
                                f"offset {prev_offset} but {path.name} continues from offset "
                                f"{meta['prev_last_offset']} (records after {prev_offset} removed)")
            else:
                problems.append(f"{where}@{prev_offset}: chain broken: {path.name} does not link to the end of "
                                f"{after or 'the series'}")
        elif prev_desc and meta["prev_last_offset"] != prev_offset:
            problems.append(f"{where}@{prev_offset}: chain broken: {path.name} continues from offset "
                            f"{meta['prev_last_offset']}, not from the end of {prev_desc} at offset {prev_offset}")
        if epoch != prev_epoch and prev_epoch is not None and not meta["epoch_reason"]:
            problems.append(f"{where}@{first_offset}: chain broken: epoch {epoch} starts without a reason")
        # Resynchronise on the file's own claims so that one break is reported once.
        try:
            prev_chain = bytes.fromhex(meta["prev_chain"])
        except ValueError:
            problems.append(f"{where}@{first_offset}: altered: {path.name} has a malformed prev_chain")
        prev_offset = meta["prev_last_offset"]
        pred_epoch = prev_epoch if prev_epoch is not None else epoch
        if records and records[0]["offset"] != first_offset:
            if records[0]["offset"] > first_offset:
                pass  # the first record(s) went missing: the chain link of the next one names them below
            else:
                problems.append(f"{where}@{records[0]['offset']}: reordered: {path.name} starts with offset "
                                f"{records[0]['offset']} below its first offset {first_offset}")
        for record in records:
            result.records += 1
            offset = record["offset"]
            at = f"{where}@{offset}"
            if (record["topic"], record["partition"]) != (topic, partition):
                problems.append(f"{at}: altered: record of {record['topic']}/{record['partition']} in this series")
            digest = record_digest(record)
            if digest != record["digest"]:
                problems.append(f"{at}: altered: the record's content does not match its digest ({path.name})")
            elif chain_next(prev_chain, digest) != record["chain"]:
                claimed_prev = record["prev_offset"]
                same_epoch_back = pred_epoch == epoch and offset <= prev_offset
                if same_epoch_back:
                    reordered[(epoch, offset)] = f"{at}: reordered: offset {offset} comes after offset {prev_offset}"
                elif claimed_prev != prev_offset:
                    claimed.append((pred_epoch, claimed_prev, prev_offset, offset))
                else:
                    problems.append(f"{at}: altered: its chain hash does not follow from offset {prev_offset} "
                                    f"(one of the two was rewritten with recomputed hashes)")
            elif pred_epoch == epoch and offset <= prev_offset:
                reordered[(epoch, offset)] = f"{at}: reordered: offset {offset} comes after offset {prev_offset}"
            seen.add((epoch, offset))
            if head and head.get("epoch") == epoch and head.get("last_offset") == offset:
                head_found = bytes(record["chain"])
            prev_chain, prev_offset, pred_epoch = bytes(record["chain"]), offset, epoch
            last_epoch, last_offset = epoch, offset
        if error is not None:
            problems.append(f"{where}@{prev_offset}: truncated: {path.name} is cut or corrupt after offset "
                            f"{prev_offset} ({type(error).__name__}: {error})")
        prev_epoch, prev_name, prev_desc = epoch, path.name, ""
    for pred_epoch, claimed_prev, actual_prev, offset in claimed:
        if (pred_epoch, claimed_prev) in seen:
            reordered.setdefault((pred_epoch, claimed_prev), f"{where}@{claimed_prev}: reordered: offset "
                                 f"{claimed_prev} is not right before offset {offset}")
        else:
            span = "" if actual_prev < 0 else f" (between offsets {actual_prev} and {offset})"
            problems.append(f"{where}@{claimed_prev}: removed: the record at offset {claimed_prev}{span} is missing")
    problems += [reordered[k] for k in sorted(reordered)]
    if head is not None:
        if head_found is None:
            problems.append(f"{where}@{head.get('last_offset')}: truncated: the archive ends at offset {last_offset}"
                            f" (epoch {last_epoch}) but HEAD records offset {head.get('last_offset')} (epoch "
                            f"{head.get('epoch')}) as archived")
        elif head_found.hex() != head.get("chain"):
            problems.append(f"{where}@{head.get('last_offset')}: chain broken: the chain at offset "
                            f"{head.get('last_offset')} is not the one HEAD recorded (records before it rewritten)")
    elif files:
        problems.append(f"{where}: {HEAD_FILE} is missing")
    if last_offset is not None:
        result.heads[where] = prev_chain.hex()
    result.problems.extend(problems)


def main_verify(argv: list[str] | None = None) -> int:
    """`vidgen audit verify [--archive DIR] [--json]`: 0 when the archive is intact, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="vidgen audit verify", description="check the archive's hash chains")
    parser.add_argument("--archive", help="archive directory (default: VIDGEN_ARCHIVE_DIR or <var>/archive)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    directory = Path(args.archive) if args.archive else _default_archive_dir()
    result = verify_archive(directory)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        for problem in result.problems:
            print(problem)
        print(f"{'OK' if result.ok else 'FAILED'}: {result.files} files, {result.records} records, "
              f"{len(result.problems)} problems in {directory}")
        for series, chain in sorted(result.heads.items()):
            print(f"head {series} {chain}")
        for series, kept in sorted(result.retained.items()):
            print(f"retention {series}: {kept['removed_records']} records in {kept['removed_files']} files removed "
                  f"up to offset {kept['last_removed_offset']} (epoch {kept['last_removed_epoch']})")
    return 0 if result.ok else 1


def _default_archive_dir() -> Path:
    from .archiver import archive_settings

    return archive_settings().dir


# -- reading the archive ----------------------------------------------------------------------------------------------
def iter_archive(directory: Path | str, topic_names: Iterable[str] | None = None) -> Iterator[dict]:
    """Every archived record (as the archive holds it), series by series, in each series' order; unreadable
    parts are skipped (``verify_archive`` reports them)."""
    wanted = None if topic_names is None else set(topic_names)
    for topic, _partition, part_dir in series_dirs(Path(directory)):
        if wanted is not None and topic not in wanted:
            continue
        for path in live_files(part_dir):
            _meta, records, _end, _error = read_file(path)
            yield from records


class ArchiveDecoder:
    """Decodes archived values (Confluent wire format) with the writer schemas kept in <archive>/_schemas, read
    with this code's schema for the topic; falls back to ``codec`` (an EventCodec) for ids it does not hold."""

    def __init__(self, directory: Path | str, codec=None):
        self.dir = Path(directory) / SCHEMAS_DIR
        self.codec = codec
        self._writers: dict[int, object] = {}
        self._readers: dict[str, object] = {}

    def _writer(self, schema_id: int):
        if schema_id not in self._writers:
            import fastavro

            path = self.dir / f"{schema_id}.json"
            self._writers[schema_id] = (fastavro.parse_schema(json.loads(json.loads(path.read_text())["schema"]))
                                        if path.exists() else None)
        return self._writers[schema_id]

    def decode(self, topic: str, value: bytes | None) -> dict:
        import fastavro

        from schemas.codec import DecodeError, load_schema

        if not value or len(value) < 5 or value[0] != 0:
            raise DecodeError("not Confluent wire format")
        writer = self._writer(int.from_bytes(value[1:5], "big"))
        if writer is None:
            if self.codec is None:
                raise DecodeError(f"schema id {int.from_bytes(value[1:5], 'big')} is not in the archive")
            return self.codec.decode(topic, value)
        if topic not in self._readers:
            self._readers[topic] = fastavro.parse_schema(load_schema(topics.topic(topic).value_schema))
        try:
            return fastavro.schemaless_reader(io.BytesIO(value[5:]), writer, self._readers[topic])
        except Exception as exc:  # noqa: BLE001 - fastavro raises many kinds on bad bodies
            raise DecodeError(f"cannot read value: {type(exc).__name__}: {exc}") from exc


def archive_events(directory: Path | str, decoder: ArchiveDecoder | None = None,
                   topic_names: Iterable[str] | None = None, undecodable: list | None = None) -> Iterator[tuple]:
    """(topic, partition, offset, timestamp_ms, event) of every decodable record of the audited topics (or of
    ``topic_names``) in the archive."""
    from schemas.codec import DecodeError

    decoder = decoder or ArchiveDecoder(directory)
    names = [t.name for t in AUDITED_TOPICS] if topic_names is None else list(topic_names)
    for record in iter_archive(directory, names):
        try:
            event = decoder.decode(record["topic"], record["value"])
        except (DecodeError, KeyError) as exc:
            if undecodable is not None:
                undecodable.append(f"{record['topic']}/{record['partition']}@{record['offset']}: {exc}")
            continue
        yield record["topic"], record["partition"], record["offset"], record["timestamp"], event


def kafka_events(settings, topic_names: Iterable[str] | None = None, timeout_s: float = 60.0,
                 undecodable: list | None = None) -> Iterator[tuple]:
    """(topic, partition, offset, timestamp_ms, event) of the audited topics (or of ``topic_names``), group-less,
    from the beginning to the end each partition had when the read got there (PARTITION_EOF)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    from schemas.codec import DecodeError
    from streams.kafka import consumer_config
    from streams.serde import event_codec

    codec = event_codec(settings)
    conf = consumer_config(settings, group_id="vidgen.audit", client_id="vidgen.audit")  # never joined
    conf["enable.partition.eof"] = True
    consumer = Consumer(conf)
    names = [t.name for t in AUDITED_TOPICS] if topic_names is None else list(topic_names)
    try:
        metadata = consumer.list_topics(timeout=10).topics
        assignment = [TopicPartition(name, p, OFFSET_BEGINNING) for name in names if name in metadata
                      for p in sorted(metadata[name].partitions)]
        consumer.assign(assignment)
        open_partitions = {(tp.topic, tp.partition) for tp in assignment}
        deadline = time.monotonic() + timeout_s
        while open_partitions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(open_partitions)} partitions not read to their end in {timeout_s} s")
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    open_partitions.discard((msg.topic(), msg.partition()))
                continue
            try:
                event = codec.decode(msg.topic(), msg.value())
            except DecodeError as exc:
                if undecodable is not None:
                    undecodable.append(f"{msg.topic()}/{msg.partition()}@{msg.offset()}: {exc}")
                continue
            yield msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1], event
    finally:
        consumer.close()


# -- blobs ------------------------------------------------------------------------------------------------------------
class BlobChecker:
    """Checks BlobRefs against a blob store (streams/blobs.py: stat, then the bytes, hashed a piece at a time),
    each distinct (uri, sha256, bytes) once; None when fine, else what is wrong. A store that cannot be reached
    raises BlobStoreUnavailable: "cannot tell" is not an answer about the blob."""

    PIECE = 8 << 20  # bytes read at a time: a long video is never in memory whole

    def __init__(self, store):
        self.store = store
        self._cache: dict[tuple, str | None] = {}

    def __call__(self, ref: dict) -> str | None:
        key = (ref["uri"], ref["sha256"], ref["bytes"])
        if key not in self._cache:
            self._cache[key] = self._check(ref)
        return self._cache[key]

    def _check(self, ref: dict) -> str | None:
        from streams.blobs import BlobError, BlobStoreUnavailable

        try:
            key = self.store.key_of(ref["uri"])
            stat = self.store.stat(key)
            if stat is None:
                return "missing"
            if stat.size != ref["bytes"]:
                return f"size {stat.size}, the reference says {ref['bytes']}"
            digest = hashlib.sha256()
            for start in range(0, stat.size, self.PIECE):
                digest.update(self.store.read_range(key, start, min(start + self.PIECE, stat.size)))
        except BlobStoreUnavailable:
            raise
        except BlobError as exc:  # not in this store, or gone since the stat
            return f"unreadable: {exc}"
        return None if digest.hexdigest() == ref["sha256"] else "sha256 differs from the reference"


def expired_uris(events: Iterable[tuple]) -> set[str]:
    """The URI of every blob a BlobsDeleted among ``events`` names: its store's URL, "/", its key (the BlobStore
    URI scheme, streams/blobs.py ``uri_of``). Every copy counts: a redelivered one may name fewer blobs."""
    return {f"{event['store'].rstrip('/')}/{blob['key']}" for topic_name, _p, _o, _t, event in events
            if topic_name == topics.BLOB_LIFECYCLE.name for blob in event.get("blobs") or ()}


def blob_refs(value) -> Iterator[dict]:
    """Every BlobRef ({uri, sha256, bytes, ...}) anywhere in an event."""
    if isinstance(value, dict):
        if isinstance(value.get("uri"), str) and "sha256" in value and "bytes" in value:
            yield value
            return
        for item in value.values():
            yield from blob_refs(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from blob_refs(item)


# -- replay -----------------------------------------------------------------------------------------------------------
@dataclass
class AuditReport:
    report: dict

    @property
    def violations(self) -> list[dict]:
        return self.report["violations"]

    @property
    def ok(self) -> bool:
        return not self.report["violations"]

    def to_json(self) -> str:
        return json.dumps(self.report, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def summary(self) -> str:
        s = self.report["summary"]
        lines = [
            f"{'OK' if self.ok else 'VIOLATIONS'}: {s['jobs']} jobs, {s['events']} events "
            f"({s['deliveries']} deliveries, {s['duplicates']} duplicate copies), {s['violations']} violations",
            "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items())),
            f"blobs: {s['blobs']['checked']} checked, {s['blobs']['bad']} missing or altered, "
            f"{s['blobs'].get('expired', 0)} expired by the lifecycle",
        ]
        if s.get("undecodable"):
            lines.append(f"undecodable records skipped: {s['undecodable']}")
        for v in self.violations:
            lines.append(f"  {v['job_id']}: {v['kind']}: {v['detail']}" + (f" [{v['where']}]" if v["where"] else ""))
        return "\n".join(lines)


def is_terminal(topic_name: str, event: dict) -> bool:
    if topic_name == topics.FLAGGED.name:
        ends = event.get("ends_job")
        return bool(ends) if ends is not None else event.get("decision") == "BLOCK"
    return topic_name in (topics.PUBLISHED.name, topics.FAILED.name, topics.CANCELLED.name)


_OUTCOME = {topics.PUBLISHED.name: "published", topics.FLAGGED.name: "flagged", topics.FAILED.name: "failed",
            topics.CANCELLED.name: "cancelled"}


def _describe(topic_name: str, event: dict) -> str:
    short = topic_name.removeprefix("vidgen.")
    if topic_name == topics.STEP_PROGRESS.name:
        resumed = event.get("resumed_from_step")
        return (f"{short} attempt {event.get('attempt', 1)} step {event['step']}/{event['total_steps']}"
                + (f" (resumed from {resumed})" if resumed is not None else ""))
    if topic_name == topics.LATENT_CHECKPOINTED.name:
        return f"{short} attempt {event.get('attempt', 1)} step {event['step']}"
    if topic_name == topics.LATENT_CHUNKS.name:
        return f"{short} {event['chunk_index'] + 1}/{event['chunk_count']}"
    if topic_name == topics.DECODED.name:
        return f"{short} segment {event['segment_index']}" + (" (last)" if event.get("is_last") else "")
    if topic_name == topics.FLAGGED.name:
        return (f"{short} {event.get('stage')} {event.get('decision')} ends_job={is_terminal(topic_name, event)} "
                f"{','.join(event.get('reasons') or [])}")
    if topic_name in (topics.FAILED.name, topics.CANCELLED.name):
        return f"{short} by {event.get('stage')}: {event.get('reason')}"
    return short


def replay(events: Iterable[tuple], blobs: Callable[[dict], str | None] | None = None, *,
           job: str | None = None, from_ms: int | None = None, to_ms: int | None = None,
           require_terminal: bool = True, timeline: bool = True, source: str = "events",
           undecodable: Iterable[str] = ()) -> AuditReport:
    """Check the invariants (module docstring) over decoded events in log order; ``blobs(ref)`` returns None for
    a sound blob, else what is wrong (``BlobChecker``); None skips the blob checks. A problem with a blob that a
    BlobsDeleted among the events names is ``EXPIRED``, not a violation."""
    events = list(events)
    expired = expired_uris(events)
    seq: dict[tuple[str, int], int] = defaultdict(int)
    by_job: dict[str, dict] = {}
    for topic_name, partition, offset, timestamp, event in events:
        if topic_name == topics.BLOB_LIFECYCLE.name:
            continue  # not a job's event: what the lifecycle deleted (above)
        job_id = event.get("job_id") if isinstance(event, dict) else None
        if not job_id or (job is not None and job_id != job):
            continue
        position = seq[(topic_name, partition)]  # log order per partition, whatever the interleaving was
        seq[(topic_name, partition)] += 1
        entry = by_job.setdefault(job_id, {"deliveries": 0, "events": {}})
        entry["deliveries"] += 1
        if event["event_id"] in entry["events"]:
            continue  # a redelivered copy: at-least-once, counted once
        entry["events"][event["event_id"]] = {
            "topic": topic_name, "partition": partition, "offset": offset, "position": position,
            "where": f"{topic_name}/{partition}@{offset}", "at": epoch_ms(event.get("timestamp")),
            "log_ms": timestamp, "event": event,
        }
    jobs: dict[str, dict] = {}
    violations: list[dict] = []
    outcomes: dict[str, int] = defaultdict(int)
    checked_blobs: set[tuple] = set()
    bad_blobs: set[tuple] = set()
    expired_blobs: set[tuple] = set()

    def check_blob(ref: dict) -> str | None:
        problem = blobs(ref)
        return EXPIRED if problem is not None and ref["uri"] in expired else problem
    totals = {"deliveries": 0, "events": 0}
    for job_id in sorted(by_job):
        entry = by_job[job_id]
        items = sorted(entry["events"].values(),
                       key=lambda e: (e["at"] if e["at"] is not None else 0, e["topic"], e["partition"],
                                      e["position"], e["event"]["event_id"]))
        first_at = items[0]["at"]
        if from_ms is not None and (first_at is None or first_at < from_ms):
            continue
        if to_ms is not None and (first_at is None or first_at >= to_ms):
            continue
        found: list[dict] = []

        def violation(kind: str, detail: str, where: str = "") -> None:
            found.append({"job_id": job_id, "kind": kind, "detail": detail, "where": where})

        # terminal events
        terminals = [e for e in items if is_terminal(e["topic"], e["event"])]
        if len(terminals) > 1:
            violation("terminal", "more than one terminal event: " + "; ".join(
                f"{_describe(e['topic'], e['event'])} at {e['where']}" for e in terminals),
                terminals[1]["where"])
        elif not terminals and require_terminal:
            violation("unfinished", "no terminal event (published, flagged, failed or cancelled)")
        # one request per job id: a second one asking something else reused an Idempotency-Key across gateways
        requests = sorted((e for e in items if e["topic"] == topics.REQUESTED.name),
                          key=lambda e: (e["partition"], e["position"]))
        for e in requests[1:]:
            if request_fingerprint(e["event"]) != request_fingerprint(requests[0]["event"]):
                violation("request", "a second VideoRequested of the job asks for something else (prompt "
                                     f"{str(e['event'].get('prompt'))[:60]!r}); the first one is the job's", e["where"])
        outcome = (_OUTCOME[terminals[0]["topic"]] if len(terminals) == 1 else
                   "conflicting" if terminals else "unfinished")
        outcomes[outcome] += 1
        # steps within an attempt, in log order
        steps: dict[int, list[dict]] = defaultdict(list)
        for e in sorted((e for e in items if e["topic"] == topics.STEP_PROGRESS.name),
                        key=lambda e: (e["partition"], e["position"])):
            steps[e["event"].get("attempt", 1)].append(e)
        checkpoints = [(e["event"].get("attempt", 1), e["event"]["step"]) for e in items
                       if e["topic"] == topics.LATENT_CHECKPOINTED.name]
        for attempt in sorted(steps):
            previous = None
            for e in steps[attempt]:
                if previous is not None and e["event"]["step"] <= previous["event"]["step"]:
                    violation("steps", f"attempt {attempt}: step {e['event']['step']} after step "
                                       f"{previous['event']['step']}", e["where"])
                previous = e
            resumed = sorted({e["event"]["resumed_from_step"] for e in steps[attempt]
                              if e["event"].get("resumed_from_step") is not None})
            for step in resumed:
                if not any(a < attempt and s == step for a, s in checkpoints):
                    first = next(e for e in steps[attempt] if e["event"].get("resumed_from_step") == step)
                    violation("resume", f"attempt {attempt} resumed from step {step}, but no earlier attempt "
                                        f"checkpointed step {step}", first["where"])
        # publication
        published = [e for e in items if e["topic"] == topics.PUBLISHED.name]
        last_segments = [e for e in items if e["topic"] == topics.DECODED.name and e["event"].get("is_last")]
        for p in published:
            if not any(s["at"] is not None and p["at"] is not None and s["at"] <= p["at"] for s in last_segments):
                violation("publish-order", "published before the last segment was decoded"
                          if last_segments else "published without a last decoded segment", p["where"])
            ending_flags = [e for e in items if e["topic"] == topics.FLAGGED.name
                            and is_terminal(e["topic"], e["event"])]
            if ending_flags:
                flag = ending_flags[0]
                violation("flagged-published", f"published although flagged ({_describe(flag['topic'], flag['event'])}"
                                               f" at {flag['where']})", p["where"])
        # blobs
        if blobs is not None:
            for e in items:
                event = e["event"]
                if e["topic"] == topics.DECODED.name and not event.get("is_last") and event.get("playlist"):
                    # The live HLS playlist grows in place at a stable URL (players reload it), so an earlier
                    # segment's reference to it is stale by design: it must exist, its hash is not checked.
                    problem = check_blob(event["playlist"])
                    if problem is not None and (problem == "missing" or problem.startswith("unreadable")):
                        violation("blob", f"{event['playlist']['uri']}: {problem}", e["where"])
                    event = {k: v for k, v in event.items() if k != "playlist"}
                for ref in blob_refs(event):
                    key = (ref["uri"], ref["sha256"], ref["bytes"])
                    checked_blobs.add(key)
                    problem = check_blob(ref)
                    if problem == EXPIRED:
                        expired_blobs.add(key)
                    elif problem is not None:
                        bad_blobs.add(key)
                        violation("blob", f"{ref['uri']}: {problem}", e["where"])
        found = _unique(found)
        violations += found
        totals["deliveries"] += entry["deliveries"]
        totals["events"] += len(items)
        job_report = {
            "outcome": outcome, "events": len(items), "deliveries": entry["deliveries"],
            "first_at": first_at, "last_at": items[-1]["at"],
            "attempts": {str(a): {"steps": len(steps[a]), "last_step": steps[a][-1]["event"]["step"],
                                  "resumed_from_step": steps[a][0]["event"].get("resumed_from_step")}
                         for a in sorted(steps)},
            "terminal": [{"topic": e["topic"], "event_id": e["event"]["event_id"], "at": e["at"], "where": e["where"]}
                         for e in terminals],
            "violations": [{k: v[k] for k in ("kind", "detail", "where")} for v in found],
        }
        if timeline:
            job_report["timeline"] = [{"at": e["at"], "what": _describe(e["topic"], e["event"]), "where": e["where"]}
                                      for e in items]
        jobs[job_id] = job_report
    violations.sort(key=lambda v: (v["job_id"], v["kind"], v["where"], v["detail"]))
    undecodable = sorted(undecodable)
    report = {
        "source": source,
        "window": {"from_ms": from_ms, "to_ms": to_ms, "job": job, "require_terminal": require_terminal},
        "summary": {
            "jobs": len(jobs), "events": totals["events"], "deliveries": totals["deliveries"],
            "duplicates": totals["deliveries"] - totals["events"], "violations": len(violations),
            "by_kind": dict(sorted(_count(v["kind"] for v in violations).items())),
            "outcomes": dict(sorted(outcomes.items())),
            "blobs": {"checked": len(checked_blobs), "bad": len(bad_blobs), "expired": len(expired_blobs),
                      "skipped": blobs is None},
            "undecodable": len(undecodable),
        },
        "undecodable": undecodable,
        "violations": violations,
        "jobs": jobs,
    }
    return AuditReport(report)


def _unique(items: list[dict]) -> list[dict]:
    out, seen = [], set()
    for item in items:
        key = json.dumps(item, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _count(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for v in values:
        counts[v] += 1
    return counts


def parse_time(text: str | None) -> int | None:
    """Epoch milliseconds from epoch ms digits or an ISO 8601 time (UTC when it names no zone)."""
    if text is None or text == "":
        return None
    if text.lstrip("-").isdigit():
        return int(text)
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return epoch_ms(value)


def main_replay(argv: list[str] | None = None) -> int:
    """`vidgen audit replay`: 0 when every invariant holds, 1 on any violation, 2 when the log cannot be read."""
    parser = argparse.ArgumentParser(prog="vidgen audit replay",
                                     description="rebuild every job's timeline and check the platform's invariants")
    parser.add_argument("--source", choices=("kafka", "archive"), default="kafka")
    parser.add_argument("--archive", help="archive directory (default: VIDGEN_ARCHIVE_DIR or <var>/archive)")
    parser.add_argument("--from", dest="from_", metavar="TIME", help="jobs whose first event is at or after "
                                                                     "TIME (ISO 8601 or epoch ms)")
    parser.add_argument("--to", metavar="TIME", help="jobs whose first event is before TIME")
    parser.add_argument("--job", help="only this job")
    parser.add_argument("--report", help="where the JSON report goes (default <var>/audit/replay-<source>.json; "
                                         "'-' for stdout)")
    parser.add_argument("--no-require-terminal", dest="require_terminal", action="store_false",
                        help="a job without a terminal event is not a violation (an open window)")
    parser.add_argument("--no-blobs", dest="check_blobs", action="store_false", help="skip the blob checks")
    parser.add_argument("--no-timeline", dest="timeline", action="store_false",
                        help="leave the per-job timelines out of the report")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to read Kafka to its end")
    args = parser.parse_args(argv)
    try:
        from_ms, to_ms = parse_time(args.from_), parse_time(args.to)
    except ValueError as exc:
        parser.error(f"bad time: {exc}")

    from streams.blobs import BlobStoreUnavailable, open_blob_store
    from streams.settings import SettingsError, load_settings

    from .archiver import archive_settings

    settings = load_settings()
    undecodable: list[str] = []
    try:
        if args.source == "kafka":
            events = list(kafka_events(settings, timeout_s=args.timeout, undecodable=undecodable))
        else:
            directory = Path(args.archive) if args.archive else archive_settings(settings).dir
            if not directory.is_dir():
                print(f"no archive at {directory}", file=sys.stderr)
                return 2
            codec = None
            if settings.schema_registry_url:
                from streams.serde import event_codec

                codec = event_codec(settings)
            events = list(archive_events(directory, ArchiveDecoder(directory, codec), undecodable=undecodable))
    except (SettingsError, TimeoutError, OSError) as exc:
        print(f"cannot read the log: {exc}", file=sys.stderr)
        return 2
    checker = BlobChecker(open_blob_store(settings)) if args.check_blobs else None
    try:
        report = replay(events, checker, job=args.job, from_ms=from_ms, to_ms=to_ms,
                        require_terminal=args.require_terminal, timeline=args.timeline, source=args.source,
                        undecodable=undecodable)
    except BlobStoreUnavailable as exc:
        print(f"cannot check the blobs: {exc}", file=sys.stderr)
        return 2
    text = report.to_json()
    if args.report == "-":
        sys.stdout.write(text)
    else:
        path = Path(args.report) if args.report else settings.var_dir / "audit" / f"replay-{args.source}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"report: {path}")
    print(report.summary())
    return 0 if report.ok else 1
