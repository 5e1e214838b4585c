"""What every family does the same way: building built-in components from a seed, reading a local directory's files."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch

# Written next to model_index.json by `ModelCatalogue.save_pretrained`: diffusers has no place to record the text
# length a model was trained with, and the prompt embeddings (and so the video) depend on it.
VIDGEN_MODEL_FILE = "vidgen_model.json"


def build_seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Build a module from its own seed, leaving the global RNG untouched, in eval mode.

    Weight init draws from the global RNG; forking it means a component's weights do not depend on what else was
    built before it in this process. Fresh models are in training mode (T5 dropout would be active).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    return module.eval()


def read_model_index(model_dir: str) -> dict[str, Any]:
    """A diffusers directory's model_index.json (which pipeline class, which components)."""
    path = os.path.join(model_dir, "model_index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir!r} has no model_index.json: not a diffusers model directory")
    with open(path) as f:
        return json.load(f)


def read_vidgen_file(model_dir: str) -> dict[str, Any]:
    """What vidgen recorded next to the model (VIDGEN_MODEL_FILE), or {}."""
    path = os.path.join(model_dir, VIDGEN_MODEL_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_config(model_dir: str, subfolder: str) -> dict:
    """A component's config.json in a diffusers directory."""
    with open(os.path.join(model_dir, subfolder, "config.json")) as f:
        return json.load(f)


def load_text_encoder(model_dir: str) -> torch.nn.Module:
    """The text encoder of a diffusers directory, of the class its config names (`architectures`): UMT5EncoderModel
    for real Wan and Helios, Gemma 3 for LTX-2, T5EncoderModel for tiny ones. AutoModel would map a T5 config to the
    full encoder-decoder T5Model."""
    import transformers
    from transformers import AutoConfig

    subfolder = os.path.join(model_dir, "text_encoder")
    config = AutoConfig.from_pretrained(subfolder, local_files_only=True)
    if not config.architectures:
        raise ValueError(f"{subfolder}/config.json has no 'architectures' entry naming the encoder class")
    return getattr(transformers, config.architectures[0]).from_pretrained(subfolder, local_files_only=True).eval()
