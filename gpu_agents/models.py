"""Model catalogue: which models exist, which family serves each, and how each stage loads its part.

Two kinds of model id:

* built-in ids ("tiny-wan", "tiny-wan2.2-a14b", ...): small models built in code by their family with fixed seeds,
  so every process gets bit-identical weights without downloading anything;
* local ids: any id mapped to a diffusers-format directory (VIDGEN_MODEL_DIRS), or the directory's absolute path
  itself. Its model_index.json says the pipeline class, and the family that claims that class serves it.

Stages only load what they need (text encoder, denoiser or VAE), so each part has its own loader and is cached per
(model_id, part) inside the process. What a family is and declares: gpu_agents/families/base.py.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch

from .families import FAMILIES, family_for
from .families.base import (BuiltinModel, ChunkDecoder, Denoiser, InvalidParamsError, ModelFacts, ModelFamily,
                            ParamRules, TextEncoderParts)
from .families.building import VIDGEN_MODEL_FILE, read_model_index
from .model_facts import PRESETS, UnknownModelError, check_params  # noqa: F401 (re-exported)

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL_ID", "Denoiser", "DenoiserParts", "InvalidParamsError", "ModelCatalogue",
           "ModelFacts", "TextEncoderParts", "UnknownModelError", "check_params", "effective_guidance",
           "select_device", "validate_generation_params"]

DEFAULT_MODEL_ID = "tiny-wan"

#: Every family's built-in models by id.
BUILTIN_MODELS: dict[str, BuiltinModel] = {model_id: model for family in FAMILIES
                                           for model_id, model in family.builtins().items()}

# The name stages and tests used before families existed: a family's denoiser.
DenoiserParts = Denoiser




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


# --------------------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------------------


class ModelCatalogue:
    """Resolves model ids to their family and loaded parts; each part is loaded once per process and shared."""

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

    # -- what is known without loading ---------------------------------------------------------------

    def family(self, model_id: str) -> ModelFamily:
        return self._resolve(model_id)[0]

    def facts(self, model_id: str) -> ModelFacts:
        """Family, modalities and parameter limits (reads config files at most)."""
        family, source = self._resolve(model_id)
        facts = family.facts(model_id, source)
        if model_id in BUILTIN_MODELS and not facts.description:
            facts = replace(facts, description=BUILTIN_MODELS[model_id].description)
        return facts

    def all_facts(self) -> list[ModelFacts]:
        """Every model this catalogue knows, built-in first (`vidgen models`)."""
        return [self.facts(model_id) for model_id in self.model_ids()]

    def max_sequence_length(self, model_id: str) -> int:
        """Text length prompts are padded/truncated to; cheap (loads nothing)."""
        family, source = self._resolve(model_id)
        return family.max_sequence_length(source)

    def chunk_frames(self, model_id: str, configured: int) -> int | None:
        """Latent frames per chunk the agent emits: the configured size where the family decodes causally chunk by
        chunk, else None (one chunk: the whole latent, decoded at once)."""
        return configured if self.family(model_id).causal_decode else None

    # -- parts ----------------------------------------------------------------------------------------

    def text_encoder(self, model_id: str) -> TextEncoderParts:
        return self._cached(model_id, "text_encoder", lambda family, source: family.load_text_encoder(source))

    def denoiser(self, model_id: str) -> Denoiser:
        return self._cached(model_id, "denoiser", lambda family, source: family.load_denoiser(source))

    def vae(self, model_id: str) -> torch.nn.Module:
        return self._cached(model_id, "vae", lambda family, source: family.load_vae(source))

    def chunk_decoder(self, model_id: str) -> ChunkDecoder:
        """A decoder of the model's latent chunks over its (shared) VAE."""
        return self._cached(model_id, "chunk_decoder", lambda family, source: family.chunk_decoder(self.vae(model_id)))

    def pipeline(self, model_id: str, image: bool = False):
        """The family's diffusers pipeline over the same (shared) modules, for references and benchmarks; ``image``:
        its image-to-video pipeline. Every call returns a new pipeline with its own scheduler."""
        pipe = self.family(model_id).pipeline(self.text_encoder(model_id), self.denoiser(model_id),
                                              self.vae(model_id), image=image)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_pretrained(self, model_id: str, path: str | os.PathLike[str]) -> None:
        """Write a model as a diffusers directory that `ModelCatalogue(model_dirs=...)` can load."""
        path = os.fspath(path)
        self.pipeline(model_id).save_pretrained(path)
        with open(os.path.join(path, VIDGEN_MODEL_FILE), "w") as f:
            json.dump({"max_sequence_length": self.max_sequence_length(model_id)}, f, indent=2)

    # -- loading ------------------------------------------------------------------------------------

    def _resolve(self, model_id: str) -> tuple[ModelFamily, Any]:
        """(family, source): a built-in recipe, or a local directory and the family its model_index.json names."""
        if model_id in BUILTIN_MODELS:
            model = BUILTIN_MODELS[model_id]
            return model.family, model.recipe
        model_dir = self._model_dir(model_id)
        return family_for(read_model_index(model_dir), f"model {model_id!r} ({model_dir})"), model_dir

    def _cached(self, model_id: str, part: str, load: Callable[[ModelFamily, Any], Any]) -> Any:
        key = (model_id, part)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._place(load(*self._resolve(model_id)))
            return self._cache[key]

    def _place(self, part: Any) -> Any:
        """Move a freshly loaded part to this catalogue's device and dtype, once."""
        if self.device.type == "cpu" and self.dtype == torch.float32:
            return part  # where everything is built and loaded anyway
        if isinstance(part, TextEncoderParts):
            part.text_encoder.to(self.device, self.dtype)
        elif isinstance(part, Denoiser):
            for module in part.modules():
                module.to(self.device, self.dtype)
        elif isinstance(part, torch.nn.Module):
            # The causal VAE stays float32, as in diffusers' Wan examples: bf16 decoding bands colours.
            part.to(self.device)
        return part

    def _require_known(self, model_id: str) -> None:
        if not self.known(model_id):
            raise UnknownModelError(f"unknown model id {model_id!r}; known ids: {', '.join(self.model_ids())}")

    def _model_dir(self, model_id: str) -> str:
        self._require_known(model_id)
        model_dir = self._model_dirs.get(model_id, model_id)  # an id may be the directory's absolute path
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model {model_id!r}: directory {model_dir!r} does not exist")
        return model_dir


# --------------------------------------------------------------------------------------------------
# Generation parameters
# --------------------------------------------------------------------------------------------------


def validate_generation_params(width: int, height: int, num_frames: int, steps: int, guidance_scale: float,
                               rules: ParamRules = ParamRules()) -> None:
    """Raise InvalidParamsError naming the first parameter a model with these rules (Wan 2.1's by default) cannot
    use as given."""
    rules.check(width, height, num_frames, steps, guidance_scale)


