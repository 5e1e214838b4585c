"""Archive retention: how long the archive keeps each topic family, applied without breaking the hash chains.

Policy. ``Topic.archive_retention_ms`` (streams/topics.py) is each topic's default (None: kept until deleted —
lifecycle events and publications; the chatter of running jobs goes after days). ``VIDGEN_ARCHIVE_RETENTION``
overrides it: comma-separated ``PATTERN=DURATION`` entries, PATTERN a topic name or an fnmatch glob
(``vidgen.encoded.*``), DURATION ``<number>s|m|h|d`` or ``forever``; later entries win (``retention_policy``).

Applying it (``apply_retention``) removes whole container files from the *front* of a partition's file series: a
file goes when its newest record is older than the retention, and only while every file before it goes too (the
newest file of a series and the file HEAD.json names always stay). So what remains is always a suffix of the chain.

How verification stays intact. Before a prefix is deleted, its records are checked (digests, chain links, file
links) from where the series starts — genesis or the previous anchor — and the anchor ``<series>/RETENTION.json``
is written (atomically, fsynced): the name, epoch and last offset of the last removed file, the chain hash of its
last record (which is the next kept file's ``prev_chain`` header) and cumulative counts. ``vidgen audit verify``
then starts the partition's chain at the anchor instead of ``genesis``: every kept record is still checked digest
by digest and link by link, a file removed beyond the anchor is still reported as missing, and the heads (the
newest chain hashes, and any copy of them kept elsewhere) do not change. Verify reports an anchor whose chain does
not match the first kept file, and an anchor on a topic the policy keeps forever (a removal the policy does not
allow). A crash after the anchor is written and before every file is deleted leaves files the anchor already
counts as removed: verify skips them and the next application deletes them.

``archive_usage``/``format_usage`` give the archive's size from ``stat`` alone, for ``vidgen up``.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import fastavro

from streams import topics

from .archiver import (SCHEMAS_DIR, _fsync_dir, _write_atomic, chain_next, file_meta, genesis,
                       parse_file_name, read_file, read_head, record_digest, series_dirs, series_files)

log = logging.getLogger(__name__)

RETENTION_FILE = "RETENTION.json"
ENV = "VIDGEN_ARCHIVE_RETENTION"
_UNITS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_ANCHOR_FIELDS = {"topic": str, "partition": int, "removed_files": int, "removed_records": int,
                  "last_removed_file": str, "last_removed_epoch": int, "last_removed_offset": int, "chain": str,
                  "newest_removed_timestamp": int, "retention_ms": int, "applied_at": int}


# -- the policy -------------------------------------------------------------------------------------------------------
def parse_duration(text: str) -> int | None:
    """Milliseconds from ``<number>s|m|h|d``; None for ``forever``. ValueError otherwise."""
    text = text.strip()
    if text.lower() == "forever":
        return None
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"bad duration {text!r}: expected <number> with a unit s, m, h or d (e.g. 7d), or forever")
    return int(float(match.group(1)) * _UNITS_MS[match.group(2)])


def retention_policy(environ: dict | None = None) -> dict[str, int | None]:
    """Topic name → how long the archive keeps its records, in ms (None: forever), for every archived topic."""
    env = os.environ if environ is None else environ
    policy = {t.name: t.archive_retention_ms for t in topics.ARCHIVED}
    for entry in (env.get(ENV) or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        pattern, sep, duration = (part.strip() for part in entry.partition("="))
        if not sep or not pattern:
            raise ValueError(f"{ENV}: bad entry {entry!r}: expected PATTERN=DURATION, e.g. vidgen.stats=1d")
        try:
            retention = parse_duration(duration)
        except ValueError as exc:
            raise ValueError(f"{ENV}: bad entry {entry!r}: {exc}") from None
        matched = [name for name in policy if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"{ENV}: bad entry {entry!r}: {pattern!r} matches no archived topic")
        for name in matched:
            policy[name] = retention
    return policy


# -- the anchor -------------------------------------------------------------------------------------------------------
def read_retention_anchor(series_dir: Path) -> dict | None:
    """A series' RETENTION.json (None: nothing was ever removed from it); ValueError when it is malformed."""
    path = Path(series_dir) / RETENTION_FILE
    try:
        anchor = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable: {exc}") from None
    if not isinstance(anchor, dict):
        raise ValueError(f"{path}: not a JSON object")
    for name, kind in _ANCHOR_FIELDS.items():
        if not isinstance(anchor.get(name), kind) or isinstance(anchor.get(name), bool):
            raise ValueError(f"{path}: field {name!r} missing or not {kind.__name__}")
    if parse_file_name(anchor["last_removed_file"]) is None:
        raise ValueError(f"{path}: last_removed_file {anchor['last_removed_file']!r} is not a container file name")
    try:
        if len(bytes.fromhex(anchor["chain"])) != 32:
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}: chain is not a sha256 in hex") from None
    return anchor


