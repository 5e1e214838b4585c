"""`vidgen bench dispatch`: how well GPU work is dispatched to a fleet of agents, measured from the event log only.

The real platform on the embedded broker: the prompt encoder, the `scheduler` stage when the build has one, and
A gpu-agent processes (``--agents``, at least 4), each with one torch thread (OMP_NUM_THREADS=1: on a small CPU
box, several agents with a thread per core each slow one another down many times over) and at nice 19, below the
broker and the CPU stages (nice 10), which on a real fleet have machines of their own: else the busy agents starve
the prompt encoder and a backlog arrives as a trickle over tens of seconds. No decoder or compliance: nobody needs
the videos. Nothing here knows how jobs reach agents; every figure comes from records on the broker:

* a job's arrival in the queue: the Kafka timestamp of its PromptEncoded record on vidgen.encoded.<tier>;
* its runs: its StepProgress events (agent_id, attempt, step, step_ms, timestamp), a step starting at its
  timestamp minus its step_ms; consecutive steps on one agent and attempt are one run;
* its end: its last LatentChunk, or a JobCancelled / JobFailed.

Phases, one after the other, each waiting for its jobs to end (by those events, with timeouts):

1. assign: with every agent idle, jobs one at a time; assign = arrival → first step start (p99 in the RESULT).
2. burst: 4 × A standard jobs whose keys all hash to one partition of vidgen.encoded.standard (the producers'
   partitioner is librdkafka's default, consistent_random: CRC32 of the key modulo the partition count; the
   partitions of the records on the broker are checked). makespan = first arrival → last step end of the last
   job; makespan_ratio = makespan ÷ (sum of job times ÷ A), job time = first step start → last step end (1.0 is
   a perfectly shared fleet). idle_per_job_s = agent-seconds idle while a job of the phase waited (arrived, not
   running, not ended), ÷ the phase's jobs: the RESULT's figure is the burst phase's; the others are printed.
3. mixed-tier backlog: every agent busy with a long free-tier filler, then 15 premium, 15 standard and 15 free jobs
   at once; shares = each tier's part of the first 20 backlog starts after the last of them arrived (the goal of
   weights 6:3:1 is 0.6/0.3/0.1). Then whatever has not ended is cancelled.
4. preemption: every agent busy with a long free-tier filler, then one premium job; preempt_wait_s = its arrival
   → its first step start. step_s = the median step time of this phase (every agent busy); handover_s = the
   preempted filler's last step end → the premium job's first step start on that agent (what the goal calls the
   resume time: the yield's checkpoint, the report, the requeue and the new assignment). With a scheduler, this
   phase runs on one started afresh with VIDGEN_PREEMPT_AFTER_S=0 (the first one is stopped, and its successor
   rebuilds the queue from the log): the figure is the mechanism's latency; a deployment adds its bound (30 s by
   default). The other phases run with preemption off (VIDGEN_PREEMPT_AFTER_S=off), so a slow run's premium
   backlog never turns overdue and jumps the weights the mixed phase measures.

Fillers ("every agent busy") go one at a time onto different partitions of vidgen.encoded.free; one that has not
started within a few seconds (a dispatcher that leaves it behind a busy agent) is cancelled, until A distinct
agents run one. A cancelled job counts as waiting until its cancellation request. The last line of stdout is the
RESULT line.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from consumers.job_state import epoch_ms
from consumers.progress import EventLog
from gpu_agents.models import InvalidParamsError, validate_generation_params
from producers.requests import VideoRequests, parse_size
from streams import topics
from streams.kafka import consumer_config
from streams.serde import decode_key
from streams.settings import Settings
from streams.supervisor import PlatformProcesses
from vidgen.cli import SAMPLE_PROMPT, STAGES

from .common import (
    CpuAccount, format_table, median, percentile, print_result, process_tree, run_stopping_on_sigterm,
)
from .overhead import default_torch_threads

GUIDANCE_SCALE = 5.0
TIERS = topics.TIERS  # premium, standard, free
FILLER_TIER = "free"
BURST_TIER = "standard"
# Partitions of a tier topic in the order fillers try them (taken modulo the topic's partitions: 3 now, 12 before the
# one fair queue): every 3rd, then the next ones, so the first A tries hit A different owners whether a group hands
# partitions out round robin or in ranges (what mattered when agents owned partitions).
FILLER_PARTITION_ORDER = (0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11)
FILLER_START_TIMEOUT_S = 3.0  # a filler not running by then waits behind a busy agent: it is cancelled
RUN_GAP_S = 0.5  # a pause this long between two steps of a job on one agent splits it into two runs
POLL_S = 0.1  # how often the waits look at the event log: the cores belong to the agents
AGENT_NICENESS = 19  # below the broker and the CPU stages (nice 10): see the module doc
WARM_UP_TIMEOUT_S = 240.0  # group joins, model builds
WARM_UP_STEPS = 4
SETTLE_S = 0.5  # after the last event a figure needs: a moment for a later-arriving earlier one


# -- jobs as the log tells them ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    model: str
    steps: int
    width: int
    height: int
    num_frames: int
    long_factor: int  # fillers take this many times the steps

    @property
    def long_steps(self) -> int:
        return self.steps * self.long_factor

    def params(self, seed: int, steps: int) -> dict:
        return dict(model=self.model, steps=steps, width=self.width, height=self.height, num_frames=self.num_frames,
                    guidance_scale=GUIDANCE_SCALE, seed=seed)

    def describe(self) -> str:
        return (f"{self.model}, {self.width}x{self.height}, {self.num_frames} frames, {self.steps} steps "
                f"(fillers {self.long_steps}), guidance {GUIDANCE_SCALE}")


@dataclass(frozen=True)
class Arrival:
    at: float  # Kafka timestamp of the PromptEncoded record, epoch seconds
    topic: str
    partition: int


@dataclass
class Run:
    """Consecutive steps of one job on one agent."""

    agent_id: str
    attempt: int
    start: float  # first step's start, epoch seconds
    end: float  # last step's end


@dataclass
class JobView:
    job_id: str
    tier: str
    arrival: Arrival | None = None
    runs: list[Run] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    finished: bool = False  # last LatentChunk seen
    ended: bool = False  # finished, cancelled or failed
    cancel_requested_at: float | None = None

    @property
    def started(self) -> float | None:
        return self.runs[0].start if self.runs else None

    @property
    def last_step_end(self) -> float | None:
        return self.runs[-1].end if self.runs else None

    @property
    def running(self) -> bool:
        return bool(self.runs) and not self.ended

    @property
    def job_s(self) -> float:
        """First step start → last step end."""
        return self.last_step_end - self.started

    def waiting_intervals(self, horizon: float) -> list[tuple[float, float]]:
        """When the job had arrived but ran nowhere, had not finished and had not been asked to stop."""
        if self.arrival is None:
            return []
        stop = min(horizon, self.cancel_requested_at if self.cancel_requested_at is not None else horizon)
        intervals, since = [], self.arrival.at
        for run in self.runs:
            intervals.append((since, min(run.start, stop)))
            since = run.end
        if not self.finished:  # never started, or stopped between runs (preempted): it waits until it is stopped
            intervals.append((since, stop))
        return [(a, b) for a, b in intervals if b > a]


class ArrivalLog:
    """Kafka timestamp and partition of every PromptEncoded record (by job id), read in the background."""

    def __init__(self, settings: Settings):
        self._consumer = Consumer(consumer_config(settings, group_id="vidgen.bench-dispatch"))  # assigned, never joined
        metadata = self._consumer.list_topics(timeout=10)
        self._consumer.assign([TopicPartition(t.name, p, OFFSET_BEGINNING) for t in topics.ENCODED.values()
                               for p in metadata.topics[t.name].partitions])
        self._arrivals: dict[str, Arrival] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="arrivals", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            msg = self._consumer.poll(0.05)
            if msg is None or msg.error():
                continue
            job_id = decode_key(msg.key())
            with self._lock:  # the first record of a job is its arrival (a redelivery may write a copy)
                self._arrivals.setdefault(job_id, Arrival(msg.timestamp()[1] / 1000, msg.topic(), msg.partition()))

    def get(self, job_id: str) -> Arrival | None:
        with self._lock:
            return self._arrivals.get(job_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def deprioritise(pid: int, niceness: int) -> set[int]:
    """Renice every thread of a process (threads it starts later inherit it); returns the niceness now seen."""
    tasks = [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    for tid in tasks:
        os.setpriority(os.PRIO_PROCESS, tid, niceness)
    return {os.getpriority(os.PRIO_PROCESS, tid) for tid in tasks}


def event_s(event: dict) -> float:
    return epoch_ms(event["timestamp"]) / 1000


def job_on_partition(partition: int, partitions: int) -> str:
    """A fresh job id that librdkafka's default partitioner (consistent_random: CRC32 of the key) puts there."""
    if not 0 <= partition < partitions:  # else no key ever hashes there: the search would never end
        raise ValueError(f"partition {partition} of a topic with {partitions} partitions")
    while True:
        job_id = uuid.uuid4().hex
        if zlib.crc32(job_id.encode()) % partitions == partition:
            return job_id


