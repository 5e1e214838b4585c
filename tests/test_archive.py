"""The archive's files and hash chains: written by the archive writer, checked by `vidgen audit verify`, tampered
with in every way the issue names (altered, removed, reordered record; missing file; truncation)."""
from __future__ import annotations

import json
import os

import fastavro
import pytest

from consumers.archiver import (HEAD_FILE, PARSED_SCHEMA, ArchiveSettings, ArchiveWriter, PartitionSeries,
                                archive_settings, series_files)
from consumers.audit import iter_archive, main_verify, verify_archive

TOPIC = "vidgen.step-progress"


def write_archive(root, records_per_partition=30, partitions=(0, 1), rotate_bytes=1500, flush_every=4,
                  topic=TOPIC) -> ArchiveWriter:
    writer = ArchiveWriter(ArchiveSettings(root, rotate_bytes=rotate_bytes, rotate_s=3600))
    for n in range(records_per_partition):
        for p in partitions:
            offset = 2 * n + (n % 3 == 0)  # offsets with gaps, as transaction markers leave them
            writer.append(topic, p, offset, 1_700_000_000_000 + n, 1, f"job-{n % 4}".encode(),
                          b"\x00\x00\x00\x00\x01" + bytes([n % 256]) * 20, [("traceparent", b"00-abc"), ("x", None)])
        if n % flush_every == 0:
            writer.flush()
    writer.close()
    return writer


def part_dir(root, partition=0, topic=TOPIC):
    return root / topic / str(partition)


def rewrite(path, change):
    """Rewrite a container file with the same header metadata, its records passed through ``change(records)``:
    what someone editing the archive with Avro tools would do."""
    with open(path, "rb") as fo:
        reader = fastavro.reader(fo)
        metadata = {k: v for k, v in reader.metadata.items() if not k.startswith("avro.")}
        records = list(reader)
    records = change(records)
    with open(path, "wb") as fo:
        fastavro.writer(fo, PARSED_SCHEMA, records, metadata=metadata)


def offsets_of(path):
    with open(path, "rb") as fo:
        return [r["offset"] for r in fastavro.reader(fo)]


def test_a_fresh_archive_verifies_and_keeps_every_field(tmp_path):
    write_archive(tmp_path)
    files = series_files(part_dir(tmp_path))
    assert len(files) > 2, "rotation by size should give several files"
    result = verify_archive(tmp_path)
    assert result.ok, result.problems
    assert result.records == 60 and result.files == len(files) + len(series_files(part_dir(tmp_path, 1)))
    records = [r for r in iter_archive(tmp_path) if r["partition"] == 0]
    assert [r["offset"] for r in records] == [2 * n + (n % 3 == 0) for n in range(30)]
    first = records[0]
    assert (first["topic"], first["timestamp"], first["timestamp_type"], first["key"]) == (
        TOPIC, 1_700_000_000_000, 1, b"job-0")
    assert first["value"] == b"\x00\x00\x00\x00\x01" + b"\x00" * 20
    assert first["headers"] == [{"key": "traceparent", "value": b"00-abc"}, {"key": "x", "value": None}]
    assert set(result.heads) == {f"{TOPIC}/0", f"{TOPIC}/1"}
    assert main_verify(["--archive", str(tmp_path)]) == 0


def test_an_altered_value_is_named_at_its_offset(tmp_path):
    write_archive(tmp_path)
    path = series_files(part_dir(tmp_path))[1]
    target = offsets_of(path)[2]

    def alter(records):
        records[2]["value"] = records[2]["value"][:-1] + b"\xff"
        return records

    rewrite(path, alter)
    result = verify_archive(tmp_path)
    assert not result.ok
    assert result.problems == [f"{TOPIC}/0@{target}: altered: the record's content does not match its digest "
                               f"({path.name})"]
    assert main_verify(["--archive", str(tmp_path)]) == 1


