"""The gateway process's view of every job: states from the tracker, made live by the lifecycle events themselves.

Two readers feed one ``JobsView`` per gateway process, both without a consumer group (they assign partitions, so
they take nothing from anyone, and a gateway scales out by simply running more processes):

* the tracker's changelog (``consumers.tracker.JobStateReader``): read to its end at start (the history, which
  survives gateway restarts), then followed. It lags the events by the tracker's hop (tens of milliseconds);
* the lifecycle topics themselves (``consumers.job_state.FOLDED_TOPICS``: ``consumers.progress.LIFECYCLE`` plus
  ``vidgen.latent-checkpointed``, the cancellation requests on ``vidgen.control`` and the scheduler's queue
  positions on ``vidgen.queue``), read by ONE confluent-kafka consumer thread per process from the gateway's start
  time minus ``LIVE_MARGIN_MS`` (``read_events``: positions from timestamps, a short fetch wait), for the low
  latency of progress bars.

Merging them is exact because the fold is idempotent and order-insensitive (a join): a job's state is
``fold*(newest tracker state, the job's live events)``, in any order. Live events are kept in a small per-job
buffer; when a newer tracker state arrives, the buffer is folded again on top of it, and every event that no longer
changes anything (the tracker has it now) leaves the buffer, so a job the tracker has caught up with (a finished one
above all) keeps no buffer. The buffer is bounded (``LIVE_BUFFER``) should the tracker stop.

Websocket envelopes are derived from state changes, never from single events: ``envelopes(old, new)`` compares the
merged state before and after a change, whichever reader brought it. A redelivered or replayed event changes
nothing and sends nothing; a tracker state that is ahead of the live reader sends what it brought, once.

Memory: only jobs in flight, and finished ones that a websocket still follows, are held in memory. A finished job
the tracker has folded entirely leaves for the view's index (gateway/job_index.py: SQLite, a file per process),
which also keeps every job's place in its tenant's listing, so a listing page reads ``limit`` rows of an index
instead of sorting all of the tenant's jobs. Asking for a finished job reads it back.

Threads: the two reader threads only decode and hand (topic, event) / (job_id, state) items to the event loop
(batched through ``loop.call_soon_threadsafe``, never blocking on subscribers). Folding, the indices and the
subscriber queues live on the event loop thread only, so none of them needs a lock. A subscriber whose queue is full
(``SUBSCRIBER_QUEUE`` envelopes behind) is closed with a reason instead of slowing the others down.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import gc
import json
import logging
import threading

from consumers.job_state import (FLAGGED, PUBLISHED, TERMINAL_STATUSES, FOLDED_TOPICS, JobState, fold,
                                 request_fingerprint, to_public)
from streams import topics
from streams.events import now_ms
from streams.kafka import Latency
from streams.settings import Settings, private_dir

from .job_index import JobIndex

log = logging.getLogger(__name__)

#: The live reader starts this long before the gateway did: events the tracker may not have folded yet.
LIVE_MARGIN_MS = 60_000
#: Live events kept per job until the tracker has them (a safety bound; the tracker normally catches up at once).
LIVE_BUFFER = 1000
#: How far back blocked jobs are remembered (for the blocked-prompt throttle: gateway/app.py).
BLOCKED_WINDOW_MS = 3600 * 1000
#: Envelopes a subscriber may be behind before it is disconnected.
SUBSCRIBER_QUEUE = 1000
#: How often the changelog follower looks for new tracker states (the live reader carries the latency).
TRACKER_POLL_S = 0.05

#: Close codes and reasons a subscription ends with (RFC 6455: 1001 going away, 1013 try again later).
CLOSE_SLOW = 1013
CLOSE_GOING_AWAY = 1001


# -- URLs and envelopes ---------------------------------------------------------------------------------------------
def video_url(job_id: str) -> str:
    return f"/v1/videos/{job_id}"


def segment_url(job_id: str, name: str) -> str:
    return f"/v1/videos/{job_id}/segments/{name}"


def content_url(job_id: str, variant: str | None = None) -> str:
    return f"/v1/videos/{job_id}/content" + (f"?variant={variant}" if variant else "")


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _segment_name(segment: dict) -> str:
    return _name(segment.get("uri") or "") or f"segment-{segment['index']:05d}.m4s"


class Envelope(dict):
    """``{"type": ..., "data": {...}}``; its JSON text is built once however many sockets it goes to."""

    __slots__ = ("_text", "_utf8")

    def __init__(self, type_: str, data: dict):
        super().__init__(type=type_, data=data)
        self._text: str | None = None
        self._utf8: bytes | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = json.dumps(self, separators=(",", ":"), default=str)
        return self._text

    @property
    def utf8(self) -> bytes:
        """The text frame's payload, encoded once for every socket."""
        if self._utf8 is None:
            self._utf8 = self.text.encode("utf-8")
        return self._utf8


