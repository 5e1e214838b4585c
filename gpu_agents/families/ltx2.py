"""The LTX-2 family: video and audio generated together, as diffusers' `LTX2Pipeline` does.

One transformer (`LTX2VideoTransformer3DModel`) denoises video latents and audio latents at once, with
audio-to-video and video-to-audio cross attention; the video decodes with `AutoencoderKLLTX2Video`, the audio with
`AutoencoderKLLTX2Audio` (latents -> mel spectrogram) and `LTX2Vocoder` (mel -> waveform). Text comes from a Gemma 3
encoder (the hidden states of every layer) through `LTX2TextConnectors`, which make one embedding for the video
stream and one for the audio stream.

How LTX-2 fits the shared parts (gpu_agents/denoise.py, checkpoint.py) without a change to them:

* **One latents tensor.** The denoising loop keeps one tensor and one scheduler. LTX-2's two latents are packed into
  one (B, N) float32 tensor: a small header (format marker, latent frames/height/width, audio latent frames, fps),
  then the video latents in the pipeline's packed token order, then the audio latents likewise. The pipeline's two
  schedulers (it deep-copies one for the audio) are configured identically: the same sigmas for any sequence length
  (``mu`` comes from the scheduler's config alone, not from the video size), and FlowMatchEuler's step is
  elementwise. So one scheduler stepping the concatenation gives the two schedulers' results bit for bit, and a
  checkpoint (latents + scheduler state) is a checkpoint of both. The header makes the tensor self-describing: its
  velocity is always 0, so it never changes, and `Ltx2Denoiser.outputs` cuts video and audio apart without the
  job's parameters. The job's fps goes in at `prepare_latents(..., fps=)`: it sets the audio length and the
  transformer's temporal positions.
* **Guidance in x0 space.** LTX2Pipeline converts the transformer's velocities to denoised predictions
  (x0 = x - sigma·v) with the step's sigma, applies classifier-free guidance there and converts back. Only the
  scheduler knows sigma exactly (sigma·1000 = t does not give sigma back bit for bit). So `Ltx2Denoiser.predict`
  returns an `Ltx2Prediction` (the velocities and the guidance scale), and the family's scheduler,
  `Ltx2EulerScheduler` (a FlowMatchEulerDiscreteScheduler with the same state), finishes the guidance with its own
  sigma and steps. Its ``set_timesteps(n)`` also sets LTX2Pipeline's sigmas (``linspace(1, 1/n, n)``) and ``mu``.
* **Connectors on the text side.** The prompt encoder stores one (B, seq, video_dim + audio_dim + 1) tensor per
  prompt: the connectors' video embedding, audio embedding and the attention mask they hand the transformer (0/1,
  in the last channel; LTX-2.0's connectors make it all ones). Storing Gemma's raw stacked hidden states instead
  would cost seq × hidden × (layers + 1) values per prompt (385 MB in bf16 for LTX-2's Gemma 3 12B at 1024 tokens;
  this is 16 MB). The pipeline runs the connectors once over the batch [negative, prompt]; here they run per
  prompt batch. On CPU the result is the same bit for bit (the tests check); a GPU may pick other kernels for
  other batch sizes (unchecked).

What the default `LTX2Pipeline(...)` call does per step, and so what is reproduced: one transformer call on the batch
[negative, prompt] (classifier-free guidance when guidance_scale > 1, same scale for audio), velocities -> x0, guided
x0 = x0_cond + (scale - 1)(x0_cond - x0_uncond), -> velocity, Euler step. Off by default and not supported here:
spatio-temporal guidance (stg_scale 0), modality-isolation guidance (modality_scale 1), guidance rescale (0),
cross-modality timesteps (use_cross_timestep False, LTX-2.0 behaviour), noise_scale/decode noise (0), prompt
enhancement. Decoding is one-shot (`causal_decode = False`): the LTX VAE has no exact chunk-by-chunk decode.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler, LTX2Pipeline,
                       LTX2VideoTransformer3DModel)
from diffusers.pipelines.ltx2 import vocoder as ltx2_vocoders
from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, ByT5Tokenizer, Gemma3TextConfig, Gemma3TextModel, PreTrainedModel

from .base import (AUDIO, T2V, Denoiser, Guidance, InvalidParamsError, ModelFacts, ModelFamily,
                   ParamRules, TextEncoderParts)
from .building import build_seeded, load_text_encoder, read_config, read_model_index, read_vidgen_file

# LTX2Pipeline's default `max_sequence_length`; used for local directories that do not say otherwise.
DEFAULT_MAX_SEQUENCE_LENGTH = 1024
# LTX2Pipeline.check_inputs: height and width must be multiples of 32, whatever the VAE.
PIPELINE_SPATIAL_MULTIPLE = 32
# LTX2Pipeline's default frame_rate: the fps of a job that does not say.
DEFAULT_FPS = 24.0

# The packed latents' header: [marker, latent frames, latent height, latent width, audio latent frames, fps, 0, 0].
HEADER_SIZE = 8
HEADER_MARKER = 2.0  # "LTX-2 packed latents, layout 1"


# --------------------------------------------------------------------------------------------------
# Recipes: the tiny built-in model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ltx2Recipe:
    """How a built-in LTX-2 model is built: constructor arguments (and a seed) per component."""

    transformer_kwargs: Mapping[str, Any]
    connectors_kwargs: Mapping[str, Any]
    vae_kwargs: Mapping[str, Any]
    audio_vae_kwargs: Mapping[str, Any]
    vocoder_kwargs: Mapping[str, Any]
    text_encoder_kwargs: Mapping[str, Any]
    scheduler_kwargs: Mapping[str, Any]
    max_sequence_length: int
    encoder_id: str
    seed: int = 0  # diffusers' tests build every component from seed 0
    # Non-trivial latent statistics (diffusers' tiny VAEs have mean 0, std 1), so that the tests see the
    # (de)normalisation the pipeline applies: drawn from this seed.
    latent_stats_seed: int | None = 1


# The tiny text side. diffusers' tests fetch hf-internal-testing/tiny-gemma3; it is built here from a small
# Gemma 3 text config instead (the pipeline reads only the hidden states of every layer, so the text model alone,
# without Gemma3ForConditionalGeneration's vision tower, gives the same embeddings). Its width must equal the
# connectors' (4 heads x 8 = 32): LTX-2.0's connectors keep the text encoder's width.
_TINY_TEXT_DIM = 32
_TINY_TEXT_LAYERS = 2
# ByT5Tokenizer needs no vocabulary file: 256 bytes + 3 special tokens + 125 extra ids.
_TINY_VOCAB_SIZE = 384
_TINY_TEXT_ENCODER_KWARGS = {
    "architectures": ["Gemma3TextModel"],  # saved into config.json; loading a directory picks the class from it
    "vocab_size": _TINY_VOCAB_SIZE,
    "hidden_size": _TINY_TEXT_DIM,
    "intermediate_size": 64,
    "num_hidden_layers": _TINY_TEXT_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "query_pre_attn_scalar": 8,
    "sliding_window": 64,
    "max_position_embeddings": 512,
    # ByT5's ids: pad 0, eos 1 (Gemma's bos id is ByT5's unk; the encoder never reads it).
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}

# Sizes from diffusers' tests/pipelines/ltx2/testing_utils.py (get_ltx2_dummy_components).
_TINY_TRANSFORMER_KWARGS = {
    "in_channels": 4, "out_channels": 4, "patch_size": 1, "patch_size_t": 1,
    "num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16,
    "audio_in_channels": 4, "audio_out_channels": 4, "audio_num_attention_heads": 2, "audio_attention_head_dim": 4,
    "audio_cross_attention_dim": 8, "num_layers": 2, "qk_norm": "rms_norm_across_heads",
    "caption_channels": _TINY_TEXT_DIM, "rope_double_precision": False, "rope_type": "split",
}
_TINY_CONNECTORS_KWARGS = {
    "caption_channels": _TINY_TEXT_DIM, "text_proj_in_factor": _TINY_TEXT_LAYERS + 1,
    "video_connector_num_attention_heads": 4, "video_connector_attention_head_dim": 8,
    "video_connector_num_layers": 1, "video_connector_num_learnable_registers": None,
    "audio_connector_num_attention_heads": 4, "audio_connector_attention_head_dim": 8,
    "audio_connector_num_layers": 1, "audio_connector_num_learnable_registers": None,
    "connector_rope_base_seq_len": 32, "rope_theta": 10000.0, "rope_double_precision": False,
    "causal_temporal_positioning": False, "rope_type": "split",
}
_TINY_VAE_KWARGS = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8,),
    "decoder_block_out_channels": (8,), "layers_per_block": (1,), "decoder_layers_per_block": (1, 1),
    "spatio_temporal_scaling": (True,), "decoder_spatio_temporal_scaling": (True,),
    "decoder_inject_noise": (False, False), "downsample_type": ("spatial",), "upsample_residual": (False,),
    "upsample_factor": (1,), "timestep_conditioning": False, "patch_size": 1, "patch_size_t": 1,
    "encoder_causal": True, "decoder_causal": False,
}
_TINY_AUDIO_VAE_KWARGS = {
    "base_channels": 4, "output_channels": 2, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": None,
    "in_channels": 2, "resolution": 32, "latent_channels": 2, "norm_type": "pixel", "causality_axis": "height",
    "dropout": 0.0, "mid_block_add_attention": False, "sample_rate": 16000, "mel_hop_length": 160, "is_causal": True,
    "mel_bins": 8,
}
# diffusers' tiny vocoder upsamples 2x2 = 4 samples per mel frame and calls that 16 kHz, so its audio would last
# 1/40 of the video. Here the upsampling (8·5·4 = 160 samples per 10 ms mel frame) matches the 16 kHz it declares,
# as the real vocoder's (6·5·2·2·2 = 240 per frame at 24 kHz) does: the audio lasts as long as the video.
_TINY_VOCODER_KWARGS = {
    "in_channels": 2 * 8,  # audio VAE output channels x mel bins
    "hidden_channels": 32, "out_channels": 2, "upsample_kernel_sizes": [16, 10, 8], "upsample_factors": [8, 5, 4],
    "resnet_kernel_sizes": [3], "resnet_dilations": [[1, 3, 5]], "leaky_relu_negative_slope": 0.1,
    "output_sampling_rate": 16000,
}

_RECIPES: dict[str, tuple[Ltx2Recipe, str]] = {
    "tiny-ltx2": (Ltx2Recipe(transformer_kwargs=_TINY_TRANSFORMER_KWARGS, connectors_kwargs=_TINY_CONNECTORS_KWARGS,
                             vae_kwargs=_TINY_VAE_KWARGS, audio_vae_kwargs=_TINY_AUDIO_VAE_KWARGS,
                             vocoder_kwargs=_TINY_VOCODER_KWARGS, text_encoder_kwargs=_TINY_TEXT_ENCODER_KWARGS,
                             scheduler_kwargs={}, max_sequence_length=32, encoder_id="builtin:tiny-ltx2-text"),
                  "LTX-2 layout (video + stereo 16 kHz audio, Gemma 3 text), ~38k-parameter transformer; random "
                  "weights, for tests and plumbing"),
}


# --------------------------------------------------------------------------------------------------
# Geometry: what the pipeline derives from width, height, num_frames and frame_rate
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ltx2Geometry:
    """The configuration numbers LTX2Pipeline sizes latents from (read from configs: nothing is loaded)."""

    spatial_ratio: int  # video VAE spatial compression
    temporal_ratio: int  # video VAE temporal compression
    latent_channels: int
    patch_size: int
    patch_size_t: int
    audio_sampling_rate: int  # of the mel spectrogram (the audio VAE's sample_rate)
    audio_hop_length: int
    audio_temporal_ratio: int
    audio_mel_ratio: int
    mel_bins: int
    audio_latent_channels: int

    def video_latent_size(self, width: int, height: int, num_frames: int) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width), as LTX2Pipeline.__call__ / prepare_latents."""
        return ((int(num_frames) - 1) // self.temporal_ratio + 1, int(height) // self.spatial_ratio,
                int(width) // self.spatial_ratio)

    def audio_latent_frames(self, num_frames: int, fps: float) -> int:
        """LTX2Pipeline's audio_num_frames: the video's duration in audio latent frames, rounded."""
        duration_s = num_frames / fps
        audio_latents_per_second = self.audio_sampling_rate / self.audio_hop_length / float(self.audio_temporal_ratio)
        return round(duration_s * audio_latents_per_second)

    @property
    def latent_mel_bins(self) -> int:
        return self.mel_bins // self.audio_mel_ratio


def _geometry(vae: Mapping[str, Any], audio_vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> Ltx2Geometry:
    """From the three configs (defaults filled in), as the modules compute their ratios."""
    scaling = sum(vae.get("spatio_temporal_scaling", (True, True, True, True)))
    spatial = vae.get("spatial_compression_ratio") or vae.get("patch_size", 4) * 2 ** scaling
    temporal = vae.get("temporal_compression_ratio") or vae.get("patch_size_t", 1) * 2 ** scaling
    return Ltx2Geometry(
        spatial_ratio=int(spatial), temporal_ratio=int(temporal), latent_channels=vae.get("latent_channels", 128),
        patch_size=transformer.get("patch_size", 1), patch_size_t=transformer.get("patch_size_t", 1),
        audio_sampling_rate=audio_vae.get("sample_rate", 16000), audio_hop_length=audio_vae.get("mel_hop_length", 160),
        # AutoencoderKLLTX2Audio hard-codes both (LATENT_DOWNSAMPLE_FACTOR).
        audio_temporal_ratio=4, audio_mel_ratio=4,
        mel_bins=audio_vae.get("mel_bins", 64), audio_latent_channels=audio_vae.get("latent_channels", 8))


@dataclass(frozen=True)
class Ltx2Layout:
    """Where video and audio sit in one job's packed latents (from its header)."""

    latent_frames: int
    latent_height: int
    latent_width: int
    audio_frames: int
    fps: float
    video_tokens: int
    video_dim: int
    audio_dim: int

    @property
    def video_size(self) -> int:
        return self.video_tokens * self.video_dim

    @property
    def audio_size(self) -> int:
        return self.audio_frames * self.audio_dim

    @property
    def size(self) -> int:
        return HEADER_SIZE + self.video_size + self.audio_size

    def header(self, batch_size: int, device) -> torch.Tensor:
        # float32 holds these exactly (the platform's fps is an integer).
        values = [HEADER_MARKER, self.latent_frames, self.latent_height, self.latent_width, self.audio_frames,
                  self.fps, 0.0, 0.0]
        return torch.tensor(values, dtype=torch.float32, device=device).expand(batch_size, -1)

    def split(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed (B, N) -> (video tokens (B, S, C), audio tokens (B, L, C·M)), views."""
        batch = packed.shape[0]
        video = packed[:, HEADER_SIZE:HEADER_SIZE + self.video_size].view(batch, self.video_tokens, self.video_dim)
        audio = packed[:, HEADER_SIZE + self.video_size:].view(batch, self.audio_frames, self.audio_dim)
        return video, audio


# --------------------------------------------------------------------------------------------------
# The scheduler: LTX2Pipeline's sigmas, and its guidance in x0 space with the step's exact sigma
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Ltx2Prediction:
    """What `Ltx2Denoiser.predict` returns for `Ltx2EulerScheduler.step`: the transformer's velocities over the
    packed latents (header entries 0), for the prompt and, when guided, for the negative prompt."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    scale: float  # the guidance scale (video and audio alike, as the pipeline's default)


class Ltx2EulerScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler as LTX2Pipeline drives it; the same state, so checkpoints capture it alike.

    * ``set_timesteps(n)`` without sigmas sets the pipeline's: ``linspace(1, 1/n, n)`` with ``mu`` from the config
      (calculate_shift at max_image_seq_len, whatever the video's size);
    * ``step`` also takes an `Ltx2Prediction`: it converts the velocities to denoised predictions with this step's
      sigma, guides there and converts back, exactly as LTX2Pipeline.__call__, then steps. A plain velocity tensor
      steps as in the parent class.
    """

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if sigmas is None and timesteps is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
            num_inference_steps = None  # LTX2Pipeline passes the sigmas alone (retrieve_timesteps)
        if mu is None:
            config = self.config
            mu = calculate_shift(config.get("max_image_seq_len", 4096), config.get("base_image_seq_len", 1024),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.95),
                                 config.get("max_shift", 2.05))
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)

    def step(self, model_output, timestep, sample, *args, **kwargs):
        if isinstance(model_output, Ltx2Prediction):
            if self.step_index is None:
                self._init_step_index(timestep)
            model_output = self.guided_velocity(model_output, sample)
        return super().step(model_output, timestep, sample, *args, **kwargs)

    def guided_velocity(self, prediction: Ltx2Prediction, sample: torch.Tensor) -> torch.Tensor:
        """LTX2Pipeline's guidance, term for term (each an elementwise op, so packing video and audio together
        changes no bit): x0 = x - v·sigma; x0_cond + (scale - 1)(x0_cond - x0_uncond) (+ the STG and modality
        terms, 0 when off); back to (x - x0)/sigma."""
        sigma = self.sigmas[self.step_index]
        denoised = sample - prediction.cond * sigma
        if prediction.uncond is not None:
            denoised_uncond = sample - prediction.uncond * sigma
            cfg_delta = (prediction.scale - 1) * (denoised - denoised_uncond)
        else:
            cfg_delta = 0
        stg_delta = modality_delta = 0  # spatio-temporal and modality-isolation guidance: off (the defaults)
        guided = denoised + cfg_delta + stg_delta + modality_delta
        return (sample - guided) / sigma


# --------------------------------------------------------------------------------------------------
# The denoiser: one step of LTX2Pipeline
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Ltx2Denoiser(Denoiser):
    transformer: LTX2VideoTransformer3DModel
    scheduler_config: Mapping[str, Any]
    geometry: Ltx2Geometry
    text_dims: tuple[int, int]  # widths of the connectors' video and audio embeddings
    scheduler_class: type = field(default=Ltx2EulerScheduler)

    def layout(self, width: int, height: int, num_frames: int, fps: float | None = None) -> Ltx2Layout:
        fps = DEFAULT_FPS if fps is None else float(fps)
        frames, latent_height, latent_width = self.geometry.video_latent_size(width, height, num_frames)
        return self._layout(frames, latent_height, latent_width, self.geometry.audio_latent_frames(num_frames, fps),
                            fps)

    def _layout(self, frames: int, latent_height: int, latent_width: int, audio_frames: int, fps: float
                ) -> Ltx2Layout:
        g = self.geometry
        return Ltx2Layout(
            latent_frames=frames, latent_height=latent_height, latent_width=latent_width, audio_frames=audio_frames,
            fps=fps,
            video_tokens=(frames // g.patch_size_t) * (latent_height // g.patch_size) * (latent_width // g.patch_size),
            video_dim=g.latent_channels * g.patch_size_t * g.patch_size ** 2,
            audio_dim=g.audio_latent_channels * g.latent_mel_bins)

    def layout_of(self, latents: torch.Tensor) -> Ltx2Layout:
        """The layout a packed latents tensor's header says (and checks it fits the tensor)."""
        if latents.ndim != 2 or latents.shape[1] < HEADER_SIZE:
            raise ValueError(f"LTX-2 latents are packed (batch, values), got shape {tuple(latents.shape)}")
        header = latents[0, :HEADER_SIZE].tolist()
        if header[0] != HEADER_MARKER or (latents[:, :HEADER_SIZE] != latents[:1, :HEADER_SIZE]).any():
            raise ValueError("not LTX-2 packed latents (header marker missing or differing across the batch)")
        layout = self._layout(int(header[1]), int(header[2]), int(header[3]), int(header[4]), float(header[5]))
        if layout.size != latents.shape[1]:
            raise ValueError(f"LTX-2 latents of {latents.shape[1]} values do not fit their header ({layout})")
        return layout

    def latent_shape(self, width: int, height: int, num_frames: int, batch_size: int = 1, fps: float | None = None
                     ) -> tuple[int, ...]:
        return (batch_size, self.layout(width, height, num_frames, fps).size)

    def prepare_latents(self, width: int, height: int, num_frames: int, seed: int, batch_size: int = 1, *,
                        fps: float | None = None) -> torch.Tensor:
        """LTX2Pipeline's noise for ``generator=torch.Generator().manual_seed(seed)``: the video latents, then the
        audio latents, from one CPU generator, packed as the pipeline packs them, behind the header."""
        layout = self.layout(width, height, num_frames, fps)
        g = self.geometry
        generator = torch.Generator("cpu").manual_seed(seed)
        video = randn_tensor((batch_size, g.latent_channels, layout.latent_frames, layout.latent_height,
                              layout.latent_width), generator=generator, dtype=torch.float32)
        video = LTX2Pipeline._pack_latents(video, g.patch_size, g.patch_size_t)
        audio = randn_tensor((batch_size, g.audio_latent_channels, layout.audio_frames, g.latent_mel_bins),
                             generator=generator, dtype=torch.float32)
        audio = LTX2Pipeline._pack_audio_latents(audio)
        packed = torch.cat([layout.header(batch_size, "cpu"), video.flatten(1), audio.flatten(1)], dim=1)
        return packed.to(self.device)

    def split_prompt_embeds(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One stored prompt tensor -> (video embedding, audio embedding, attention mask (int64))."""
        video_dim, audio_dim = self.text_dims
        if embeds.shape[-1] != video_dim + audio_dim + 1:
            raise ValueError(f"LTX-2 prompt embeddings have {video_dim} + {audio_dim} + 1 (mask) channels, got "
                             f"{embeds.shape[-1]}: encoded for another model?")
        return (embeds[..., :video_dim], embeds[..., video_dim:video_dim + audio_dim],
                embeds[..., -1].round().to(torch.int64))

    def predict(self, latents, t, prompt_embeds, negative_prompt_embeds, guidance: Guidance, condition):
        if guidance.scale_2 is not None:
            raise InvalidParamsError("LTX-2 has one transformer: guidance_scale_2 does not apply")
        if condition:
            raise InvalidParamsError("this LTX-2 model is text-to-video only: it takes no input image")
        layout = self.layout_of(latents)
        transformer, batch = self.transformer, latents.shape[0]
        video, audio = layout.split(latents)
        video_embeds, audio_embeds, mask = self.split_prompt_embeds(prompt_embeds)
        video_coords = transformer.rope.prepare_video_coords(batch, layout.latent_frames, layout.latent_height,
                                                             layout.latent_width, latents.device, fps=layout.fps)
        audio_coords = transformer.audio_rope.prepare_audio_coords(batch, layout.audio_frames, latents.device)
        if guidance.enabled:  # one call on the batch [negative, prompt], as the pipeline
            negative_video, negative_audio, negative_mask = self.split_prompt_embeds(negative_prompt_embeds)
            video_embeds = torch.cat([negative_video, video_embeds])
            audio_embeds = torch.cat([negative_audio, audio_embeds])
            mask = torch.cat([negative_mask, mask])
            video, audio = torch.cat([video] * 2), torch.cat([audio] * 2)
            video_coords = video_coords.repeat((2,) + (1,) * (video_coords.ndim - 1))
            audio_coords = audio_coords.repeat((2,) + (1,) * (audio_coords.ndim - 1))
        dtype = video_embeds.dtype
        timestep = t.expand(video.shape[0])
        with transformer.cache_context("cond_uncond"):
            velocity, audio_velocity = transformer(
                hidden_states=video.to(dtype), audio_hidden_states=audio.to(dtype),
                encoder_hidden_states=video_embeds, audio_encoder_hidden_states=audio_embeds,
                timestep=timestep, sigma=timestep, encoder_attention_mask=mask, audio_encoder_attention_mask=mask,
                num_frames=layout.latent_frames, height=layout.latent_height, width=layout.latent_width,
                fps=layout.fps, audio_num_frames=layout.audio_frames, video_coords=video_coords,
                audio_coords=audio_coords, isolate_modalities=False, spatio_temporal_guidance_blocks=None,
                perturbation_mask=None, use_cross_timestep=False, attention_kwargs=None, return_dict=False)
        packed = self._pack(velocity.float(), audio_velocity.float())
        if guidance.enabled:
            uncond, cond = packed.chunk(2)
            return Ltx2Prediction(cond=cond, uncond=uncond, scale=guidance.scale)
        return Ltx2Prediction(cond=packed, uncond=None, scale=guidance.scale)

    @staticmethod
    def _pack(video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        header = video.new_zeros(video.shape[0], HEADER_SIZE)  # the header's velocity: it never changes
        return torch.cat([header, video.flatten(1), audio.flatten(1)], dim=1)

    def outputs(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Final packed latents -> (video latents (B, C, F, H, W), {"audio": (B, C, L, M)}), both normalised as the
        transformer sees them (the decoder denormalises, as the pipeline does before its VAEs)."""
        layout, g = self.layout_of(latents), self.geometry
        video, audio = layout.split(latents)
        video = LTX2Pipeline._unpack_latents(video, layout.latent_frames, layout.latent_height, layout.latent_width,
                                             g.patch_size, g.patch_size_t)
        audio = LTX2Pipeline._unpack_audio_latents(audio, layout.audio_frames, num_mel_bins=g.latent_mel_bins)
        return video.contiguous(), {"audio": audio.contiguous()}


# --------------------------------------------------------------------------------------------------
# Text and VAE containers (one module per stage part, so the catalogue places them like any other)
# --------------------------------------------------------------------------------------------------


class Ltx2TextEncoder(torch.nn.Module):
    """Gemma 3 (all hidden states) and the LTX-2 text connectors: what the prompt-encoding stage runs."""

    def __init__(self, gemma: PreTrainedModel, connectors: LTX2TextConnectors) -> None:
        super().__init__()
        self.gemma = gemma
        self.connectors = connectors
        self.eval()  # a new Module trains; its parts come in eval mode and must stay so

    @property
    def device(self) -> torch.device:
        return self.gemma.device

    @property
    def dtype(self) -> torch.dtype:
        return self.gemma.dtype


class Ltx2Vaes(torch.nn.Module):
    """The decoding side: video VAE, audio VAE and vocoder."""

    def __init__(self, video: AutoencoderKLLTX2Video, audio: AutoencoderKLLTX2Audio, vocoder: torch.nn.Module) -> None:
        super().__init__()
        self.video = video
        self.audio = audio
        self.vocoder = vocoder
        self.eval()


@dataclass
class Ltx2DecodeState:
    frames_decoded: int = 0


class Ltx2Decoder:
    """One-shot decoding (the LTX VAE has no exact chunked decode, so a job's latent is one chunk), plus its audio."""

    def __init__(self, vaes: Ltx2Vaes) -> None:
        self.vaes = vaes

    def new_state(self, num_frames: int | None = None) -> Ltx2DecodeState:
        return Ltx2DecodeState()

    @torch.inference_mode()
    def decode_chunk(self, state: Ltx2DecodeState, latent_chunk: torch.Tensor) -> np.ndarray:
        """The whole video latent (1, C, F, h, w), normalised -> uint8 frames (F', H, W, 3), as LTX2Pipeline with
        output_type="np" then rounded like gpu_agents.video.video_to_uint8. One chunk per job."""
        if state.frames_decoded:
            raise ValueError("LTX-2 decodes a job's whole latent at once: a second chunk for the same job")
        if latent_chunk.ndim != 5 or latent_chunk.shape[0] != 1:
            raise ValueError(f"decode_chunk takes one video's latents (1, C, F, h, w), got {tuple(latent_chunk.shape)}")
        vae = self.vaes.video
        latents = latent_chunk.to(vae.device)
        if vae.config.timestep_conditioning:
            # The pipeline mixes in decode noise with decode_noise_scale = decode_timestep = 0: (1 - 0)·x + 0·noise
            # is x, so only the timestep remains.
            timestep = torch.tensor([0.0], device=latents.device, dtype=latents.dtype)
        else:
            timestep = None
        latents = LTX2Pipeline._denormalize_latents(latents, vae.latents_mean, vae.latents_std,
                                                    vae.config.scaling_factor).to(vae.dtype)
        video = vae.decode(latents, timestep, return_dict=False)[0]
        frames = VideoProcessor(vae_scale_factor=vae.spatial_compression_ratio).postprocess_video(
            video, output_type="np")[0]
        frames = (frames * 255).round().astype(np.uint8)
        state.frames_decoded += frames.shape[0]
        return frames

    @torch.inference_mode()
    def decode_audio(self, audio_latents: torch.Tensor) -> tuple[np.ndarray, int]:
        """Audio latents (1, C, L, M), normalised, as `Ltx2Denoiser.outputs` gives them -> (waveform float32
        (samples, channels) in [-1, 1], sample rate), through the audio VAE and vocoder as LTX2Pipeline."""
        if audio_latents.ndim != 4 or audio_latents.shape[0] != 1:
            raise ValueError(f"decode_audio takes one video's audio latents (1, C, L, M), got "
                             f"{tuple(audio_latents.shape)}")
        audio_vae, vocoder = self.vaes.audio, self.vaes.vocoder
        _, _, frames, mel_bins = audio_latents.shape
        latents = LTX2Pipeline._pack_audio_latents(audio_latents.to(audio_vae.device))
        latents = LTX2Pipeline._denormalize_audio_latents(latents, audio_vae.latents_mean, audio_vae.latents_std)
        latents = LTX2Pipeline._unpack_audio_latents(latents, frames, num_mel_bins=mel_bins).to(audio_vae.dtype)
        mel = audio_vae.decode(latents, return_dict=False)[0]
        waveform = vocoder(mel)[0]  # (channels, samples)
        return waveform.float().cpu().numpy().T.copy(), int(vocoder.config.output_sampling_rate)


# --------------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------------


class Ltx2Family(ModelFamily):
    name = "ltx2"
    # Ulysses: diffusers' LTX-2 plan splits "interleaved" rotary embeddings only (this family's are "split": the
    # shapes disagree); CFG: the pipeline runs both passes as one batch, which two ranks would not reproduce.
    parallel_modes = ()
    causal_decode = False

    pipeline_classes = ("LTX2Pipeline",)
    recipes = _RECIPES

    # -- facts --------------------------------------------------------------------------------------

    def _configs(self, source) -> tuple[dict, dict, dict]:
        if isinstance(source, Ltx2Recipe):
            return dict(source.vae_kwargs), dict(source.audio_vae_kwargs), dict(source.transformer_kwargs)
        return read_config(source, "vae"), read_config(source, "audio_vae"), read_config(source, "transformer")

    def facts(self, model_id: str, source) -> ModelFacts:
        builtin = isinstance(source, Ltx2Recipe)
        if not builtin:
            read_model_index(source)
        g = _geometry(*self._configs(source))
        rules = ParamRules(spatial_multiple=math.lcm(PIPELINE_SPATIAL_MULTIPLE, g.spatial_ratio * g.patch_size),
                           temporal_multiple=g.temporal_ratio * g.patch_size_t)
        return ModelFacts(model_id=model_id, family=self.name, modalities=(T2V, AUDIO), rules=rules,
                          source="built-in" if builtin else str(source),
                          description="" if builtin else "local LTX-2 directory (LTX2Pipeline)")

    def max_sequence_length(self, source) -> int:
        if isinstance(source, Ltx2Recipe):
            return source.max_sequence_length
        return int(read_vidgen_file(source).get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))

    # -- text ---------------------------------------------------------------------------------------

    def load_text_encoder(self, source) -> TextEncoderParts:
        length = self.max_sequence_length(source)
        if isinstance(source, Ltx2Recipe):
            config = Gemma3TextConfig(**source.text_encoder_kwargs)
            gemma = build_seeded(lambda: Gemma3TextModel(config), source.seed)
            connectors = build_seeded(lambda: LTX2TextConnectors(**source.connectors_kwargs), source.seed)
            # ByT5Tokenizer: byte-level, needs no vocabulary file, and takes the pipeline's tokenizer calls.
            tokenizer = ByT5Tokenizer(model_max_length=length)
            encoder_id = f"{source.encoder_id}@{length}"
        else:
            tokenizer = AutoTokenizer.from_pretrained(os.path.join(source, "tokenizer"), local_files_only=True)
            gemma = load_text_encoder(source)
            connectors = LTX2TextConnectors.from_pretrained(source, subfolder="connectors",
                                                            local_files_only=True).eval()
            encoder_id = f"dir:{os.path.abspath(source)}@{length}"
        # What LTX2Pipeline._get_gemma_prompt_embeds sets: Gemma pads on the left.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return TextEncoderParts(tokenizer=tokenizer, text_encoder=Ltx2TextEncoder(gemma, connectors),
                                max_sequence_length=length, encoder_id=encoder_id, family=self)

    @torch.inference_mode()
    def encode_prompts(self, parts: TextEncoderParts, prompts: list[str]) -> torch.Tensor:
        """(B, max_sequence_length, video_dim + audio_dim + 1): the connectors' video and audio embeddings and their
        attention mask, from Gemma's hidden states of every layer, as LTX2Pipeline.encode_prompt + connectors."""
        encoder: Ltx2TextEncoder = parts.text_encoder
        inputs = parts.tokenizer([p.strip() for p in prompts], padding="max_length",
                                 max_length=parts.max_sequence_length, truncation=True, add_special_tokens=True,
                                 return_tensors="pt")
        input_ids = inputs.input_ids.to(encoder.device)
        attention_mask = inputs.attention_mask.to(encoder.device)
        outputs = encoder.gemma(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden_states = torch.stack(outputs.hidden_states, dim=-1).flatten(2, 3).to(dtype=encoder.dtype)
        video, audio, mask = encoder.connectors(hidden_states, attention_mask,
                                                padding_side=parts.tokenizer.padding_side)
        return torch.cat([video, audio, mask.to(video.dtype).unsqueeze(-1)], dim=-1)

    def token_counts(self, parts: TextEncoderParts, prompts: list[str]) -> list[int]:
        """Tokens each prompt has before truncation (special tokens included)."""
        ids = parts.tokenizer([p.strip() for p in prompts], add_special_tokens=True, truncation=False).input_ids
        return [len(token_ids) for token_ids in ids]

    # -- denoiser and VAEs --------------------------------------------------------------------------

    def load_denoiser(self, source) -> Ltx2Denoiser:
        if isinstance(source, Ltx2Recipe):
            transformer = build_seeded(lambda: LTX2VideoTransformer3DModel(**source.transformer_kwargs), source.seed)
            scheduler_config = Ltx2EulerScheduler(**source.scheduler_kwargs).config
            connectors = dict(source.connectors_kwargs)
        else:
            transformer = LTX2VideoTransformer3DModel.from_pretrained(source, subfolder="transformer",
                                                                      local_files_only=True).eval()
            scheduler_config = _load_scheduler_config(source)
            connectors = read_config(source, "connectors")
        vae, audio_vae, _ = self._configs(source)
        return Ltx2Denoiser(transformer=transformer, scheduler_config=scheduler_config,
                            geometry=_geometry(vae, audio_vae, dict(transformer.config)),
                            text_dims=_connector_dims(connectors))

    def load_vae(self, source) -> Ltx2Vaes:
        if isinstance(source, Ltx2Recipe):
            video = build_seeded(lambda: AutoencoderKLLTX2Video(**source.vae_kwargs), source.seed)
            audio = build_seeded(lambda: AutoencoderKLLTX2Audio(**source.audio_vae_kwargs), source.seed)
            vocoder = build_seeded(lambda: LTX2Vocoder(**source.vocoder_kwargs), source.seed)
            if source.latent_stats_seed is not None:
                _seed_latent_stats((video, audio), source.latent_stats_seed)
            return Ltx2Vaes(video, audio, vocoder)
        index = read_model_index(source)
        vocoder_class = getattr(ltx2_vocoders, (index.get("vocoder") or [None, "LTX2Vocoder"])[1])
        return Ltx2Vaes(
            AutoencoderKLLTX2Video.from_pretrained(source, subfolder="vae", local_files_only=True).eval(),
            AutoencoderKLLTX2Audio.from_pretrained(source, subfolder="audio_vae", local_files_only=True).eval(),
            vocoder_class.from_pretrained(source, subfolder="vocoder", local_files_only=True).eval())

    def chunk_decoder(self, vae: Ltx2Vaes) -> Ltx2Decoder:
        return Ltx2Decoder(vae)

    def pipeline(self, text: TextEncoderParts, denoiser: Ltx2Denoiser, vae: Ltx2Vaes, image: bool = False):
        if image:
            raise InvalidParamsError("LTX-2 image-to-video is not supported (text-to-video with audio only)")
        return LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(denoiser.scheduler_config),
                            vae=vae.video, audio_vae=vae.audio, text_encoder=text.text_encoder.gemma,
                            tokenizer=text.tokenizer, connectors=text.text_encoder.connectors,
                            transformer=denoiser.transformer, vocoder=vae.vocoder)


def _seed_latent_stats(vaes, seed: int) -> None:
    """Fill the VAEs' latents_mean / latents_std buffers (saved with the model) from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for vae in vaes:
            vae.latents_mean.copy_(torch.randn(vae.latents_mean.shape, generator=generator) * 0.1)
            vae.latents_std.copy_(torch.rand(vae.latents_std.shape, generator=generator) + 0.5)


def _connector_dims(config: Mapping[str, Any]) -> tuple[int, int]:
    """Widths of the connectors' video and audio outputs (each connector keeps its heads x head_dim)."""
    defaults = {"video_connector_num_attention_heads": 30, "video_connector_attention_head_dim": 128,
                "audio_connector_num_attention_heads": 30, "audio_connector_attention_head_dim": 128}
    config = {**defaults, **config}
    return (config["video_connector_num_attention_heads"] * config["video_connector_attention_head_dim"],
            config["audio_connector_num_attention_heads"] * config["audio_connector_attention_head_dim"])


def _load_scheduler_config(model_dir: str) -> Mapping[str, Any]:
    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json")) as f:
        name = json.load(f)["_class_name"]
    if name != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"{model_dir}: LTX-2 with a {name} is not supported (FlowMatchEulerDiscreteScheduler is)")
    return Ltx2EulerScheduler.from_config(
        FlowMatchEulerDiscreteScheduler.load_config(model_dir, subfolder="scheduler", local_files_only=True)).config


FAMILY = Ltx2Family()