def removed_by_anchor(path: Path, anchor: dict | None) -> bool:
    """Whether the anchor counts this container file as removed (it is still there after a crash)."""
    return anchor is not None and parse_file_name(Path(path).name) <= parse_file_name(anchor["last_removed_file"])


def kept_files(files: list[Path], anchor: dict | None) -> list[Path]:
    """The files of a series (``series_files``) that the anchor does not count as removed, in chain order."""
    return [p for p in files if not removed_by_anchor(p, anchor)]


def live_files(series_dir: Path) -> list[Path]:
    """A series' files that still hold records of the archive: those retention has not removed, in chain order."""
    return kept_files(series_files(series_dir), read_retention_anchor(series_dir))


# -- applying it ------------------------------------------------------------------------------------------------------
def apply_retention(root: Path, policy: dict[str, int | None], now_ms: int) -> list[dict]:
    """Remove, per series of a topic with a retention, the front files whose newest record is older than
    ``now_ms - retention``; anchor first, then delete. One dict per series changed: topic, partition, files,
    records, bytes (files left by an interrupted application count in files and bytes, not again in records)."""
    changed = []
    for topic, partition, series_dir in series_dirs(Path(root)):
        retention = policy.get(topic)
        if retention is None:
            continue
        try:
            removed = _apply_series(topic, partition, series_dir, retention, now_ms)
        except ValueError as exc:  # a malformed anchor: leave the series for `vidgen audit verify` to report
            log.error("archive retention: %s/%s left alone: %s", topic, partition, exc)
            continue
        if removed is not None:
            changed.append(removed)
    return changed


def _apply_series(topic: str, partition: int, series_dir: Path, retention_ms: int, now_ms: int) -> dict | None:
    anchor = read_retention_anchor(series_dir)
    files = series_files(series_dir)
    leftovers = [p for p in files if removed_by_anchor(p, anchor)]
    files = files[len(leftovers):]
    head = read_head(series_dir) or {}
    cutoff = now_ms - retention_ms
    state = {"removed_files": 0, "removed_records": 0, "newest_removed_timestamp": -1, "last_removed_file": ""}
    if anchor is not None:
        state = {k: anchor[k] for k in state}
    before = state["removed_records"]
    chain = genesis(topic, partition) if anchor is None else bytes.fromhex(anchor["chain"])
    going: list[tuple[Path, dict]] = []  # (file, the anchor's fields once it is removed)
    for path in files[:-1]:  # never the newest
        if path.name == head.get("file"):
            break
        meta, records, _end, error = read_file(path)
        if error is not None or not records or (meta["topic"], meta["partition"]) != (topic, partition):
            log.warning("archive retention: %s stays: unreadable or empty (%s)", path, error)
            break
        newest = max(r["timestamp"] for r in records)
        if newest >= cutoff:
            break
        end = _chain_end(chain, records)
        if (meta["prev_file"], meta["prev_chain"]) != (state["last_removed_file"], chain.hex()) or end is None:
            log.warning("archive retention: %s stays: it does not verify from %s", path,
                        state["last_removed_file"] or "the series' start")
            break
        chain = end
        state = {"removed_files": state["removed_files"] + 1,
                 "removed_records": state["removed_records"] + len(records),
                 "newest_removed_timestamp": max(newest, state["newest_removed_timestamp"]),
                 "chain": end.hex(), "last_removed_file": path.name, "last_removed_epoch": meta["epoch"],
                 "last_removed_offset": records[-1]["offset"]}
        going.append((path, state))
    # The first kept file must name the last removed one and its chain, or the anchor would not link to it.
    while going and not _links(files[len(going)], going[-1][1]):
        log.warning("archive retention: %s stays: %s does not link to it", going[-1][0], files[len(going)].name)
        going.pop()
    if not going and not leftovers:
        return None
    if going:
        _write_atomic(series_dir / RETENTION_FILE, json.dumps(
            {"topic": topic, "partition": partition, **going[-1][1], "retention_ms": retention_ms,
             "applied_at": now_ms}, sort_keys=True).encode())
    gone = leftovers + [path for path, _ in going]
    size = 0
    for path in gone:
        try:
            size += path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            pass
    _fsync_dir(series_dir)
    records = going[-1][1]["removed_records"] - before if going else 0
    log.info("archive retention: %s/%s: removed %d files (%d records, %d bytes)", topic, partition, len(gone),
             records, size)
    return {"topic": topic, "partition": partition, "files": len(gone), "records": records, "bytes": size}


