"""`vidgen bench overhead`: what the platform adds to a video job, against the same work done in one process.

The same jobs are measured two ways in one run, interleaved (direct, platform, direct, platform, ...) so drift
hits both:

* platform: the real thing, started as an operator starts it (``PlatformProcesses``: the embedded Tansu broker,
  the schema registry and one process per stage). A job is timed from ``VideoRequests.submit`` until this process
  reads the job's VideoPublished event. Jobs go one at a time, each alone on the platform.
* direct: diffusers' ``WanPipeline`` over the same modules (``ModelCatalogue.pipeline``) called in this process,
  then the frames encoded to MP4 with ``encode_mp4``, as the platform's decoder does.

Both are warm: one untimed job each first (process start, model build and consumer-group joins are not overhead).
The two must not compete for the 2 cores:
* every measurement waits until the platform's processes are back to their idle CPU use;
* an idle platform still polls its broker, which alone slows a 2-thread torch job, so the platform is paused
  (SIGSTOP/SIGCONT) while a direct call runs: the direct side has the machine to itself, as without a platform;
* this process uses as many torch threads as a stage process does by default;
* CPU used by processes that are not ours (another benchmark, a test run) is measured during every run, and a
  run pair during which it was above MAX_OTHER_CORES is reported but repeated and left out of the medians.

The breakdown uses the timestamps the stages put on their events, so it shows where the extra time goes
(Kafka hops, blob writes, the denoising steps themselves), and CPU seconds per process show who burns what.
``--jobs N`` adds a throughput figure: N jobs submitted at once, against N direct calls back to back.
``--platform-env KEY=VALUE`` runs the platform with other settings (e.g. VIDGEN_KAFKA_FETCH_WAIT_MAX_MS=50), to
try a change. The last line of stdout is the RESULT line.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from consumers.progress import JobEvent, is_terminal, read_events
from gpu_agents.models import InvalidParamsError, ModelCatalogue, validate_generation_params
from gpu_agents.video import encode_mp4
from producers.requests import VideoRequests, parse_size
from streams import supervisor, topics
from streams.settings import Settings
from streams.supervisor import PlatformProcesses
from vidgen.cli import SAMPLE_PROMPT

from .common import (
    CpuAccount, Stopwatch, cpu_load, format_table, median, print_result, process_tree, run_stopping_on_sigterm,
)

log = logging.getLogger(__name__)

BENCH_PROCESS = "this process"
ENCODED_PREFIX = "vidgen.encoded."  # one generation topic per tier; a job uses one of them

GUIDANCE_SCALE = 5.0
FPS = 8
WARM_UP_TIMEOUT_S = 300.0  # the first job waits for group joins and model builds in every stage
JOB_TIMEOUT_S = 120.0
IDLE_WINDOW_S = 0.25  # CPU is sampled over windows this long when waiting for the platform to go idle
IDLE_TIMEOUT_S = 15.0
# Busy means above the idle baseline by this many cores; the broker's fetch polling keeps it a little busy always.
IDLE_MARGIN_CORES = 0.05
MAX_PAUSE_S = 2.0  # longest direct call the platform is paused for (its consumers' session timeout is 6 s)
MAX_OTHER_CORES = 0.1  # a run pair during which processes not ours kept more cores busy is repeated
REFERENCE_DIRECT_RUNS = 2  # direct runs before the platform starts, and beside it running idle


@dataclass(frozen=True)
class Workload:
    model: str
    steps: int
    width: int
    height: int
    num_frames: int
    guidance_scale: float = GUIDANCE_SCALE
    fps: int = FPS
    prompt: str = SAMPLE_PROMPT

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class JobTiming:
    """One job, either way, cut at the end of the first and the last denoising step (seconds from its start)."""

    total_s: float
    first_step_s: float
    last_step_s: float
    step_ms: list[float]  # compute time of steps 2..N (step 1 of the direct call cannot be told from text encoding)

    @property
    def phases(self) -> dict[str, float]:
        return {
            "start → step 1 done (text encoding, step 1)": self.first_step_s,
            "steps 2..N": self.last_step_s - self.first_step_s,
            "last step → MP4 (VAE, MP4)": self.total_s - self.last_step_s,
        }


# -- direct ---------------------------------------------------------------------------------------------------------
class DirectGenerator:
    """The in-process equivalent of a platform job: WanPipeline, then encode_mp4."""

    def __init__(self, workload: Workload):
        catalogue = ModelCatalogue()
        self.workload = workload
        self.pipeline = catalogue.pipeline(workload.model)
        self.max_sequence_length = catalogue.text_encoder(workload.model).max_sequence_length

    def run(self, seed: int) -> JobTiming:
        w = self.workload
        step_ends: list[float] = []

        def record_step_end(_pipeline, _index, _timestep, _tensors) -> dict:
            step_ends.append(time.perf_counter())
            return {}

        watch = Stopwatch()
        with torch.inference_mode():
            output = self.pipeline(
                w.prompt, width=w.width, height=w.height, num_frames=w.num_frames, num_inference_steps=w.steps,
                guidance_scale=w.guidance_scale, generator=torch.Generator().manual_seed(seed), output_type="np",
                max_sequence_length=self.max_sequence_length,
                callback_on_step_end=record_step_end, callback_on_step_end_tensor_inputs=[],
            )
            # Rounded to uint8 exactly as gpu_agents.video.decode_latents does for the platform.
            frames = (output.frames[0] * 255).round().astype(np.uint8)
            encode_mp4(frames, w.fps)
        total_s = watch.stop()
        return JobTiming(
            total_s=total_s,
            first_step_s=step_ends[0] - watch.started,
            last_step_s=step_ends[-1] - watch.started,
            step_ms=[(b - a) * 1000 for a, b in zip(step_ends, step_ends[1:])],
        )


# -- platform -------------------------------------------------------------------------------------------------------
class JobFailed(RuntimeError):
    pass


@dataclass
class PlatformJob:
    job_id: str
    submitted_at: float  # wall clock (time.time), comparable with the events' timestamps
    started: float  # perf_counter at submission: the origin of total_s
    submit_s: float = 0.0  # how long submit() took (produce + acks=all)
    total_s: float = 0.0  # submit → VideoPublished read by this process
    events: list[JobEvent] = field(default_factory=list)

    @property
    def seen_at(self) -> float:
        return self.submitted_at + self.total_s


def event_time(job_event: JobEvent) -> float:
    """The event's own timestamp (set by its producer just before producing), as wall-clock seconds."""
    stamp = job_event.event["timestamp"]
    if isinstance(stamp, datetime):
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()
    return stamp / 1000.0


