"""The Wan family: every built-in Wan variant equals diffusers' own pipeline, resumes bit for bit, decodes in chunks.

Variants (gpu_agents/families/wan.py): Wan 2.1 text-to-video, Wan 2.2 A14B's two experts, the image-to-video A14B
layout, and TI2V-5B's 48-channel VAE with per-token timesteps (text- and image-to-video).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from gpu_agents.checkpoint import capture, from_bytes, restore_scheduler, to_bytes
from gpu_agents.denoise import denoise, prepare_latents
from gpu_agents.encoding import encode_prompts
from gpu_agents.families.base import I2V, T2V, Guidance, InvalidParamsError
from gpu_agents.models import ModelCatalogue, check_params
from gpu_agents.streaming_vae import CausalVaeDecoder
from gpu_agents.video import decode_latents, split_latent_chunks

PROMPT, NEGATIVE = "a red kite over a beach", "blurry"
SEED, STEPS, NUM_FRAMES = 11, 6, 9
#: (model, width, height, with an input image)
VARIANTS = [
    ("tiny-wan", 32, 32, False),
    ("tiny-wan2.2-a14b", 32, 32, False),
    ("tiny-wan2.2-i2v-a14b", 32, 48, True),
    ("tiny-wan2.2-ti2v-5b", 64, 32, False),
    ("tiny-wan2.2-ti2v-5b", 64, 32, True),
]
IDS = [f"{model}{'+image' if image else ''}" for model, _, _, image in VARIANTS]


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """An input image of another size than the video's: the family resizes it as the pipeline does."""
    pixels = np.random.RandomState(3).randint(0, 256, size=(40, 52, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _inputs(catalogue, model_id, width, height, image):
    denoiser = catalogue.denoiser(model_id)
    embeds = encode_prompts(catalogue.text_encoder(model_id), [PROMPT, NEGATIVE])
    condition = denoiser.condition(image, catalogue.vae(model_id), width, height, NUM_FRAMES) if image else None
    return denoiser, embeds, condition


def _run(catalogue, model_id, width, height, image, guidance=Guidance(5.0, 3.0), **kwargs):
    denoiser, embeds, condition = _inputs(catalogue, model_id, width, height, image)
    latents = prepare_latents(denoiser, width, height, NUM_FRAMES, SEED)
    scheduler = kwargs.pop("scheduler", None) or denoiser.new_scheduler()
    return denoise(denoiser, scheduler, latents, embeds[:1], embeds[1:], guidance, STEPS, condition=condition,
                   **kwargs)


@pytest.mark.parametrize("model_id,width,height,with_image", VARIANTS, ids=IDS)
def test_the_explicit_loop_equals_the_diffusers_pipeline(catalogue, image, model_id, width, height, with_image):
    denoiser, embeds, _ = _inputs(catalogue, model_id, width, height, None)
    pipe = catalogue.pipeline(model_id, image=with_image)
    two_experts = denoiser.transformer_2 is not None
    extra = {"image": image} if with_image else {}
    if two_experts:
        extra["guidance_scale_2"] = 3.0
    # Embeddings passed in: WanImageToVideoPipeline's own prompt cleaning needs ftfy, which is not installed.
    reference = pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], width=width, height=height,
                     num_frames=NUM_FRAMES, num_inference_steps=STEPS, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(SEED), output_type="latent", **extra).frames
    ours = _run(catalogue, model_id, width, height, image if with_image else None,
                Guidance(5.0, 3.0 if two_experts else None))
    assert torch.equal(ours, reference)


