"""What the scheduler's integration tests share: reading the fleet's decisions and jobs back from the broker, and
the uninterrupted reference a resumed job must equal bit for bit."""
from __future__ import annotations

import io
import time
import uuid
import zlib

import torch
from PIL import Image

from bench.families import input_png
from consumers.progress import LIFECYCLE, EventLog
from gpu_agents.denoise import denoise
from gpu_agents.encoding import encode_prompts
from gpu_agents.families.base import Guidance
from gpu_agents.models import ModelCatalogue
from gpu_agents.video import join_latent_chunks
from streams import topics
from streams.blobs import open_blob_store

MODEL = "tiny-wan-5m"
#: A job long enough to be interrupted mid-way: ~15-25 ms per CFG step with one torch thread, ~3-5 s in all.
LONG_JOB = dict(model=MODEL, width=64, height=64, num_frames=9, steps=200, guidance_scale=5.0)
#: Long jobs of the other families' layouts (~17 ms a CFG step at 256x256 with one thread, ~5 s in all): two experts
#: with their own guidance, and image-to-video, whose condition a resuming agent rebuilds from the image.
LONG_JOBS_BY_LAYOUT = {
    "wan2.1": LONG_JOB,
    "wan2.2-a14b": dict(model="tiny-wan2.2-a14b", width=256, height=256, num_frames=9, steps=300,
                        guidance_scale=5.0, guidance_scale_2=3.0),
    "wan2.2-i2v-a14b": dict(model="tiny-wan2.2-i2v-a14b", width=256, height=256, num_frames=9, steps=300,
                            guidance_scale=5.0, image=input_png()),
    # ~190 ms a step: video and audio latents in one packed tensor, one scheduler.
    "ltx2": dict(model="tiny-ltx2", width=64, height=64, num_frames=9, steps=40, guidance_scale=5.0),
    # ~6 ms a step: 5 chunks of 100 steps, each chunk sent to the decoder when final.
    "helios": dict(model="tiny-helios", width=64, height=64, num_frames=133, steps=100, guidance_scale=5.0),
}
#: Two agents on two cores: one torch thread each (two each make every step several times slower).
FLEET_ENV = {"VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000", "OMP_NUM_THREADS": "1"}
#: Everything the fleet tests read back: the lifecycle, checkpoints, cancellation requests, the scheduler's log and
#: orders, and the agents' reports.
FLEET_TOPICS = (*LIFECYCLE, topics.LATENT_CHECKPOINTED, topics.CONTROL, topics.DEAD_LETTER, topics.SCHEDULER_LOG,
                topics.ASSIGNMENTS, topics.AGENTS)


def fleet_log(settings) -> EventLog:
    return EventLog(settings, FLEET_TOPICS)


def running_fleet(var_dir, stages: tuple[str, ...], **env: str):
    """A module fixture's body: the platform with ``stages`` and FLEET_ENV (plus ``env``), an EventLog of
    FLEET_TOPICS and a VideoRequests producer, as a dict; everything closed afterwards."""
    from producers.requests import VideoRequests
    from streams.supervisor import PlatformProcesses

    processes = PlatformProcesses(var_dir, stages=stages, env={**FLEET_ENV, **env})
    settings = processes.start()
    log = fleet_log(settings)
    requests = VideoRequests(settings)
    try:
        yield dict(processes=processes, settings=settings, log=log, requests=requests)
    finally:
        requests.close()
        log.close()
        processes.stop()


def pid_of(agent_or_scheduler_id: str) -> int:
    """The pid in an agent id ("<host>-<pid>.<6 hex>") or a scheduler id ("<host>-<pid>")."""
    return int(agent_or_scheduler_id.rsplit("-", 1)[1].split(".")[0])


def decisions(log: EventLog, kind: str | None = None, job_id: str | None = None) -> list[dict]:
    """The scheduler's decisions (vidgen.scheduler), in log order."""
    return [d for d in log.on(topics.SCHEDULER_LOG)
            if (kind is None or d["kind"] == kind) and (job_id is None or d["job_id"] == job_id)]


def orders(log: EventLog, kind: str, agent_id: str | None = None, job_id: str | None = None) -> list[dict]:
    """The scheduler's orders to agents (vidgen.assignments): ASSIGN, PREEMPT, REVOKE."""
    return [o for o in log.on(topics.ASSIGNMENTS) if o["kind"] == kind
            and (agent_id is None or o["agent_id"] == agent_id) and (job_id is None or o["job_id"] == job_id)]


def reports(log: EventLog, agent_id: str) -> list[dict]:
    """An agent's state reports (vidgen.agents), in order."""
    return [r for r in log.on(topics.AGENTS) if r["agent_id"] == agent_id]


