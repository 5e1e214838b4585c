"""Which offsets a stage may commit: everything below the oldest input that is still in flight or held.

Kafka commits one position per partition, so an input held for a later release (a decoder waiting for a job's
last chunk) pins the position of its partition even when later inputs are done; after a crash those later inputs
are redelivered too and skipped by the dedupe ledger.
"""
from __future__ import annotations

from collections import defaultdict

TopicPartition = tuple[str, int]


class OffsetTracker:
    def __init__(self) -> None:
        self._next: dict[TopicPartition, int] = {}  # one past the newest offset seen
        self._pending: dict[TopicPartition, set[int]] = defaultdict(set)
        # hold key → the inputs held under it: (partition, offset, dedupe key to mark when released)
        self._held: dict[str, list[tuple[TopicPartition, int, str]]] = defaultdict(list)
        self._committed: dict[TopicPartition, int] = {}

    def started(self, tp: TopicPartition, offset: int) -> None:
        self._pending[tp].add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TopicPartition, offset: int) -> None:
        self._pending[tp].discard(offset)

    def hold(self, key: str, tp: TopicPartition, offset: int, dedupe_key: str) -> None:
        """The input stays pending until ``release(key)``."""
        self._held[key].append((tp, offset, dedupe_key))

    def release(self, key: str) -> list[str]:
        """Un-pin the inputs held under ``key``; returns their dedupe keys (to mark them done)."""
        inputs = self._held.pop(key, [])
        for tp, offset, _ in inputs:
            self._pending[tp].discard(offset)
        return [dedupe_key for _, _, dedupe_key in inputs]

    def is_held(self, tp: TopicPartition, offset: int) -> bool:
        return any(h[0] == tp and h[1] == offset for inputs in self._held.values() for h in inputs)

    def held_keys(self, partitions: set[TopicPartition]) -> list[str]:
        return [k for k, inputs in self._held.items() if any(h[0] in partitions for h in inputs)]

    def commit_positions(self) -> dict[TopicPartition, int]:
        """Positions that moved since the last call: the oldest pending offset, or one past the newest seen."""
        moved = {}
        for tp, nxt in self._next.items():
            pending = self._pending.get(tp)
            position = min(pending) if pending else nxt
            if self._committed.get(tp) != position:
                moved[tp] = position
        return moved

    def committed(self, positions: dict[TopicPartition, int]) -> None:
        self._committed.update(positions)

    def forget(self, partitions: set[TopicPartition]) -> list[str]:
        """Drop the state of revoked partitions; returns the hold keys that lost inputs."""
        keys = self.held_keys(partitions)
        for key in keys:
            self._held[key] = [h for h in self._held[key] if h[0] not in partitions]
            if not self._held[key]:
                del self._held[key]
        for tp in partitions:
            self._next.pop(tp, None)
            self._pending.pop(tp, None)
            self._committed.pop(tp, None)
        return keys