def test_both_experts_of_a14b_run_and_each_has_its_guidance(catalogue):
    denoiser = catalogue.denoiser("tiny-wan2.2-a14b")
    scheduler = denoiser.new_scheduler()
    scheduler.set_timesteps(STEPS)
    experts = [denoiser.expert(t, Guidance(5.0, 3.0)) for t in scheduler.timesteps]
    assert {id(model) for model, _ in experts} == {id(denoiser.transformer), id(denoiser.transformer_2)}
    assert [scale for _, scale in experts] == [5.0 if model is denoiser.transformer else 3.0 for model, _ in experts]
    # guidance_scale_2 matters: the low-noise expert's steps change with it.
    assert not torch.equal(_run(catalogue, "tiny-wan2.2-a14b", 32, 32, None, Guidance(5.0, 3.0)),
                           _run(catalogue, "tiny-wan2.2-a14b", 32, 32, None, Guidance(5.0, 5.0)))


def _switch_step(catalogue, model_id) -> int:
    """The first step the low-noise expert takes."""
    denoiser = catalogue.denoiser(model_id)
    scheduler = denoiser.new_scheduler()
    scheduler.set_timesteps(STEPS)
    return next(i for i, t in enumerate(scheduler.timesteps) if denoiser.expert(t, Guidance(5.0))[0] is not
                denoiser.transformer)


@pytest.mark.parametrize("model_id,width,height,with_image", VARIANTS[1:], ids=IDS[1:])
def test_a_checkpoint_on_either_side_of_the_expert_switch_resumes_bit_identically(catalogue, image, model_id, width,
                                                                                  height, with_image):
    """UniPC keeps a multistep history; the checkpoint carries it, through bytes, into a fresh scheduler."""
    image = image if with_image else None
    uninterrupted = _run(catalogue, model_id, width, height, image)
    denoiser, embeds, condition = _inputs(catalogue, model_id, width, height, image)
    boundary = _switch_step(catalogue, model_id) if denoiser.transformer_2 is not None else STEPS // 2
    for stop in sorted({boundary - 1, boundary, boundary + 1} & set(range(1, STEPS))):
        first = denoiser.new_scheduler()
        partial = _run(catalogue, model_id, width, height, image, scheduler=first, end_step=stop)
        saved = from_bytes(to_bytes(capture("job", first, partial, stop, STEPS)))
        fresh = denoiser.new_scheduler()
        restore_scheduler(fresh, saved)
        # The condition is rebuilt from the image, as an agent that resumes the job does.
        _, _, rebuilt = _inputs(catalogue, model_id, width, height, image)
        resumed = denoise(denoiser, fresh, saved.latents, embeds[:1], embeds[1:], Guidance(5.0, 3.0), STEPS,
                          start_step=stop, condition=rebuilt)
        assert torch.equal(resumed, uninterrupted), f"resumed after step {stop}"


def test_the_image_conditions_the_video(catalogue, image):
    other = Image.fromarray(255 - np.asarray(image))
    for model_id, width, height in (("tiny-wan2.2-i2v-a14b", 32, 48), ("tiny-wan2.2-ti2v-5b", 64, 32)):
        assert not torch.equal(_run(catalogue, model_id, width, height, image),
                               _run(catalogue, model_id, width, height, other))


def test_ti2v_holds_the_image_as_the_first_latent_frame(catalogue, image):
    denoiser, _, condition = _inputs(catalogue, "tiny-wan2.2-ti2v-5b", 64, 32, image)
    latents = _run(catalogue, "tiny-wan2.2-ti2v-5b", 64, 32, image)
    assert torch.equal(latents[:, :, 0], condition["latents"][:, :, 0])


@pytest.mark.parametrize("model_id,width,height", [("tiny-wan2.2-ti2v-5b", 64, 32), ("tiny-wan2.2-a14b", 32, 32)])
def test_chunked_causal_decode_is_exact_for_both_wan_vaes(catalogue, model_id, width, height):
    """Wan 2.2's VAE (48 channels, patch size 2) decodes chunk by chunk to exactly the one-shot frames."""
    latents = _run(catalogue, model_id, width, height, None)
    vae = catalogue.vae(model_id)
    one_shot = decode_latents(vae, latents)
    decoder = CausalVaeDecoder(vae)
    state = decoder.new_state()
    chunked = np.concatenate([decoder.decode_chunk(state, chunk) for chunk in split_latent_chunks(latents, 1)])
    assert chunked.shape == one_shot.shape == (NUM_FRAMES, height, width, 3)
    assert np.array_equal(chunked, one_shot)


