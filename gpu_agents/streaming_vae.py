"""Causal, chunk-by-chunk VAE decoding: frames for each latent chunk as soon as it arrives.

Wan's VAE (AutoencoderKLWan) decodes one latent frame at a time; its causal 3D convolutions look back
through a feature cache, one slot per causal conv (`vae._feat_map`), that `vae._decode` fills frame by
frame and clears at the start and end of every call. Running that same per-frame loop over a job's
chunks, carrying the cache from one chunk to the next, yields exactly the frames of a one-shot
`video.decode_latents`: the first latent frame gives 1 video frame, each later one 4
(`scale_factor_temporal`).

The cache is kept per job in a CausalDecodeState and handed to the VAE's decoder module directly rather
than swapped in and out of `vae._feat_map`: the VAE's own attribute is never touched, so jobs interleaved
on one VAE instance, and plain `vae.decode`/`vae.encode` calls in between (which clear `_feat_map`),
cannot disturb one another. A state can be saved as bytes after any chunk and restored into another VAE
instance of the same model to continue the job there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

from .sealed import seal, unseal
from .video import denormalize_latents, video_to_uint8

FORMAT_NAME = "vidgen.causal-decode-state"
FORMAT_VERSION = 1

_STATE_KEY = "state"
_CACHE_KEY_PREFIX = "feat_cache"

# A cache slot holds a tensor (the last frames a causal conv saw), None (not reached yet) or a marker
# string: diffusers' temporal upsampler stores "Rep" after the first latent frame, meaning "no real
# history yet, pad with zeros next time".
CacheSlot = torch.Tensor | str | None


class DecoderStateError(ValueError):
    """A decode state cannot be read or does not fit this decoder (corrupt payload, other model, wrong size)."""


@dataclass(eq=False)
class CausalDecodeState:
    """One job's position in a causal decode: the decoder's feature cache and how far the job has got.

    Each job needs its own state; never hand one state to two jobs. `decode_chunk` replaces
    `feat_cache` with a new list after every chunk, so an old reference to the list is never changed
    behind its holder's back.
    """

    feat_cache: list[CacheSlot]  # one slot per causal conv of the decoder, as vae._feat_map
    latent_frames_decoded: int = 0
    frames_decoded: int = 0  # video frames returned so far: the global index of the next chunk's first frame
    latent_size: tuple[int, int] | None = None  # (h, w) of the job's latents, fixed by its first chunk


class CausalVaeDecoder:
    """Decodes jobs chunk by chunk on one AutoencoderKLWan, each job with its own CausalDecodeState."""

    def __init__(self, vae: AutoencoderKLWan) -> None:
        self.vae = vae
        # diffusers counts the decoder's causal convs once, for clear_cache; a state has that many slots.
        self.cache_slots: int = vae._cached_conv_counts["decoder"]

    def new_state(self, num_frames: int | None = None) -> CausalDecodeState:
        """The state of a job that has decoded nothing yet (its length is in its latents: ``num_frames`` unused)."""
        return CausalDecodeState(feat_cache=[None] * self.cache_slots)

    @torch.inference_mode()
    def decode_chunk(self, state: CausalDecodeState, latent_chunk: torch.Tensor) -> np.ndarray:
        """Decode the job's next latent chunk (1, C, T, h, w), normalised as the denoiser emits it.

        Returns the uint8 frames (F, H, W, 3) it yields: 1 + 4 * (T - 1) for the job's first chunk, 4 * T
        after. Advances `state`, and only once the whole chunk has decoded: if decoding raises, the state
        is as it was and the chunk can be retried.
        """
        self._check_chunk(state, latent_chunk)
        vae = self.vae
        # What diffusers' @apply_forward_hook does for vae.decode: lets a CPU-offload hook move the VAE in.
        if hasattr(vae, "_hf_hook") and hasattr(vae._hf_hook, "pre_forward"):
            vae._hf_hook.pre_forward(vae)
        device = vae.post_quant_conv.weight.device
        # A restored state lives on the CPU; moving is a no-op for tensors already in place. Copying the
        # list (not the tensors, which the decoder replaces but never writes into) keeps `state` intact
        # until the chunk has succeeded.
        feat_cache = [
            slot.to(device, vae.dtype) if isinstance(slot, torch.Tensor) else slot for slot in state.feat_cache
        ]

        # The loop of AutoencoderKLWan._decode, with this job's cache instead of vae._feat_map.
        x = vae.post_quant_conv(denormalize_latents(vae, latent_chunk.to(device)))
        outputs = []
        for index in range(x.shape[2]):
            outputs.append(
                vae.decoder(
                    x[:, :, index : index + 1],
                    feat_cache=feat_cache,
                    feat_idx=[0],
                    first_chunk=state.latent_frames_decoded + index == 0,
                )
            )
        video = torch.cat(outputs, dim=2)
        if vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=vae.config.patch_size)
        frames = video_to_uint8(vae, torch.clamp(video, min=-1.0, max=1.0))

        state.feat_cache = feat_cache
        state.latent_frames_decoded += x.shape[2]
        state.frames_decoded += len(frames)
        state.latent_size = tuple(latent_chunk.shape[3:])
        return frames

    def _check_chunk(self, state: CausalDecodeState, latent_chunk: torch.Tensor) -> None:
        if latent_chunk.ndim != 5 or latent_chunk.shape[0] != 1 or latent_chunk.shape[2] < 1:
            raise ValueError(f"a latent chunk is (1, C, T>=1, h, w), got {tuple(latent_chunk.shape)}")
        if latent_chunk.shape[1] != self.vae.config.z_dim:
            raise ValueError(f"latent chunk has {latent_chunk.shape[1]} channels, the VAE {self.vae.config.z_dim}")
        if len(state.feat_cache) != self.cache_slots:
            raise DecoderStateError(
                f"state has {len(state.feat_cache)} cache slots, this VAE's decoder {self.cache_slots}: another model"
            )
        latent_size = tuple(latent_chunk.shape[3:])
        if state.latent_size is not None and latent_size != state.latent_size:
            raise ValueError(f"latent chunk is {latent_size}, the job's earlier chunks {state.latent_size}")
        # vae.decode tiles large latents when tiling is on, which gives other pixels than the untiled loop.
        tile_height = self.vae.tile_sample_min_height // self.vae.spatial_compression_ratio
        tile_width = self.vae.tile_sample_min_width // self.vae.spatial_compression_ratio
        if self.vae.use_tiling and (latent_size[0] > tile_height or latent_size[1] > tile_width):
            raise ValueError("causal chunk decoding does not tile; call vae.disable_tiling() first")


# --------------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------------


def state_to_bytes(state: CausalDecodeState) -> bytes:
    """Serialise a state: cache tensors as safetensors, the rest as JSON metadata with a sha256; no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    slots: list[dict | str | None] = []
    for index, slot in enumerate(state.feat_cache):
        if isinstance(slot, torch.Tensor):
            key = f"{_CACHE_KEY_PREFIX}/{index}"
            # Contiguous CPU copies own their storage (safetensors refuses tensors that share memory).
            tensors[key] = slot.detach().to("cpu").contiguous()
            slots.append({"tensor": key})
        elif slot is None or isinstance(slot, str):
            slots.append(slot)
        else:
            raise DecoderStateError(f"cache slot {index} holds a {type(slot).__name__}, which a state cannot hold")
    body = {
        "feat_cache": slots,
        "latent_frames_decoded": state.latent_frames_decoded,
        "frames_decoded": state.frames_decoded,
        "latent_size": list(state.latent_size) if state.latent_size is not None else None,
    }
    return seal(FORMAT_NAME, FORMAT_VERSION, body, tensors, DecoderStateError, "decode state")