def links(state: JobState) -> dict:
    """Gateway URLs of what the job has so far (internal blob URIs are never handed out)."""
    job_id = state.job_id
    out = {"self": video_url(job_id), "events": f"{video_url(job_id)}/events"}
    if state.segments:
        out["init"] = segment_url(job_id, _name(state.init_segment or "init.mp4"))
        out["playlist"] = segment_url(job_id, _name(state.playlist or "playlist.m3u8"))
        out["segments"] = [segment_url(job_id, _segment_name(s)) for s in state.segments]
    if state.status == PUBLISHED and state.outputs:
        out["content"] = content_url(job_id)
        out["renditions"] = {r["name"]: content_url(job_id, r["name"]) for r in state.outputs.get("renditions", [])}
    return out


def _blob(ref: dict | None, url: str) -> dict | None:
    return None if ref is None else {**{k: v for k, v in ref.items() if k != "uri"}, "url": url}


def public_state(state: JobState) -> dict:
    """The ``state`` envelope's data: ``to_public`` with every stored file as a gateway URL (blob store URIs are
    internal; the same rewriting as GET /v1/videos/{id}'s ``vidgen`` object), plus ``links``."""
    job_id = state.job_id
    public = to_public(state)
    public["segments"] = [{**{k: v for k, v in s.items() if k != "uri"}, "url": segment_url(job_id, _segment_name(s))}
                          for s in public["segments"]]
    for key in ("init_segment", "playlist"):
        if public[key]:
            public[key] = segment_url(job_id, _name(public[key]))
    outputs = public["outputs"]
    if outputs:
        outputs["video"] = _blob(outputs.get("video"), content_url(job_id))
        outputs["manifest"] = _blob(outputs.get("manifest"), content_url(job_id, "manifest"))
        if outputs.get("playlist"):
            outputs["playlist"] = _blob(outputs["playlist"],
                                        f"{video_url(job_id)}/published/{_name(outputs['playlist']['uri'])}")
        outputs["renditions"] = [_blob(r, content_url(job_id, r["name"])) for r in outputs.get("renditions") or ()]
    public["links"] = links(state)
    return public


def state_envelope(state: JobState) -> Envelope:
    return Envelope("state", public_state(state))


def _segment_data(state: JobState, segment: dict) -> dict:
    job_id = state.job_id
    return {"job_id": job_id, "index": segment["index"], "url": segment_url(job_id, _segment_name(segment)),
            "init_url": segment_url(job_id, _name(state.init_segment or "init.mp4")),
            "playlist_url": segment_url(job_id, _name(state.playlist or "playlist.m3u8")),
            "frame_start": segment.get("frame_start"), "frames": segment.get("frames"),
            "is_last": segment.get("is_last", False)}


def _terminal_data(state: JobState) -> dict:
    job_id = state.job_id
    data = {"job_id": job_id, "status": state.status, "finished_at": state.finished_at}
    if state.status == PUBLISHED:
        outputs = state.outputs or {}
        data.update({
            "url": content_url(job_id),
            "renditions": [{"name": r["name"], "width": r.get("width"), "height": r.get("height"),
                            "url": content_url(job_id, r["name"])} for r in outputs.get("renditions", [])],
            "playlist_url": segment_url(job_id, _name(state.playlist or "playlist.m3u8")) if state.segments else None,
            "frames": outputs.get("frames"), "width": outputs.get("width"), "height": outputs.get("height"),
            "fps": outputs.get("fps"), "manifest_label": outputs.get("manifest_label"),
        })
    elif state.error:
        data.update({k: v for k, v in state.error.items() if k != "kind"})
    return data


