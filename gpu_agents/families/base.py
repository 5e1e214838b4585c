"""What a model family is: everything a stage needs to know about a kind of model, in one place.

A family module (gpu_agents/families/<name>.py) declares, for the models of one diffusers pipeline family:

1. **Where its models come from**: the tiny built-in variants (built in code with fixed seeds, nothing downloaded)
   and which local diffusers directories it claims (by their model_index.json);
2. **Its facts**: modalities (t2v, i2v, audio), whether it streams while generating, and its parameter rules (size
   and frame multiples, limits) — known without loading a weight, so the gateway, `vidgen submit` and
   `vidgen models` check against the same facts the GPU agent does;
3. **Its parts, loaded per stage**: the text encoder (prompt encoder), the denoiser (GPU agent) and the VAE
   (decoder, and the GPU agent for image conditioning);
4. **Its explicit denoising step** (`Denoiser.predict`): the model call(s) of one step, guidance included. The
   loop itself (gpu_agents/denoise.py) is shared, so progress, checkpoints, bit-identical resume, cancellation and
   preemption work the same for every family;
5. **Its decode**: a `ChunkDecoder` that turns the job's latent chunks, in order, into frames — causal chunk by
   chunk where that is exact, or whole then cut where it is not (`causal_decode`).

Stages talk to families only through these types (via gpu_agents/models.py's ModelCatalogue); none of them asks
which family a model belongs to.
"""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..model_facts import AUDIO, I2V, T2V, InvalidParamsError, ModelFacts, ParamRules  # noqa: F401 (re-exported)



