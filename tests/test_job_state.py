"""The job-state fold: a job's lifecycle events in, one state out, whatever the order and however often."""
from __future__ import annotations

import json
import random
from datetime import datetime, timezone

import pytest

from consumers.job_state import (CANCELLED, DECODING, FAILED, FLAGGED, FOLDED_TOPICS, LIFECYCLE_TOPICS,
                                 PUBLISHED, QUEUED, REQUESTED, REVIEW, RUNNING, JobState, epoch_ms, fold,
                                 fold_all, jsonable_event, to_public)
from streams import topics
from streams.events import derive_event_id
from tests.samples import BLOB, MP4, PARAMS

T0 = 1_700_000_000_000


def _event(job_id: str, emitter: str, parts: tuple, at: int, **fields) -> dict:
    """An event as a stage emits it: a deterministic id per logical event, so a redelivery is an exact copy."""
    return {"event_id": derive_event_id(job_id, emitter, *parts), "job_id": job_id, "timestamp": at, **fields}


def requested(job_id: str, at: int = T0, tier: str = "PREMIUM", retry: int = 0) -> tuple[str, dict]:
    return topics.REQUESTED.name, _event(job_id, "client", ("requested", retry), at, tenant="acme", prompt="a fox",
                                         negative_prompt="", tier=tier, params=PARAMS, consent_ref=None)


def encoded(job_id: str, at: int = T0 + 100, tier: str = "PREMIUM") -> tuple[str, dict]:
    return topics.encoded_topic(tier).name, _event(
        job_id, "prompt-encoder", ("encoded",), at, tenant="acme", tier=tier, params=PARAMS,
        prompt_sha256="ef" * 32, encoder="tiny-t5", prompt_embeds=BLOB, negative_prompt_embeds=None,
        requested_at=T0)


def step(job_id: str, n: int, total: int = 4, attempt: int = 1, at: int | None = None,
         resumed_from: int | None = None, step_ms: float = 20.0) -> tuple[str, dict]:
    at = T0 + 1000 * attempt + 10 * n if at is None else at
    return topics.STEP_PROGRESS.name, _event(job_id, "gpu-agent", ("step", attempt, n), at, step=n, total_steps=total,
                                             attempt=attempt, resumed_from_step=resumed_from, step_ms=step_ms,
                                             agent_id=f"agent-{attempt}")


def checkpoint(job_id: str, n: int, total: int = 4, attempt: int = 1) -> tuple[str, dict]:
    blob = dict(BLOB, uri=f"file:///blobs/{job_id}/checkpoint-{n}.safetensors")
    return topics.LATENT_CHECKPOINTED.name, _event(job_id, "gpu-agent", ("checkpoint", attempt, n),
                                                   T0 + 1000 * attempt + 10 * n + 5, step=n, total_steps=total,
                                                   attempt=attempt, checkpoint=blob, agent_id="agent")


def chunk(job_id: str, index: int, count: int = 2, attempt: int = 1) -> tuple[str, dict]:
    return topics.LATENT_CHUNKS.name, _event(job_id, "gpu-agent", ("chunk", index), T0 + 5000 + index,
                                             tenant="acme", chunk_index=index, chunk_count=count,
                                             latent_frame_start=index, latent_frames=1, latent=BLOB, params=PARAMS,
                                             attempt=attempt)


def segment(job_id: str, index: int, count: int = 2) -> tuple[str, dict]:
    last = index == count - 1
    media = dict(MP4, uri=f"file:///blobs/{job_id}/segment-{index}.m4s")
    playlist = dict(MP4, uri=f"file:///blobs/{job_id}/live-{index}.m3u8")
    return topics.DECODED.name, _event(job_id, "vae-decoder", ("segment", index), T0 + 6000 + index, tenant="acme",
                                       segment_index=index, is_last=last, segment=media, frame_start=4 * index,
                                       frames=4 + (index == 0), video=MP4 if last else None, params=PARAMS,
                                       init_segment=dict(MP4, uri=f"file:///blobs/{job_id}/init.mp4"),
                                       playlist=playlist, decoder_id="decoder")


