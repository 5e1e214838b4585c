"""Delivering a job's files from the blob store: strong ETags, Cache-Control, byte ranges, presigned redirects.

Every file route of the gateway (a job's content, renditions and manifest, its live segments and playlist, the
published set's playlists and media) ends in ``serve_blob``, after its handler has checked the tenant and picked the
blob. The HTTP semantics (RFC 9110: validators, conditional requests, a single byte range) are decided here once,
from the store's ``stat``, for every store; only the body differs:

* a local store's file goes out with sendfile (``local_file``), never through Python buffers;
* an S3 object is streamed in ``CHUNK_BYTES`` ranges read in a thread (obstore blocks), the next one read while the
  current one is written, so a video is never whole in the gateway's memory;
* where the store can presign and ``settings.blob_redirect`` is ``auto``, the client gets a 307 to a short-lived
  presigned URL instead and the bytes never pass through the gateway — after the tenant check (the handler's) and
  the existence check (here: a missing blob stays a 404, never a redirect to one).

Only the published set's media files are redirected; playlists never: the URIs inside them are relative (``segment-00000.m4s``, ``360p.m3u8``), and a
player resolves them against the URL it fetched the playlist from. Through the gateway each resolves to a gateway
URL, checked and signed on its own; against a presigned URL each would be an unsigned bucket URL, refused.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass, replace
from email.utils import formatdate

from aiohttp import web

from streams.blobs import BlobError, BlobStoreUnavailable

from .errors import ApiError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
YEAR_S = 365 * 24 * 3600
RETRY_AFTER_S = 2
#: Every response is ``private``: it answers a tenant's API key, so a shared cache (a CDN in front of the gateway)
#: that keyed it by URL alone would hand one tenant's video to another. A CDN caches the presigned URLs instead.
#: Content-addressed and never-rewritten files are ``immutable``: the published set lives in a folder named after
#: the signed master's sha256 (compliance_stage.store), and the decoder writes a job's init segment and each media
#: segment once (a replay writes the same bytes), so a client never needs to ask again.
IMMUTABLE = f"private, max-age={YEAR_S}, immutable"
#: The live playlist grows with every decoded segment: a client may keep it but asks every time (a 304 while it has
#: not changed, by its ETag). So does anything not known to be immutable.
REVALIDATE = "private, no-cache"
#: Keys whose bytes never change (gpu_agents/decoder.py names the live files, compliance_stage.store the published
#: folder ``<job>/published/<sha16>/``).
_IMMUTABLE_KEY = re.compile(r"(?:^|/)published/[0-9a-f]{16,64}/[^/]+$|(?:^|/)(?:init\.mp4|segment-\d+\.m4s)$")
_PUBLISHED_KEY = re.compile(r"(?:^|/)published/")
_RANGE_SPEC = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")


def cache_control(key: str) -> str:
    return IMMUTABLE if _IMMUTABLE_KEY.search(key) else REVALIDATE


def redirectable(key: str) -> bool:
    """Whether a presigned URL may stand for this blob: a file of the published set, not a playlist (see the
    module's docstring). A running job's live segments stay on the gateway: the web page's player fetches them with
    the API key in a header, and a fetch() redirected to the bucket's origin would need a CORS rule on every bucket
    (a <video src> or a download follows a redirect without one)."""
    return not key.endswith(".m3u8") and _PUBLISHED_KEY.search(key) is not None


class RangeNotSatisfiable(Exception):
    """No byte of the representation is in the requested range."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [start, end) a Range header asks of ``size`` bytes, or None to send them all; raises RangeNotSatisfiable.

    RFC 9110 §14.2: an unknown range unit MUST be ignored; an invalid ranges-specifier MAY be ignored (it is: a
    client gets the whole file rather than an error it may not handle); several ranges would need a
    multipart/byteranges body, which players do not ask for, so the header is ignored too (a server MAY ignore Range).
    A single range starting past the end, or a zero-length suffix (``bytes=-0``), is unsatisfiable: 416.
    (aiohttp's ``request.http_range`` reads ``bytes=-0`` as the whole file and cannot tell an unknown unit from a
    malformed range, hence this parser.)
    """
    if header is None:
        return None
    unit, _, ranges = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in ranges:
        return None
    match = _RANGE_SPEC.fullmatch(ranges)
    if match is None or not (match[1] or match[2]):
        return None
    if match[1]:
        start = int(match[1])
        last = int(match[2]) if match[2] else None
        if last is not None and last < start:
            return None  # invalid (last-pos before first-pos)
        if start >= size:
            raise RangeNotSatisfiable
        return start, size if last is None else min(last + 1, size)
    suffix = int(match[2])
    if suffix == 0 or size == 0:
        raise RangeNotSatisfiable
    return max(0, size - suffix), size


@dataclass(frozen=True)
class Representation:
    """The blob as a response describes it."""
    key: str
    size: int
    etag: str  # quoted, strong
    modified: float
    content_type: str

    @property
    def cache_control(self) -> str:
        return cache_control(self.key)

    def validators(self) -> dict[str, str]:
        """What a 200, 206 and 304 all carry."""
        return {"ETag": self.etag, "Last-Modified": formatdate(self.modified, usegmt=True),
                "Cache-Control": self.cache_control}


def strong_etag(stat, ref: dict | None) -> str:
    """The blob's sha256 where a reference names it (the same ETag from every store, so moving the blobs to another
    store keeps clients' caches valid), else the store's own ETag. A reference whose size differs from the stored
    blob's does not describe it: the store's ETag then."""
    if ref and ref.get("sha256") and ref.get("bytes") == stat.size:
        return f'"sha256-{ref["sha256"]}"'
    return stat.etag


def _opaque(etag: str) -> str:
    return etag.removeprefix("W/").strip('"')


def not_modified(request: web.BaseRequest, rep: Representation) -> bool:
    """If-None-Match (weak comparison, ``*`` and lists), else If-Modified-Since: the client's copy is current."""
    if request.headers.get("If-None-Match") is not None:
        current = _opaque(rep.etag)
        return any(tag.value in ("*", current) for tag in request.if_none_match or ())
    since = request.if_modified_since
    return since is not None and int(rep.modified) <= since.timestamp()


def range_applies(request: web.BaseRequest, rep: Representation) -> bool:
    """If-Range: the range only for the client's version (strong ETag comparison, or the exact Last-Modified);
    otherwise the whole new representation."""
    condition = request.headers.get("If-Range")
    if condition is None:
        return True
    condition = condition.strip()
    if condition.startswith(('"', "W/")):
        return condition == rep.etag  # a weak ETag never matches strongly
    date = request.if_range
    return date is not None and int(rep.modified) == int(date.timestamp())


def _unavailable(what: str, exc: Exception) -> ApiError:
    log.warning("%s: the blob store is unavailable: %s", what, exc)
    return ApiError(503, "storage_unavailable", f"{what} cannot be read right now (the blob store is unavailable); "
                                                "retry shortly", headers={"Retry-After": str(RETRY_AFTER_S)})


def _missing(what: str) -> ApiError:
    return ApiError(404, "file_not_found", f"{what} is not available")


def _locate(store, key: str, presign_s: float | None):
    """The blob's stat and, when asked and the store can sign, a presigned URL (one thread hop for both)."""
    stat = store.stat(key)
    url = store.presign(key, presign_s) if stat is not None and presign_s is not None else None
    return stat, url


def _open(path) -> tuple:
    fobj = open(path, "rb")
    return fobj, os.fstat(fobj.fileno()).st_size


async def serve_blob(request: web.Request, uri: str, what: str, content_type: str,
                     ref: dict | None = None) -> web.StreamResponse:
    """Answer a GET or HEAD for the blob ``uri`` (the caller has checked the tenant): 200/206/304/307/416, 404 when
    it is missing, 503 while the store is unreachable. ``ref``: the BlobRef naming it, for its sha256 ETag."""
    store, settings = request.app["blobs"], request.app["settings"]
    loop = asyncio.get_running_loop()
    try:
        key = store.key_of(uri)
    except BlobError:
        log.warning("%s names %s, outside the blob store", what, uri)
        raise _missing(what) from None
    presign_s = settings.blob_presign_s if settings.blob_redirect == "auto" and redirectable(key) else None
    try:
        stat, url = await loop.run_in_executor(None, _locate, store, key, presign_s)
    except BlobStoreUnavailable as exc:
        raise _unavailable(what, exc) from None
    except BlobError as exc:
        log.warning("%s: %s", what, exc)
        raise _missing(what) from None
    if stat is None:
        raise _missing(what)
    rep = Representation(key, stat.size, strong_etag(stat, ref), stat.modified, content_type)
    if not_modified(request, rep):
        return web.Response(status=304, headers=rep.validators())
    if url is not None:
        # A cached redirect must not outlive its URL: cached for half the URL's life, it still has the other half.
        return web.Response(status=307, headers={"Location": url,
                                                 "Cache-Control": f"private, max-age={int(presign_s) // 2}"})
    path = store.local_file(key) if request.method == "GET" else None
    fobj = None
    if path is not None:
        try:
            fobj, size = await loop.run_in_executor(None, _open, path)
        except FileNotFoundError:  # deleted since the stat
            raise _missing(what) from None
        except OSError as exc:
            log.warning("%s: %s", what, exc)
            raise _missing(what) from None
        # Replaced since the stat (only the live playlist is): send the file as opened, whole and consistent. Its
        # ETag is the older one, which only costs the client a full response on its next request.
        rep = replace(rep, size=size)
    try:
        return await _respond(request, rep, what, store, fobj)
    finally:
        if fobj is not None:
            fobj.close()


async def _respond(request: web.Request, rep: Representation, what: str, store, fobj) -> web.StreamResponse:
    span = None
    if request.method == "GET" and range_applies(request, rep):  # Range is defined for GET only (RFC 9110 §14.2)
        try:
            span = byte_range(request.headers.get("Range"), rep.size)
        except RangeNotSatisfiable:
            raise ApiError(416, "range_not_satisfiable", f"the range is outside {what} ({rep.size} bytes)",
                           headers={"Content-Range": f"bytes */{rep.size}", "Accept-Ranges": "bytes"}) from None
    start, end = span or (0, rep.size)
    response = web.StreamResponse(status=206 if span else 200, headers={
        **rep.validators(), "Content-Type": rep.content_type, "Accept-Ranges": "bytes"})
    if span:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{rep.size}"
    response.content_length = end - start
    await response.prepare(request)  # the headers go out now: sendfile writes past aiohttp's buffers
    if request.method != "GET" or start == end:
        await response.write_eof()
        return response
    try:
        if fobj is not None:
            await _sendfile(request, fobj, start, end - start)
        else:
            await _stream(response, store, rep.key, start, end)
        await response.write_eof()
    except ConnectionError:  # the client went away (ClientConnectionResetError included): nobody to answer
        log.debug("%s: the client went away", what)
    except BlobError as exc:  # the headers are out: cut the connection short, so the client sees an incomplete body
        log.warning("%s: reading the blob failed mid-response: %s", what, exc)
        response.force_close()
    return response


async def _sendfile(request: web.Request, fobj, offset: int, count: int) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the connection is closed")
    try:
        await asyncio.get_running_loop().sendfile(transport, fobj, offset, count)
    except RuntimeError:
        if transport.is_closing():  # asyncio's "Transport is closing": the client left
            raise ConnectionResetError("the connection is closed") from None
        raise


async def _stream(response: web.StreamResponse, store, key: str, start: int, end: int) -> None:
    """Bytes [start, end) in CHUNK_BYTES reads, each in a thread; the next read runs while a chunk is written.

    A live playlist replaced since the stat is read as its first ``size`` bytes: it only grows (HLS EVENT), so those
    are the version the stat described."""
    loop = asyncio.get_running_loop()

    def read(position: int):
        return loop.run_in_executor(None, store.read_range, key, position, min(position + CHUNK_BYTES, end))

    position, pending = start, read(start)
    try:
        while pending is not None:
            data = await pending
            expected = min(position + CHUNK_BYTES, end) - position
            if len(data) != expected:
                raise BlobError(f"blob {key} gave {len(data)} bytes at {position}, not {expected}: it changed")
            position += expected
            pending = read(position) if position < end else None
            await response.write(data)
    finally:
        if pending is not None:
            pending.cancel()  # the thread finishes its read; nobody waits for it