class Fleet:
    """Submits jobs, cancels them, and tells what the event log says about them."""

    def __init__(self, settings: Settings, agents: int, workload: Workload):
        self.agents = agents
        self.workload = workload
        self.requests = VideoRequests(settings)
        self.events = EventLog(settings, lifecycle=(topics.STEP_PROGRESS, topics.LATENT_CHUNKS, topics.CANCELLED,
                                                    topics.FAILED, topics.CONTROL))
        self.arrivals = ArrivalLog(settings)
        self.tiers: dict[str, str] = {}
        self._seeds = itertools.count(1)
        self._cursor = 0
        self._steps: dict[str, dict[tuple, dict]] = {}
        self._finished: set[str] = set()
        self._ended: set[str] = set()
        self._cancel_requested_at: dict[str, float] = {}

    def close(self) -> None:
        self.events.close()
        self.arrivals.close()
        self.requests.close()

    def submit(self, tier: str, partition: int | None = None, steps: int | None = None) -> str:
        """A job of the workload (``steps`` apart), keyed onto ``partition`` of the tier topic if given."""
        job_id = job_on_partition(partition, topics.ENCODED[tier].partitions) if partition is not None else None
        params = self.workload.params(next(self._seeds), steps or self.workload.steps)
        job_id = self.requests.submit(SAMPLE_PROMPT, job_id=job_id, tier=tier, **params)  # one prompt: cache hits
        self.tiers[job_id] = tier
        return job_id

    def cancel(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self.requests.cancel(job_id, reason="bench dispatch: phase over", requested_by="bench")

    def _read_new_events(self) -> None:
        """Index what the event log collected since the last look, by job: a look costs what is new, not the whole
        log (the waits look ten times a second, and the log grows by every step of every job; the cores belong to
        the agents)."""
        new = self.events.events[self._cursor:]  # a slice of a list is atomic; the reader only appends
        self._cursor += len(new)
        for job_event in new:
            topic, event = job_event.topic, job_event.event
            job_id = event["job_id"]
            if topic == topics.STEP_PROGRESS.name:  # a redelivered step is the same (agent, attempt, step)
                self._steps.setdefault(job_id, {})[(event["agent_id"], event["attempt"], event["step"])] = event
            elif topic == topics.LATENT_CHUNKS.name:
                if event["chunk_index"] == event["chunk_count"] - 1:
                    self._finished.add(job_id)
            elif topic in (topics.CANCELLED.name, topics.FAILED.name):
                self._ended.add(job_id)
            elif topic == topics.CONTROL.name:
                self._cancel_requested_at[job_id] = event_s(event)

    def views(self, job_ids: Iterable[str]) -> dict[str, JobView]:
        self._read_new_events()
        views = {job_id: JobView(job_id, self.tiers[job_id], self.arrivals.get(job_id)) for job_id in job_ids}
        for job_id, view in views.items():
            for event in sorted(self._steps.get(job_id, {}).values(), key=event_s):
                end, start = event_s(event), event_s(event) - event["step_ms"] / 1000
                view.step_ms.append(event["step_ms"])
                last = view.runs[-1] if view.runs else None
                if (last is None or last.agent_id != event["agent_id"] or last.attempt != event["attempt"]
                        or start - last.end > RUN_GAP_S):
                    view.runs.append(Run(event["agent_id"], event["attempt"], start, end))
                else:
                    last.end = end
            view.finished = job_id in self._finished
            view.ended = view.finished or job_id in self._ended
            if job_id in self._cancel_requested_at:
                view.cancel_requested_at = self._cancel_requested_at[job_id]
        return views

    def wait(self, job_ids: Sequence[str], done: Callable[[dict[str, JobView]], bool], timeout_s: float,
             what: str) -> dict[str, JobView]:
        deadline = time.monotonic() + timeout_s
        while True:
            views = self.views(job_ids)
            if done(views):
                return views
            if time.monotonic() > deadline:
                ended = sum(v.ended for v in views.values())
                started = sum(v.started is not None for v in views.values())
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what} "
                                   f"({len(job_ids)} jobs: {started} started, {ended} ended)")
            time.sleep(POLL_S)

    def wait_ended(self, job_ids: Sequence[str], timeout_s: float, what: str) -> dict[str, JobView]:
        views = self.wait(job_ids, lambda vs: all(v.ended for v in vs.values()), timeout_s, what)
        time.sleep(SETTLE_S)
        return self.views(job_ids)

    def occupy_agents(self) -> list[str]:
        """Long free-tier fillers until every agent runs one; the ones left waiting are cancelled."""
        partitions = itertools.cycle(FILLER_PARTITION_ORDER)
        fillers: list[str] = []
        for _ in range(3 * len(FILLER_PARTITION_ORDER)):
            job_id = self.submit(FILLER_TIER, next(partitions) % topics.ENCODED[FILLER_TIER].partitions,
                                 self.workload.long_steps)
            fillers.append(job_id)
            try:
                self.wait([job_id], lambda vs: vs[job_id].started is not None, FILLER_START_TIMEOUT_S, "")
            except TimeoutError:
                self.cancel([job_id])
            busy = {v.runs[-1].agent_id for v in self.views(fillers).values() if v.running}
            if len(busy) >= self.agents:
                return fillers
        raise RuntimeError(f"could not get all {self.agents} agents running a filler "
                           f"({len(busy)} busy after {len(fillers)} fillers)")