def published(job_event: JobEvent) -> bool:
    """Whether the event ends its job with a publication; JobFailed if it ends the job otherwise; False if it does not
    end the job. What ends a job is decided as everywhere else (``consumers.progress.is_terminal``): a VideoFlagged
    with ``ends_job`` false (a REVIEW for reviewers, e.g. the tiny models' noise flagged as flicker) is an annotation,
    and the job goes on to its VideoPublished; one with ``ends_job`` true (a BLOCK, or a REVIEW the platform holds)
    ends it unpublished."""
    if not is_terminal(job_event):
        return False
    if job_event.topic != topics.PUBLISHED.name:
        raise JobFailed(f"job {job_event.event['job_id']} ended on {job_event.topic}: {job_event.event}")
    return True


class TerminalWatch:
    """Reads the terminal topics from before a submission, so the end of a job is seen as soon as it is produced.

    Only the terminal topics: following all 50 StepProgress events live would add a consumer's work to the
    platform's; they are read back afterwards for the breakdown instead. vidgen.flagged is one of them, but not
    every event on it ends a job (see ``published``).
    """

    def __init__(self, events: Iterator[JobEvent | None]):
        self.events = events  # read_events over the terminal topics (or any iterator of the same)

    @classmethod
    def reading(cls, settings: Settings, since_ms: int) -> "TerminalWatch":
        events = read_events(settings, since_ms=since_ms, lifecycle=topics.TERMINAL)
        next(events)  # assigns the partitions now, outside any timed section
        return cls(events)

    def wait(self, job_ids: list[str], timeout_s: float) -> dict[str, float]:
        """perf_counter time at which each job's publication was read; JobFailed if one ended otherwise."""
        seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout_s
        for job_event in self.events:
            if job_event is not None and job_event.event["job_id"] in job_ids:
                seen_at = time.perf_counter()
                if published(job_event):
                    seen.setdefault(job_event.event["job_id"], seen_at)
                    if len(seen) == len(job_ids):
                        return seen
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(job_ids) - len(seen)} of {len(job_ids)} jobs not published in {timeout_s} s")
        raise RuntimeError("event stream ended")  # read_events never ends on its own

    def close(self) -> None:
        self.events.close()  # closes read_events' consumer