def published(job_id: str, at: int = T0 + 7000) -> tuple[str, dict]:
    return topics.PUBLISHED.name, _event(job_id, "compliance", ("published",), at, tenant="acme", video=MP4,
                                         frames=9, width=64, height=64, fps=8, params=PARAMS,
                                         renditions=[{"name": "360p", "width": 64, "height": 64, "media": MP4}],
                                         manifest=dict(MP4, uri="file:///blobs/manifest.c2pa"))


def flagged(job_id: str, decision: str = "BLOCK", stage: str = "POST_GEN", at: int = T0 + 6900,
            ends_job: bool | None = None) -> tuple[str, dict]:
    fields = {} if ends_job is None else {"ends_job": ends_job}
    return topics.FLAGGED.name, _event(job_id, "compliance", ("flagged", stage, decision), at, tenant="acme",
                                       stage=stage, decision=decision, reasons=["NSFW"], scores={"nsfw": 0.9},
                                       evidence="", policy_version="1", **fields)


def failed(job_id: str, at: int = T0 + 3000) -> tuple[str, dict]:
    return topics.FAILED.name, _event(job_id, "gpu-agent", ("failed",), at, tenant="acme", stage="gpu-agent",
                                      reason="out of memory", error_type="HANDLER", attempts=3)


def cancelled(job_id: str, at: int = T0 + 1025, stopped_at: int | None = 2) -> tuple[str, dict]:
    return topics.CANCELLED.name, _event(job_id, "gpu-agent", ("cancelled",), at, reason="user asked",
                                         requested_by="acme", stage="gpu-agent", stopped_at_step=stopped_at)


def cancel_request(job_id: str, at: int = T0 + 1015) -> tuple[str, dict]:
    return topics.CONTROL.name, _event(job_id, "gateway", ("cancel",), at, reason="user asked", requested_by="acme",
                                       stage="", stopped_at_step=None)


def queued_at(job_id: str, position: int, at: int, eta_s: float | None = None, waiting: int = 5,
              tier: str = "PREMIUM") -> tuple[str, dict]:
    """The scheduler's QueuePosition (position 0: the job left the queue)."""
    return topics.QUEUE.name, _event(job_id, "scheduler", ("queue", at, position), at, tenant="acme", tier=tier,
                                     position=position, waiting=waiting, eta_s=eta_s)


def job_lifecycle(job_id: str, total: int = 4, segments: int = 2) -> list[tuple[str, dict]]:
    """A whole successful job, in pipeline order: request → encoded → steps (checkpoint at 2) → chunks → segments
    → published."""
    events = [requested(job_id), encoded(job_id)]
    for n in range(1, total + 1):
        events.append(step(job_id, n, total))
        if n == 2:
            events.append(checkpoint(job_id, n, total))
    events += [chunk(job_id, i, segments) for i in range(segments)]
    events += [segment(job_id, i, segments) for i in range(segments)]
    events.append(published(job_id))
    return events


# -- tests -----------------------------------------------------------------------------------------------------------
def test_a_whole_job_in_order_ends_published_with_everything_in_it():
    state = fold_all(job_lifecycle("j1"))
    assert state.status == PUBLISHED and state.terminal
    assert (state.tenant, state.tier, state.prompt, state.params) == ("acme", "premium", "a fox", PARAMS)
    assert (state.step, state.total_steps, state.attempt, state.eta_ms) == (4, 4, 1, None)
    assert state.checkpoints == [2] and state.last_checkpoint["uri"].endswith("checkpoint-2.safetensors")
    assert state.latent_chunks == [0, 1] and state.chunk_count == 2
    assert [s["index"] for s in state.segments] == [0, 1] and state.segment_count == 2
    assert state.segments[0] == {"index": 0, "uri": "file:///blobs/j1/segment-0.m4s", "frame_start": 0, "frames": 5,
                                 "is_last": False}
    assert state.init_segment == "file:///blobs/j1/init.mp4"
    assert state.playlist == "file:///blobs/j1/live-1.m3u8"  # the newest segment's playlist
    assert state.outputs["video"]["uri"] == MP4["uri"] and state.outputs["renditions"][0]["name"] == "360p"
    assert state.outputs["manifest"]["uri"] == "file:///blobs/manifest.c2pa"
    assert (state.requested_at, state.encoded_at, state.started_at, state.finished_at) == (
        T0, T0 + 100, T0 + 1010, T0 + 7000)
    assert state.updated_at == T0 + 7000
    assert state.flags == [] and state.error is None