# -- figures -------------------------------------------------------------------------------------------------------
def idle_while_waiting(views: Iterable[JobView], agents: int) -> float:
    """Agent-seconds with an agent idle while at least one of these jobs waited (agents run one job each)."""
    views = list(views)
    horizon = max(v.last_step_end or v.arrival.at for v in views)
    runs = [(r.start, r.end) for v in views for r in v.runs]
    waits = [w for v in views for w in v.waiting_intervals(horizon)]
    points = sorted({t for interval in runs + waits for t in interval})
    idle = 0.0
    for a, b in zip(points, points[1:]):
        mid = (a + b) / 2
        if any(s <= mid < e for s, e in waits):
            busy = sum(s <= mid < e for s, e in runs)
            idle += max(0, agents - busy) * (b - a)
    return idle


@dataclass
class Phase:
    name: str
    views: dict[str, JobView]
    figures: dict[str, float | str]
    other_cores: float | None = None  # cores kept busy by processes not ours meanwhile

    def idle_per_job_s(self, agents: int) -> float:
        return idle_while_waiting(self.views.values(), agents) / len(self.views)


def starts(views: Iterable[JobView]) -> list[JobView]:
    return sorted((v for v in views if v.started is not None), key=lambda v: v.started)


# -- the phases ------------------------------------------------------------------------------------------------
def warm_up(fleet: Fleet) -> None:
    """Rounds of short jobs over every partition until one round has run on every agent (groups settled, models
    built, caches warm)."""
    deadline = time.monotonic() + WARM_UP_TIMEOUT_S
    for round_ in itertools.count(1):
        jobs = [fleet.submit(tier, p, WARM_UP_STEPS) for tier in TIERS for p in range(topics.ENCODED[tier].partitions)]
        views = fleet.wait_ended(jobs, deadline - time.monotonic(), "the warm-up jobs")
        agents = {r.agent_id for v in views.values() for r in v.runs}
        print(f"warm-up round {round_}: {len(jobs)} jobs ran on {len(agents)} agents", flush=True)
        if len(agents) >= fleet.agents:
            return