def test_a_flipped_byte_in_the_file_is_named_too(tmp_path):
    write_archive(tmp_path)
    marker = b"\x00\x00\x00\x00\x01" + b"\x03" * 20  # the value of record n=3
    path = next(p for p in series_files(part_dir(tmp_path)) if marker in p.read_bytes())
    data = bytearray(path.read_bytes())
    at = data.index(marker)
    data[at + 10] ^= 0x01
    path.write_bytes(bytes(data))
    result = verify_archive(tmp_path)
    assert [p.split(": ")[:2] for p in result.problems] == [[f"{TOPIC}/0@7", "altered"]]  # n=3 → offset 7


def test_a_removed_record_is_named(tmp_path):
    write_archive(tmp_path)
    path = series_files(part_dir(tmp_path))[1]
    offsets = offsets_of(path)
    rewrite(path, lambda records: records[:1] + records[2:])
    result = verify_archive(tmp_path)
    assert result.problems == [f"{TOPIC}/0@{offsets[1]}: removed: the record at offset {offsets[1]} (between offsets "
                               f"{offsets[0]} and {offsets[2]}) is missing"]


def test_a_removed_first_record_of_a_file_is_named(tmp_path):
    write_archive(tmp_path)
    path = series_files(part_dir(tmp_path))[2]
    offsets = offsets_of(path)
    rewrite(path, lambda records: records[1:])
    result = verify_archive(tmp_path)
    assert len(result.problems) == 1 and result.problems[0].startswith(f"{TOPIC}/0@{offsets[0]}: removed:")


def test_two_swapped_records_are_named_reordered(tmp_path):
    write_archive(tmp_path)
    path = series_files(part_dir(tmp_path))[1]
    offsets = offsets_of(path)

    def swap(records):
        records[1], records[2] = records[2], records[1]
        return records

    rewrite(path, swap)
    result = verify_archive(tmp_path)
    assert result.problems and all(": reordered: " in p for p in result.problems), result.problems
    named = {int(p.split("@")[1].split(":")[0]) for p in result.problems}
    assert named == {offsets[1], offsets[2]}


def test_a_deleted_middle_file_breaks_the_chain(tmp_path):
    write_archive(tmp_path)
    files = series_files(part_dir(tmp_path))
    gone = offsets_of(files[1])
    files[1].unlink()
    result = verify_archive(tmp_path)
    assert len(result.problems) == 1
    problem = result.problems[0]
    assert f"chain broken: file {files[1].name} is missing" in problem
    assert problem.startswith(f"{TOPIC}/0@{gone[-1]}:") and f"up to {gone[-1]} removed" in problem


def test_files_in_the_wrong_order_break_the_chain(tmp_path):
    write_archive(tmp_path)
    files = series_files(part_dir(tmp_path))
    a, b = files[1], files[2]
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    result = verify_archive(tmp_path)
    assert not result.ok and any("chain broken" in p for p in result.problems), result.problems


def test_a_truncated_middle_file_is_named(tmp_path):
    write_archive(tmp_path)
    files = series_files(part_dir(tmp_path))
    offsets = offsets_of(files[1])
    files[1].write_bytes(files[1].read_bytes()[:-30])  # cut inside its last block
    result = verify_archive(tmp_path)
    assert not result.ok
    assert any(": truncated: " in p and files[1].name in p for p in result.problems), result.problems
    # the next file names the records lost: after the last readable one up to the file's real end
    assert any(f"continues from offset {offsets[-1]}" in p for p in result.problems), result.problems


def test_records_cut_from_the_end_of_the_newest_file_are_caught_by_head(tmp_path):
    write_archive(tmp_path, rotate_bytes=1 << 20)
    path = series_files(part_dir(tmp_path))[-1]
    offsets = offsets_of(path)
    rewrite(path, lambda records: records[:-2])  # whole records gone, the file still reads cleanly
    result = verify_archive(tmp_path)
    assert result.problems == [f"{TOPIC}/0@{offsets[-1]}: truncated: the archive ends at offset {offsets[-3]} "
                               f"(epoch 0) but HEAD records offset {offsets[-1]} (epoch 0) as archived"]


