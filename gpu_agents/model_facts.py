"""What is known of a model without loading it, and the checks of a request against it — without torch.

The facts (modalities, whether it streams while generating, parameter rules) come from each family
(gpu_agents/families/) and ``ModelCatalogue.facts``; this module holds their types and the checks, so that a process
that only validates requests — the gateway — can hold a model description (``FactsCatalogue``, from
``vidgen models --json``: the same facts the agents compute) and check requests exactly as the prompt encoder and the
GPU agent do, without importing torch, diffusers or transformers.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

T2V, I2V, AUDIO = "t2v", "i2v", "audio"


class InvalidParamsError(ValueError):
    """Raised when generation parameters cannot be used with a model."""


# --------------------------------------------------------------------------------------------------
# Facts: what is known of a model without loading it
# --------------------------------------------------------------------------------------------------


def _require_int(name: str, value: Any) -> int:
    # bool is an int subclass; True as a frame count is a bug upstream, not a request for 1 frame.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParamsError(f"{name} must be an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ParamRules:
    """Which sizes, frame counts and step counts a model can generate.

    Pixel sides are multiples of ``spatial_multiple`` (VAE compression × transformer patch); frame counts have the
    form ``temporal_multiple``·k + 1 (the causal VAE keeps the first frame and compresses the rest).
    """

    spatial_multiple: int = 16
    temporal_multiple: int = 4
    max_side: int = 1920
    max_frames: int = 257
    max_steps: int = 1000

    def check(self, width: Any, height: Any, num_frames: Any, steps: Any, guidance_scale: Any) -> None:
        """Raise InvalidParamsError naming the first parameter the model cannot use as given.

        Unlike the diffusers pipelines, which silently round bad sizes, these are refused so the requester knows.
        """
        for name, value in (("width", width), ("height", height)):
            value = _require_int(name, value)
            if value <= 0 or value % self.spatial_multiple != 0:
                raise InvalidParamsError(f"{name} must be a positive multiple of {self.spatial_multiple}, got {value}")
            if value > self.max_side:
                raise InvalidParamsError(f"{name} must be at most {self.max_side} pixels, got {value}")
        num_frames = _require_int("num_frames", num_frames)
        m = self.temporal_multiple
        if num_frames < 1 or num_frames % m != 1 % m:
            raise InvalidParamsError(
                f"num_frames must have the form {m}k+1 (1, {m + 1}, {2 * m + 1}, ...), got {num_frames}")
        if num_frames > self.max_frames:
            raise InvalidParamsError(f"num_frames must be at most {self.max_frames}, got {num_frames}")
        steps = _require_int("steps", steps)
        if not 1 <= steps <= self.max_steps:
            raise InvalidParamsError(f"steps must be between 1 and {self.max_steps}, got {steps}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
            raise InvalidParamsError(f"guidance_scale must be a number, got {guidance_scale!r}")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise InvalidParamsError(f"guidance_scale must be finite and >= 0, got {guidance_scale}")

    def as_dict(self) -> dict:
        return {"spatial_multiple": self.spatial_multiple, "temporal_multiple": self.temporal_multiple,
                "max_side": self.max_side, "max_frames": self.max_frames, "max_steps": self.max_steps}


@dataclass(frozen=True)
class ModelFacts:
    """A model as `vidgen models` lists it and as requests are checked against it."""

    model_id: str
    family: str
    modalities: tuple[str, ...]  # T2V, I2V, AUDIO
    rules: ParamRules
    streams_while_generating: bool = False
    experts: int = 1  # denoising models switched by timestep (Wan 2.2 A14B: 2), each with its guidance scale
    source: str = "built-in"  # or the local directory
    description: str = ""
    #: How one job of this model can run across an agent group's devices (gpu_agents/parallel.py): "ulysses", "cfg";
    #: empty: on one device only.
    parallel_modes: tuple[str, ...] = ()

    @property
    def needs_image(self) -> bool:
        """Image-to-video only: a request without an input image cannot be generated."""
        return I2V in self.modalities and T2V not in self.modalities

    def check_image(self, has_image: bool) -> None:
        if has_image and I2V not in self.modalities:
            raise InvalidParamsError(f"model {self.model_id!r} is text-to-video only: it takes no input_reference")
        if not has_image and self.needs_image:
            raise InvalidParamsError(f"model {self.model_id!r} is image-to-video: it needs an input_reference image")

    def check_guidance_2(self, guidance_scale_2: Any) -> None:
        if guidance_scale_2 is None:
            return
        if self.experts < 2:
            raise InvalidParamsError(f"guidance_scale_2 guides a second expert; model {self.model_id!r} has one")
        if isinstance(guidance_scale_2, bool) or not isinstance(guidance_scale_2, numbers.Real) or \
                not math.isfinite(guidance_scale_2) or guidance_scale_2 < 0:
            raise InvalidParamsError(f"guidance_scale_2 must be a finite number >= 0, got {guidance_scale_2!r}")

    def as_dict(self) -> dict:
        return {"id": self.model_id, "family": self.family, "modalities": list(self.modalities),
                "streams_while_generating": self.streams_while_generating, "experts": self.experts,
                "parallel_modes": list(self.parallel_modes), "limits": self.rules.as_dict(),
                "source": self.source, "description": self.description}


class UnknownModelError(ValueError):
    """Raised for a model id that is neither built in nor mapped to a local directory."""


class InvalidRequestError(ValueError):
    """A request that cannot be generated (the message says why)."""


PRESETS = ("quality", "fast")
#: The longest prompt (and negative prompt) a request may carry, in characters.
MAX_PROMPT_CHARS = 10_000


def check_params(params: dict, catalogue) -> ModelFacts:
    """Raise InvalidParamsError (or UnknownModelError) naming what in a GenerationParams record cannot be generated;
    else the model's facts.

    The prompt encoder checks every request with it, and the GPU agent checks again what it is handed: a job on a
    generation topic may come from anywhere, and one with 10^9 steps would hold a GPU for good.
    """
    if not catalogue.known(params["model"]):
        known = ", ".join(catalogue.model_ids())
        raise UnknownModelError(f"unknown model {params['model']!r}; known ids: {known}, or the absolute path of a "
                                f"local model directory")
    try:
        facts = catalogue.facts(params["model"])
    except (OSError, ValueError) as exc:  # a directory that is not (or no longer) a model this platform serves
        raise UnknownModelError(f"model {params['model']!r} cannot be served: {exc}") from exc
    facts.rules.check(params["width"], params["height"], params["num_frames"], params["steps"],
                      params["guidance_scale"])
    facts.check_image(params.get("input_reference") is not None)
    facts.check_guidance_2(params.get("guidance_scale_2"))
    if not 1 <= params["fps"] <= 120:
        raise InvalidParamsError(f"fps must be within 1..120, got {params['fps']}")
    if params["preset"] not in PRESETS:
        raise InvalidParamsError(f"unknown preset {params['preset']!r}; presets: {', '.join(PRESETS)}")
    return facts


def check_request(request: dict, models) -> None:
    """Raise InvalidRequestError with the reason when a VideoRequested cannot be generated by ``models`` (a
    ModelCatalogue or a FactsCatalogue)."""
    if not request["prompt"].strip():
        raise InvalidRequestError("prompt is empty")
    for name in ("prompt", "negative_prompt"):
        if len(request[name]) > MAX_PROMPT_CHARS:
            raise InvalidRequestError(f"{name} has {len(request[name])} characters; the limit is {MAX_PROMPT_CHARS}")
    try:
        check_params(request["params"], models)
    except (InvalidParamsError, UnknownModelError) as exc:
        raise InvalidRequestError(str(exc)) from exc


def facts_from_dict(data: dict) -> ModelFacts:
    """Inverse of ``ModelFacts.as_dict`` (what ``vidgen models --json`` prints)."""
    return ModelFacts(model_id=data["id"], family=data["family"], modalities=tuple(data["modalities"]),
                      rules=ParamRules(**data["limits"]), streams_while_generating=data["streams_while_generating"],
                      experts=data.get("experts", 1), source=data.get("source", "built-in"),
                      description=data.get("description", ""), parallel_modes=tuple(data.get("parallel_modes", ())))


class FactsCatalogue:
    """A ModelCatalogue's facts without its families: ``known``, ``model_ids``, ``facts`` over a description (the
    dicts of ``vidgen models --json``). A model the description could not describe answers ``facts`` with the
    problem, as ModelCatalogue would."""

    def __init__(self, models: list[dict], problems: dict[str, str] | None = None):
        self._facts = {data["id"]: facts_from_dict(data) for data in models}
        self._problems = dict(problems or {})

    def model_ids(self) -> list[str]:
        return [*self._facts, *(m for m in self._problems if m not in self._facts)]

    def known(self, model_id: str) -> bool:
        return model_id in self._facts or model_id in self._problems

    def facts(self, model_id: str) -> ModelFacts:
        if model_id in self._problems:
            raise ValueError(self._problems[model_id])
        return self._facts[model_id]