def test_each_phase_has_its_status():
    events = job_lifecycle("j1")
    statuses = []
    state = None
    for topic_name, event in events:
        state = fold(state, topic_name, event)
        statuses.append(state.status)
    assert statuses == [REQUESTED, QUEUED] + [RUNNING] * 5 + [DECODING] * 4 + [PUBLISHED]


def test_eta_comes_from_the_newest_steps_own_fields():
    state = fold_all([requested("j1"), step("j1", 1, total=10, step_ms=30.0), step("j1", 4, total=10, step_ms=25.0)])
    assert (state.step, state.step_ms, state.eta_ms) == (4, 25.0, 150)  # 6 steps left at 25 ms
    assert to_public(state)["progress"] == 0.4


def test_applying_an_event_twice_equals_applying_it_once():
    state = None
    for topic_name, event in job_lifecycle("j1"):
        once = fold(state, topic_name, event)
        assert fold(once, topic_name, event) == once
        state = once


def test_replaying_the_whole_log_over_the_final_state_changes_nothing():
    events = job_lifecycle("j1")
    final = fold_all(events)
    assert fold_all(events, final) == final


@pytest.mark.parametrize("seed", range(20))
def test_shuffled_events_with_duplicates_give_the_same_state(seed):
    rng = random.Random(seed)
    events = job_lifecycle("j1") + [requested("j1", at=T0 + 50, retry=1)]  # an upstream retry of the request
    expected = fold_all(events)
    noisy = events + rng.sample(events, 6)  # redeliveries
    rng.shuffle(noisy)
    assert fold_all(noisy) == expected


def test_an_older_step_never_moves_progress_back_within_an_attempt():
    state = fold_all([step("j1", 3), step("j1", 1), step("j1", 2)])
    assert (state.step, state.attempt) == (3, 1)
    assert state.started_at == T0 + 1010  # the earliest step, whatever came first


def test_a_resumed_attempt_takes_over_from_its_checkpoint_even_at_a_lower_step():
    events = [requested("j1"), encoded("j1"), step("j1", 1, 10), step("j1", 2, 10), checkpoint("j1", 2, 10),
              step("j1", 3, 10), step("j1", 3, 10, attempt=2, resumed_from=2), step("j1", 4, 10, attempt=2,
                                                                                    resumed_from=2)]
    state = fold_all(events)
    assert (state.step, state.attempt, state.resumed_from_step, state.agent_id) == (4, 2, 2, "agent-2")
    assert state.status == RUNNING
    # A late step of the dead attempt does not pull the job back to attempt 1.
    late = fold(state, *step("j1", 5, 10, attempt=1))
    assert (late.step, late.attempt) == (4, 2)
    assert late == fold(late, *step("j1", 5, 10, attempt=1))


def test_a_resume_after_the_latent_was_chunked_is_running_again_until_it_chunks_again():
    state = fold_all([step("j1", 4), chunk("j1", 0)])
    assert state.status == DECODING
    state = fold(state, *step("j1", 3, attempt=2, resumed_from=2))
    assert state.status == RUNNING
    state = fold(state, *chunk("j1", 0, attempt=2))
    assert state.status == DECODING


def test_terminal_states_are_sticky_against_late_progress():
    done = fold_all(job_lifecycle("j1"))
    late = fold_all([step("j1", 2, at=T0 + 8000), chunk("j1", 0), segment("j1", 0)], done)
    assert late.status == PUBLISHED and late.finished_at == done.finished_at and late.eta_ms is None
    assert late.outputs == done.outputs


def test_a_blocked_job_never_turns_published_in_either_order():
    events = [requested("j1"), step("j1", 4), flagged("j1", "BLOCK", at=T0 + 6900), published("j1", at=T0 + 7000)]
    for order in (events, list(reversed(events))):
        state = fold_all(order)
        assert state.status == FLAGGED
        assert state.outputs is None  # a stray publication's outputs are never shown
        assert state.flags[0]["decision"] == "BLOCK" and state.flags[0]["reasons"] == ["NSFW"]
        assert state.finished_at == T0 + 6900


