"""The Wan 2.1 denoising loop, taken out of WanPipeline so it can report progress and be resumed.

Model (WanTransformer3DModel), scheduler and loop are kept apart: the caller owns the scheduler, so a
run can stop after step k and continue later from (latents, scheduler) at `start_step=k`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .models import DenoiserParts

# Schedulers whose `step` depends only on the step index (no history of model outputs), so a fresh
# instance positioned at step k continues a run exactly. Multistep solvers such as
# UniPCMultistepScheduler keep earlier outputs and must be handed across instead.
INDEX_ONLY_SCHEDULERS: tuple[type[SchedulerMixin], ...] = (FlowMatchEulerDiscreteScheduler,)


@dataclass(frozen=True)
class StepInfo:
    """Progress report passed to `on_step` after every denoising step."""

    step: int  # steps completed so far, 1-based (== total_steps after the last one)
    total_steps: int
    elapsed_s: float  # wall time of this step alone
    timestep: float
    latents: torch.Tensor  # latents after this step; with the scheduler, enough to resume


def latent_shape(
    parts: DenoiserParts, width: int, height: int, num_frames: int, batch_size: int = 1
) -> tuple[int, int, int, int, int]:
    """(batch, channels, latent_frames, latent_height, latent_width), as WanPipeline.prepare_latents."""
    num_latent_frames = (num_frames - 1) // parts.vae_scale_factor_temporal + 1
    return (
        batch_size,
        parts.transformer.config.in_channels,
        num_latent_frames,
        int(height) // parts.vae_scale_factor_spatial,
        int(width) // parts.vae_scale_factor_spatial,
    )


def prepare_latents(
    parts: DenoiserParts, width: int, height: int, num_frames: int, seed: int, batch_size: int = 1
) -> torch.Tensor:
    """Initial noise, identical to WanPipeline with `generator=torch.Generator().manual_seed(seed)`.

    Always drawn on the CPU generator (then moved to the transformer's device) so a seed gives the
    same video on every machine.
    """
    shape = latent_shape(parts, width, height, num_frames, batch_size)
    generator = torch.Generator("cpu").manual_seed(seed)
    return randn_tensor(shape, generator=generator, device=parts.transformer.device, dtype=torch.float32)


def position_scheduler(
    scheduler: SchedulerMixin, num_steps: int, start_step: int = 0, device: torch.device | str | None = None
) -> None:
    """Set the timesteps and place the scheduler at `start_step`, as WanPipeline does for step 0.

    start_step > 0 is only exact for INDEX_ONLY_SCHEDULERS; other schedulers raise TypeError.
    """
    if start_step > 0 and not isinstance(scheduler, INDEX_ONLY_SCHEDULERS):
        raise TypeError(
            f"{type(scheduler).__name__} keeps state between steps; resume with the scheduler instance that "
            "ran the earlier steps instead of a fresh one"
        )
    scheduler.set_timesteps(num_steps, device=device)
    # Setting the begin index avoids a device-to-host sync when the first step looks up its index.
    scheduler.set_begin_index(start_step)


def _scheduler_position(scheduler: SchedulerMixin) -> int | None:
    """Index of the next step the scheduler will take (None if it was never positioned)."""
    if scheduler.step_index is not None:
        return scheduler.step_index
    return scheduler.begin_index


def _check_resume_position(scheduler: SchedulerMixin, num_steps: int, start_step: int) -> None:
    timesteps = scheduler.timesteps
    if timesteps is None or len(timesteps) != num_steps:
        raise ValueError(
            f"resuming at step {start_step} needs a scheduler set up for {num_steps} steps; pass the scheduler "
            "that ran the earlier steps, or a fresh one placed with position_scheduler(...)"
        )
    position = _scheduler_position(scheduler)
    if position != start_step:
        raise ValueError(f"scheduler is at step {position}, but start_step is {start_step}")


@torch.inference_mode()
def denoise(
    model: DenoiserParts | WanTransformer3DModel,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    guidance_scale: float,
    num_steps: int,
    on_step: Callable[[StepInfo], None] | None = None,
    start_step: int = 0,
    end_step: int | None = None,
) -> torch.Tensor:
    """Run steps start_step..end_step-1 of a num_steps schedule; WanPipeline's loop, step for step.

    end_step defaults to num_steps. Stopping early returns the latents after end_step steps, and the
    scheduler then stands at end_step, ready for a later call with start_step=end_step.
    start_step == 0: the scheduler is (re)set for `num_steps`, so a fresh one works.
    start_step > 0: the scheduler must already stand at `start_step`: either the instance that ran the
    earlier steps, or (FlowMatchEulerDiscreteScheduler) a fresh one placed with position_scheduler.

    Classifier-free guidance is on when guidance_scale > 1 and then needs negative_prompt_embeds
    (WanPipeline encodes "" when no negative prompt is given).
    """
    transformer = model.transformer if isinstance(model, DenoiserParts) else model
    do_classifier_free_guidance = guidance_scale > 1.0
    if do_classifier_free_guidance and negative_prompt_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_prompt_embeds (encode '' for no negative prompt)")
    if prompt_embeds.shape[0] != latents.shape[0]:
        raise ValueError(f"batch mismatch: {prompt_embeds.shape[0]} prompt embeddings, {latents.shape[0]} latents")
    end_step = num_steps if end_step is None else end_step
    if not 0 <= start_step <= end_step <= num_steps:
        raise ValueError(f"need 0 <= start_step <= end_step <= {num_steps}, got {start_step} and {end_step}")

    if start_step == 0:
        position_scheduler(scheduler, num_steps, device=latents.device)
    else:
        _check_resume_position(scheduler, num_steps, start_step)

    transformer_dtype = transformer.dtype
    prompt_embeds = prompt_embeds.to(transformer_dtype)
    if negative_prompt_embeds is not None:
        negative_prompt_embeds = negative_prompt_embeds.to(transformer_dtype)

    timesteps = scheduler.timesteps
    for i in range(start_step, end_step):
        step_started = time.perf_counter()
        t = timesteps[i]
        latent_model_input = latents.to(transformer_dtype)
        timestep = t.expand(latents.shape[0])

        with transformer.cache_context("cond"):
            noise_pred = transformer(
                hidden_states=latent_model_input,
                timestep=timestep,
                encoder_hidden_states=prompt_embeds,
                return_dict=False,
            )[0]

        if do_classifier_free_guidance:
            # Two calls rather than one batch of two, exactly as WanPipeline does, so the results
            # match the pipeline's bit for bit.
            with transformer.cache_context("uncond"):
                noise_uncond = transformer(
                    hidden_states=latent_model_input,
                    timestep=timestep,
                    encoder_hidden_states=negative_prompt_embeds,
                    return_dict=False,
                )[0]
            noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)

        # x_t -> x_t-1
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]

        if on_step is not None:
            if latents.device.type == "cuda":
                # Kernels run asynchronously; without a sync the time would be launch time only.
                torch.cuda.synchronize(latents.device)
            on_step(
                StepInfo(
                    step=i + 1,
                    total_steps=num_steps,
                    elapsed_s=time.perf_counter() - step_started,
                    timestep=float(t),
                    latents=latents,
                )
            )

    return latents
