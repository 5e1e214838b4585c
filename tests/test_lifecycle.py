"""The blob lifecycle (consumers/lifecycle.py): the classes and rules as plain functions on BlobStat lists, then the
handler on a local and an S3 store (tests/test_blobs.py's two stores): a job's intermediates go once it is due, the
deletion is announced first, a redelivery repeats the same event and deletes nothing twice, sweeps expire by age."""
from __future__ import annotations

import json
import time

import pytest

from consumers import lifecycle
from consumers.embedding_cache import EmbeddingCache
from consumers.lifecycle import (BLOB_CLASSES, DELETED, JOB_ENDED, PUBLISHED_RETENTION, TAKEN_DOWN, Lifecycle,
                                 classify, ends_job, expired_embeddings, expired_ledger, expired_published,
                                 job_due_s, select_job_blobs, sweep_interval_s, usage)
from streams import topics
from streams.blobs import BlobStat
from streams.events import new_event
from streams.settings import LIFECYCLE_WINDOWS, load_settings
from streams.stage import NotDue, SourceMessage, StageContext
from tests.test_blobs import s3_env, store  # noqa: F401 - the same two stores (a directory, moto's S3)

DAY = 24 * 3600.0
NOW = 1_700_000_000.0


def stat(key: str, modified: float = NOW, size: int = 10) -> BlobStat:
    return BlobStat(key, size, modified, '"etag"')


def keys(stats) -> list[str]:
    return [s.key for s in stats]


JOB_FILES = {
    "j1/checkpoint-00010.safetensors": "checkpoint", "j1/checkpoint.json": "checkpoint",
    "j1/attempt-0001": "checkpoint", "j1/latent-0000.safetensors": "latent",
    "j1/audio-latents.safetensors": "latent", "j1/init.mp4": "segment", "j1/segment-00000.m4s": "segment",
    "j1/playlist.m3u8": "segment", "j1/video.mp4": "segment", "j1/input-0123456789abcdef.png": "input",
    "j1/published/ab12ab12ab12ab12/video.mp4": "published",
    "j1/published/ab12ab12ab12ab12/manifest.json": "published",
    "j1/published/ab12ab12ab12ab12/master.m3u8": "published",
    "j1/notes.txt": "other",
}


# -- classes --------------------------------------------------------------------------------------------------------
def test_every_name_the_pipeline_writes_has_its_class(tmp_path):
    from gpu_agents.agent import chunk_blob_name
    from gpu_agents.decoder import INIT_SEGMENT, PLAYLIST, segment_name
    from gpu_agents.resume import POINTER
    from producers.requests import store_input_image
    from compliance.input_image import read_input_image
    from streams.blobs import LocalBlobStore
    from tests.samples import no_face_png

    image_ref = store_input_image(LocalBlobStore(tmp_path), "j1", read_input_image(no_face_png()))
    written = {f"j1/{chunk_blob_name(3)}": "latent", f"j1/{segment_name(7)}": "segment",
               f"j1/{INIT_SEGMENT}": "segment", f"j1/{PLAYLIST}": "segment", f"j1/{POINTER}": "checkpoint",
               LocalBlobStore(tmp_path).key_of(image_ref["uri"]): "input",
               "_cache/text-embeddings/ab/abcd/entry.json": "embeddings",
               "_cache/text-embeddings/ab/abcd/prompt_embeds-0123456789abcdef.safetensors": "embeddings",
               "_ledger/compliance/ab/abcdef": "ledger", "_cache/something-else/x": "other", "loose-file": "other",
               "j1/deeper/segment-00000.m4s": "other"}
    for key, blob_class in {**JOB_FILES, **written}.items():
        assert classify(key) == blob_class, key


def test_usage_counts_every_class_and_the_total():
    report = usage([stat("j1/checkpoint-00010.safetensors", size=100), stat("j1/checkpoint.json", size=5),
                    stat("j1/published/ab12ab12ab12ab12/video.mp4", size=1000), stat("odd", size=1)])
    assert list(report) == [*BLOB_CLASSES, "total"]
    assert report["checkpoint"] == {"count": 2, "bytes": 105}
    assert report["published"] == {"count": 1, "bytes": 1000} and report["latent"] == {"count": 0, "bytes": 0}
    assert report["total"] == {"count": 4, "bytes": 1106}