def test_a_held_review_waits_and_a_publication_afterwards_ends_it():
    state = fold_all([requested("j1"), step("j1", 4), segment("j1", 0, 1), flagged("j1", "REVIEW", ends_job=True)])
    assert state.status == REVIEW and not state.terminal
    state = fold(state, *published("j1"))
    assert state.status == PUBLISHED and state.flags[0]["decision"] == "REVIEW"
    assert state.outputs["video"]["uri"] == MP4["uri"]


def test_a_review_annotation_does_not_hold_the_job():
    state = fold_all([requested("j1"), encoded("j1"), flagged("j1", "REVIEW", "PRE_GEN", at=T0 + 90,
                                                             ends_job=False), step("j1", 1)])
    assert state.status == RUNNING
    assert state.flags[0]["ends_job"] is False and state.flags[0]["stage"] == "PRE_GEN"


def test_failure_and_cancellation_keep_their_reasons():
    state = fold_all([requested("j1"), step("j1", 1), failed("j1")])
    assert state.status == FAILED and state.error == {"kind": FAILED, "stage": "gpu-agent",
                                                      "reason": "out of memory", "error_type": "HANDLER",
                                                      "attempts": 3}
    state = fold_all([requested("j2"), step("j2", 1), cancel_request("j2"), step("j2", 2)])
    assert state.status == RUNNING and state.cancel_requested["reason"] == "user asked"
    state = fold(state, *cancelled("j2"))
    assert state.status == CANCELLED and state.error["stopped_at_step"] == 2 and state.finished_at == T0 + 1025


def test_the_earliest_terminal_event_wins_whatever_arrives_first():
    events = [requested("j1"), failed("j1", at=T0 + 3000), published("j1", at=T0 + 7000)]
    assert fold_all(events).status == FAILED
    assert fold_all(list(reversed(events))).status == FAILED
    assert fold_all(list(reversed(events))).outputs is None


def test_avro_datetimes_fold_like_epoch_milliseconds():
    topic_name, event = step("j1", 1)
    as_datetime = dict(event, timestamp=datetime.fromtimestamp(event["timestamp"] / 1000, tz=timezone.utc))
    assert fold(None, topic_name, as_datetime) == fold(None, topic_name, event)
    assert epoch_ms(datetime(2023, 11, 14, 22, 13, 20, 1000, tzinfo=timezone.utc)) == T0 + 1
    encoded_topic, encoded_event = encoded("j1")
    with_datetime = dict(encoded_event, requested_at=datetime.fromtimestamp(T0 / 1000, tz=timezone.utc))
    assert fold(None, encoded_topic, with_datetime).requested_at == T0


def test_an_event_arriving_before_the_request_still_ends_in_the_requests_facts():
    state = fold_all([step("j1", 1), encoded("j1", tier="FREE"), requested("j1", tier="FREE")])
    assert (state.tier, state.prompt, state.requested_at) == ("free", "a fox", T0)


def test_state_survives_json_and_the_public_view_hides_bookkeeping():
    state = fold_all(job_lifecycle("j1") + [flagged("j1", "REVIEW", ends_job=False)])
    restored = JobState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    public = to_public(state.to_dict())
    json.dumps(public)  # JSON-friendly
    assert "seen" not in public and all("event_id" not in f for f in public["flags"])
    assert public["status"] == PUBLISHED and public["progress"] == 1.0 and public["terminal"]
    assert public["checkpoints"] == {"count": 1, "last_step": 2}


def test_events_of_another_job_or_topic_are_refused():
    state = fold(None, *requested("j1"))
    with pytest.raises(ValueError):
        fold(state, *requested("j2"))
    with pytest.raises(KeyError):
        fold(state, topics.DEAD_LETTER.name, requested("j1")[1])


def test_a_forwarded_event_folds_like_the_decoded_one():
    """The tracker forwards events as JSON (datetimes as epoch ms): folding that equals folding the Avro dict."""
    topic_name, event = encoded("j1")
    decoded = dict(event, timestamp=datetime.fromtimestamp(event["timestamp"] / 1000, tz=timezone.utc),
                   requested_at=datetime.fromtimestamp(T0 / 1000, tz=timezone.utc))
    forwarded = json.loads(json.dumps(jsonable_event(decoded)))
    assert fold(None, topic_name, forwarded) == fold(None, topic_name, decoded)