def test_facts_say_modalities_and_size_rules(catalogue):
    facts = {f.model_id: f for f in catalogue.all_facts()}
    assert facts["tiny-wan"].modalities == (T2V,) and facts["tiny-wan"].rules.spatial_multiple == 16
    assert facts["tiny-wan2.2-i2v-a14b"].modalities == (I2V,) and facts["tiny-wan2.2-i2v-a14b"].needs_image
    assert facts["tiny-wan2.2-ti2v-5b"].modalities == (T2V, I2V)
    assert facts["tiny-wan2.2-ti2v-5b"].rules.spatial_multiple == 32  # 16x VAE x patch 2
    assert {f.family for f in facts.values() if f.model_id.startswith("tiny-wan")} == {"wan"}


def _params(model, **overrides):
    return {"width": 64, "height": 32, "num_frames": 9, "fps": 8, "steps": 4, "guidance_scale": 5.0, "seed": 1,
            "model": model, "preset": "quality", "input_reference": None, "guidance_scale_2": None,
            **overrides}


def test_requests_are_checked_against_the_models_facts(catalogue):
    image_ref = {"uri": "file:///b/x.png", "sha256": "00" * 32, "bytes": 1}
    check_params(_params("tiny-wan2.2-ti2v-5b"), catalogue)
    check_params(_params("tiny-wan2.2-ti2v-5b", input_reference=image_ref), catalogue)
    with pytest.raises(InvalidParamsError, match="multiple of 32"):
        check_params(_params("tiny-wan2.2-ti2v-5b", width=48), catalogue)
    with pytest.raises(InvalidParamsError, match="needs an input_reference"):
        check_params(_params("tiny-wan2.2-i2v-a14b"), catalogue)
    with pytest.raises(InvalidParamsError, match="takes no input_reference"):
        check_params(_params("tiny-wan", input_reference=image_ref), catalogue)
    check_params(_params("tiny-wan2.2-a14b", width=32, guidance_scale_2=3.0), catalogue)
    with pytest.raises(InvalidParamsError, match="has one"):
        check_params(_params("tiny-wan", width=32, guidance_scale_2=3.0), catalogue)
    with pytest.raises(InvalidParamsError, match="finite"):
        check_params(_params("tiny-wan2.2-a14b", width=32, guidance_scale_2=float("nan")), catalogue)


def test_a_saved_a14b_directory_loads_both_experts_and_generates_the_same(catalogue, tmp_path):
    catalogue.save_pretrained("tiny-wan2.2-a14b", tmp_path)
    local = ModelCatalogue(model_dirs={"local-a14b": str(tmp_path)})
    assert local.facts("local-a14b").family == "wan"
    denoiser = local.denoiser("local-a14b")
    assert denoiser.transformer_2 is not None and denoiser.boundary_ratio == 0.875
    torch.testing.assert_close(_run(local, "local-a14b", 32, 32, None), _run(catalogue, "tiny-wan2.2-a14b", 32, 32,
                                                                              None), rtol=0, atol=1e-5)


def test_vidgen_submit_checks_against_the_same_facts_before_publishing():
    from types import SimpleNamespace

    from vidgen.cli import check_submission

    settings = SimpleNamespace(model_dirs={})
    base = dict(width=64, height=32, num_frames=9, steps=4, seed=0, guidance_scale=5.0, fps=8, preset="quality")
    check_submission(settings, "a fox", {**base, "model": "tiny-wan2.2-ti2v-5b"}, has_image=True)
    with pytest.raises(SystemExit, match="needs an input_reference"):
        check_submission(settings, "a fox", {**base, "model": "tiny-wan2.2-i2v-a14b"}, has_image=False)
    with pytest.raises(SystemExit, match="multiple of 32"):
        check_submission(settings, "a fox", {**base, "width": 48, "model": "tiny-wan2.2-ti2v-5b"}, has_image=False)