# -- rules ----------------------------------------------------------------------------------------------------------
def test_a_job_that_ended_loses_its_intermediates_and_keeps_what_was_published():
    listing = [stat(k) for k in JOB_FILES] + [stat("j10/checkpoint.json")]  # another job whose id starts alike
    published = keys(select_job_blobs(JOB_ENDED, "j1", listing, published=True))
    assert published == sorted(k for k, c in JOB_FILES.items() if c in ("checkpoint", "latent", "segment"))
    # A job that did not publish loses its input image too; one with a published set (whatever its end) keeps it.
    unpublished = [s for s in listing if classify(s.key) != "published"]
    assert "j1/input-0123456789abcdef.png" in keys(select_job_blobs(JOB_ENDED, "j1", unpublished, published=False))
    assert "j1/input-0123456789abcdef.png" not in keys(select_job_blobs(JOB_ENDED, "j1", listing, published=False))


def test_taken_down_and_deleted_videos_lose_every_blob_and_only_deleted_ones_go_by_default():
    listing = [stat(k) for k in JOB_FILES]
    for rule in (TAKEN_DOWN, DELETED):
        assert keys(select_job_blobs(rule, "j1", listing, published=True)) == sorted(JOB_FILES)
    assert LIFECYCLE_WINDOWS[TAKEN_DOWN.window] is None  # quarantined: kept (and never served)
    assert LIFECYCLE_WINDOWS[DELETED.window] == 0


def test_only_a_block_ends_a_job_among_flags():
    assert ends_job(topics.FLAGGED.name, {"decision": "BLOCK", "ends_job": True})
    # A held REVIEW may still be published, from the intermediates: they must stay.
    assert not ends_job(topics.FLAGGED.name, {"decision": "REVIEW", "ends_job": True})
    assert all(ends_job(t.name, {}) for t in (topics.PUBLISHED, topics.FAILED, topics.CANCELLED))


def test_a_job_is_due_a_window_after_its_end_or_after_a_later_restore():
    assert job_due_s(NOW, 600) == NOW + 600
    assert job_due_s(NOW, 600, restored_s=NOW + 50) == NOW + 650  # the restored stages may replay it
    assert job_due_s(NOW, 600, restored_s=NOW - 50) == NOW + 600


def test_embedding_entries_expire_by_their_entry_json_as_whole_folders():
    old, fresh, orphan = ("_cache/text-embeddings/aa/old", "_cache/text-embeddings/bb/fresh",
                          "_cache/text-embeddings/cc/orphan")
    listing = [stat(f"{old}/entry.json", NOW - 8 * DAY), stat(f"{old}/prompt_embeds-1.safetensors", NOW - 8 * DAY),
               # renewed entry.json: the entry is in use, its older tensors stay with it
               stat(f"{fresh}/entry.json", NOW - DAY), stat(f"{fresh}/prompt_embeds-2.safetensors", NOW - 20 * DAY),
               # a crash left tensors without an entry: they go by their own age
               stat(f"{orphan}/prompt_embeds-3.safetensors", NOW - 8 * DAY)]
    expired = expired_embeddings(listing, NOW, 7 * DAY)
    assert sorted(expired) == [old, orphan]
    assert keys(expired[old]) == [f"{old}/entry.json", f"{old}/prompt_embeds-1.safetensors"]


def test_ledger_marks_expire_by_age():
    listing = [stat("_ledger/compliance/ab/old", NOW - 8 * DAY), stat("_ledger/compliance/ab/new", NOW - DAY),
               stat("j1/checkpoint.json", NOW - 30 * DAY)]
    assert keys(expired_ledger(listing, NOW, 7 * DAY)) == ["_ledger/compliance/ab/old"]


