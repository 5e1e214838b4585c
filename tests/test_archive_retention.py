"""Archive retention: old files leave the front of a series behind an anchor, `vidgen audit verify` still checks
every kept record from that anchor, and what retention did not do (a file removed by hand, an edited anchor, a
removal the policy does not allow) is still reported. Also the policy's parsing and the archive's size."""
from __future__ import annotations

import json
import os

import fastavro
import pytest

from consumers.archive_retention import (RETENTION_FILE, apply_retention, archive_usage, format_usage, kept_files,
                                         read_retention_anchor, retention_policy)
from consumers.archiver import HEAD_FILE, PARSED_SCHEMA, ArchiveSettings, ArchiveWriter, file_meta, series_files
from consumers.audit import main_verify, verify_archive
from streams import topics
from tests.test_archive import rewrite

TOPIC = "vidgen.step-progress"  # kept 7 days by default
FOREVER = "vidgen.published"  # kept until deleted
DAY = 24 * 3600 * 1000
T0 = 1_700_000_000_000
PER_DAY = 5
POLICY = {TOPIC: 3 * DAY, FOREVER: None}


def write_days(root, days=10, topic=TOPIC, partitions=(0,), first_day=0, first_offset=0, value=b"v"):
    """One container file per day and partition (each writer, like each archiver process, opens new files):
    PER_DAY records a day, timestamps T0 + day + n ms, offsets counting on from first_offset."""
    for day in range(first_day, first_day + days):
        writer = ArchiveWriter(ArchiveSettings(root))
        for n in range(PER_DAY):
            offset = first_offset + (day - first_day) * PER_DAY + n
            for p in partitions:
                writer.append(topic, p, offset, T0 + day * DAY + n, 1, b"job", value + b"%d" % offset)
        writer.close()


def series(root, topic=TOPIC, partition=0):
    return root / topic / str(partition)


def header(path):
    with open(path, "rb") as fo:
        return file_meta(dict(fastavro.block_reader(fo).metadata))


def anchor_of(root, topic=TOPIC, partition=0):
    return json.loads((series(root, topic, partition) / RETENTION_FILE).read_text())


def test_old_files_go_the_newest_stay_and_the_archive_still_verifies(tmp_path):
    write_days(tmp_path, partitions=(0, 1))
    files = series_files(series(tmp_path))
    assert len(files) == 10
    before = verify_archive(tmp_path, POLICY)
    assert before.ok, before.problems
    sizes = sum(p.stat().st_size for p in files[:7])
    # cut-off T0 + 7 days: days 0-6 hold only older records, day 7 starts exactly at it and stays
    changed = apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY)
    assert changed == [{"topic": TOPIC, "partition": p, "files": 7, "records": 7 * PER_DAY, "bytes": sizes}
                       for p in (0, 1)]
    assert series_files(series(tmp_path)) == files[7:]
    anchor = anchor_of(tmp_path)
    assert anchor == {
        "topic": TOPIC, "partition": 0, "removed_files": 7, "removed_records": 35, "last_removed_file": files[6].name,
        "last_removed_epoch": 0, "last_removed_offset": 34, "chain": header(files[7])["prev_chain"],
        "newest_removed_timestamp": T0 + 6 * DAY + PER_DAY - 1, "retention_ms": 3 * DAY, "applied_at": T0 + 10 * DAY,
    }
    assert read_retention_anchor(series(tmp_path)) == anchor
    after = verify_archive(tmp_path, POLICY)
    assert after.ok, after.problems
    assert after.records == 2 * 3 * PER_DAY and after.files == 6
    assert after.heads == before.heads  # the newest chain hashes (and copies kept elsewhere) still hold
    assert after.retained[f"{TOPIC}/0"] == {"removed_files": 7, "removed_records": 35,
                                            "last_removed_file": files[6].name, "last_removed_epoch": 0,
                                            "last_removed_offset": 34, "leftover_files": 0}
    assert after.to_dict()["retained"] == after.retained and set(before.to_dict()) == {
        "ok", "files", "records", "problems", "heads", "retained"}


def test_applying_twice_is_cumulative_and_still_verifies(tmp_path):
    write_days(tmp_path)
    files = series_files(series(tmp_path))
    newest_of_day_4 = T0 + 4 * DAY + PER_DAY - 1
    # a file goes only when its newest record is strictly older than the cut-off
    assert [c["files"] for c in apply_retention(tmp_path, POLICY, now_ms=newest_of_day_4 + 3 * DAY)] == [4]
    assert verify_archive(tmp_path, POLICY).ok
    assert [c["files"] for c in apply_retention(tmp_path, POLICY, now_ms=newest_of_day_4 + 3 * DAY + 1)] == [1]
    assert anchor_of(tmp_path)["removed_records"] == 5 * PER_DAY
    assert verify_archive(tmp_path, POLICY).ok
    changed = apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY)
    assert [(c["files"], c["records"]) for c in changed] == [(2, 2 * PER_DAY)]
    anchor = anchor_of(tmp_path)
    assert (anchor["removed_files"], anchor["removed_records"], anchor["last_removed_file"]) == (
        7, 7 * PER_DAY, files[6].name)
    assert anchor["applied_at"] == T0 + 10 * DAY
    result = verify_archive(tmp_path, POLICY)
    assert result.ok, result.problems
    assert apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY) == []  # nothing more is old enough


