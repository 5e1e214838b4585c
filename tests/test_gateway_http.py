"""The gateway's HTTP API against an in-memory job view and a recording publisher (no Kafka).

Each test runs its own event loop (``asyncio.run``) with aiohttp's TestServer/TestClient.
"""
from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer

from consumers.job_state import fold
from gateway.app import ROUTES, build_app, frames_for_seconds, idempotent_job_id
from gateway.limits import RateLimiter, TokenBucket, retry_after_header
from gateway.server import GuardedAppRunner, ServeLimits
from gateway.tenants import TenantStore, Tenant, hash_key, load_or_create
from streams import topics
from streams.blobs import LocalBlobStore
from streams.events import new_event
from streams.settings import Settings
from tests.fakes import FakeJobsView, FakePublisher

# The gateway's modules share state through string keys, as their contract says (gateway/app.py).
pytestmark = pytest.mark.filterwarnings("ignore:It is recommended to use web")

BODY = {"prompt": "a red fox in the snow", "size": "64x48", "frames": 5, "steps": 2, "preset": "fast"}


class GuardedTestServer(TestServer):
    """aiohttp's test server, serving through the gateway's own runner (gateway/server.py: connection limits)."""

    def __init__(self, app, limits: ServeLimits, **kwargs):
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_runner(self, **kwargs):
        return GuardedAppRunner(self.app, self.limits, **kwargs)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Gateway:
    """An app over fakes, two tenants (acme: premium, other: standard), and a client."""

    def __init__(self, tmp_path, *, acme_rate=1000.0, acme_burst=1000, acme_in_flight=50, jobs=None,
                 limits: ServeLimits | None = None, acme_per_hour=1000, acme_blocked=30):
        self.settings = Settings(var_dir=tmp_path, blob_url=(tmp_path / "blobs").as_uri())
        self.blobs = LocalBlobStore(tmp_path / "blobs")
        self.tenants = TenantStore()
        _, self.acme_key = self.tenants.create_tenant("acme", "premium", rate_per_s=acme_rate, burst=acme_burst,
                                                      max_in_flight=acme_in_flight, max_per_hour=acme_per_hour,
                                                      max_blocked_per_hour=acme_blocked)
        _, self.other_key = self.tenants.create_tenant("other", "standard", rate_per_s=1000, burst=1000,
                                                       max_in_flight=50)
        self.jobs = jobs or FakeJobsView()
        self.publisher = FakePublisher()
        if isinstance(self.jobs, FakeJobsView) and self.jobs.log is None:
            self.jobs.log = self.publisher
        self.clock = Clock()
        self.app = build_app(self.settings, jobs=self.jobs, tenants=self.tenants, publisher=self.publisher,
                             limiter=RateLimiter(clock=self.clock), static_dir=tmp_path / "static", limits=limits)
        self.limits = self.app["limits"]
        self.client: TestClient | None = None

    async def __aenter__(self) -> "Gateway":
        self.client = TestClient(GuardedTestServer(self.app, self.limits))
        await self.client.start_server()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()

    def auth(self, key=None) -> dict:
        return {"Authorization": f"Bearer {key or self.acme_key}"}

    async def post(self, body=BODY, key=None, headers=None, **kwargs):
        response = await self.client.post("/v1/videos", json=body, headers={**self.auth(key), **(headers or {})},
                                          **kwargs)
        return response, await _json(response)

    async def get(self, path, key=None, **kwargs):
        response = await self.client.get(path, headers=self.auth(key), **kwargs)
        return response, await _json(response)


async def _json(response):
    text = await response.text()
    assert "Traceback" not in text
    try:
        return json.loads(text)
    except ValueError:
        return text