def queued_data(state: JobState) -> dict:
    """The ``queued`` envelope's data: when the job entered the queue, and where it stands in it (the scheduler's
    newest QueuePosition; all three None until the scheduler has placed it, and once it runs)."""
    return {"job_id": state.job_id, "tier": state.tier, "at": state.encoded_at, "position": state.queue_position,
            "waiting": state.queue_waiting, "eta_s": state.queue_eta_s}


def envelopes(old: JobState | None, new: JobState) -> list[Envelope]:
    """What a subscriber is told when the job's state goes from ``old`` (None: not seen yet) to ``new``.

    Derived from the difference only, so the same change never produces two envelopes whichever reader brings it,
    and a job that first appears already advanced (a tracker state) is told in one go: queued, started, its latest
    progress, its checkpoints, segments, flags and end. ``queued`` is told when the prompt is encoded and again
    whenever the job's queue position or ETA changes while it waits (``queued_data``). After the job's end nothing
    more is told (a straggler, such as a duplicate agent's late step, still folds into the state a new subscriber
    gets).
    """
    if old is not None and old.terminal:
        return []
    job_id = new.job_id
    out: list[Envelope] = []
    entered_queue = new.encoded_at is not None and (old is None or old.encoded_at is None)
    queue = (new.queue_position, new.queue_eta_s)
    queue_moved = new.queue_position is not None and (old is None or (old.queue_position, old.queue_eta_s) != queue)
    if entered_queue or queue_moved:
        out.append(Envelope("queued", queued_data(new)))
    old_position = (0, 0) if old is None else (old.attempt, old.step)
    if new.attempt > old_position[0]:
        out.append(Envelope("started", {"job_id": job_id, "attempt": new.attempt,
                                        "resumed_from_step": new.resumed_from_step, "max": new.total_steps,
                                        "agent_id": new.agent_id, "at": new.started_at}))
    if new.step and (new.attempt, new.step) != old_position:
        out.append(Envelope("progress", {"job_id": job_id, "value": new.step, "max": new.total_steps,
                                         "eta_ms": new.eta_ms, "attempt": new.attempt, "step_ms": new.step_ms,
                                         # a model that streams while generating: the chunk the step worked on
                                         "chunk_index": new.generating_chunk, "chunk_count": new.chunk_count}))
    old_checkpoints = set() if old is None else set(old.checkpoints)
    for step in new.checkpoints:
        if step not in old_checkpoints:
            last = new.last_checkpoint or {}
            out.append(Envelope("checkpoint", {"job_id": job_id, "step": step, "max": new.total_steps,
                                               "attempt": last.get("attempt") if last.get("step") == step else None}))
    old_segments = set() if old is None else {s["index"] for s in old.segments}
    for segment in new.segments:
        if segment["index"] not in old_segments:
            out.append(Envelope("segment", _segment_data(new, segment)))
    old_flags = set() if old is None else {f["event_id"] for f in old.flags}
    for flag in new.flags:
        if flag["event_id"] not in old_flags:
            data = {"job_id": job_id, **{k: v for k, v in flag.items() if k != "event_id"}}
            data["terminal"] = new.status == FLAGGED  # a BLOCK ends the job; a held REVIEW waits for a reviewer
            out.append(Envelope("flagged", data))
    if new.status in TERMINAL_STATUSES and (old is None or old.status != new.status) and new.status != FLAGGED:
        out.append(Envelope(new.status, _terminal_data(new)))  # published / failed / cancelled
    return out


