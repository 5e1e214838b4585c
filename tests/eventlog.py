"""A test's view of the broker: every event on the lifecycle topics, collected by a background reader."""
from __future__ import annotations

import threading
import time
from typing import Callable

from consumers.progress import LIFECYCLE, JobEvent, read_events
from streams import topics
from streams.settings import Settings

ALL_TOPICS = (*LIFECYCLE, topics.LATENT_CHECKPOINTED, topics.CONTROL, topics.DEAD_LETTER)


class EventLog:
    def __init__(self, settings: Settings):
        self.events: list[JobEvent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(settings,), daemon=True)
        self._thread.start()

    def _read(self, settings: Settings) -> None:
        for job_event in read_events(settings, lifecycle=ALL_TOPICS, poll_s=0.02):
            if self._stop.is_set():
                return
            if job_event is not None:
                job_event.seen_at = time.time()
                with self._lock:
                    self.events.append(job_event)

    def of(self, job_id: str, topic: topics.Topic | None = None) -> list[dict]:
        with self._lock:
            return [e.event for e in self.events
                    if e.event.get("job_id") == job_id and (topic is None or e.topic == topic.name)]

    def wait_for(self, predicate: Callable[["EventLog"], object], timeout_s: float = 120.0, what: str = "") -> object:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = predicate(self)
            if result:
                return result
            time.sleep(0.01)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")

    def terminal(self, job_id: str) -> list[tuple[str, dict]]:
        with self._lock:
            return [(e.topic, e.event) for e in self.events if e.event.get("job_id") == job_id
                    and e.topic in {t.name for t in topics.TERMINAL}]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
