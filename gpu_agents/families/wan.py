"""The Wan family: Wan 2.1 text-to-video, Wan 2.2 A14B (two experts), Wan 2.2 TI2V-5B, and image-to-video.

diffusers runs all of them with `WanPipeline` / `WanImageToVideoPipeline`; what tells them apart is configuration,
and so it is here:

* **Wan 2.1** (T2V 1.3B/14B): one transformer, a 16-channel VAE (8× space, 4× time), patch 1×2×2;
* **Wan 2.2 A14B**: two transformers of the same shape, a high-noise expert (``transformer``) for timesteps at or
  above ``boundary_ratio`` × the scheduler's training timesteps and a low-noise expert (``transformer_2``) below it,
  each with its own guidance scale (``guidance_scale`` and ``guidance_scale_2``). The expert is a function of the
  timestep alone, so a checkpoint on either side of the switch resumes exactly (with UniPC's multistep history,
  which gpu_agents/checkpoint.py keeps);
* **Wan 2.2 TI2V-5B**: the 48-channel VAE with patch size 2 (16× space) and ``expand_timesteps``: one timestep per
  token, so an input image can be held fixed as the first latent frame (its tokens get timestep 0);
* **image-to-video** the A14B way: the transformer takes 36 channels, the noise (16) plus a condition (4 mask + 16
  latents of the input image followed by zeros, VAE-encoded). Wan 2.1 I2V's CLIP image encoder is not supported.

Decoding is causal chunk by chunk (gpu_agents/streaming_vae.py), exact for both VAEs: the 2.2 VAE's patchified
output is unpatchified per chunk, and the test suite checks it against a one-shot decode.
"""
from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.video_processor import VideoProcessor

from ..streaming_vae import CausalVaeDecoder
from .base import (I2V, T2V, Condition, Denoiser, Guidance, InvalidParamsError, ModelFacts,
                   ModelFamily, ParamRules, TextEncoderParts)
from .building import build_seeded, read_config, read_model_index
from .t5_text import TINY_T5_KWARGS, TINY_TEXT_DIM, T5TextSide


@dataclass(frozen=True)
class WanRecipe:
    """How a built-in Wan model is built: constructor arguments and the seed of each component."""

    transformer_kwargs: Mapping[str, Any]
    vae_kwargs: Mapping[str, Any]
    text_encoder_kwargs: Mapping[str, Any]
    scheduler_class: str
    scheduler_kwargs: Mapping[str, Any]
    max_sequence_length: int
    encoder_id: str
    transformer_2_kwargs: Mapping[str, Any] | None = None  # Wan 2.2 A14B's low-noise expert
    boundary_ratio: float | None = None
    expand_timesteps: bool = False  # Wan 2.2 TI2V-5B
    transformer_seed: int = 0
    transformer_2_seed: int = 1
    vae_seed: int = 0
    text_encoder_seed: int = 0


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

# Wan 2.2's VAE as diffusers' tests/pipelines/wan/test_wan_22.py builds it small: 48 channels, patch size 2.
_TINY_VAE_22_KWARGS = {
    "base_dim": 3,
    "z_dim": 48,
    "in_channels": 12,
    "out_channels": 12,
    "is_residual": True,
    "patch_size": 2,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "temperal_downsample": [False, True, True],
}

_TINY_TRANSFORMER_KWARGS = {
    "patch_size": (1, 2, 2),
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": TINY_TEXT_DIM,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    # Like real Wan, so rotary tables cover every size the parameter rules allow.
    "rope_max_seq_len": 1024,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "ffn_dim": 32,
    "num_layers": 2,
}

# Same sampler as diffusers' Wan tests; real Wan 2.1 ships UniPCMultistepScheduler with flow_shift=3.0.
_TINY_EULER = ("FlowMatchEulerDiscreteScheduler", {"shift": 7.0})
# Wan 2.2's sampler (and diffusers' Wan 2.2 tests'): a multistep solver whose history a checkpoint must carry.
_TINY_UNIPC = ("UniPCMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True,
                                           "flow_shift": 3.0})
_TINY_ENCODER = {"text_encoder_kwargs": TINY_T5_KWARGS, "max_sequence_length": 32,
                 "encoder_id": "builtin:tiny-t5"}


def _recipe(transformer: Mapping[str, Any], vae: Mapping[str, Any], scheduler: tuple[str, dict], **more) -> WanRecipe:
    return WanRecipe(transformer_kwargs=transformer, vae_kwargs=vae, scheduler_class=scheduler[0],
                     scheduler_kwargs=scheduler[1], **_TINY_ENCODER, **more)