def phase_assign(fleet: Fleet, jobs: int, timeout_s: float) -> Phase:
    """Jobs one at a time on an idle fleet: how long from arrival to the first step."""
    views: dict[str, JobView] = {}
    for _ in range(jobs):
        job_id = fleet.submit(BURST_TIER)
        views.update(fleet.wait_ended([job_id], timeout_s, "an assign-latency job"))
    assign_ms = [(v.started - v.arrival.at) * 1000 for v in views.values()]
    job_s = [v.job_s for v in views.values()]
    return Phase("assign", views, {"assign_p50_ms": median(assign_ms), "assign_p99_ms": percentile(assign_ms, 99),
                                   "assign_max_ms": max(assign_ms), "job_alone_s": median(job_s)})


def phase_burst(fleet: Fleet, jobs: int, partition: int, timeout_s: float) -> Phase:
    """Jobs all keyed onto one partition of one tier topic, at once."""
    job_ids = [fleet.submit(BURST_TIER, partition) for _ in range(jobs)]
    views = fleet.wait_ended(job_ids, timeout_s, "the burst")
    makespan = max(v.last_step_end for v in views.values()) - min(v.arrival.at for v in views.values())
    work = sum(v.job_s for v in views.values())
    partitions = sorted({v.arrival.partition for v in views.values()})
    return Phase("burst", views, {
        "makespan_s": makespan, "makespan_ratio": makespan / (work / fleet.agents),
        "job_s": median([v.job_s for v in views.values()]),
        "agents_used": len({r.agent_id for v in views.values() for r in v.runs}),
        "partition": f"{topics.ENCODED[BURST_TIER].name}/{partition}",
        "record_partitions": ",".join(map(str, partitions)),
    })