def test_a_redelivery_is_skipped_and_a_torn_tail_is_repaired(tmp_path):
    config = ArchiveSettings(tmp_path, rotate_bytes=1 << 20)
    writer = ArchiveWriter(config)
    for offset in range(10):
        writer.append(TOPIC, 0, offset, 1000 + offset, 1, b"k", b"v%d" % offset)
    positions = writer.flush()
    assert positions == {(TOPIC, 0): 10}
    # records 10..12 reach the file but the process dies before they are fsynced and committed; the last block
    # is torn
    for offset in range(10, 13):
        writer.append(TOPIC, 0, offset, 1000 + offset, 1, b"k", b"v%d" % offset)
    series = writer.series[(TOPIC, 0)]
    series._writer.flush()
    series._fo.flush()
    path = series_files(part_dir(tmp_path))[-1]
    os.truncate(path, path.stat().st_size - 3)
    # a new process: recovers the chain, cuts the torn block, skips what was archived, takes the rest
    writer = ArchiveWriter(config)
    for offset in range(5, 15):  # redelivered from the committed offset... and a little before it
        writer.append(TOPIC, 0, offset, 1000 + offset, 1, b"k", b"v%d" % offset)
    assert writer.flush() == {(TOPIC, 0): 15}
    writer.close()
    assert [r["offset"] for r in iter_archive(tmp_path)] == list(range(15))
    assert verify_archive(tmp_path).ok, verify_archive(tmp_path).problems


def test_a_reset_log_starts_a_new_epoch_instead_of_being_skipped(tmp_path):
    config = ArchiveSettings(tmp_path)
    writer = ArchiveWriter(config)
    for offset in range(5):
        writer.append(TOPIC, 0, offset, 1000 + offset, 1, b"k", b"old%d" % offset)
    writer.close()
    writer = ArchiveWriter(config)  # the broker restarted with an empty log: offsets begin again at 0
    for offset in range(3):
        assert writer.append(TOPIC, 0, offset, 5000 + offset, 1, b"k", b"new%d" % offset)
    writer.close()
    values = [r["value"] for r in iter_archive(tmp_path)]
    assert values == [b"old0", b"old1", b"old2", b"old3", b"old4", b"new0", b"new1", b"new2"]
    assert [p.name[:6] for p in series_files(part_dir(tmp_path))] == ["000000", "000001"]
    assert verify_archive(tmp_path).ok, verify_archive(tmp_path).problems


def test_rotation_by_age(tmp_path):
    config = ArchiveSettings(tmp_path, rotate_s=0.05)
    series = PartitionSeries(tmp_path, TOPIC, 0, config)
    series.append(0, 1, 1, None, b"a", None)
    series.flush()
    series.maybe_rotate(now=series._opened_at + 1)
    series.append(1, 2, 1, None, b"b", None)
    series.close()
    assert len(series_files(part_dir(tmp_path))) == 2
    assert json.loads((part_dir(tmp_path) / HEAD_FILE).read_text())["last_offset"] == 1
    assert verify_archive(tmp_path).ok


def test_archive_settings_from_the_environment(tmp_path):
    config = archive_settings(environ={"VIDGEN_VAR_DIR": str(tmp_path), "VIDGEN_ARCHIVE_ROTATE_BYTES": "1000",
                                       "VIDGEN_ARCHIVE_ROTATE_S": "60"})
    assert (config.dir, config.rotate_bytes, config.rotate_s) == (tmp_path / "archive", 1000, 60.0)
    assert archive_settings(environ={"VIDGEN_ARCHIVE_DIR": str(tmp_path / "a")}).dir == tmp_path / "a"
    with pytest.raises(ValueError):
        archive_settings(environ={"VIDGEN_ARCHIVE_CODEC": "zstd"})