def async_test(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return run


def assert_error(response, body, status, code, param=...):
    assert response.status == status, body
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not ...:
        assert body["error"]["param"] == param, body


# -- creating jobs --------------------------------------------------------------------------------------------------
@async_test
async def test_post_creates_a_job_in_openai_shape_and_publishes_it(tmp_path):
    async with Gateway(tmp_path) as gw:
        response, video = await gw.post()
        assert response.status == 200, video
        assert video["object"] == "video" and video["status"] == "queued" and video["progress"] == 0
        assert video["model"] == "tiny-wan" and video["size"] == "64x48" and video["prompt"] == BODY["prompt"]
        assert video["seconds"] == "0.625" and video["completed_at"] is None and video["error"] is None
        assert isinstance(video["created_at"], int)
        assert video["vidgen"]["tier"] == "premium" and video["vidgen"]["status"] == "requested"
        [event] = gw.publisher.requests
        assert event["job_id"] == video["id"] and event["tenant"] == "acme" and event["tier"] == "PREMIUM"
        assert event["params"] == {"width": 64, "height": 48, "num_frames": 5, "fps": 8, "steps": 2,
                                   "guidance_scale": 1.0, "seed": 0, "model": "tiny-wan", "preset": "fast",
                                   "input_reference": None, "guidance_scale_2": None}
        response, again = await gw.get(f"/v1/videos/{video['id']}")
        assert response.status == 200 and again["id"] == video["id"]


@async_test
async def test_a_two_expert_model_takes_a_second_guidance_scale(tmp_path):
    async with Gateway(tmp_path) as gw:
        response, video = await gw.post({**BODY, "model": "tiny-wan2.2-a14b", "guidance_scale": 5.0,
                                         "guidance_scale_2": 3.0, "preset": "quality"})
        assert response.status == 200, video
        [event] = gw.publisher.requests
        assert (event["params"]["guidance_scale"], event["params"]["guidance_scale_2"]) == (5.0, 3.0)


def test_frames_for_seconds_rounds_to_the_nearest_4k_plus_1():
    assert [frames_for_seconds(s, 8) for s in (0.01, 0.5, 1, 2, 4)] == [1, 5, 9, 17, 33]
    assert frames_for_seconds(4, 16) == 65 and frames_for_seconds(1.2, 10) == 13


@async_test
async def test_seconds_as_string_or_number_and_explicit_frames_wins(tmp_path):
    async with Gateway(tmp_path) as gw:
        body = {"prompt": "p", "seconds": "2", "fps": 8}
        response, video = await gw.post(body)
        assert response.status == 200, video
        assert gw.publisher.requests[-1]["params"]["num_frames"] == 17 and gw.publisher.requests[-1]["seconds"] == 2
        assert video["seconds"] == "2" and video["duration_seconds"] == 2.125, "echoed as asked; exact beside it"
        assert (await gw.get(f"/v1/videos/{video['id']}"))[1]["seconds"] == "2"
        response, _ = await gw.post({"prompt": "p", "seconds": 1})
        assert gw.publisher.requests[-1]["params"]["num_frames"] == 9
        response, video = await gw.post({"prompt": "p", "seconds": "4", "frames": 5})
        assert gw.publisher.requests[-1]["params"]["num_frames"] == 5 and gw.publisher.requests[-1]["seconds"] is None
        assert video["seconds"] == f"{5 / 24:g}" or video["seconds"] == f"{5 / video['vidgen']['params']['fps']:g}"


@async_test
async def test_form_bodies_as_openai_clients_send_them(tmp_path):
    async with Gateway(tmp_path) as gw:
        form = FormData({"prompt": "a boat", "model": "tiny-wan", "size": "32x32", "seconds": "1", "steps": "3"})
        response = await gw.client.post("/v1/videos", data=form, headers=gw.auth())
        video = await _json(response)
        assert response.status == 200, video
        assert gw.publisher.requests[-1]["params"]["steps"] == 3 and video["size"] == "32x32"
        form = FormData()
        form.add_field("prompt", "a boat")
        form.add_field("steps", b"3", filename="steps.txt", content_type="text/plain")
        response = await gw.client.post("/v1/videos", data=form, headers=gw.auth())
        assert_error(response, await _json(response), 400, "invalid_parameter", "steps")  # only the image is a file


INVALID = [
    ({}, "missing_parameter", "prompt"),
    ({"prompt": "   "}, "invalid_parameter", "prompt"),
    ({"prompt": "x" * 10_001}, "invalid_parameter", "prompt"),
    ({"prompt": "p", "negative_prompt": 5}, "invalid_parameter", "negative_prompt"),
    ({"prompt": 7}, "invalid_parameter", "prompt"),
    ({"prompt": "p", "size": "65x64"}, "invalid_parameter", "size"),
    ({"prompt": "p", "size": "big"}, "invalid_parameter", "size"),
    ({"prompt": "p", "size": "4096x64"}, "invalid_parameter", "size"),
    ({"prompt": "p", "frames": 10}, "invalid_parameter", "frames"),
    ({"prompt": "p", "frames": 5.0}, "invalid_parameter", "frames"),
    ({"prompt": "p", "seconds": "abc"}, "invalid_parameter", "seconds"),
    ({"prompt": "p", "seconds": 0}, "invalid_parameter", "seconds"),
    ({"prompt": "p", "seconds": 100}, "invalid_parameter", "seconds"),
    ({"prompt": "p", "steps": 0}, "invalid_parameter", "steps"),
    ({"prompt": "p", "steps": 1001}, "invalid_parameter", "steps"),
    ({"prompt": "p", "steps": "5"}, "invalid_parameter", "steps"),
    ({"prompt": "p", "steps": True}, "invalid_parameter", "steps"),
    ({"prompt": "p", "seed": -1}, "invalid_parameter", "seed"),
    ({"prompt": "p", "fps": 0}, "invalid_parameter", "fps"),
    ({"prompt": "p", "guidance_scale": -1}, "invalid_parameter", "guidance_scale"),
    ({"prompt": "p", "guidance_scale_2": 3.0}, "invalid_parameter", "guidance_scale_2"),  # tiny-wan: one expert
    ({"prompt": "p", "model": "tiny-wan2.2-a14b", "guidance_scale_2": -1}, "invalid_parameter", "guidance_scale_2"),
    ({"prompt": "p", "model": "tiny-wan2.2-ti2v-5b", "size": "48x48"}, "invalid_parameter", "size"),  # 32s
    ({"prompt": "p", "model": "sora-2"}, "unknown_model", "model"),
    ({"prompt": "p", "model": "/etc"}, "unknown_model", "model"),
    ({"prompt": "p", "tier": "gold"}, "invalid_parameter", "tier"),
    ({"prompt": "p", "preset": "turbo"}, "invalid_parameter", "preset"),
    ({"prompt": "p", "colour": "red"}, "unknown_parameter", "colour"),
]


@pytest.mark.parametrize("body,code,param", INVALID, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(INVALID)])
@async_test
async def test_invalid_requests_answer_400_naming_the_field(tmp_path, body, code, param):
    async with Gateway(tmp_path) as gw:
        response, error = await gw.post(body)
        assert_error(response, error, 400, code, param)
        assert error["error"]["type"] == "invalid_request_error"
        assert not gw.publisher.requests


