"""The gateway's websockets for real: the embedded broker and registry, the tracker as its own process, a JobsView
reading both the tracker's changelog and the lifecycle topics, and aiohttp websocket clients.

A job that finished before the gateway started comes from the tracker's changelog alone; a job produced while
clients watch arrives envelope by envelope (state → queued → started → progress 1..N → checkpoint → segments →
published) on its own socket and on the tenant's feed, never on another tenant's; a late subscriber starts from the
final state.

Two gateways (each its own view, publisher and quota follower) share one tenant's in-flight quota exactly: of 50
parallel requests spread over both, as many are accepted as the quota allows, and a job's end gives its place back
to whichever gateway asks next. (No stage runs here: accepted jobs stay requested.)
"""
from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Producer

from consumers.job_state import PUBLISHED
from consumers.tracker import JobStateReader
from gateway.app import build_app
from gateway.jobs import JobsView
from gateway.publisher import KafkaPublisher
from gateway.tenants import TenantStore
from streams import topics
from streams.events import new_event, now_ms
from streams.kafka import producer_config
from streams.serde import encode_key, event_codec
from streams.supervisor import PlatformProcesses
from tests.test_job_state import T0, job_lifecycle

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")]

WAIT_S = 30
STEPS = 5


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    platform = PlatformProcesses(tmp_path_factory.mktemp("var"), stages=("tracker",), env={
        "VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000",  # Tansu holds joins for half of it
    })
    settings = platform.start()
    try:
        yield platform, settings
    finally:
        platform.stop()


def lifecycle_now(job_id: str) -> list[tuple[str, dict]]:
    """A whole job (tests.test_job_state.job_lifecycle) with its event times moved to now."""
    shift = now_ms() - T0
    return [(t, dict(e, timestamp=e["timestamp"] + shift)) for t, e in job_lifecycle(job_id, total=STEPS, segments=2)]


class Publisher:
    def __init__(self, settings):
        self.codec = event_codec(settings)
        self.producer = Producer(producer_config(settings, "test-gateway"))

    def __call__(self, *events: tuple[str, dict]) -> None:
        for topic_name, event in events:
            self.producer.produce(topic_name, key=encode_key(event["job_id"]), value=self.codec.encode(topic_name,
                                                                                                        event))
        assert self.producer.flush(10) == 0


class NoPublisher:
    """The app's request publisher; these tests publish the lifecycle events themselves."""


def make_app(settings, view: JobsView) -> tuple[web.Application, dict[str, str]]:
    """The gateway's app (gateway/app.py) over the view, with tenants acme and globex; returns it and their keys."""
    tenants = TenantStore()
    keys = {name: tenants.create_tenant(name, "premium", rate_per_s=1000.0, burst=1000)[1]
            for name in ("acme", "globex")}
    return build_app(settings, jobs=view, tenants=tenants, publisher=NoPublisher()), keys


