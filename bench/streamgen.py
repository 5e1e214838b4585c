"""`vidgen bench streamgen`: a model that streams while generating, through the real platform.

A chunk-wise causal model (default `tiny-helios`) on the embedded broker, K >= 4 chunks per video:

1. **First segment vs the whole video**: request → first playable segment (the first VideoDecoded) against
   request → last segment, for an uninterrupted job. Goal first/total <= 1/K + 0.1.
2. **Bit-identical resume**: the same job again; the agent is SIGKILLed mid-chunk (after a checkpoint that is not
   on a chunk boundary), another agent resumes it; every chunk's latents must equal the uninterrupted run's.
3. **Bounded memory**: a fresh agent generates the base length, another fresh one twice that length; the ratio of
   their peak RSS (VmHWM). Goal <= 1.2: the agent holds the history window, not the video.

Ends with `RESULT first_segment_s=… total_s=… first_over_total=… chunks=K bit_identical=true|false rss_ratio=…`.
"""
from __future__ import annotations

import argparse
import signal
import tempfile
import time

import torch

from consumers.progress import EventLog
from gpu_agents.models import ModelCatalogue
from producers.requests import VideoRequests
from streams import topics
from streams.blobs import open_blob_store
from streams.supervisor import PlatformProcesses

from .common import format_table, print_result

TOPICS = (topics.REQUESTED, topics.STEP_PROGRESS, topics.LATENT_CHECKPOINTED, topics.LATENT_CHUNKS, topics.DECODED,
          topics.PUBLISHED, topics.FAILED, topics.CANCELLED, topics.FLAGGED)
TIMEOUT_S = 600


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def pid_of(agent_id: str) -> int:
    """The pid in an agent id ("<host>-<pid>.<6 hex>")."""
    return int(agent_id.rsplit("-", 1)[1].split(".")[0])


class Run:
    """One platform with one GPU agent at a time, and the event log read back."""

    def __init__(self, model: str, steps: int):
        self.model, self.steps = model, steps
        self.platform = PlatformProcesses(tempfile.mkdtemp(prefix="vidgen-bench-streamgen-"), env={
            "VIDGEN_AGENT_TIMEOUT_S": "3", "VIDGEN_CHECKPOINT_EVERY_STEPS": "2",
            "VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000",
            # One core each: the agent (a GPU's stand-in) and the decoder work side by side on two cores instead
            # of taking turns on both, as they would on separate machines.
            "OMP_NUM_THREADS": "1"})
        self.settings = self.platform.start()
        self.log = EventLog(self.settings, TOPICS)
        self.requests = VideoRequests(self.settings)
        self.blobs = open_blob_store(self.settings)

    def submit(self, num_frames: int, seed: int = 5) -> str:
        return self.requests.submit("a comet over a mountain lake", model=self.model, width=64, height=64,
                                    num_frames=num_frames, steps=self.steps, guidance_scale=5.0, fps=8, seed=seed)

    def wait(self, job_id: str) -> str:
        [(topic, _)] = self.log.wait_for(lambda log: log.terminal(job_id), TIMEOUT_S, f"job {job_id}")
        return topic

    def chunks(self, job_id: str) -> dict[int, torch.Tensor]:
        unique = {c["chunk_index"]: c for c in self.log.of(job_id, topics.LATENT_CHUNKS)}
        return {i: self.blobs.get_tensor(unique[i]["latent"]) for i in sorted(unique)}

    def agent_of(self, job_id: str) -> str:
        return self.log.wait_for(lambda log: log.of(job_id, topics.STEP_PROGRESS), 120, "a step")[-1]["agent_id"]

    def fresh_agent(self, old_agent: str | None) -> None:
        """A new agent process, and the old one stopped: its peak RSS is then this job's alone."""
        self.platform.add_stage("gpu-agent")
        if old_agent is not None:
            self.platform.signal_stage(pid_of(old_agent), signal.SIGTERM)
            time.sleep(4)  # the scheduler hears the old agent leave

    def close(self) -> None:
        self.requests.close()
        self.log.close()
        self.platform.stop()


def frames_for_chunks(denoiser, chunks: int, steps: int) -> int:
    """The fewest frames (4k+1) the model generates in ``chunks`` chunks."""
    for num_frames in range(1, 4000, 4):
        if denoiser.chunk_plan(64, 64, num_frames, steps)[0] == chunks:
            return num_frames
    raise ValueError(f"no frame count makes {chunks} chunks")


