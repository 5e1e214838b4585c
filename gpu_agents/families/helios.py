"""The Helios family: long videos generated chunk after chunk, each chunk final (and decodable) as soon as it is done.

diffusers' `HeliosPipeline` (text-to-video) makes a video of ``num_latent_frames_per_chunk`` (T, 9 by default)
latent frames at a time. Chunk k starts from fresh noise (the k-th draw of the job's generator), is denoised by its
own run of the scheduler (the same sigmas for every chunk), and is conditioned on a compressed history of the chunks
before it: the last ``sum(history_sizes)`` (16 + 2 + 1) latent frames, split into long / mid / short terms that the
transformer patches at 4x / 2x / 1x, plus the first latent frame of chunk 0 (``keep_first_frame``). Each finished
chunk is VAE-decoded on its own (4(T-1) + 1 frames) and the frames are concatenated, the whole cut to 4k+1 frames.
So a chunk's frames are final the moment its last step is: the model streams while generating.

How that fits the shared loop (gpu_agents/denoise.py: one latents tensor, one scheduler, ``predict`` then
``scheduler.step``; gpu_agents/checkpoint.py: a checkpoint is the latents plus ``vars(scheduler)``):

* **One packed tensor of constant size.** ``(B, N)`` float32: a header (below), the current chunk's latents, a
  window of the latest max(H, T) latent frames made (H = ``sum(history_sizes)``: the transformer reads the last H;
  right after a chunk finishes, the last T are that chunk, which the agent emits) and the prefix frame (chunk 0's
  first latent frame; zeros while chunk 0 is denoised). Nothing grows with the video's length: a 60 s video's
  latents are as large as a 2 s one's (the pipeline keeps every chunk's latents; here only the window, which is all
  the transformer reads).
* **The header** (float32, every entry exact): marker, chunk count K, current chunk k, steps done in it j, latent
  channels / frames per chunk / height / width, history frames, the transformer's tokens per chunk (for the
  schedule's ``mu``), the timestep of the next step (float64, as three float32 parts that add up to it exactly) and
  the seed (four 16-bit parts). The loop's own ``t`` is not used: the scheduler only learns the job's geometry at its
  first ``step`` (``set_timesteps`` gets nothing but the total), after the first ``predict``, so ``predict`` reads
  the exact timestep from the header, which ``prepare_latents`` and then every step write.
* **The scheduler** (`HeliosChunkScheduler`, a `HeliosScheduler` with the same config and state) lays out K runs of
  S = total / K steps. ``step`` maps global step i to (chunk i // S, step i % S), steps the current chunk with the
  chunk's own sigmas and multistep (UniPC) history exactly as the pipeline's per-chunk scheduler does, and at a
  chunk's last step rolls over: the chunk goes into the window (and the prefix, for chunk 0), the multistep history
  is reset (the pipeline's per-chunk ``set_timesteps``), and the next chunk's noise comes in.
* **The noise.** Chunk k's noise is the (k+1)-th draw of ``torch.Generator().manual_seed(seed)``, as the pipeline
  draws it. The scheduler keeps the CPU generator's state after the last draw (``noise_generator_state``, a uint8
  tensor: a checkpoint carries it); without one (a run's first rollover) it re-seeds from the header and skips the
  draws already made. A resume after any step of any chunk is therefore bit-identical.

Decoding (`HeliosChunkDecoder`) is the pipeline's: each chunk alone through ``vae.decode`` (denormalised with the
VAE's latents_mean / latents_std as the pipeline does), to uint8 frames. A job of num_frames frames gets exactly the
first num_frames frames of the pipeline's video: every chunk decodes to 4(T-1) + 1 frames and the last is cut, so
the decoder's state must know the job's frame count (``new_state(num_frames=...)``). When num_frames is what the
pipeline makes for its chunk count (K·(4(T-1)+1) cut to 4k+1: 33, 65, 97, 129, 165, ... for T = 9), the video is the
pipeline's whole output.

Supported: HeliosPipeline's text-to-video default path (keep_first_frame, no skipped first chunk, the default sigmas,
classifier-free guidance as two transformer calls). Not: image or video conditioning, custom sigmas,
``keep_first_frame=False``, HeliosPyramidPipeline (stages > 1), the "dmd" scheduler type.
"""
from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, HeliosPipeline, HeliosScheduler, HeliosTransformer3DModel
from diffusers.pipelines.helios.pipeline_helios import calculate_shift
from diffusers.schedulers.scheduling_helios import HeliosSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ..video import video_to_uint8
from .base import (T2V, Denoiser, Guidance, InvalidParamsError, ModelFacts, ModelFamily, ParamRules,
                   TextEncoderParts)
from .building import build_seeded, read_config, read_model_index, read_vidgen_file
from .t5_text import TINY_T5_KWARGS, TINY_TEXT_DIM, T5TextSide