def test_the_newest_file_and_the_file_head_names_always_stay(tmp_path):
    write_days(tmp_path)
    files = series_files(series(tmp_path))
    apply_retention(tmp_path, POLICY, now_ms=T0 + 1000 * DAY)
    assert series_files(series(tmp_path)) == files[-1:]
    assert verify_archive(tmp_path, POLICY).ok

    write_days(tmp_path / "b")
    files = series_files(series(tmp_path / "b"))
    head_path = series(tmp_path / "b") / HEAD_FILE
    head = json.loads(head_path.read_text())
    # HEAD naming an older file (its newest record): that file and every one after it stay
    last_of_day_5 = [r for r in fastavro.reader(open(files[5], "rb"))][-1]
    head_path.write_text(json.dumps(dict(head, file=files[5].name, last_offset=last_of_day_5["offset"],
                                         chain=last_of_day_5["chain"].hex())))
    apply_retention(tmp_path / "b", POLICY, now_ms=T0 + 1000 * DAY)
    assert series_files(series(tmp_path / "b")) == files[5:]

    write_days(tmp_path / "c")  # the newest file stays also when HEAD names none (a file of the archiver's in flight)
    files = series_files(series(tmp_path / "c"))
    (series(tmp_path / "c") / HEAD_FILE).unlink()
    apply_retention(tmp_path / "c", POLICY, now_ms=T0 + 1000 * DAY)
    assert series_files(series(tmp_path / "c")) == files[-1:]


def test_a_topic_kept_forever_or_outside_the_policy_is_untouched(tmp_path):
    write_days(tmp_path, topic=FOREVER)
    write_days(tmp_path, topic="vidgen.requested")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert apply_retention(tmp_path, POLICY, now_ms=T0 + 1000 * DAY) == []  # requested: not in this policy
    assert apply_retention(tmp_path, retention_policy({}), now_ms=T0 + 1000 * DAY) == []  # both kept forever
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.rglob(RETENTION_FILE))


def test_a_file_removed_by_hand_beyond_the_anchor_is_reported(tmp_path):
    write_days(tmp_path)
    apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY)
    first_kept = series_files(series(tmp_path))[0]
    first_kept.unlink()  # the anchor still ends at day 6
    result = verify_archive(tmp_path, POLICY)
    assert not result.ok
    assert len(result.problems) == 1, result.problems
    assert f"chain broken: file {first_kept.name} is missing" in result.problems[0]
    assert result.problems[0].startswith(f"{TOPIC}/0@{8 * PER_DAY - 1}:")


def test_removing_every_kept_file_is_reported_even_without_head(tmp_path):
    write_days(tmp_path, days=3)
    apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY)
    for path in series_files(series(tmp_path)):
        path.unlink()
    (series(tmp_path) / HEAD_FILE).unlink()
    result = verify_archive(tmp_path, POLICY)
    assert result.problems == [f"{TOPIC}/0@{2 * PER_DAY - 1}: removed: {2 * PER_DAY} records up to offset "
                               f"{2 * PER_DAY - 1} were removed by retention ({RETENTION_FILE}), and every file "
                               f"after them is missing"]


@pytest.mark.parametrize("field, value", [("chain", "00" * 32), ("last_removed_offset", 3),
                                          ("last_removed_file", "000000-00000000000000000005.avro")])
def test_an_edited_anchor_is_reported(tmp_path, field, value):
    write_days(tmp_path)
    apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY)
    path = series(tmp_path) / RETENTION_FILE
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **{field: value})))
    result = verify_archive(tmp_path, POLICY)
    assert not result.ok
    assert any(": chain broken: " in p and "retention" in p for p in result.problems), result.problems


def test_a_malformed_anchor_is_reported_and_left_alone(tmp_path):
    write_days(tmp_path)
    apply_retention(tmp_path, POLICY, now_ms=T0 + 8 * DAY)
    path = series(tmp_path) / RETENTION_FILE
    anchor = anchor_of(tmp_path)
    del anchor["removed_records"]
    path.write_text(json.dumps(anchor))
    with pytest.raises(ValueError, match="removed_records"):
        read_retention_anchor(series(tmp_path))
    kept = series_files(series(tmp_path))
    assert apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY) == []
    assert series_files(series(tmp_path)) == kept
    problems = verify_archive(tmp_path, POLICY).problems
    assert f"{TOPIC}/0: altered: {path}: field 'removed_records' missing or not int" in problems


