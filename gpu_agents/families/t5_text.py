"""The text side that Wan and Helios share: a (U)MT5 encoder whose output past each prompt's last token is zeros.

Both pipelines encode prompts the same way (`_get_t5_prompt_embeds`, with Wan's `prompt_clean`: the text clean-up
with ftfy where it is installed, HTML unescaping, whitespace folding; Helios' own copy calls ftfy unconditionally), so both families take these methods from
`T5TextSide`. Built-in recipes name `text_encoder_kwargs`, `text_encoder_seed`, `max_sequence_length` and
`encoder_id`; a local directory has `text_encoder/` and `tokenizer/`.
"""
from __future__ import annotations

import os

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

from .base import TextEncoderParts
from .building import build_seeded, load_text_encoder, read_vidgen_file

# ByT5Tokenizer needs no vocabulary file: 256 bytes + 3 special tokens + 125 extra ids.
TINY_VOCAB_SIZE = 384
TINY_TEXT_DIM = 32
#: The tiny built-in models' encoder (diffusers' tests fetch hf-internal-testing/tiny-random-t5; built here instead).
TINY_T5_KWARGS = {
    "architectures": ["T5EncoderModel"],  # saved into config.json; loading a directory picks the class from it
    "vocab_size": TINY_VOCAB_SIZE, "d_model": TINY_TEXT_DIM, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "pad_token_id": 0,
    "eos_token_id": 1, "decoder_start_token_id": 0,
}


class T5TextSide:
    """ModelFamily methods for a T5-encoded family; a local directory (a str) or a recipe is the source."""

    #: The pipeline's default `max_sequence_length`, for local directories that do not record theirs.
    default_max_sequence_length = 512

    def max_sequence_length(self, source) -> int:
        if not isinstance(source, str):
            return source.max_sequence_length
        return int(read_vidgen_file(source).get("max_sequence_length", self.default_max_sequence_length))

    def load_text_encoder(self, source) -> TextEncoderParts:
        length = self.max_sequence_length(source)
        if not isinstance(source, str):
            config = T5Config(**source.text_encoder_kwargs)
            return TextEncoderParts(tokenizer=ByT5Tokenizer(model_max_length=length),
                                    text_encoder=build_seeded(lambda: T5EncoderModel(config),
                                                              source.text_encoder_seed),
                                    max_sequence_length=length, encoder_id=f"{source.encoder_id}@{length}",
                                    family=self)
        return TextEncoderParts(
            tokenizer=AutoTokenizer.from_pretrained(os.path.join(source, "tokenizer"), local_files_only=True),
            text_encoder=load_text_encoder(source), max_sequence_length=length,
            encoder_id=f"dir:{os.path.abspath(source)}@{length}", family=self)

    @torch.inference_mode()
    def encode_prompts(self, parts: TextEncoderParts, prompts: list[str]) -> torch.Tensor:
        """(B, max_sequence_length, d_model), as the pipelines' _get_t5_prompt_embeds: positions past each prompt's
        last token are zeros, not the encoder's output for padding (the models were trained that way)."""
        text_encoder, length = parts.text_encoder, parts.max_sequence_length
        inputs = parts.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=length,
                                 truncation=True, add_special_tokens=True, return_attention_mask=True,
                                 return_tensors="pt")
        input_ids = inputs.input_ids.to(text_encoder.device)
        attention_mask = inputs.attention_mask.to(text_encoder.device)
        seq_lens = attention_mask.gt(0).sum(dim=1).long()
        hidden_states = text_encoder(input_ids, attention_mask).last_hidden_state.to(dtype=text_encoder.dtype)
        real_tokens = [states[:n] for states, n in zip(hidden_states, seq_lens)]
        return torch.stack([torch.cat([u, u.new_zeros(length - u.size(0), u.size(1))]) for u in real_tokens], dim=0)

    def token_counts(self, parts: TextEncoderParts, prompts: list[str]) -> list[int]:
        """Tokens each prompt has before truncation (special tokens included)."""
        ids = parts.tokenizer([prompt_clean(p) for p in prompts], add_special_tokens=True, truncation=False).input_ids
        return [len(token_ids) for token_ids in ids]
