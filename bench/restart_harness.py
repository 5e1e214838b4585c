"""Restarting the whole platform: `vidgen up` as an operator runs it, stopped cleanly or SIGKILLed all at once, then
started again on the same var directory; jobs in every state go in and come out over the HTTP API.

What `vidgen bench restart` runs (bench/restart.py) and `tests/test_restart_integration.py` asserts on.

* ``UpProcess(var_dir, port, env)`` runs ``vidgen up --port P`` in a session of its own (``start_new_session``),
  so every process it starts (`vidgen broker` and its Tansu, the stages, the tracker, the archiver, the gateway)
  shares its session (each in a process group of its own): ``kill()`` SIGKILLs all of them at once (nobody gets
  to flush or checkpoint), ``stop()`` is Ctrl-C (SIGINT to `vidgen up`, which SIGTERMs its stages, then the
  archiver, then the broker). ``start()`` again on the same
  directory is the restart. ``wait_ready`` waits for the gateway's /healthz.
* ``FAST_ENV``: the small, fast platform the tests use elsewhere (tests/fleet.py, bench/chaos_harness.py): the
  built-in tiny model ``tiny-wan-5m`` as the default, one torch thread per process (the uninterrupted reference of
  a resumed job is computed with one too, and a resume must equal it bit for bit), a 3 s Kafka session, a
  checkpoint every few steps, the archiver flushing often (what the restore brings back is what it wrote), no
  preemption (every job here is of one tier anyway) and a short dead-agent timeout (after a restart the agent that
  ran a job before it never reports again).
* ``write_tenants(var_dir)`` creates ``<var>/tenants.toml`` before the first start with tenant ``dev`` (what
  `vidgen up` would create and print the key of) and returns its API key; ``Api`` is a small synchronous client of
  the gateway (POST/GET/DELETE /v1/videos..., content download).
* ``drive_to_mixed_state(up, api, plan)``: with the platform's single GPU agent, jobs that finish, then one long job
  that runs (until it has checkpointed), jobs that wait behind it, and jobs cancelled while they wait; returns the
  ``Job``s and what GET said of each just before the caller stops or kills the platform.
* ``broker_jobs(settings, ids)``: what the broker holds of the jobs, read group-less from the beginning
  (``consumers.audit.kafka_events``): per job its distinct terminal event ids, its distinct VideoPublished event
  ids, the copies of them, its first step per attempt, checkpoints and its latent chunks (``final_latent`` joins
  them, for a comparison with an uninterrupted run); ``archived_jobs`` the same from the archive's files.
* ``read_restore_report(var_dir)``: ``<var>/run/restore.json`` as the restore wrote it (None when absent).

No pytest here.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from streams import topics

log = logging.getLogger(__name__)

MODEL = "tiny-wan-5m"
#: The platform's settings for a restart run (see the module doc). Callers may override any of them.
FAST_ENV = {
    "VIDGEN_DEFAULT_MODEL": MODEL,
    "VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000",  # Tansu holds joins for half of it
    "OMP_NUM_THREADS": "1",
    "VIDGEN_CHECKPOINT_EVERY_STEPS": "10",
    "VIDGEN_ARCHIVE_FLUSH_S": "0.2",
    "VIDGEN_PREEMPT_AFTER_S": "off",
    "VIDGEN_AGENT_TIMEOUT_S": "5",
    "VIDGEN_STATS_INTERVAL_S": "0",
    "HF_HUB_OFFLINE": "1",
}
#: Client settings that must not leak from the caller's environment into the platform (it is the embedded one).
_FOREIGN = ("VIDGEN_KAFKA_BOOTSTRAP", "VIDGEN_SCHEMA_REGISTRY_URL", "VIDGEN_SETTINGS", "VIDGEN_ARCHIVE_DIR",
            "VIDGEN_TENANTS", "VIDGEN_BLOB_URL")
TENANT = "dev"
#: What a job of each kind asks for. Short jobs: a few CFG steps on 64x64x5 (about a second of denoising); the
#: running job: ``running_steps`` CFG steps on 64x64x9 (tests.fleet.LONG_JOB's shape, ~15-30 ms a step).
SHORT = dict(size="64x64", frames=5, steps=6, guidance_scale=5.0)
LONG = dict(size="64x64", frames=9, guidance_scale=5.0)
TERMINAL_STATUSES = ("completed", "failed")  # the OpenAI-shaped statuses a job ends in (cancelled is failed)


# -- the process ------------------------------------------------------------------------------------------------------
def platform_env(var_dir: Path | str, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    return {**env, **FAST_ENV, **overrides, "VIDGEN_VAR_DIR": str(Path(var_dir).resolve())}


class UpProcess:
    """``vidgen up --port P`` on one var directory, startable again after a stop or a kill."""

    def __init__(self, var_dir: Path | str, port: int | None = None, env: dict[str, str] | None = None):
        from streams.embedded import free_port

        self.var_dir = Path(var_dir).resolve()
        self.port = port or free_port()
        self.env = platform_env(self.var_dir, **(env or {}))
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.started_at = 0.0  # time.time() of the newest start
        self.up_log = self.var_dir / "log" / "up.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "log"

    def start(self) -> None:
        if self.alive():
            raise RuntimeError("vidgen up is running already")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.up_log, "ab") as out:
            out.write(f"\n===== start {self.starts} at {time.strftime('%H:%M:%S')} =====\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vidgen", "up", "--port", str(self.port)], env=self.env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.started_at = time.time()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"vidgen up exited ({self.process.returncode if self.process else None}); "
                               f"see {self.up_log} and {self.log_dir}")

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Wait until the gateway answers /healthz; returns the seconds since the start."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return time.time() - self.started_at
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway did not answer in {timeout_s} s; see {self.log_dir}")
            time.sleep(0.1)

    def settings(self):
        """The running platform's settings (its addresses from <var>/run/platform.json)."""
        from streams.settings import load_settings

        settings = load_settings(self.env)
        settings.require_kafka()
        return settings

    def group_pids(self) -> list[int]:
        """Live processes of the platform's process group (its session)."""
        if self.process is None:
            return []
        pgid, found = self.process.pid, []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z" and int(fields[3]) == pgid:  # state, ppid, pgrp, session (stages have own groups)
                found.append(int(entry.name))
        return found

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Ctrl-C: SIGINT to `vidgen up`, which stops its stages and the broker; what is left then is killed."""
        if not self.alive():
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("vidgen up did not stop in %s s; killing its process group", timeout_s)
            code = None
        self._kill_group()
        return code

    def kill(self) -> list[int]:
        """SIGKILL every process of the platform at once; returns the pids that were killed."""
        pids = self.group_pids()
        self._kill_group()
        return pids

    def _kill_group(self) -> None:
        if self.process is None:
            return
        # The supervisor puts every stage in a process group of its own (so a terminal's Ctrl-C reaches `vidgen up`
        # alone); they all stay in this session: kill every process of it at once.
        for pid in self.group_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while self.group_pids() and time.monotonic() < deadline:  # children are reaped by init
            time.sleep(0.05)

    def close(self) -> None:
        """Leave nothing running (a clean stop first)."""
        if self.alive():
            self.stop(30)
        else:
            self._kill_group()


# -- the API ----------------------------------------------------------------------------------------------------------
def write_tenants(var_dir: Path | str) -> str:
    """``<var>/tenants.toml`` with tenant ``dev`` (standard tier, generous limits); returns its API key."""
    from gateway.tenants import TenantStore

    path = Path(var_dir) / "tenants.toml"
    store = TenantStore()
    _, key = store.create_tenant(TENANT, "standard", rate_per_s=200.0, burst=400, max_in_flight=200)
    store.save(path)
    return key


class ApiError(RuntimeError):
    def __init__(self, status: int, body: bytes, what: str):
        super().__init__(f"{what}: HTTP {status}: {body[:300]!r}")
        self.status = status


class Api:
    """The gateway's HTTP API for one tenant."""

    def __init__(self, base: str, key: str, timeout_s: float = 10.0):
        self.base, self.key, self.timeout_s = base, key, timeout_s

    def call(self, method: str, path: str, body: dict | None = None,
             headers: dict | None = None) -> tuple[int, dict, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.key}", **({"Content-Type": "application/json"} if data else {}),
            **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def create(self, **body) -> dict:
        for attempt in range(20):  # 503: the publisher is not connected yet (a gateway just started)
            status, headers, data = self.call("POST", "/v1/videos", body)
            if status not in (429, 503):
                break
            time.sleep(float(headers.get("Retry-After", "0.5") or 0.5))
        if status != 200:
            raise ApiError(status, data, "POST /v1/videos")
        return json.loads(data)

    def get(self, job_id: str) -> tuple[int, dict | None]:
        status, _, data = self.call("GET", f"/v1/videos/{job_id}")
        return status, (json.loads(data) if status == 200 else None)

    def video(self, job_id: str) -> dict:
        status, video = self.get(job_id)
        if status != 200:
            raise ApiError(status, b"", f"GET /v1/videos/{job_id}")
        return video

    def list(self, limit: int = 100) -> list[dict]:
        status, _, data = self.call("GET", f"/v1/videos?limit={limit}")
        if status != 200:
            raise ApiError(status, data, "GET /v1/videos")
        return json.loads(data)["data"]

    def cancel(self, job_id: str, reason: str = "restart test") -> dict:
        status, _, data = self.call("POST", f"/v1/videos/{job_id}/cancel?reason={urllib.request.quote(reason)}")
        if status != 200:
            raise ApiError(status, data, f"POST /v1/videos/{job_id}/cancel")
        return json.loads(data)

    def content(self, job_id: str) -> bytes:
        status, _, data = self.call("GET", f"/v1/videos/{job_id}/content")
        if status != 200:
            raise ApiError(status, data, f"GET /v1/videos/{job_id}/content")
        return data