@contextmanager
def terminal_watch(settings: Settings) -> Iterator[TerminalWatch]:
    watch = TerminalWatch.reading(settings, since_ms=int(time.time() * 1000) - 1000)
    try:
        yield watch
    finally:
        watch.close()


class PlatformClient:
    """Submits the workload to a running platform and times it."""

    def __init__(self, settings: Settings, workload: Workload):
        self.settings = settings
        self.workload = workload
        self.requests = VideoRequests(settings)

    def _submit(self, seed: int) -> PlatformJob:
        w = self.workload
        submitted_at, watch = time.time(), Stopwatch()
        job_id = self.requests.submit(
            w.prompt, model=w.model, steps=w.steps, width=w.width, height=w.height, num_frames=w.num_frames,
            guidance_scale=w.guidance_scale, seed=seed, fps=w.fps,
        )
        return PlatformJob(job_id, submitted_at, watch.started, submit_s=watch.stop())

    def run_batch(self, seeds: list[int], timeout_s: float = JOB_TIMEOUT_S) -> list[PlatformJob]:
        """Submit one job per seed at once; each job's total_s runs from its own submission."""
        with terminal_watch(self.settings) as watch:
            jobs = [self._submit(seed) for seed in seeds]
            seen = watch.wait([job.job_id for job in jobs], timeout_s * len(jobs))
        for job in jobs:
            job.total_s = seen[job.job_id] - job.started
        return jobs

    def run(self, seed: int, timeout_s: float = JOB_TIMEOUT_S) -> PlatformJob:
        return self.run_batch([seed], timeout_s)[0]

    def read_back(self, jobs: list[PlatformJob], timeout_s: float = 60.0) -> None:
        """Fill each job's events (every lifecycle topic), for the breakdown."""
        by_id = {job.job_id: job for job in jobs}
        seen_ids: set[str] = set()
        deadline = time.monotonic() + timeout_s
        since_ms = int(min(job.submitted_at for job in jobs) * 1000) - 1000
        for job_event in read_events(self.settings, since_ms=since_ms):
            if job_event is not None and job_event.event["job_id"] in by_id:
                if job_event.event["event_id"] not in seen_ids:  # a redelivered stage re-emits the same ids
                    seen_ids.add(job_event.event["event_id"])
                    by_id[job_event.event["job_id"]].events.append(job_event)
            if all(self._complete(job) for job in jobs):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("could not read back every event of the timed jobs")

    @staticmethod
    def _complete(job: PlatformJob) -> bool:
        """Every milestone read. A job's events of one topic share a partition (keyed by job), so they arrive in
        order: with the last step read, every earlier step has been read too."""
        topics_read = {job_event.topic for job_event in job.events}
        chunks = [e.event for e in job.events if e.topic == topics.LATENT_CHUNKS.name]
        last_step_read = any(e.topic == topics.STEP_PROGRESS.name and e.event["step"] == e.event["total_steps"]
                             for e in job.events)
        last_segment_read = any(e.topic == topics.DECODED.name and e.event["is_last"] for e in job.events)
        return (last_step_read and last_segment_read and bool(chunks) and len(chunks) == chunks[0]["chunk_count"]
                and any(name.startswith(ENCODED_PREFIX) for name in topics_read)
                and all(t.name in topics_read for t in (topics.REQUESTED, topics.PUBLISHED)))

    def close(self) -> None:
        self.requests.close()


