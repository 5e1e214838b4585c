"""Causal chunk-by-chunk VAE decoding: equal to one-shot decoding, per-job caches, state as bytes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import safetensors.torch
import torch

from gpu_agents.models import ModelCatalogue
from gpu_agents.streaming_vae import (
    CausalDecodeState,
    CausalVaeDecoder,
    DecoderStateError,
    state_from_bytes,
    state_to_bytes,
)
from gpu_agents.video import decode_latents, split_latent_chunks

MODEL_ID = "tiny-wan"


@pytest.fixture(scope="module")
def vae():
    return ModelCatalogue().vae(MODEL_ID)


def _latents(latent_frames: int, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    """Normalised latents as the denoiser emits them, for a video of height x width pixels."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=generator)


def _decode_in_chunks(decoder: CausalVaeDecoder, state: CausalDecodeState, chunks: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([decoder.decode_chunk(state, chunk) for chunk in chunks])


@pytest.mark.parametrize(
    "latent_frames, frames_per_chunk, height, width",
    [(3, 1, 64, 64), (3, 2, 64, 64), (3, 3, 64, 64), (5, 1, 64, 64), (5, 2, 64, 64), (5, 3, 64, 64), (4, 3, 48, 80)],
)
def test_chunked_decode_equals_one_shot(vae, latent_frames, frames_per_chunk, height, width):
    latents = _latents(latent_frames, height, width)
    reference = decode_latents(vae, latents)
    decoder = CausalVaeDecoder(vae)
    state = decoder.new_state()

    outputs = []
    for index, chunk in enumerate(split_latent_chunks(latents, frames_per_chunk)):
        frames = decoder.decode_chunk(state, chunk)
        chunk_frames = chunk.shape[2]
        assert frames.shape == ((1 + 4 * (chunk_frames - 1)) if index == 0 else 4 * chunk_frames, height, width, 3)
        assert frames.dtype == np.uint8
        outputs.append(frames)

    assert np.array_equal(np.concatenate(outputs), reference)
    assert reference.shape[0] == 1 + 4 * (latent_frames - 1)
    assert state.latent_frames_decoded == latent_frames
    assert state.frames_decoded == reference.shape[0]


def test_interleaved_jobs_keep_their_own_caches(vae):
    """A0, B0, A1, B1, ... on one VAE, with unrelated vae.decode calls in between (they clear vae._feat_map)."""
    latents_a = _latents(5, seed=1)
    latents_b = _latents(4, 48, 80, seed=2)
    reference_a, reference_b = decode_latents(vae, latents_a), decode_latents(vae, latents_b)
    decoder = CausalVaeDecoder(vae)
    state_a, state_b = decoder.new_state(), decoder.new_state()
    chunks_a, chunks_b = split_latent_chunks(latents_a, 2), split_latent_chunks(latents_b, 2)

    frames_a, frames_b = [], []
    for chunk_a, chunk_b in zip(chunks_a, chunks_b):
        frames_a.append(decoder.decode_chunk(state_a, chunk_a))
        decode_latents(vae, _latents(2, seed=3))
        frames_b.append(decoder.decode_chunk(state_b, chunk_b))
    frames_a += [decoder.decode_chunk(state_a, chunk) for chunk in chunks_a[len(chunks_b):]]

    assert np.array_equal(np.concatenate(frames_a), reference_a)
    assert np.array_equal(np.concatenate(frames_b), reference_b)


def test_sharing_one_cache_between_jobs_breaks_them(vae):
    """The naive way, one cache per decoder rather than per job: B's chunk continues A's video."""
    latents_a, latents_b = _latents(3, seed=1), _latents(3, seed=2)
    decoder = CausalVaeDecoder(vae)
    shared = decoder.new_state()

    frames_a = []
    for chunk_a, chunk_b in zip(split_latent_chunks(latents_a, 1), split_latent_chunks(latents_b, 1)):
        frames_a.append(decoder.decode_chunk(shared, chunk_a))
        decoder.decode_chunk(shared, chunk_b)

    assert not np.array_equal(np.concatenate(frames_a[1:]), decode_latents(vae, latents_a)[1:])


@pytest.mark.parametrize("chunks_before_handover", [1, 2])
def test_state_continues_on_another_vae_instance(vae, chunks_before_handover):
    """Decoder A decodes the first chunks and saves its state; decoder B (another VAE instance) goes on."""
    latents = _latents(5, seed=4)
    chunks = split_latent_chunks(latents, 1 if chunks_before_handover == 1 else 2)
    decoder_a = CausalVaeDecoder(vae)
    other_vae = ModelCatalogue().vae(MODEL_ID)
    assert other_vae is not vae
    decoder_b = CausalVaeDecoder(other_vae)

    state = decoder_a.new_state()
    frames = [decoder_a.decode_chunk(state, chunk) for chunk in chunks[:chunks_before_handover]]
    data = state_to_bytes(state)
    restored = state_from_bytes(data)
    frames += [decoder_b.decode_chunk(restored, chunk) for chunk in chunks[chunks_before_handover:]]

    assert np.array_equal(np.concatenate(frames), decode_latents(vae, latents))
    assert (restored.latent_frames_decoded, restored.frames_decoded) == (5, 17)
    # After one latent frame the temporal upsamplers hold diffusers' "Rep" marker, not a tensor.
    markers = [slot for slot in state_from_bytes(data).feat_cache if isinstance(slot, str)]
    assert markers == (["Rep", "Rep"] if chunks_before_handover == 1 else [])


def test_failed_chunk_leaves_state_unchanged(vae, monkeypatch):
    latents = _latents(3, seed=5)
    decoder = CausalVaeDecoder(vae)
    state = decoder.new_state()
    first = decoder.decode_chunk(state, latents[:, :, :1])
    cache_before = list(state.feat_cache)

    real_forward = vae.decoder.forward
    calls = []

    def forward_failing_on_second_frame(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(vae.decoder, "forward", forward_failing_on_second_frame)
    with pytest.raises(RuntimeError, match="out of memory"):
        decoder.decode_chunk(state, latents[:, :, 1:])
    monkeypatch.undo()

    assert (state.latent_frames_decoded, state.frames_decoded) == (1, 1)
    assert all(after is before for after, before in zip(state.feat_cache, cache_before, strict=True))
    rest = decoder.decode_chunk(state, latents[:, :, 1:])
    assert np.array_equal(np.concatenate([first, rest]), decode_latents(vae, latents))


def test_state_bytes_round_trip_fields(vae):
    decoder = CausalVaeDecoder(vae)
    state = decoder.new_state()
    decoder.decode_chunk(state, _latents(2, 48, 80))
    restored = state_from_bytes(state_to_bytes(state))

    assert (restored.latent_frames_decoded, restored.frames_decoded, restored.latent_size) == (2, 5, (6, 10))
    assert len(restored.feat_cache) == len(state.feat_cache) == decoder.cache_slots
    for original, copy in zip(state.feat_cache, restored.feat_cache, strict=True):
        if isinstance(original, torch.Tensor):
            assert torch.equal(original, copy) and copy.data_ptr() != original.data_ptr()
        else:
            assert copy == original
    assert restored.feat_cache is not state.feat_cache


def _corruptions(data: bytes) -> dict[str, bytes]:
    flipped = bytearray(data)
    flipped[-10] ^= 0x01  # inside the last tensor's data
    return {
        "truncated": data[: len(data) // 2],
        "too short": data[:5],
        "flipped bit": bytes(flipped),
        "not safetensors": b"\x00" * 64,
        "other safetensors": safetensors.torch.save({"x": torch.zeros(2)}),
    }


@pytest.mark.parametrize(
    "corruption", ["truncated", "too short", "flipped bit", "not safetensors", "other safetensors"]
)
def test_corrupt_state_bytes_are_refused(vae, corruption):
    decoder = CausalVaeDecoder(vae)
    state = decoder.new_state()
    decoder.decode_chunk(state, _latents(2))
    with pytest.raises(DecoderStateError):
        state_from_bytes(_corruptions(state_to_bytes(state))[corruption])


def test_state_of_another_model_is_refused(vae):
    decoder = CausalVaeDecoder(vae)
    state = CausalDecodeState(feat_cache=[None] * (decoder.cache_slots + 1))
    with pytest.raises(DecoderStateError, match="cache slots"):
        decoder.decode_chunk(state, _latents(1))


def test_bad_chunks_are_refused(vae):
    decoder = CausalVaeDecoder(vae)
    state = decoder.new_state()
    with pytest.raises(ValueError, match="channels"):
        decoder.decode_chunk(state, torch.zeros(1, 8, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, C, T>=1, h, w\)"):
        decoder.decode_chunk(state, torch.zeros(2, 16, 1, 8, 8))
    decoder.decode_chunk(state, _latents(1))
    with pytest.raises(ValueError, match="earlier chunks"):
        decoder.decode_chunk(state, _latents(1, 48, 80))