def wait_for_idle_agents(log: EventLog, count: int, timeout_s: float = 120) -> set[str]:
    """Wait until ``count`` agents have reported IDLE in the last two seconds (an agent just added loads first)."""
    def idle(l):
        now = time.time()
        recent = {}
        for r in l.on(topics.AGENTS):
            if now - r["timestamp"].timestamp() < 2.0:
                recent[r["agent_id"]] = r["state"]
        agents = {a for a, state in recent.items() if state == "IDLE"}
        return agents if len(agents) >= count else None
    return log.wait_for(idle, timeout_s, f"{count} idle agents")


def steps_of(log: EventLog, job_id: str, agent_id: str | None = None) -> list[dict]:
    return [s for s in log.of(job_id, topics.STEP_PROGRESS) if agent_id is None or s["agent_id"] == agent_id]


def job_ids_on_partition(tier: str, partition: int, count: int) -> list[str]:
    """Job ids that the producers' partitioner puts on one partition of the tier's topic: librdkafka's default
    partitioner (consistent_random) takes CRC-32 of the key modulo the partition count. The tests check where
    the records really landed (the QUEUED decisions name their source partition)."""
    n = topics.encoded_topic(tier).partitions
    if not 0 <= partition < n:
        raise ValueError(f"the {tier} tier's topic has {n} partitions, not a partition {partition}")
    found = []
    while len(found) < count:
        job_id = uuid.uuid4().hex
        if zlib.crc32(job_id.encode()) % n == partition:
            found.append(job_id)
    return found


def chunked_once(log: EventLog, job_id: str, timeout_s: float = 180) -> list[dict]:
    """Wait for the job's latent chunks; then assert there is exactly one set of them, from one attempt."""
    def complete(l):
        chunks = l.of(job_id, topics.LATENT_CHUNKS)
        return chunks and len({c["chunk_index"] for c in chunks}) == chunks[0]["chunk_count"] and chunks
    log.wait_for(complete, timeout_s, f"the latent chunks of {job_id}")
    time.sleep(0.5)  # a second set, should there be one, would be on its way
    chunks = log.of(job_id, topics.LATENT_CHUNKS)
    assert len(chunks) == chunks[0]["chunk_count"], f"{len(chunks)} chunks of {chunks[0]['chunk_count']}"
    assert sorted(c["chunk_index"] for c in chunks) == list(range(chunks[0]["chunk_count"]))
    assert len({c["attempt"] for c in chunks}) == 1
    return chunks


def published_once(log: EventLog, job_id: str, timeout_s: float = 180) -> dict:
    log.wait_for(lambda l: l.terminal(job_id), timeout_s, f"job {job_id} to end")
    time.sleep(0.5)
    ends = log.terminal(job_id)
    assert [t for t, _ in ends] == [topics.PUBLISHED.name], ends
    return ends[0][1]


def final_latent(settings, log: EventLog, job_id: str) -> torch.Tensor:
    blobs = open_blob_store(settings)
    unique = {c["chunk_index"]: c for c in log.of(job_id, topics.LATENT_CHUNKS)}
    return join_latent_chunks([blobs.get_tensor(unique[i]["latent"]) for i in sorted(unique)])


def reference_latent(prompt: str, seed: int, job: dict = LONG_JOB) -> torch.Tensor:
    """The job's video latent from an uninterrupted run of the family's loop in this process, with one torch thread
    as the agents run (FLEET_ENV). The loop equals diffusers' own pipeline of each family (tests/test_family_*.py)."""
    catalogue, model = ModelCatalogue(), job["model"]
    threads = torch.get_num_threads()
    torch.set_num_threads(int(FLEET_ENV["OMP_NUM_THREADS"]))
    try:
        with torch.inference_mode():
            denoiser = catalogue.denoiser(model)
            embeds = encode_prompts(catalogue.text_encoder(model), [prompt, ""])
            condition = None
            if job.get("image"):
                condition = denoiser.condition(Image.open(io.BytesIO(job["image"])).convert("RGB"),
                                               catalogue.vae(model), job["width"], job["height"], job["num_frames"])
            latents = denoiser.prepare_latents(job["width"], job["height"], job["num_frames"], seed,
                                               fps=job.get("fps", 8))
            chunk_count, total = denoiser.chunk_plan(job["width"], job["height"], job["num_frames"], job["steps"])
            streamed = []  # a model that streams while generating: its chunks as they finish

            def collect(step) -> None:
                finished = denoiser.finished_chunk(step.latents)
                if finished is not None:
                    streamed.append(finished[1])

            latents = denoise(denoiser, denoiser.new_scheduler(), latents, embeds[:1], embeds[1:],
                              Guidance(job["guidance_scale"], job.get("guidance_scale_2")), total,
                              condition=condition, on_step=collect if chunk_count else None)
            return torch.cat(streamed, dim=2) if chunk_count else denoiser.outputs(latents)[0]
    finally:
        torch.set_num_threads(threads)