# -- subscriptions --------------------------------------------------------------------------------------------------
class Subscription:
    """One websocket's feed: ``queue`` yields envelopes, then None once the subscription was closed by the view
    (``close_code`` / ``close_reason`` say why: too slow, or the gateway is stopping)."""

    __slots__ = ("tenant", "job_id", "queue", "close_code", "close_reason")

    def __init__(self, tenant: str, job_id: str | None, maxsize: int = SUBSCRIBER_QUEUE):
        self.tenant = tenant
        self.job_id = job_id
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)
        self.close_code: int | None = None
        self.close_reason: str | None = None

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def _close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.close_code, self.close_reason = code, reason
        while not self.queue.empty():  # what it had not read yet no longer matters: it reconnects to a fresh state
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class _Job:
    __slots__ = ("job_id", "state", "base", "live", "overflowed", "first_request", "waiters")

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.state: JobState | None = None  # fold*(base, live)
        self.base: JobState | None = None  # the tracker's newest state
        self.live: collections.deque = collections.deque(maxlen=LIVE_BUFFER)  # (topic, event) not in base yet
        self.overflowed = False
        self.first_request: str | None = None  # the fingerprint of the first VideoRequested read from Kafka
        self.waiters: list[asyncio.Future] = []  # first_request() calls waiting for it


def _sort_key(state: JobState) -> tuple:
    return (state.requested_at or state.encoded_at or state.updated_at or 0, state.job_id)


