"""Model catalogue: which Wan text-to-video models exist and how each stage loads its part.

Two kinds of model id:

* built-in ids ("tiny-wan", "tiny-wan-5m"): small Wan components built in code with fixed seeds, so
  every process gets bit-identical weights without downloading anything;
* local ids: any id mapped to a diffusers-format directory laid out like
  Wan-AI/Wan2.1-T2V-1.3B-Diffusers (transformer/, vae/, scheduler/, text_encoder/, tokenizer/).

Stages only load what they need (text encoder, denoiser or VAE), so each part has its own loader and
is cached per (model_id, part) inside the process.

Generation-parameter validation lives here too (`validate_generation_params`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import (
    AutoConfig,
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
)

DEFAULT_MODEL_ID = "tiny-wan"

# WanPipeline's default `max_sequence_length`; used for local directories that do not say otherwise.
DEFAULT_MAX_SEQUENCE_LENGTH = 512

# Written next to model_index.json by `ModelCatalogue.save_pretrained`: diffusers has no place to record
# the text length a model was trained with, and the prompt embeddings (and so the video) depend on it.
VIDGEN_MODEL_FILE = "vidgen_model.json"

# Limits for generation parameters. Wan's VAE compresses 8x in space and 4x in time and the transformer
# patchifies 2x2 in space, so pixel sizes are multiples of 16 and frame counts have the form 4k+1.
SPATIAL_MULTIPLE = 16
TEMPORAL_MULTIPLE = 4
MAX_SIDE_PIXELS = 1920
MAX_NUM_FRAMES = 257
MAX_STEPS = 1000


class UnknownModelError(ValueError):
    """Raised for a model id that is neither built in nor mapped to a local directory."""


class InvalidParamsError(ValueError):
    """Raised when generation parameters cannot be used with Wan models."""


# --------------------------------------------------------------------------------------------------
# Parts handed to the stages
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderParts:
    """What the text-encoding stage needs."""

    tokenizer: PreTrainedTokenizerBase
    text_encoder: PreTrainedModel
    max_sequence_length: int
    # Two models with the same encoder_id produce identical prompt embeddings, so embeddings can be
    # reused between them (tiny-wan and tiny-wan-5m share one).
    encoder_id: str


@dataclass(frozen=True)
class DenoiserParts:
    """What the denoising stage needs: the transformer, the scheduler recipe and the latent geometry."""

    transformer: WanTransformer3DModel
    scheduler_class: type[SchedulerMixin]
    scheduler_config: Mapping[str, Any]
    # Copied from the VAE config so the denoiser can size latents without loading the VAE.
    vae_scale_factor_temporal: int
    vae_scale_factor_spatial: int

    def new_scheduler(self) -> SchedulerMixin:
        """A fresh scheduler: schedulers carry per-run state, so every job needs its own."""
        return self.scheduler_class.from_config(self.scheduler_config)


# --------------------------------------------------------------------------------------------------
# Built-in models
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinModelSpec:
    """Recipe for a built-in model: constructor arguments and the seed each component is built with."""

    transformer_kwargs: Mapping[str, Any]
    vae_kwargs: Mapping[str, Any]
    text_encoder_kwargs: Mapping[str, Any]
    scheduler_kwargs: Mapping[str, Any]
    max_sequence_length: int
    encoder_id: str
    transformer_seed: int = 0
    vae_seed: int = 0
    text_encoder_seed: int = 0
    description: str = field(default="", compare=False)


# ByT5Tokenizer needs no vocabulary file: 256 bytes + 3 special tokens + 125 extra ids.
_TINY_TOKENIZER_VOCAB_SIZE = 384
_TINY_TEXT_DIM = 32

_TINY_TEXT_ENCODER_KWARGS = {
    # Saved into config.json; loading a directory picks the encoder class from it.
    "architectures": ["T5EncoderModel"],
    "vocab_size": _TINY_TOKENIZER_VOCAB_SIZE,
    "d_model": _TINY_TEXT_DIM,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

# Sizes from diffusers' tests/pipelines/wan/test_wan.py.
_TINY_VAE_KWARGS = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    # The AutoencoderKLWan defaults, spelled out because the denoiser sizes latents from them.
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 8,
}

_TINY_TRANSFORMER_COMMON_KWARGS = {
    "patch_size": (1, 2, 2),
    "in_channels": _TINY_VAE_KWARGS["z_dim"],
    "out_channels": _TINY_VAE_KWARGS["z_dim"],
    "text_dim": _TINY_TEXT_DIM,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    # Like real Wan, so rotary tables cover every size validate_generation_params allows.
    "rope_max_seq_len": 1024,
}

# Same sampler as diffusers' Wan tests; real Wan 2.1 ships UniPCMultistepScheduler with flow_shift=3.0.
_TINY_SCHEDULER_KWARGS = {"shift": 7.0}

BUILTIN_MODELS: dict[str, BuiltinModelSpec] = {
    "tiny-wan": BuiltinModelSpec(
        transformer_kwargs={
            **_TINY_TRANSFORMER_COMMON_KWARGS,
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "ffn_dim": 32,
            "num_layers": 2,
        },
        vae_kwargs=_TINY_VAE_KWARGS,
        text_encoder_kwargs=_TINY_TEXT_ENCODER_KWARGS,
        scheduler_kwargs=_TINY_SCHEDULER_KWARGS,
        max_sequence_length=32,
        encoder_id="builtin:tiny-t5",
        description="~28k-parameter transformer; random weights, for tests and plumbing",
    ),
    "tiny-wan-5m": BuiltinModelSpec(
        transformer_kwargs={
            **_TINY_TRANSFORMER_COMMON_KWARGS,
            "num_attention_heads": 4,
            "attention_head_dim": 64,
            "ffn_dim": 768,
            "num_layers": 5,
        },
        vae_kwargs=_TINY_VAE_KWARGS,
        text_encoder_kwargs=_TINY_TEXT_ENCODER_KWARGS,
        scheduler_kwargs=_TINY_SCHEDULER_KWARGS,
        max_sequence_length=32,
        encoder_id="builtin:tiny-t5",
        description="~5.3M-parameter transformer (~15 ms per CFG step at 64x64x17 on 2 CPU cores); for benchmarks",
    ),
}


def _build_seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Build a module from its own seed, leaving the global RNG untouched.

    Weight init draws from the global RNG; forking it means a component's weights do not depend on
    what else was built before it in this process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    # Fresh models are in training mode (T5 dropout would be active).
    return module.eval()


def _build_tokenizer(spec: BuiltinModelSpec) -> ByT5Tokenizer:
    return ByT5Tokenizer(model_max_length=spec.max_sequence_length)


def _build_text_encoder(spec: BuiltinModelSpec) -> T5EncoderModel:
    config = T5Config(**spec.text_encoder_kwargs)
    return _build_seeded(lambda: T5EncoderModel(config), spec.text_encoder_seed)


def _build_transformer(spec: BuiltinModelSpec) -> WanTransformer3DModel:
    return _build_seeded(lambda: WanTransformer3DModel(**spec.transformer_kwargs), spec.transformer_seed)


def _build_vae(spec: BuiltinModelSpec) -> AutoencoderKLWan:
    return _build_seeded(lambda: AutoencoderKLWan(**spec.vae_kwargs), spec.vae_seed)


# --------------------------------------------------------------------------------------------------
# Local diffusers directories
# --------------------------------------------------------------------------------------------------


PRESETS = ("quality", "fast")


def effective_guidance(params: Mapping[str, Any]) -> float:
    """The fast preset is for distilled few-step checkpoints: no classifier-free guidance, one pass per step."""
    return 1.0 if params["preset"] == "fast" else float(params["guidance_scale"])


def select_device() -> tuple[torch.device, torch.dtype]:
    """CUDA with bfloat16 when a GPU is present (Wan's transformer is trained in bf16), else CPU float32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def _is_model_path(model_id: str) -> bool:
    """`--model /models/Wan2.1-T2V-1.3B-Diffusers`: an absolute path to a diffusers directory is its own id."""
    return os.path.isabs(model_id) and os.path.isfile(os.path.join(model_id, "model_index.json"))


def _check_model_dir(model_id: str, model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model {model_id!r}: directory {model_dir!r} does not exist")
    index_path = os.path.join(model_dir, "model_index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
        # Wan 2.2 two-stage (transformer_2 / boundary_ratio) and ti2v (expand_timesteps) change the
        # denoising loop; only the Wan 2.1 loop is implemented.
        two_stage = index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None])[0] is not None
        if two_stage or index.get("expand_timesteps"):
            raise ValueError(f"model {model_id!r}: Wan 2.2 two-stage / expand_timesteps layouts are not supported")


def _read_max_sequence_length(model_dir: str) -> int:
    path = os.path.join(model_dir, VIDGEN_MODEL_FILE)
    if not os.path.isfile(path):
        return DEFAULT_MAX_SEQUENCE_LENGTH
    with open(path) as f:
        return int(json.load(f)["max_sequence_length"])


def _load_text_encoder_from_dir(model_dir: str) -> PreTrainedModel:
    """Load the class the config names (UMT5EncoderModel for real Wan, T5EncoderModel for tiny ones).

    AutoModel would map a T5 config to the full encoder-decoder T5Model, so use `architectures`.
    """
    subfolder = os.path.join(model_dir, "text_encoder")
    config = AutoConfig.from_pretrained(subfolder, local_files_only=True)
    if not config.architectures:
        raise ValueError(f"{subfolder}/config.json has no 'architectures' entry naming the encoder class")
    encoder_class = getattr(transformers, config.architectures[0])
    return encoder_class.from_pretrained(subfolder, local_files_only=True).eval()


def _load_scheduler_recipe(model_dir: str) -> tuple[type[SchedulerMixin], Mapping[str, Any]]:
    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json")) as f:
        class_name = json.load(f)["_class_name"]
    scheduler_class = getattr(diffusers, class_name)
    scheduler_config = scheduler_class.load_config(model_dir, subfolder="scheduler", local_files_only=True)
    return scheduler_class, scheduler_config


# --------------------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------------------


class ModelCatalogue:
    """Resolves model ids to loaded parts; each part is loaded once per process and shared."""

    def __init__(self, model_dirs: dict[str, str] | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        model_dirs = dict(model_dirs or {})
        clashes = sorted(set(model_dirs) & set(BUILTIN_MODELS))
        if clashes:
            raise ValueError(f"model_dirs may not reuse built-in model ids: {clashes}")
        self._model_dirs = model_dirs
        default_device, default_dtype = select_device()
        self.device = torch.device(device) if device is not None else default_device
        self.dtype = dtype or (default_dtype if self.device == default_device else torch.float32)
        self._cache: dict[tuple[str, str], Any] = {}
        # Stages may ask from several threads; loading the same part twice would waste memory.
        self._lock = threading.RLock()

    def model_ids(self) -> list[str]:
        """All ids this catalogue can load, built-in first."""
        return list(BUILTIN_MODELS) + sorted(self._model_dirs)

    def known(self, model_id: str) -> bool:
        return model_id in BUILTIN_MODELS or model_id in self._model_dirs or _is_model_path(model_id)

    def loaded(self, part: str = "denoiser") -> list[str]:
        """Ids of the models whose ``part`` is loaded in this process (what a GPU agent reports)."""
        with self._lock:
            return sorted(model_id for model_id, cached_part in self._cache if cached_part == part)

    def max_sequence_length(self, model_id: str) -> int:
        """Text length prompts are padded/truncated to; cheap (loads nothing)."""
        if model_id in BUILTIN_MODELS:
            return BUILTIN_MODELS[model_id].max_sequence_length
        return _read_max_sequence_length(self._model_dir(model_id))

    def text_encoder(self, model_id: str) -> TextEncoderParts:
        return self._cached(model_id, "text_encoder", self._load_text_encoder_parts)

    def denoiser(self, model_id: str) -> DenoiserParts:
        return self._cached(model_id, "denoiser", self._load_denoiser_parts)

    def vae(self, model_id: str) -> AutoencoderKLWan:
        return self._cached(model_id, "vae", self._load_vae)

    def pipeline(self, model_id: str) -> WanPipeline:
        """A diffusers WanPipeline over the same (shared) modules, for references and benchmarks.

        Every call returns a new pipeline with its own scheduler; the modules are the cached ones.
        """
        text_parts = self.text_encoder(model_id)
        denoiser_parts = self.denoiser(model_id)
        pipe = WanPipeline(
            tokenizer=text_parts.tokenizer,
            text_encoder=text_parts.text_encoder,
            vae=self.vae(model_id),
            scheduler=denoiser_parts.new_scheduler(),
            transformer=denoiser_parts.transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_pretrained(self, model_id: str, path: str | os.PathLike[str]) -> None:
        """Write a model as a diffusers directory that `ModelCatalogue(model_dirs=...)` can load."""
        path = os.fspath(path)
        self.pipeline(model_id).save_pretrained(path)
        with open(os.path.join(path, VIDGEN_MODEL_FILE), "w") as f:
            json.dump({"max_sequence_length": self.max_sequence_length(model_id)}, f, indent=2)

    # -- loading ------------------------------------------------------------------------------------

    def _cached(self, model_id: str, part: str, load: Callable[[str], Any]) -> Any:
        self._require_known(model_id)
        key = (model_id, part)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._place(load(model_id))
            return self._cache[key]

    def _place(self, part: Any) -> Any:
        """Move a freshly loaded part to this catalogue's device and dtype, once."""
        if self.device.type == "cpu" and self.dtype == torch.float32:
            return part  # where everything is built and loaded anyway
        if isinstance(part, TextEncoderParts):
            part.text_encoder.to(self.device, self.dtype)
        elif isinstance(part, DenoiserParts):
            part.transformer.to(self.device, self.dtype)
        else:
            # The causal VAE stays float32, as in diffusers' Wan examples: bf16 decoding bands colours.
            part.to(self.device)
        return part

    def _require_known(self, model_id: str) -> None:
        if not self.known(model_id):
            raise UnknownModelError(f"unknown model id {model_id!r}; known ids: {', '.join(self.model_ids())}")

    def _model_dir(self, model_id: str) -> str:
        self._require_known(model_id)
        model_dir = self._model_dirs.get(model_id, model_id)  # an id may be the directory's absolute path
        _check_model_dir(model_id, model_dir)
        return model_dir

    def _load_text_encoder_parts(self, model_id: str) -> TextEncoderParts:
        if model_id in BUILTIN_MODELS:
            spec = BUILTIN_MODELS[model_id]
            return TextEncoderParts(
                tokenizer=_build_tokenizer(spec),
                text_encoder=_build_text_encoder(spec),
                max_sequence_length=spec.max_sequence_length,
                encoder_id=f"{spec.encoder_id}@{spec.max_sequence_length}",
            )
        model_dir = self._model_dir(model_id)
        max_sequence_length = _read_max_sequence_length(model_dir)
        return TextEncoderParts(
            tokenizer=AutoTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"), local_files_only=True),
            text_encoder=_load_text_encoder_from_dir(model_dir),
            max_sequence_length=max_sequence_length,
            encoder_id=f"dir:{os.path.abspath(model_dir)}@{max_sequence_length}",
        )

    def _load_denoiser_parts(self, model_id: str) -> DenoiserParts:
        if model_id in BUILTIN_MODELS:
            spec = BUILTIN_MODELS[model_id]
            transformer = _build_transformer(spec)
            scheduler_class = FlowMatchEulerDiscreteScheduler
            scheduler_config = scheduler_class(**spec.scheduler_kwargs).config
            vae_config = spec.vae_kwargs
        else:
            model_dir = self._model_dir(model_id)
            transformer = WanTransformer3DModel.from_pretrained(
                model_dir, subfolder="transformer", local_files_only=True
            ).eval()
            scheduler_class, scheduler_config = _load_scheduler_recipe(model_dir)
            vae_config = AutoencoderKLWan.load_config(model_dir, subfolder="vae", local_files_only=True)
        return DenoiserParts(
            transformer=transformer,
            scheduler_class=scheduler_class,
            scheduler_config=scheduler_config,
            vae_scale_factor_temporal=vae_config["scale_factor_temporal"],
            vae_scale_factor_spatial=vae_config["scale_factor_spatial"],
        )

    def _load_vae(self, model_id: str) -> AutoencoderKLWan:
        if model_id in BUILTIN_MODELS:
            return _build_vae(BUILTIN_MODELS[model_id])
        model_dir = self._model_dir(model_id)
        return AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae", local_files_only=True).eval()


# --------------------------------------------------------------------------------------------------
# Generation parameters
# --------------------------------------------------------------------------------------------------


def _require_int(name: str, value: Any) -> int:
    # bool is an int subclass; True as a frame count is a bug upstream, not a request for 1 frame.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParamsError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_side(name: str, value: Any) -> None:
    value = _require_int(name, value)
    if value <= 0 or value % SPATIAL_MULTIPLE != 0:
        raise InvalidParamsError(f"{name} must be a positive multiple of {SPATIAL_MULTIPLE}, got {value}")
    if value > MAX_SIDE_PIXELS:
        raise InvalidParamsError(f"{name} must be at most {MAX_SIDE_PIXELS} pixels, got {value}")


def validate_generation_params(
    width: int, height: int, num_frames: int, steps: int, guidance_scale: float
) -> None:
    """Raise InvalidParamsError naming the first parameter Wan models cannot use as given.

    Unlike WanPipeline, which silently rounds bad sizes, we reject them so the requester knows.
    """
    _check_side("width", width)
    _check_side("height", height)

    num_frames = _require_int("num_frames", num_frames)
    if num_frames < 1 or num_frames % TEMPORAL_MULTIPLE != 1:
        raise InvalidParamsError(
            f"num_frames must have the form {TEMPORAL_MULTIPLE}k+1 (1, 5, 9, ..., 81, ...), got {num_frames}"
        )
    if num_frames > MAX_NUM_FRAMES:
        raise InvalidParamsError(f"num_frames must be at most {MAX_NUM_FRAMES}, got {num_frames}")

    steps = _require_int("steps", steps)
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidParamsError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")

    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise InvalidParamsError(f"guidance_scale must be a number, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise InvalidParamsError(f"guidance_scale must be finite and >= 0, got {guidance_scale}")


def check_params(params: dict, catalogue: "ModelCatalogue") -> None:
    """Raise InvalidParamsError (or UnknownModelError) naming what in a GenerationParams record cannot be generated.

    The prompt encoder checks every request with it, and the GPU agent checks again what it is handed: a job on a
    generation topic may come from anywhere, and one with 10^9 steps would hold a GPU for good.
    """
    if not catalogue.known(params["model"]):
        known = ", ".join(catalogue.model_ids())
        raise UnknownModelError(f"unknown model {params['model']!r}; known ids: {known}, or the absolute path of a "
                                f"local model directory")
    validate_generation_params(params["width"], params["height"], params["num_frames"], params["steps"],
                               params["guidance_scale"])
    if not 1 <= params["fps"] <= 120:
        raise InvalidParamsError(f"fps must be within 1..120, got {params['fps']}")
    if params["preset"] not in PRESETS:
        raise InvalidParamsError(f"unknown preset {params['preset']!r}; presets: {', '.join(PRESETS)}")