def test_published_sets_expire_and_the_input_image_goes_with_the_last_one():
    listing = [stat("j1/published/aaaaaaaaaaaaaaaa/video.mp4", NOW - 40 * DAY),
               stat("j1/input-0123456789abcdef.png", NOW - 41 * DAY),
               stat("j2/published/bbbbbbbbbbbbbbbb/video.mp4", NOW - 40 * DAY),
               stat("j2/published/cccccccccccccccc/video.mp4", NOW - DAY),  # a later signing of j2: still kept
               stat("j2/input-0123456789abcdef.png", NOW - 41 * DAY)]
    assert keys(expired_published(listing, NOW, 30 * DAY)) == [
        "j1/input-0123456789abcdef.png", "j1/published/aaaaaaaaaaaaaaaa/video.mp4",
        "j2/published/bbbbbbbbbbbbbbbb/video.mp4"]
    assert PUBLISHED_RETENTION.window in LIFECYCLE_WINDOWS and LIFECYCLE_WINDOWS["published"] is None


def test_sweeps_come_a_tenth_of_the_smallest_window_apart_within_bounds():
    assert sweep_interval_s(LIFECYCLE_WINDOWS) == 3600.0
    assert sweep_interval_s({**LIFECYCLE_WINDOWS, "ledger": 600.0}) == 60.0
    assert sweep_interval_s({**LIFECYCLE_WINDOWS, "embeddings": 1.0}) == 5.0
    assert sweep_interval_s({**LIFECYCLE_WINDOWS, "embeddings": None, "ledger": None}) is None


# -- the handler, on both stores ------------------------------------------------------------------------------------
class Emitted(list):
    """What a handler emitted, how often it flushed, and which blobs the store held at the last flush (a deletion
    must come after the flush of the event that announces it)."""

    def __init__(self, store=None):
        super().__init__()
        self.store = store
        self.flushes = 0
        self.held_at_flush: list[str] = []

    def emit(self, topic, event, key, headers):
        self.append((topic.name, key, json.loads(json.dumps(event)), self.flushes))

    def flush(self):
        self.flushes += 1
        self.held_at_flush = keys(self.store.list()) if self.store is not None else []


def context(store, emitted: Emitted, topic: str = "", offset: int = 0) -> StageContext:
    return StageContext("lifecycle", SourceMessage(topic, 1, offset, None), store, emitted.emit, flush=emitted.flush)


def handler(store, tmp_path, now: float, **windows) -> Lifecycle:
    settings = load_settings({"VIDGEN_VAR_DIR": str(tmp_path), **{
        f"VIDGEN_LIFECYCLE_{name.upper()}_S": str(value) for name, value in windows.items()}})
    return Lifecycle(settings, store, clock=lambda: now)


def write_job(store, job_id: str, published: bool) -> dict[str, bytes]:
    """A job's blobs as the pipeline leaves them; returns its intermediates."""
    files = {"checkpoint-00010.safetensors": b"c" * 30, "checkpoint.json": b"{}", "attempt-0001": b"",
             "latent-0000.safetensors": b"l" * 20, "segment-00000.m4s": b"s" * 10, "video.mp4": b"v" * 40}
    for name, data in files.items():
        store.put(data, job_id, name)
    store.put(b"png", job_id, "input.png", content_addressed=True)
    if published:
        store.put(b"signed", job_id, "published", "ab12ab12ab12ab12", "video.mp4")
    return files