def is_terminal(video: dict | None) -> bool:
    return bool(video) and (video["status"] in TERMINAL_STATUSES or bool(video["vidgen"].get("terminal")))


# -- the jobs ----------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    role: str  # finished, running, waiting, cancelled
    job_id: str
    prompt: str
    seed: int
    params: dict  # as the request asked: size, frames, steps, guidance_scale, seed
    submitted_ms: int
    before: dict | None = None  # GET /v1/videos/{id} just before the stop or kill

    @property
    def reference_job(self) -> dict:
        """tests.fleet.reference_latent's job dict for this job."""
        width, height = (int(v) for v in self.params["size"].split("x"))
        return dict(model=MODEL, width=width, height=height, num_frames=self.params["frames"],
                    steps=self.params["steps"], guidance_scale=self.params["guidance_scale"])


@dataclass
class Plan:
    finished: int = 2
    waiting: int = 2
    cancelled: int = 1
    running_steps: int | None = None  # None: sized from the finished jobs' step time to run ``running_s``
    running_s: float = 25.0  # how long the running job should denoise, uninterrupted
    min_checkpoints: int = 1  # the running job has at least this many before the caller stops or kills
    label: str = ""  # goes into the prompts, so two scenarios on one platform have distinct jobs
    timeout_s: float = 240.0