def test_a_review_from_before_ends_job_existed_is_an_annotation():
    topic_name, event = flagged("j1", "REVIEW")
    assert "ends_job" not in event
    assert fold_all([requested("j1"), step("j1", 1), (topic_name, event)]).status == RUNNING


def test_the_tracker_forwards_long_texts_cut_to_a_bounded_size():
    from consumers.tracker import MAX_FORWARDED_CHARS, bounded_strings

    event = {"prompt": "x" * (1 << 20), "params": {"model": "tiny-wan"}, "reasons": ["y" * 20_000, "short"]}
    bounded = bounded_strings(event)
    assert len(bounded["prompt"]) < MAX_FORWARDED_CHARS + 50 and bounded["prompt"].endswith("more characters]")
    assert bounded["params"] == {"model": "tiny-wan"} and bounded["reasons"][1] == "short"
    assert len(bounded["reasons"][0]) < MAX_FORWARDED_CHARS + 50


# -- the fleet's queue (QueuePosition on vidgen.queue) ---------------------------------------------------------------
def _queue(state: JobState) -> tuple:
    return state.queue_position, state.queue_waiting, state.queue_eta_s, state.queue_at


def test_a_waiting_job_shows_its_newest_position_and_eta():
    events = [requested("j1"), encoded("j1"), queued_at("j1", 3, T0 + 200, eta_s=12.345, waiting=4),
              queued_at("j1", 2, T0 + 1200, eta_s=7.0, waiting=3)]
    state = fold_all(events)
    assert state.status == QUEUED and _queue(state) == (2, 3, 7.0, T0 + 1200)
    assert fold_all(list(reversed(events))) == state  # the older position, arriving last, does not win
    public = to_public(state)
    assert (public["queue_position"], public["queue_waiting"], public["queue_eta_s"], public["queue_at"]) == (
        2, 3, 7.0, T0 + 1200)
    assert _queue(fold_all(events[:3])) == (3, 4, 12.3, T0 + 200)  # ETAs kept to a tenth of a second
    unknown = fold_all([encoded("j1"), queued_at("j1", 1, T0 + 200, eta_s=None)])
    assert _queue(unknown) == (1, 5, None, T0 + 200)


def test_a_position_alone_means_the_scheduler_has_the_job():
    state = fold_all([requested("j1"), queued_at("j1", 1, T0 + 200)])  # the PromptEncoded not read yet
    assert state.status == QUEUED and state.queue_position == 1


def test_leaving_the_queue_clears_the_position():
    waiting = fold_all([encoded("j1"), queued_at("j1", 2, T0 + 200)])
    assigned = fold(waiting, *queued_at("j1", 0, T0 + 900, eta_s=0.0))
    assert _queue(assigned) == (None, None, None, None) and assigned.status == QUEUED  # not started yet
    assert _queue(fold(assigned, *queued_at("j1", 2, T0 + 200))) == (None, None, None, None)  # a redelivery
    started = fold(waiting, *step("j1", 1))  # the position 0 not read yet: the step says enough
    assert _queue(started) == (None, None, None, None) and started.status == RUNNING


@pytest.mark.parametrize("ending", [cancelled("j1", at=T0 + 300, stopped_at=None), failed("j1", at=T0 + 300)])
def test_an_ended_job_never_shows_a_queue_position(ending):
    for position in (queued_at("j1", 1, T0 + 250), queued_at("j1", 1, T0 + 400)):  # before and after the end
        for order in ([encoded("j1"), position, ending], [ending, position, encoded("j1")]):
            state = fold_all(order)
            assert state.terminal and _queue(state) == (None, None, None, None)


def test_a_position_from_before_the_first_step_never_brings_queued_back():
    events = [requested("j1"), encoded("j1"), queued_at("j1", 2, T0 + 500, eta_s=3.0), step("j1", 1)]
    for order in (events, list(reversed(events)), [events[3], events[2], events[0], events[1]]):
        state = fold_all(order)
        assert state.status == RUNNING and _queue(state) == (None, None, None, None)