def test_a_terminal_event_waits_for_its_window_then_its_intermediates_go_announced_first(store, tmp_path):
    files = write_job(store, "j1", published=False)
    ended = new_event("j1", tenant="acme", stage="gpu-agent", reason="boom")
    ended["timestamp"] = int(NOW * 1000)
    emitted = Emitted(store)
    with pytest.raises(NotDue) as waiting:
        handler(store, tmp_path, NOW + 599).handle(ended, context(store, emitted, topics.FAILED.name, 17))
    assert waiting.value.due_s == NOW + 600 and not emitted
    assert len(list(store.list("j1/"))) == len(files) + 1

    handler(store, tmp_path, NOW + 600).handle(ended, context(store, emitted, topics.FAILED.name, 17))
    [(topic, key, event, flushes_before)] = emitted
    assert (topic, key, flushes_before) == (topics.BLOB_LIFECYCLE.name, "j1", 0)
    assert event["rule"] == "job-ended" and event["window_s"] == 600.0 and event["store"] == store.url
    assert event["trigger"] == f"{topics.FAILED.name}/1@17"
    named = {b["key"]: b["blob_class"] for b in event["blobs"]}
    assert set(named) == {f"j1/{name}" for name in files} | {k for k in named if k.startswith("j1/input-")}
    assert sorted(set(named.values())) == ["checkpoint", "input", "latent", "segment"]  # it failed: input goes
    assert event["bytes"] == sum(len(data) for data in files.values()) + 3
    assert emitted.flushes == 1 and set(named) <= set(emitted.held_at_flush)  # flushed, then deleted
    assert not list(store.list("j1/"))

    # Redelivered (the offset was not committed, or a restore lost the event): the same event, nothing deleted twice.
    again = Emitted()
    handler(store, tmp_path, NOW + 700).handle(ended, context(store, again, topics.FAILED.name, 17))
    assert [e[2]["event_id"] for e in again] == [event["event_id"]]
    assert again[0][2]["blobs"] == event["blobs"]
    assert not list(store.list("j1/"))


def test_a_published_job_keeps_its_published_set_and_input_image(store, tmp_path):
    files = write_job(store, "j2", published=True)
    kept = sorted(k for k in keys(store.list("j2/")) if k.removeprefix("j2/") not in files)
    emitted = Emitted()
    handler(store, tmp_path, time.time() + 601).handle(new_event("j2"), context(store, emitted, topics.PUBLISHED.name))
    assert sorted(b["key"] for b in emitted[0][2]["blobs"]) == sorted(f"j2/{name}" for name in files)
    assert keys(store.list("j2/")) == kept and len(kept) == 2  # the input image and the published video


def test_a_deleted_video_loses_every_blob_of_its_job_at_once_announced_first(store, tmp_path):
    write_job(store, "j3", published=True)
    write_job(store, "j4", published=True)  # another job: untouched
    held = sorted(keys(store.list("j3/")))
    deleted = new_event("j3", tenant="acme", requested_by="tenant:acme", reason="deleted through the API")
    deleted["timestamp"] = int(NOW * 1000)
    emitted = Emitted(store)
    handler(store, tmp_path, NOW).handle(deleted, context(store, emitted, topics.DELETED.name, 5))
    [(topic, key, event, flushes_before)] = emitted
    assert (topic, key, flushes_before, event["rule"]) == (topics.BLOB_LIFECYCLE.name, "j3", 0, "deleted")
    assert sorted(b["key"] for b in event["blobs"]) == held and "published" in {b["blob_class"] for b in event["blobs"]}
    assert set(held) <= set(emitted.held_at_flush)  # announced (flushed), then deleted
    assert not list(store.list("j3/")) and list(store.list("j4/"))


def test_what_does_not_end_a_job_or_has_no_window_deletes_nothing(store, tmp_path):
    write_job(store, "j1", published=False)
    before = keys(store.list())
    review = new_event("j1", decision="REVIEW", ends_job=True, stage="POST_GEN", reasons=["nsfw"])
    published = new_event("j1")
    emitted = Emitted()
    handler(store, tmp_path, time.time() + DAY).handle(review, context(store, emitted, topics.FLAGGED.name))
    handler(store, tmp_path, time.time() + DAY, intermediate="off").handle(
        published, context(store, emitted, topics.PUBLISHED.name))
    handler(store, tmp_path, time.time() + DAY).handle(new_event("../x"), context(store, emitted, topics.FAILED.name))
    assert not emitted and keys(store.list()) == before