@async_test
async def test_bodies_that_are_not_json_objects(tmp_path):
    async with Gateway(tmp_path) as gw:
        for data in ("{", "[1, 2]", ""):
            response = await gw.client.post("/v1/videos", data=data,
                                            headers={**gw.auth(), "Content-Type": "application/json"})
            assert_error(response, await _json(response), 400, "invalid_json")
        response = await gw.client.post("/v1/videos", data="hello", headers={**gw.auth(), "Content-Type": "text/plain"})
        assert_error(response, await _json(response), 415, "unsupported_media_type")
        assert not gw.publisher.requests


# -- authentication, tiers, limits ------------------------------------------------------------------------------------
@async_test
async def test_api_keys(tmp_path):
    async with Gateway(tmp_path) as gw:
        response = await gw.client.post("/v1/videos", json=BODY)
        assert_error(response, await _json(response), 401, "missing_api_key")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        response, error = await gw.post(key="vg_not-a-key")
        assert_error(response, error, 401, "invalid_api_key")
        response = await gw.client.get("/v1/videos", headers={"Authorization": f"Basic {gw.acme_key}"})
        assert_error(response, await _json(response), 401, "missing_api_key")
        response = await gw.client.get("/v1/videos", params={"api_key": gw.acme_key})
        # ?api_key= only where a browser cannot send a header (websockets, media URLs): not on the API's calls
        assert_error(response, await _json(response), 401, "api_key_in_query")
        for path in ("/openapi.json", "/healthz", "/"):
            assert (await gw.client.get(path)).status == 200, path
        assert not gw.publisher.requests


@async_test
async def test_tier_comes_from_the_tenant_and_may_only_be_lowered(tmp_path):
    async with Gateway(tmp_path) as gw:
        response, video = await gw.post({**BODY}, key=gw.other_key)
        assert response.status == 200 and video["vidgen"]["tier"] == "standard"
        response, error = await gw.post({**BODY, "tier": "premium"}, key=gw.other_key)
        assert_error(response, error, 403, "tier_not_allowed", "tier")
        response, video = await gw.post({**BODY, "tier": "free"}, key=gw.other_key)
        assert response.status == 200 and gw.publisher.requests[-1]["tier"] == "FREE"
        response, video = await gw.post({**BODY, "tier": "standard"})  # acme is premium
        assert response.status == 200 and gw.publisher.requests[-1]["tier"] == "STANDARD"
        assert len(gw.publisher.requests) == 3


@async_test
async def test_rate_limit_answers_429_with_retry_after(tmp_path):
    async with Gateway(tmp_path, acme_rate=0.5, acme_burst=2) as gw:
        assert (await gw.post())[0].status == 200
        assert (await gw.get("/v1/videos"))[0].status == 200  # every authenticated request takes a token
        response, error = await gw.post()
        assert_error(response, error, 429, "rate_limit_exceeded")
        assert response.headers["Retry-After"] == "2" and error["error"]["type"] == "rate_limit_error"
        response, _ = await gw.post(key=gw.other_key)
        assert response.status == 200, "another tenant has its own bucket"
        gw.clock.now += 2.0
        assert (await gw.post())[0].status == 200
        assert len(gw.publisher.requests) == 3


def test_token_bucket():
    bucket = TokenBucket(rate_per_s=4.0, burst=2, tokens=2.0, updated=0.0)
    assert [bucket.take(0.0), bucket.take(0.0)] == [0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.25)
    assert bucket.take(0.25) == 0.0
    assert bucket.take(100.0) == 0.0 and bucket.tokens == pytest.approx(1.0)  # refills only up to the burst
    assert retry_after_header(0.01) == "1" and retry_after_header(2.2) == "3"


@async_test
async def test_in_flight_quota(tmp_path):
    async with Gateway(tmp_path, acme_in_flight=2) as gw:
        first = (await gw.post())[1]
        assert (await gw.post())[0].status == 200
        response, error = await gw.post()
        assert_error(response, error, 429, "in_flight_limit")
        assert "Retry-After" not in response.headers
        assert (await gw.post(key=gw.other_key))[0].status == 200
        gw.jobs.fail(first["id"])  # a job ends: room for one more
        assert (await gw.post())[0].status == 200
        assert (await gw.post())[0].status == 429


@async_test
async def test_in_flight_quota_holds_for_concurrent_requests(tmp_path):
    async with Gateway(tmp_path, acme_in_flight=2) as gw:
        gw.publisher.delay_s = 0.05  # all five are being acknowledged at once
        results = await asyncio.gather(*(gw.post() for _ in range(5)))
        assert sorted(r.status for r, _ in results) == [200, 200, 429, 429, 429]
        assert len(gw.publisher.requests) == 2