_RECIPES: dict[str, tuple[WanRecipe, str]] = {
    "tiny-wan": (_recipe(_TINY_TRANSFORMER_KWARGS, _TINY_VAE_KWARGS, _TINY_EULER),
                 "Wan 2.1 layout, ~28k-parameter transformer; random weights, for tests and plumbing"),
    "tiny-wan-5m": (_recipe({**_TINY_TRANSFORMER_KWARGS, "num_attention_heads": 4, "attention_head_dim": 64,
                             "ffn_dim": 768, "num_layers": 5}, _TINY_VAE_KWARGS, _TINY_EULER),
                    "Wan 2.1 layout, ~5.3M-parameter transformer (~15 ms per CFG step at 64x64x17 on 2 CPU cores); "
                    "for benchmarks"),
    "tiny-wan2.2-a14b": (_recipe(_TINY_TRANSFORMER_KWARGS, _TINY_VAE_KWARGS, _TINY_UNIPC,
                                 transformer_2_kwargs=_TINY_TRANSFORMER_KWARGS, boundary_ratio=0.875),
                         "Wan 2.2 A14B layout: high- and low-noise experts switched at boundary_ratio 0.875, UniPC"),
    "tiny-wan2.2-i2v-a14b": (_recipe({**_TINY_TRANSFORMER_KWARGS, "in_channels": 36},
                                     _TINY_VAE_KWARGS, _TINY_UNIPC,
                                     transformer_2_kwargs={**_TINY_TRANSFORMER_KWARGS, "in_channels": 36},
                                     boundary_ratio=0.875),
                             "Wan 2.2 I2V A14B layout: image-to-video, two experts, UniPC"),
    "tiny-wan2.2-ti2v-5b": (_recipe({**_TINY_TRANSFORMER_KWARGS, "in_channels": 48, "out_channels": 48},
                                    _TINY_VAE_22_KWARGS, _TINY_UNIPC, expand_timesteps=True),
                            "Wan 2.2 TI2V-5B layout: 48-channel VAE with patch size 2 (16x space), per-token "
                            "timesteps; text- and image-to-video"),
}


