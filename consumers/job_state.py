"""A job's state, folded from its lifecycle events: what the tracker keeps per job and the gateway serves.

No Kafka here: ``fold(state, topic_name, event)`` is a pure function from a state and one decoded event (a dict as
the Avro codec yields it) to the next state, and ``to_public(state)`` is the JSON the gateway shows.

The fold is idempotent and order-insensitive, because the tracker gets at-least-once delivery from several topics
with no order between them: a redelivered event, a replay of the whole log, or a job's events from different topics
in any interleaving all end in the same state. Every field is therefore a join, never "last event wins":

* progress (step, total_steps, step_ms, attempt, resumed_from_step) comes from the StepProgress with the highest
  (attempt, step): an older step never moves it back within an attempt, and a resumed attempt (attempt + 1, from a
  checkpoint) takes over even though its step is lower;
* checkpoints, latent chunks and segments are sets keyed by step, chunk index and segment index;
* flags are kept once per event_id;
* the request's facts (tenant, tier, prompt, params) come from the earliest VideoRequested (an upstream retry
  repeats it), or from the earliest PromptEncoded while no request has been seen;
* timestamps are minima (requested_at, started_at, ...) or maxima (updated_at);
* a job has exactly one terminal event (published, flagged/BLOCK, failed, cancelled). Should two ever meet, the
  earliest by event time wins, so in any sane order the first terminal sticks: a late StepProgress or a late
  duplicate never changes a finished job;
* the queue (QueuePosition on vidgen.queue, from the scheduler): only the newest position event by (timestamp,
  event_id) counts, and the job shows as waiting (``queue_position`` ≥ 1, ``queue_waiting``, ``queue_eta_s``) only
  while that event says so (position 0: it left the queue), the job has not ended, and the event is newer than the
  job's newest denoising activity (step or checkpoint): a position from before the job started never brings the
  queue back, while a job that was requeued after it ran (preempted, its agent died) waits again.

``status`` is derived from those facts after each event (``_derive_status``), never set by one event on its own.
The bookkeeping in ``seen`` stays bounded: per-kind keys (the adopted request, the earliest terminal event of
each kind, the held-review time, the attempt of the latent chunks, the segment index the init segment and the
playlist came from, the newest queue position, the time of the newest denoising activity), never a list of every
event id; flags, the only events kept by id, are few per job.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from typing import Any

from streams import topics

# Statuses, in the order a job normally goes through them; the last four end a job.
REQUESTED, QUEUED, RUNNING, DECODING, REVIEW = "requested", "queued", "running", "decoding", "review"
PUBLISHED, FLAGGED, FAILED, CANCELLED = "published", "flagged", "failed", "cancelled"
STATUSES = (REQUESTED, QUEUED, RUNNING, DECODING, REVIEW, PUBLISHED, FLAGGED, FAILED, CANCELLED)
TERMINAL_STATUSES = frozenset({PUBLISHED, FLAGGED, FAILED, CANCELLED})

#: Breaks a tie between two terminal events with the same timestamp (a defect upstream): the stricter one wins.
_TERMINAL_PRECEDENCE = {FLAGGED: 0, FAILED: 1, CANCELLED: 2, PUBLISHED: 3}

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MILLISECOND = timedelta(milliseconds=1)


def epoch_ms(value: datetime | int | float | None) -> int | None:
    """Milliseconds since the epoch of an Avro timestamp-millis: the codec yields datetimes, fresh events ints."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return (value - _EPOCH) // _MILLISECOND
    return int(value)