@async_test
async def test_a_job_that_could_not_be_published_gives_its_place_back(tmp_path):
    async with Gateway(tmp_path, acme_in_flight=1) as gw:
        gw.publisher.fail_with = "broker down"
        assert (await gw.post())[0].status == 503
        gw.publisher.fail_with = None
        await asyncio.sleep(0)  # the release is written by a task of its own
        assert (await gw.post())[0].status == 200
        assert [(r["action"], r.get("reason")) for r in gw.publisher.quota] == [
            ("CLAIM", ""), ("RELEASE", "not published"), ("CLAIM", "")]


@async_test
async def test_hourly_creation_quota(tmp_path):
    async with Gateway(tmp_path, acme_in_flight=100, acme_per_hour=2) as gw:
        for _ in range(2):
            _, video = await gw.post()
            gw.jobs.fail(video["id"])  # ended at once (as a blocked prompt would): in flight does not hold it back
        response, error = await gw.post()
        assert_error(response, error, 429, "hourly_limit")
        assert 3500 <= int(response.headers["Retry-After"]) <= 3600
        assert (await gw.post(key=gw.other_key))[0].status == 200, "another tenant's hour"


@async_test
async def test_a_flood_of_blocked_prompts_is_throttled(tmp_path):
    async with Gateway(tmp_path, acme_blocked=2) as gw:
        for _ in range(2):
            _, video = await gw.post()
            assert (await gw.post())[0].status == 200  # blocked ones only count
            gw.jobs.block(video["id"])
        response, error = await gw.post()
        assert_error(response, error, 429, "blocked_prompt_limit")
        assert 3500 <= int(response.headers["Retry-After"]) <= 3600 and "blocked" in error["error"]["message"]
        assert (await gw.post(key=gw.other_key))[0].status == 200


# -- idempotency ------------------------------------------------------------------------------------------------------
@async_test
async def test_idempotency_key(tmp_path):
    async with Gateway(tmp_path) as gw:
        key = {"Idempotency-Key": "order-17"}
        response, first = await gw.post(headers=key)
        assert response.status == 200 and "Idempotent-Replayed" not in response.headers
        assert first["id"] == idempotent_job_id("acme", "order-17")
        response, again = await gw.post(headers=key)
        assert response.status == 200 and response.headers["Idempotent-Replayed"] == "true"
        assert again["id"] == first["id"] and len(gw.publisher.requests) == 1
        response, error = await gw.post({**BODY, "steps": 3}, headers=key)
        assert_error(response, error, 409, "idempotency_key_reused", "Idempotency-Key")
        response, theirs = await gw.post(headers=key, key=gw.other_key)
        assert response.status == 200 and theirs["id"] != first["id"], "keys are per tenant"
        assert len(gw.publisher.requests) == 2


@async_test
async def test_idempotency_key_for_concurrent_and_failed_requests(tmp_path):
    async with Gateway(tmp_path) as gw:
        gw.publisher.delay_s = 0.05
        key = {"Idempotency-Key": "same"}
        results = await asyncio.gather(*(gw.post(headers=key) for _ in range(4)))
        assert [r.status for r, _ in results] == [200] * 4 and len({v["id"] for _, v in results}) == 1
        assert len(gw.publisher.requests) == 1
        gw.publisher.fail_with = "broker down"
        response, error = await gw.post(headers={"Idempotency-Key": "retry-me"})
        assert_error(response, error, 503, "unavailable")
        assert response.headers["Retry-After"] == "1" and "broker down" not in json.dumps(error)
        gw.publisher.fail_with = None
        response, video = await gw.post(headers={"Idempotency-Key": "retry-me"})
        assert response.status == 200 and video["id"] == idempotent_job_id("acme", "retry-me")


@async_test
async def test_idempotency_key_seen_by_another_gateway_process(tmp_path):
    jobs = FakeJobsView()  # the platform's job states, which every gateway process sees
    async with Gateway(tmp_path, jobs=jobs) as one:
        _, first = await one.post(headers={"Idempotency-Key": "k"})
    two = Gateway(tmp_path, jobs=jobs)  # no local record of the key
    two.app["tenants"] = one.tenants
    async with two:
        response, again = await two.post(headers={"Idempotency-Key": "k"}, key=one.acme_key)
        assert response.status == 200 and again["id"] == first["id"] and not two.publisher.requests
        response, error = await two.post({**BODY, "prompt": "something else"}, headers={"Idempotency-Key": "k"},
                                         key=one.acme_key)
        assert_error(response, error, 409, "idempotency_key_reused")


# -- reading, listing, cancelling -------------------------------------------------------------------------------------
@async_test
async def test_another_tenants_job_is_indistinguishable_from_no_job(tmp_path):
    async with Gateway(tmp_path) as gw:
        _, video = await gw.post()
        job_id = video["id"]
        unknown = "0" * 32
        for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/cancel"), ("GET", "/content"),
                               ("GET", "/segments/init.mp4"), ("GET", "/published/video.mp4")):
            theirs = await gw.client.request(method, f"/v1/videos/{job_id}{suffix}", headers=gw.auth(gw.other_key))
            missing = await gw.client.request(method, f"/v1/videos/{unknown}{suffix}", headers=gw.auth(gw.other_key))
            theirs_body, missing_body = await _json(theirs), await _json(missing)
            assert theirs.status == missing.status == 404
            assert json.dumps(theirs_body).replace(job_id, "ID") == json.dumps(missing_body).replace(unknown, "ID")
            assert theirs_body["error"]["code"] == "video_not_found"
        assert not gw.publisher.cancels
        _, listing = await gw.get("/v1/videos", key=gw.other_key)
        assert listing["data"] == []