def job_milestones(job: PlatformJob) -> dict[str, float]:
    """Wall-clock time of each point in a job's life, from its events' timestamps."""
    by_topic: dict[str, list[JobEvent]] = {}
    for job_event in job.events:
        by_topic.setdefault(job_event.topic, []).append(job_event)
    steps = sorted(by_topic[topics.STEP_PROGRESS.name], key=lambda e: e.event["step"])
    encoded = next(events for name, events in by_topic.items() if name.startswith(ENCODED_PREFIX))
    return {
        "submitted": job.submitted_at,
        "encoded": event_time(encoded[0]),
        "step 1": event_time(steps[0]),
        "step N": event_time(steps[-1]),
        "chunks": max(event_time(e) for e in by_topic[topics.LATENT_CHUNKS.name]),
        # The decoder announces a segment per chunk as it goes; the video is complete with the last one.
        "decoded": next(event_time(e) for e in by_topic[topics.DECODED.name] if e.event["is_last"]),
        "published": event_time(by_topic[topics.PUBLISHED.name][0]),
        "seen": job.seen_at,
    }


# Consecutive milestones and what happens between them.
PLATFORM_HOPS = (
    ("submitted", "encoded", "hop → prompt-encoder, T5 ×2, embedding blobs"),
    ("encoded", "step 1", "hop → gpu-agent (via any stage between), read embeddings, step 1"),
    ("step 1", "step N", "denoising steps 2..N (+ StepProgress events)"),
    ("step N", "chunks", "latent chunk blobs + LatentChunk events"),
    ("chunks", "decoded", "hop → vae-decoder, VAE decode, segments + MP4, blobs"),
    ("decoded", "published", "hop → compliance, blob check"),
    ("published", "seen", "hop → this client"),
)


def platform_timing(job: PlatformJob) -> JobTiming:
    milestones = job_milestones(job)
    step_ms = [e.event["step_ms"] for e in sorted(job.events, key=lambda e: e.event.get("step", 0))
               if e.topic == topics.STEP_PROGRESS.name]
    return JobTiming(
        total_s=job.total_s,
        first_step_s=milestones["step 1"] - job.submitted_at,
        last_step_s=milestones["step N"] - job.submitted_at,
        step_ms=step_ms[1:],  # steps 2..N, like the direct side
    )


