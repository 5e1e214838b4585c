"""Nothing is forgotten on restart: `vidgen up` stopped (Ctrl-C) or SIGKILLed all at once with jobs in every state,
then started again on the same var directory.

One platform for the module (bench/restart_harness.py: `vidgen up` in its own process group, the tiny model, one GPU
agent), two rounds on it, one after the other:

1. ``stop``: 2 jobs published, 1 running (denoising, checkpointed), 3 waiting behind it, 1 cancelled while it
   waited; Ctrl-C; `vidgen up` again;
2. ``kill``: the same on the restarted platform, then SIGKILL to every process of `vidgen up` at once (broker,
   Tansu, stages, tracker, archiver, gateway); `vidgen up` again.

After each restart: no job is unknown to GET at the first poll (the round's jobs and the earlier round's); the
published jobs are listed and their videos download and decode; the waiting jobs still wait and start in their
queue order; the running job resumes from its newest checkpoint and ends with the latent of an uninterrupted run,
bit for bit; the cancelled job stays cancelled and never runs; on the broker every job has exactly one terminal
event and no VideoPublished two event ids; a websocket and a follower (what `vidgen submit --follow` runs) opened
after the restart on a job submitted before it see it to its end, the follower from its VideoRequested on.

Each round waits a moment (more than the archiver's flush interval, VIDGEN_ARCHIVE_FLUSH_S) between what it
observed and the stop or kill, so that the newest checkpoint seen is one the archive holds.
"""
from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import aiohttp
import av
import pytest
import torch

from bench.restart_harness import (Api, BrokerJob, Job, Plan, UpProcess, broker_jobs, by_role, drive_to_mixed_state,
                                   final_latent, first_start_order, is_terminal, log_tail, queue_order,
                                   wait_restore_report, write_tenants)

pytestmark = pytest.mark.integration

ROUNDS = ("stop", "kill")
RUNNING_S = 10.0  # the running job's uninterrupted denoising time (its steps are sized from the step time)
ARCHIVE_SETTLE_S = 1.0  # > VIDGEN_ARCHIVE_FLUSH_S (0.2 s in the harness's settings) plus a commit
FINISH_TIMEOUT_S = 150.0
UNKNOWN_GRACE_S = 20.0  # a job the restarted platform does not know this long after its gateway answers is lost
WATCH_TIMEOUT_S = FINISH_TIMEOUT_S + 10


# -- watching one job across the restart ---------------------------------------------------------------------------
class Watcher(threading.Thread):
    """A daemon thread running ``target``; ``result(timeout)`` returns what it returned or raises what it raised."""

    def __init__(self, target, *args):
        super().__init__(daemon=True)
        self._target_call, self._args = target, args
        self.value, self.error = None, None

    def run(self) -> None:
        try:
            self.value = self._target_call(*self._args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def result(self, timeout_s: float):
        self.join(timeout_s)
        if self.is_alive():
            raise TimeoutError(f"still watching after {timeout_s} s")
        if self.error is not None:
            raise self.error
        return self.value


def _ends(message: dict) -> bool:
    return message["type"] in ("published", "failed", "cancelled") or (
        message["type"] == "flagged" and message["data"].get("terminal"))


def watch_websocket(base: str, key: str, job_id: str) -> list[dict]:
    """Every envelope of GET /v1/videos/{id}/events until the job's end."""
    async def watch() -> list[dict]:
        received: list[dict] = []
        deadline = time.monotonic() + WATCH_TIMEOUT_S
        url = base.replace("http://", "ws://") + f"/v1/videos/{job_id}/events"
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, params={"api_key": key}) as ws:
                while not received or not _ends(received[-1]):
                    received.append(await ws.receive_json(timeout=max(0.1, deadline - time.monotonic())))
        return received
    return asyncio.run(watch())


FOLLOW = ("import sys; from streams.settings import load_settings; from vidgen.cli import follow; "
          "sys.exit(follow(load_settings(), sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))")