@async_test
async def test_list_pagination(tmp_path):
    async with Gateway(tmp_path) as gw:
        ids = [(await gw.post({**BODY, "seed": i}))[1]["id"] for i in range(5)]
        await gw.post(key=gw.other_key)
        newest_first = ids[::-1]
        response, page = await gw.get("/v1/videos", params={"limit": 2})
        assert response.status == 200 and page["object"] == "list"
        assert [v["id"] for v in page["data"]] == newest_first[:2] and page["has_more"]
        assert page["first_id"] == newest_first[0] and page["last_id"] == newest_first[1]
        _, page = await gw.get("/v1/videos", params={"limit": 2, "after": page["last_id"]})
        assert [v["id"] for v in page["data"]] == newest_first[2:4] and page["has_more"]
        _, page = await gw.get("/v1/videos", params={"limit": 2, "after": page["last_id"]})
        assert [v["id"] for v in page["data"]] == newest_first[4:] and not page["has_more"]
        _, page = await gw.get("/v1/videos")
        assert len(page["data"]) == 5 and all(v["object"] == "video" for v in page["data"])
        for bad in ({"limit": 0}, {"limit": 101}, {"limit": "ten"}):
            response, error = await gw.get("/v1/videos", params=bad)
            assert_error(response, error, 400, "invalid_parameter", "limit")
        other_id = (await gw.get("/v1/videos", key=gw.other_key))[1]["data"][0]["id"]
        response, error = await gw.get("/v1/videos", params={"after": other_id})
        assert_error(response, error, 400, "invalid_parameter", "after")


@async_test
async def test_cancel_stops_a_job_and_keeps_it(tmp_path):
    async with Gateway(tmp_path) as gw:
        _, video = await gw.post()
        response = await gw.client.post(f"/v1/videos/{video['id']}/cancel", headers=gw.auth())
        cancelled = await _json(response)
        assert response.status == 200 and cancelled["id"] == video["id"]
        assert cancelled["vidgen"]["cancel_requested"]["requested_by"] == "tenant:acme"
        [cancel] = gw.publisher.cancels
        assert cancel["job_id"] == video["id"] and cancel["requested_by"] == "tenant:acme"
        gw.jobs.fold(topics.CANCELLED.name, new_event(video["id"], reason="asked", stage="gpu-agent"))
        _, after = await gw.get(f"/v1/videos/{video['id']}")
        assert after["status"] == "failed" and after["error"]["code"] == "cancelled"
        response = await gw.client.post(f"/v1/videos/{video['id']}/cancel", headers=gw.auth())
        assert_error(response, await _json(response), 409, "video_finished")
        assert len(gw.publisher.cancels) == 1 and not gw.publisher.deletes


@async_test
async def test_delete_removes_a_video_cancelling_it_first_if_it_runs(tmp_path):
    async with Gateway(tmp_path) as gw:
        _, running = await gw.post()
        _, done = await gw.post()
        gw.jobs.publish(done["id"], gw.blobs.put(b"the video", done["id"], "video.mp4", dtype="video/mp4"))
        for video, cancels in ((running, 1), (done, 1)):  # the finished one is not cancelled
            response = await gw.client.delete(f"/v1/videos/{video['id']}", headers=gw.auth())
            assert response.status == 200
            assert await response.json() == {"id": video["id"], "object": "video.deleted", "deleted": True}
            assert len(gw.publisher.cancels) == cancels and gw.publisher.deletes[-1]["job_id"] == video["id"]
            assert gw.publisher.deletes[-1]["requested_by"] == "tenant:acme"
            for path in ("", "/content"):
                response, error = await gw.get(f"/v1/videos/{video['id']}{path}")
                assert_error(response, error, 404, "video_not_found")
        assert gw.publisher.cancels[0]["job_id"] == running["id"]
        assert (await gw.get("/v1/videos"))[1]["data"] == [], "deleted videos are not listed"
        response = await gw.client.delete(f"/v1/videos/{done['id']}", headers=gw.auth())
        assert_error(response, await _json(response), 404, "video_not_found")
        assert len(gw.publisher.deletes) == 2


# -- the queue --------------------------------------------------------------------------------------------------------
@async_test
async def test_a_waiting_job_shows_its_queue_position_and_eta_until_it_runs(tmp_path):
    async with Gateway(tmp_path) as gw:
        _, video = await gw.post()
        job_id = video["id"]
        assert (video["queue_position"], video["queue_eta_seconds"]) == (None, None)  # not placed yet
        placed = new_event(job_id, position=3, waiting=4, eta_s=12.25)
        gw.jobs.fold(topics.QUEUE.name, placed)
        _, waiting = await gw.get(f"/v1/videos/{job_id}")
        assert waiting["status"] == "queued"
        assert (waiting["queue_position"], waiting["queue_eta_seconds"]) == (3, 12.2)
        assert (waiting["vidgen"]["queue_position"], waiting["vidgen"]["queue_waiting"],
                waiting["vidgen"]["queue_eta_s"]) == (3, 4, 12.2)
        _, listing = await gw.get("/v1/videos")
        assert [(v["id"], v["queue_position"], v["queue_eta_seconds"]) for v in listing["data"]] == [
            (job_id, 3, 12.2)]
        # A later position (the newest one counts: in the same millisecond the order would be the event ids').
        moved = {**new_event(job_id, position=1, waiting=1, eta_s=None), "timestamp": placed["timestamp"] + 1}
        gw.jobs.fold(topics.QUEUE.name, moved)
        _, unknown = await gw.get(f"/v1/videos/{job_id}")
        assert (unknown["queue_position"], unknown["queue_eta_seconds"]) == (1, None)
        gw.jobs.fold(topics.STEP_PROGRESS.name, {**new_event(job_id, step=1, total_steps=2, attempt=1, step_ms=10.0),
                                                 "timestamp": moved["timestamp"] + 1})  # it runs after the last move
        _, running = await gw.get(f"/v1/videos/{job_id}")
        assert running["status"] == "in_progress"
        assert (running["queue_position"], running["queue_eta_seconds"]) == (None, None)
        assert running["vidgen"]["queue_position"] is None