# -- keeping the two apart on 2 cores -------------------------------------------------------------------------------
def default_torch_threads(env: dict[str, str]) -> int:
    """torch's intra-op thread count in a fresh process with this environment: what every stage process uses."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           env=env, capture_output=True, text=True, check=True)
    return int(probe.stdout.strip())


class PlatformCpu:
    """The CPU side of every platform process (broker, Tansu, registry, stages): load, idleness, pausing.

    An idle platform is not silent: every consumer keeps polling the broker (fetch.wait.max.ms is short on Tansu),
    and on 2 cores that alone slows a 2-thread torch job noticeably. So direct runs happen with the platform
    paused (SIGSTOP, then SIGCONT): the direct side then has the machine to itself, as it would without the
    platform, while runs can still be interleaved. Pauses are a second or two, far below the session timeout.
    """

    def __init__(self, platform: PlatformProcesses):
        roots = {"broker": [platform.broker.pid] if platform.broker else []}
        roots.update((name, [p.pid for p in processes]) for name, processes in platform.stages.items())
        #: process name → its processes and their children (the broker's are Tansu and the schema registry)
        self.groups = {name: process_tree(pids) for name, pids in roots.items()}
        self.pids = set().union(*self.groups.values())
        self.idle_cores: float | None = None

    def account(self) -> CpuAccount:
        """CPU used by this process, by each platform process, and by anything else on the machine."""
        return CpuAccount({BENCH_PROCESS: [os.getpid()], **self.groups})

    def measure_idle(self, windows: int = 4) -> float | None:
        """The platform's load with nothing to do: the least of a few windows (None without /proc)."""
        loads = [cpu_load(self.pids, IDLE_WINDOW_S) for _ in range(windows)]
        self.idle_cores = None if None in loads else min(loads)
        return self.idle_cores

    def wait_until_idle(self) -> None:
        """Until the platform is back to its idle load (no stage busy with the previous job) and processes that
        are not ours leave the cores alone; after IDLE_TIMEOUT_S, go on anyway (the run is then checked)."""
        if self.idle_cores is None:
            return  # no /proc: nothing to measure with
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while time.monotonic() < deadline:
            with self.account() as account:
                time.sleep(IDLE_WINDOW_S)
            platform_cores = sum(account.cores(name) or 0.0 for name in self.groups)
            if (platform_cores <= self.idle_cores + IDLE_MARGIN_CORES
                    and (account.cores(CpuAccount.OTHER) or 0.0) <= MAX_OTHER_CORES):
                return
        log.warning("the machine did not go quiet in %.0f s; measuring anyway", IDLE_TIMEOUT_S)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Every platform process stopped meanwhile (resumed even on error: a stopped process ignores SIGTERM)."""
        stopped = []
        try:
            for pid in self.pids:
                if _signal(pid, signal.SIGSTOP):
                    stopped.append(pid)
            yield
        finally:
            for pid in stopped:
                _signal(pid, signal.SIGCONT)


def _signal(pid: int, signum: signal.Signals) -> bool:
    try:
        os.kill(pid, signum)
        return True
    except ProcessLookupError:
        return False


# -- the comparison -------------------------------------------------------------------------------------------------
@dataclass
class RunPair:
    """One interleaved run: a direct call, then the same job on the platform, with the CPU used during each."""

    direct: JobTiming
    direct_cpu: CpuAccount
    platform_job: PlatformJob
    platform_cpu: CpuAccount
    platform: JobTiming | None = None  # known once the job's events are read back

    @property
    def other_cores(self) -> float:
        """The most cores that processes not ours kept busy during either run (0 when not measured)."""
        return max(account.cores(CpuAccount.OTHER) or 0.0 for account in (self.direct_cpu, self.platform_cpu))

    @property
    def clean(self) -> bool:
        return self.other_cores <= MAX_OTHER_CORES


@dataclass(frozen=True)
class Throughput:
    jobs: int
    direct_s: float  # the direct calls back to back
    platform_s: float  # first submission → last publication seen
    other_cores: float


class Comparison:
    """Both sides, warm: the direct generator in this process, and the platform with its client and CPU view."""

    def __init__(self, direct: DirectGenerator, client: PlatformClient, cpu: PlatformCpu, pause_platform: bool):
        self.direct = direct
        self.client = client
        self.cpu = cpu
        self.pause_platform = pause_platform

    def direct_alone(self, seed: int) -> tuple[JobTiming, CpuAccount]:
        self.cpu.wait_until_idle()
        with self.cpu.paused() if self.pause_platform else nullcontext(), self.cpu.account() as account:
            timing = self.direct.run(seed)
        return timing, account

    def platform_alone(self, seeds: list[int]) -> tuple[list[PlatformJob], CpuAccount]:
        self.cpu.wait_until_idle()
        with self.cpu.account() as account:
            jobs = self.client.run_batch(seeds)
        return jobs, account

    def latency(self, runs: int) -> list[RunPair]:
        """Interleaved pairs until ``runs`` clean ones (at most ``2 * runs`` pairs); every pair is returned."""
        pairs: list[RunPair] = []
        while sum(pair.clean for pair in pairs) < runs and len(pairs) < 2 * runs:
            seed = 1000 + len(pairs)
            direct, direct_cpu = self.direct_alone(seed)
            (platform_job,), platform_cpu = self.platform_alone([seed])
            pairs.append(RunPair(direct, direct_cpu, platform_job, platform_cpu))
            pair = pairs[-1]
            note = "" if pair.clean else f" (repeated: other processes kept {pair.other_cores:.2f} cores busy)"
            print(f"run {len(pairs)}: direct {direct.total_s:.3f} s, platform {platform_job.total_s:.3f} s{note}",
                  flush=True)
        self.client.read_back([pair.platform_job for pair in pairs])
        for pair in pairs:
            pair.platform = platform_timing(pair.platform_job)
        return pairs

    def throughput(self, jobs: int) -> Throughput:
        seeds = [2000 + i for i in range(jobs)]
        # Back to back in one process: the sum of the calls, each paused for on its own (one long pause could
        # outlast the consumers' session timeout).
        direct_runs = [self.direct_alone(seed) for seed in seeds]
        platform_jobs, platform_cpu = self.platform_alone(seeds)
        platform_s = max(job.started + job.total_s for job in platform_jobs) - min(job.started for job in platform_jobs)
        accounts = [account for _, account in direct_runs] + [platform_cpu]
        return Throughput(
            jobs=jobs,
            direct_s=sum(timing.total_s for timing, _ in direct_runs),
            platform_s=platform_s,
            other_cores=max(account.cores(CpuAccount.OTHER) or 0.0 for account in accounts),
        )


# -- reports ----------------------------------------------------------------------------------------------------------
def print_section(title: str, body: str = "") -> None:
    print(f"\n== {title}", flush=True)
    if body:
        print(body, flush=True)


def median_step_ms(timing: JobTiming) -> float:
    return median(timing.step_ms) if timing.step_ms else float("nan")  # a 1-step job has no steps 2..N


def clean_pairs(pairs: list[RunPair]) -> list[RunPair]:
    """The pairs the medians use: the clean ones, or all of them if the machine was never quiet for long."""
    clean = [pair for pair in pairs if pair.clean]
    return clean if len(clean) * 2 >= len(pairs) else pairs


def latency_medians(pairs: list[RunPair]) -> tuple[float, float]:
    """(direct, platform) median seconds over the pairs the medians use."""
    used = clean_pairs(pairs)
    return median([pair.direct.total_s for pair in used]), median([pair.platform.total_s for pair in used])


def report_latency(pairs: list[RunPair]) -> None:
    rows = [
        (f"run {i + 1}" + ("" if pair.clean else " (left out)"), pair.direct.total_s, pair.platform.total_s,
         pair.platform.total_s / pair.direct.total_s, median_step_ms(pair.direct), median_step_ms(pair.platform),
         pair.other_cores)
        for i, pair in enumerate(pairs)
    ]
    used = clean_pairs(pairs)
    direct_median, platform_median = latency_medians(pairs)
    rows.append((f"median of {len(used)}", direct_median, platform_median, platform_median / direct_median,
                 median([median_step_ms(pair.direct) for pair in used]),
                 median([median_step_ms(pair.platform) for pair in used]), None))
    print_section(
        "latency, one job at a time (seconds; step: median compute of steps 2..N, ms; "
        "other: most cores busy with processes not ours)",
        format_table(("", "direct s", "platform s", "ratio", "direct step", "platform step", "other"), rows))
    if used is pairs and not all(pair.clean for pair in pairs):
        print("warning: other processes were busy during most runs; the medians use them all", flush=True)

    phase_rows = []
    for phase in used[0].direct.phases:
        direct_s = median([pair.direct.phases[phase] for pair in used])
        platform_s = median([pair.platform.phases[phase] for pair in used])
        phase_rows.append((phase, direct_s, platform_s, platform_s - direct_s))
    print_section("where the time goes: medians per phase (seconds)", format_table(
        ("phase", "direct", "platform", "extra"), phase_rows))


def report_hops(pairs: list[RunPair]) -> None:
    jobs = [pair.platform_job for pair in clean_pairs(pairs)]
    milestones = [job_milestones(job) for job in jobs]
    rows = []
    for start, end, what in PLATFORM_HOPS:
        spans_ms = [(m[end] - m[start]) * 1000 for m in milestones]
        rows.append((f"{start} → {end}", median(spans_ms), max(spans_ms), what))
    submit_ms = [job.submit_s * 1000 for job in jobs]
    rows.append(("submit() call", median(submit_ms), max(submit_ms),
                 "produce VideoRequested, acks=all (inside the first hop)"))
    print_section("platform hops, from the events' own timestamps (ms)", format_table(
        ("hop", "median", "max", "what happens"), rows, float_format="{:.1f}"))


def report_cpu(pairs: list[RunPair]) -> None:
    """CPU seconds per job, by process: what each side burns, and where the platform burns it."""
    used = clean_pairs(pairs)
    if not used[0].platform_cpu.used:
        return  # no /proc
    names = [*used[0].platform_cpu.groups, CpuAccount.OTHER]
    rows = [(name, median([pair.direct_cpu.used[name] for pair in used]),
             median([pair.platform_cpu.used[name] for pair in used])) for name in names]
    rows.append(("total", median([sum(pair.direct_cpu.used.values()) for pair in used]),
                 median([sum(pair.platform_cpu.used.values()) for pair in used])))
    print_section("CPU seconds per job, by process (medians)", format_table(("process", "direct", "platform"), rows))


def report_throughput(result: Throughput) -> None:
    rows = [
        ("direct, back to back", result.direct_s, result.jobs / result.direct_s * 60, 1.0),
        ("platform, submitted at once", result.platform_s, result.jobs / result.platform_s * 60,
         result.platform_s / result.direct_s),
    ]
    print_section(f"throughput, {result.jobs} jobs (other processes: up to {result.other_cores:.2f} cores)",
                  format_table(("", "wall s", "jobs/min", "time ratio"), rows))


# -- the benchmark ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vidgen bench overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4,
                        help="jobs for the throughput figure, submitted at once (0: latency only)")
    parser.add_argument("--runs", type=int, default=5, help="timed single jobs on each side")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=parse_size, default=parse_size("64x64"), help="WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=17, help="4k+1 frames")
    parser.add_argument("--model", default="tiny-wan-5m")
    parser.add_argument("--platform-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the platform's processes, e.g. VIDGEN_KAFKA_FETCH_WAIT_MAX_MS=50")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.jobs < 0:
        parser.error("--runs must be at least 1 and --jobs at least 0")
    try:
        validate_generation_params(args.size[0], args.size[1], args.frames, args.steps, GUIDANCE_SCALE)
    except InvalidParamsError as exc:
        parser.error(str(exc))
    if not all("=" in item for item in args.platform_env):
        parser.error("--platform-env takes KEY=VALUE")
    return args


def platform_processes(var_dir: Path, env: dict[str, str]) -> PlatformProcesses:
    """The platform as `vidgen up` runs its pipeline: every stage the supervisor lists (read when called, so a stage
    added there is started here too), without the services (tracker, archiver) a job does not wait for."""
    return PlatformProcesses(var_dir, stages=tuple(supervisor.STAGE_NAMES), env=env)


def equalise_torch_threads(platform_env: dict[str, str]) -> str:
    """Give this process the torch thread count a stage process gets by default; says what was done."""
    stage_threads, bench_threads = default_torch_threads(platform_env), torch.get_num_threads()
    if bench_threads != stage_threads:
        torch.set_num_threads(stage_threads)
        return f"torch threads: stage processes {stage_threads}, this process {bench_threads}, set to {stage_threads}"
    return (f"torch threads: stage processes {stage_threads} (a fresh interpreter with their environment), "
            f"this process {bench_threads}")


@dataclass(frozen=True)
class ReferenceRun:
    seconds: float
    other_cores: float  # kept busy by processes not ours meanwhile


def reference_direct_runs(direct: DirectGenerator, account: Callable[[], CpuAccount]) -> list[ReferenceRun]:
    """A few direct calls outside the comparison, to show what the platform's mere presence costs."""
    runs = []
    for seed in range(REFERENCE_DIRECT_RUNS):
        with account() as used:
            seconds = direct.run(seed).total_s
        runs.append(ReferenceRun(seconds, used.cores(CpuAccount.OTHER) or 0.0))
    return runs


