"""Prompt encoding: text -> the embeddings a model's transformer cross-attends to, as its family encodes them."""

from __future__ import annotations

import torch

from .families.base import TextEncoderParts


def encode_prompts(parts: TextEncoderParts, prompts: list[str]) -> torch.Tensor:
    """(B, max_sequence_length, dim) embeddings, exactly as the family's pipeline encodes them. For classifier-free
    guidance encode the negative prompt ("" if none) the same way."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    return parts.family.encode_prompts(parts, prompts)


def token_counts(parts: TextEncoderParts, prompts: list[str]) -> list[int]:
    """Tokens each prompt has before truncation (special tokens included), to tell which ones encode_prompts cut."""
    return parts.family.token_counts(parts, prompts)
