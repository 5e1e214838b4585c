"""`vidgen audit replay` over decoded events, no Kafka: every invariant holds for a clean log, and each violation of
a crafted log is reported with its job and reason; redelivered copies are fine; the report is deterministic."""
from __future__ import annotations

import copy
import json
import random
import zlib

import pytest

from consumers.audit import EXPIRED, BlobChecker, blob_refs, parse_time, replay
from streams import topics
from streams.events import new_event
from tests.test_blobs import s3_env, store  # noqa: F401 - the same two stores (a directory, moto's S3)
from tests.test_job_state import (T0, cancelled, checkpoint, chunk, encoded, failed, flagged, job_lifecycle, published,
                                  requested, segment, step)


def log_of(*jobs: list[tuple[str, dict]]) -> list[tuple]:
    """(topic, partition, offset, timestamp, event) records as a broker would hold them: a job's events on one
    partition per topic (keyed by job_id), offsets counting per partition; jobs interleaved."""
    offsets: dict[tuple[str, int], int] = {}
    records = []
    for events in zip_longest_jobs(jobs):
        topic_name, event = events
        partition = zlib.crc32(event["job_id"].encode()) % topics.topic(topic_name).partitions
        offset = offsets.get((topic_name, partition), 0)
        offsets[(topic_name, partition)] = offset + 1
        records.append((topic_name, partition, offset, event["timestamp"], event))
    return records


def zip_longest_jobs(jobs):
    iters = [iter(j) for j in jobs]
    while iters:
        for it in list(iters):
            try:
                yield next(it)
            except StopIteration:
                iters.remove(it)


def kinds(report) -> list[tuple[str, str]]:
    return [(v["job_id"], v["kind"]) for v in report.violations]


def resumed_job(job_id: str) -> list[tuple[str, dict]]:
    """Attempt 1 runs steps 1-3 (checkpoint at 2) and dies; attempt 2 resumes from 2 and finishes."""
    events = [requested(job_id), encoded(job_id), step(job_id, 1), step(job_id, 2), checkpoint(job_id, 2),
              step(job_id, 3)]
    events += [step(job_id, n, attempt=2, resumed_from=2) for n in (3, 4)]
    events += [chunk(job_id, i, attempt=2) for i in range(2)] + [segment(job_id, i) for i in range(2)]
    return events + [published(job_id)]


def test_a_clean_log_passes():
    report = replay(log_of(job_lifecycle("j1"), resumed_job("j2"), [requested("j3"), encoded("j3"), failed("j3")],
                           [requested("j4"), encoded("j4"), step("j4", 1), cancelled("j4")],
                           [requested("j5"), flagged("j5", stage="PRE_GEN")]))
    assert report.ok, report.violations
    summary = report.report["summary"]
    assert summary["jobs"] == 5 and summary["duplicates"] == 0
    assert summary["outcomes"] == {"cancelled": 1, "failed": 1, "flagged": 1, "published": 2}
    j2 = report.report["jobs"]["j2"]
    assert j2["outcome"] == "published" and j2["attempts"]["2"] == {"steps": 2, "last_step": 4,
                                                                    "resumed_from_step": 2}
    assert j2["timeline"][0]["what"] == "requested" and j2["timeline"][-1]["what"] == "published"
    assert "OK: 5 jobs" in report.summary()


def test_redelivered_copies_are_not_violations():
    events = job_lifecycle("j1")
    copies = events[:3] + events[2:6] + events[5:] + events[-1:]  # step and publication delivered twice
    report = replay(log_of(copies))
    assert report.ok, report.violations
    assert report.report["summary"]["duplicates"] == 3
    assert report.report["jobs"]["j1"]["events"] == len(events)


def test_two_different_terminal_events_are_a_violation():
    report = replay(log_of(job_lifecycle("j1") + [failed("j1", at=T0 + 8000)]))
    assert kinds(report) == [("j1", "terminal")]
    assert "more than one terminal event" in report.violations[0]["detail"]
    assert report.report["jobs"]["j1"]["outcome"] == "conflicting"


def test_a_job_without_a_terminal_event_is_unfinished_unless_the_window_is_open():
    events = [requested("j1"), encoded("j1"), step("j1", 1)]
    assert kinds(replay(log_of(events))) == [("j1", "unfinished")]
    open_window = replay(log_of(events), require_terminal=False)
    assert open_window.ok and open_window.report["summary"]["outcomes"] == {"unfinished": 1}