# --------------------------------------------------------------------------------------------------
# Parts handed to the stages
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderParts:
    """What the text-encoding stage needs; ``family.encode_prompts(parts, prompts)`` turns prompts into embeddings."""

    tokenizer: PreTrainedTokenizerBase
    text_encoder: PreTrainedModel
    max_sequence_length: int
    # Two models with the same encoder_id produce identical prompt embeddings, so embeddings can be reused between
    # them (the tiny built-in models share one).
    encoder_id: str
    family: "ModelFamily" = field(compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance of one job: on when ``scale`` > 1. Two-expert models guide their second (low-noise)
    expert with ``scale_2``."""

    scale: float
    scale_2: float | None = None

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0


#: Constant inputs of a job besides its prompt (an encoded input image, masks), rebuilt from the job's inputs at
#: every start and resume (deterministically), so a checkpoint need not hold them.
Condition = Mapping[str, torch.Tensor]

#: One pass of the denoising model with the given text embeddings; the label names its cache context.
ModelPass = Callable[[torch.Tensor, str], torch.Tensor]


def local_passes(run: ModelPass, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A guided step's conditional and unconditional passes, one after the other on this device (no negative
    embeddings: the conditional pass alone)."""
    cond = run(prompt_embeds, "cond")
    return cond, None if negative_prompt_embeds is None else run(negative_prompt_embeds, "uncond")


class Denoiser(ABC):
    """A family's denoising model: one step's prediction, with the scheduler recipe and the latent geometry.

    The shared loop (gpu_agents/denoise.py) owns the scheduler and the step order; a Denoiser only says what the
    model predicts at timestep t. That split is what makes resume exact for every family: the loop's state is the
    latents plus the scheduler's, and nothing else changes from step to step.
    """

    transformer: torch.nn.Module  # the (first) denoising model: its device and dtype are the job's
    scheduler_class: type[SchedulerMixin]
    scheduler_config: Mapping[str, Any]

    #: How a guided step runs its two passes: one after the other here; a device group in CFG mode sets a runner that
    #: runs them on two ranks at once (gpu_agents/parallel.py). The same operations either way: the same numbers.
    passes: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = staticmethod(local_passes)

    def guided_passes(self, run: ModelPass, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None,
                      guidance: Guidance) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(conditional, unconditional or None) outputs of ``run`` for a step: both passes when guidance is on."""
        return self.passes(run, prompt_embeds, negative_prompt_embeds if guidance.enabled else None)

    def context_parallel_plan(self, module: torch.nn.Module) -> dict | None:
        """The diffusers context-parallel plan for one of ``modules()`` (None: the model class's own ``_cp_plan``)."""
        return None

    def new_scheduler(self) -> SchedulerMixin:
        """A fresh scheduler: schedulers carry per-run state, so every job needs its own."""
        return self.scheduler_class.from_config(self.scheduler_config)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def modules(self) -> list[torch.nn.Module]:
        """Every module to place on the agent's device."""
        return [self.transformer]

    @abstractmethod
    def latent_shape(self, width: int, height: int, num_frames: int, batch_size: int = 1) -> tuple[int, ...]:
        """The shape of the job's initial noise (batch first)."""

    def prepare_latents(self, width: int, height: int, num_frames: int, seed: int, batch_size: int = 1, *,
                        fps: float | None = None) -> torch.Tensor:
        """Initial noise, as the family's pipeline draws it with ``generator=torch.Generator().manual_seed(seed)``:
        always on the CPU generator (then moved), so a seed gives the same video on every machine.

        ``fps``: the job's frame rate, for families whose latents depend on it (LTX-2: the audio's length and the
        temporal positions); None means the family's default. Others ignore it."""
        generator = torch.Generator("cpu").manual_seed(seed)
        return randn_tensor(self.latent_shape(width, height, num_frames, batch_size), generator=generator,
                            device=self.device, dtype=torch.float32)

    def condition(self, image: Any, vae: torch.nn.Module, width: int, height: int, num_frames: int
                  ) -> Condition:
        """The job's constant inputs from its input image (a PIL image); families without image input refuse."""
        raise InvalidParamsError(f"{type(self).__name__} takes no input image")

    @abstractmethod
    def predict(self, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                negative_prompt_embeds: torch.Tensor | None, guidance: Guidance, condition: Condition | None
                ) -> torch.Tensor:
        """The model output the scheduler steps with, at timestep ``t`` (guidance applied).

        A family whose guidance needs the step's sigma (LTX-2 guides in x0 space) may return instead an object its
        own scheduler class (``scheduler_class``) finishes in ``step``; the loop only hands it over."""

    def chunk_plan(self, width: int, height: int, num_frames: int, steps: int) -> tuple[int | None, int]:
        """(chunk count, total denoising steps) of a job. A family that streams while generating denoises its video
        chunk after chunk, ``steps`` steps each: (chunks, chunks × steps), chunk k taking steps k·steps + 1 ..
        (k + 1)·steps. Others denoise the whole latent at once: (None, steps)."""
        return None, steps

    def finished_chunk(self, latents: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """After a step of a family that streams while generating, given the step's latents: (chunk index, that
        chunk's video latents (B, C, T, H, W), normalised as ``outputs`` gives video latents) when this very step
        finished the chunk, else None. Each chunk is reported once, by the step that finished it. Others: None."""
        return None

    def finish(self, latents: torch.Tensor, condition: Condition | None) -> torch.Tensor:
        """The final latents from the last step's (e.g. a conditioning frame put back in place)."""
        return latents

    def outputs(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Final latents -> (video latents (B, C, T, H, W) to cut into chunks, other outputs by name). A family that
        denoises more than video in one tensor (LTX-2: {"audio": audio latents}) separates them here."""
        return latents, {}


class ChunkDecoder(Protocol):
    """Turns a job's latent chunks, in order, into uint8 frames (F, H, W, 3), one job state per job.

    A state is a dataclass with a ``frames_decoded`` count; ``decode_chunk`` advances it only once the chunk has
    decoded (a chunk that raises can be retried on the same state), and callers may advance a
    ``dataclasses.replace`` copy to keep the old state until their own work has succeeded too.
    """

    def new_state(self, num_frames: int | None = None) -> Any:
        """A job's state before its first chunk; ``num_frames``: the job's requested frames (the decoder stage always
        passes it; a family whose chunks decode to more frames than asked cuts the last one)."""

    def decode_chunk(self, state: Any, latent_chunk: torch.Tensor) -> np.ndarray: ...


class AudioDecoder(Protocol):
    """What a family with AUDIO in its modalities adds to its ChunkDecoder: the ``"audio"`` output of
    ``Denoiser.outputs`` -> (waveform float32 (samples, channels) in [-1, 1], sample rate)."""

    def decode_audio(self, audio_latents: torch.Tensor) -> tuple[np.ndarray, int]: ...


# --------------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model: its family, and the family's recipe for it (built in code, fixed seeds)."""

    family: "ModelFamily"
    recipe: Any
    description: str = field(default="", compare=False)


#: Where a model's parts come from: a family recipe (built in) or a local diffusers directory (a str path).
Source = Any


class ModelFamily(ABC):
    """One diffusers pipeline family. Subclasses are stateless: the catalogue caches what they load."""

    name: str
    #: How a job of this family's models can run across several devices (ModelFacts.parallel_modes).
    parallel_modes: tuple[str, ...] = ()

    #: The diffusers pipeline classes (model_index.json `_class_name`) of the local directories this family serves.
    pipeline_classes: tuple[str, ...] = ()
    #: Built-in models: id → (recipe, description).
    recipes: Mapping[str, tuple[Any, str]] = {}

    def builtins(self) -> dict[str, BuiltinModel]:
        """The family's built-in models by id."""
        return {model_id: BuiltinModel(self, recipe, description)
                for model_id, (recipe, description) in self.recipes.items()}

    def claims(self, model_index: Mapping[str, Any]) -> bool:
        """Whether a local directory with this model_index.json is one of this family's."""
        return model_index.get("_class_name") in self.pipeline_classes

    @abstractmethod
    def facts(self, model_id: str, source: Source) -> ModelFacts:
        """What is known of the model without loading weights (reads config files at most)."""

    @abstractmethod
    def max_sequence_length(self, source: Source) -> int:
        """Text length prompts are padded/truncated to; cheap."""

    @abstractmethod
    def load_text_encoder(self, source: Source) -> TextEncoderParts: ...

    @abstractmethod
    def encode_prompts(self, parts: TextEncoderParts, prompts: list[str]) -> torch.Tensor:
        """(B, sequence, dim) prompt embeddings, exactly as the family's pipeline encodes them."""

    @abstractmethod
    def token_counts(self, parts: TextEncoderParts, prompts: list[str]) -> list[int]:
        """Tokens each prompt has before truncation, to tell which prompts encoding cuts."""

    @abstractmethod
    def load_denoiser(self, source: Source) -> Denoiser: ...

    @abstractmethod
    def load_vae(self, source: Source) -> torch.nn.Module: ...

    @abstractmethod
    def chunk_decoder(self, vae: torch.nn.Module) -> ChunkDecoder:
        """A decoder over ``vae`` for jobs' latent chunks."""

    #: Whether decoding chunk by chunk equals a one-shot decode; where not, the agent emits one chunk per job.
    causal_decode: bool = True

    @abstractmethod
    def pipeline(self, text: TextEncoderParts, denoiser: Denoiser, vae: torch.nn.Module, image: bool = False):
        """The family's diffusers pipeline over the same modules (a reference for tests and benchmarks)."""
