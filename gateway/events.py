"""Websocket progress feeds: ``GET /v1/videos/{video_id}/events`` (one job) and ``GET /v1/events`` (every job of
the caller's tenant).

Authentication is the app's (``request["tenant"]``, from ``Authorization: Bearer <key>`` or ``?api_key=``, since
browsers cannot set headers on a WebSocket). ``/v1/videos/{id}/events`` answers 404 JSON (before upgrading) for a
job this gateway does not know and for another tenant's job alike. Everything comes from the process's one
``JobsView`` (``request.app["jobs"]``), which folds the lifecycle events and the tracker's states: one Kafka consumer
per gateway process, however many sockets.

Envelope reference
==================

Every server message is one JSON text frame ``{"type": <type>, "data": {...}}``; every ``data`` has ``job_id``.
Clients should ignore types and fields they do not know (new ones may be added). Times are epoch milliseconds;
URLs are gateway paths (relative to the gateway's origin, authenticated like every API call).

``state``
    The job's whole public state (as ``GET /v1/videos/{id}`` shows it: ``status``, ``step``, ``total_steps``,
    ``progress``, ``eta_ms``, ``queue_position``, ``queue_eta_s``, ``segments`` (each with a ``url``), ``outputs``,
    ``flags``, ``error``, ...) plus ``links`` (``self``, ``events``, and when they exist ``init``, ``playlist``,
    ``segments``, ``content``, ``renditions``). Always the first message of ``/v1/videos/{id}/events``, so a late
    subscriber starts from the current state; on ``/v1/events`` the first messages are one ``state`` per job of the
    tenant not yet finished (newest first). Later envelopes continue from that state, with no gap and no repeat.
``queued``
    ``{job_id, tier, at, position, waiting, eta_s}``: the job waits for a GPU agent. Sent when the prompt is encoded
    (``at``) and again whenever the scheduler moves the job's ``position`` in the fleet's queue (1 = starts next) or
    its ``eta_s`` (seconds until it is expected to start, from recent step times; null when unknown); ``waiting``
    is the length of the whole queue. ``position``, ``waiting`` and ``eta_s`` are null until the scheduler has
    placed the job. A job requeued after it ran (preempted, its agent died) is ``queued`` again.
``started``
    ``{job_id, attempt, resumed_from_step, max, agent_id, at}``: the first denoising step of an attempt finished
    (attempt 1 is the first run; a higher one resumed from a checkpoint at ``resumed_from_step``).
``progress``
    ``{job_id, value, max, eta_ms, attempt, step_ms, chunk_index, chunk_count}``: denoising step ``value`` of ``max``
    finished (``chunk_index``/``chunk_count``: a model that streams while generating, else null); ``eta_ms`` is
    the remaining denoising time at the pace of the newest step. The shape ComfyUI clients expect
    (``{"type": "progress", "data": {"value", "max"}}``). ``value`` can go down only with a higher ``attempt``.
``checkpoint``
    ``{job_id, step, max, attempt}``: the job can resume from this step if its agent dies.
``segment``
    ``{job_id, index, url, init_url, playlist_url, frame_start, frames, is_last}``: a playable fMP4 media segment
    (``url``: ``/v1/videos/{id}/segments/segment-00000.m4s``); play ``init_url`` then the segments in index order,
    or the live HLS playlist ``playlist_url`` (``EVENT`` while growing, ``ENDLIST`` after the last segment).
``flagged``
    ``{job_id, stage, decision, ends_job, terminal, reasons, scores, policy_version, at}``: a compliance decision.
    ``decision`` BLOCK ends the job (``terminal`` true, status ``flagged``: the job's last envelope); REVIEW with
    ``ends_job`` holds it for a reviewer (a ``published`` may follow).
``published``
    ``{job_id, status, finished_at, url, renditions: [{name, width, height, url}], playlist_url, frames, width,
    height, fps, manifest_label}``: the job ended with a video: ``url`` is ``/v1/videos/{id}/content``, each
    rendition's ``/v1/videos/{id}/content?variant=<name>``.
``failed``
    ``{job_id, status, finished_at, stage, reason, error_type, attempts}``: the job ended in error.
``cancelled``
    ``{job_id, status, finished_at, stage, reason, requested_by, stopped_at_step}``: the job was stopped on request.

A job ends with exactly one of ``published``, ``failed``, ``cancelled`` or a ``flagged`` with ``terminal`` true.
The per-job socket stays open after it (the client closes it when it likes); nothing more is sent for the job.

Connection: the server pings every ``HEARTBEAT_S`` seconds (a client that answers no ping is dropped); client
messages are ignored. Close codes: 1000 normal; 1001 the gateway is shutting down; 1013 the subscriber fell
``SUBSCRIBER_QUEUE`` (1,000) envelopes behind and was dropped so as not to slow the others down (reconnect: the
first envelope is the current state again); 4404 the job disappeared while connecting.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from aiohttp import WSMsgType, web

from .errors import error_response
from .jobs import Envelope, JobsView, Subscription

log = logging.getLogger(__name__)

HEARTBEAT_S = 25.0
#: Clients send nothing that matters; a small limit keeps a misbehaving one from costing memory.
MAX_CLIENT_MESSAGE = 4096


def tenant_of(request: web.Request) -> str | None:
    """The authenticated tenant's id (``request["tenant"]`` is a ``gateway.tenants.Tenant`` or a plain id)."""
    tenant = request.get("tenant")
    if tenant is None or isinstance(tenant, str):
        return tenant
    return getattr(tenant, "id", None)