def phase_mixed(fleet: Fleet, per_tier: int, counted: int, timeout_s: float) -> Phase:
    """A backlog of every tier behind a busy fleet: which tiers the next starts go to."""
    fillers = fleet.occupy_agents()
    backlog = [fleet.submit(tier) for _ in range(per_tier) for tier in TIERS]  # interleaved: no tier first in line

    def counted_starts(views: dict[str, JobView]) -> list[JobView]:
        in_place = max(views[j].arrival.at for j in backlog)
        return [v for v in starts(views[j] for j in backlog) if v.started >= in_place]

    def enough(views: dict[str, JobView]) -> bool:
        return all(views[j].arrival for j in backlog) and len(counted_starts(views)) >= counted

    fleet.wait(backlog, enough, timeout_s, f"{counted} backlog jobs to start")
    time.sleep(SETTLE_S)
    views = fleet.views(backlog)
    first = counted_starts(views)[:counted]
    early = len(starts(views.values())) - len(counted_starts(views))
    fleet.cancel(j for j, v in fleet.views(fillers + backlog).items() if not v.ended)
    views = fleet.wait_ended(fillers + backlog, timeout_s, "the mixed-tier jobs to end after cancelling")
    shares = {tier: sum(v.tier == tier for v in first) / len(first) for tier in TIERS}
    finished = [views[j].job_s for j in backlog if views[j].finished]
    return Phase("mixed", views, {
        **{f"share_{tier}": share for tier, share in shares.items()},
        "job_s (every agent busy)": median(finished) if finished else float("nan"),
        "first_starts": "".join(v.tier[0].upper() for v in first), "started_before_in_place": early,
        "fillers": len(fillers),
    })