def seconds_between(earlier, later) -> float:
    return (later - earlier).total_seconds()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen bench streamgen")
    parser.add_argument("--model", default="tiny-helios")
    parser.add_argument("--steps", type=int, default=100, help="denoising steps per chunk")
    parser.add_argument("--frames", type=int, default=None, help="base length (default: four chunks' worth)")
    args = parser.parse_args(argv)
    catalogue = ModelCatalogue(device="cpu")
    if not catalogue.facts(args.model).streams_while_generating:
        raise SystemExit(f"{args.model} does not stream while generating; see `vidgen models`")
    denoiser = catalogue.denoiser(args.model)
    frames = args.frames or frames_for_chunks(denoiser, 4, args.steps)
    chunk_count, total_steps = denoiser.chunk_plan(64, 64, frames, args.steps)

    run = Run(args.model, args.steps)
    try:
        run.wait(run.submit(frames, seed=1))  # warm-up: every stage loads its model
        # 1. The uninterrupted job: time to the first playable segment and to the last.
        job_id = run.submit(frames)
        assert run.wait(job_id) == topics.PUBLISHED.name, f"job {job_id} was not published"
        requested = run.log.of(job_id, topics.REQUESTED)[0]["timestamp"]
        segments = sorted(run.log.of(job_id, topics.DECODED), key=lambda d: d["segment_index"])
        first_s = seconds_between(requested, segments[0]["timestamp"])
        total_s = seconds_between(requested, segments[-1]["timestamp"])
        reference = run.chunks(job_id)
        first_step = min(e["timestamp"] for e in run.log.of(job_id, topics.STEP_PROGRESS))
        chunk_sent = {c["chunk_index"]: c["timestamp"] for c in run.log.of(job_id, topics.LATENT_CHUNKS)}
        timeline = [("first step", seconds_between(requested, first_step), None)] + [
            (f"chunk {i}", seconds_between(requested, chunk_sent[i]),
             seconds_between(requested, segments[i]["timestamp"])) for i in sorted(chunk_sent)]

        # 2. The same job, its agent SIGKILLed mid-chunk, resumed by another.
        steps_per_chunk = total_steps // chunk_count
        killed_id = run.submit(frames)
        mid_chunk = run.log.wait_for(lambda log: [c for c in log.of(killed_id, topics.LATENT_CHECKPOINTED)
                                                  if c["step"] > steps_per_chunk and c["step"] % steps_per_chunk],
                                     TIMEOUT_S, "a checkpoint inside a later chunk")[0]
        victim = run.agent_of(killed_id)
        run.platform.signal_stage(pid_of(victim), signal.SIGKILL)
        run.platform.add_stage("gpu-agent")
        resumed_ok = run.wait(killed_id) == topics.PUBLISHED.name
        resumed = run.chunks(killed_id)
        bit_identical = resumed_ok and resumed.keys() == reference.keys() and all(
            torch.equal(resumed[i], reference[i]) for i in reference)

        # 3. Peak RSS of a fresh agent at the base length, and of another at twice the length.
        rss = {}
        agent = run.agent_of(killed_id)
        for length in (frames, frames_for_chunks(denoiser, 2 * chunk_count, args.steps)):
            run.fresh_agent(agent)
            rss_job = run.submit(length, seed=3)
            assert run.wait(rss_job) == topics.PUBLISHED.name
            agent = run.agent_of(rss_job)
            rss[length] = peak_rss_bytes(pid_of(agent))
    finally:
        run.close()

    rss_ratio = rss[max(rss)] / rss[min(rss)]
    print(format_table(("since the request", "latents final (s)", "segment playable (s)"), timeline))
    print(format_table(("what", "value"), [
        ("chunks (K)", chunk_count), ("steps per chunk", steps_per_chunk),
        ("request → first segment (s)", first_s), ("request → last segment (s)", total_s),
        ("goal first/total", 1 / chunk_count + 0.1), ("killed at checkpoint step", mid_chunk["step"]),
        *((f"agent peak RSS, {n} frames (MB)", v / 2**20) for n, v in sorted(rss.items()))]))
    print_result(first_segment_s=round(first_s, 3), total_s=round(total_s, 3),
                 first_over_total=round(first_s / total_s, 3), chunks=chunk_count,
                 bit_identical=str(bit_identical).lower(), rss_ratio=round(rss_ratio, 3))
    return 0