# HeliosPipeline.__call__'s defaults; local directories may override the chunking in vidgen_model.json.
DEFAULT_HISTORY_SIZES = (16, 2, 1)
DEFAULT_LATENT_FRAMES_PER_CHUNK = 9
# HeliosPipeline.check_inputs: height and width must be multiples of 16, whatever the VAE.
PIPELINE_SPATIAL_MULTIPLE = 16
# A minute at 24 fps. Memory does not grow with the length (the packed latents hold one chunk and the history
# window; the decoder decodes a chunk at a time): the limit is how long one job may hold a GPU.
MAX_FRAMES = 24 * 60 + 1

# The packed latents' header: 20 float32 entries, all exact (see HeliosLayout.header).
HEADER_SIZE = 20
HEADER_MARKER = 3.0  # "Helios packed latents, layout 1"
(_MARKER, _CHUNKS, _CHUNK, _LOCAL_STEP, _CHANNELS, _FRAMES, _HEIGHT, _WIDTH, _HISTORY, _TOKENS) = range(10)
_TIMESTEP = slice(10, 13)  # the next step's timestep: three float32 parts of a float64
_SEED = slice(13, 17)  # four 16-bit parts of the seed, high first (17-19: reserved, 0)
_SEED_PARTS = 4


# --------------------------------------------------------------------------------------------------
# Recipes: the tiny built-in model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeliosRecipe:
    """How a built-in Helios model is built: constructor arguments (and a seed) per component, and its chunking."""

    transformer_kwargs: Mapping[str, Any]
    vae_kwargs: Mapping[str, Any]
    text_encoder_kwargs: Mapping[str, Any]
    scheduler_kwargs: Mapping[str, Any]
    max_sequence_length: int
    encoder_id: str
    history_sizes: tuple[int, ...] = DEFAULT_HISTORY_SIZES
    latent_frames_per_chunk: int = DEFAULT_LATENT_FRAMES_PER_CHUNK
    seed: int = 0  # diffusers' tests build every component from seed 0

    @property
    def text_encoder_seed(self) -> int:
        return self.seed


# Sizes from diffusers' tests/pipelines/helios/test_helios.py (get_dummy_components).
_TINY_TRANSFORMER_KWARGS = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 16,
    "out_channels": 16, "text_dim": TINY_TEXT_DIM, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_dim": (4, 4, 4),
    "has_multi_term_memory_patch": True, "guidance_cross_attn": True, "zero_history_timestep": True,
    "is_amplify_history": False,
}
_TINY_VAE_KWARGS = {
    "base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    # The AutoencoderKLWan defaults, spelled out because the denoiser sizes latents from them.
    "scale_factor_temporal": 4, "scale_factor_spatial": 8,
}
_TINY_SCHEDULER_KWARGS = {"stage_range": [0, 1], "stages": 1, "use_dynamic_shifting": True}

_RECIPES: dict[str, tuple[HeliosRecipe, str]] = {
    "tiny-helios": (HeliosRecipe(transformer_kwargs=_TINY_TRANSFORMER_KWARGS, vae_kwargs=_TINY_VAE_KWARGS,
                                 text_encoder_kwargs=TINY_T5_KWARGS,
                                 scheduler_kwargs=_TINY_SCHEDULER_KWARGS, max_sequence_length=32,
                                 encoder_id="builtin:tiny-helios-t5"),
                    "Helios layout (chunk-wise causal: 9 latent frames = 33 video frames a chunk, 16/2/1-frame "
                    "history), ~141k-parameter transformer; streams while generating; random weights, for tests and "
                    "plumbing"),
}


# --------------------------------------------------------------------------------------------------
# The packed latents
# --------------------------------------------------------------------------------------------------


def _split_float64(value: float) -> tuple[float, float, float]:
    """Three float32-representable parts whose float64 sum, (a + b) + c, is ``value`` exactly."""
    a = float(np.float32(value))
    b = float(np.float32(value - a))
    c = float(np.float32(value - a - b))
    if (a + b) + c != value:
        raise ValueError(f"cannot represent timestep {value!r} exactly in three float32 parts")
    return a, b, c


def _seed_parts(seed: int) -> list[float]:
    # torch maps a negative seed to seed mod 2**64 (Generator.manual_seed): so does the header.
    seed %= 2 ** 64
    return [float((seed >> (16 * (_SEED_PARTS - 1 - i))) & 0xFFFF) for i in range(_SEED_PARTS)]


