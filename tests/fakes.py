"""In-memory stand-ins for the gateway's JobsView and Kafka publisher, for HTTP tests without Kafka.

``FakeJobsView`` has the JobsView methods the HTTP handlers use (gateway/jobs.py has the real one) and folds with
the real ``consumers.job_state``, so the states it serves are exactly what the platform's would be.
"""
from __future__ import annotations

import asyncio

from consumers.job_state import FLAGGED, fold, to_public
from gateway.publisher import PublishError
from streams import topics
from streams.events import new_event


class FakeJobsView:
    def __init__(self):
        self.states = {}  # job_id → JobState
        self.order: list[str] = []  # submission order (newest last)
        self.log = None  # a FakePublisher: what "Kafka" holds, for first_request
        self.started = self.stopped = False
        self.end_listeners = []

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def fold(self, topic_name: str, event: dict) -> None:
        job_id = event["job_id"]
        if job_id not in self.states:
            self.order.append(job_id)
        old = self.states.get(job_id)
        new = self.states[job_id] = fold(old, topic_name, event)
        if new.terminal and (old is None or not old.terminal):
            for listener in self.end_listeners:
                listener(new.tenant, job_id)

    def note_deleted(self, event: dict) -> None:
        self.fold(topics.DELETED.name, event)

    def note_submitted(self, job_id: str, tenant: str, request_event: dict) -> None:
        self.fold(topics.REQUESTED.name, dict(request_event, job_id=job_id, tenant=tenant))

    def state(self, job_id: str):
        return self.states.get(job_id)

    def add_end_listener(self, listener) -> None:
        self.end_listeners.append(listener)

    def get(self, job_id: str) -> dict | None:
        state = self.states.get(job_id)
        return None if state is None else to_public(state)

    def list_for_tenant(self, tenant: str, limit: int, after: str | None = None, newest_first: bool = True):
        ids = [j for j in (reversed(self.order) if newest_first else self.order)
               if self.states[j].tenant == tenant and self.states[j].deleted is None]
        if after is not None:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        return [to_public(self.states[j]) for j in ids[:limit]]

    def request_fingerprint(self, job_id: str) -> str | None:
        state = self.states.get(job_id)
        return None if state is None else state.seen.get("request")

    async def first_request(self, job_id: str, timeout_s: float) -> str | None:
        """The first request of the job on "Kafka": what ``log`` (a FakePublisher several gateways may share)
        received first; None when nothing links the view to one."""
        from consumers.job_state import request_fingerprint

        first = next((e for e in getattr(self.log, "requests", []) if e["job_id"] == job_id), None)
        return None if first is None else request_fingerprint(first)

    def subscribe(self, tenant: str, job_id: str | None = None):
        """A feed that carries nothing (the websocket handlers' contract; gateway/jobs.py has the real one)."""
        from gateway.jobs import Subscription

        return Subscription(tenant, job_id)

    def unsubscribe(self, subscription) -> None:
        pass

    def in_flight(self, tenant: str) -> int:
        return sum(1 for s in self.states.values() if s.tenant == tenant and not s.terminal)

    def blocked_since(self, tenant: str, since_ms: int) -> list[int]:
        return sorted(s.finished_at for s in self.states.values()
                      if s.tenant == tenant and s.status == FLAGGED and s.finished_at >= since_ms)

    # What the platform would do next, for tests.
    def publish(self, job_id: str, video_ref: dict, renditions: list[dict] = ()) -> None:
        state = self.states[job_id]
        params = state.params
        self.fold(topics.PUBLISHED.name, new_event(
            job_id, tenant=state.tenant, video=video_ref, frames=params["num_frames"], width=params["width"],
            height=params["height"], fps=params["fps"], renditions=list(renditions), manifest=None, playlist=None))

    def block(self, job_id: str) -> None:
        self.fold(topics.FLAGGED.name, new_event(job_id, tenant=self.states[job_id].tenant, stage="PRE_GEN",
                                                 decision="BLOCK", reasons=["policy"], scores={},
                                                 policy_version="test"))

    def fail(self, job_id: str, reason: str = "boom") -> None:
        self.fold(topics.FAILED.name, new_event(job_id, stage="gpu-agent", reason=reason))


class FakePublisher:
    """Records what the gateway publishes; ``fail_with`` makes the next publications fail; ``delay_s`` slows them."""

    def __init__(self):
        self.requests: list[dict] = []
        self.cancels: list[dict] = []
        self.quota: list[dict] = []  # vidgen.quota as one partition
        self.deletes: list[dict] = []
        self.fail_with: str | None = None
        self.delay_s = 0.0

    async def publish_request(self, event: dict) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_with:
            raise PublishError(self.fail_with)
        self.requests.append(event)

    async def publish_delete(self, job_id: str, tenant: str, reason: str = "", requested_by: str = "") -> dict:
        if self.fail_with:
            raise PublishError(self.fail_with)
        event = new_event(job_id, tenant=tenant, reason=reason, requested_by=requested_by)
        self.deletes.append(event)
        return event

    async def publish_quota(self, record: dict) -> tuple[int, int]:
        self.quota.append(record)
        return 0, len(self.quota) - 1

    async def publish_cancel(self, job_id: str, reason: str = "", requested_by: str = "") -> dict:
        if self.fail_with:
            raise PublishError(self.fail_with)
        event = new_event(job_id, reason=reason, requested_by=requested_by)
        self.cancels.append(event)
        return event