# -- the view -------------------------------------------------------------------------------------------------------
class JobsView:
    """Every job's state in this gateway process, and its websocket subscriptions (see the module docstring).

    All methods but ``start``/``stop`` are synchronous and must be called on the event loop's thread. Without
    ``start`` (unit tests) nothing reads Kafka: ``ingest_event`` / ``ingest_tracker_state`` feed it by hand.
    """

    def __init__(self, settings: Settings | None = None, *, live_margin_ms: int = LIVE_MARGIN_MS,
                 subscriber_queue: int = SUBSCRIBER_QUEUE, tracker_timeout_s: float = 30.0):
        self.settings = settings
        self.live_margin_ms = live_margin_ms
        self.subscriber_queue = subscriber_queue
        self.tracker_timeout_s = tracker_timeout_s
        self._jobs: dict[str, _Job] = {}  # jobs in flight, and finished ones someone still follows
        self._index = JobIndex(None if settings is None else private_dir(settings.var_dir) / "gateway")
        self._in_flight: dict[str, set[str]] = {}
        self._end_listeners: list = []  # called with (tenant, job id) when a job ends (gateway/quota.py)
        self._blocked: dict[str, list[int]] = {}  # tenant → when its flagged (blocked) jobs ended, the last hour's
        self._job_subs: dict[str, set[Subscription]] = {}
        self._tenant_subs: dict[str, set[Subscription]] = {}
        # Hand-over from the reader threads to the loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple] = []
        self._pending_lock = threading.Lock()
        self._drain_scheduled = False
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reader = None  # the JobStateReader
        self._loading_tracker = False
        self.started_ms: int | None = None
        self.live_since_ms: int | None = None
        self.counters = collections.Counter()  # live events, tracker states, envelopes, dropped subscribers ...

    # -- life cycle -------------------------------------------------------------------------------------------------
    async def start(self, app=None) -> None:
        """Start following the live events, then load the tracker's states (returns once they are loaded).

        Takes (and ignores) an ``app`` so it can be an aiohttp ``on_startup`` hook itself.
        """
        from consumers.tracker import JobStateReader

        if self.settings is None:
            raise RuntimeError("JobsView.start needs settings (a Kafka cluster to read)")
        if self._threads:
            return  # started already (by hand, then again as an app's on_startup hook)
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        self.started_ms = now_ms()
        self.live_since_ms = self.started_ms - self.live_margin_ms
        live = threading.Thread(target=self._live_main, name="gateway-live-events", daemon=True)
        live.start()
        self._threads.append(live)
        self._reader = JobStateReader(self.settings, on_change=self._on_tracker_change,
                                      client_id="vidgen.gateway-states", latency=Latency.BACKGROUND)
        states = await self._loop.run_in_executor(None, self._load_tracker)
        for job_id, state in states.items():
            self.ingest_tracker_state(job_id, state)
        self.counters["tracker_states_loaded"] = len(states)
        follower = threading.Thread(target=self._tracker_main, name="gateway-tracker-states", daemon=True)
        follower.start()
        self._threads.append(follower)
        # Everything loaded so far (the modules, the tracker's states) lives as long as the process: leave it out of
        # the garbage collector's full passes, which would otherwise stall every socket for ~0.1-0.3 s each time.
        gc.freeze()
        log.info("jobs view: %d job states from the tracker; live events since %d", len(states), self.live_since_ms)

    async def close_subscriptions(self, app=None) -> None:
        """Close every subscription (1001 going away): their sockets close at once instead of holding the server's
        shutdown for its whole timeout. Meant as an aiohttp ``on_shutdown`` hook (which runs before the server waits
        for its handlers); ``stop`` does it too."""
        for subs in [*self._job_subs.values(), *self._tenant_subs.values()]:
            for sub in list(subs):
                sub._close(CLOSE_GOING_AWAY, "the gateway is shutting down")
        self._job_subs.clear()
        self._tenant_subs.clear()

    async def stop(self, app=None) -> None:
        """Close every subscription, stop both readers. Also usable as an ``on_cleanup`` hook."""
        await self.close_subscriptions()
        self._stopping.set()
        loop = asyncio.get_running_loop()
        for thread in self._threads:
            await loop.run_in_executor(None, thread.join, 10)
        self._threads.clear()
        if self._reader is not None:
            await loop.run_in_executor(None, self._reader.close)
            self._reader = None
        self._index.close()  # its file goes: the tracker's changelog is read again at the next start

    # -- reader threads ---------------------------------------------------------------------------------------------
    def _load_tracker(self) -> dict[str, dict]:
        self._loading_tracker = True  # changes read while loading are taken from reader.states afterwards
        try:
            return dict(self._reader.catch_up(self.tracker_timeout_s))
        except TimeoutError as exc:
            log.warning("jobs view: %s; going on with what was read", exc)
            return dict(self._reader.states)
        finally:
            self._loading_tracker = False

    def _on_tracker_change(self, job_id: str, state: dict | None) -> None:
        if not self._loading_tracker:
            self._post(("tracker", job_id, state))

    def _tracker_main(self) -> None:
        while not self._stopping.is_set():
            try:
                assigned = bool(self._reader._at_end) or self._reader._assign()
                if assigned:
                    self._reader.catch_up(5.0)
                self._stopping.wait(TRACKER_POLL_S if assigned else 1.0)  # no changelog yet: no tracker has run
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - a broker hiccup must not end the follower
                log.exception("jobs view: reading the tracker's changelog failed; retrying")
                self._stopping.wait(1.0)

    def _live_main(self) -> None:
        from consumers.progress import read_events
        from consumers.job_state import epoch_ms

        since = self.live_since_ms
        while not self._stopping.is_set():
            stream = read_events(self.settings, since_ms=since, lifecycle=FOLDED_TOPICS, poll_s=0.1,
                                 skip_before_ms=since, latency=self._live_latency,
                                 latencies=(Latency.PROGRESS, Latency.BACKGROUND))
            try:
                for job_event in stream:
                    if self._stopping.is_set():
                        break
                    if job_event is None:
                        continue
                    self._post(("event", job_event.topic, job_event.event))
                    at = epoch_ms(job_event.event.get("timestamp"))
                    if at is not None:  # where a restarted reader goes on from (replays are harmless)
                        since = max(since, at - self.live_margin_ms)
            except Exception:  # noqa: BLE001 - the broker or the registry went away: read again from where it was
                log.exception("jobs view: the live event reader failed; restarting it")
                self._stopping.wait(1.0)
            finally:
                stream.close()

    def _live_latency(self) -> str:
        """The live reader's fetch wait: a progress bar's while any job is in flight, else a second (an idle
        gateway costs the embedded broker next to nothing; a new job's request is seen within that second, long
        before its first step)."""
        busy = any(list(self._in_flight.values()))  # from the reader thread: a copy, taken in one step
        return Latency.PROGRESS if busy else Latency.BACKGROUND

    def _post(self, item: tuple) -> None:
        """From a reader thread: queue an item for the loop; one wake-up per batch, never waits for the loop."""
        with self._pending_lock:
            self._pending.append(item)
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the process is ending
            pass

    def _drain(self) -> None:
        with self._pending_lock:
            items, self._pending = self._pending, []
            self._drain_scheduled = False
        # A tracker state is a whole snapshot of its job, and the fold is a join: of a batch (a second of changes
        # when the changelog is read once a second), only each job's newest state needs folding.
        newest = {item[1]: index for index, item in enumerate(items) if item[0] == "tracker"}
        items = [item for index, item in enumerate(items) if item[0] != "tracker" or newest[item[1]] == index]
        for item in items:
            try:
                if item[0] == "event":
                    self.ingest_event(item[1], item[2])
                else:
                    self.ingest_tracker_state(item[1], item[2])
            except Exception:  # noqa: BLE001 - one bad event must not stop the others
                log.exception("jobs view: cannot take %s", item[:2])

    # -- folding ----------------------------------------------------------------------------------------------------
    def ingest_event(self, topic_name: str, event: dict, local: bool = False) -> bool:
        """Fold one live lifecycle event (decoded) into its job; True if it changed the job's state. ``local``: this
        process's own request (note_submitted), not read from Kafka."""
        job = self._job(event["job_id"], create=True)
        if topic_name == topics.REQUESTED.name and not local:
            self._first_request_read(job, event)
        old = job.state
        new = fold(old, topic_name, event)
        self.counters["live_events"] += 1
        if new == old:
            self._shelve_if_done(job)  # (a finished job it brought back from the index goes back)
            return False  # a redelivery, a replay, or what the tracker already had
        # It changed the state, so the tracker's state (if any) does not have it yet: keep it for the next one.
        if len(job.live) == job.live.maxlen and not job.overflowed:
            job.overflowed = True
            log.warning("jobs view: job %s has %d live events the tracker has not folded yet; the oldest go",
                        job.job_id, LIVE_BUFFER)
        job.live.append((topic_name, event))
        job.state = new
        self._changed(job, old, new)
        return True

    def ingest_tracker_state(self, job_id: str, state: dict | None) -> bool:
        """Take the tracker's newest state of a job (None: the job left the table); True if the view changed."""
        self.counters["tracker_states"] += 1
        job = self._job(job_id, create=state is not None)
        if state is None:
            if job is not None and job.state is not None:
                self._forget(job)
            return job is not None
        base = JobState.from_dict(state)
        if job.base is not None and (base.updated_at or 0) < (job.base.updated_at or 0):
            # Tracker states of a job only grow (updated_at is a maximum): an older one is a replayed copy (or a
            # tracker defect) and would take away what the live events brought, since they were let go.
            self.counters["stale_tracker_states"] += 1
            return False
        merged, kept = base, []
        for topic_name, event in job.live:
            folded = fold(merged, topic_name, event)
            if folded != merged:  # the tracker does not have this one yet
                kept.append((topic_name, event))
                merged = folded
        job.live = collections.deque(kept, maxlen=LIVE_BUFFER)  # empty once the tracker has them all
        job.base = base
        old = job.state
        if merged == old:
            self._shelve_if_done(job)
            return False
        job.state = merged
        self._changed(job, old, merged)
        self._shelve_if_done(job)
        return True

    def note_deleted(self, event: dict) -> None:
        """The gateway just published this VideoDeleted: the video is gone at once, before Kafka brings it back."""
        self.ingest_event(topics.DELETED.name, event, local=True)

    def note_submitted(self, job_id: str, tenant: str, request_event: dict) -> None:
        """The gateway just published this VideoRequested: show the job ("requested") before Kafka brings it back."""
        event = dict(request_event, job_id=job_id, tenant=tenant)  # the authenticated tenant, whatever the event says
        self.ingest_event(topics.REQUESTED.name, event, local=True)

    def request_fingerprint(self, job_id: str) -> str | None:
        """The fingerprint (consumers.job_state.request_fingerprint) of the job's request as this view has it."""
        state = self.state(job_id)
        return None if state is None else state.seen.get("request")

    async def first_request(self, job_id: str, timeout_s: float) -> str | None:
        """The fingerprint of the job's first VideoRequested on Kafka — the one the platform runs, whichever gateway
        published it — once the live reader has read it; None if it has not within ``timeout_s``."""
        if not self._threads:
            return None  # nothing reads Kafka (a view fed by hand)
        job = self._job(job_id, create=True)
        if job.first_request is not None:
            return job.first_request
        waiter = asyncio.get_running_loop().create_future()
        job.waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            return None
        finally:
            if waiter in job.waiters:
                job.waiters.remove(waiter)
            self._shelve_if_done(job)

    def _first_request_read(self, job: _Job, event: dict) -> None:
        """A VideoRequested came from Kafka: the first one is the job's. If this process's own request lost a race
        for the job id (shown at once by note_submitted), the job is shown as the platform has it."""
        if job.first_request is not None:
            return
        job.first_request = request_fingerprint(event)
        for waiter in job.waiters:
            if not waiter.done():
                waiter.set_result(job.first_request)
        if job.state is not None and job.state.seen.get("request") not in (None, job.first_request):
            lost = [(t, e) for t, e in job.live if t == topics.REQUESTED.name
                    and request_fingerprint(e) != job.first_request]
            job.live = collections.deque(((t, e) for t, e in job.live if (t, e) not in lost), maxlen=LIVE_BUFFER)
            rebuilt = job.base
            for topic_name, live_event in job.live:
                rebuilt = fold(rebuilt, topic_name, live_event)
            job.state = rebuilt

    def _changed(self, job: _Job, old: JobState | None, new: JobState) -> None:
        tenant = new.tenant
        if tenant is not None:
            if old is None or old.tenant != tenant:
                if old is not None and old.tenant is not None:
                    self._in_flight.get(old.tenant, set()).discard(job.job_id)
            if new.deleted is not None:  # its owner deleted it: listed nowhere, kept only while it runs
                if old is None or old.deleted is None:
                    self._index.remove(job.job_id)
            elif old is None or old.tenant != tenant or _sort_key(old) != _sort_key(new):
                self._index.place(job.job_id, tenant, _sort_key(new)[0])
            in_flight = self._in_flight.setdefault(tenant, set())
            if new.terminal:
                in_flight.discard(job.job_id)
            else:
                in_flight.add(job.job_id)
            if new.terminal and (old is None or not old.terminal):
                for listener in self._end_listeners:
                    listener(tenant, job.job_id)
            if new.status == FLAGGED and (old is None or old.status != FLAGGED) and new.finished_at:
                ended = self._blocked.setdefault(tenant, [])
                bisect.insort(ended, new.finished_at)
                del ended[:bisect.bisect_left(ended, ended[-1] - BLOCKED_WINDOW_MS)]
        job_subs = self._job_subs.get(job.job_id)
        tenant_subs = self._tenant_subs.get(tenant) if tenant is not None else None
        if not job_subs and not tenant_subs:
            return
        envs = envelopes(old, new)
        if job_subs and envs:
            self._deliver(job_subs, envs, tenant)
        if tenant_subs:
            # A job whose tenant was unknown until now (its request not seen yet) is news to the tenant's feed.
            feed = envs if (old is not None and old.tenant == tenant) else envelopes(None, new)
            if feed:
                self._deliver(tenant_subs, feed, tenant)

    def _deliver(self, subs: set[Subscription], envs: list[Envelope], tenant: str | None) -> None:
        for sub in list(subs):
            if sub.tenant != tenant:  # never another tenant's job, whatever happened to the indices
                continue
            for env in envs:
                try:
                    sub.queue.put_nowait(env)
                except asyncio.QueueFull:
                    self._drop(sub)
                    break
            else:
                self.counters["envelopes"] += len(envs)

    def _drop(self, sub: Subscription) -> None:
        self.counters["slow_subscribers"] += 1
        self.unsubscribe(sub)
        sub._close(CLOSE_SLOW, f"subscriber too slow: {self.subscriber_queue} envelopes behind; "
                               "reconnect for the current state")

    def _forget(self, job: _Job) -> None:
        state = job.state
        self._jobs.pop(job.job_id, None)
        self._index.remove(job.job_id)
        if state is not None and state.tenant is not None:
            self._in_flight.get(state.tenant, set()).discard(job.job_id)

    # -- finished jobs leave memory ---------------------------------------------------------------------------------
    def _job(self, job_id: str, create: bool = False) -> _Job | None:
        """The job in memory: brought back from the index if it was shelved, made if ``create``."""
        job = self._jobs.get(job_id)
        if job is None:
            shelved = self._index.take(job_id)
            if shelved is not None:
                job = self._jobs[job_id] = _Job(job_id)
                job.state = job.base = shelved[0]
                job.first_request = shelved[1]
                self.counters["jobs_unshelved"] += 1
            elif create:
                job = self._jobs[job_id] = _Job(job_id)
        return job

    def _shelve_if_done(self, job: _Job) -> None:
        """A finished job the tracker has folded entirely (no live event of its own left), that no websocket
        follows and no request waits on, leaves memory for the index (gateway/job_index.py)."""
        state = job.state
        if (state is None or not state.terminal or state.tenant is None or job.live or job.waiters
                or job.job_id in self._job_subs or self._jobs.get(job.job_id) is not job):
            return
        self._index.shelve(job.job_id, state, job.first_request)
        del self._jobs[job.job_id]
        self.counters["jobs_shelved"] += 1

    # -- queries ----------------------------------------------------------------------------------------------------
    def state(self, job_id: str) -> JobState | None:
        job = self._jobs.get(job_id)
        return self._index.peek(job_id) if job is None else job.state

    def get(self, job_id: str) -> dict | None:
        """The job's public state (``consumers.job_state.to_public``), or None if this gateway has not seen it."""
        job = self._jobs.get(job_id)
        if job is None:
            return self._index.public(job_id)
        return None if job.state is None else to_public(job.state)

    def list_for_tenant(self, tenant: str, limit: int = 50, after: str | None = None,
                        newest_first: bool = True) -> list[dict]:
        """The tenant's jobs, newest request first (or oldest first); ``after`` (a job id from the previous page)
        continues a listing.

        An ``after`` the view does not know (another tenant's job, or none) gives an empty page.
        """
        page = []
        for job_id, shelved in self._index.page(tenant, max(0, limit), after, newest_first):  # one index range
            job = self._jobs.get(job_id)
            if job is not None and job.state is not None:
                page.append(to_public(job.state))
            elif shelved is not None:
                page.append(json.loads(shelved))
        return page

    def in_flight(self, tenant: str) -> int:
        """How many of the tenant's jobs have not ended (requested, queued, running, decoding, in review)."""
        return len(self._in_flight.get(tenant, ()))

    def add_end_listener(self, listener) -> None:
        """``listener(tenant, job_id)`` is called (on the loop) whenever a job this view follows ends."""
        self._end_listeners.append(listener)

    def blocked_since(self, tenant: str, since_ms: int) -> list[int]:
        """When the tenant's jobs that the platform blocked (flagged) since ``since_ms`` (at most an hour ago)
        ended, oldest first."""
        ended = self._blocked.get(tenant, [])
        return ended[bisect.bisect_left(ended, since_ms):]

    def jobs_count(self) -> int:
        """Jobs in memory (in flight, or followed); the finished ones are in the index."""
        return len(self._jobs)

    # -- subscriptions ----------------------------------------------------------------------------------------------
    def subscribe(self, tenant: str, job_id: str | None = None) -> Subscription:
        """A feed of one job (``job_id``) or of all the tenant's jobs (None). The first envelopes are ``state``:
        the job's current public state, or, for the tenant's feed, that of each of its jobs in flight (newest
        first). Raises KeyError for a job this view does not know or that belongs to another tenant."""
        sub = Subscription(tenant, job_id, self.subscriber_queue)
        if job_id is not None:
            state = self.state(job_id)
            if state is None or state.tenant != tenant:
                raise KeyError(job_id)
            sub.queue.put_nowait(state_envelope(state))
            self._job_subs.setdefault(job_id, set()).add(sub)
        else:
            running = sorted((self._jobs[j].state for j in self._in_flight.get(tenant, ())), key=_sort_key,
                             reverse=True)
            for state in running[: self.subscriber_queue // 2]:
                sub.queue.put_nowait(state_envelope(state))
            self._tenant_subs.setdefault(tenant, set()).add(sub)
        self.counters["subscriptions"] += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        index = self._job_subs if sub.job_id is not None else self._tenant_subs
        key = sub.job_id if sub.job_id is not None else sub.tenant
        subs = index.get(key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del index[key]
                job = self._jobs.get(key) if sub.job_id is not None else None
                if job is not None:
                    self._shelve_if_done(job)

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._job_subs.values()) + sum(len(s) for s in self._tenant_subs.values())