@dataclass
class JobState:
    job_id: str
    tenant: str | None = None
    tier: str | None = None  # lower case, as in streams.topics.TIERS
    prompt: str | None = None
    params: dict | None = None  # GenerationParams
    seconds_requested: float | None = None  # the duration asked for, when the request named one in seconds
    status: str = REQUESTED
    # Denoising progress of the newest attempt.
    step: int = 0
    total_steps: int | None = None
    step_ms: float | None = None  # wall time of the newest step
    eta_ms: int | None = None  # remaining denoising steps × step_ms; None once the job has ended
    attempt: int = 0  # 0 until a step has run; 1 for the first run, +1 per resume
    resumed_from_step: int | None = None
    agent_id: str | None = None
    # A model that streams while generating: the chunk the newest step belongs to (its steps span all chunks).
    generating_chunk: int | None = None
    # While the job waits in the fleet's queue (the scheduler's QueuePosition): None once it runs or has ended.
    queue_position: int | None = None  # 1 = starts next
    queue_waiting: int | None = None  # jobs waiting in the whole queue
    queue_eta_s: float | None = None  # seconds until the job is expected to start, as of queue_at; None: unknown
    queue_at: int | None = None  # time of the position event shown
    # Resumable checkpoints: the steps that have one (any attempt), and the newest by (attempt, step).
    checkpoints: list[int] = field(default_factory=list)
    last_checkpoint: dict | None = None  # {"attempt", "step", "uri"}
    # The final latent, as chunks for the decoder.
    latent_chunks: list[int] = field(default_factory=list)  # chunk indices received
    chunk_count: int | None = None
    # Playable fMP4 segments as they are decoded, by index.
    segments: list[dict] = field(default_factory=list)  # {"index", "uri", "frame_start", "frames", "is_last"}
    segment_count: int | None = None  # known once the last segment is in
    init_segment: str | None = None
    playlist: str | None = None  # the live HLS playlist as of the newest segment
    outputs: dict | None = None  # from VideoPublished: video, renditions, manifest, ...
    flags: list[dict] = field(default_factory=list)  # {"event_id", "stage", "decision", "ends_job", "reasons", ...}
    error: dict | None = None  # why a job failed or was cancelled: {"kind", "stage", "reason", ...}
    cancel_requested: dict | None = None  # a JobCancelled request on vidgen.control: {"at", "reason", "requested_by"}
    deleted: dict | None = None  # its owner deleted it (VideoDeleted): {"at", "reason", "requested_by"}
    # Event times, epoch milliseconds.
    requested_at: int | None = None
    encoded_at: int | None = None
    started_at: int | None = None  # first denoising step
    updated_at: int | None = None  # newest event of any kind
    finished_at: int | None = None  # the terminal event
    #: Idempotency bookkeeping, bounded per job (see the module docstring).
    seen: dict = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (what the tracker's table stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, owned: bool = False) -> "JobState":
        """Inverse of to_dict; keys it does not know (a newer tracker's) are ignored, missing ones get defaults.
        ``owned``: ``data`` is the caller's to give (freshly decoded), so it is not copied."""
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in data.items() if k in known}
        return cls(**(kept if owned else copy.deepcopy(kept)))


# -- folding ---------------------------------------------------------------------------------------------------------
def fold(state: JobState | None, topic_name: str, event: dict) -> JobState:
    """The state after ``event`` (read from ``topic_name``); ``state`` is not modified.

    Raises KeyError for a topic that is not part of a job's lifecycle and ValueError for an event of another job.
    """
    try:
        apply = _APPLY[topic_name]
    except KeyError:
        raise KeyError(f"{topic_name!r} is not a lifecycle topic the job state folds") from None
    job_id = event["job_id"]
    if state is None:
        state = JobState(job_id=job_id)
    elif state.job_id != job_id:
        raise ValueError(f"event {event.get('event_id')} of job {job_id} folded into job {state.job_id}")
    new = copy.deepcopy(state)
    at = epoch_ms(event["timestamp"])
    apply(new, event, at)
    new.updated_at = _max(new.updated_at, at)
    new.status = _derive_status(new)
    new.eta_ms = _eta_ms(new)
    _derive_queue(new)
    return new


def fold_all(events: list[tuple[str, dict]], state: JobState | None = None) -> JobState | None:
    """Fold (topic name, event) pairs of one job in the given order."""
    for topic_name, event in events:
        state = fold(state, topic_name, event)
    return state


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _event_key(at: int, event: dict) -> list:
    """Orders events of one kind: earliest first; the event id breaks ties so any arrival order agrees."""
    return [at, event["event_id"]]