def describe_reference(runs: list[ReferenceRun]) -> str:
    text = f"median {median([run.seconds for run in runs]):.3f} s over {len(runs)} runs"
    busiest = max(run.other_cores for run in runs)
    if busiest > MAX_OTHER_CORES:
        text += f" (not clean: other processes kept up to {busiest:.2f} cores busy)"
    return text


def run_benchmark(args: argparse.Namespace) -> int:
    width, height = args.size
    workload = Workload(args.model, args.steps, width, height, args.frames)
    print(f"overhead benchmark: {workload.model}, {workload.steps} steps, {workload.size}, {workload.num_frames} "
          f"frames, guidance {workload.guidance_scale}; {args.runs} runs each way, interleaved", flush=True)

    var_dir = Path(tempfile.mkdtemp(prefix="vidgen-bench-overhead-"))
    platform_env = dict(item.split("=", 1) for item in args.platform_env)
    platform = platform_processes(var_dir, platform_env)
    print(equalise_torch_threads(platform.env), flush=True)

    direct = DirectGenerator(workload)
    direct.run(seed=0)  # warm-up
    before_platform = reference_direct_runs(direct, lambda: CpuAccount({BENCH_PROCESS: [os.getpid()]}))

    client: PlatformClient | None = None
    finished = False
    try:
        settings = platform.start()
        client = PlatformClient(settings, workload)
        warm_up = Stopwatch()
        client.run(seed=0, timeout_s=WARM_UP_TIMEOUT_S)
        print(f"platform up and warm in {warm_up.stop():.1f} s (logs in {platform.log_dir})", flush=True)

        cpu = PlatformCpu(platform)
        idle_cores = cpu.measure_idle()
        cpu.wait_until_idle()
        beside_idle_platform = reference_direct_runs(direct, cpu.account)
        # Pausing the platform for longer than a fraction of its consumers' session timeout would rebalance them.
        # The fastest call decides: a slow one may only mean that something else was running.
        pause_platform = min(run.seconds for run in before_platform + beside_idle_platform) < MAX_PAUSE_S

        comparison = Comparison(direct, client, cpu, pause_platform)
        pairs = comparison.latency(args.runs)
        throughput = comparison.throughput(args.jobs) if args.jobs else None
        platform.check_alive()
        finished = True
    finally:
        if client is not None:
            client.close()
        codes = platform.stop()
        if finished:
            shutil.rmtree(var_dir, ignore_errors=True)
        else:
            print(f"platform stopped ({codes}); its var dir and logs are kept in {var_dir}", file=sys.stderr)

    report_latency(pairs)
    report_hops(pairs)
    report_cpu(pairs)
    if throughput is not None:
        report_throughput(throughput)
    print_section("conditions", "\n".join([
        "direct runs had the machine to themselves: the platform was paused (SIGSTOP) during each" if pause_platform
        else f"direct runs ran beside the idle platform (a direct call takes over {MAX_PAUSE_S} s: too long a pause)",
        f"direct before the platform started: {describe_reference(before_platform)}",
        f"direct beside the idle, running platform: {describe_reference(beside_idle_platform)}; idle platform load "
        + (f"{idle_cores:.2f} cores (consumers polling the broker)" if idle_cores is not None else "not measured"),
        f"platform env: {platform_env or 'defaults'}",
    ]))

    direct_median, platform_median = latency_medians(pairs)
    print()
    print_result(ratio=platform_median / direct_median, platform_s=platform_median, direct_s=direct_median,
                 jobs=args.jobs, steps=workload.steps, size=workload.size, frames=workload.num_frames,
                 model=workload.model)
    return 0


def main(argv: list[str]) -> int:
    return run_stopping_on_sigterm(run_benchmark, parse_args(argv))