def _unauthenticated() -> web.Response:
    return error_response(401, "unauthenticated", "an API key is required (Authorization: Bearer <key>, or "
                                                  "?api_key= on websockets)",
                          headers={"WWW-Authenticate": "Bearer"})


async def job_events(request: web.Request) -> web.StreamResponse:
    """``GET /v1/videos/{video_id}/events``: the job's ``state``, then every envelope until the client closes."""
    tenant = tenant_of(request)
    if tenant is None:
        return _unauthenticated()
    jobs: JobsView = request.app["jobs"]
    job_id = request.match_info["video_id"]
    state = jobs.get(job_id)
    if state is None or state["tenant"] != tenant:  # another tenant's job is answered exactly like an unknown one
        return error_response(404, "video_not_found", f"no video with id {job_id!r}", param="video_id")
    async with _websocket_of(request, tenant) as ws:
        if not isinstance(ws, web.WebSocketResponse):
            return ws  # the tenant's limit: 429
        try:
            subscription = jobs.subscribe(tenant, job_id)
        except KeyError:
            await ws.close(code=4404, message=b"video not found")
            return ws
        return await _serve(ws, jobs, subscription)


async def tenant_events(request: web.Request) -> web.StreamResponse:
    """``GET /v1/events``: a ``state`` per unfinished job of the tenant, then every envelope of its jobs."""
    tenant = tenant_of(request)
    if tenant is None:
        return _unauthenticated()
    jobs: JobsView = request.app["jobs"]
    async with _websocket_of(request, tenant) as ws:
        if not isinstance(ws, web.WebSocketResponse):
            return ws  # the tenant's limit: 429
        return await _serve(ws, jobs, jobs.subscribe(tenant, None))


@contextlib.asynccontextmanager
async def _websocket_of(request: web.Request, tenant: str):
    """The upgraded websocket, counted against the tenant's limit while it is open; or, over the limit, a 429
    (before the upgrade: a browser sees the status) naming the limit."""
    counts = request.app.get("websockets")
    if counts is not None and not counts.take(tenant):
        yield error_response(429, "too_many_websockets",
                             f"the tenant has its limit of {counts.limit} open websockets; close one first "
                             f"(/v1/events follows all of a tenant's jobs on one)", headers={"Retry-After": "1"})
        return
    try:
        ws = _response()
        await ws.prepare(request)
        yield ws
    finally:
        if counts is not None:
            counts.give_back(tenant)


def add_routes(app: web.Application) -> None:
    """Mount both handlers (for an app that does not register them itself)."""
    app.router.add_get("/v1/videos/{video_id}/events", job_events)
    app.router.add_get("/v1/events", tenant_events)


def _response() -> web.WebSocketResponse:
    # No permessage-deflate: compressing every envelope separately for every socket costs more CPU than the few
    # hundred bytes of an envelope are worth, and fan-out is what the gateway must do cheaply.
    return web.WebSocketResponse(heartbeat=HEARTBEAT_S, compress=False, max_msg_size=MAX_CLIENT_MESSAGE)


async def _serve(ws: web.WebSocketResponse, jobs: JobsView, subscription: Subscription) -> web.WebSocketResponse:
    writer = asyncio.create_task(_write(ws, subscription))
    try:
        async for msg in ws:  # answers pings, notices the client's close; what clients send is ignored
            if msg.type == WSMsgType.ERROR:
                break
    finally:
        jobs.unsubscribe(subscription)
        writer.cancel()
        try:
            await writer
        except (asyncio.CancelledError, ConnectionResetError):
            pass
        except Exception:  # noqa: BLE001 - a socket that broke while writing: nothing more to do for it
            log.debug("websocket writer ended with an error", exc_info=True)
    return ws


async def _write(ws: web.WebSocketResponse, subscription: Subscription) -> None:
    queue = subscription.queue
    while True:
        envelope = await queue.get()
        if envelope is None:  # the view closed the subscription: too slow, or the gateway stops
            reason = (subscription.close_reason or "").encode("utf-8")[:120]
            await ws.close(code=subscription.close_code or 1000, message=reason)
            return
        if isinstance(envelope, Envelope):
            await ws.send_frame(envelope.utf8, WSMsgType.TEXT)  # encoded once, whatever the number of sockets
        else:
            await ws.send_str(json.dumps(envelope, separators=(",", ":"), default=str))
