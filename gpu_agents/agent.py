"""gpu-agent: PromptEncoded → the explicit denoising loop → StepProgress per step, then the final latent in chunks.

Consumes vidgen.encoded.{premium,standard,free}. Emits vidgen.step-progress (every step) and vidgen.latent-chunks
(k latent frames each, in order, keyed by job so they stay in order). Chunk blobs are all written before the
first chunk event, so a decoder never waits on a blob. One generation per job: a redelivered job is a duplicate.
"""
from __future__ import annotations

import os
import socket

from streams import topics
from streams.blobs import LocalBlobStore
from streams.settings import Settings
from streams.stage import Stage, StageContext

from .denoise import StepInfo, denoise, prepare_latents
from .models import ModelCatalogue
from .video import split_latent_chunks


class DenoisingAgent:
    def __init__(self, settings: Settings, blobs: LocalBlobStore):
        self.models = ModelCatalogue(settings.model_dirs)
        self.chunk_frames = settings.latent_chunk_frames
        self.agent_id = f"{socket.gethostname()}-{os.getpid()}"

    def handle(self, job: dict, ctx: StageContext) -> None:
        job_id, params = job["job_id"], job["params"]
        attempt = 1
        denoiser = self.models.denoiser(params["model"])
        prompt_embeds = ctx.blobs.get_tensor(job["prompt_embeds"])
        negative_ref = job["negative_prompt_embeds"]
        negative_embeds = ctx.blobs.get_tensor(negative_ref) if negative_ref else None

        def report_step(step: StepInfo) -> None:
            ctx.emit(topics.STEP_PROGRESS, ctx.event(
                job_id, "step", attempt, step.step,
                step=step.step, total_steps=step.total_steps, attempt=attempt, resumed_from_step=None,
                step_ms=step.elapsed_s * 1000.0, agent_id=self.agent_id,
            ))

        latents = prepare_latents(denoiser, params["width"], params["height"], params["num_frames"], params["seed"])
        latents = denoise(
            denoiser, denoiser.new_scheduler(), latents, prompt_embeds, negative_embeds,
            guidance_scale=params["guidance_scale"], num_steps=params["steps"], on_step=report_step,
        )

        chunks = split_latent_chunks(latents, self.chunk_frames)
        refs = [ctx.blobs.put_tensor(chunk, job_id, f"latent-{i:04d}.safetensors") for i, chunk in enumerate(chunks)]
        frame_start = 0
        for index, (chunk, ref) in enumerate(zip(chunks, refs)):
            ctx.emit(topics.LATENT_CHUNKS, ctx.event(
                job_id, "chunk", index,
                tenant=job["tenant"], chunk_index=index, chunk_count=len(chunks),
                latent_frame_start=frame_start, latent_frames=chunk.shape[2], latent=ref, params=params,
                attempt=attempt,
            ))
            frame_start += chunk.shape[2]


STAGE = Stage(
    name="gpu-agent",
    consumes=tuple(topics.ENCODED.values()),
    emits=(topics.STEP_PROGRESS, topics.LATENT_CHUNKS),
    build=DenoisingAgent,
    dedupe_key=lambda job: job["job_id"],
    doc=__doc__,
)