def _adopt_profile(state: JobState, rank: int, at: int, event: dict) -> None:
    """Take the job's request facts from the earliest request (rank 0), else the earliest encoded prompt (rank 1)."""
    key = [rank, *_event_key(at, event)]
    if state.seen.get("profile") is not None and state.seen["profile"] <= key:
        return
    state.seen["profile"] = key
    state.tenant = event.get("tenant", state.tenant)
    state.tier = event["tier"].lower() if event.get("tier") else state.tier
    state.params = copy.deepcopy(event.get("params", state.params))
    if "prompt" in event:
        state.prompt = event["prompt"]
    if rank == 0:  # only a request says what was asked
        state.seconds_requested = event.get("seconds")


def request_fingerprint(event: dict) -> str:
    """What a VideoRequested asks, as one digest: prompt, negative prompt, tier, consent and parameters (the input
    image by its sha256 and size). Two requests of one job id with different fingerprints are two different
    requests that collided (one Idempotency-Key reused): the first in the log is the job's."""
    facts = {"prompt": event.get("prompt"), "negative_prompt": event.get("negative_prompt"),
             "tier": (event.get("tier") or "").lower(), "consent_ref": event.get("consent_ref"),
             "params": public_params(event.get("params"))}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def _apply_requested(state: JobState, event: dict, at: int) -> None:
    fingerprint = request_fingerprint(event)
    first = state.seen.get("request")
    if first is not None and first != fingerprint:
        # Another request under the same job id, after the first: never the job's (the encoder skips it as a
        # duplicate too); counted, so the audit and the gateway can tell.
        state.seen["conflicting_requests"] = state.seen.get("conflicting_requests", 0) + 1
        return
    state.seen["request"] = fingerprint
    state.requested_at = _min(state.requested_at, at)
    _adopt_profile(state, 0, at, event)


def _apply_encoded(state: JobState, event: dict, at: int) -> None:
    state.encoded_at = _min(state.encoded_at, at)
    state.requested_at = _min(state.requested_at, epoch_ms(event.get("requested_at")))
    _adopt_profile(state, 1, at, event)


def _apply_step(state: JobState, event: dict, at: int) -> None:
    state.started_at = _min(state.started_at, at)
    state.seen["ran_at"] = _max(state.seen.get("ran_at"), at)
    position = (event.get("attempt", 1), event["step"])
    if position <= (state.attempt, state.step):
        return  # a duplicate, or an older step overtaken by a newer one
    state.attempt, state.step = position
    state.total_steps = event["total_steps"]
    state.step_ms = event.get("step_ms")
    state.resumed_from_step = event.get("resumed_from_step")
    state.agent_id = event.get("agent_id") or state.agent_id
    if event.get("chunk_count") is not None:
        state.generating_chunk, state.chunk_count = event.get("chunk_index"), event["chunk_count"]


def _apply_checkpoint(state: JobState, event: dict, at: int) -> None:
    state.started_at = _min(state.started_at, at)
    state.seen["ran_at"] = _max(state.seen.get("ran_at"), at)
    state.checkpoints = sorted({*state.checkpoints, event["step"]})
    candidate = {"attempt": event.get("attempt", 1), "step": event["step"], "uri": event["checkpoint"]["uri"]}
    last = state.last_checkpoint
    if last is None or (candidate["attempt"], candidate["step"]) > (last["attempt"], last["step"]):
        state.last_checkpoint = candidate
    if state.total_steps is None:
        state.total_steps = event["total_steps"]


def _apply_latent_chunk(state: JobState, event: dict, at: int) -> None:
    state.latent_chunks = sorted({*state.latent_chunks, event["chunk_index"]})
    state.chunk_count = event["chunk_count"]
    state.seen["chunk_attempt"] = max(state.seen.get("chunk_attempt", 0), event.get("attempt", 1))


