"""Prompt encoding: text -> the embeddings WanTransformer3DModel cross-attends to."""

from __future__ import annotations

import torch

# The exact text clean-up WanPipeline applies (ftfy if installed, HTML unescape, whitespace folding).
# Imported rather than copied so the embeddings cannot drift from the pipeline's.
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from .models import TextEncoderParts


@torch.inference_mode()
def encode_prompts(parts: TextEncoderParts, prompts: list[str]) -> torch.Tensor:
    """Encode prompts to a (B, max_sequence_length, d_model) tensor, like WanPipeline._get_t5_prompt_embeds.

    Positions past each prompt's last token are zeros, not the encoder's output for padding: Wan was
    trained that way. For classifier-free guidance encode the negative prompt ("" if none) the same way.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    text_encoder = parts.text_encoder
    max_sequence_length = parts.max_sequence_length
    cleaned_prompts = [prompt_clean(prompt) for prompt in prompts]

    text_inputs = parts.tokenizer(
        cleaned_prompts,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    input_ids = text_inputs.input_ids.to(text_encoder.device)
    attention_mask = text_inputs.attention_mask.to(text_encoder.device)
    seq_lens = attention_mask.gt(0).sum(dim=1).long()

    hidden_states = text_encoder(input_ids, attention_mask).last_hidden_state
    hidden_states = hidden_states.to(dtype=text_encoder.dtype)

    # Keep each prompt's real tokens and zero-pad back to max_sequence_length.
    real_tokens = [states[:length] for states, length in zip(hidden_states, seq_lens)]
    prompt_embeds = torch.stack(
        [torch.cat([u, u.new_zeros(max_sequence_length - u.size(0), u.size(1))]) for u in real_tokens], dim=0
    )
    return prompt_embeds


def token_counts(parts: TextEncoderParts, prompts: list[str]) -> list[int]:
    """Tokens each prompt has before truncation (special tokens included), to tell which ones encode_prompts cut."""
    cleaned_prompts = [prompt_clean(prompt) for prompt in prompts]
    ids = parts.tokenizer(cleaned_prompts, add_special_tokens=True, truncation=False).input_ids
    return [len(token_ids) for token_ids in ids]