# -- outputs ----------------------------------------------------------------------------------------------------------
@async_test
async def test_content_with_range_requests(tmp_path):
    async with Gateway(tmp_path) as gw:
        _, video = await gw.post()
        job_id = video["id"]
        response, error = await gw.get(f"/v1/videos/{job_id}/content")
        assert_error(response, error, 409, "video_not_ready")
        data = bytes(range(256)) * 40
        folder = (job_id, "published", "0123456789abcdef")
        ref = gw.blobs.put(data, *folder, "video.mp4", dtype="video/mp4")
        small = gw.blobs.put(b"small rendition", *folder, "360p.mp4", dtype="video/mp4")
        gw.blobs.put(b"#EXTM3U\n", *folder, "360p.m3u8")
        gw.jobs.publish(job_id, ref, renditions=[{"name": "360p", "width": 64, "height": 48, "media": small}])

        _, done = await gw.get(f"/v1/videos/{job_id}")
        assert done["status"] == "completed" and done["progress"] == 100 and done["completed_at"] is not None
        assert done["vidgen"]["outputs"]["video"]["url"] == f"/v1/videos/{job_id}/content"
        assert "file://" not in json.dumps(done), "blob store URIs are internal"

        response = await gw.client.get(f"/v1/videos/{job_id}/content", headers=gw.auth())
        assert response.status == 200 and await response.read() == data
        assert response.headers["Content-Type"] == "video/mp4"
        response = await gw.client.get(f"/v1/videos/{job_id}/content", headers={**gw.auth(), "Range": "bytes=10-19"})
        assert response.status == 206 and await response.read() == data[10:20]
        assert response.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
        response = await gw.client.get(f"/v1/videos/{job_id}/content", headers={**gw.auth(), "Range": "bytes=-5"})
        assert response.status == 206 and await response.read() == data[-5:]
        response = await gw.client.get(f"/v1/videos/{job_id}/content",
                                       headers={**gw.auth(), "Range": f"bytes={len(data) + 5}-"})
        assert response.status == 416

        url = done["vidgen"]["outputs"]["renditions"][0]["url"]
        response = await gw.client.get(url, headers=gw.auth())
        assert response.status == 200 and await response.read() == b"small rendition"
        response, error = await gw.get(f"/v1/videos/{job_id}/content", params={"variant": "8k"})
        assert_error(response, error, 400, "invalid_parameter", "variant")
        response = await gw.client.get(f"/v1/videos/{job_id}/published/360p.m3u8", headers=gw.auth())
        assert response.status == 200 and await response.read() == b"#EXTM3U\n"
        for name in ("..", "nope.mp4"):
            response = await gw.client.get(f"/v1/videos/{job_id}/published/{name}", headers=gw.auth())
            assert response.status == 404


@async_test
async def test_live_segments(tmp_path):
    async with Gateway(tmp_path) as gw:
        _, video = await gw.post()
        job_id = video["id"]
        init = gw.blobs.put(b"init", job_id, "init.mp4")
        segment = gw.blobs.put(b"segment zero", job_id, "segment-00000.m4s")
        playlist = gw.blobs.put(b"#EXTM3U\n", job_id, "playlist.m3u8")
        gw.jobs.fold(topics.DECODED.name, new_event(
            job_id, segment_index=0, segment=segment, frame_start=0, frames=1, is_last=False, init_segment=init,
            playlist=playlist))
        _, state = await gw.get(f"/v1/videos/{job_id}")
        assert state["status"] == "in_progress"
        [seg] = state["vidgen"]["segments"]
        assert seg["url"] == f"/v1/videos/{job_id}/segments/segment-00000.m4s" and "uri" not in seg
        assert state["vidgen"]["init_segment"] == f"/v1/videos/{job_id}/segments/init.mp4"
        for url, data in ((seg["url"], b"segment zero"), (state["vidgen"]["init_segment"], b"init"),
                          (state["vidgen"]["playlist"], b"#EXTM3U\n")):
            response = await gw.client.get(url, headers=gw.auth())
            assert response.status == 200 and await response.read() == data
        response, error = await gw.get(f"/v1/videos/{job_id}/segments/segment-00001.m4s")
        assert_error(response, error, 404, "file_not_found")