def _apply_decoded(state: JobState, event: dict, at: int) -> None:
    index = event["segment_index"]
    segment = {"index": index, "uri": event["segment"]["uri"], "frame_start": event["frame_start"],
               "frames": event["frames"], "is_last": event["is_last"]}
    segments = {s["index"]: s for s in state.segments}
    segments[index] = segment  # a re-decoded segment is the same segment (same index, same frames)
    state.segments = [segments[i] for i in sorted(segments)]
    if event["is_last"]:
        state.segment_count = index + 1
    # The init segment is the same for every segment (kept from the lowest index); the live playlist grows with
    # each one (kept from the highest). Keyed by index, so the arrival order does not matter.
    if event.get("init_segment") and (state.seen.get("init_segment") or [index + 1])[0] > index:
        state.seen["init_segment"] = [index, event["init_segment"]["uri"]]
        state.init_segment = event["init_segment"]["uri"]
    if event.get("playlist") and (state.seen.get("playlist") or [index - 1])[0] < index:
        state.seen["playlist"] = [index, event["playlist"]["uri"]]
        state.playlist = event["playlist"]["uri"]


def _apply_flagged(state: JobState, event: dict, at: int) -> None:
    if any(f["event_id"] == event["event_id"] for f in state.flags):
        return
    decision = event.get("decision", "BLOCK")
    # Older events have no ends_job: then only a BLOCK ends the job (as consumers.progress.is_terminal reads it).
    ends_job = event.get("ends_job", decision == "BLOCK")
    flag = {"event_id": event["event_id"], "at": at, "stage": event.get("stage"), "decision": decision,
            "ends_job": ends_job, "reasons": list(event.get("reasons", [])),
            "scores": dict(event.get("scores") or {}), "policy_version": event.get("policy_version", "")}
    state.flags = sorted([*state.flags, flag], key=lambda f: (f["at"], f["event_id"]))
    if decision == "BLOCK":
        _terminal(state, FLAGGED, at, event, {"stage": flag["stage"], "reasons": flag["reasons"]})
    elif ends_job:
        # A REVIEW the platform holds: the job waits for a reviewer; a publication afterwards still ends it.
        state.seen["review_at"] = _max(state.seen.get("review_at"), at)


def _apply_published(state: JobState, event: dict, at: int) -> None:
    outputs = {
        "video": _blob(event["video"]),
        "frames": event.get("frames"), "width": event.get("width"), "height": event.get("height"),
        "fps": event.get("fps"),
        "renditions": [
            {"name": r["name"], "width": r["width"], "height": r["height"], **_blob(r["media"]),
             **{k: r[k] for k in ("bitrate", "signed") if k in r}}
            for r in event.get("renditions", [])
        ],
        "manifest": _blob(event["manifest"]) if event.get("manifest") else None,
        "playlist": _blob(event["playlist"]) if event.get("playlist") else None,
        "thumbnail": _blob(event["thumbnail"]) if event.get("thumbnail") else None,
        "spritesheet": _blob(event["spritesheet"]) if event.get("spritesheet") else None,
    }
    for optional in ("manifest_label", "watermark_payload", "watermark_note", "scores", "policy_version"):
        if optional in event:
            outputs[optional] = event[optional]
    _terminal(state, PUBLISHED, at, event, outputs)


def _apply_failed(state: JobState, event: dict, at: int) -> None:
    _terminal(state, FAILED, at, event, {"kind": FAILED, "stage": event.get("stage"), "reason": event.get("reason"),
                                         "error_type": event.get("error_type", ""),
                                         "attempts": event.get("attempts", 1)})


def _apply_cancelled(state: JobState, event: dict, at: int) -> None:
    _terminal(state, CANCELLED, at, event, {"kind": CANCELLED, "stage": event.get("stage", ""),
                                            "reason": event.get("reason", ""),
                                            "requested_by": event.get("requested_by", ""),
                                            "stopped_at_step": event.get("stopped_at_step")})


def _apply_cancel_request(state: JobState, event: dict, at: int) -> None:
    """A request on vidgen.control: noted, but the job only ends with the JobCancelled on vidgen.cancelled."""
    request = {"at": at, "event_id": event["event_id"], "reason": event.get("reason", ""),
               "requested_by": event.get("requested_by", "")}
    current = state.cancel_requested
    if current is None or _event_key(at, event) < [current["at"], current["event_id"]]:
        state.cancel_requested = request


