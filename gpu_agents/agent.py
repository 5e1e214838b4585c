"""gpu-agent: PromptEncoded → the explicit denoising loop → StepProgress per step, checkpoints, then latent chunks.

Takes its jobs (PromptEncoded events) from the scheduler on vidgen.assignments and reports its state on
vidgen.agents (streams/agent_runtime.py); follows vidgen.control for cancellations. Emits vidgen.step-progress
(every step), vidgen.latent-checkpointed (every N steps and at least every S seconds, written off the denoising
path) and, when the latent is final, vidgen.latent-chunks (k latent frames each, in order, keyed by job). A job
that was interrupted — its agent killed, preempted by a premium job, drained — resumes from its newest checkpoint
on whichever agent gets it next, and ends bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import os
import secrets
import socket
import statistics
import time
from collections import deque

import torch

from streams import topics
from streams.agent_runtime import AgentRuntime
from streams.blobs import LocalBlobStore
from streams.metrics import QUEUE_WAIT_SECONDS, STEP_SECONDS, observe_since
from streams.settings import Settings
from streams.stage import CancelledByRequest, InvalidEvent, JobInterrupted, Stage, StageContext

from .checkpoint import capture, restore_scheduler
from .denoise import StepInfo, denoise, prepare_latents
from .models import InvalidParamsError, ModelCatalogue, UnknownModelError, check_params, effective_guidance
from .resume import CheckpointStore, CheckpointWriter
from .video import split_latent_chunks


class DenoisingAgent:
    def __init__(self, settings: Settings, blobs: LocalBlobStore):
        self.models = ModelCatalogue(settings.model_dirs)
        self.chunk_frames = settings.latent_chunk_frames
        self.every_steps = settings.checkpoint_every_steps
        self.every_s = settings.checkpoint_every_s
        # Unique per process, also across restarts of a container (same host name, same pid 1).
        self.agent_id = f"{socket.gethostname()}-{os.getpid()}.{secrets.token_hex(3)}"
        self.checkpoints = CheckpointStore(blobs)
        self.writer = CheckpointWriter(self.checkpoints)
        self.recent_step_s: deque[float] = deque(maxlen=20)
        self.progress = (0, 0)  # (step, total) of the running job

    def status(self) -> dict:
        """What the agent's state reports say of it (read for each report, about once a second)."""
        free = None
        if self.models.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.models.device)[0]
        recent = list(self.recent_step_s)
        return {"models": self.models.loaded(), "device": str(self.models.device), "free_memory_bytes": free,
                "step_s": statistics.median(recent) if recent else None, "step": self.progress[0],
                "total_steps": self.progress[1]}

    def handle(self, job: dict, ctx: StageContext) -> None:
        job_id, params = job["job_id"], job["params"]
        try:
            check_params(params, self.models)
        except (InvalidParamsError, UnknownModelError) as exc:
            raise InvalidEvent(str(exc)) from exc
        attempt = self.checkpoints.next_attempt(job_id)
        denoiser = self.models.denoiser(params["model"])
        device = self.models.device
        guidance = effective_guidance(params)
        prompt_embeds = ctx.blobs.get_tensor(job["prompt_embeds"]).to(device)
        negative_ref = job["negative_prompt_embeds"] if guidance > 1.0 else None
        negative_embeds = ctx.blobs.get_tensor(negative_ref).to(device) if negative_ref else None
        total = params["steps"]
        self.progress = (0, total)

        scheduler = denoiser.new_scheduler()
        found = self.checkpoints.newest_with_ref(job_id)
        resumed, resumed_ref = found if found is not None else (None, None)
        if resumed is not None and resumed.total_steps == total:
            restore_scheduler(scheduler, resumed)
            latents, start_step = resumed.latents.to(device), resumed.step
        else:
            resumed = None
            latents = prepare_latents(denoiser, params["width"], params["height"], params["num_frames"],
                                      params["seed"]).to(device)
            start_step = 0

        def announce(ckpt, ref) -> None:
            ctx.emit(topics.LATENT_CHECKPOINTED, ctx.event(
                job_id, "checkpoint", ckpt.attempt, ckpt.step,
                step=ckpt.step, total_steps=ckpt.total_steps, attempt=ckpt.attempt, checkpoint=ref,
                agent_id=self.agent_id,
            ))

        if resumed is not None:
            # The checkpoint is stored before it is announced: an agent killed in between leaves one the log never
            # heard of. Announcing it again (same derived event id: a copy at worst) keeps "every resume starts at a
            # checkpointed step" true in the log, not only on disk.
            announce(resumed, resumed_ref)

        def checkpoint(step: StepInfo) -> None:
            self.writer.submit(capture(
                job_id, scheduler, step.latents, step.step, total, prompt_embeds_ref=job["prompt_embeds"],
                negative_prompt_embeds_ref=negative_ref, attempt=attempt, model=params["model"],
            ), announce)

        last_checkpoint = time.monotonic()

        def after_step(step: StepInfo) -> None:
            nonlocal last_checkpoint
            STEP_SECONDS.labels(params["model"]).observe(step.elapsed_s)
            if step.step > start_step + 1:  # a job's first step also pays for warming up: not a step time
                self.recent_step_s.append(step.elapsed_s)
            self.progress = (step.step, total)
            if step.step == 1:  # the first step of a fresh job: how long it waited for a GPU
                observe_since(QUEUE_WAIT_SECONDS, (job["tier"].lower(),), job.get("requested_at"))
            ctx.emit(topics.STEP_PROGRESS, ctx.event(
                job_id, "step", attempt, step.step,
                step=step.step, total_steps=total, attempt=attempt,
                resumed_from_step=start_step if resumed is not None else None,
                step_ms=step.elapsed_s * 1000.0, agent_id=self.agent_id,
            ))
            # Before the result becomes final, make sure the scheduler has not given the job to another agent.
            stop = ctx.confirm() if step.step == total else ctx.stop_reason()
            if stop == "cancelled":
                raise CancelledByRequest(step.step)
            if stop == "fenced":  # another agent runs it now, from a checkpoint of its own choosing: leave it be
                raise JobInterrupted(f"fenced at step {step.step}")
            if step.step == total:
                return  # the result itself follows; a checkpoint of it would never be used
            if stop is not None:  # preempted or draining: leave a checkpoint at this very step, then stop
                checkpoint(step)
                self.writer.drain()
                raise JobInterrupted(f"{stop} at step {step.step}")
            if step.step % self.every_steps == 0 or (self.every_s and time.monotonic() - last_checkpoint >= self.every_s):
                checkpoint(step)
                last_checkpoint = time.monotonic()

        try:
            latents = denoise(denoiser, scheduler, latents, prompt_embeds, negative_embeds, guidance_scale=guidance,
                              num_steps=total, on_step=after_step, start_step=start_step)
        finally:
            self.writer.drain()  # every checkpoint announced before the job's outcome is flushed

        self.emit_chunks(job, latents.cpu(), attempt, ctx)

    def emit_chunks(self, job: dict, latents: torch.Tensor, attempt: int, ctx: StageContext) -> None:
        """All chunk blobs first, then the events, in order: a decoder never waits on a blob."""
        job_id = job["job_id"]
        chunks = split_latent_chunks(latents, self.chunk_frames)
        refs = [ctx.blobs.put_tensor(chunk, job_id, f"latent-{i:04d}.safetensors") for i, chunk in enumerate(chunks)]
        frame_start = 0
        for index, (chunk, ref) in enumerate(zip(chunks, refs)):
            ctx.emit(topics.LATENT_CHUNKS, ctx.event(
                job_id, "chunk", index,
                tenant=job["tenant"], chunk_index=index, chunk_count=len(chunks),
                latent_frame_start=frame_start, latent_frames=chunk.shape[2], latent=ref, params=job["params"],
                attempt=attempt, prompt_sha256=job.get("prompt_sha256", ""), requested_at=job.get("requested_at"),
            ))
            frame_start += chunk.shape[2]


STAGE = Stage(
    name="gpu-agent",
    consumes=(topics.ASSIGNMENTS,),
    emits=(topics.AGENTS, topics.STEP_PROGRESS, topics.LATENT_CHECKPOINTED, topics.LATENT_CHUNKS, topics.CANCELLED),
    build=DenoisingAgent,
    dedupe_key=lambda job: job["job_id"],
    control=topics.CONTROL,
    runtime=AgentRuntime,
    doc=__doc__,
)