def test_a_review_that_lets_the_job_go_on_is_not_terminal():
    events = job_lifecycle("j1")
    review = flagged("j1", decision="REVIEW", stage="PRE_GEN", at=T0 + 50, ends_job=False)
    assert replay(log_of([review] + events)).ok
    old_review = flagged("j1", decision="REVIEW", stage="PRE_GEN", at=T0 + 50)  # no ends_job field: not BLOCK
    assert "ends_job" not in old_review[1]
    assert replay(log_of([old_review] + events)).ok


def test_steps_must_increase_within_an_attempt():
    events = job_lifecycle("j1")
    at = next(i for i, (t, e) in enumerate(events) if t == topics.STEP_PROGRESS.name and e["step"] == 3)
    events[at], events[at + 1] = events[at + 1], events[at]  # step 4 logged before step 3
    report = replay(log_of(events))
    assert kinds(report) == [("j1", "steps")]
    assert report.violations[0]["detail"] == "attempt 1: step 3 after step 4"
    assert report.violations[0]["where"].startswith("vidgen.step-progress/")


def test_a_resume_needs_a_checkpoint_of_an_earlier_attempt():
    events = [e for e in resumed_job("j1") if e[0] != topics.LATENT_CHECKPOINTED.name]
    report = replay(log_of(events))
    assert kinds(report) == [("j1", "resume")]
    assert "resumed from step 2" in report.violations[0]["detail"]
    # a checkpoint of another step does not do either
    wrong = events[:4] + [checkpoint("j1", 1)] + events[4:]
    assert kinds(replay(log_of(wrong))) == [("j1", "resume")]


def test_published_only_after_the_last_segment():
    events = [e for e in job_lifecycle("j1") if not (e[0] == topics.DECODED.name and e[1]["is_last"])]
    report = replay(log_of(events))
    assert kinds(report) == [("j1", "publish-order")]
    assert report.violations[0]["detail"] == "published without a last decoded segment"
    early = job_lifecycle("j2")[:-1] + [published("j2", at=T0 + 6000)]  # before segment 1 (T0 + 6001)
    assert kinds(replay(log_of(early))) == [("j2", "publish-order")]


def test_a_flagged_job_is_never_published():
    events = job_lifecycle("j1")
    report = replay(log_of(events[:-1] + [flagged("j1", at=T0 + 6900)] + events[-1:]))
    assert kinds(report) == [("j1", "flagged-published"), ("j1", "terminal")]


def with_blobs(events, good: dict, video: dict, manifest: dict) -> list[tuple[str, dict]]:
    """The job's events naming ``good`` everywhere but its published video and manifest."""
    for _topic, event in events:
        for key in ("segment", "init_segment", "playlist", "prompt_embeds", "latent", "checkpoint"):
            if event.get(key):
                event[key] = good
        if "video" in event and event["video"]:
            event["video"] = video
        if "manifest" in event:
            event["manifest"] = manifest
        for rendition in event.get("renditions", []):
            rendition["media"] = good
    return events


def test_blobs_must_exist_with_their_sha256(store):
    good = store.put(b"segment bytes", "j1", "segment-0.m4s")
    altered = store.put(b"original", "j1", "video.mp4")
    store.put(b"tampered", "j1", "video.mp4")
    missing = dict(good, uri=store.uri_of("j1/gone.m4s"))
    checker = BlobChecker(store)
    report = replay(log_of(with_blobs(job_lifecycle("j1"), good, altered, missing)), checker)
    details = sorted(v["detail"] for v in report.violations)
    assert {v["kind"] for v in report.violations} == {"blob"}
    assert details[0].endswith("gone.m4s: missing")
    assert any(d.endswith("video.mp4: sha256 differs from the reference") for d in details)
    assert report.report["summary"]["blobs"] == {"checked": 3, "bad": 2, "expired": 0, "skipped": False}
    assert len(checker._cache) == 3  # each distinct blob hashed once


def blobs_deleted(store, *keys: str, job_id: str = "j1") -> tuple:
    """A BlobsDeleted record as the lifecycle stage sends it."""
    event = new_event(job_id, rule="job-ended", window_s=600.0, trigger="", store=store.url, bytes=0,
                      blobs=[{"key": key, "blob_class": "segment", "bytes": 0, "modified": 0} for key in keys])
    return topics.BLOB_LIFECYCLE.name, 0, 0, event["timestamp"], event