def _chain_end(chain: bytes, records: list[dict]) -> bytes | None:
    """The chain hash after ``records`` when each one's digest and link verify from ``chain``; None otherwise."""
    for record in records:
        digest = record_digest(record)
        if digest != record["digest"] or chain_next(chain, digest) != record["chain"]:
            return None
        chain = bytes(record["chain"])
    return chain


def _links(path: Path, anchor: dict) -> bool:
    """Whether a container file's header links to the anchor (read from the header alone)."""
    try:
        with open(path, "rb") as fo:
            meta = file_meta(dict(fastavro.block_reader(fo).metadata))
    except Exception:  # noqa: BLE001 - an unreadable header links to nothing
        return False
    return (meta["prev_file"], meta["prev_chain"], meta["prev_last_offset"]) == (
        anchor["last_removed_file"], anchor["chain"], anchor["last_removed_offset"])


# -- size -------------------------------------------------------------------------------------------------------------
def archive_usage(root: Path) -> dict:
    """The archive's size from stat alone: bytes (every file under it), container files, series, and
    oldest_timestamp_ms — the last write of its oldest container file (its first record is at most one rotation
    older), None when there is none."""
    usage = {"bytes": 0, "files": 0, "series": 0, "oldest_timestamp_ms": None}
    root = Path(root)
    schemas = root / SCHEMAS_DIR
    for directory in [d for _t, _p, d in series_dirs(root)] + ([schemas] if schemas.is_dir() else []):
        usage["series"] += directory != schemas
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    stat = entry.stat(follow_symlinks=False)
                    usage["bytes"] += stat.st_size
                    if directory != schemas and parse_file_name(entry.name) is not None:
                        usage["files"] += 1
                        mtime_ms = stat.st_mtime_ns // 1_000_000
                        if usage["oldest_timestamp_ms"] is None or mtime_ms < usage["oldest_timestamp_ms"]:
                            usage["oldest_timestamp_ms"] = mtime_ms
        except FileNotFoundError:  # removed (by retention) while it was counted: what it held is gone
            continue
    return usage


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_usage(usage: dict) -> str:
    """One line for `vidgen up`, e.g. ``archive: 1.2 GB in 345 files over 80 partitions``."""
    files, series = usage["files"], usage["series"]
    line = (f"archive: {_size(usage['bytes'])} in {files} file{'s' * (files != 1)} over {series} "
            f"partition{'s' * (series != 1)}")
    if usage.get("oldest_timestamp_ms") is not None:
        oldest = datetime.fromtimestamp(usage["oldest_timestamp_ms"] / 1000, tz=timezone.utc)
        line += f", oldest file from {oldest:%Y-%m-%d %H:%M} UTC"
    return line
