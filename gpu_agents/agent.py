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
from PIL import Image
from safetensors.torch import load as safetensors_load

from compliance.input_image import InputImageError, read_input_image
from streams import topics
from streams.agent_runtime import AgentRuntime
from streams.blobs import LocalBlobStore
from streams.metrics import QUEUE_WAIT_SECONDS, STEP_SECONDS, observe_since
from streams.settings import Settings
from streams.stage import CancelledByRequest, InvalidEvent, JobInterrupted, Stage, StageContext

from .checkpoint import capture, restore_scheduler
from .denoise import StepInfo, denoise
from .families.base import Guidance
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
        guidance = Guidance(effective_guidance(params), params.get("guidance_scale_2"))
        # An input image conditions every step; rebuilt from the image at every start and resume, never checkpointed.
        condition = self.condition(params, denoiser, ctx)
        prompt_embeds = ctx.blobs.get_tensor(job["prompt_embeds"]).to(device)
        negative_ref = job["negative_prompt_embeds"] if guidance.enabled else None
        negative_embeds = ctx.blobs.get_tensor(negative_ref).to(device) if negative_ref else None
        # A family that streams while generating denoises chunk after chunk: its steps span all chunks, and each chunk
        # leaves for the decoder the moment it is final. Others: chunk_count None, the chunks follow the last step.
        chunk_count, total = denoiser.chunk_plan(params["width"], params["height"], params["num_frames"],
                                                 params["steps"])
        self.progress = (0, total)

        scheduler = denoiser.new_scheduler()
        found = self.checkpoints.newest_with_ref(job_id)
        resumed, resumed_ref = found if found is not None else (None, None)
        if resumed is not None and resumed.total_steps == total:
            restore_scheduler(scheduler, resumed)
            latents, start_step = resumed.latents.to(device), resumed.step
        else:
            resumed = None
            latents = denoiser.prepare_latents(params["width"], params["height"], params["num_frames"],
                                               params["seed"], fps=params["fps"]).to(device)
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
            if chunk_count is not None:
                self.reemit_finished_chunks(job, start_step * chunk_count // total, chunk_count, attempt, ctx)

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
                chunk_index=None if chunk_count is None else (step.step - 1) * chunk_count // total,
                chunk_count=chunk_count,
            ))
            if chunk_count is not None:
                finished = denoiser.finished_chunk(step.latents)
                if finished is not None:  # before any checkpoint of this step: a resume never skips an unsent chunk
                    self.emit_chunk(job, *finished, chunk_count, attempt, ctx)
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
                              num_steps=total, on_step=after_step, start_step=start_step, condition=condition)
        finally:
            self.writer.drain()  # every checkpoint announced before the job's outcome is flushed

        if chunk_count is None:
            video, other_outputs = denoiser.outputs(latents.cpu())
            self.emit_chunks(job, video, other_outputs.get("audio"), attempt, ctx)

    def condition(self, params: dict, denoiser, ctx: StageContext):
        """The job's input image encoded as its model's family conditions on it; None for text-to-video."""
        ref = params.get("input_reference")
        if ref is None:
            return None
        try:  # the gateway checks uploads, but events come from anywhere: the same checks again
            image = read_input_image(ctx.blobs.get(ref))
        except InputImageError as exc:
            raise InvalidEvent(f"input_reference: {exc}") from exc
        return denoiser.condition(Image.fromarray(image.rgb()), self.models.vae(params["model"]), params["width"],
                                  params["height"], params["num_frames"])

    def emit_chunks(self, job: dict, latents: torch.Tensor, audio: torch.Tensor | None, attempt: int,
                    ctx: StageContext) -> None:
        """The final latent, cut into chunks, in order. A family whose decode is not causal gets the whole latent as
        one chunk; audio latents (a family that makes sound) go with the last."""
        frames_per_chunk = self.models.chunk_frames(job["params"]["model"], self.chunk_frames) or latents.shape[2]
        chunks = split_latent_chunks(latents, frames_per_chunk)
        for index, chunk in enumerate(chunks):
            self.emit_chunk(job, index, chunk, len(chunks), attempt, ctx, audio=audio if index == len(chunks) - 1
                            else None, latent_frame_start=index * frames_per_chunk)

    def emit_chunk(self, job: dict, index: int, latents: torch.Tensor, chunk_count: int, attempt: int,
                   ctx: StageContext, audio: torch.Tensor | None = None, latent_frame_start: int | None = None
                   ) -> None:
        """One chunk: its blobs first, then its event (a decoder never waits on a blob). The event id derives from
        the job and the chunk, so a chunk sent again (a resume) is a copy the decoder ignores."""
        job_id = job["job_id"]
        ref = ctx.blobs.put_tensor(latents, job_id, chunk_blob_name(index))
        audio_ref = None if audio is None else ctx.blobs.put_tensor(audio.contiguous(), job_id,
                                                                     "audio-latents.safetensors")
        ctx.emit(topics.LATENT_CHUNKS, ctx.event(
            job_id, "chunk", index,
            tenant=job["tenant"], chunk_index=index, chunk_count=chunk_count,
            latent_frame_start=index * latents.shape[2] if latent_frame_start is None else latent_frame_start,
            latent_frames=latents.shape[2], latent=ref, params=job["params"], attempt=attempt,
            prompt_sha256=job.get("prompt_sha256", ""), requested_at=job.get("requested_at"), audio_latents=audio_ref,
        ))

    def reemit_finished_chunks(self, job: dict, finished: int, chunk_count: int, attempt: int,
                               ctx: StageContext) -> None:
        """A resumed streaming job: its chunks finished before the checkpoint, sent again from their blobs. The agent
        that made them may have died before its events left; the decoder takes the first copy of each."""
        for index in range(finished):
            data = ctx.blobs.read(job["job_id"], chunk_blob_name(index))
            if data is None:  # stored before any checkpoint after it: a checkpoint without it was not made here
                raise JobInterrupted(f"chunk {index} of a checkpointed job has no blob")
            self.emit_chunk(job, index, safetensors_load(data)["tensor"], chunk_count, attempt, ctx)


def chunk_blob_name(index: int) -> str:
    return f"latent-{index:04d}.safetensors"


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
