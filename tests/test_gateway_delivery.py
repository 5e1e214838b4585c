"""Delivering a job's files (gateway/delivery.py): strong ETags and 304s, Cache-Control per kind of file, byte ranges,
HEAD, the local store's sendfile body, and against a real S3 server (bench/s3server.py, one for the module) the streamed
body, the 307 to a presigned URL that serves the same bytes, and tenant isolation before any redirect.

The gateway runs over fakes as in tests/test_gateway_http.py (no Kafka).
"""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct
import urllib.request
from dataclasses import replace

import pytest
from aiohttp import ClientPayloadError, web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.delivery import (CHUNK_BYTES, IMMUTABLE, REVALIDATE, RangeNotSatisfiable, byte_range, cache_control)
from streams import topics
from streams.blobs import BlobStoreUnavailable, sha256_hex
from streams.events import new_event
from bench.s3server import s3_server
from tests.test_gateway_http import Gateway, _json, assert_error, async_test

pytestmark = pytest.mark.filterwarnings("ignore:It is recommended to use web")

VIDEO = bytes(range(256)) * (CHUNK_BYTES // 256 * 2 + 7)  # two chunks and a bit: ranges cross chunk boundaries
PLAYLIST = b"#EXTM3U\n#EXT-X-VERSION:7\n"


def gateway(tmp_path, **settings) -> Gateway:
    """The tests' Gateway (tenants acme and other), over a store of the given settings (default: local)."""
    gw = Gateway(tmp_path)
    if settings:
        gw.settings = replace(gw.settings, **settings)
        gw.app = build_app(gw.settings, jobs=gw.jobs, tenants=gw.tenants, publisher=gw.publisher,
                           static_dir=tmp_path / "static")
    gw.blobs = gw.app["blobs"]
    return gw


async def published_job(gw: Gateway, video: bytes = VIDEO) -> tuple[str, dict]:
    """A job of acme's, published as compliance_stage.store lays it out: a folder named after the master's hash."""
    _, created = await gw.post()
    job_id = created["id"]
    folder = (job_id, "published", sha256_hex(video)[:16])
    ref = gw.blobs.put(video, *folder, "video.mp4", dtype="video/mp4")
    media = gw.blobs.put(b"a small rendition", *folder, "360p.mp4", dtype="video/mp4")
    gw.blobs.put(PLAYLIST, *folder, "360p.m3u8")
    gw.jobs.publish(job_id, ref, renditions=[{"name": "360p", "width": 64, "height": 48, "media": media}])
    return job_id, ref


async def live_job(gw: Gateway) -> str:
    """A job of acme's that is decoding: an init segment, one segment and the live playlist."""
    _, created = await gw.post()
    job_id = created["id"]
    refs = {name: gw.blobs.put(data, job_id, name) for name, data in (
        ("init.mp4", b"init"), ("segment-00000.m4s", b"segment zero"), ("playlist.m3u8", PLAYLIST))}
    gw.jobs.fold(topics.DECODED.name, new_event(
        job_id, segment_index=0, segment=refs["segment-00000.m4s"], frame_start=0, frames=1, is_last=False,
        init_segment=refs["init.mp4"], playlist=refs["playlist.m3u8"]))
    return job_id


async def fetch(gw: Gateway, path: str, method: str = "GET", key=None, **headers):
    response = await gw.client.request(method, path, headers={**gw.auth(key), **headers}, allow_redirects=False)
    return response, await response.read()


# -- plain functions ---------------------------------------------------------------------------------------------------
def test_byte_range_follows_rfc_9110():
    size = 100
    assert byte_range(None, size) is None
    assert byte_range("bytes=10-19", size) == (10, 20)
    assert byte_range("bytes=90-", size) == (90, 100)
    assert byte_range("bytes=90-500", size) == (90, 100)  # a last-pos past the end means the end
    assert byte_range("bytes=-5", size) == (95, 100) and byte_range("bytes=-500", size) == (0, 100)
    assert byte_range("BYTES = 1-2", size) == (1, 3)
    # Ignored (the whole file): another unit (MUST), an invalid spec, several ranges (MAY).
    for header in ("items=0-5", "bytes=5-2", "bytes=abc", "bytes=-", "bytes=0-1,5-6", "bytes"):
        assert byte_range(header, size) is None, header
    for header in ("bytes=100-", "bytes=500-600", "bytes=-0"):
        with pytest.raises(RangeNotSatisfiable):
            byte_range(header, size)
    with pytest.raises(RangeNotSatisfiable):
        byte_range("bytes=0-", 0)  # an empty file has no byte to send


def test_cache_control_is_immutable_only_for_files_that_never_change():
    for key in ("job-1/published/0123456789abcdef/video.mp4", "job-1/published/0123456789abcdef/master.m3u8",
                "job-1/init.mp4", "job-1/segment-00012.m4s"):
        assert cache_control(key) == IMMUTABLE, key
    for key in ("job-1/playlist.m3u8", "job-1/video.mp4", "job-1/published/draft/video.mp4", "job-1/x-init.mp4"):
        assert cache_control(key) == REVALIDATE, key
    assert IMMUTABLE.startswith("private,") and REVALIDATE.startswith("private,")


# -- the local store ---------------------------------------------------------------------------------------------------
@async_test
async def test_strong_etags_and_conditional_requests(tmp_path):
    async with gateway(tmp_path) as gw:
        job_id, ref = await published_job(gw)
        url = f"/v1/videos/{job_id}/content"
        response, body = await fetch(gw, url)
        etag = f'"sha256-{ref["sha256"]}"'
        assert response.status == 200 and body == VIDEO
        assert response.headers["ETag"] == etag and response.headers["Accept-Ranges"] == "bytes"
        assert response.headers["Cache-Control"] == IMMUTABLE and response.headers["Content-Type"] == "video/mp4"
        for condition in (etag, "*", f'"other", {etag}', f"W/{etag}"):  # If-None-Match compares weakly
            response, body = await fetch(gw, url, **{"If-None-Match": condition})
            assert response.status == 304 and body == b"", condition
            assert response.headers["ETag"] == etag and response.headers["Cache-Control"] == IMMUTABLE
        response, body = await fetch(gw, url, **{"If-None-Match": '"sha256-stale"'})
        assert response.status == 200 and body == VIDEO
        response, _ = await fetch(gw, url, **{"If-Modified-Since": response.headers["Last-Modified"]})
        assert response.status == 304
        # If-Range: the range for the client's version only (strong comparison), else the whole new file.
        response, body = await fetch(gw, url, Range="bytes=0-9", **{"If-Range": etag})
        assert response.status == 206 and body == VIDEO[:10]
        for stale in ('"sha256-stale"', f"W/{etag}", "Thu, 01 Jan 1970 00:00:00 GMT"):
            response, body = await fetch(gw, url, Range="bytes=0-9", **{"If-Range": stale})
            assert response.status == 200 and body == VIDEO, stale
        # A file the job's state names without a sha256 (a live segment): the store's ETag, just as usable.
        live = await live_job(gw)
        response, _ = await fetch(gw, f"/v1/videos/{live}/segments/init.mp4")
        store_etag = response.headers["ETag"]
        assert re.fullmatch(r'"[^"]+"', store_etag) and not store_etag.startswith('"sha256-')
        response, body = await fetch(gw, f"/v1/videos/{live}/segments/init.mp4", **{"If-None-Match": store_etag})
        assert response.status == 304 and body == b""


@async_test
async def test_ranges_head_and_errors(tmp_path):
    async with gateway(tmp_path) as gw:
        job_id, ref = await published_job(gw)
        url, size = f"/v1/videos/{job_id}/content", len(VIDEO)
        response, body = await fetch(gw, url, Range=f"bytes={CHUNK_BYTES - 3}-{CHUNK_BYTES + 2}")
        assert response.status == 206 and body == VIDEO[CHUNK_BYTES - 3:CHUNK_BYTES + 3]
        assert response.headers["Content-Range"] == f"bytes {CHUNK_BYTES - 3}-{CHUNK_BYTES + 2}/{size}"
        assert response.headers["ETag"] == f'"sha256-{ref["sha256"]}"'
        response, body = await fetch(gw, url, Range="bytes=-5")
        assert response.status == 206 and body == VIDEO[-5:]
        for unsatisfiable in (f"bytes={size}-", "bytes=-0"):
            response, body = await fetch(gw, url, Range=unsatisfiable)
            assert response.status == 416 and response.headers["Content-Range"] == f"bytes */{size}"
            assert b"range_not_satisfiable" in body
        for ignored in ("bytes=0-1,5-6", "items=0-3", "bytes=9-2"):
            response, body = await fetch(gw, url, Range=ignored)
            assert response.status == 200 and body == VIDEO, ignored
        # HEAD: the same headers, no body; Range is for GET only.
        response, body = await fetch(gw, url, "HEAD", Range="bytes=0-9")
        assert response.status == 200 and body == b"" and response.headers["Content-Length"] == str(size)
        assert response.headers["ETag"] == f'"sha256-{ref["sha256"]}"'
        response = await gw.client.head(url)
        assert response.status == 401  # HEAD is authenticated like GET
        response, _ = await fetch(gw, url, "HEAD", key=gw.other_key)
        assert response.status == 404
        response, body = await fetch(gw, f"/v1/videos/{job_id}/published/missing.mp4")
        assert_error(response, await _json(response), 404, "file_not_found")


@async_test
async def test_cache_control_per_kind_of_file(tmp_path):
    async with gateway(tmp_path) as gw:
        job_id, _ = await published_job(gw)
        live = await live_job(gw)
        expected = {f"/v1/videos/{job_id}/content": IMMUTABLE,
                    f"/v1/videos/{job_id}/content?variant=360p": IMMUTABLE,
                    f"/v1/videos/{job_id}/published/360p.m3u8": IMMUTABLE,
                    f"/v1/videos/{live}/segments/init.mp4": IMMUTABLE,
                    f"/v1/videos/{live}/segments/segment-00000.m4s": IMMUTABLE,
                    f"/v1/videos/{live}/segments/playlist.m3u8": REVALIDATE}
        for url, cache in expected.items():
            response, _ = await fetch(gw, url)
            assert response.status == 200 and response.headers["Cache-Control"] == cache, url
        response, body = await fetch(gw, f"/v1/videos/{live}/segments/playlist.m3u8")
        assert body == PLAYLIST and response.headers["Content-Type"] == "application/vnd.apple.mpegurl"


@async_test
async def test_the_local_store_sends_the_file_itself_and_a_redirect_needs_a_signing_store(tmp_path):
    async with gateway(tmp_path) as gw:
        assert gw.settings.blob_redirect == "auto"  # the local store cannot presign: it streams anyway
        job_id, _ = await published_job(gw)

        def no_range_reads(*args):
            raise AssertionError("a local file goes out with sendfile, not through read_range")

        gw.blobs.read_range = no_range_reads
        response, body = await fetch(gw, f"/v1/videos/{job_id}/content")
        assert response.status == 200 and body == VIDEO
        response, body = await fetch(gw, f"/v1/videos/{job_id}/content", Range="bytes=1000-")
        assert response.status == 206 and body == VIDEO[1000:]


@async_test
async def test_an_unreachable_store_is_a_503_and_a_failed_read_cuts_the_body(tmp_path, caplog):
    async with gateway(tmp_path) as gw:
        job_id, _ = await published_job(gw)
        url = f"/v1/videos/{job_id}/content"

        def unreachable(key):
            raise BlobStoreUnavailable("blob store s3://b/p: looking up x failed: connection refused")

        stat, gw.blobs.stat = gw.blobs.stat, unreachable
        response, _ = await fetch(gw, url)
        assert_error(response, await _json(response), 503, "storage_unavailable")
        assert response.headers["Retry-After"] == "2"
        gw.blobs.stat = stat

        # Streamed from the store (as from S3): a read failing after the headers ends the connection early.
        read_range = gw.blobs.read_range

        def failing_after_the_first_chunk(key, start, end):
            if start > 0:
                raise BlobStoreUnavailable("connection reset")
            return read_range(key, start, end)

        gw.blobs.local_file = lambda key: None
        gw.blobs.read_range = failing_after_the_first_chunk
        with caplog.at_level(logging.WARNING):
            response = await gw.client.get(url, headers=gw.auth())
            assert response.status == 200 and response.headers["Content-Length"] == str(len(VIDEO))
            with pytest.raises(ClientPayloadError):
                await response.read()
        assert any("mid-response" in r.getMessage() for r in caplog.records)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


class RunAppServer(TestServer):
    """aiohttp's test server cancels a handler whose client went away; web.run_app (run_gateway's) lets it run on
    into the closed connection, which is the case to test."""

    async def _make_runner(self, **kwargs):
        return await super()._make_runner(**{**kwargs, "handler_cancellation": False})


@pytest.mark.parametrize("body", ["sendfile", "streamed"])
@async_test
async def test_a_client_dropping_mid_download_logs_no_traceback(tmp_path, caplog, body):
    gw = gateway(tmp_path)
    ended: asyncio.Queue = asyncio.Queue()

    @web.middleware
    async def watch(request, handler):  # how the content handler ended: None, or what it raised
        try:
            response = await handler(request)
        except BaseException as exc:
            ended.put_nowait(exc)
            raise
        if request.path.endswith("/content"):
            ended.put_nowait(None)
        return response

    gw.app.middlewares.append(watch)
    if body == "streamed":
        gw.blobs.local_file = lambda key: None  # read in chunks, as from S3
    gw.client = TestClient(RunAppServer(gw.app))
    await gw.client.start_server()
    try:
        with caplog.at_level(logging.DEBUG):
            job_id, _ = await published_job(gw, bytes(32 * 1024 * 1024))  # more than the socket buffers hold
            reader, writer = await asyncio.open_connection(gw.client.host, gw.client.port)
            writer.write(f"GET /v1/videos/{job_id}/content HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: {gw.auth()['Authorization']}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            await reader.readexactly(1000)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()  # SO_LINGER 0: a reset, as from a browser that navigated away
            assert await asyncio.wait_for(ended.get(), 20) is None
    finally:
        await gw.client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


# -- a real S3 server --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as env:
        yield {"blob_url": env["VIDGEN_BLOB_URL"],
               "blob_options": {name.removeprefix("VIDGEN_BLOB_").lower(): value for name, value in env.items()
                                if name != "VIDGEN_BLOB_URL"}}


def download(url: str, **headers) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return response.read()


@async_test
async def test_s3_streams_the_object_when_redirects_are_off(tmp_path, s3):
    async with gateway(tmp_path, blob_redirect="never", **s3) as gw:
        assert gw.blobs.local_file("x") is None and gw.blobs.url.startswith("s3://")
        job_id, ref = await published_job(gw)
        url = f"/v1/videos/{job_id}/content"
        response, body = await fetch(gw, url)
        assert response.status == 200 and body == VIDEO
        assert response.headers["ETag"] == f'"sha256-{ref["sha256"]}"'
        response, body = await fetch(gw, url, Range=f"bytes={CHUNK_BYTES - 3}-")
        assert response.status == 206 and body == VIDEO[CHUNK_BYTES - 3:]
        response, body = await fetch(gw, url, "HEAD")
        assert response.status == 200 and body == b"" and response.headers["Content-Length"] == str(len(VIDEO))
        live = await live_job(gw)
        response, body = await fetch(gw, f"/v1/videos/{live}/segments/segment-00000.m4s")
        assert response.status == 200 and body == b"segment zero"
        response, _ = await fetch(gw, f"/v1/videos/{live}/segments/segment-00000.m4s",
                                  **{"If-None-Match": response.headers["ETag"]})  # S3's own ETag
        assert response.status == 304


@async_test
async def test_s3_redirects_to_a_presigned_url_after_the_tenant_check(tmp_path, s3):
    async with gateway(tmp_path, blob_presign_s=120.0, **s3) as gw:
        assert gw.settings.blob_redirect == "auto"
        job_id, ref = await published_job(gw)
        url = f"/v1/videos/{job_id}/content"
        response, body = await fetch(gw, url)
        assert response.status == 307 and body == b""
        location = response.headers["Location"]
        assert location.startswith(s3["blob_options"]["endpoint"]) and "X-Amz-Signature" in location
        assert s3["blob_options"]["secret_access_key"] not in location
        assert response.headers["Cache-Control"] == "private, max-age=60"  # half the URL's life
        assert await asyncio.to_thread(download, location) == VIDEO
        assert await asyncio.to_thread(download, location, Range="bytes=5-9") == VIDEO[5:10]  # a player's ranges
        response, _ = await fetch(gw, url, "HEAD")
        assert response.status == 307
        response, _ = await fetch(gw, url, **{"If-None-Match": f'"sha256-{ref["sha256"]}"'})
        assert response.status == 304  # a current copy needs no redirect
        rendition, _ = await fetch(gw, f"/v1/videos/{job_id}/content?variant=360p")
        assert await asyncio.to_thread(download, rendition.headers["Location"]) == b"a small rendition"
        # Another tenant gets what an unknown id gets, never a URL; a missing file stays a 404.
        response, body = await fetch(gw, url, key=gw.other_key)
        assert_error(response, await _json(response), 404, "video_not_found")
        assert "Location" not in response.headers
        response, body = await fetch(gw, f"/v1/videos/{job_id}/published/missing.mp4")
        assert response.status == 404 and "Location" not in response.headers
        # Playlists are served here: the URIs inside them must resolve against the gateway, not the bucket.
        response, body = await fetch(gw, f"/v1/videos/{job_id}/published/360p.m3u8")
        assert response.status == 200 and body == PLAYLIST
        # A running job's live segments too: the web page's player fetches them with its key in a header.
        live = await live_job(gw)
        response, body = await fetch(gw, f"/v1/videos/{live}/segments/segment-00000.m4s")
        assert response.status == 200 and body == b"segment zero"


async def live_job_without_blobs(gw: Gateway) -> str:
    _, created = await gw.post()
    job_id = created["id"]
    ref = {"uri": gw.blobs.uri_of(f"{job_id}/init.mp4"), "sha256": "0" * 64, "bytes": 4, "shape": [], "dtype": ""}
    gw.jobs.fold(topics.DECODED.name, new_event(
        job_id, segment_index=0, segment={**ref, "uri": gw.blobs.uri_of(f"{job_id}/segment-00000.m4s")},
        frame_start=0, frames=1, is_last=False, init_segment=ref, playlist=None))
    return job_id


@async_test
async def test_an_unreachable_s3_store_answers_503(tmp_path, s3):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    options = {**s3["blob_options"], "endpoint": f"http://127.0.0.1:{closed.getsockname()[1]}"}
    try:
        async with gateway(tmp_path, blob_url=s3["blob_url"], blob_options=options) as gw:
            live = await live_job_without_blobs(gw)
            response, _ = await fetch(gw, f"/v1/videos/{live}/segments/init.mp4")
            assert_error(response, await _json(response), 503, "storage_unavailable")
            assert response.headers["Retry-After"] == "2"
    finally:
        closed.close()
