"""Model catalogue: deterministic built-ins, local diffusers directories, parameter validation."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline
from transformers import ByT5Tokenizer, T5EncoderModel

from gpu_agents.denoise import denoise, prepare_latents
from gpu_agents.encoding import encode_prompts
from gpu_agents.models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL_ID,
    InvalidParamsError,
    ModelCatalogue,
    UnknownModelError,
    validate_generation_params,
)

WIDTH, HEIGHT, NUM_FRAMES, STEPS = 64, 64, 9, 3


def _state_dicts(catalogue: ModelCatalogue, model_id: str) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "text_encoder": catalogue.text_encoder(model_id).text_encoder.state_dict(),
        "transformer": catalogue.denoiser(model_id).transformer.state_dict(),
        "vae": catalogue.vae(model_id).state_dict(),
    }


def _assert_state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _fingerprint(model_id: str) -> str:
    """sha256 over every weight of a built-in model, built in this process."""
    digest = hashlib.sha256()
    for part, state in _state_dicts(ModelCatalogue(), model_id).items():
        for name, tensor in sorted(state.items()):
            digest.update(f"{part}.{name}".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_default_model_is_builtin():
    assert DEFAULT_MODEL_ID == "tiny-wan"
    assert ModelCatalogue().known(DEFAULT_MODEL_ID)


@pytest.mark.parametrize("model_id", sorted(BUILTIN_MODELS))
def test_builtin_weights_do_not_depend_on_build_order_or_global_rng(model_id):
    first = _state_dicts(ModelCatalogue(), model_id)

    # Build the parts of a second copy in another order, after disturbing the global RNG.
    torch.manual_seed(1234)
    torch.randn(100)
    rng_before = torch.get_rng_state()
    second_catalogue = ModelCatalogue()
    second = {
        "vae": second_catalogue.vae(model_id).state_dict(),
        "transformer": second_catalogue.denoiser(model_id).transformer.state_dict(),
        "text_encoder": second_catalogue.text_encoder(model_id).text_encoder.state_dict(),
    }
    assert torch.equal(torch.get_rng_state(), rng_before), "building a model must not consume the global RNG"

    for part in first:
        _assert_state_dicts_equal(first[part], second[part])


def test_builtin_weights_identical_in_another_process():
    code = "from tests.test_models import _fingerprint; print(_fingerprint('tiny-wan'))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.getcwd(), timeout=120
    )
    assert result.stdout.strip().splitlines()[-1] == _fingerprint("tiny-wan")


def test_builtin_models_are_eval_and_consistent():
    catalogue = ModelCatalogue()
    for model_id in BUILTIN_MODELS:
        if catalogue.facts(model_id).family != "wan":
            continue  # other families check their own components (tests/test_family_*.py)
        text_parts = catalogue.text_encoder(model_id)
        denoiser_parts = catalogue.denoiser(model_id)
        vae = catalogue.vae(model_id)
        assert not text_parts.text_encoder.training and not denoiser_parts.transformer.training and not vae.training
        assert text_parts.text_encoder.config.d_model == denoiser_parts.transformer.config.text_dim
        # Image-to-video transformers also take the condition: a 4-channel mask and the image's latents.
        i2v_only = catalogue.facts(model_id).needs_image
        in_channels = 2 * vae.config.z_dim + 4 if i2v_only else vae.config.z_dim
        for expert in denoiser_parts.modules():
            assert not expert.training
            assert expert.config.in_channels == in_channels and expert.config.out_channels == vae.config.z_dim
        assert text_parts.max_sequence_length == 32
        assert denoiser_parts.vae_scale_factor_temporal == vae.config.scale_factor_temporal
        assert denoiser_parts.vae_scale_factor_spatial == vae.config.scale_factor_spatial
    # Both built-ins share one text encoder, so their prompt embeddings are interchangeable.
    assert catalogue.text_encoder("tiny-wan").encoder_id == catalogue.text_encoder("tiny-wan-5m").encoder_id


def test_parts_are_cached_and_schedulers_are_fresh():
    catalogue = ModelCatalogue()
    assert catalogue.denoiser("tiny-wan") is catalogue.denoiser("tiny-wan")
    assert catalogue.vae("tiny-wan") is catalogue.vae("tiny-wan")
    parts = catalogue.denoiser("tiny-wan")
    assert parts.new_scheduler() is not parts.new_scheduler()
    assert isinstance(parts.new_scheduler(), FlowMatchEulerDiscreteScheduler)


def test_tiny_wan_5m_size():
    parameters = sum(p.numel() for p in ModelCatalogue().denoiser("tiny-wan-5m").transformer.parameters())
    assert 4_000_000 < parameters < 6_000_000


def test_unknown_model_id():
    catalogue = ModelCatalogue()
    assert not catalogue.known("no-such-model")
    for load in (catalogue.text_encoder, catalogue.denoiser, catalogue.vae, catalogue.pipeline):
        with pytest.raises(UnknownModelError, match="no-such-model") as error:
            load("no-such-model")
        assert isinstance(error.value, ValueError)
        assert "tiny-wan" in str(error.value) and "tiny-wan-5m" in str(error.value)


def test_model_dirs_may_not_shadow_builtins(tmp_path):
    with pytest.raises(ValueError, match="tiny-wan"):
        ModelCatalogue(model_dirs={"tiny-wan": str(tmp_path)})


def test_missing_model_dir_is_a_clear_error(tmp_path):
    catalogue = ModelCatalogue(model_dirs={"gone": str(tmp_path / "missing")})
    assert catalogue.known("gone")
    with pytest.raises(FileNotFoundError, match="gone"):
        catalogue.denoiser("gone")


@pytest.mark.parametrize(
    "width, height, num_frames, steps, guidance_scale",
    [
        (64, 64, 9, 2, 5.0),
        (832, 480, 81, 50, 5.0),
        (1920, 1088, 257, 1000, 0.0),
        (16, 16, 1, 1, 1),
    ],
)
def test_validate_generation_params_accepts(width, height, num_frames, steps, guidance_scale):
    validate_generation_params(width, height, num_frames, steps, guidance_scale)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"width": 0}, "width must be a positive multiple of 16"),
        ({"width": 72}, "width must be a positive multiple of 16"),
        ({"height": -16}, "height must be a positive multiple of 16"),
        ({"height": 1936}, "height must be at most 1920"),
        ({"width": 64.0}, "width must be an integer"),
        ({"num_frames": 8}, "num_frames must have the form 4k\\+1"),
        ({"num_frames": 0}, "num_frames must have the form 4k\\+1"),
        ({"num_frames": -3}, "num_frames must have the form 4k\\+1"),
        ({"num_frames": 261}, "num_frames must be at most 257"),
        ({"num_frames": True}, "num_frames must be an integer"),
        ({"steps": 0}, "steps must be between 1 and 1000"),
        ({"steps": 1001}, "steps must be between 1 and 1000"),
        ({"guidance_scale": -0.5}, "guidance_scale must be finite and >= 0"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be finite"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be finite"),
        ({"guidance_scale": "5"}, "guidance_scale must be a number"),
    ],
)
def test_validate_generation_params_rejects(params, message):
    good = {"width": 64, "height": 64, "num_frames": 9, "steps": 2, "guidance_scale": 5.0}
    with pytest.raises(InvalidParamsError, match=message) as error:
        validate_generation_params(**{**good, **params})
    assert isinstance(error.value, ValueError)


def _denoised_latents(catalogue: ModelCatalogue, model_id: str, guidance_scale: float = 5.0) -> torch.Tensor:
    text_parts = catalogue.text_encoder(model_id)
    denoiser_parts = catalogue.denoiser(model_id)
    prompt_embeds = encode_prompts(text_parts, ["a red fox in the snow"])
    negative_prompt_embeds = encode_prompts(text_parts, ["blurry"])
    latents = prepare_latents(denoiser_parts, WIDTH, HEIGHT, NUM_FRAMES, seed=7)
    scheduler = denoiser_parts.new_scheduler()
    return denoise(denoiser_parts, scheduler, latents, prompt_embeds, negative_prompt_embeds, guidance_scale, STEPS)


def _pipeline_latents(pipe: WanPipeline, max_sequence_length: int, guidance_scale: float = 5.0) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(
            "a red fox in the snow",
            negative_prompt="blurry",
            height=HEIGHT,
            width=WIDTH,
            num_frames=NUM_FRAMES,
            num_inference_steps=STEPS,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(7),
            output_type="latent",
            max_sequence_length=max_sequence_length,
        ).frames


def test_save_pretrained_then_load_as_local_dir(tmp_path):
    builtin = ModelCatalogue()
    builtin.save_pretrained("tiny-wan", tmp_path)
    for subfolder in ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"):
        assert (tmp_path / subfolder).is_dir(), subfolder

    local = ModelCatalogue(model_dirs={"local-tiny": str(tmp_path)})
    assert local.known("local-tiny")
    text_parts = local.text_encoder("local-tiny")
    assert isinstance(text_parts.tokenizer, ByT5Tokenizer)
    assert isinstance(text_parts.text_encoder, T5EncoderModel)
    assert not text_parts.text_encoder.training
    assert text_parts.max_sequence_length == 32
    assert isinstance(local.denoiser("local-tiny").new_scheduler(), FlowMatchEulerDiscreteScheduler)

    local_latents = _denoised_latents(local, "local-tiny")
    torch.testing.assert_close(local_latents, _denoised_latents(builtin, "tiny-wan"), rtol=0, atol=1e-5)

    # Independent reference: diffusers' own loader on the same directory.
    reference_pipe = WanPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    reference_pipe.set_progress_bar_config(disable=True)
    assert torch.equal(local_latents, _pipeline_latents(reference_pipe, max_sequence_length=32))


def test_local_dir_scheduler_class_comes_from_its_config(tmp_path):
    """Real Wan 2.1 ships UniPCMultistepScheduler; the class must be taken from scheduler_config.json."""
    ModelCatalogue().save_pretrained("tiny-wan", tmp_path)
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    unipc.save_pretrained(tmp_path / "scheduler")
    assert json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == (
        "UniPCMultistepScheduler"
    )
    # diffusers' own loader takes the class from model_index.json; keep it in step, as in real Wan.
    index_path = tmp_path / "model_index.json"
    model_index = json.loads(index_path.read_text())
    model_index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
    index_path.write_text(json.dumps(model_index))

    local = ModelCatalogue(model_dirs={"unipc-tiny": str(tmp_path)})
    scheduler = local.denoiser("unipc-tiny").new_scheduler()
    assert isinstance(scheduler, UniPCMultistepScheduler)
    assert scheduler.config.flow_shift == 3.0

    reference_pipe = WanPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    reference_pipe.set_progress_bar_config(disable=True)
    assert isinstance(reference_pipe.scheduler, UniPCMultistepScheduler)
    assert torch.equal(_denoised_latents(local, "unipc-tiny"), _pipeline_latents(reference_pipe, 32))


def test_local_dir_without_vidgen_file_uses_wan_default_length(tmp_path):
    ModelCatalogue().save_pretrained("tiny-wan", tmp_path)
    (tmp_path / "vidgen_model.json").unlink()
    assert ModelCatalogue(model_dirs={"m": str(tmp_path)}).text_encoder("m").max_sequence_length == 512


def test_an_absolute_directory_path_is_a_model_id(tmp_path):
    """`vidgen submit --model /path/to/dir`: the path itself names the model, no VIDGEN_MODELS entry needed."""
    path = tmp_path / "saved-tiny"
    ModelCatalogue().save_pretrained("tiny-wan", path)
    catalogue = ModelCatalogue()
    assert catalogue.known(str(path)) and not catalogue.known(str(tmp_path / "missing"))
    loaded = catalogue.denoiser(str(path)).transformer.state_dict()
    builtin = ModelCatalogue().denoiser("tiny-wan").transformer.state_dict()
    assert all(torch.equal(loaded[k], builtin[k]) for k in builtin)
