"""The gateway's Kafka producer: VideoRequested on vidgen.requested, JobCancelled on vidgen.control, VideoDeleted on
vidgen.deleted, quota claims on vidgen.quota, without ever blocking the event loop.

``producers.requests.VideoRequests`` flushes after every event, which is right for a CLI and wrong for a server:
a flush waits for the broker while every other request waits for the loop. Here ``produce`` only enqueues (it is
thread-safe and returns at once), a poll thread serves librdkafka's delivery callbacks, and each callback resolves
the request's asyncio future through ``loop.call_soon_threadsafe``. So a POST is answered when the broker has
acknowledged its event (acks=all, idempotent producer: the same guarantee as ``VideoRequests.submit``) while
thousands of others are in flight.

The events are encoded with the project's EventCodec (Confluent wire format, schema from the registry) and carry
W3C trace context, exactly as ``VideoRequests`` writes them; ``start`` encodes one event of each kind on a worker
thread first, so the registry look-ups (blocking HTTP) never happen on the loop.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from confluent_kafka import KafkaException, Producer

from streams import topics
from streams.events import new_event
from streams.kafka import producer_config
from streams.serde import encode_key, event_codec
from streams.settings import Settings
from streams.tracing import current_trace_headers

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """The broker did not acknowledge an event (the message says why); the request was not accepted."""


class KafkaPublisher:
    def __init__(self, settings: Settings, *, timeout_s: float = 10.0, client_id: str = "vidgen-gateway"):
        self.settings = settings
        self.timeout_s = timeout_s
        self.client_id = client_id
        self.codec = None
        self.producer: Producer | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.codec = event_codec(self.settings)
        # Registry look-ups (schema ids) are blocking HTTP calls: do them now, off the loop.
        from producers.requests import video_request

        await loop.run_in_executor(None, self.codec.encode, topics.REQUESTED.name, video_request("warm-up"))
        await loop.run_in_executor(None, self.codec.encode, topics.CONTROL.name, new_event("warm-up"))
        await loop.run_in_executor(None, self.codec.encode, topics.DELETED.name, new_event("warm-up", tenant=""))
        await loop.run_in_executor(None, self.codec.encode, topics.QUOTA.name, new_event(
            "warm-up", tenant="warm-up", action="RELEASE", gateway_id="warm-up"))
        self.producer = Producer(producer_config(self.settings, self.client_id))
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll, name="gateway-kafka-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)  # serves delivery callbacks on this thread

    async def stop(self) -> None:
        if self.producer is None:
            return
        loop = asyncio.get_running_loop()
        self._stop.set()
        if self._poller is not None:
            await loop.run_in_executor(None, self._poller.join)
        remaining = await loop.run_in_executor(None, self.producer.flush, self.timeout_s)
        if remaining:
            log.warning("%d events were not acknowledged before the gateway stopped", remaining)
        self.producer = None

    async def publish_request(self, event: dict) -> None:
        """Publish a VideoRequested (built with producers.requests.video_request); returns once acknowledged."""
        await self._produce(topics.REQUESTED, event)

    async def publish_cancel(self, job_id: str, reason: str = "", requested_by: str = "") -> dict:
        """Publish a JobCancelled request on vidgen.control; returns the event once acknowledged."""
        event = new_event(job_id, reason=reason, requested_by=requested_by)
        await self._produce(topics.CONTROL, event)
        return event

    async def publish_delete(self, job_id: str, tenant: str, reason: str = "", requested_by: str = "") -> dict:
        """Publish a VideoDeleted on vidgen.deleted; returns the event once acknowledged."""
        event = new_event(job_id, tenant=tenant, reason=reason, requested_by=requested_by)
        await self._produce(topics.DELETED, event)
        return event

    async def publish_quota(self, record: dict) -> tuple[int, int]:
        """Publish a QuotaClaim (gateway/quota.py) keyed by its tenant; returns its (partition, offset) once
        acknowledged."""
        return await self._produce(topics.QUOTA, record)

    async def _produce(self, topic: topics.Topic, event: dict) -> tuple[int, int]:
        """Returns the record's (partition, offset) once the broker has acknowledged it."""
        if self.producer is None:
            raise PublishError("the publisher is not started")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def resolve(outcome) -> None:
            if not done.done():
                done.set_result(outcome)

        def on_delivery(error, message) -> None:  # on the poll thread
            loop.call_soon_threadsafe(resolve, (error, message.partition(), message.offset()))

        value = self.codec.encode(topic.name, event)
        try:
            self.producer.produce(topic.name, key=encode_key(event[topic.key]), value=value,
                                  headers=current_trace_headers(), on_delivery=on_delivery)
        except BufferError:
            raise PublishError("the gateway's Kafka queue is full; retry shortly") from None
        except KafkaException as exc:
            raise PublishError(f"cannot produce to {topic.name}: {exc}") from exc
        try:
            error, partition, offset = await asyncio.wait_for(done, self.timeout_s)
        except asyncio.TimeoutError:
            raise PublishError(f"{topic.name}: no acknowledgement from the broker in {self.timeout_s:g} s") from None
        if error is not None:
            raise PublishError(f"{topic.name}: the broker refused the event: {error}")
        return partition, offset