PROMPTS = ("a red fox in the snow", "waves on a beach at dusk", "a paper boat on a river", "a lighthouse in a storm",
           "a hot air balloon over hills", "a train crossing a bridge", "a heron standing in reeds",
           "a kite on a beach", "a field of sunflowers", "a cat asleep on a windowsill", "fireflies in a forest",
           "a city street in the rain", "a sailing boat at noon", "a glacier calving into the sea")


def submit(api: Api, role: str, index: int, label: str, **params) -> Job:
    prompt = f"{PROMPTS[index % len(PROMPTS)]}{', ' + label if label else ''}, {role} {index}"
    seed = 1000 + index
    body = dict(prompt=prompt, model=MODEL, seed=seed, **params)
    submitted_ms = int(time.time() * 1000)
    video = api.create(**body)
    return Job(role, video["id"], prompt, seed, {**params, "seed": seed}, submitted_ms)


def wait_videos(api: Api, jobs: list[Job], done: Callable[[dict], bool], what: str, timeout_s: float,
                check: Callable[[], None] | None = None) -> dict[str, dict]:
    """Poll GET until ``done(video)`` for every job; returns the videos."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check is not None:
            check()
        videos = {}
        for job in jobs:
            status, video = api.get(job.job_id)
            videos[job.job_id] = video
        if all(v is not None and done(v) for v in videos.values()):
            return videos
        if time.monotonic() > deadline:
            states = {j.role + ":" + j.job_id[:8]: (v["vidgen"]["status"], v["vidgen"]["step"]) if v else "404"
                      for j, v in zip(jobs, videos.values())}
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}: {states}")
        time.sleep(0.2)


def step_seconds(settings, job_ids) -> float | None:
    """The median step time (s) of these jobs' StepProgress events on the broker."""
    from consumers.audit import kafka_events

    wanted = set(job_ids)
    times = sorted(event["step_ms"] for _, _, _, _, event in kafka_events(settings, [topics.STEP_PROGRESS.name])
                   if event.get("job_id") in wanted)
    return times[len(times) // 2] / 1000.0 if times else None


def drive_to_mixed_state(up: UpProcess, api: Api, plan: Plan, say: Callable[[str], None] = lambda text: None
                         ) -> list[Job]:
    """Jobs in every state on a platform with one GPU agent: ``plan.finished`` published, one running (denoising,
    with ``plan.min_checkpoints`` checkpoints or more), ``plan.waiting`` queued behind it, ``plan.cancelled``
    cancelled while they waited. Each Job's ``before`` is what GET said just before this returns."""
    alive = up.check_alive
    jobs: list[Job] = []
    index = 0
    finished = []
    for _ in range(plan.finished):
        finished.append(submit(api, "finished", index, plan.label, **SHORT))
        index += 1
    jobs += finished
    wait_videos(api, finished, lambda v: v["status"] == "completed", "the finished jobs", plan.timeout_s, alive)
    steps = plan.running_steps
    if steps is None:
        step_s = step_seconds(up.settings(), [j.job_id for j in finished]) or 0.03
        # The long job's steps are ~1.3x the short ones' (9 frames, not 5).
        steps = max(60, min(1000, int(plan.running_s / (step_s * 1.3))))
        say(f"step time {step_s * 1000:.0f} ms: the running job gets {steps} steps")
    running = submit(api, "running", index, plan.label, steps=steps, **LONG)
    index += 1
    jobs.append(running)
    wait_videos(api, [running], lambda v: v["vidgen"]["step"] >= 1, "the running job to start", plan.timeout_s, alive)
    waiting: list[Job] = []
    cancelled: list[Job] = []
    # Waiting and to-be-cancelled jobs interleaved, a moment apart, so their order in the queue is their order here.
    kinds = ["waiting"] * plan.waiting
    for i in range(plan.cancelled):
        kinds.insert(min(len(kinds), 1 + 2 * i), "cancelled")
    for kind in kinds:
        job = submit(api, kind, index, plan.label, **SHORT)
        index += 1
        (waiting if kind == "waiting" else cancelled).append(job)
        jobs.append(job)
        time.sleep(0.3)
    wait_videos(api, waiting + cancelled, lambda v: (v.get("queue_position") or 0) >= 1, "queue positions",
                plan.timeout_s, alive)
    for job in cancelled:
        api.cancel(job.job_id, reason="cancelled while waiting")
    wait_videos(api, cancelled, lambda v: v["vidgen"]["status"] == "cancelled", "the cancellations", plan.timeout_s,
                alive)
    wait_videos(api, [running], lambda v: (v["vidgen"]["checkpoints"]["count"] or 0) >= plan.min_checkpoints,
                "the running job's checkpoints", plan.timeout_s, alive)
    for job in jobs:
        job.before = api.video(job.job_id)
    if running.before["vidgen"]["status"] != "running":
        raise RuntimeError(f"the running job is {running.before['vidgen']['status']}, not running, before the "
                           f"restart: make it longer (running_s)")
    for job in waiting:
        if job.before["vidgen"]["status"] != "queued":
            raise RuntimeError(f"waiting job {job.job_id} is {job.before['vidgen']['status']} before the restart")
    return jobs


def by_role(jobs: list[Job], role: str) -> list[Job]:
    return [j for j in jobs if j.role == role]


def queue_order(videos: dict[str, dict | None], jobs: list[Job]) -> list[str] | None:
    """The waiting jobs' ids ordered by their queue positions (None unless every one has a position)."""
    positions = {j.job_id: (videos.get(j.job_id) or {}).get("queue_position") for j in jobs}
    if any(p is None for p in positions.values()):
        return None
    return sorted(positions, key=lambda job_id: positions[job_id])


# -- the broker's view -------------------------------------------------------------------------------------------------
BROKER_TOPICS = (topics.REQUESTED, *topics.ENCODED.values(), topics.STEP_PROGRESS, topics.LATENT_CHECKPOINTED,
                 topics.LATENT_CHUNKS, topics.DECODED, topics.FLAGGED, topics.PUBLISHED, topics.FAILED,
                 topics.CANCELLED, topics.CONTROL)


@dataclass
class BrokerJob:
    job_id: str
    terminal_ids: list[str] = field(default_factory=list)  # distinct event ids of terminal events
    terminal_topics: list[str] = field(default_factory=list)
    published_ids: list[str] = field(default_factory=list)
    published_copies: int = 0  # records of VideoPublished (a redelivered copy has the same event id)
    requested_copies: int = 0
    requested_ids: list[str] = field(default_factory=list)
    first_steps: dict[int, dict] = field(default_factory=dict)  # attempt → its first StepProgress
    step_times: dict[int, int] = field(default_factory=dict)  # attempt → timestamp (ms) of its first step record
    checkpoints: list[tuple[int, int]] = field(default_factory=list)  # (attempt, step)
    chunk_attempts: set[int] = field(default_factory=set)
    chunks: int = 0
    chunk_refs: dict[int, dict] = field(default_factory=dict)  # chunk index → its latent's blob ref (newest attempt)
    chunk_count: int | None = None

    @property
    def first_step_ms(self) -> int | None:
        """When the job first ran (the record timestamp of its earliest first step of any attempt)."""
        return min(self.step_times.values()) if self.step_times else None

    @property
    def outcome(self) -> str:
        names = {topics.PUBLISHED.name: "published", topics.FLAGGED.name: "flagged", topics.FAILED.name: "failed",
                 topics.CANCELLED.name: "cancelled"}
        return "/".join(names[t] for t in self.terminal_topics) or "unfinished"

    @property
    def duplicated(self) -> bool:
        return len(self.terminal_ids) > 1 or len(self.published_ids) > 1

    def note_outcome(self, topic_name: str, event: dict) -> None:
        """A terminal event (counted once per event id) or a VideoPublished copy."""
        from consumers.audit import is_terminal

        event_id = event.get("event_id")
        if is_terminal(topic_name, event) and event_id not in self.terminal_ids:
            self.terminal_ids.append(event_id)
            self.terminal_topics.append(topic_name)
        if topic_name == topics.PUBLISHED.name:
            self.published_copies += 1
            if event_id not in self.published_ids:
                self.published_ids.append(event_id)


def broker_jobs(settings, job_ids, timeout_s: float = 120.0) -> dict[str, BrokerJob]:
    """What the broker holds of each job (see the module doc), read from the beginning of every partition."""
    from consumers.audit import kafka_events

    jobs = {job_id: BrokerJob(job_id) for job_id in job_ids}
    for topic_name, _partition, _offset, timestamp, event in kafka_events(
            settings, [t.name for t in BROKER_TOPICS], timeout_s=timeout_s):
        job = jobs.get(event.get("job_id"))
        if job is None:
            continue
        job.note_outcome(topic_name, event)
        if topic_name == topics.REQUESTED.name:
            job.requested_copies += 1
            if event["event_id"] not in job.requested_ids:
                job.requested_ids.append(event["event_id"])
        elif topic_name == topics.STEP_PROGRESS.name:
            attempt = event["attempt"]
            if attempt not in job.first_steps or event["step"] < job.first_steps[attempt]["step"]:
                job.first_steps[attempt] = event
                job.step_times[attempt] = timestamp
        elif topic_name == topics.LATENT_CHECKPOINTED.name:
            job.checkpoints.append((event.get("attempt", 1), event["step"]))
        elif topic_name == topics.LATENT_CHUNKS.name:
            job.chunks += 1
            job.chunk_attempts.add(event["attempt"])
            job.chunk_count = event["chunk_count"]
            newest = job.chunk_refs.get(event["chunk_index"])
            if newest is None or event["attempt"] >= newest["attempt"]:
                job.chunk_refs[event["chunk_index"]] = {"attempt": event["attempt"], "latent": event["latent"]}
    return jobs


def archived_jobs(archive_dir: Path | str, job_ids) -> dict[str, BrokerJob]:
    """The same view from the archive's files (read after a clean stop, when nothing writes them)."""
    from consumers.audit import archive_events

    jobs = {job_id: BrokerJob(job_id) for job_id in job_ids}
    for topic_name, _partition, _offset, _timestamp, event in archive_events(
            archive_dir, topic_names=[topics.PUBLISHED.name, topics.FLAGGED.name, topics.FAILED.name,
                                      topics.CANCELLED.name]):
        if event.get("job_id") in jobs:
            jobs[event["job_id"]].note_outcome(topic_name, event)
    return jobs


def read_restore_report(var_dir: Path | str) -> dict | None:
    path = Path(var_dir) / "run" / "restore.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def wait_restore_report(var_dir: Path | str, since: float, timeout_s: float = 5.0) -> dict | None:
    """The restore report written at or after ``since`` (time.time()), waiting a little for it; None if none."""
    path = Path(var_dir) / "run" / "restore.json"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if path.stat().st_mtime >= since - 1:
                report = read_restore_report(var_dir)
                if report is not None and report.get("state") not in (None, "running", "restoring"):
                    return report
        except OSError:
            pass
        if time.monotonic() > deadline:
            return read_restore_report(var_dir) if path.exists() and path.stat().st_mtime >= since - 1 else None
        time.sleep(0.1)


def log_tail(log_dir: Path | str, lines: int = 15, pattern: str = "*.log") -> str:
    """The last lines of every log with an ERROR or a traceback (for failure messages and reports)."""
    out = []
    for path in sorted(Path(log_dir).glob(pattern)):
        try:
            text = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        bad = [i for i, line in enumerate(text) if " ERROR " in line or "Traceback" in line]
        if bad:
            out.append(f"--- {path.name} (first problem at line {bad[0] + 1}):")
            out += text[bad[0]:bad[0] + lines]
    return "\n".join(out)


def first_start_order(broker: dict[str, BrokerJob], jobs: list[Job]) -> list[str]:
    """The jobs' ids in the order they first ran (jobs that never ran last)."""
    def started(job_id: str) -> float:
        at = broker[job_id].first_step_ms if job_id in broker else None
        return float("inf") if at is None else at
    return sorted((j.job_id for j in jobs), key=started)


def final_latent(settings, broker_job: BrokerJob):
    """The job's latent joined from its LatentChunk blobs (the newest attempt's chunk of each index)."""
    from gpu_agents.video import join_latent_chunks
    from streams.blobs import open_blob_store

    blobs = open_blob_store(settings)
    refs = broker_job.chunk_refs
    return join_latent_chunks([blobs.get_tensor(refs[i]["latent"]) for i in sorted(refs)])

