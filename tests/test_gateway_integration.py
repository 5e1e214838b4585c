"""The gateway for real: the embedded platform with every stage and the tracker, the gateway as its own process.

A job goes in over POST /v1/videos, is followed over GET until completed, its video comes out of
GET /v1/videos/{id}/content as an MP4 PyAV decodes (and in byte ranges), and another tenant gets 404 for it.
A job submitted while the only GPU agent is busy is told its place in the scheduler's queue (a `queued` envelope
with a position, and the position on GET) before its first progress.
The official `openai` SDK drives the Videos API end to end: create_and_poll, retrieve, list (both orders, pages),
download_content, delete (a finished video, and a running one), an aliased model name and an unknown one.
"""
from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import av
import pytest

from compliance.provenance import verify_video
from gateway.tenants import TenantStore
from streams.embedded import free_port
from streams.supervisor import STAGE_NAMES, PlatformProcesses

pytestmark = pytest.mark.integration

TIMEOUT_S = 120


def call(method: str, url: str, key: str | None, body: dict | None = None, headers: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        **({"Authorization": f"Bearer {key}"} if key else {}),
        **({"Content-Type": "application/json"} if data else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    var_dir = tmp_path_factory.mktemp("var")
    platform = PlatformProcesses(var_dir, stages=(*STAGE_NAMES, "tracker", "lifecycle"), env={
        "VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000",  # Tansu holds joins for half of it
        "VIDGEN_LATENT_CHUNK_FRAMES": "1",
        "VIDGEN_MODEL_ALIASES": "sora-2=tiny-wan",  # what the OpenAI SDK's clients ask for
        "VIDGEN_LIFECYCLE_INTERMEDIATE_S": "off",  # only deletions delete here (the tests read intermediates)
    })
    process = None
    try:
        platform.start()
        tenants = TenantStore()
        _, alice = tenants.create_tenant("alice", "premium")
        _, bob = tenants.create_tenant("bob", "standard")
        _, carol = tenants.create_tenant("carol", "standard")  # the queue test's own: no one else's listings move
        _, dave = tenants.create_tenant("dave", "premium")  # the OpenAI SDK's
        tenants_file = tenants.save(var_dir / "tenants.toml")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with open(platform.log_dir / "gateway.log", "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "vidgen", "gateway",
                 "--port", str(port), "--tenants", str(tenants_file)],
                env=platform.env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"the gateway exited; see {platform.log_dir}/gateway.log"
            try:
                if call("GET", f"{base}/healthz", None)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the gateway did not come up; see {platform.log_dir}"
            time.sleep(0.1)
        yield dict(base=base, alice=alice, bob=bob, carol=carol, dave=dave, platform=platform)
        platform.check_alive()
        assert process.poll() is None, "the gateway died"
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(20)
        platform.stop()


def test_a_job_over_http_from_request_to_playable_video(gateway):
    base, alice, bob = gateway["base"], gateway["alice"], gateway["bob"]
    status, _, body = call("POST", f"{base}/v1/videos", alice, {
        "prompt": "a paper boat on a river", "size": "64x64", "frames": 5, "steps": 2, "preset": "fast", "seed": 3})
    assert status == 200, body
    video = json.loads(body)
    job_id = video["id"]
    assert video["status"] == "queued" and video["vidgen"]["tier"] == "premium"

    deadline = time.monotonic() + TIMEOUT_S
    seen = set()
    while True:
        status, _, body = call("GET", f"{base}/v1/videos/{job_id}", alice)
        assert status == 200, body
        video = json.loads(body)
        seen.add(video["status"])
        if video["status"] in ("completed", "failed"):
            break
        assert time.monotonic() < deadline, f"job still {video['status']}; logs in {gateway['platform'].log_dir}"
        time.sleep(0.3)
    assert video["status"] == "completed", video
    assert video["progress"] == 100 and video["completed_at"] >= video["created_at"]
    assert video["vidgen"]["step"] == video["vidgen"]["total_steps"] == 2
    assert "file://" not in json.dumps(video)

    status, headers, data = call("GET", f"{base}{video['vidgen']['outputs']['video']['url']}", alice)
    assert status == 200 and headers["Content-Type"] == "video/mp4"
    with av.open(io.BytesIO(data)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)
    status, headers, part = call("GET", f"{base}/v1/videos/{job_id}/content", alice, headers={"Range": "bytes=0-99"})
    assert status == 206 and part == data[:100] and headers["Content-Range"] == f"bytes 0-99/{len(data)}"

    for path in (f"/v1/videos/{job_id}", f"/v1/videos/{job_id}/content"):
        status, _, body = call("GET", f"{base}{path}", bob)
        assert status == 404 and json.loads(body)["error"]["code"] == "video_not_found"
    status, _, body = call("GET", f"{base}/v1/videos", bob)
    assert status == 200 and json.loads(body)["data"] == []
    status, _, body = call("GET", f"{base}/v1/videos", alice)
    assert [v["id"] for v in json.loads(body)["data"]] == [job_id]


def _wait_for_video(base: str, key: str, job_id: str, done, what: str, platform) -> dict:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        status, _, body = call("GET", f"{base}/v1/videos/{job_id}", key)
        assert status == 200, body
        video = json.loads(body)
        if done(video):
            return video
        assert time.monotonic() < deadline, f"{what}: job {job_id} is {video['status']}; logs in {platform.log_dir}"
        time.sleep(0.2)


def _ends(message: dict) -> bool:
    return message["type"] in ("published", "failed", "cancelled") or (
        message["type"] == "flagged" and message["data"].get("terminal"))


def test_a_job_waiting_for_the_busy_agent_is_told_its_queue_position(gateway):
    base, carol, platform = gateway["base"], gateway["carol"], gateway["platform"]
    # The platform's only GPU agent takes a long job (hundreds of steps of the bigger tiny model) ...
    status, _, body = call("POST", f"{base}/v1/videos", carol, {
        "prompt": "a very long river", "model": "tiny-wan-5m", "size": "128x128", "frames": 17, "steps": 400,
        "guidance_scale": 5.0, "seed": 1})
    assert status == 200, body
    busy_id = json.loads(body)["id"]
    _wait_for_video(base, carol, busy_id, lambda v: v["vidgen"]["step"] >= 1, "the long job to start", platform)

    # ... so the next job waits in the scheduler's queue.
    status, _, body = call("POST", f"{base}/v1/videos", carol, {
        "prompt": "a short stream", "size": "64x64", "frames": 5, "steps": 2, "preset": "fast", "seed": 2})
    assert status == 200, body
    job_id = json.loads(body)["id"]
    seen_on_get: list[dict] = []

    async def watch() -> list[dict]:
        url = base.replace("http://", "ws://") + f"/v1/videos/{job_id}/events"
        received: list[dict] = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, params={"api_key": carol}) as ws:
                deadline = time.monotonic() + TIMEOUT_S
                while not received or not _ends(received[-1]):
                    remaining = deadline - time.monotonic()
                    assert remaining > 0, f"no end of {job_id} after {[m['type'] for m in received]}; " \
                                          f"logs in {platform.log_dir}"
                    received.append(await ws.receive_json(timeout=remaining))
                    message = received[-1]
                    if message["type"] == "queued" and (message["data"]["position"] or 0) >= 1 and not seen_on_get:
                        # While it waits, GET shows where it stands; then the long job is cancelled to free the agent.
                        status, _, body = call("GET", f"{base}/v1/videos/{job_id}", carol)
                        seen_on_get.append(json.loads(body))
                        assert call("POST", f"{base}/v1/videos/{busy_id}/cancel", carol)[0] == 200
        return received

    received = asyncio.run(watch())
    kinds = [m["type"] for m in received]
    assert "progress" in kinds, kinds
    first_progress = kinds.index("progress")
    placed = [i for i, m in enumerate(received) if m["type"] == "queued" and (m["data"]["position"] or 0) >= 1]
    assert placed and placed[0] < first_progress, f"no queue position before the first progress: {received}"
    data = received[placed[0]]["data"]
    assert data["job_id"] == job_id and data["waiting"] >= data["position"] >= 1
    assert data["eta_s"] is None or data["eta_s"] >= 0
    assert not [m for m in received[first_progress:] if m["type"] == "queued"]  # never queued again once it ran
    assert received[-1]["type"] == "published", received[-1]

    [waiting] = seen_on_get
    assert waiting["status"] == "queued" and waiting["queue_position"] >= 1, waiting
    assert waiting["vidgen"]["queue_position"] == waiting["queue_position"]
    assert waiting["queue_eta_seconds"] is None or waiting["queue_eta_seconds"] >= 0
    done = _wait_for_video(base, carol, job_id, lambda v: v["status"] == "completed", "the job's end", platform)
    assert (done["queue_position"], done["queue_eta_seconds"]) == (None, None)
    cancelled = _wait_for_video(base, carol, busy_id, lambda v: v["vidgen"]["terminal"], "the cancellation",
                                platform)
    assert cancelled["vidgen"]["status"] == "cancelled" and cancelled["queue_position"] is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks its Videos API deprecated (shut down 2026-09)
def test_the_openai_sdk_drives_the_videos_api(gateway):
    import openai

    client = openai.OpenAI(base_url=f"{gateway['base']}/v1", api_key=gateway["dave"], max_retries=0, timeout=30)
    small = {"steps": 2, "preset": "fast", "seed": 5}  # vidgen's own fields, as the SDK passes extras
    video = client.videos.create_and_poll(prompt="a kite over a beach", model="sora-2", seconds="1", size="64x64",
                                          poll_interval_ms=200, extra_body=small)
    assert video.status == "completed", video
    assert video.seconds == "1" and video.model == "tiny-wan" and video.size == "64x64"
    assert video.model_extra["duration_seconds"] == pytest.approx(9 / 8)  # 9 frames at 8 fps: the nearest it makes
    again = client.videos.retrieve(video.id)
    assert again.id == video.id and again.status == "completed" and again.progress == 100

    data = client.videos.download_content(video.id).read()
    with av.open(io.BytesIO(data)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    for variant in ("thumbnail", "spritesheet"):  # signed JPEG stills, made by the compliance stage
        still = client.videos.download_content(video.id, variant=variant).read()
        assert still[:3] == b"\xff\xd8\xff", variant
        assert verify_video(still, trust_anchors_pem=None, mime="image/jpeg").validation_state in ("Valid", "Trusted")

    running = client.videos.create(prompt="a second kite", seconds="1", size="64x64", extra_body=small)
    newest_first = [v.id for v in client.videos.list(limit=1)]  # the SDK follows the pages (after=)
    oldest_first = [v.id for v in client.videos.list(order="asc", limit=1)]
    assert newest_first == [running.id, video.id] and oldest_first == [video.id, running.id]

    with pytest.raises(openai.BadRequestError) as refused:
        client.videos.create(prompt="a kite", model="sora-2-pro", size="64x64")
    assert refused.value.status_code == 400 and refused.value.code == "unknown_model"

    for victim in (running, video):  # one still waiting or running (cancelled first), one finished
        deleted = client.videos.delete(victim.id)
        assert (deleted.id, deleted.object, deleted.deleted) == (victim.id, "video.deleted", True)
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(victim.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)
    assert [v.id for v in client.videos.list()] == []

    # The lifecycle deletes every blob of the deleted jobs (rule deleted); the running one also stops.
    blobs = gateway["platform"].var_dir / "blobs"
    deadline = time.monotonic() + TIMEOUT_S
    while any(path.is_file() for path in (blobs / video.id).rglob("*")):
        assert time.monotonic() < deadline, f"the deleted video's blobs are still there: {blobs / video.id}"
        time.sleep(0.2)

