"""What a stage is: the topics it consumes, and a handler that turns one event into the events it emits.

Stage modules (consumers/, gpu_agents/) define a ``Stage`` and a handler class; they never touch Kafka. The runtime
(streams/runtime.py) does the rest: consume, decode, dedupe, trace, produce, flush, commit, dead-letter.

A handler's contract:
  * ``handle(event, ctx)`` emits zero or more events through ``ctx.emit``; they are produced before the input's
    offset is committed, so a crash in between redelivers the input (at-least-once) and the emitted copies carry
    the same derived event ids (see streams/events.py).
  * Raise ``InvalidEvent`` for an input that is readable but not acceptable: it goes to the dead-letter topic and,
    when it names a job, the job fails with the reason. Any other exception is retried a few times, then treated
    the same way, so one bad job never blocks its partition.
  * A handler that needs several inputs before it can emit (the decoder's chunks) calls ``ctx.hold(job_id)``: the
    input's offset is not committed until ``ctx.release(job_id)``, so a crash replays every input of an unfinished
    job. ``forget(job_ids)`` is called when a rebalance takes the partitions of held jobs away. When the runtime
    fails a job (its input was dead-lettered), it commits the inputs held for it, which nothing will complete now,
    and calls ``abandon(job_id)`` so the handler drops the job and ignores its later inputs.
  * A handler may batch: with ``prepare(events)`` and ``batch_size``, the runtime passes it up to batch_size
    waiting, not yet handled events before handling each one as usual. prepare() may only warm what handle()
    would compute anyway (the prompt encoder encodes the batch in one forward pass), so a failed or partial
    prepare changes nothing but speed.
  * Raise ``NotDue(due_s)`` for an input that must wait until ``due_s`` (epoch seconds; the lifecycle's windows):
    the input stays pending like an interrupted job (neither marked nor committed), its partition is paused and
    rewound to it, and once due it is delivered and handled again. Later inputs of the partition wait behind it,
    which suits inputs in time order (they are due later anyway); a rebalance that takes the partition away drops
    the wait, and the new owner starts again from the committed position.
  * A handler with periodic work of its own (the lifecycle's sweeps) defines ``tick(ctx)``: the runtime calls it
    between inputs, about every second, with a context of no input (``ctx.source.topic`` is ""); what it emits is
    flushed when it returns, and an exception is logged and the next tick goes on. ``ctx.flush()`` (here as in
    ``handle``) waits until everything emitted so far is acknowledged: for an event that must be durable before
    an action it announces (a deletion).
  * A stage that consumes jobs' terminal events (``fails_jobs=False``) never fails a job: its dead letters name
    the job but send no JobFailed, which would be a second terminal event.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from .events import derive_event_id, new_event
from .topics import Topic

if TYPE_CHECKING:
    from .blobs import BlobStore
    from .settings import Settings


class InvalidEvent(ValueError):
    """The event decoded but cannot be accepted (bad parameters, inconsistent fields)."""


class JobInterrupted(Exception):
    """The job stopped at a step boundary, after a checkpoint, because its partition was revoked or the process
    is stopping. Its input is neither committed nor marked done: the next owner resumes it."""


class NotDue(Exception):
    """The input must wait until ``due_s`` (epoch seconds): the runtime redelivers it then (Kafka's delay pattern)."""

    def __init__(self, due_s: float):
        super().__init__(f"not due before {due_s:.3f}")
        self.due_s = due_s


class CancelledByRequest(Exception):
    """The job stopped because a JobCancelled for it arrived on the control topic; the runtime ends it."""

    def __init__(self, step: int | None = None):
        super().__init__(f"cancelled at step {step}" if step is not None else "cancelled")
        self.step = step


class Handler(Protocol):
    def handle(self, event: dict, ctx: "StageContext") -> None: ...


@dataclass(frozen=True)
class Stage:
    name: str
    consumes: tuple[Topic, ...]
    emits: tuple[Topic, ...]
    #: Builds the handler once per process (loads models, opens stores).
    build: Callable[["Settings", "BlobStore"], Handler]
    #: What makes two inputs "the same work" for this stage; a redelivered duplicate is skipped.
    dedupe_key: Callable[[dict], str] = lambda event: f"{event['job_id']}/{event['event_id']}"
    #: Follow cancellations on this topic: a queued job is skipped, a running one stops at the next step.
    control: Topic | None = None
    #: The runtime class that runs this stage, when it is not the plain StageRuntime (the GPU agent's takes its
    #: work from the scheduler; the scheduler's holds a lease). Given by the stage module, so the backbone never
    #: imports a stage.
    runtime: type | None = None
    #: Dead letters fail the job they name; False for a stage of ended jobs (the lifecycle), where a JobFailed would
    #: be a second terminal event.
    fails_jobs: bool = True
    #: How soon the stage must see a new input (a streams.kafka.Latency): its fetch wait on the embedded broker.
    latency: str = "pipeline"
    doc: str = ""

    @property
    def group_id(self) -> str:
        return f"vidgen.{self.name}"


@dataclass
class SourceMessage:
    topic: str
    partition: int
    offset: int
    key: str | None


def _never_stop() -> str | None:
    return None


def _nothing_to_flush() -> None:
    return None


@dataclass
class StageContext:
    """What a handler sees of the runtime while it handles one input."""

    stage: str
    source: SourceMessage
    blobs: "BlobStore"
    _emit: Callable[[Topic, dict, str | None, list], None]
    #: Trace context of this input's span, put on everything emitted for it (from any thread).
    headers: list = field(default_factory=list)
    #: Why the job should stop at the next step boundary: "cancelled", "preempted", "drained", "fenced", or None.
    stop_reason: Callable[[], str | None] = _never_stop
    #: Like stop_reason, but first makes sure every order about this job sent so far has been read (it may block
    #: briefly): asked once, before a job's result becomes final.
    confirm: Callable[[], str | None] = _never_stop
    held: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    #: Waits until everything emitted so far is acknowledged (DeliveryFailed otherwise): see the module docstring.
    flush: Callable[[], None] = _nothing_to_flush

    def emit(self, topic: Topic, event: dict, key: str | None = None) -> None:
        """Produce an event now (asynchronously); it is flushed before the input's offset is committed.
        Safe to call from a helper thread of the handler (a checkpoint writer)."""
        self._emit(topic, event, key if key is not None else event.get("job_id"), self.headers)

    def event(self, job_id: str, *id_parts: object, **fields) -> dict:
        """A new event whose id is derived from (job, this stage, id_parts): identical on redelivery."""
        return new_event(job_id, derive_event_id(job_id, self.stage, *id_parts), **fields)

    def hold(self, key: str) -> None:
        """Keep this input uncommitted until ``release(key)``; ``key`` is the job id (a failed job releases it)."""
        self.held.append(key)

    def release(self, key: str) -> None:
        """The unit ``key`` is done: commit every input held under it (after this input's outputs are flushed)."""
        self.released.append(key)