def _apply_deleted(state: JobState, event: dict, at: int) -> None:
    """The earliest deletion stands (a second DELETE changes nothing)."""
    if state.deleted is None or at < state.deleted["at"]:
        state.deleted = {"at": at, "reason": event.get("reason", ""), "requested_by": event.get("requested_by", "")}


def _apply_queue_position(state: JobState, event: dict, at: int) -> None:
    """A QueuePosition: kept only if it is the newest by (timestamp, event_id); ``_derive_queue`` decides whether it
    still shows. Its tenant and tier are not adopted (the scheduler writes defaults for a job it no longer holds)."""
    key = _event_key(at, event)
    current = state.seen.get("queue")
    if current is not None and current["key"] >= key:
        return
    eta = event.get("eta_s")
    state.seen["queue"] = {"key": key, "position": event["position"], "waiting": event.get("waiting"),
                           "eta_s": None if eta is None else round(float(eta), 1)}


def _terminal(state: JobState, kind: str, at: int, event: dict, detail: dict) -> None:
    """Keep the earliest terminal event of each kind, then let the earliest of all decide the job's end."""
    terminals = state.seen.setdefault("terminals", {})
    current = terminals.get(kind)
    if current is not None and current["key"] <= _event_key(at, event):
        return
    terminals[kind] = {"key": _event_key(at, event), "detail": detail}
    winner = min(terminals, key=lambda k: (terminals[k]["key"][0], _TERMINAL_PRECEDENCE[k], terminals[k]["key"][1]))
    state.seen["terminal"] = winner
    state.finished_at = terminals[winner]["key"][0]
    # Only the winner's details show: a blocked job never shows the outputs of a stray publication.
    state.outputs = copy.deepcopy(terminals[winner]["detail"]) if winner == PUBLISHED else None
    state.error = copy.deepcopy(terminals[winner]["detail"]) if winner in (FAILED, CANCELLED) else None


def _blob(ref: dict) -> dict:
    return {"uri": ref["uri"], "sha256": ref.get("sha256"), "bytes": ref.get("bytes")}


def _derive_status(state: JobState) -> str:
    if state.seen.get("terminal"):
        return state.seen["terminal"]
    if state.seen.get("review_at") is not None:
        return REVIEW
    chunk_attempt = state.seen.get("chunk_attempt")
    # A resumed attempt that started after the latent was chunked is denoising again, not decoding.
    if state.segments or (chunk_attempt is not None and chunk_attempt >= state.attempt):
        return DECODING
    if state.attempt or state.checkpoints:
        return RUNNING
    if state.encoded_at is not None or state.seen.get("queue") is not None:  # the scheduler has it: encoded
        return QUEUED
    return REQUESTED


def _derive_queue(state: JobState) -> None:
    """The queue fields from the newest position event, shown only while the job waits (module docstring)."""
    queue = state.seen.get("queue")
    ran_at = _max(state.seen.get("ran_at"), state.started_at)
    waiting = (queue is not None and queue["position"] >= 1 and not state.terminal
               and (ran_at is None or queue["key"][0] > ran_at))
    if waiting:
        state.queue_position, state.queue_waiting = queue["position"], queue["waiting"]
        state.queue_eta_s, state.queue_at = queue["eta_s"], queue["key"][0]
    else:
        state.queue_position = state.queue_waiting = state.queue_eta_s = state.queue_at = None


def _eta_ms(state: JobState) -> int | None:
    """Remaining denoising time at the newest step's pace: from the events' own fields, so replays agree."""
    if state.terminal or state.total_steps is None or state.step_ms is None:
        return None
    return round(max(state.total_steps - state.step, 0) * state.step_ms)


