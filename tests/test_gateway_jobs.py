"""The gateway's job view without Kafka: tracker states and live events merged exactly, envelopes from state changes,
subscriptions per tenant, slow subscribers dropped, late subscribers starting from the state; and the two websocket
handlers on a small aiohttp app fed by hand."""
from __future__ import annotations

import asyncio
import json
import random

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from consumers.job_state import PUBLISHED, fold_all, to_public
from gateway import events as ws_events
from gateway.jobs import CLOSE_GOING_AWAY, CLOSE_SLOW, Envelope, JobsView, envelopes
from tests.test_job_state import (T0, _queued_lifecycle, cancelled, checkpoint, encoded, failed, flagged,
                                  job_lifecycle, queued_at, requested, step)


def drain(sub) -> list[dict]:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


def types(envs) -> list[str]:
    return [e["type"] if e is not None else None for e in envs]


def feed(view: JobsView, events) -> None:
    for topic_name, event in events:
        view.ingest_event(topic_name, event)


def with_tenant(events, tenant: str):
    return [(t, dict(e, tenant=tenant)) if "tenant" in e else (t, e) for t, e in events]


# -- envelopes -----------------------------------------------------------------------------------------------------
def test_a_live_job_translates_into_the_documented_envelopes():
    view = JobsView()
    view.ingest_event(*requested("j1"))
    sub = view.subscribe("acme", "j1")
    feed(view, job_lifecycle("j1", total=4, segments=2)[1:])
    envs = drain(sub)
    assert types(envs) == ["state", "queued", "started", "progress", "progress", "checkpoint", "progress",
                           "progress", "segment", "segment", "published"]
    assert envs[0]["data"]["status"] == "requested" and envs[0]["data"]["links"]["self"] == "/v1/videos/j1"
    assert envs[1]["data"] == {"job_id": "j1", "tier": "premium", "at": T0 + 100, "position": None, "waiting": None,
                               "eta_s": None}  # no QueuePosition in this job's events
    assert envs[2]["data"]["attempt"] == 1 and envs[2]["data"]["max"] == 4
    progress = [e["data"] for e in envs if e["type"] == "progress"]
    assert [(p["value"], p["max"]) for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert progress[0]["eta_ms"] == 60 and progress[-1]["eta_ms"] == 0 and progress[0]["attempt"] == 1
    assert envs[5]["data"] == {"job_id": "j1", "step": 2, "max": 4, "attempt": 1}
    first_segment = envs[8]["data"]
    assert first_segment == {"job_id": "j1", "index": 0, "url": "/v1/videos/j1/segments/segment-0.m4s",
                             "init_url": "/v1/videos/j1/segments/init.mp4",
                             "playlist_url": "/v1/videos/j1/segments/live-0.m3u8", "frame_start": 0, "frames": 5,
                             "is_last": False}
    done = envs[-1]["data"]
    assert done["url"] == "/v1/videos/j1/content" and done["status"] == PUBLISHED
    assert done["renditions"] == [{"name": "360p", "width": 64, "height": 64,
                                   "url": "/v1/videos/j1/content?variant=360p"}]
    for env in envs:  # one JSON text per envelope, the same for every socket
        assert isinstance(env, Envelope) and json.loads(env.text) == json.loads(json.dumps(env))
        assert env["data"]["job_id"] == "j1"


def test_other_endings_flags_failures_cancellations_and_a_resume():
    flagged_block = envelopes(None, fold_all(job_lifecycle("j1")[:-1] + [flagged("j1", at=T0 + 6900)]))
    flag = [e for e in flagged_block if e["type"] == "flagged"]
    assert len(flag) == 1 and flag[0]["data"]["terminal"] is True and flag[0]["data"]["decision"] == "BLOCK"
    assert "published" not in types(flagged_block)

    review = fold_all([requested("j2"), flagged("j2", decision="REVIEW", ends_job=True)])
    (env,) = [e for e in envelopes(None, review) if e["type"] == "flagged"]
    assert env["data"]["terminal"] is False and env["data"]["ends_job"] is True

    failure = envelopes(None, fold_all([requested("j3"), step("j3", 1), failed("j3")]))
    assert types(failure)[-1] == "failed" and failure[-1]["data"]["reason"] == "out of memory"
    stopped = envelopes(None, fold_all([requested("j4"), step("j4", 1), cancelled("j4")]))
    assert types(stopped)[-1] == "cancelled" and stopped[-1]["data"]["stopped_at_step"] == 2

    before = fold_all([requested("j5"), step("j5", 1), step("j5", 2), step("j5", 3)])
    resumed = fold_all([step("j5", 3, attempt=2, resumed_from=2)], before)
    envs = envelopes(before, resumed)
    assert types(envs) == ["started", "progress"]
    assert envs[0]["data"]["attempt"] == 2 and envs[0]["data"]["resumed_from_step"] == 2
    assert (envs[1]["data"]["value"], envs[1]["data"]["attempt"]) == (3, 2)

    done = fold_all(job_lifecycle("j6"))
    assert envelopes(done, fold_all([step("j6", 9, total=9, attempt=2)], done)) == []  # nothing after the end


def test_queued_is_told_whenever_the_position_or_eta_moves_and_never_after_the_start():
    view = JobsView()
    view.ingest_event(*requested("j1"))
    sub, tenant_sub = view.subscribe("acme", "j1"), view.subscribe("acme")
    drain(sub), drain(tenant_sub)

    def told(*events):
        feed(view, events)
        envs = drain(sub)
        assert drain(tenant_sub) == envs  # the tenant's feed is told the same
        return envs

    [env] = told(encoded("j1"))
    assert env["type"] == "queued" and env["data"] == {"job_id": "j1", "tier": "premium", "at": T0 + 100,
                                                       "position": None, "waiting": None, "eta_s": None}
    [env] = told(queued_at("j1", 3, T0 + 200, eta_s=9.04, waiting=4))
    assert env["type"] == "queued" and env["data"] == {"job_id": "j1", "tier": "premium", "at": T0 + 100,
                                                       "position": 3, "waiting": 4, "eta_s": 9.0}
    assert told(queued_at("j1", 3, T0 + 200, eta_s=9.04, waiting=4)) == []  # a redelivery
    assert told(queued_at("j1", 3, T0 + 300, eta_s=9.0, waiting=5)) == []  # neither position nor ETA moved
    assert told(queued_at("j1", 5, T0 + 150, eta_s=20.0)) == []  # older than what is shown
    [env] = told(queued_at("j1", 3, T0 + 400, eta_s=6.5, waiting=5))  # the ETA alone moved
    assert (env["data"]["position"], env["data"]["eta_s"], env["data"]["waiting"]) == (3, 6.5, 5)
    [env] = told(queued_at("j1", 1, T0 + 600, eta_s=None, waiting=2))  # unknown ETA
    assert (env["data"]["position"], env["data"]["eta_s"], env["data"]["waiting"]) == (1, None, 2)
    assert told(queued_at("j1", 0, T0 + 900, eta_s=0.0)) == []  # assigned: "started" tells the rest
    assert types(told(step("j1", 1))) == ["started", "progress"]
    assert told(queued_at("j1", 2, T0 + 700, eta_s=3.0)) == []  # a straggler from before the start
    assert view.state("j1").queue_position is None and view.get("j1")["queue_position"] is None


def test_a_requeued_job_is_queued_again_and_a_late_tracker_state_brings_its_position_once():
    view = JobsView()
    feed(view, [requested("j1"), encoded("j1"), queued_at("j1", 0, T0 + 900), step("j1", 1), step("j1", 2)])
    sub = view.subscribe("acme", "j1")
    drain(sub)
    view.ingest_event(*queued_at("j1", 1, T0 + 1500, eta_s=4.0, waiting=2))  # preempted and requeued
    [env] = drain(sub)
    assert env["type"] == "queued" and (env["data"]["position"], env["data"]["eta_s"]) == (1, 4.0)
    assert view.get("j1")["queue_position"] == 1 and view.get("j1")["status"] == "running"
    # The tracker catching up with the same events tells nothing new.
    view.ingest_tracker_state("j1", fold_all([requested("j1"), encoded("j1"), queued_at("j1", 0, T0 + 900),
                                              step("j1", 1), step("j1", 2),
                                              queued_at("j1", 1, T0 + 1500, eta_s=4.0, waiting=2)]).to_dict())
    assert drain(sub) == [] and not view._jobs["j1"].live
    assert types(drain_after(view, sub, step("j1", 3, attempt=2, resumed_from=2))) == ["started", "progress"]
    assert view.get("j1")["queue_position"] is None


def drain_after(view: JobsView, sub, event) -> list:
    view.ingest_event(*event)
    return drain(sub)


def test_a_job_first_seen_waiting_tells_its_position_in_one_go():
    state = fold_all([requested("j1"), encoded("j1"), queued_at("j1", 4, T0 + 300, eta_s=12.0, waiting=7)])
    [env] = envelopes(None, state)
    assert env["type"] == "queued" and (env["data"]["position"], env["data"]["waiting"]) == (4, 7)


# -- merging tracker states and live events ----------------------------------------------------------------------------
def test_tracker_states_and_live_events_in_any_order_give_the_full_fold():
    events = job_lifecycle("j1", total=6, segments=3) + [flagged("j1", decision="REVIEW", ends_job=False)]
    expected = fold_all(events)
    rng = random.Random(7)
    for trial in range(40):
        view = JobsView()
        tracker_order = events[:]
        rng.shuffle(tracker_order)
        cut = rng.randrange(len(events) + 1)
        # The tracker folds in its own order; the live reader sees every event (some twice) in another one.
        live = events[:] + rng.sample(events, 3)
        rng.shuffle(live)
        tracker_states = [fold_all(tracker_order[:n]).to_dict() for n in range(1, cut + 1)]
        _interleave(view, live, tracker_states, rng)
        assert view.state("j1") == expected, f"trial {trial}"
        # Once the tracker has everything, no live event is kept.
        view.ingest_tracker_state("j1", expected.to_dict())
        assert view.state("j1") == expected and "j1" not in view._jobs, "finished and folded: out of memory"


def _interleave(view, live: list, tracker_states: list[dict], rng: random.Random) -> None:
    """Feed job j1's live events and tracker states to the view, interleaved at random; the tracker states keep their
    own order (the changelog is ordered per job)."""
    actions = [("live", e) for e in live] + [("tracker", s) for s in tracker_states]
    rng.shuffle(actions)
    tracker_iter = iter(tracker_states)
    for kind, item in actions:
        if kind == "live":
            view.ingest_event(*item)
        else:
            view.ingest_tracker_state("j1", next(tracker_iter))


def test_tracker_states_and_live_events_with_queue_positions_merge_exactly():
    events = _queued_lifecycle("j1")
    rng = random.Random(11)
    for trial in range(30):
        cut_events = events[:rng.randrange(3, len(events) + 1)]  # a job still waiting, running or done
        expected = fold_all(cut_events)
        view = JobsView()
        tracker_order = cut_events[:]
        rng.shuffle(tracker_order)
        live = cut_events + rng.sample(cut_events, 2)
        rng.shuffle(live)
        states = [fold_all(tracker_order[:n]).to_dict() for n in range(1, rng.randrange(len(cut_events) + 1) + 1)]
        _interleave(view, live, states, rng)
        assert view.state("j1") == expected, f"trial {trial}"


def test_a_newer_tracker_state_keeps_the_live_events_it_does_not_have_yet():
    view = JobsView()
    feed(view, [requested("j1"), step("j1", 1), step("j1", 2), step("j1", 3)])
    assert len(view._jobs["j1"].live) == 4
    view.ingest_tracker_state("j1", fold_all([requested("j1"), step("j1", 1)]).to_dict())
    assert view.state("j1").step == 3  # the tracker is behind: the live steps stay on top
    assert len(view._jobs["j1"].live) == 2  # steps 2 and 3; the request and step 1 are the tracker's now
    # The tracker brings something the live reader missed (a checkpoint): it shows, with the live steps kept.
    view.ingest_tracker_state("j1", fold_all([requested("j1"), step("j1", 1), checkpoint("j1", 1)]).to_dict())
    assert view.state("j1").checkpoints == [1] and view.state("j1").step == 3
    assert view.state("j1") == fold_all([requested("j1"), step("j1", 1), step("j1", 2), step("j1", 3),
                                         checkpoint("j1", 1)])


def test_a_state_change_is_announced_once_whichever_reader_brings_it():
    view = JobsView()
    view.ingest_event(*requested("j1"))
    sub = view.subscribe("acme", "j1")
    drain(sub)
    # The tracker is ahead of the live reader for once: its state announces step 2, the live events then nothing.
    view.ingest_tracker_state("j1", fold_all([requested("j1"), step("j1", 1), step("j1", 2)]).to_dict())
    feed(view, [step("j1", 1), step("j1", 2), step("j1", 2)])
    envs = drain(sub)
    assert types(envs) == ["started", "progress"] and envs[1]["data"]["value"] == 2
    # Replaying everything (a gateway reader restart) sends nothing.
    feed(view, [requested("j1"), step("j1", 1), step("j1", 2)])
    view.ingest_tracker_state("j1", fold_all([requested("j1"), step("j1", 1)]).to_dict())
    assert drain(sub) == []


def test_a_tombstone_forgets_the_job():
    view = JobsView()
    feed(view, [requested("j1")])
    view.ingest_tracker_state("j1", None)
    assert view.get("j1") is None and view.in_flight("acme") == 0 and view.list_for_tenant("acme") == []


# -- subscriptions -------------------------------------------------------------------------------------------------
def test_subscribers_only_ever_get_their_own_tenants_jobs():
    view = JobsView()
    feed(view, with_tenant([requested("a1")], "acme") + with_tenant([requested("b1")], "globex"))
    acme_all, globex_all = view.subscribe("acme"), view.subscribe("globex")
    acme_job = view.subscribe("acme", "a1")
    for other in (("globex", "a1"), ("acme", "b1"), ("acme", "nope")):
        try:
            view.subscribe(*other)
        except KeyError:
            pass
        else:
            raise AssertionError(f"{other} subscribed")
    feed(view, with_tenant(job_lifecycle("a1")[1:], "acme") + with_tenant(job_lifecycle("b1")[1:], "globex"))
    for sub, tenant, job in ((acme_all, "acme", "a1"), (globex_all, "globex", "b1"), (acme_job, "acme", "a1")):
        envs = drain(sub)
        assert envs and {e["data"]["job_id"] for e in envs} == {job}
        assert envs[0]["type"] == "state" and envs[0]["data"]["tenant"] == tenant
        assert envs[-1]["type"] == "published"


def test_the_tenant_feed_learns_of_a_job_whose_request_comes_late():
    view = JobsView()
    sub = view.subscribe("acme")
    feed(view, [step("j1", 1), step("j1", 2)])  # no tenant known yet: nobody is told
    assert drain(sub) == []
    view.ingest_event(*requested("j1"))
    assert types(drain(sub)) == ["started", "progress"]


def test_a_slow_subscriber_is_dropped_and_the_others_go_on():
    view = JobsView(subscriber_queue=5)
    feed(view, [requested("j1")])
    slow, fast = view.subscribe("acme", "j1"), view.subscribe("acme", "j1")
    for n in range(1, 11):
        view.ingest_event(*step("j1", n, total=10))
        drain(fast)
    assert slow.closed and slow.close_code == CLOSE_SLOW and "too slow" in slow.close_reason
    assert drain(slow) == [None]  # what it had not read is gone: it reconnects for the current state
    assert not fast.closed and view.subscriber_count() == 1
    assert view.counters["slow_subscribers"] == 1


def test_a_late_subscriber_gets_the_current_state_first():
    view = JobsView()
    feed(view, job_lifecycle("j1", total=4, segments=2))
    sub = view.subscribe("acme", "j1")
    (env,) = drain(sub)
    assert env["type"] == "state"
    data = env["data"]
    assert data["status"] == PUBLISHED and data["terminal"] and data["step"] == 4
    assert data["links"]["content"] == "/v1/videos/j1/content"
    assert data["links"]["renditions"] == {"360p": "/v1/videos/j1/content?variant=360p"}
    assert [s["url"] for s in data["segments"]] == ["/v1/videos/j1/segments/segment-0.m4s",
                                                    "/v1/videos/j1/segments/segment-1.m4s"]
    assert data["outputs"]["video"]["url"] == "/v1/videos/j1/content"
    assert data["outputs"]["renditions"][0]["url"] == "/v1/videos/j1/content?variant=360p"
    assert data["init_segment"] == "/v1/videos/j1/segments/init.mp4"
    assert "file://" not in json.dumps(data)  # blob store URIs are internal
    public = to_public(view.state("j1"))
    assert {k: v for k, v in data.items() if k not in ("segments", "outputs", "init_segment", "playlist", "links")} \
        == {k: v for k, v in public.items() if k not in ("segments", "outputs", "init_segment", "playlist")}
    # The tenant feed starts with the jobs in flight only.
    feed(view, [requested("j2", at=T0 + 10)])
    assert [(e["type"], e["data"]["job_id"]) for e in drain(view.subscribe("acme"))] == [("state", "j2")]


def test_listing_in_flight_and_a_submitted_job():
    view = JobsView()
    for i in range(5):
        feed(view, [requested(f"j{i}", at=T0 + i)])
    feed(view, job_lifecycle("j0")[1:])
    view.note_submitted("new", "acme", {"event_id": "e-new", "timestamp": T0 + 100, "prompt": "a cat",
                                        "tier": "STANDARD", "params": None})
    assert view.get("new")["status"] == "requested" and view.get("new")["tenant"] == "acme"
    assert view.in_flight("acme") == 5 and view.in_flight("globex") == 0
    page = view.list_for_tenant("acme", limit=2)
    assert [j["job_id"] for j in page] == ["new", "j4"]
    assert [j["job_id"] for j in view.list_for_tenant("acme", limit=10, after="j4")] == ["j3", "j2", "j1", "j0"]
    assert view.list_for_tenant("globex") == [] and view.list_for_tenant("acme", after="unknown") == []


def test_finished_jobs_leave_memory_and_a_listing_reads_one_page_of_an_index(tmp_path):
    from streams.settings import Settings

    view = JobsView(Settings(var_dir=tmp_path))
    finished = {}
    for i in range(2000):
        job_id = f"done-{i:04d}"
        events = [(t, dict(e, timestamp=e["timestamp"] + 7 * i)) for t, e in job_lifecycle(job_id, total=2)]
        finished[job_id] = fold_all(events)
        view.ingest_tracker_state(job_id, finished[job_id].to_dict())  # what a gateway reads at start
    for i in range(3):
        feed(view, [requested(f"running-{i}", at=T0 + 20_000 + i)])
    feed(view, with_tenant([requested("theirs", at=T0 + 30_000)], "globex"))
    assert view.jobs_count() == 4, "only the jobs in flight are held in memory"
    assert view.get("done-0007") == to_public(finished["done-0007"])  # read back from the index
    assert view.jobs_count() == 4

    # Pages in listing order (newest request first), through every job of the tenant and nobody else's.
    listed, after = [], None
    while True:
        page = view.list_for_tenant("acme", limit=100, after=after)
        if not page:
            break
        listed += [j["job_id"] for j in page]
        after = page[-1]["job_id"]
    assert listed == [f"running-{i}" for i in (2, 1, 0)] + [f"done-{i:04d}" for i in reversed(range(2000))]
    assert view.list_for_tenant("globex", limit=5)[0]["job_id"] == "theirs"
    assert view.list_for_tenant("acme", after="theirs") == [], "another tenant's job is no cursor"
    plan = " ".join(row[-1] for row in view._index.db.execute(
        "EXPLAIN QUERY PLAN SELECT job_id, public FROM jobs WHERE tenant = ? AND (sort_at, job_id) < (?, ?) "
        "ORDER BY sort_at DESC, job_id DESC LIMIT ?", ("acme", 0, "", 100)))
    assert "USING INDEX jobs_by_tenant" in plan and "TEMP B-TREE" not in plan, plan  # a range, never a sort

    # A websocket on a finished job holds it in memory only while it is open; an event of it (a late copy) reads
    # it back, and it leaves again.
    sub = view.subscribe("acme", "done-0001")
    assert drain(sub)[0]["data"]["status"] == PUBLISHED
    topic_name, request = job_lifecycle("done-0001", total=2)[0]
    assert not view.ingest_event(topic_name, dict(request, timestamp=request["timestamp"] + 7))  # a redelivery
    view.unsubscribe(sub)
    assert view.jobs_count() == 4
    view.ingest_tracker_state("done-0002", None)  # the tracker let it go
    assert view.get("done-0002") is None
    assert [j["job_id"] for j in view.list_for_tenant("acme", limit=100, after="done-0003")] == ["done-0001",
                                                                                              "done-0000"]
    asyncio.run(view.stop())
    assert not list((tmp_path / "gateway").iterdir()), "the index's file goes with the view"


# -- the websocket handlers on a hand-fed view ---------------------------------------------------------------------------
def _app(view: JobsView) -> web.Application:
    @web.middleware
    async def auth(request, handler):
        request["tenant"] = request.query.get("tenant")
        return await handler(request)

    app = web.Application(middlewares=[auth])
    app["jobs"] = view
    ws_events.add_routes(app)
    return app


@pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
def test_websocket_handlers_send_state_then_envelopes_and_404_other_tenants():
    async def scenario():
        view = JobsView(subscriber_queue=50)
        feed(view, [requested("j1")])
        async with TestClient(TestServer(_app(view))) as client:
            response = await client.get("/v1/videos/j1/events", params={"tenant": "globex"})
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "video_not_found"
            assert (await client.get("/v1/videos/j1/events")).status == 401

            job_ws = await client.ws_connect("/v1/videos/j1/events", params={"tenant": "acme"})
            acme_ws = await client.ws_connect("/v1/events", params={"tenant": "acme"})
            globex_ws = await client.ws_connect("/v1/events", params={"tenant": "globex"})
            assert (await job_ws.receive_json(timeout=5))["type"] == "state"
            assert (await acme_ws.receive_json(timeout=5))["data"]["job_id"] == "j1"  # j1 is in flight
            feed(view, job_lifecycle("j1", total=3, segments=1)[1:])
            received = [await job_ws.receive_json(timeout=5) for _ in range(8)]
            assert types(received) == ["queued", "started", "progress", "progress", "checkpoint", "progress",
                                       "segment", "published"]
            assert [m["type"] for m in [await acme_ws.receive_json(timeout=5) for _ in range(8)]] == types(received)
            try:
                msg = await globex_ws.receive(timeout=0.3)
            except asyncio.TimeoutError:
                msg = None
            assert msg is None, f"globex got {msg}"

            # A subscriber that does not read is dropped with a reason once 50 envelopes behind.
            feed(view, [requested("j2")])
            slow = await client.ws_connect("/v1/videos/j2/events", params={"tenant": "acme"})
            for n in range(1, 200):
                view.ingest_event(*step("j2", n, total=200))
            messages = []
            while True:
                msg = await slow.receive(timeout=5)
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                    break
                messages.append(msg)
            assert slow.close_code == CLOSE_SLOW, slow.close_code
            # Shutting down closes the others with "going away" at once.
            await view.close_subscriptions()
            msg = await globex_ws.receive(timeout=5)
            assert msg.type == WSMsgType.CLOSE and globex_ws.close_code == CLOSE_GOING_AWAY
            for ws in (job_ws, acme_ws, globex_ws):
                await ws.close()
            await view.stop()

    asyncio.run(scenario())


def test_progress_of_a_model_that_streams_while_generating_names_its_chunk():
    view = JobsView()
    view.ingest_event(*requested("j1"))
    sub = view.subscribe("acme", "j1")
    for n in (1, 2, 3):
        topic, event = step("j1", n, total=4)
        feed(view, [(topic, {**event, "chunk_index": (n - 1) // 2, "chunk_count": 2})])
    progress = [e["data"] for e in drain(sub) if e["type"] == "progress"]
    assert [(p["value"], p["chunk_index"], p["chunk_count"]) for p in progress] == [(1, 0, 2), (2, 0, 2), (3, 1, 2)]
    plain = JobsView()
    plain.ingest_event(*requested("j2"))
    sub = plain.subscribe("acme", "j2")
    feed(plain, [step("j2", 1)])
    [progress] = [e["data"] for e in drain(sub) if e["type"] == "progress"]
    assert progress["chunk_index"] is None and progress["chunk_count"] is None