@dataclass(frozen=True)
class HeliosLayout:
    """One job's packed latents: the geometry its header says, and where each part sits.

    Order: header | current chunk (C, T, h, w) | window (C, max(H, T), h, w) | prefix (C, 1, h, w). The window holds
    the latest max(H, T) latent frames made (zeros before the first chunk, as the pipeline's history starts): the
    transformer reads its last H, and right after a rollover its last T are the chunk just finished.
    """

    chunk_count: int
    channels: int
    frames: int  # latent frames per chunk (T)
    height: int  # latent height
    width: int  # latent width
    history: int  # history window frames (H = sum(history_sizes))
    tokens: int  # transformer tokens per chunk (the pipeline's image_seq_len, for mu)
    seed: int

    @property
    def chunk_size(self) -> int:
        return self.channels * self.frames * self.height * self.width

    @property
    def window_frames(self) -> int:
        return max(self.history, self.frames)

    @property
    def window_size(self) -> int:
        return self.channels * self.window_frames * self.height * self.width

    @property
    def prefix_size(self) -> int:
        return self.channels * self.height * self.width

    @property
    def size(self) -> int:
        return HEADER_SIZE + self.chunk_size + self.window_size + self.prefix_size

    def chunk_shape(self, batch: int) -> tuple[int, int, int, int, int]:
        return batch, self.channels, self.frames, self.height, self.width

    def header(self, batch: int, chunk: int, local_step: int, timestep: float, device) -> torch.Tensor:
        values = [0.0] * HEADER_SIZE
        values[_MARKER], values[_CHUNKS], values[_CHUNK], values[_LOCAL_STEP] = (HEADER_MARKER, self.chunk_count,
                                                                                  chunk, local_step)
        values[_CHANNELS], values[_FRAMES], values[_HEIGHT], values[_WIDTH] = (self.channels, self.frames,
                                                                                self.height, self.width)
        values[_HISTORY], values[_TOKENS] = self.history, self.tokens
        values[_TIMESTEP] = _split_float64(timestep)
        values[_SEED] = _seed_parts(self.seed)
        header = torch.tensor(values, dtype=torch.float32)
        if any(float(stored) != value for stored, value in zip(header.tolist(), values)):
            raise ValueError(f"Helios header values are not exact in float32: {values}")
        return header.to(device).expand(batch, -1)

    @staticmethod
    def read(packed: torch.Tensor) -> tuple["HeliosLayout", int, int, float]:
        """(layout, current chunk, steps done in it, next timestep) from packed latents; checks they fit."""
        if packed.ndim != 2 or packed.shape[1] < HEADER_SIZE:
            raise ValueError(f"Helios latents are packed (batch, values), got shape {tuple(packed.shape)}")
        head = packed[:, :HEADER_SIZE]
        values = head[0].tolist()
        if values[_MARKER] != HEADER_MARKER or (head != head[:1]).any():
            raise ValueError("not Helios packed latents (header marker missing or differing across the batch)")
        seed = 0
        for part in values[_SEED]:
            seed = seed << 16 | int(part)
        layout = HeliosLayout(chunk_count=int(values[_CHUNKS]), channels=int(values[_CHANNELS]),
                              frames=int(values[_FRAMES]), height=int(values[_HEIGHT]), width=int(values[_WIDTH]),
                              history=int(values[_HISTORY]), tokens=int(values[_TOKENS]), seed=seed)
        if layout.size != packed.shape[1]:
            raise ValueError(f"Helios latents of {packed.shape[1]} values do not fit their header ({layout})")
        a, b, c = values[_TIMESTEP]
        return layout, int(values[_CHUNK]), int(values[_LOCAL_STEP]), (a + b) + c

    def _part(self, packed: torch.Tensor, start: int, frames: int) -> torch.Tensor:
        size = self.channels * frames * self.height * self.width
        return packed[:, start:start + size].reshape(packed.shape[0], self.channels, frames, self.height, self.width)

    def current(self, packed: torch.Tensor) -> torch.Tensor:
        return self._part(packed, HEADER_SIZE, self.frames)

    def window(self, packed: torch.Tensor) -> torch.Tensor:
        """The latest max(H, T) latent frames."""
        return self._part(packed, HEADER_SIZE + self.chunk_size, self.window_frames)

    def history_window(self, packed: torch.Tensor) -> torch.Tensor:
        """The H frames the transformer reads (HeliosPipeline's ``history_latents[:, :, -H:]``)."""
        return self.window(packed)[:, :, self.window_frames - self.history:]

    def prefix(self, packed: torch.Tensor) -> torch.Tensor:
        return self._part(packed, HEADER_SIZE + self.chunk_size + self.window_size, 1)

    def finished(self, packed: torch.Tensor) -> torch.Tensor:
        """The latest T frames: the chunk just finished, when read right after a rollover (steps done 0, chunk > 0)."""
        return self.window(packed)[:, :, self.window_frames - self.frames:]

    @staticmethod
    def pack(header: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
        batch = header.shape[0]
        return torch.cat([header, *(part.to(torch.float32).reshape(batch, -1) for part in parts)], dim=1)


def chunk_schedule(config: Mapping[str, Any], steps: int, tokens: int, device=None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (S,), sigmas (S + 1,)) of one chunk's run, exactly as HeliosPipeline sets its scheduler for every
    chunk: ``set_timesteps(S, sigmas=linspace(0.999, 0, S + 1)[:-1], mu=calculate_shift(tokens, ...))``."""
    scheduler = HeliosScheduler.from_config(config)
    config = scheduler.config
    mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    scheduler.set_timesteps(steps, device=device, sigmas=np.linspace(0.999, 0.0, steps + 1)[:-1], mu=mu)
    return scheduler.timesteps, scheduler.sigmas


# --------------------------------------------------------------------------------------------------
# The scheduler: K chunk runs of HeliosPipeline's scheduler, one after the other
# --------------------------------------------------------------------------------------------------

# HeliosScheduler's tables for HeliosPyramidPipeline's stages (dicts, which a checkpoint cannot carry). HeliosPipeline
# needs stages == 1 and never reads them.
_STAGE_TABLES = ("timestep_ratios", "timesteps_per_stage", "sigmas_per_stage", "start_sigmas", "end_sigmas",
                 "ori_start_sigmas")


class HeliosChunkScheduler(HeliosScheduler):
    """HeliosScheduler (same config, same per-chunk state: sigmas, UniPC's model outputs, last sample, order) driven
    over a job's K chunks as one schedule of K·S steps.

    ``set_timesteps(K·S)`` only records the total: the chunk geometry (K, the tokens that set ``mu``) is in the
    packed latents' header, so the chunk schedule is set up at the first ``step``; ``timesteps`` then holds the K runs
    one after the other (before that, placeholders: the loop's ``t`` is not used, see `HeliosDenoiser.predict`).
    ``step(velocity of the current chunk, t, packed latents)`` steps the current chunk as HeliosPipeline's scheduler
    steps it at its chunk-local index, rolls over at a chunk's last step, and returns the new packed latents.
    """

    @functools.wraps(HeliosScheduler.__init__)  # keeps the signature: ConfigMixin.from_config reads it
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.config.stages != 1:
            raise ValueError(f"HeliosPipeline needs a HeliosScheduler with stages=1, got stages={self.config.stages} "
                             "(HeliosPyramidPipeline's multi-stage schedule is not supported)")
        if self.config.scheduler_type not in ("unipc", "euler"):
            raise ValueError(f"HeliosScheduler type {self.config.scheduler_type!r} is not supported (unipc, euler)")
        for name in _STAGE_TABLES:
            delattr(self, name)
        self.total_steps: int | None = None
        self.steps_per_chunk: int | None = None
        self.chunk_timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self.this_order: int | None = None
        self.noise_generator_state: torch.Tensor | None = None  # the CPU generator after the last chunk's noise

    def set_timesteps(self, num_inference_steps: int, device=None, **kwargs) -> None:
        """Prepare a run of ``num_inference_steps`` = chunks × steps per chunk (HeliosPipeline's own arguments,
        sigmas and mu, are the same for every chunk and follow from the header: none are taken here)."""
        if kwargs.get("sigmas") is not None or kwargs.get("mu") is not None:
            raise ValueError("HeliosChunkScheduler sets HeliosPipeline's default sigmas and mu itself")
        self.reset_scheduler_history()
        self.total_steps = int(num_inference_steps)
        self.steps_per_chunk = self.chunk_timesteps = self.num_inference_steps = None
        self.noise_generator_state = None
        # Placeholders until the first step sets up the chunk schedule (filled in place, so a loop holding this
        # tensor reads the real timesteps from the second step on).
        self.timesteps = torch.full((self.total_steps,), float(self.config.num_train_timesteps), dtype=torch.float64,
                                    device=device)

    def _position(self) -> int:
        if self._step_index is not None:
            return self._step_index
        return self._begin_index or 0

    def _set_up(self, layout: HeliosLayout, device) -> None:
        """The chunk schedule, from the header: S = total / K, the pipeline's sigmas and mu for the chunk's tokens."""
        if self.total_steps is None:
            raise ValueError("call set_timesteps before step")
        if self.total_steps % layout.chunk_count:
            raise ValueError(f"{self.total_steps} steps do not divide into {layout.chunk_count} chunks")
        steps = self.total_steps // layout.chunk_count
        timesteps, sigmas = chunk_schedule(self.config, steps, layout.tokens, device)
        self.steps_per_chunk, self.chunk_timesteps, self.sigmas = steps, timesteps, sigmas
        self.num_inference_steps = steps
        laid_out = timesteps.repeat(layout.chunk_count).to(self.timesteps.device)
        if self.timesteps.dtype == laid_out.dtype and not (self.timesteps.is_inference()
                                                           and not torch.is_inference_mode_enabled()):
            self.timesteps.copy_(laid_out)
        else:
            self.timesteps = laid_out

    def step(self, model_output: torch.Tensor, timestep=None, sample: torch.Tensor = None, generator=None,
             return_dict: bool = True):
        layout, chunk, local, header_timestep = HeliosLayout.read(sample)
        position, begin = self._position(), self._begin_index
        if self.chunk_timesteps is None:
            self._set_up(layout, sample.device)
        steps = self.steps_per_chunk
        if divmod(position, steps) != (chunk, local):
            raise ValueError(f"the scheduler stands at step {position} (chunk {position // steps}, step "
                             f"{position % steps}), the latents at chunk {chunk}, step {local}")
        chunk_timestep = self.chunk_timesteps[local]
        if float(chunk_timestep) != header_timestep:  # what predict used: the schedule's own, bit for bit
            raise ValueError(f"the latents were predicted at timestep {header_timestep!r}, the schedule says "
                             f"{float(chunk_timestep)!r}")
        expected = layout.chunk_shape(sample.shape[0])
        if tuple(model_output.shape) != expected:
            raise ValueError(f"expected the current chunk's velocity {expected}, got {tuple(model_output.shape)}")

        # HeliosScheduler.step at the chunk-local index, on the chunk-local timesteps (its lower_order_final reads
        # their length), as the pipeline's per-chunk scheduler.
        global_timesteps = self.timesteps
        self.timesteps, self._step_index = self.chunk_timesteps, local
        try:
            latents = super().step(model_output, chunk_timestep, layout.current(sample).contiguous(),
                                   return_dict=False)[0]
        finally:
            self.timesteps = global_timesteps

        window, prefix = layout.window(sample), layout.prefix(sample)
        if local + 1 < steps:
            chunk_after, local_after, next_timestep = chunk, local + 1, float(self.chunk_timesteps[local + 1])
        else:  # the chunk is final: the window (so history and "finished") and the prefix take it; new noise comes in
            window = torch.cat([window, latents.to(window.dtype)], dim=2)[:, :, -layout.window_frames:]
            if chunk == 0:
                prefix = latents[:, :, :1]
            chunk_after, local_after = chunk + 1, 0
            if chunk_after < layout.chunk_count:
                latents = self._noise(layout, chunk_after, sample.shape[0]).to(sample.device)
                next_timestep = float(self.chunk_timesteps[0])
            else:
                latents, next_timestep = torch.zeros_like(latents), 0.0
            self.reset_scheduler_history()  # the pipeline's set_timesteps before each chunk
        self._step_index, self._begin_index = position + 1, begin
        header = layout.header(sample.shape[0], chunk_after, local_after, next_timestep, sample.device)
        packed = HeliosLayout.pack(header, latents, window, prefix)
        return HeliosSchedulerOutput(prev_sample=packed) if return_dict else (packed,)

    def _noise(self, layout: HeliosLayout, chunk: int, batch: int) -> torch.Tensor:
        """Chunk ``chunk``'s noise: the generator's (chunk + 1)-th draw, as HeliosPipeline.prepare_latents."""
        generator = torch.Generator("cpu")
        shape = layout.chunk_shape(batch)
        if self.noise_generator_state is None:  # re-seed and skip the draws of the chunks before
            generator.manual_seed(layout.seed)
            for _ in range(chunk):
                randn_tensor(shape, generator=generator, dtype=torch.float32)
        else:
            generator.set_state(self.noise_generator_state.cpu())
        noise = randn_tensor(shape, generator=generator, dtype=torch.float32)
        self.noise_generator_state = generator.get_state()
        return noise


# --------------------------------------------------------------------------------------------------
# The denoiser: one step of HeliosPipeline
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class HeliosDenoiser(Denoiser):
    transformer: HeliosTransformer3DModel
    scheduler_config: Mapping[str, Any]
    vae_config: Mapping[str, Any]  # z_dim and the scale factors: latents are sized without loading the VAE
    history_sizes: tuple[int, ...] = DEFAULT_HISTORY_SIZES
    latent_frames_per_chunk: int = DEFAULT_LATENT_FRAMES_PER_CHUNK
    scheduler_class: type = field(default=HeliosChunkScheduler)

    def __post_init__(self) -> None:
        # HeliosPipeline sorts them, long to short.
        self.history_sizes = tuple(sorted((int(size) for size in self.history_sizes), reverse=True))
        if len(self.history_sizes) != 3 or min(self.history_sizes) < 1:
            raise ValueError(f"Helios needs three positive history sizes (long, mid, short), got {self.history_sizes}")
        if self.latent_frames_per_chunk < 2:
            # A chunk of one latent frame decodes to one video frame: the pipeline's final cut to 4k+1 frames would
            # then reach into chunks already emitted.
            raise ValueError(f"Helios chunks need at least 2 latent frames, got {self.latent_frames_per_chunk}")

    @property
    def temporal_ratio(self) -> int:
        return self.vae_config["scale_factor_temporal"]

    @property
    def spatial_ratio(self) -> int:
        return self.vae_config["scale_factor_spatial"]

    @property
    def chunk_video_frames(self) -> int:
        """Video frames one chunk decodes to: HeliosPipeline's window_num_frames."""
        return (self.latent_frames_per_chunk - 1) * self.temporal_ratio + 1

    def chunk_count(self, num_frames: int) -> int:
        """HeliosPipeline's num_latent_chunk: enough chunks to cover num_frames."""
        window = self.chunk_video_frames
        return max(1, (int(num_frames) + window - 1) // window)

    def chunk_plan(self, width: int, height: int, num_frames: int, steps: int) -> tuple[int, int]:
        chunks = self.chunk_count(num_frames)
        return chunks, chunks * int(steps)

    def layout(self, width: int, height: int, num_frames: int, seed: int = 0) -> HeliosLayout:
        latent_height, latent_width = int(height) // self.spatial_ratio, int(width) // self.spatial_ratio
        frames = self.latent_frames_per_chunk
        p_t, p_h, p_w = self.transformer.config.patch_size
        return HeliosLayout(chunk_count=self.chunk_count(num_frames), channels=self.transformer.config.in_channels,
                            frames=frames, height=latent_height, width=latent_width, history=sum(self.history_sizes),
                            tokens=frames * latent_height * latent_width // (p_t * p_h * p_w), seed=int(seed))

    def layout_of(self, latents: torch.Tensor) -> tuple[HeliosLayout, int, int, float]:
        layout, chunk, local, timestep = HeliosLayout.read(latents)
        if layout.history != sum(self.history_sizes) or layout.frames != self.latent_frames_per_chunk:
            raise ValueError(f"latents packed for {layout.frames}-frame chunks and a {layout.history}-frame history; "
                             f"this model has {self.latent_frames_per_chunk} and {sum(self.history_sizes)}")
        return layout, chunk, local, timestep

    def latent_shape(self, width: int, height: int, num_frames: int, batch_size: int = 1) -> tuple[int, ...]:
        """(batch, packed size): the same for any num_frames (one chunk and the history window, never the video)."""
        return batch_size, self.layout(width, height, num_frames).size

    def prepare_latents(self, width: int, height: int, num_frames: int, seed: int, batch_size: int = 1, *,
                        fps: float | None = None) -> torch.Tensor:
        """Chunk 0's noise as HeliosPipeline draws it with ``generator=torch.Generator().manual_seed(seed)``, packed
        behind the header (zero window and prefix). ``fps`` does not matter to Helios."""
        layout = self.layout(width, height, num_frames, seed)
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = randn_tensor(layout.chunk_shape(batch_size), generator=generator, dtype=torch.float32)
        # The first timestep is sigma 0.999 shifted by mu, whatever the step count (the scheduler checks it agrees).
        first_timestep = float(chunk_schedule(self.scheduler_config, 1, layout.tokens)[0][0])
        header = layout.header(batch_size, 0, 0, first_timestep, "cpu")
        zeros = noise.new_zeros
        packed = HeliosLayout.pack(header, noise, zeros(layout.window_size * batch_size),
                                   zeros(layout.prefix_size * batch_size))
        return packed.to(self.device)

    @functools.cached_property
    def _indices(self) -> dict[str, torch.Tensor]:
        """HeliosPipeline's frame indices (keep_first_frame): prefix, long, mid, 1x history, then the chunk."""
        frames = self.latent_frames_per_chunk
        indices = torch.arange(0, sum([1, *self.history_sizes, frames]))
        prefix, long, mid, short_1x, hidden = indices.split([1, *self.history_sizes, frames], dim=0)
        return {"indices_hidden_states": hidden.unsqueeze(0),
                "indices_latents_history_short": torch.cat([prefix, short_1x], dim=0).unsqueeze(0),
                "indices_latents_history_mid": mid.unsqueeze(0),
                "indices_latents_history_long": long.unsqueeze(0)}

    def predict(self, latents, t, prompt_embeds, negative_prompt_embeds, guidance: Guidance, condition):
        """The current chunk's velocity, as HeliosPipeline's step: the transformer on the chunk and the history terms
        (two calls when guided). ``t`` is not used: the step's exact timestep is in the header (the loop's comes
        from a scheduler that learns the chunk geometry only at its first step)."""
        if guidance.scale_2 is not None:
            raise InvalidParamsError("Helios has one transformer: guidance_scale_2 does not apply")
        if condition:
            raise InvalidParamsError("this Helios model is text-to-video only: it takes no input image")
        layout, _, _, timestep = self.layout_of(latents)
        transformer = self.transformer
        dtype = transformer.dtype
        long, mid, short_1x = layout.history_window(latents).split(list(self.history_sizes), dim=2)
        short = torch.cat([layout.prefix(latents), short_1x], dim=2)
        timestep = torch.tensor(timestep, dtype=torch.float64, device=latents.device).expand(latents.shape[0])
        inputs = dict(hidden_states=layout.current(latents).to(dtype), timestep=timestep,
                      latents_history_short=short.to(dtype), latents_history_mid=mid.to(dtype),
                      latents_history_long=long.to(dtype), return_dict=False,
                      **{name: index.to(latents.device) for name, index in self._indices.items()})

        def run(embeds: torch.Tensor, label: str) -> torch.Tensor:
            with transformer.cache_context(label):
                return transformer(encoder_hidden_states=embeds, **inputs)[0]

        # Two calls when guided, as the pipeline, so results match bit for bit.
        noise_pred, noise_uncond = self.guided_passes(run, prompt_embeds, negative_prompt_embeds, guidance)
        if noise_uncond is not None:
            noise_pred = noise_uncond + guidance.scale * (noise_pred - noise_uncond)
        return noise_pred

    def context_parallel_plan(self, module: torch.nn.Module) -> dict:
        """diffusers' Helios plan names the gathers of blocks 0..39 (the released model's depth): a model of
        another depth gets the plan of the blocks it has."""
        depth = len(module.blocks)
        return {key: value for key, value in module._cp_plan.items()
                if not key.startswith("blocks.") or key.split(".")[1] == "*" or int(key.split(".")[1]) < depth}

    def finished_chunk(self, latents: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """(index, video latents (B, C, T, h, w)) of the chunk the step that made ``latents`` finished, else None.
        Normalised, as HeliosPipeline(output_type="latent") returns them (the decoder denormalises)."""
        layout, chunk, local, _ = self.layout_of(latents)
        if local != 0 or chunk == 0:
            return None
        return chunk - 1, layout.finished(latents).clone()  # its own storage: not a view pinning the packed latents

    def outputs(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The most recently finished chunk (after the last step: the last chunk), not the whole video: the packed
        latents never hold more than one finished chunk. The agent streams a Helios job's chunks with
        ``finished_chunk``, step by step."""
        layout, chunk, local, _ = self.layout_of(latents)
        if chunk == 0:
            raise ValueError("no Helios chunk has finished yet")
        return layout.finished(latents).clone(), {}


# --------------------------------------------------------------------------------------------------
# Decoding: each chunk on its own, as HeliosPipeline
# --------------------------------------------------------------------------------------------------


@dataclass
class HeliosDecodeState:
    num_frames: int  # the job's frames: the chunk that reaches them is cut there, and is the last
    frames_decoded: int = 0


class HeliosChunkDecoder:
    """HeliosPipeline's decode: every chunk through ``vae.decode`` alone (no cache carried between chunks), the
    frames concatenated and cut to the job's num_frames (the pipeline cuts to 4k+1; a job's num_frames is 4k+1 and
    at most that)."""

    def __init__(self, vae: AutoencoderKLWan) -> None:
        self.vae = vae

    def new_state(self, num_frames: int) -> HeliosDecodeState:
        """A job's state. ``num_frames``: the job's (its params'), which the decoder needs to cut the last chunk."""
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        return HeliosDecodeState(num_frames=num_frames)

    @torch.inference_mode()
    def decode_chunk(self, state: HeliosDecodeState, latent_chunk: torch.Tensor) -> np.ndarray:
        """One chunk's latents (1, C, T, h, w), normalised as `HeliosDenoiser.finished_chunk` gives them -> uint8
        frames (F, H, W, 3): 4(T-1) + 1 frames, fewer for the chunk that reaches the job's num_frames."""
        if latent_chunk.ndim != 5 or latent_chunk.shape[0] != 1:
            raise ValueError(f"decode_chunk takes one chunk's latents (1, C, T, h, w), got {tuple(latent_chunk.shape)}")
        remaining = state.num_frames - state.frames_decoded
        if remaining <= 0:
            raise ValueError(f"the job's {state.num_frames} frames are decoded already: a chunk too many")
        vae = self.vae
        device, z_dim = vae.post_quant_conv.weight.device, vae.config.z_dim
        # HeliosPipeline's denormalisation, op for op: x / (1 / std) + mean, in the VAE's dtype.
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(device, vae.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(device, vae.dtype)
        latents = latent_chunk.to(device).to(vae.dtype) / latents_std + latents_mean
        video = vae.decode(latents, return_dict=False)[0]
        frames = video_to_uint8(vae, video)[:remaining]
        state.frames_decoded += frames.shape[0]
        return frames


# --------------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------------


class HeliosFamily(T5TextSide, ModelFamily):
    name = "helios"
    parallel_modes = ("ulysses", "cfg")
    # A Helios chunk decodes alone and its frames are final (the pipeline decodes chunk by chunk itself); the agent
    # emits the model's own chunks (finished_chunk) as they finish, not cuts of a final latent.
    causal_decode = True

    pipeline_classes = ("HeliosPipeline",)
    recipes = _RECIPES

    # -- facts --------------------------------------------------------------------------------------

    def _configs(self, source) -> tuple[dict, dict]:
        if isinstance(source, HeliosRecipe):
            return dict(source.transformer_kwargs), _vae_config(source.vae_kwargs)
        return read_config(source, "transformer"), _vae_config(read_config(source, "vae"))

    def facts(self, model_id: str, source) -> ModelFacts:
        builtin = isinstance(source, HeliosRecipe)
        if not builtin:
            read_model_index(source)
            _read_scheduler_config(source)  # refuses what HeliosPipeline cannot run, before a job is accepted
        transformer, vae = self._configs(source)
        patch = transformer.get("patch_size", (1, 2, 2))
        rules = ParamRules(spatial_multiple=math.lcm(PIPELINE_SPATIAL_MULTIPLE, vae["scale_factor_spatial"] * patch[1],
                                                     vae["scale_factor_spatial"] * patch[2]),
                           temporal_multiple=vae["scale_factor_temporal"], max_frames=MAX_FRAMES)
        return ModelFacts(model_id=model_id, family=self.name, modalities=(T2V,), rules=rules,
                          streams_while_generating=True, source="built-in" if builtin else str(source),
                          description="" if builtin else "local Helios directory (HeliosPipeline)",
                          parallel_modes=self.parallel_modes)

    # -- denoiser and VAE ---------------------------------------------------------------------------

    def load_denoiser(self, source) -> HeliosDenoiser:
        if isinstance(source, HeliosRecipe):
            return HeliosDenoiser(
                transformer=build_seeded(lambda: HeliosTransformer3DModel(**source.transformer_kwargs), source.seed),
                scheduler_config=HeliosChunkScheduler(**source.scheduler_kwargs).config,
                vae_config=_vae_config(source.vae_kwargs), history_sizes=source.history_sizes,
                latent_frames_per_chunk=source.latent_frames_per_chunk)
        chunking = read_vidgen_file(source)
        return HeliosDenoiser(
            transformer=HeliosTransformer3DModel.from_pretrained(source, subfolder="transformer",
                                                                 local_files_only=True).eval(),
            scheduler_config=_load_scheduler_config(source), vae_config=_vae_config(read_config(source, "vae")),
            history_sizes=tuple(chunking.get("history_sizes", DEFAULT_HISTORY_SIZES)),
            latent_frames_per_chunk=int(chunking.get("num_latent_frames_per_chunk",
                                                     DEFAULT_LATENT_FRAMES_PER_CHUNK)))

    def load_vae(self, source) -> AutoencoderKLWan:
        if isinstance(source, HeliosRecipe):
            return build_seeded(lambda: AutoencoderKLWan(**source.vae_kwargs), source.seed)
        return AutoencoderKLWan.from_pretrained(source, subfolder="vae", local_files_only=True).eval()

    def chunk_decoder(self, vae: AutoencoderKLWan) -> HeliosChunkDecoder:
        return HeliosChunkDecoder(vae)

    def pipeline(self, text: TextEncoderParts, denoiser: HeliosDenoiser, vae: AutoencoderKLWan, image: bool = False):
        """HeliosPipeline over the same modules, with a plain HeliosScheduler of the same config. Call it with
        ``history_sizes=list(denoiser.history_sizes)`` and
        ``num_latent_frames_per_chunk=denoiser.latent_frames_per_chunk`` (its defaults, for the built-in model)."""
        if image:
            raise InvalidParamsError("Helios image-to-video is not supported (text-to-video only)")
        return HeliosPipeline(tokenizer=text.tokenizer, text_encoder=text.text_encoder, vae=vae,
                              scheduler=HeliosScheduler.from_config(denoiser.scheduler_config),
                              transformer=denoiser.transformer)


def _vae_config(vae: Mapping[str, Any]) -> dict:
    """The numbers latents are sized from, with AutoencoderKLWan's defaults."""
    return {"z_dim": vae.get("z_dim", 16), "scale_factor_temporal": vae.get("scale_factor_temporal", 4),
            "scale_factor_spatial": vae.get("scale_factor_spatial", 8)}


def _read_scheduler_config(model_dir: str) -> dict:
    """The directory's scheduler config, if HeliosPipeline can run it (HeliosScheduler, one stage, unipc or euler)."""
    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    name, stages = config.get("_class_name"), config.get("stages", 3)
    kind = config.get("scheduler_type", "unipc")
    if name != "HeliosScheduler":
        raise ValueError(f"{model_dir}: Helios with a {name} is not supported (HeliosScheduler is)")
    if stages != 1 or kind not in ("unipc", "euler"):
        raise ValueError(f"{model_dir}: HeliosPipeline needs a one-stage unipc or euler HeliosScheduler, the directory "
                         f"has stages={stages}, scheduler_type={kind!r} (HeliosPyramidPipeline is not supported)")
    return config


def _load_scheduler_config(model_dir: str) -> Mapping[str, Any]:
    _read_scheduler_config(model_dir)
    return HeliosChunkScheduler.from_config(
        HeliosScheduler.load_config(model_dir, subfolder="scheduler", local_files_only=True)).config


FAMILY = HeliosFamily()