# -- models -----------------------------------------------------------------------------------------------------------
@async_test
async def test_models_lists_what_the_gateway_serves_in_openai_shape(tmp_path):
    from gateway.openapi import SCHEMAS
    from gpu_agents.models import ModelCatalogue

    async with Gateway(tmp_path) as gw:
        response = await gw.client.get("/v1/models")
        assert_error(response, await _json(response), 401, "missing_api_key")
        response, models = await gw.get("/v1/models")
        assert response.status == 200, models
        assert models["object"] == "list"
        ids = [m["id"] for m in models["data"]]
        assert sorted(ids) == sorted(gw.app["model_ids"]) and ids[0] == gw.settings.default_model == "tiny-wan"
        catalogue = ModelCatalogue(device="cpu")
        for model in models["data"]:
            facts = catalogue.facts(model["id"]).as_dict()
            assert (model["object"], model["created"], model["owned_by"]) == ("model", 0, "vidgen")
            assert model["vidgen"] == {**{k: facts[k] for k in ("family", "modalities", "streams_while_generating",
                                                                  "experts", "limits", "description")},
                                       "default": model["id"] == "tiny-wan"}, model
            assert "source" not in model["vidgen"]
            assert set(model) == set(SCHEMAS["Model"]["properties"])
            assert set(model["vidgen"]) == set(SCHEMAS["Model"]["properties"]["vidgen"]["properties"])
            assert set(model["vidgen"]["limits"]) == set(
                SCHEMAS["Model"]["properties"]["vidgen"]["properties"]["limits"]["properties"])
        by_id = {m["id"]: m for m in models["data"]}
        assert by_id["tiny-wan2.2-i2v-a14b"]["vidgen"]["modalities"] == ["i2v"]
        assert by_id["tiny-wan2.2-ti2v-5b"]["vidgen"]["limits"]["spatial_multiple"] == 32
        assert by_id["tiny-wan2.2-a14b"]["vidgen"]["experts"] == 2

        response, model = await gw.get("/v1/models/tiny-wan2.2-ti2v-5b", key=gw.other_key)
        assert response.status == 200 and model == by_id["tiny-wan2.2-ti2v-5b"]
        for unknown in ("nope", "tiny-wan/../etc", "%2Ftmp%2Fmodel"):
            response, error = await gw.get(f"/v1/models/{unknown}")
            assert_error(response, error, 404, "model_not_found", "model_id")
        response = await gw.client.get("/v1/models/tiny-wan")
        assert_error(response, await _json(response), 401, "missing_api_key")
        response, _ = await gw.get("/v1/models")
        assert response.status == 200  # as the web page asks (with the header)


@async_test
async def test_models_put_the_default_first_and_never_show_a_directory(tmp_path):
    from dataclasses import replace

    gw = Gateway(tmp_path)
    settings = replace(gw.settings, default_model="tiny-ltx2", model_dirs={"local-wan": str(tmp_path / "secret-dir")})
    gw.app = build_app(settings, jobs=gw.jobs, tenants=gw.tenants, publisher=gw.publisher,
                       static_dir=tmp_path / "static")
    async with gw:
        response, models = await gw.get("/v1/models")
        assert response.status == 200, models
        assert [m["id"] for m in models["data"] if m["vidgen"]["default"]] == ["tiny-ltx2"]
        assert models["data"][0]["id"] == "tiny-ltx2"
        # The directory does not exist: the model is left out of the list, and named without its path.
        assert "local-wan" not in [m["id"] for m in models["data"]]
        assert "secret-dir" not in json.dumps(models)
        response, error = await gw.get("/v1/models/local-wan")
        assert_error(response, error, 503, "model_unavailable")
        assert "secret-dir" not in json.dumps(error)


# -- errors and the document ------------------------------------------------------------------------------------------
@async_test
async def test_errors_are_json_never_a_stack_trace(tmp_path):
    async with Gateway(tmp_path) as gw:
        response, error = await gw.get("/v2/nothing")
        assert_error(response, error, 404, "not_found")
        response = await gw.client.put("/v1/videos", headers=gw.auth())
        assert_error(response, await _json(response), 405, "method_not_allowed")
        assert "POST" in response.headers["Allow"]

        def broken(job_id):
            raise RuntimeError("secret detail /var/lib/internal")

        gw.jobs.get = broken
        response, error = await gw.get(f"/v1/videos/{'a' * 32}")
        assert_error(response, error, 500, "internal_error")
        assert "secret" not in json.dumps(error) and "RuntimeError" not in json.dumps(error)


def _router_operations(app: web.Application) -> set[tuple[str, str]]:
    operations = set()
    for resource in app.router.resources():
        for route in resource:
            if route.method != "HEAD":  # aiohttp adds HEAD to every GET
                operations.add((route.method, resource.canonical))
    return operations


