"""encode_prompts and denoise against diffusers' WanPipeline on the tiny built-in model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from gpu_agents.denoise import StepInfo, denoise, latent_shape, position_scheduler, prepare_latents
from gpu_agents.encoding import encode_prompts

MODEL_ID = "tiny-wan"
WIDTH, HEIGHT, NUM_FRAMES, STEPS, SEED = 64, 48, 9, 6, 11
PROMPT, NEGATIVE_PROMPT = "a paper boat  drifting on a &amp; river", "low quality"


@pytest.fixture(scope="module")
def text_parts(catalogue):
    return catalogue.text_encoder(MODEL_ID)


@pytest.fixture(scope="module")
def denoiser_parts(catalogue):
    return catalogue.denoiser(MODEL_ID)


@pytest.fixture(scope="module")
def embeds(text_parts) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_prompts(text_parts, [PROMPT]), encode_prompts(text_parts, [NEGATIVE_PROMPT])


def _pipeline_latents(pipe, guidance_scale: float, callback=None) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(
            PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            height=HEIGHT,
            width=WIDTH,
            num_frames=NUM_FRAMES,
            num_inference_steps=STEPS,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(SEED),
            output_type="latent",
            max_sequence_length=32,
            callback_on_step_end=callback,
        ).frames


def _full_run(denoiser_parts, embeds, guidance_scale: float = 5.0, scheduler=None, on_step=None) -> torch.Tensor:
    prompt_embeds, negative_prompt_embeds = embeds
    scheduler = scheduler if scheduler is not None else denoiser_parts.new_scheduler()
    latents = prepare_latents(denoiser_parts, WIDTH, HEIGHT, NUM_FRAMES, SEED)
    return denoise(
        denoiser_parts,
        scheduler,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        guidance_scale,
        STEPS,
        on_step=on_step,
    )


@pytest.mark.parametrize(
    "prompt",
    [PROMPT, "", "   spaces\tand\nnewlines  ", "x" * 100, "ünïcødé ✓ 猫"],
    ids=["html", "empty", "whitespace", "truncated", "unicode"],
)
def test_encode_prompts_equals_pipeline(catalogue, text_parts, prompt):
    pipe = catalogue.pipeline(MODEL_ID)
    with torch.inference_mode():
        reference, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=32)
    embeddings = encode_prompts(text_parts, [prompt])
    assert embeddings.shape == (1, 32, text_parts.text_encoder.config.d_model)
    assert torch.equal(embeddings, reference)


def test_encode_prompts_batch_equals_pipeline(catalogue, text_parts):
    prompts = ["short", "a considerably longer prompt that fills most of the window"]
    with torch.inference_mode():
        reference, _ = catalogue.pipeline(MODEL_ID).encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=32
        )
    embeddings = encode_prompts(text_parts, prompts)
    assert torch.equal(embeddings, reference)
    # Padding positions are zero, not the encoder's output for pad tokens.
    assert torch.count_nonzero(embeddings[0, 6:]) == 0  # "short" + </s> = 6 tokens
    assert torch.count_nonzero(embeddings[0, :6].abs().sum(-1)) == 6


def test_prepare_latents_equals_pipeline(catalogue, denoiser_parts):
    pipe = catalogue.pipeline(MODEL_ID)
    shape = latent_shape(denoiser_parts, WIDTH, HEIGHT, NUM_FRAMES)
    assert shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8)
    reference = pipe.prepare_latents(
        1, 16, HEIGHT, WIDTH, NUM_FRAMES, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(SEED)
    )
    latents = prepare_latents(denoiser_parts, WIDTH, HEIGHT, NUM_FRAMES, SEED)
    assert latents.dtype == torch.float32
    assert torch.equal(latents, reference)
    assert not torch.equal(latents, prepare_latents(denoiser_parts, WIDTH, HEIGHT, NUM_FRAMES, SEED + 1))


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_denoise_equals_pipeline(catalogue, denoiser_parts, embeds, guidance_scale):
    reference = _pipeline_latents(catalogue.pipeline(MODEL_ID), guidance_scale)
    assert torch.equal(_full_run(denoiser_parts, embeds, guidance_scale), reference)


def test_guidance_changes_the_result(denoiser_parts, embeds):
    # Guards the CFG comparisons above: guidance must actually be applied.
    assert not torch.equal(_full_run(denoiser_parts, embeds, 1.0), _full_run(denoiser_parts, embeds, 5.0))


def test_guidance_needs_negative_embeddings(denoiser_parts, embeds):
    latents = prepare_latents(denoiser_parts, WIDTH, HEIGHT, NUM_FRAMES, SEED)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        denoise(denoiser_parts, denoiser_parts.new_scheduler(), latents, embeds[0], None, 5.0, STEPS)


def test_on_step_reports_every_step_in_order(catalogue, denoiser_parts, embeds):
    reports: list[StepInfo] = []
    scheduler = denoiser_parts.new_scheduler()
    result = _full_run(denoiser_parts, embeds, scheduler=scheduler, on_step=reports.append)

    assert [report.step for report in reports] == list(range(1, STEPS + 1))
    assert all(report.total_steps == STEPS for report in reports)
    assert all(report.elapsed_s > 0 for report in reports)
    assert [report.timestep for report in reports] == scheduler.timesteps.tolist()
    assert torch.equal(reports[-1].latents, result)

    # Intermediate latents match the pipeline's at the same step.
    pipeline_latents: list[torch.Tensor] = []

    def record(pipe, i, t, callback_kwargs):
        pipeline_latents.append(callback_kwargs["latents"].clone())
        return callback_kwargs

    _pipeline_latents(catalogue.pipeline(MODEL_ID), 5.0, callback=record)
    for report, reference in zip(reports, pipeline_latents, strict=True):
        assert torch.equal(report.latents, reference)


def _run_steps(denoiser_parts, embeds, scheduler, latents, start_step, end_step, on_step=None) -> torch.Tensor:
    prompt_embeds, negative_prompt_embeds = embeds
    return denoise(
        denoiser_parts,
        scheduler,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        5.0,
        STEPS,
        on_step=on_step,
        start_step=start_step,
        end_step=end_step,
    )


@pytest.mark.parametrize("split_at", [0, 1, 3, STEPS - 1, STEPS])
def test_resume_with_the_same_scheduler_equals_full_run(denoiser_parts, embeds, split_at):
    scheduler = denoiser_parts.new_scheduler()
    noise = prepare_latents(denoiser_parts, WIDTH, HEIGHT, NUM_FRAMES, SEED)
    reports: list[StepInfo] = []
    partial = _run_steps(denoiser_parts, embeds, scheduler, noise, 0, split_at, reports.append)
    resumed = _run_steps(denoiser_parts, embeds, scheduler, partial, split_at, STEPS, reports.append)

    assert torch.equal(resumed, _full_run(denoiser_parts, embeds))
    assert [report.step for report in reports] == list(range(1, STEPS + 1))


def test_resume_with_a_fresh_positioned_scheduler_equals_full_run(denoiser_parts, embeds):
    """A checkpoint restored in another process: only the latents and the step index survive."""
    split_at = 2
    noise = prepare_latents(denoiser_parts, WIDTH, HEIGHT, NUM_FRAMES, SEED)
    checkpoint = _run_steps(denoiser_parts, embeds, denoiser_parts.new_scheduler(), noise, 0, split_at).clone()

    fresh_scheduler = denoiser_parts.new_scheduler()
    position_scheduler(fresh_scheduler, STEPS, start_step=split_at)
    resumed = _run_steps(denoiser_parts, embeds, fresh_scheduler, checkpoint, split_at, STEPS)
    assert torch.equal(resumed, _full_run(denoiser_parts, embeds))


def test_resume_refuses_a_scheduler_at_the_wrong_step(denoiser_parts, embeds):
    noise = prepare_latents(denoiser_parts, WIDTH, HEIGHT, NUM_FRAMES, SEED)
    with pytest.raises(ValueError, match="set up for"):
        _run_steps(denoiser_parts, embeds, denoiser_parts.new_scheduler(), noise, 2, STEPS)

    scheduler = denoiser_parts.new_scheduler()
    position_scheduler(scheduler, STEPS, start_step=1)
    with pytest.raises(ValueError, match="scheduler is at step 1"):
        _run_steps(denoiser_parts, embeds, scheduler, noise, 2, STEPS)

    with pytest.raises(ValueError, match="start_step <= end_step"):
        _run_steps(denoiser_parts, embeds, denoiser_parts.new_scheduler(), noise, 0, STEPS + 1)


def test_multistep_scheduler_resumes_only_when_handed_across(denoiser_parts, embeds):
    """UniPC (real Wan's scheduler) keeps earlier model outputs, so continuing needs the same instance."""

    def new_unipc() -> UniPCMultistepScheduler:
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)

    split_at = 3
    noise = prepare_latents(denoiser_parts, WIDTH, HEIGHT, NUM_FRAMES, SEED)
    full = _run_steps(denoiser_parts, embeds, new_unipc(), noise, 0, STEPS)

    scheduler = new_unipc()
    partial = _run_steps(denoiser_parts, embeds, scheduler, noise, 0, split_at)
    assert torch.equal(_run_steps(denoiser_parts, embeds, scheduler, partial, split_at, STEPS), full)

    with pytest.raises(TypeError, match="UniPCMultistepScheduler keeps state"):
        position_scheduler(new_unipc(), STEPS, start_step=split_at)

    # Why it is refused: a fresh UniPC placed at the same index by hand gives a different video.
    fresh = new_unipc()
    fresh.set_timesteps(STEPS)
    fresh.set_begin_index(split_at)
    assert not torch.equal(_run_steps(denoiser_parts, embeds, fresh, partial, split_at, STEPS), full)