def test_blobs_the_lifecycle_deleted_are_expired_not_missing(store):
    segment = store.put(b"segment bytes", "j1", "segment-0.m4s")
    video = store.put(b"video bytes", "j1", "published", "ab12ab12ab12ab12", "video.mp4")
    manifest = store.put(b"manifest", "j1", "published", "ab12ab12ab12ab12", "manifest.json")
    log = log_of(with_blobs(job_lifecycle("j1"), segment, video, manifest))
    store.delete(["j1/segment-0.m4s"])
    assert set(kinds(replay(log, BlobChecker(store)))) == {("j1", "blob")}  # gone without a word: a violation

    # Announced by the lifecycle (a sweep's event names no job): expired. A copy naming fewer blobs changes nothing.
    for announced in (blobs_deleted(store, "j1/segment-0.m4s"), blobs_deleted(store, "j1/segment-0.m4s", job_id="")):
        report = replay([*log, announced, blobs_deleted(store)], BlobChecker(store))
        assert report.ok, report.violations
        assert report.report["summary"]["blobs"] == {"checked": 3, "bad": 0, "expired": 1, "skipped": False}
        assert report.report["jobs"]["j1"]["events"] == len(job_lifecycle("j1"))  # not one of the job's events
        assert "1 expired by the lifecycle" in report.summary()
    # Announcing one blob excuses that one only; an announced blob that is still there is simply checked.
    store.delete(["j1/published/ab12ab12ab12ab12/manifest.json"])
    report = replay([*log, blobs_deleted(store, "j1/segment-0.m4s", "j1/published/ab12ab12ab12ab12/video.mp4")],
                    BlobChecker(store))
    assert [v["detail"] for v in report.violations] == [f"{manifest['uri']}: missing"]
    assert report.report["summary"]["blobs"]["expired"] == 1


def test_an_announced_key_written_again_with_other_bytes_is_expired_too(store):
    ref = store.put(b"bytes", "j1", "video.mp4")
    store.put(b"other bytes", "j1", "video.mp4")  # deleted, then the key written again
    checker = BlobChecker(store)
    assert checker(ref).startswith("size")
    events = with_blobs(job_lifecycle("j1"), ref, ref, ref)
    report = replay([*log_of(events), blobs_deleted(store, "j1/video.mp4")], checker)
    assert report.ok and report.report["summary"]["blobs"]["expired"] == 1 and EXPIRED == "expired by the lifecycle"


def test_blob_refs_are_found_anywhere_in_an_event():
    _, event = published("j1")
    uris = sorted(ref["uri"] for ref in blob_refs(event))
    assert uris == sorted([event["video"]["uri"], event["renditions"][0]["media"]["uri"], event["manifest"]["uri"]])


def test_windows_and_job_filters():
    early = job_lifecycle("early")
    late = [(t, dict(e, timestamp=e["timestamp"] + 100_000)) for t, e in job_lifecycle("late")]
    log = log_of(early, late)
    assert set(replay(log, from_ms=T0 + 50_000).report["jobs"]) == {"late"}
    assert set(replay(log, to_ms=T0 + 50_000).report["jobs"]) == {"early"}
    assert set(replay(log, job="late").report["jobs"]) == {"late"}
    # a job that began inside the window keeps the events after its end: no false "unfinished"
    assert replay(log, to_ms=T0 + 1).ok
    assert parse_time("2023-11-14T22:13:20Z") == T0 and parse_time(str(T0)) == T0


def test_the_same_log_twice_gives_the_same_report():
    jobs = [job_lifecycle("j1"), resumed_job("j2"), job_lifecycle("j3")[:5] + [failed("j3"), cancelled("j3")]]
    log = log_of(*jobs)
    first = replay(copy.deepcopy(log)).to_json()
    assert replay(copy.deepcopy(log)).to_json() == first
    # another interleaving of the partitions (as a second read of Kafka may give) changes nothing either
    by_partition: dict = {}
    for record in log:
        by_partition.setdefault((record[0], record[1]), []).append(record)
    shuffled, queues = [], list(by_partition.values())
    rng = random.Random(7)
    while queues:
        queue = rng.choice(queues)
        shuffled.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    assert replay(shuffled).to_json() == first
    assert json.loads(first)["summary"]["violations"] == 1


@pytest.mark.parametrize("text", ["yesterday", "2023-13-01"])
def test_bad_times_are_refused(text):
    with pytest.raises(ValueError):
        parse_time(text)


def test_a_second_request_of_a_job_asking_something_else_is_a_violation():
    """Issue 24: one Idempotency-Key with two prompts sent to two gateways at once put two VideoRequested of one job
    id on the log; the first is the job's, the second must be reported."""
    first = requested("j1")
    second = requested("j1", at=T0 - 5, retry=1)  # stamped earlier, but later in the log
    second[1]["prompt"] = "a wolf"
    report = replay(log_of([first, second] + job_lifecycle("j1")[1:]))
    assert kinds(report) == [("j1", "request")] and "a wolf" in report.violations[0]["detail"]
    same = requested("j1", retry=1)  # the same request again (a client retry): not a violation
    assert replay(log_of([first, same] + job_lifecycle("j1")[1:])).ok