async def wait_until(predicate, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def receive_until_terminal(ws, timeout_s: float = WAIT_S) -> list[dict]:
    messages = []
    deadline = time.monotonic() + timeout_s
    while not messages or messages[-1]["type"] not in ("published", "failed", "cancelled"):
        messages.append(await ws.receive_json(timeout=max(0.1, deadline - time.monotonic())))
    return messages


def test_websockets_follow_a_job_live_and_serve_history_from_the_tracker(platform):
    platform, settings = platform
    publish = Publisher(settings)

    # A job that ends before the gateway starts: only the tracker's changelog knows it then.
    publish(*lifecycle_now("old-job"))
    deadline = time.monotonic() + WAIT_S
    with JobStateReader(settings) as reader:
        while (reader.catch_up().get("old-job") or {}).get("status") != PUBLISHED:
            assert time.monotonic() < deadline, "the tracker did not fold old-job"
            platform.check_alive()
            time.sleep(0.05)
    time.sleep(0.3)

    async def scenario():
        view = JobsView(settings, live_margin_ms=200)  # the live reader starts after old-job's events
        app, keys = make_app(settings, view)
        acme, globex = {"api_key": keys["acme"]}, {"api_key": keys["globex"]}
        async with TestClient(TestServer(app)) as client:  # the app's start-up starts the view
            assert view.get("old-job")["status"] == PUBLISHED  # from the tracker's history
            assert view.counters["tracker_states_loaded"] >= 1
            old = await client.ws_connect("/v1/videos/old-job/events", params=acme)
            first = await old.receive_json(timeout=5)
            assert first["type"] == "state" and first["data"]["status"] == PUBLISHED
            assert first["data"]["links"]["content"] == "/v1/videos/old-job/content"
            await old.close()

            acme_feed = await client.ws_connect("/v1/events", params=acme)
            globex_feed = await client.ws_connect("/v1/events", params=globex)
            events = lifecycle_now("live-job")
            publish(events[0])  # the request
            await wait_until(lambda: view.get("live-job"), "the request to come back from Kafka")
            response = await client.get("/v1/videos/live-job/events", params=globex)
            assert response.status == 404  # another tenant's job: not found, before any upgrade
            assert (await response.json())["error"]["code"] == "video_not_found"
            job_ws = await client.ws_connect("/v1/videos/live-job/events", params=acme)
            for event in events[1:]:
                publish(event)
                await asyncio.sleep(0.02)
            received = await receive_until_terminal(job_ws)
            kinds = [m["type"] for m in received]
            assert kinds[0] == "state" and received[0]["data"]["status"] in ("requested", "queued")
            queued = ["queued"] if received[0]["data"]["status"] == "requested" else []
            # Kafka orders a job's events within a topic, not across topics: the checkpoint (its own topic) may come
            # before or after a neighbouring step's progress, so the order is asserted per topic.
            assert kinds[-1] == "published"
            assert sorted(kinds) == sorted(["state", *queued, "started", *["progress"] * STEPS, "checkpoint",
                                            "segment", "segment", "published"])
            assert [m["data"]["step"] for m in received if m["type"] == "checkpoint"] == [2]
            progress = [(m["data"]["value"], m["data"]["max"]) for m in received if m["type"] == "progress"]
            assert progress == [(n, STEPS) for n in range(1, STEPS + 1)]
            segments = [m["data"] for m in received if m["type"] == "segment"]
            assert [s["index"] for s in segments] == [0, 1]
            assert segments[0]["url"] == "/v1/videos/live-job/segments/segment-0.m4s"
            assert segments[0]["init_url"] == "/v1/videos/live-job/segments/init.mp4"
            assert received[-1]["data"]["url"] == "/v1/videos/live-job/content"
            assert {m["data"]["job_id"] for m in received} == {"live-job"}

            feed = await receive_until_terminal(acme_feed)
            assert [m["type"] for m in feed if m["type"] != "state"] == kinds[1:]
            try:
                leaked = await globex_feed.receive(timeout=0.5)
            except asyncio.TimeoutError:
                leaked = None
            assert leaked is None, f"another tenant's feed got {leaked}"

            late = await client.ws_connect("/v1/videos/live-job/events", params=acme)
            final = await late.receive_json(timeout=5)
            assert final["type"] == "state" and final["data"]["status"] == PUBLISHED
            assert final["data"]["step"] == STEPS and len(final["data"]["segments"]) == 2
            # The tracker catches up with what the live reader brought; then no live event is kept.
            await wait_until(lambda: view._jobs["live-job"].base is not None
                             and view._jobs["live-job"].base.status == PUBLISHED, "the tracker's final state")
            await wait_until(lambda: not view._jobs["live-job"].live, "the live buffer to empty")
            for ws in (acme_feed, globex_feed, job_ws, late):
                await ws.close()
            # Finished, folded by the tracker and followed by nobody: it leaves memory, and is read back when asked.
            await wait_until(lambda: "live-job" not in view._jobs, "the finished job to leave memory")
            assert view.get("live-job")["status"] == PUBLISHED
        assert not view._threads  # the app's clean-up stopped the view

    asyncio.run(scenario())
    platform.check_alive()


def test_the_in_flight_quota_holds_across_two_gateways(platform):
    platform, settings = platform
    body = {"prompt": "a red fox trotting through fresh snow", "size": "64x64", "frames": 5, "steps": 2}

    async def scenario():
        tenants = TenantStore()
        _, key = tenants.create_tenant("dora", "standard", rate_per_s=1e4, burst=10**4, max_in_flight=20)
        auth = {"Authorization": f"Bearer {key}"}
        views = [JobsView(settings) for _ in range(2)]
        apps = [build_app(settings, jobs=view, tenants=tenants, publisher=KafkaPublisher(settings, client_id=f"gw-{n}"))
                for n, view in enumerate(views)]
        async with TestClient(TestServer(apps[0])) as one, TestClient(TestServer(apps[1])) as two:
            async def post(client):
                response = await client.post("/v1/videos", json=body, headers=auth)
                return response.status, await response.json(), client

            results = await asyncio.gather(*(post((one, two)[n % 2]) for n in range(50)))
            accepted = [video for status, video, _ in results if status == 200]
            refused = [error["error"]["code"] for status, error, _ in results if status != 200]
            assert len(accepted) == 20 and refused == ["in_flight_limit"] * 30
            assert {client for status, _, client in results if status == 200} == {one, two}, "both took some"
            for view in views:  # what is on the broker: exactly the accepted requests
                await wait_until(lambda: view.in_flight("dora") == 20, "the accepted requests on Kafka")
            await asyncio.sleep(0.5)
            assert [view.in_flight("dora") for view in views] == [20, 20]

            # A job ends (its failure on Kafka): one place comes back, to whichever gateway asks first.
            ended = accepted[0]["id"]
            Publisher(settings)((topics.FAILED.name, new_event(ended, tenant="dora", stage="gpu-agent",
                                                               reason="test")))
            await wait_until(lambda: all(app["quota"].in_flight("dora") == 19 for app in apps), "the release")
            statuses = [(await post(client))[0] for client in (two, one, two)]
            assert statuses == [200, 429, 429]
            assert [app["quota"].in_flight("dora") for app in apps] == [20, 20]

    asyncio.run(scenario())
    platform.check_alive()