def phase_preempt(fleet: Fleet, timeout_s: float) -> Phase:
    """One premium job while every agent runs a long free-tier job."""
    fillers = fleet.occupy_agents()
    premium = fleet.submit("premium")
    fleet.wait([premium], lambda vs: vs[premium].ended, timeout_s, "the premium job")
    fleet.cancel(j for j, v in fleet.views(fillers).items() if not v.ended)
    views = fleet.wait_ended(fillers + [premium], timeout_s, "the fillers to end after cancelling")
    job = views[premium]
    running_at_arrival = sum(1 for v in views.values() if v.job_id != premium and v.started is not None
                             and v.started < job.arrival.at < v.last_step_end)
    # The filler that yielded: a run of it on the premium job's agent that ended just before the premium started.
    yielded = [r.end for v in views.values() if v.job_id != premium for r in v.runs
               if r.agent_id == job.runs[0].agent_id and r.end <= job.started]
    return Phase("preempt", views, {
        "preempt_wait_s": job.started - job.arrival.at,
        "step_s": median([ms for v in views.values() for ms in v.step_ms]) / 1000,
        "fillers_running_at_arrival": running_at_arrival, "fillers": len(fillers),
        "premium_runs": len(job.runs),
        "handover_s": job.started - max(yielded) if yielded else float("nan"),
    })


def restart_scheduler(platform: PlatformProcesses, env: dict[str, str], timeout_s: float = 60.0) -> None:
    """Stop every scheduler process (SIGTERM: it leaves the lease group, so no rebalance is in flight when the new
    one joins), start one with ``env``, and wait until it leads and its grace has passed."""
    for process in list(platform.stages.get("scheduler", [])):
        platform.signal_stage(process.pid, signal.SIGTERM).wait(30)
    log_file = platform.log_dir / f"scheduler-{len(platform.stages.get('scheduler', []))}.log"  # add_stage's name
    seen = log_file.stat().st_size if log_file.exists() else 0  # the file may be an earlier process's, appended to
    process = platform.add_stage("scheduler", env=env)
    deadline = time.monotonic() + timeout_s
    while "leads (epoch" not in (log_file.read_bytes()[seen:].decode(errors="replace") if log_file.exists() else ""):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the restarted scheduler did not take the lead; see {log_file}")
        time.sleep(0.1)
    time.sleep(platform.settings().scheduler_grace_s + 0.5)
    print(f"scheduler restarted with {env}", flush=True)