def test_sweeps_expire_unused_embedding_entries_and_old_marks(store, tmp_path):
    import torch

    EmbeddingCache(store, expires_after_s=7 * DAY).put("aa" * 32, "j1", torch.zeros(1, 2))
    store.touch("_ledger", "compliance", "ab", "abcdef")
    emitted = Emitted()
    handler(store, tmp_path, time.time() + 6 * DAY).tick(context(store, emitted))
    assert not emitted  # not old enough yet

    sweeper = handler(store, tmp_path, time.time() + 8 * DAY)
    sweeper.tick(context(store, emitted))
    rules = {event["rule"]: event for _, _, event, _ in emitted}
    assert sorted(rules) == ["embeddings-unused", "ledger-expired"] and emitted.flushes == 2
    assert all(e["job_id"] == "" for e in rules.values())
    assert {b["key"].split("/")[3] for b in rules["embeddings-unused"]["blobs"]} == {"aa" * 32}
    assert {b["blob_class"] for b in rules["embeddings-unused"]["blobs"]} == {"embeddings"}
    assert [b["key"] for b in rules["ledger-expired"]["blobs"]] == ["_ledger/compliance/ab/abcdef"]
    assert not list(store.list("_cache/")) and not list(store.list("_ledger/"))
    sweeper.tick(context(store, emitted))  # not again before the sweep interval
    assert len(emitted) == 2


class RecordingPuts:
    """A store that notes what is written through it."""

    def __init__(self, store):
        self.store, self.puts = store, []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def put(self, data, *segments, **options):
        self.puts.append("/".join(segments))
        return self.store.put(data, *segments, **options)


def test_serving_an_entry_older_than_half_its_window_renews_it(store):
    import torch

    key = "bb" * 32
    EmbeddingCache(store, expires_after_s=7 * DAY).put(key, "j1", torch.zeros(1, 2))
    entry_key = f"_cache/text-embeddings/bb/{key}/entry.json"
    written = store.read(*entry_key.split("/"))
    for age, renewed in ((3 * DAY, False), (4 * DAY, True)):
        recording = RecordingPuts(store)
        cache = EmbeddingCache(recording, expires_after_s=7 * DAY, clock=lambda: time.time() + age)
        assert cache.get(key, need_negative=False) is not None
        assert recording.puts == ([entry_key] if renewed else [])
        assert cache.get(key, need_negative=False) is not None and len(recording.puts) <= 1  # once, not per hit
    assert store.read(*entry_key.split("/")) == written  # the same entry, only newer


def test_a_cache_entry_deleted_under_a_process_that_remembers_it_is_a_miss(store):
    import torch

    cache = EmbeddingCache(store, expires_after_s=7 * DAY)
    cache.put("cc" * 32, "j1", torch.zeros(1, 2))
    store.delete([s.key for s in store.list("_cache/")])  # the lifecycle's sweep, in another process
    cache.clock = lambda: time.time() + 4 * DAY  # old enough to be renewed: the renewal finds the blobs gone
    assert cache.get("cc" * 32, need_negative=False) is None
    assert not list(store.list("_cache/"))  # and it did not write an entry naming missing blobs


def test_the_lifecycle_stage_consumes_the_terminal_topics_and_deletions_and_never_fails_a_job():
    assert lifecycle.STAGE.consumes == (*topics.TERMINAL, topics.DELETED)
    assert lifecycle.STAGE.group_id == "vidgen.lifecycle"
    assert lifecycle.STAGE.emits == (topics.BLOB_LIFECYCLE,) and not lifecycle.STAGE.fails_jobs


def test_vidgen_storage_reports_usage_per_class(tmp_path, monkeypatch, capsys):
    from streams.blobs import open_blob_store
    from vidgen.cli import main

    monkeypatch.setenv("VIDGEN_VAR_DIR", str(tmp_path))
    monkeypatch.delenv("VIDGEN_BLOB_URL", raising=False)
    store = open_blob_store(load_settings())
    write_job(store, "j1", published=True)
    assert main(["storage", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["store"] == store.url
    assert report["classes"]["checkpoint"] == {"count": 3, "bytes": 32}
    assert report["classes"]["published"] == {"count": 1, "bytes": 6}
    assert report["classes"]["total"]["count"] == 8
    assert main(["storage"]) == 0
    assert "checkpoint" in capsys.readouterr().out