def state_from_bytes(data: bytes) -> CausalDecodeState:
    """Read a payload written by state_to_bytes (tensors on the CPU; decode_chunk moves them to the VAE).

    Raises DecoderStateError if the payload is corrupt, truncated or of another format or version.
    """
    body, tensors = unseal(data, FORMAT_NAME, FORMAT_VERSION, DecoderStateError, "decode state")
    try:
        return _state_from_body(body, tensors)
    except DecoderStateError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise DecoderStateError(f"decode state metadata is malformed: {error!r}") from error


def _state_from_body(body: dict, tensors: dict[str, torch.Tensor]) -> CausalDecodeState:
    feat_cache: list[CacheSlot] = []
    for slot in body["feat_cache"]:
        if isinstance(slot, dict):
            feat_cache.append(tensors.pop(slot["tensor"]))
        elif slot is None or isinstance(slot, str):
            feat_cache.append(slot)
        else:
            raise DecoderStateError(f"unknown cache slot encoding {slot!r}")
    if tensors:
        raise DecoderStateError(f"decode state has tensors its metadata does not name: {sorted(tensors)}")
    latent_frames, frames = body["latent_frames_decoded"], body["frames_decoded"]
    if not (type(latent_frames) is int and type(frames) is int and 0 <= latent_frames <= frames):
        raise DecoderStateError(f"decode state position {latent_frames!r} latent / {frames!r} video frames is invalid")
    latent_size = body["latent_size"]
    return CausalDecodeState(
        feat_cache=feat_cache,
        latent_frames_decoded=latent_frames,
        frames_decoded=frames,
        latent_size=tuple(latent_size) if latent_size is not None else None,
    )
