"""The denoising loop, taken out of the diffusers pipelines so it can report progress and be resumed.

Model, scheduler and loop are kept apart, as diffusers does: the model family's Denoiser says what the model
predicts at a timestep (expert choice, conditioning, guidance: gpu_agents/families/), the caller owns the scheduler,
and this loop is the same for every family. So a run can stop after step k and continue later from
(latents, scheduler) at `start_step=k`, whatever the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .families.base import Condition, Denoiser, Guidance

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


def latent_shape(parts: Denoiser, width: int, height: int, num_frames: int, batch_size: int = 1) -> tuple[int, ...]:
    """The shape of a job's latents (batch, channels, latent_frames, latent_height, latent_width)."""
    return parts.latent_shape(width, height, num_frames, batch_size)


def prepare_latents(parts: Denoiser, width: int, height: int, num_frames: int, seed: int, batch_size: int = 1
                    ) -> torch.Tensor:
    """Initial noise, identical to the family's pipeline with `generator=torch.Generator().manual_seed(seed)`.

    Always drawn on the CPU generator (then moved to the transformer's device) so a seed gives the
    same video on every machine.
    """
    return parts.prepare_latents(width, height, num_frames, seed, batch_size)


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
    model: Denoiser,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    guidance_scale: float | Guidance,
    num_steps: int,
    on_step: Callable[[StepInfo], None] | None = None,
    start_step: int = 0,
    end_step: int | None = None,
    condition: Condition | None = None,
) -> torch.Tensor:
    """Run steps start_step..end_step-1 of a num_steps schedule; the family's pipeline loop, step for step.

    end_step defaults to num_steps. Stopping early returns the latents after end_step steps, and the
    scheduler then stands at end_step, ready for a later call with start_step=end_step. A run that reaches the last
    step returns the family's final latents (``model.finish``).
    start_step == 0: the scheduler is (re)set for `num_steps`, so a fresh one works.
    start_step > 0: the scheduler must already stand at `start_step`: either the instance that ran the
    earlier steps, or (FlowMatchEulerDiscreteScheduler) a fresh one placed with position_scheduler.

    Classifier-free guidance is on when the guidance scale is > 1 and then needs negative_prompt_embeds
    (the pipelines encode "" when no negative prompt is given). ``condition``: the job's constant inputs besides the
    prompt (an encoded input image: ``model.condition``), None for text-to-video.
    """
    guidance = guidance_scale if isinstance(guidance_scale, Guidance) else Guidance(float(guidance_scale))
    if guidance.enabled and negative_prompt_embeds is None:
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

    prompt_embeds = prompt_embeds.to(model.dtype)
    if negative_prompt_embeds is not None:
        negative_prompt_embeds = negative_prompt_embeds.to(model.dtype)

    timesteps = scheduler.timesteps
    for i in range(start_step, end_step):
        step_started = time.perf_counter()
        t = timesteps[i]
        noise_pred = model.predict(latents, t, prompt_embeds, negative_prompt_embeds, guidance, condition)
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

    return model.finish(latents, condition) if end_step == num_steps else latents