# --------------------------------------------------------------------------------------------------
# The denoiser: one step of WanPipeline / WanImageToVideoPipeline
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class WanDenoiser(Denoiser):
    transformer: WanTransformer3DModel
    scheduler_class: type
    scheduler_config: Mapping[str, Any]
    vae_config: Mapping[str, Any]  # read from the VAE's config: the denoiser sizes latents without loading it
    transformer_2: WanTransformer3DModel | None = None
    boundary_ratio: float | None = None
    expand_timesteps: bool = False
    _boundary: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.boundary_ratio is not None:
            if self.transformer_2 is None:
                raise ValueError("a boundary_ratio needs a second (low-noise) transformer")
            self._boundary = self.boundary_ratio * self.scheduler_config["num_train_timesteps"]

    @property
    def vae_scale_factor_temporal(self) -> int:
        return self.vae_config["scale_factor_temporal"]

    @property
    def vae_scale_factor_spatial(self) -> int:
        return self.vae_config["scale_factor_spatial"]

    @property
    def image_to_video(self) -> bool:
        """Whether the transformer takes a concatenated image condition (Wan I2V: noise + mask + image latents)."""
        return self.transformer.config.in_channels != self.vae_config["z_dim"]

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.transformer, self.transformer_2) if m is not None]

    def latent_shape(self, width: int, height: int, num_frames: int, batch_size: int = 1) -> tuple[int, ...]:
        """(batch, channels, latent_frames, latent_height, latent_width), as the pipelines' prepare_latents."""
        return (batch_size, self.vae_config["z_dim"], (num_frames - 1) // self.vae_scale_factor_temporal + 1,
                int(height) // self.vae_scale_factor_spatial, int(width) // self.vae_scale_factor_spatial)

    def expert(self, t: torch.Tensor, guidance: Guidance) -> tuple[WanTransformer3DModel, float]:
        """The high-noise expert at or above the boundary (and always for one-transformer models), else the
        low-noise one, with its guidance scale."""
        if self._boundary is None or t >= self._boundary:
            return self.transformer, guidance.scale
        return self.transformer_2, guidance.scale if guidance.scale_2 is None else guidance.scale_2

    def predict(self, latents, t, prompt_embeds, negative_prompt_embeds, guidance, condition):
        model, scale = self.expert(t, guidance)
        dtype = self.transformer.dtype
        if self.expand_timesteps:
            # One timestep per token (patch 2×2): the image's first latent frame is held at timestep 0.
            mask = condition["first_frame_mask"] if condition else torch.ones(
                (1, 1, *latents.shape[2:]), dtype=torch.float32, device=latents.device)
            model_input = ((1 - mask) * condition["latents"] + mask * latents) if condition else latents
            timestep = (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(latents.shape[0], -1)
        else:
            model_input = torch.cat([latents, condition["latents"]], dim=1) if condition else latents
            timestep = t.expand(latents.shape[0])
        model_input = model_input.to(dtype)

        def run(embeds: torch.Tensor, label: str) -> torch.Tensor:
            with model.cache_context(label):
                return model(hidden_states=model_input, timestep=timestep, encoder_hidden_states=embeds,
                             return_dict=False)[0]

        # Two calls rather than one batch of two, exactly as the pipelines do, so results match bit for bit.
        noise_pred, noise_uncond = self.guided_passes(run, prompt_embeds, negative_prompt_embeds, guidance)
        if noise_uncond is not None:
            noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
        return noise_pred

    def finish(self, latents, condition):
        if self.expand_timesteps and condition:
            mask = condition["first_frame_mask"]
            return (1 - mask) * condition["latents"] + mask * latents
        return latents

    @torch.inference_mode()
    def condition(self, image, vae: AutoencoderKLWan, width: int, height: int, num_frames: int) -> Condition:
        """WanImageToVideoPipeline.prepare_latents' condition: the image, resized as the pipeline does, encoded by the
        VAE (the distribution's mode) and normalised; with its mask."""
        if not (self.image_to_video or self.expand_timesteps):
            raise InvalidParamsError("this Wan model is text-to-video only: it takes no input image")
        device = vae.post_quant_conv.weight.device
        pixels = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial).preprocess(
            image, height=height, width=width).to(device, dtype=torch.float32).unsqueeze(2)
        if not self.expand_timesteps:  # the image as the first of num_frames frames, the rest black
            pixels = torch.cat([pixels, pixels.new_zeros(pixels.shape[0], pixels.shape[1], num_frames - 1, height,
                                                         width)], dim=2)
        encoded = vae.encode(pixels.to(vae.dtype)).latent_dist.mode().to(torch.float32)  # sample_mode="argmax"
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(encoded.device, encoded.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(encoded.device,
                                                                                              encoded.dtype)
        encoded = ((encoded - mean) * inverse_std).to(self.device)
        _, _, latent_frames, latent_height, latent_width = self.latent_shape(width, height, num_frames)
        if self.expand_timesteps:
            mask = torch.ones(1, 1, latent_frames, latent_height, latent_width, dtype=torch.float32,
                              device=self.device)
            mask[:, :, 0] = 0
            return {"latents": encoded, "first_frame_mask": mask}
        # The pipeline's mask: 1 on the (temporally repeated) first frame, 0 elsewhere, folded into latent frames.
        temporal = self.vae_scale_factor_temporal
        mask = torch.ones(1, 1, num_frames, latent_height, latent_width)
        mask[:, :, list(range(1, num_frames))] = 0
        first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)
        mask = torch.concat([first, mask[:, :, 1:, :]], dim=2)
        mask = mask.view(1, -1, temporal, latent_height, latent_width).transpose(1, 2).to(encoded.device)
        return {"latents": torch.concat([mask, encoded], dim=1)}


# --------------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------------


class WanFamily(T5TextSide, ModelFamily):
    name = "wan"
    parallel_modes = ("ulysses", "cfg")
    causal_decode = True

    pipeline_classes = ("WanPipeline", "WanImageToVideoPipeline")
    recipes = _RECIPES

    # -- facts --------------------------------------------------------------------------------------

    def facts(self, model_id: str, source) -> ModelFacts:
        if isinstance(source, WanRecipe):
            transformer, vae, expand = source.transformer_kwargs, source.vae_kwargs, source.expand_timesteps
            experts = 1 if source.transformer_2_kwargs is None else 2
            description = ""
        else:
            index = read_model_index(source)
            if (index.get("image_encoder") or [None])[0] is not None:
                raise ValueError(f"model {model_id!r}: Wan 2.1 image-to-video with a CLIP image encoder is not "
                                 f"supported (Wan 2.2 I2V A14B and TI2V-5B are)")
            transformer = read_config(source, "transformer" if (index.get("transformer") or [None])[0] else
                                       "transformer_2")
            vae, expand = read_config(source, "vae"), bool(index.get("expand_timesteps"))
            experts = sum(1 for name in ("transformer", "transformer_2") if (index.get(name) or [None])[0])
            description = f"local Wan directory ({index.get('_class_name')})"
        z_dim = vae.get("z_dim", 16)
        if transformer.get("in_channels", z_dim) != z_dim:
            modalities = (I2V,)
        elif expand:
            modalities = (T2V, I2V)
        else:
            modalities = (T2V,)
        patch = transformer.get("patch_size", (1, 2, 2))
        rules = ParamRules(spatial_multiple=vae.get("scale_factor_spatial", 8) * patch[1],
                           temporal_multiple=vae.get("scale_factor_temporal", 4) * patch[0])
        return ModelFacts(model_id=model_id, family=self.name, modalities=modalities, rules=rules, experts=experts,
                          source="built-in" if isinstance(source, WanRecipe) else str(source),
                          description=description, parallel_modes=self.parallel_modes)

    # -- denoiser and VAE ---------------------------------------------------------------------------

    def load_denoiser(self, source) -> WanDenoiser:
        if isinstance(source, WanRecipe):
            scheduler_class = getattr(diffusers, source.scheduler_class)
            second = source.transformer_2_kwargs
            return WanDenoiser(
                transformer=build_seeded(lambda: WanTransformer3DModel(**source.transformer_kwargs),
                                         source.transformer_seed),
                transformer_2=None if second is None else build_seeded(lambda: WanTransformer3DModel(**second),
                                                                       source.transformer_2_seed),
                scheduler_class=scheduler_class, scheduler_config=scheduler_class(**source.scheduler_kwargs).config,
                vae_config=_vae_config(source),
                boundary_ratio=source.boundary_ratio, expand_timesteps=source.expand_timesteps)
        index = read_model_index(source)
        experts = [WanTransformer3DModel.from_pretrained(source, subfolder=name, local_files_only=True).eval()
                   if (index.get(name) or [None])[0] else None for name in ("transformer", "transformer_2")]
        if experts[0] is None:
            raise ValueError(f"{source}: a Wan directory without `transformer` (boundary_ratio 1.0) is not supported")
        scheduler_class, scheduler_config = _load_scheduler_recipe(source)
        return WanDenoiser(transformer=experts[0], transformer_2=experts[1], scheduler_class=scheduler_class,
                           scheduler_config=scheduler_config,
                           vae_config=AutoencoderKLWan.load_config(source, subfolder="vae", local_files_only=True),
                           boundary_ratio=index.get("boundary_ratio"),
                           expand_timesteps=bool(index.get("expand_timesteps")))

    def load_vae(self, source) -> AutoencoderKLWan:
        if isinstance(source, WanRecipe):
            return build_seeded(lambda: AutoencoderKLWan(**source.vae_kwargs), source.vae_seed)
        return AutoencoderKLWan.from_pretrained(source, subfolder="vae", local_files_only=True).eval()

    def chunk_decoder(self, vae: AutoencoderKLWan) -> CausalVaeDecoder:
        return CausalVaeDecoder(vae)

    def pipeline(self, text: TextEncoderParts, denoiser: WanDenoiser, vae: AutoencoderKLWan, image: bool = False):
        pipeline_class = WanPipeline
        if image:
            # Imported here: the module pulls in CLIP's image processor (and warns without torchvision).
            from diffusers import WanImageToVideoPipeline as pipeline_class
        return pipeline_class(tokenizer=text.tokenizer, text_encoder=text.text_encoder, vae=vae,
                              scheduler=denoiser.new_scheduler(), transformer=denoiser.transformer,
                              transformer_2=denoiser.transformer_2, boundary_ratio=denoiser.boundary_ratio,
                              expand_timesteps=denoiser.expand_timesteps)


def _vae_config(recipe: WanRecipe) -> dict:
    """The VAE config a recipe's VAE will have (its defaults included), without building the VAE."""
    defaults = {name: parameter.default for name, parameter in
                inspect.signature(AutoencoderKLWan.__init__).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    return {**defaults, **recipe.vae_kwargs}


def _load_scheduler_recipe(model_dir: str) -> tuple[type, Mapping[str, Any]]:
    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json")) as f:
        scheduler_class = getattr(diffusers, json.load(f)["_class_name"])
    return scheduler_class, scheduler_class.load_config(model_dir, subfolder="scheduler", local_files_only=True)


FAMILY = WanFamily()