def test_an_anchor_the_policy_does_not_allow_is_reported(tmp_path, monkeypatch):
    write_days(tmp_path)
    apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY)
    assert verify_archive(tmp_path, {TOPIC: None}).problems == [
        f"{TOPIC}/0@34: removed: 35 records up to offset 34 were removed by retention ({RETENTION_FILE}), but the "
        f"retention policy keeps {TOPIC} forever"]
    # the default policy is the environment's
    monkeypatch.setenv("VIDGEN_ARCHIVE_RETENTION", f"{TOPIC}=forever")
    assert len(verify_archive(tmp_path).problems) == 1
    monkeypatch.delenv("VIDGEN_ARCHIVE_RETENTION")
    assert verify_archive(tmp_path).ok
    # so is a policy that cannot be read
    monkeypatch.setenv("VIDGEN_ARCHIVE_RETENTION", "vidgen.nothing=1d")
    assert [p.split(":")[0] for p in verify_archive(tmp_path).problems] == ["retention policy"]


def test_a_crash_between_the_anchor_and_the_deletion(tmp_path):
    write_days(tmp_path)
    files = series_files(series(tmp_path))
    kept_bytes = {p: p.read_bytes() for p in files[:7]}
    apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY)
    anchor = anchor_of(tmp_path)
    for path in files[4:7]:  # the anchor was written, three of the seven deletions never happened
        path.write_bytes(kept_bytes[path])
    assert kept_files(series_files(series(tmp_path)), anchor) == files[7:]
    result = verify_archive(tmp_path, POLICY)
    assert result.ok, result.problems
    assert result.files == 3 and result.retained[f"{TOPIC}/0"]["leftover_files"] == 3
    changed = apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY)  # finishes the job, counts nothing twice
    assert [(c["files"], c["records"]) for c in changed] == [(3, 0)]
    assert series_files(series(tmp_path)) == files[7:]
    assert anchor_of(tmp_path) == anchor
    assert verify_archive(tmp_path, POLICY).ok


def test_a_damaged_old_file_is_not_removed_out_of_sight(tmp_path):
    write_days(tmp_path)
    files = series_files(series(tmp_path))

    def alter(records):
        records[1]["value"] = b"tampered"
        return records

    rewrite(files[2], alter)
    changed = apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY)
    assert [c["files"] for c in changed] == [2]  # days 0 and 1; the altered day 2 stops it
    assert series_files(series(tmp_path)) == files[2:]
    problems = verify_archive(tmp_path, POLICY).problems
    assert problems == [f"{TOPIC}/0@{2 * PER_DAY + 1}: altered: the record's content does not match its digest "
                        f"({files[2].name})"]


def test_a_file_is_not_removed_when_the_next_one_does_not_link_to_it(tmp_path):
    write_days(tmp_path)
    files = series_files(series(tmp_path))
    with open(files[7], "rb") as fo:
        reader = fastavro.reader(fo)
        metadata = {k: v for k, v in reader.metadata.items() if not k.startswith("avro.")}
        records = list(reader)
    metadata["vidgen.archive.prev_chain"] = "11" * 32
    with open(files[7], "wb") as fo:
        fastavro.writer(fo, PARSED_SCHEMA, records, metadata=metadata)
    before = verify_archive(tmp_path, POLICY).problems
    assert before and "chain broken" in before[0] and files[7].name in before[0], before
    changed = apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY)
    assert [c["files"] for c in changed] == [6]  # day 6 stays: its successor does not name its chain
    assert series_files(series(tmp_path)) == files[6:]
    assert verify_archive(tmp_path, POLICY).problems == before


def test_retention_across_a_new_epoch(tmp_path):
    write_days(tmp_path, days=3)
    write_days(tmp_path, days=3, first_day=3, value=b"after-reset")  # offsets begin again at 0: epoch 1
    files = series_files(series(tmp_path))
    assert [p.name[:6] for p in files] == ["000000"] * 3 + ["000001"] * 3
    apply_retention(tmp_path, POLICY, now_ms=T0 + 6 * DAY)  # days 0-2: all of epoch 0
    anchor = anchor_of(tmp_path)
    assert (anchor["last_removed_epoch"], anchor["last_removed_offset"]) == (0, 3 * PER_DAY - 1)
    assert verify_archive(tmp_path, POLICY).ok, verify_archive(tmp_path, POLICY).problems
    apply_retention(tmp_path, POLICY, now_ms=T0 + 7 * DAY)  # and day 3, the first of epoch 1, whose offsets are 0-4
    anchor = anchor_of(tmp_path)
    assert (anchor["last_removed_epoch"], anchor["last_removed_offset"], anchor["removed_records"]) == (
        1, PER_DAY - 1, 4 * PER_DAY)
    assert series_files(series(tmp_path)) == files[4:]
    assert verify_archive(tmp_path, POLICY).ok, verify_archive(tmp_path, POLICY).problems