@async_test
async def test_openapi_lists_exactly_the_routes_the_app_has(tmp_path):
    async with Gateway(tmp_path) as gw:
        response = await gw.client.get("/openapi.json")
        document = await response.json()
    assert document["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert documented == _router_operations(gw.app)
    assert len(documented) == len(ROUTES)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation["responses"], (method, path)
            for name in (p["name"] for p in operation.get("parameters", ()) if p["in"] == "path"):
                assert "{" + name + "}" in path
    schemas = document["components"]["schemas"]
    refs = {ref.rsplit("/", 1)[-1] for ref in _refs(document)}
    assert refs <= set(schemas), refs - set(schemas)
    assert document["paths"]["/v1/videos/{video_id}/events"]["get"]["x-websocket"] is True
    assert set(schemas["CreateVideoRequest"]["properties"]) == set(
        __import__("gateway.app", fromlist=["CREATE_FIELDS"]).CREATE_FIELDS)


def test_openapi_documents_every_field_of_the_video_object_and_the_job_state(tmp_path):
    from gateway.app import video_object
    from gateway.openapi import SCHEMAS

    jobs = FakeJobsView()
    jobs.note_submitted("j1", "acme", new_event("j1", tier="PREMIUM", prompt="a fox", params={
        "width": 64, "height": 64, "num_frames": 5, "fps": 8}))
    jobs.fold(topics.QUEUE.name, new_event("j1", position=2, waiting=3, eta_s=4.0))
    video = video_object(jobs.get("j1"))
    assert set(video) == set(SCHEMAS["Video"]["properties"])
    assert set(SCHEMAS["Video"]["required"]) <= set(video)
    assert set(video["vidgen"]) == set(SCHEMAS["JobState"]["properties"])
    for name in ("queue_position", "queue_eta_seconds"):
        assert SCHEMAS["Video"]["properties"][name]["anyOf"][1] == {"type": "null"}


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


# -- tenants ----------------------------------------------------------------------------------------------------------
def test_tenants_store_only_key_hashes(tmp_path):
    store = TenantStore()
    tenant, key = store.create_tenant("acme", "premium", rate_per_s=5, burst=10, max_in_flight=3)
    second = store.add_key("acme")
    assert key.startswith("vg_") and len(key) > 40 and key != second
    assert store.authenticate(key).id == store.authenticate(second).id == "acme"
    assert store.authenticate("vg_wrong") is None and store.authenticate("") is None
    path = store.save(tmp_path / "tenants.toml")
    text = path.read_text()
    assert key not in text and second not in text and hash_key(key) in text
    loaded = TenantStore.load(path)
    assert loaded.get("acme") == store.get("acme")
    assert loaded.authenticate(second).tier == "premium"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError):
        Tenant("bad id!", "premium")
    with pytest.raises(ValueError):
        Tenant("x", "gold")


def test_first_run_creates_a_dev_tenant_once(tmp_path):
    store, key = load_or_create(tmp_path / "tenants.toml")
    assert key and store.authenticate(key).id == "dev"
    again, no_key = load_or_create(tmp_path / "tenants.toml")
    assert no_key is None and again.authenticate(key).id == "dev"


@async_test
async def test_with_the_real_jobs_view(tmp_path):
    from gateway.jobs import JobsView

    class NotStarted(JobsView):  # no Kafka: the view is fed by the gateway's own note_submitted
        async def start(self, app=None):
            pass

        async def stop(self, app=None):
            pass

    async with Gateway(tmp_path, jobs=NotStarted()) as gw:
        _, video = await gw.post(headers={"Idempotency-Key": "real"})
        _, again = await gw.get(f"/v1/videos/{video['id']}")
        assert again["status"] == "queued" and again["vidgen"]["tenant"] == "acme"
        _, listing = await gw.get("/v1/videos")
        assert [v["id"] for v in listing["data"]] == [video["id"]]
        assert (await gw.get(f"/v1/videos/{video['id']}", key=gw.other_key))[0].status == 404
        state = fold(None, topics.REQUESTED.name, gw.publisher.requests[0])
        assert state.tenant == "acme"


def test_the_gateway_validates_against_the_models_description_without_importing_torch(tmp_path):
    """The gateway's app, built in a fresh process, checks a request with the same facts as the prompt encoder (from
    `vidgen models --json`, kept in <var>/run/model-facts.json) and never imports torch, diffusers or
    transformers."""
    import subprocess
    import sys

    script = f"""
import asyncio, sys
from aiohttp.test_utils import TestClient, TestServer
from gateway.app import build_app
from gateway.tenants import TenantStore
from streams.settings import Settings
from tests.fakes import FakeJobsView, FakePublisher

tenants = TenantStore()
_, key = tenants.create_tenant("acme", "premium")
app = build_app(Settings(var_dir={str(tmp_path)!r}), jobs=FakeJobsView(), tenants=tenants, publisher=FakePublisher())

async def main():
    async with TestClient(TestServer(app)) as client:
        auth = {{"Authorization": f"Bearer {{key}}"}}
        good = await client.post("/v1/videos", json={{"prompt": "a fox", "size": "64x64", "frames": 5}}, headers=auth)
        bad = await client.post("/v1/videos", json={{"prompt": "a fox", "size": "60x64"}}, headers=auth)
        models = await client.get("/v1/models", headers=auth)
        print(good.status, bad.status, (await bad.json())["error"]["param"], len((await models.json())["data"]))

asyncio.run(main())
print(sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
"""
    for _ in range(2):  # the second start reads the description the first one kept
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr[-3000:]
        answers, imported = done.stdout.strip().splitlines()[-2:]
        status, refused, param, model_count = answers.split()
        assert (status, refused, param) == ("200", "400", "size") and int(model_count) >= 2
        assert imported == "[]", done.stdout
    assert (tmp_path / "run" / "model-facts.json").exists()