class Follower:
    """What `vidgen submit --follow` runs after its submission (vidgen.cli.follow), as its own process, for a job
    submitted before the restart: its stderr has a line per stage the job went through, its exit status says how
    the job ended (0: published)."""

    def __init__(self, up: UpProcess, job: Job):
        self.process = subprocess.Popen(
            [sys.executable, "-c", FOLLOW, job.job_id, str(job.submitted_ms), str(WATCH_TIMEOUT_S)], env=up.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.code: int | None = None
        self.stdout = self.stderr = ""

    def finish(self, timeout_s: float) -> None:
        try:
            self.stdout, self.stderr = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.stdout, self.stderr = self.process.communicate()
        self.code = self.process.returncode

    @property
    def stages(self) -> list[str]:
        """The stage lines of its progress output (``requested``, ``encoded.standard``, ..., ``published``)."""
        return [line.strip() for line in self.stderr.splitlines()
                if line.strip() and not line.startswith(("%", "denoising", "queued:"))]


# -- one round: jobs in every state, a stop or a kill, a restart, the jobs to their end ------------------------------
@dataclass
class Round:
    how: str
    jobs: list[Job]
    earlier: list[Job]  # jobs of the rounds before
    first: dict[str, dict | None]  # job id → GET at the first poll after the restart (None: 404)
    final: dict[str, dict | None] = field(default_factory=dict)
    listed: set[str] = field(default_factory=set)
    broker: dict[str, BrokerJob] = field(default_factory=dict)
    settings: object = None
    restore: dict | None = None
    websocket: Watcher | None = None
    follower: Follower | None = None
    watched: Job | None = None
    log_dir: object = None
    api: Api | None = None

    def role(self, role: str) -> list[Job]:
        return by_role(self.jobs, role)

    def where(self) -> str:
        problems = log_tail(self.log_dir)
        return f"restore report {self.restore}; logs in {self.log_dir}" + (f"\n{problems}" if problems else "")


def run_round(up: UpProcess, api: Api, key: str, how: str, earlier: list[Job]) -> Round:
    jobs = drive_to_mixed_state(up, api, Plan(finished=2, waiting=3, cancelled=1, running_s=RUNNING_S,
                                              label=f"round {how}", timeout_s=FINISH_TIMEOUT_S))
    time.sleep(ARCHIVE_SETTLE_S)
    if how == "stop":
        up.stop()
    else:
        up.kill()
    restarted_at = time.time()
    up.start()
    up.wait_ready()
    first = {job.job_id: api.get(job.job_id)[1] for job in jobs + earlier}
    settings = up.settings()
    watched = by_role(jobs, "waiting")[-1]
    result = Round(how, jobs, earlier, first, settings=settings, watched=watched, log_dir=up.log_dir, api=api,
                   websocket=Watcher(watch_websocket, up.base, key, watched.job_id), follower=Follower(up, watched))
    result.websocket.start()
    result.restore = wait_restore_report(up.var_dir, restarted_at)

    ids = [job.job_id for job in jobs]
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    ready = time.monotonic()
    final = dict(first)
    while time.monotonic() < deadline:
        up.check_alive()
        final.update({job_id: api.get(job_id)[1] for job_id in ids if not is_terminal(final.get(job_id))})
        if all(is_terminal(final[job_id]) for job_id in ids):
            break
        if time.monotonic() - ready > UNKNOWN_GRACE_S and all(final[job_id] is None for job_id in ids):
            break  # the restarted platform knows none of them: nothing will end
        time.sleep(0.3)
    time.sleep(1.5)  # a second publication, should there be one, would be on its way
    result.final = final
    result.listed = {video["id"] for video in api.list(100)}
    result.broker = broker_jobs(settings, [job.job_id for job in jobs + earlier])
    result.follower.finish(5.0)  # it has seen the job's end by now, or never will
    result.websocket.join(5.0)  # likewise, before another round stops the gateway it talks to
    return result


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    var_dir = tmp_path_factory.mktemp("restart") / "var"
    key = write_tenants(var_dir)
    up = UpProcess(var_dir)
    rounds: dict[str, Round | BaseException] = {}
    try:
        up.start()
        up.wait_ready()
        yield dict(up=up, api=Api(up.base, key), key=key, rounds=rounds)
    finally:
        up.close()


@pytest.fixture(params=ROUNDS)
def restarted(request, platform) -> Round:
    """The round, run once for the module (the kill round after the stop round, on the platform it restarted)."""
    rounds = platform["rounds"]
    for how in ROUNDS[:ROUNDS.index(request.param) + 1]:
        if how not in rounds:
            earlier = [job for r in rounds.values() if isinstance(r, Round) for job in r.jobs]
            try:
                rounds[how] = run_round(platform["up"], platform["api"], platform["key"], how, earlier)
            except Exception as exc:  # noqa: BLE001 - every test of the round reports it
                rounds[how] = exc
                if platform["up"].alive() or how == ROUNDS[-1]:
                    continue
                try:  # the next round needs a running platform
                    platform["up"].start()
                    platform["up"].wait_ready()
                except Exception:  # noqa: BLE001
                    pass
    outcome = rounds[request.param]
    if isinstance(outcome, BaseException):
        raise RuntimeError(f"the {request.param} round did not get to its checks: {outcome}") from outcome
    return outcome


# -- the checks, after each round --------------------------------------------------------------------------------------
def test_no_job_is_forgotten_right_after_the_restart(restarted):
    unknown = [f"{job.role} {job.job_id} (round {'earlier' if job in restarted.earlier else restarted.how})"
               for job in restarted.jobs + restarted.earlier if restarted.first[job.job_id] is None]
    assert not unknown, f"GET /v1/videos/{{id}} answered 404 right after the restart for: {unknown}; " \
                        + restarted.where()
    for job in restarted.jobs + restarted.earlier:
        video = restarted.first[job.job_id]
        assert video["prompt"] == job.prompt and video["vidgen"]["params"]["seed"] == job.seed
        if job.role in ("finished", "cancelled") or job in restarted.earlier:
            assert video["vidgen"]["terminal"], f"{job.role} job {job.job_id} is {video['vidgen']['status']}"


def test_published_jobs_are_listed_and_their_videos_download_and_decode(restarted):
    api_jobs = restarted.role("finished") + [j for j in restarted.earlier if j.role != "cancelled"]
    missing = [job.job_id for job in restarted.jobs + restarted.earlier if job.job_id not in restarted.listed]
    assert not missing, f"not listed by GET /v1/videos after the restart: {missing}; " + restarted.where()
    for job in api_jobs:
        video = restarted.final.get(job.job_id) or restarted.first[job.job_id]
        assert video is not None and video["status"] == "completed", (job.job_id, video and video["status"])
        status, headers, data = restarted.api.call("GET", f"/v1/videos/{job.job_id}/content")
        assert status == 200 and headers["Content-Type"] == "video/mp4", (status, data[:200])
        with av.open(io.BytesIO(data)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert len(frames) == job.params["frames"] and frames[0].shape == (64, 64, 3)


def test_waiting_jobs_still_wait_and_start_in_their_queue_order(restarted):
    waiting = restarted.role("waiting")
    before = queue_order({job.job_id: job.before for job in waiting}, waiting)
    assert before is not None, "every waiting job had a queue position before the restart"
    for job in waiting:
        video = restarted.first[job.job_id]
        assert video is not None, f"waiting job {job.job_id} unknown after the restart; " + restarted.where()
        assert not video["vidgen"]["terminal"], f"waiting job {job.job_id} is {video['vidgen']['status']}"
    still_queued = [job for job in waiting if restarted.first[job.job_id]["vidgen"]["status"] == "queued"]
    after = queue_order(restarted.first, still_queued)
    if after is not None:
        assert after == [job_id for job_id in before if job_id in after], "queue positions after the restart"
    started = first_start_order(restarted.broker, waiting)
    assert all(restarted.broker[job.job_id].first_step_ms is not None for job in waiting), \
        "every waiting job ran after the restart; " + restarted.where()
    assert started == before, f"started in the order {started}, queued in the order {before}"
    for job in waiting:
        assert restarted.broker[job.job_id].outcome == "published", (job.job_id, restarted.broker[job.job_id])


def test_the_running_job_resumes_from_its_newest_checkpoint_bit_identical(restarted):
    from tests.fleet import reference_latent

    [job] = restarted.role("running")
    broker = restarted.broker[job.job_id]
    seen_before = job.before["vidgen"]["checkpoints"]["last_step"]
    assert seen_before is not None and job.before["vidgen"]["status"] == "running"
    assert broker.outcome == "published", f"the running job ended {broker.outcome}; " + restarted.where()
    resumed = sorted(a for a in broker.first_steps if a > 1)
    assert resumed, f"the job was never resumed (attempts {sorted(broker.first_steps)}): it started again or its " \
                    f"steps before the restart are gone; " + restarted.where()
    first_resumed = broker.first_steps[resumed[0]]
    saved = [step for attempt, step in broker.checkpoints if attempt < resumed[0]]
    assert first_resumed["resumed_from_step"] == max(saved), \
        f"resumed from step {first_resumed['resumed_from_step']}, the newest checkpoint is at step {max(saved)}"
    assert first_resumed["resumed_from_step"] >= seen_before, \
        f"resumed from step {first_resumed['resumed_from_step']}, a checkpoint at step {seen_before} was seen " \
        f"{ARCHIVE_SETTLE_S} s before the {restarted.how}"
    assert first_resumed["step"] == first_resumed["resumed_from_step"] + 1
    assert len(broker.chunk_attempts) == 1 and len(broker.chunk_refs) == broker.chunk_count, \
        (broker.chunk_attempts, sorted(broker.chunk_refs), broker.chunk_count)
    latent = final_latent(restarted.settings, broker)
    assert torch.equal(latent, reference_latent(job.prompt, job.seed, job.reference_job)), \
        "the resumed job's latent differs from an uninterrupted run"


def test_the_job_cancelled_while_waiting_stays_cancelled(restarted):
    for job in restarted.role("cancelled"):
        assert job.before["vidgen"]["status"] == "cancelled"
        for when, video in (("first", restarted.first[job.job_id]), ("last", restarted.final.get(job.job_id))):
            assert video is not None and video["vidgen"]["status"] == "cancelled", \
                f"{when} GET after the restart: {video and video['vidgen']['status']}; " + restarted.where()
        broker = restarted.broker[job.job_id]
        assert broker.outcome == "cancelled" and not broker.first_steps, \
            f"{broker.outcome}, ran attempts {sorted(broker.first_steps)}"


def test_every_job_ends_exactly_once_and_nothing_is_published_twice(restarted):
    expected = {"finished": "published", "running": "published", "waiting": "published", "cancelled": "cancelled"}
    wrong = {}
    for job in restarted.jobs + restarted.earlier:
        broker = restarted.broker[job.job_id]
        if broker.outcome != expected[job.role] or broker.duplicated or len(broker.requested_ids) != 1:
            wrong[f"{job.role} {job.job_id}"] = dict(outcome=broker.outcome, terminal_ids=broker.terminal_ids,
                                                     published_ids=broker.published_ids,
                                                     requested_ids=broker.requested_ids)
    assert not wrong, f"on the broker after the {restarted.how} and restart: {wrong}; " + restarted.where()


def test_a_websocket_and_a_follower_opened_after_the_restart_see_a_pre_restart_job_to_its_end(restarted):
    envelopes = restarted.websocket.result(WATCH_TIMEOUT_S)
    kinds = [e["type"] for e in envelopes]
    assert kinds[0] == "state" and kinds[-1] == "published", kinds
    follower = restarted.follower
    assert follower.code == 0 and "published:" in follower.stdout, \
        f"`vidgen submit --follow`'s follow ended {follower.code}: {follower.stdout[-500:]} {follower.stderr[-1500:]}"
    assert "requested" in follower.stages, f"it did not see the job's request (before the restart): {follower.stages}"


def test_the_restore_reported_what_it_did(restarted):
    report = restarted.restore
    assert report is not None, f"no {restarted.how} restore report in <var>/run/restore.json"
    assert report["state"] == "done" and report["records"] > 0 and report["groups"] > 0, report