def test_vidgen_audit_verify_prints_what_retention_removed(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VIDGEN_ARCHIVE_RETENTION", raising=False)
    write_days(tmp_path)
    apply_retention(tmp_path, POLICY, now_ms=T0 + 10 * DAY)
    assert main_verify(["--archive", str(tmp_path)]) == 0
    assert f"retention {TOPIC}/0: 35 records in 7 files removed up to offset 34 (epoch 0)" in capsys.readouterr().out
    assert main_verify(["--archive", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["retained"][f"{TOPIC}/0"]["removed_records"] == 35


# -- the policy -------------------------------------------------------------------------------------------------------
def test_the_default_policy_comes_from_the_topics():
    policy = retention_policy({})
    assert set(policy) == {t.name for t in topics.ARCHIVED}
    assert policy[TOPIC] == 7 * DAY and policy["vidgen.stats"] == DAY and policy["vidgen.tracker-events"] == 7 * DAY
    assert policy[FOREVER] is None and policy["vidgen.requested"] is None


def test_overrides_with_globs_units_forever_and_later_entries_winning():
    policy = retention_policy({"VIDGEN_ARCHIVE_RETENTION":
                               " vidgen.encoded.*=2h, vidgen.stats=90s,,vidgen.agents=1.5m, vidgen.published=30d,"
                               f"vidgen.step-*=forever, vidgen.latent-*=1d, vidgen.latent-chunks=12h"})
    assert [policy[f"vidgen.encoded.{tier}"] for tier in topics.TIERS] == [2 * 3600 * 1000] * 3
    assert (policy["vidgen.stats"], policy["vidgen.agents"]) == (90_000, 90_000)
    assert policy[FOREVER] == 30 * DAY and policy[TOPIC] is None
    assert (policy["vidgen.latent-checkpointed"], policy["vidgen.latent-chunks"]) == (DAY, 12 * 3600 * 1000)
    assert policy["vidgen.queue"] == DAY  # untouched defaults stay
    assert retention_policy({"VIDGEN_ARCHIVE_RETENTION": "vidgen.stats=FOREVER"})["vidgen.stats"] is None


@pytest.mark.parametrize("entry", ["vidgen.stats", "vidgen.stats=", "=1d", "vidgen.stats=7", "vidgen.stats=7w",
                                   "vidgen.stats=-1d", "vidgen.stats=1d=2d", "vidgen.nope=1d", "vidgen.nope.*=1d"])
def test_a_bad_entry_is_named(entry):
    with pytest.raises(ValueError) as caught:
        retention_policy({"VIDGEN_ARCHIVE_RETENTION": f"vidgen.queue=1h,{entry}"})
    assert repr(entry) in str(caught.value) and "VIDGEN_ARCHIVE_RETENTION" in str(caught.value)


# -- size -------------------------------------------------------------------------------------------------------------
def test_archive_usage_from_stat_alone(tmp_path, monkeypatch):
    write_days(tmp_path, days=3, partitions=(0, 1, 2))
    (tmp_path / "_schemas").mkdir()
    (tmp_path / "_schemas" / "1.json").write_text("{}")
    containers = sorted(tmp_path.rglob("*.avro"))
    os.utime(containers[4], ns=(0, (T0 - DAY) * 1_000_000))
    monkeypatch.setattr("consumers.archiver.read_file", lambda *a: pytest.fail("usage read a file"))
    usage = archive_usage(tmp_path)
    every_byte = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert usage == {"bytes": every_byte, "files": 9, "series": 3, "oldest_timestamp_ms": T0 - DAY}
    assert format_usage(usage) == (f"archive: {every_byte / 1000:.1f} kB in 9 files over 3 partitions, oldest file "
                                   f"from 2023-11-13 22:13 UTC")
    empty = archive_usage(tmp_path / "nothing")
    assert empty == {"bytes": 0, "files": 0, "series": 0, "oldest_timestamp_ms": None}
    assert format_usage(empty) == "archive: 0 B in 0 files over 0 partitions"


@pytest.mark.parametrize("size, text", [(999, "999 B"), (1000, "1.0 kB"), (1_234_567_890, "1.2 GB"),
                                        (5 * 10**15, "5000.0 TB")])
def test_sizes_read_well(size, text):
    usage = {"bytes": size, "files": 1, "series": 1, "oldest_timestamp_ms": None}
    assert format_usage(usage) == f"archive: {text} in 1 file over 1 partition"
