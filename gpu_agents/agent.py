"""gpu-agent: PromptEncoded → the explicit denoising loop → StepProgress per step, checkpoints, then latent chunks.

Takes its jobs (PromptEncoded events) from the scheduler on vidgen.assignments and reports its state on
vidgen.agents (streams/agent_runtime.py); follows vidgen.control for cancellations. Emits vidgen.step-progress
(every step), vidgen.latent-checkpointed (every N steps and at least every S seconds, written off the denoising
path) and, when the latent is final, vidgen.latent-chunks (k latent frames each, in order, keyed by job). A job
that was interrupted — its agent killed, preempted by a premium job, drained — resumes from its newest checkpoint
on whichever agent gets it next, and ends bit-identical to an uninterrupted run.

An agent may span several devices (an agent group, gpu_agents/group.py): this module's DenoisingAgent is its rank 0,
and ``follow_leader`` runs on the others. Handling a job, step by step:
1. check the job's parameters against its model, and the model against the group (gpu_agents/parallel.py);
2. load the model on every rank (each sets up its parallel mode);
3. plan the run (JobRun: the seed's noise or the newest checkpoint, embeddings, image condition) and hand it to
   every rank;
4. run the steps on every rank; after each, rank 0 reports it, checkpoints, and tells all ranks to go on or stop;
5. emit the final latent in chunks (a family that streams while generating sent them as they finished).
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from safetensors.torch import load as safetensors_load

from compliance.input_image import InputImageError, read_input_image
from streams import topics
from streams.agent_runtime import AgentRuntime
from streams.blobs import BlobStore
from streams.metrics import QUEUE_WAIT_SECONDS, STEP_SECONDS, observe_since
from streams.settings import Settings
from streams.stage import CancelledByRequest, InvalidEvent, JobInterrupted, Stage, StageContext

from .checkpoint import DenoiseCheckpoint, capture, restore_scheduler
from .denoise import StepInfo, denoise
from .families.base import Guidance
from .models import InvalidParamsError, ModelCatalogue, UnknownModelError, check_params, effective_guidance
from .parallel import (DeviceGroup, GroupBroken, GroupLeader, Message, ParallelModels, ParallelModeError,
                       SoloDevice, follow)
from .resume import CheckpointStore, CheckpointWriter
from .video import split_latent_chunks

log = logging.getLogger(__name__)


@dataclass
class JobRun:
    """What every rank of an agent needs to run a job's steps. Rank 0 makes it — from the event, the blob store and
    the job's newest checkpoint — and hands it to the other ranks of its group, which need neither Kafka nor blobs.
    CPU tensors: each rank moves them to its own device."""

    job_id: str
    model: str
    guidance: Guidance
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    condition: dict[str, torch.Tensor] | None  # rebuilt from the job's inputs at every start and resume
    latents: torch.Tensor  # at start_step: the initial noise, or the checkpoint's
    resumed: DenoiseCheckpoint | None
    start_step: int
    total: int
    chunk_count: int | None  # chunks of a family that streams while generating, else None

    def new_scheduler(self, denoiser) -> SchedulerMixin:
        scheduler = denoiser.new_scheduler()
        if self.resumed is not None:
            restore_scheduler(scheduler, self.resumed)
        return scheduler

    def steps(self, denoiser, scheduler: SchedulerMixin, device: torch.device, on_step) -> torch.Tensor:
        condition = None if self.condition is None else {k: v.to(device) for k, v in self.condition.items()}
        negative = None if self.negative_embeds is None else self.negative_embeds.to(device)
        return denoise(denoiser, scheduler, self.latents.to(device), self.prompt_embeds.to(device), negative,
                       guidance_scale=self.guidance, num_steps=self.total, on_step=on_step,
                       start_step=self.start_step, condition=condition)


class DenoisingAgent:
    """Rank 0 of an agent (the only rank of a one-device agent): the one that talks to Kafka and the blob store."""

    def __init__(self, settings: Settings, blobs: BlobStore, group: DeviceGroup | None = None):
        self.group = group or SoloDevice()
        self.models = ModelCatalogue(settings.model_dirs, device=self.group.device)
        self.parallel = ParallelModels(self.models, self.group, settings.parallel_mode)
        self.leader = GroupLeader(self.group, on_broken=self.group_broken)
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
                "total_steps": self.progress[1], "devices": self.group.size}

    def group_broken(self, reason: str) -> None:
        """The group cannot go on: leave as a draining agent would (its job is handed back), then exit non-zero so
        the launcher restarts every rank (gpu_agents/group.py)."""
        log.error("gpu-agent %s: %s; the group stops", self.agent_id, reason)
        os.kill(os.getpid(), signal.SIGTERM)

    def handle(self, job: dict, ctx: StageContext) -> None:
        # 1. The job's parameters, checked against its model and against this agent's devices.
        job_id, params = job["job_id"], job["params"]
        try:
            check_params(params, self.models)
            self.parallel.check(params["model"])
        except (InvalidParamsError, UnknownModelError, ParallelModeError) as exc:
            raise InvalidEvent(str(exc)) from exc
        with self.leader.channel:  # the group's ranks are this job's from here to its end
            try:
                # 2. The model, on every rank of the group (each loads its own copy and sets up its parallel mode).
                denoiser = self.parallel.load(params["model"], self.leader)
                # 3. Where the run starts and what it needs: read here, handed to every rank.
                run, resumed_ref = self.plan(job, denoiser, ctx)
                attempt = self.checkpoints.next_attempt(job_id)
                # 4. The steps, on every rank; this rank reports each, checkpoints, and says whether all go on.
                latents = self.denoise(job, run, resumed_ref, attempt, denoiser, ctx)
            except GroupBroken as exc:  # a rank died or went silent: hand the job back, the group restarts
                raise self.break_group(str(exc)) from exc
        # 5. The final latent, in chunks (a family that streams while generating sent them as they finished).
        if run.chunk_count is None:
            video, other_outputs = denoiser.outputs(latents.cpu())
            self.emit_chunks(job, video, other_outputs.get("audio"), attempt, ctx)

    def plan(self, job: dict, denoiser, ctx: StageContext) -> tuple[JobRun, dict | None]:
        """The job's run: from its newest checkpoint when one fits, else from its seed's noise; with its embeddings
        and (image-to-video) its condition. Also the checkpoint's blob reference, to announce it again."""
        job_id, params = job["job_id"], job["params"]
        guidance = Guidance(effective_guidance(params), params.get("guidance_scale_2"))
        # An input image conditions every step; rebuilt from the image at every start and resume, never checkpointed.
        condition = self.condition(params, denoiser, ctx)
        negative_ref = job["negative_prompt_embeds"] if guidance.enabled else None
        # A family that streams while generating denoises chunk after chunk: its steps span all chunks, and each chunk
        # leaves for the decoder the moment it is final. Others: chunk_count None, the chunks follow the last step.
        chunk_count, total = denoiser.chunk_plan(params["width"], params["height"], params["num_frames"],
                                                 params["steps"])
        found = self.checkpoints.newest_with_ref(job_id)
        resumed, resumed_ref = found if found is not None else (None, None)
        if resumed is not None and resumed.total_steps == total:
            latents, start_step = resumed.latents, resumed.step
        else:
            resumed, resumed_ref = None, None
            latents = denoiser.prepare_latents(params["width"], params["height"], params["num_frames"],
                                               params["seed"], fps=params["fps"]).cpu()
            start_step = 0
        return JobRun(
            job_id=job_id, model=params["model"], guidance=guidance,
            prompt_embeds=ctx.blobs.get_tensor(job["prompt_embeds"]),
            negative_embeds=ctx.blobs.get_tensor(negative_ref) if negative_ref else None,
            condition=None if condition is None else {k: v.cpu() for k, v in condition.items()},
            latents=latents, resumed=resumed, start_step=start_step, total=total, chunk_count=chunk_count,
        ), resumed_ref

    def denoise(self, job: dict, run: JobRun, resumed_ref: dict | None, attempt: int, denoiser, ctx: StageContext
                ) -> torch.Tensor:
        """Run the job's steps on every rank of the group. What this rank says before "run" (a checkpoint announced
        again, chunks sent again) may fail on its own; once the other ranks run, any failure here breaks the group."""
        job_id, params = job["job_id"], job["params"]
        total, start_step, resumed, chunk_count = run.total, run.start_step, run.resumed, run.chunk_count
        self.progress = (start_step, total)
        scheduler = run.new_scheduler(denoiser)

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
                negative_prompt_embeds_ref=job["negative_prompt_embeds"] if run.guidance.enabled else None,
                attempt=attempt, model=params["model"],
            ), announce)

        last_checkpoint = time.monotonic()
        agreed_stop = None  # a stop every rank of the group was told of

        def after_step(step: StepInfo) -> None:
            nonlocal last_checkpoint, agreed_stop
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
            stop = agreed_stop = self.leader.decide(stop)  # every rank stops at this same step, or none does
            if stop == "cancelled":
                raise CancelledByRequest(step.step)
            if stop == "fenced":  # another agent runs it now, from a checkpoint of its own choosing: leave it be
                raise JobInterrupted("fenced")  # the word is the scheduler's REQUEUED reason
            if step.step == total:
                return  # the result itself follows; a checkpoint of it would never be used
            if stop is not None:  # preempted or draining: leave a checkpoint at this very step, then stop
                checkpoint(step)
                self.writer.drain()
                raise JobInterrupted(stop)
            if step.step % self.every_steps == 0 or (self.every_s and time.monotonic() - last_checkpoint >= self.every_s):
                checkpoint(step)
                last_checkpoint = time.monotonic()

        self.leader.send("run", run)
        try:
            return run.steps(denoiser, scheduler, self.models.device, after_step)
        except (CancelledByRequest, JobInterrupted):
            if agreed_stop is None and self.group.size > 1:
                raise self.break_group("a stop the other ranks were not told of")
            raise
        except GroupBroken:
            raise
        except Exception as exc:
            if self.group.size > 1:  # the other ranks are somewhere in this step: the group cannot go on
                raise self.break_group(f"{type(exc).__name__}: {exc}") from exc
            raise
        finally:
            self.writer.drain()  # every checkpoint announced before the job's outcome is flushed

    def break_group(self, reason: str) -> JobInterrupted:
        """This group cannot run another step: its rank 0 leaves (and the launcher restarts every rank)."""
        self.group.broken = self.group.broken or reason
        self.group_broken(reason)
        return JobInterrupted(f"agent group broken: {reason}")

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


class StopRun(Exception):
    """Rank 0 said stop after this step (cancelled, preempted, drained, fenced): a follower drops the job."""


def follow_leader(settings: Settings, group: DeviceGroup) -> None:
    """A rank other than 0 of an agent group: load what rank 0 loads, run the steps it runs, stop where it stops.
    No Kafka, no blob store: rank 0 hands over each job's run (JobRun) and its decision after every step."""
    models = ModelCatalogue(settings.model_dirs, device=group.device)
    parallel = ParallelModels(models, group, settings.parallel_mode)

    def run(job_run: JobRun, next_decision) -> None:
        denoiser = models.denoiser(job_run.model)

        def after_step(step: StepInfo) -> None:
            decision = next_decision()
            if isinstance(decision, Message):  # rank 0 went back to idling without a word on this step
                raise GroupBroken(f"rank 0 sent {decision.kind!r} during step {step.step}")
            if decision is not None:
                raise StopRun(decision)

        try:
            job_run.steps(denoiser, job_run.new_scheduler(denoiser), group.device, after_step)
        except StopRun as stop:
            log.info("gpu-agent rank %d: job %s stopped with rank 0 (%s)", group.rank, job_run.job_id, stop)

    follow(group, lambda payload: parallel.setup(*payload), run)


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