# -- the benchmark ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vidgen bench dispatch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=4, help="gpu-agent processes (at least 4)")
    parser.add_argument("--model", default="tiny-wan-5m")
    parser.add_argument("--steps", type=int, default=50, help="steps of a job (fillers take --long-factor times)")
    parser.add_argument("--long-factor", type=int, default=4)
    parser.add_argument("--size", type=parse_size, default=parse_size("64x64"), help="WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=17, help="4k+1 frames")
    parser.add_argument("--agent-threads", type=int, default=1, help="torch threads of each agent (OMP_NUM_THREADS)")
    parser.add_argument("--assign-jobs", type=int, default=10)
    parser.add_argument("--burst-partition", type=int, default=2, help="partition of the burst's tier topic")
    parser.add_argument("--backlog-per-tier", type=int, default=15)
    parser.add_argument("--counted-starts", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the var dir (logs) even after a clean run")
    args = parser.parse_args(argv)
    if args.agents < 4:
        parser.error("--agents must be at least 4")
    if not 0 <= args.burst_partition < topics.ENCODED[BURST_TIER].partitions:
        parser.error(f"--burst-partition must be below {topics.ENCODED[BURST_TIER].partitions}")
    if args.counted_starts > 3 * args.backlog_per_tier:
        parser.error("--counted-starts cannot exceed the backlog")
    try:
        validate_generation_params(args.size[0], args.size[1], args.frames, args.steps * args.long_factor,
                                   GUIDANCE_SCALE)
    except InvalidParamsError as exc:
        parser.error(str(exc))
    return args


def report(phases: list[Phase], agents: int) -> None:
    for phase in phases:
        rows = [(key, value) for key, value in phase.figures.items()]
        rows.append(("idle_per_job_s (this phase)", phase.idle_per_job_s(agents)))
        rows.append(("jobs", len(phase.views)))
        if phase.other_cores is not None:
            rows.append(("cores busy with processes not ours", phase.other_cores))
        print(f"\n== {phase.name}", flush=True)
        print(format_table(("figure", "value"), rows), flush=True)


def run_benchmark(args: argparse.Namespace) -> int:
    workload = Workload(args.model, args.steps, *args.size, args.frames, args.long_factor)
    stages = ("prompt-encoder", "scheduler") if "scheduler" in STAGES else ("prompt-encoder",)
    agent_env = {"OMP_NUM_THREADS": str(args.agent_threads)}
    var_dir = Path(tempfile.mkdtemp(prefix="vidgen-bench-dispatch-"))
    # Preemption off until the preemption phase: a slow run's premium backlog would otherwise be overdue (30 s by
    # default) and jump the tier weights the mixed phase measures.
    platform = PlatformProcesses(var_dir, stages=stages, env={"VIDGEN_PREEMPT_AFTER_S": "off"})
    print(f"dispatch benchmark: {args.agents} agents ({default_torch_threads({**platform.env, **agent_env})} torch "
          f"thread(s) each), stages {', '.join(stages)}; {workload.describe()}; var dir {var_dir}", flush=True)

    fleet: Fleet | None = None
    finished = False
    phases: list[Phase] = []
    try:
        settings = platform.start()
        agents = [platform.add_stage("gpu-agent", env=agent_env) for _ in range(args.agents)]
        for agent in agents:
            deprioritise(agent.pid, AGENT_NICENESS)
        fleet = Fleet(settings, args.agents, workload)
        warm_up(fleet)
        niceness = set().union(*(deprioritise(agent.pid, AGENT_NICENESS) for agent in agents))
        print(f"agents' threads run at nice {sorted(niceness)}", flush=True)
        pids = process_tree([platform.broker.pid, *(p.pid for ps in platform.stages.values() for p in ps)])

        def measured(run: Callable[[], Phase]) -> Phase:
            with CpuAccount({"platform": pids, "bench": [os.getpid()]}) as account:
                phase = run()
            phase.other_cores = account.cores(CpuAccount.OTHER)
            phases.append(phase)
            print(f"phase {phase.name} done: {phase.figures}", flush=True)
            platform.check_alive()
            return phase

        assign = measured(lambda: phase_assign(fleet, args.assign_jobs, timeout_s=60))
        alone_s = assign.figures["job_alone_s"]
        burst_jobs = 4 * args.agents
        burst = measured(lambda: phase_burst(fleet, burst_jobs, args.burst_partition,
                                             timeout_s=60 + 3 * burst_jobs * alone_s))
        long_s = 2 * args.agents * alone_s * args.long_factor  # a filler with every agent busy, generously
        mixed = measured(lambda: phase_mixed(fleet, args.backlog_per_tier, args.counted_starts,
                                             timeout_s=60 + 2 * long_s + 3 * args.counted_starts * alone_s))
        if "scheduler" in stages:
            restart_scheduler(platform, {"VIDGEN_PREEMPT_AFTER_S": "0"})
        preempt = measured(lambda: phase_preempt(fleet, timeout_s=60 + 2 * long_s))
        finished = True
    finally:
        if fleet is not None:
            fleet.close()
        codes = platform.stop()
        if finished and not args.keep:
            shutil.rmtree(var_dir, ignore_errors=True)
        else:
            print(f"platform stopped ({codes}); var dir and logs kept in {var_dir}", file=sys.stderr)

    report(phases, args.agents)
    if burst.figures["record_partitions"] != str(args.burst_partition):
        print(f"warning: the burst's records landed on partitions {burst.figures['record_partitions']}, not "
              f"{args.burst_partition} alone: the producers' partitioner is not CRC32 of the key", flush=True)
    print()
    print_result(
        idle_per_job_s=burst.idle_per_job_s(args.agents), assign_p99_ms=assign.figures["assign_p99_ms"],
        makespan_ratio=burst.figures["makespan_ratio"], share_premium=mixed.figures["share_premium"],
        share_standard=mixed.figures["share_standard"], share_free=mixed.figures["share_free"],
        preempt_wait_s=preempt.figures["preempt_wait_s"], step_s=preempt.figures["step_s"],
        handover_s=preempt.figures["handover_s"], agents=args.agents,
    )
    return 0


def main(argv: list[str]) -> int:
    return run_stopping_on_sigterm(run_benchmark, parse_args(argv))