def test_a_job_requeued_after_it_ran_waits_again_until_its_next_attempt():
    ran = [requested("j1"), encoded("j1"), queued_at("j1", 1, T0 + 200), queued_at("j1", 0, T0 + 900),
           step("j1", 1), step("j1", 2), checkpoint("j1", 2)]
    requeued = fold_all(ran + [queued_at("j1", 1, T0 + 1500, eta_s=4.0, waiting=2)])  # preempted after step 2
    assert _queue(requeued) == (1, 2, 4.0, T0 + 1500) and requeued.attempt == 1
    resumed = fold(requeued, *step("j1", 3, attempt=2, resumed_from=2))
    assert _queue(resumed) == (None, None, None, None)
    assert fold_all(list(reversed(ran + [queued_at("j1", 1, T0 + 1500, eta_s=4.0, waiting=2),
                                         step("j1", 3, attempt=2, resumed_from=2)]))) == resumed


def _queued_lifecycle(job_id: str) -> list[tuple[str, dict]]:
    events = job_lifecycle(job_id)
    """job_lifecycle with the scheduler's positions while it waits: 3, 2, 1, then 0 when it is assigned."""
    queue = [queued_at(job_id, 3, T0 + 200, eta_s=9.0), queued_at(job_id, 2, T0 + 500, eta_s=5.5),
             queued_at(job_id, 1, T0 + 800, eta_s=1.0), queued_at(job_id, 0, T0 + 950, eta_s=0.0)]
    return events[:2] + queue + events[2:]


@pytest.mark.parametrize("seed", range(20))
def test_shuffled_events_with_queue_positions_and_duplicates_give_the_same_state(seed):
    rng = random.Random(seed)
    events = _queued_lifecycle("j1")
    expected = fold_all(events)
    assert expected.status == PUBLISHED and _queue(expected) == (None, None, None, None)
    noisy = events + rng.sample(events, 6)
    rng.shuffle(noisy)
    assert fold_all(noisy) == expected
    # Cut anywhere while it waits: the same newest position, whatever the order.
    waiting = events[:2 + rng.randint(1, 3)]
    expected_waiting = fold_all(waiting)
    assert expected_waiting.queue_position is not None
    noisy = waiting + rng.sample(waiting, 2)
    rng.shuffle(noisy)
    assert fold_all(noisy) == expected_waiting


def test_queue_bookkeeping_survives_json():
    state = fold_all(_queued_lifecycle("j1")[:4])
    restored = JobState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state and fold(restored, *queued_at("j1", 1, T0 + 800)).queue_position == 1
    assert fold(restored, *queued_at("j1", 3, T0 + 100)) == restored  # older than the newest: changes nothing


def test_the_tracker_folds_the_queue_and_the_audit_does_not_read_it():
    assert topics.QUEUE in FOLDED_TOPICS and topics.QUEUE not in LIFECYCLE_TOPICS
    assert set(FOLDED_TOPICS) - set(LIFECYCLE_TOPICS) == {topics.QUEUE}


def test_the_first_request_of_a_job_wins_over_a_later_different_one():
    """Issue 24: the tracker showed prompt B for a video made from prompt A (the encoder takes the first request
    and skips the second as a duplicate). The fold keeps the first in log order, whatever its time stamp."""
    from consumers.job_state import request_fingerprint

    first = requested("j1")
    second = requested("j1", at=T0 - 5, retry=1)
    second[1]["prompt"], second[1]["negative_prompt"] = "a wolf", "blur"
    state = fold_all([first, second, encoded("j1")])
    assert state.prompt == "a fox" and state.seen["conflicting_requests"] == 1
    assert state.seen["request"] == request_fingerprint(first[1]) != request_fingerprint(second[1])
    only_negative = requested("j1", retry=2)
    only_negative[1]["negative_prompt"] = "blur"
    assert request_fingerprint(only_negative[1]) != request_fingerprint(first[1])  # negative prompts count
    again = fold_all([first, requested("j1", at=T0 + 7, retry=3)])  # the same request again: no conflict
    assert "conflicting_requests" not in again.seen and again.prompt == "a fox"