_APPLY = {
    topics.REQUESTED.name: _apply_requested,
    **{t.name: _apply_encoded for t in topics.ENCODED.values()},
    topics.STEP_PROGRESS.name: _apply_step,
    topics.LATENT_CHECKPOINTED.name: _apply_checkpoint,
    topics.LATENT_CHUNKS.name: _apply_latent_chunk,
    topics.DECODED.name: _apply_decoded,
    topics.FLAGGED.name: _apply_flagged,
    topics.PUBLISHED.name: _apply_published,
    topics.FAILED.name: _apply_failed,
    topics.CANCELLED.name: _apply_cancelled,
    topics.CONTROL.name: _apply_cancel_request,
    topics.DELETED.name: _apply_deleted,
    topics.QUEUE.name: _apply_queue_position,
}

#: Every topic the job state folds, in pipeline order, then the scheduler's queue positions: what the tracker and
#: the gateway's live reader consume.
FOLDED_TOPICS: tuple[topics.Topic, ...] = tuple(topics.BY_NAME[name] for name in _APPLY)
#: The job's lifecycle proper: FOLDED_TOPICS without the queue positions, which are advisory (a waiting job gets
#: one about every second its position or ETA moves) and take no part in the audit's invariants.
LIFECYCLE_TOPICS: tuple[topics.Topic, ...] = tuple(t for t in FOLDED_TOPICS if t is not topics.QUEUE)


# -- what the gateway serves ---------------------------------------------------------------------------------------
def public_params(params: dict | None) -> dict | None:
    """GenerationParams as clients see them: the input image by its sha256 and size only (a blob URI is an internal
    path). Params folded before the field existed show it as null, so the two shapes compare equal."""
    if params is None:
        return None
    image = params.get("input_reference")
    return {**copy.deepcopy(params),
            "input_reference": None if image is None else {"sha256": image["sha256"], "bytes": image["bytes"]}}


def to_public(state: JobState | dict) -> dict:
    """The job as the gateway shows it: JSON-friendly, without the fold's bookkeeping."""
    if isinstance(state, dict):
        state = JobState.from_dict(state)
    progress = None
    if state.total_steps:
        progress = 1.0 if state.status == PUBLISHED else round(min(state.step / state.total_steps, 1.0), 4)
    return {
        "job_id": state.job_id,
        "tenant": state.tenant,
        "tier": state.tier,
        "status": state.status,
        "terminal": state.terminal,
        "prompt": state.prompt,
        "params": public_params(state.params),
        "seconds_requested": state.seconds_requested,
        "step": state.step,
        "total_steps": state.total_steps,
        "progress": progress,
        "eta_ms": state.eta_ms,
        "queue_position": state.queue_position,
        "queue_waiting": state.queue_waiting,
        "queue_eta_s": state.queue_eta_s,
        "queue_at": state.queue_at,
        "attempt": state.attempt,
        "resumed_from_step": state.resumed_from_step,
        "generating_chunk": state.generating_chunk,
        "chunk_count": state.chunk_count,
        "checkpoints": {"count": len(state.checkpoints),
                        "last_step": state.last_checkpoint["step"] if state.last_checkpoint else None},
        "segments": copy.deepcopy(state.segments),
        "segment_count": state.segment_count,
        "init_segment": state.init_segment,
        "playlist": state.playlist,
        "outputs": copy.deepcopy(state.outputs),
        "flags": [{k: v for k, v in f.items() if k != "event_id"} for f in state.flags],
        "error": copy.deepcopy(state.error),
        "cancel_requested": (None if state.cancel_requested is None
                             else {k: v for k, v in state.cancel_requested.items() if k != "event_id"}),
        "deleted": copy.deepcopy(state.deleted),
        "requested_at": state.requested_at,
        "started_at": state.started_at,
        "updated_at": state.updated_at,
        "finished_at": state.finished_at,
    }


def _jsonable(value: Any) -> Any:
    """Datetimes as epoch milliseconds, bytes as hex (lifecycle events carry none), containers recursively."""
    if isinstance(value, datetime):
        return epoch_ms(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return value


def jsonable_event(event: dict) -> dict:
    """The decoded event in a JSON-serialisable form that folds exactly as the original (timestamps as ms)."""
    return _jsonable(event)
