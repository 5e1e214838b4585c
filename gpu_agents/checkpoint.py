"""Resumable denoising checkpoints: latents plus the scheduler's full state, as bytes.

A checkpoint is taken at a step boundary (after `step` of `total_steps` steps). Restored into a fresh
scheduler of the same class and config, `denoise(..., start_step=ckpt.step)` continues bit for bit as the
uninterrupted run would have. That needs more than the step index for multistep solvers: UniPC keeps its
last model outputs, the sample before the last step and its warm-up counters, and all of them are saved.

Three moves, split so the denoising loop pays only for the first:

* `capture` copies what the checkpoint needs (clones of the latents and of the scheduler's tensors);
* `to_bytes` / `from_bytes` (de)serialise, e.g. on a writer thread: one safetensors payload holding every
  tensor, with everything else as JSON in the safetensors metadata, plus a format version and a sha256
  over the content. No pickle. Storing the bytes (blob store, topic) is the caller's business;
* `restore_scheduler` puts a fresh scheduler into the captured state.

The scheduler state is captured generically: every instance attribute (`vars(scheduler)`) except the
config, which a fresh instance already has and which restore compares instead. Attributes must be
tensors, numpy arrays or scalars, Python scalars, or lists/tuples of those (None entries included);
anything else is refused with CheckpointError rather than silently dropped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .denoise import _check_resume_position
from .sealed import seal, unseal

FORMAT_NAME = "vidgen.denoise-checkpoint"
FORMAT_VERSION = 1

# Scheduler attributes not captured: the (frozen) config lives here; restore checks it matches instead.
CONFIG_ATTRIBUTES = frozenset({"_internal_dict"})

_LATENTS_KEY = "latents"
_GENERATOR_KEY = "generator_state"
_SCHEDULER_KEY_PREFIX = "scheduler"
# Element types a numpy array or scalar may have: bool, signed, unsigned, float (what torch can hold).
_NUMPY_KINDS = "biuf"


class CheckpointError(ValueError):
    """A checkpoint cannot be taken, read or restored (corrupt payload, wrong version, other scheduler)."""


@dataclass(kw_only=True)
class DenoiseCheckpoint:
    """Everything needed to continue a job's denoising after `step` of `total_steps` steps."""

    job_id: str
    step: int  # steps completed
    total_steps: int
    latents: torch.Tensor  # latents after `step` steps
    scheduler_class: str  # class name, e.g. "UniPCMultistepScheduler"
    scheduler_config: dict[str, Any]  # JSON form of scheduler.config; restore refuses a different one
    scheduler_state: dict[str, Any]  # attribute name -> value (tensors, scalars, lists of them)
    generator_state: torch.Tensor | None = None  # torch.Generator.get_state(), for stochastic schedulers
    prompt_embeds_ref: dict | None = None  # BlobRef dicts (uri, sha256, bytes, shape, dtype); opaque here
    negative_prompt_embeds_ref: dict | None = None
    attempt: int = 1
    model: str = ""
    created_at: float = field(default_factory=time.time)


# --------------------------------------------------------------------------------------------------
# Capture and restore
# --------------------------------------------------------------------------------------------------


def capture(
    job_id: str,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    step: int,
    total_steps: int,
    *,
    generator: torch.Generator | None = None,
    prompt_embeds_ref: dict | None = None,
    negative_prompt_embeds_ref: dict | None = None,
    attempt: int = 1,
    model: str = "",
    created_at: float | None = None,
) -> DenoiseCheckpoint:
    """Snapshot a run standing after `step` steps (e.g. from denoise's on_step callback).

    Cheap enough for the denoising path: tensors are cloned (so the run may go on changing its own in
    place while another thread serialises the copy), nothing is serialised. Raises CheckpointError if
    the scheduler is not at `step` of a `total_steps` schedule or holds state a checkpoint cannot carry.
    """
    _require_position(scheduler, total_steps, step, "cannot checkpoint")
    state = {
        name: _snapshot(value, name)
        for name, value in vars(scheduler).items()
        if name not in CONFIG_ATTRIBUTES
    }
    return DenoiseCheckpoint(
        job_id=job_id,
        step=step,
        total_steps=total_steps,
        latents=latents.detach().clone(),
        scheduler_class=type(scheduler).__name__,
        scheduler_config=_config_as_json(scheduler),
        scheduler_state=state,
        generator_state=None if generator is None else generator.get_state(),
        prompt_embeds_ref=prompt_embeds_ref,
        negative_prompt_embeds_ref=negative_prompt_embeds_ref,
        attempt=attempt,
        model=model,
        created_at=time.time() if created_at is None else created_at,
    )


def restore_scheduler(scheduler: SchedulerMixin, ckpt: DenoiseCheckpoint) -> None:
    """Put a fresh scheduler (same class and config) into the checkpointed state, ready for
    `denoise(..., start_step=ckpt.step)`.

    Tensors are copied in on the devices they have in `ckpt` (see `from_bytes` for choosing them), so one
    checkpoint can restore several schedulers without them sharing tensors.
    """
    if type(scheduler).__name__ != ckpt.scheduler_class:
        raise CheckpointError(
            f"checkpoint of job {ckpt.job_id!r} holds {ckpt.scheduler_class} state; cannot restore it into "
            f"{type(scheduler).__name__}"
        )
    config = _config_as_json(scheduler)
    if config != ckpt.scheduler_config:
        differing = sorted(
            key
            for key in config.keys() | ckpt.scheduler_config.keys()
            if config.get(key, "<missing>") != ckpt.scheduler_config.get(key, "<missing>")
        )
        raise CheckpointError(f"scheduler config differs from the checkpoint's in {differing}")
    # An attribute the checkpoint lacks would keep a value that was never checkpointed: the scheduler was
    # used already, or comes from a diffusers version with other state.
    unexpected = sorted(set(vars(scheduler)) - CONFIG_ATTRIBUTES - ckpt.scheduler_state.keys())
    if unexpected:
        raise CheckpointError(
            f"{type(scheduler).__name__} has attributes the checkpoint lacks: {unexpected}; restore into a fresh "
            f"scheduler (diffusers {diffusers.__version__})"
        )
    for name, value in ckpt.scheduler_state.items():
        setattr(scheduler, name, _snapshot(value, name))
    _require_position(scheduler, ckpt.total_steps, ckpt.step, "restored scheduler is unusable")


def restore_generator(ckpt: DenoiseCheckpoint, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator in the checkpointed state on `device` (the kind it was captured on); None if none was saved."""
    if ckpt.generator_state is None:
        return None
    generator = torch.Generator(device)
    try:
        generator.set_state(ckpt.generator_state.cpu())
    except RuntimeError as error:
        raise CheckpointError(f"generator state does not fit a {device} generator: {error}") from error
    return generator


def _require_position(scheduler: SchedulerMixin, total_steps: int, step: int, what: str) -> None:
    # The same check denoise() applies when resuming, so a checkpoint that passes here resumes there.
    try:
        _check_resume_position(scheduler, total_steps, step)
    except ValueError as error:
        raise CheckpointError(f"{what}: {error}") from error


def _snapshot(value: Any, name: str) -> Any:
    """A copy of one attribute value that shares no tensor or array with the original."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.kind not in _NUMPY_KINDS or not value.dtype.isnative:
            raise CheckpointError(f"scheduler attribute {name} is numpy {value.dtype}, which a checkpoint cannot hold")
        return value.copy()
    # Exact types: a subclass (an enum, a named tuple) would come back as its base type.
    if type(value) in (type(None), bool, int, float, str):
        return value
    if type(value) in (list, tuple):
        return type(value)(_snapshot(item, f"{name}[{index}]") for index, item in enumerate(value))
    raise CheckpointError(
        f"scheduler attribute {name} has type {type(value).__module__}.{type(value).__qualname__}, which a "
        "checkpoint cannot hold (tensors, numpy values, scalars and lists/tuples of them only)"
    )


def _config_as_json(scheduler: SchedulerMixin) -> dict[str, Any]:
    """The scheduler's config in the form it takes after a JSON round trip (tuples become lists)."""
    # Keys starting with "_" are bookkeeping (_use_default_values, _class_name, ...), not behaviour.
    config = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
    try:
        return json.loads(json.dumps(config, default=_numpy_to_json))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{type(scheduler).__name__} config cannot be recorded as JSON: {error}") from error


def _numpy_to_json(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------------


def to_bytes(ckpt: DenoiseCheckpoint) -> bytes:
    """Serialise to one safetensors payload (tensors) with JSON metadata (the rest); no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    latents_device = ckpt.latents.device
    body = {
        "job_id": ckpt.job_id,
        "step": ckpt.step,
        "total_steps": ckpt.total_steps,
        "latents": _encode(ckpt.latents, _LATENTS_KEY, tensors, latents_device),
        "scheduler_class": ckpt.scheduler_class,
        "scheduler_config": ckpt.scheduler_config,
        "scheduler_state": {
            name: _encode(value, f"{_SCHEDULER_KEY_PREFIX}/{name}", tensors, latents_device)
            for name, value in ckpt.scheduler_state.items()
        },
        "generator_state": (
            None if ckpt.generator_state is None else _encode(ckpt.generator_state, _GENERATOR_KEY, tensors, None)
        ),
        "prompt_embeds_ref": ckpt.prompt_embeds_ref,
        "negative_prompt_embeds_ref": ckpt.negative_prompt_embeds_ref,
        "attempt": ckpt.attempt,
        "model": ckpt.model,
        "created_at": ckpt.created_at,
    }
    return seal(FORMAT_NAME, FORMAT_VERSION, body, tensors, CheckpointError, f"checkpoint of job {ckpt.job_id!r}")


def from_bytes(data: bytes, device: torch.device | str | None = None) -> DenoiseCheckpoint:
    """Read a payload written by `to_bytes`; raises CheckpointError if it is corrupt or of another version.

    Tensors load on the CPU. With `device`, those that were on the latents' device when captured (the
    latents, timesteps, UniPC's model outputs...) go to `device` instead; the ones a scheduler keeps on
    the CPU on purpose (sigmas) stay there.
    """
    body, tensors = unseal(data, FORMAT_NAME, FORMAT_VERSION, CheckpointError, "denoising checkpoint")
    try:
        return _decode_checkpoint(body, tensors, device)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"checkpoint metadata is malformed: {error!r}") from error


# Value encoding. JSON specs, one per value:
#   {"tensor": key, "follows_latents": bool}   a tensor stored under `key`
#   {"ndarray": key}                            a numpy array stored (as a tensor) under `key`
#   {"numpy_scalar": dtype, "value": number}
#   {"list": [spec, ...]} / {"tuple": [spec, ...]}
#   {"value": None | bool | int | float | str}


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor], latents_device: torch.device | None) -> dict:
    if isinstance(value, torch.Tensor):
        # Clones own their storage, so no two entries share memory (safetensors refuses shared tensors).
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"tensor": key, "follows_latents": value.device == latents_device}
    if isinstance(value, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        return {"ndarray": key}
    if isinstance(value, np.generic):
        return {"numpy_scalar": value.dtype.str, "value": value.item()}
    if type(value) in (list, tuple):
        items = [_encode(item, f"{key}/{index}", tensors, latents_device) for index, item in enumerate(value)]
        return {type(value).__name__: items}
    if type(value) in (type(None), bool, int, float, str):
        return {"value": value}
    # A hand-built checkpoint can hold anything; capture() never produces this.
    raise CheckpointError(f"{key} has type {type(value).__name__}, which a checkpoint cannot hold")


def _decode(spec: dict, tensors: dict[str, torch.Tensor], used: set[str], device: torch.device | str | None) -> Any:
    if "tensor" in spec:
        tensor = _take_tensor(spec["tensor"], tensors, used)
        return tensor.to(device) if device is not None and spec["follows_latents"] else tensor
    if "ndarray" in spec:
        return _take_tensor(spec["ndarray"], tensors, used).numpy()
    if "numpy_scalar" in spec:
        return np.dtype(spec["numpy_scalar"]).type(spec["value"])
    if "list" in spec:
        return [_decode(item, tensors, used, device) for item in spec["list"]]
    if "tuple" in spec:
        return tuple(_decode(item, tensors, used, device) for item in spec["tuple"])
    if "value" in spec:
        return spec["value"]
    raise CheckpointError(f"unknown value encoding {sorted(spec)}")


def _take_tensor(key: str, tensors: dict[str, torch.Tensor], used: set[str]) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"checkpoint names tensor {key!r}, which the payload lacks")
    used.add(key)
    return tensors[key]


def _decode_checkpoint(
    body: dict, tensors: dict[str, torch.Tensor], device: torch.device | str | None
) -> DenoiseCheckpoint:
    used: set[str] = set()
    step, total_steps = body["step"], body["total_steps"]
    if not (type(step) is int and type(total_steps) is int and 0 <= step <= total_steps):
        raise CheckpointError(f"checkpoint step {step!r} of {total_steps!r} is not a valid position")
    created_at = body["created_at"]
    if not isinstance(created_at, (int, float)) or not math.isfinite(created_at):
        raise CheckpointError(f"checkpoint created_at {created_at!r} is not a time")
    generator_spec = body["generator_state"]
    ckpt = DenoiseCheckpoint(
        job_id=body["job_id"],
        step=step,
        total_steps=total_steps,
        latents=_decode(body["latents"], tensors, used, device),
        scheduler_class=body["scheduler_class"],
        scheduler_config=body["scheduler_config"],
        scheduler_state={
            name: _decode(spec, tensors, used, device) for name, spec in body["scheduler_state"].items()
        },
        generator_state=None if generator_spec is None else _decode(generator_spec, tensors, used, None),
        prompt_embeds_ref=body["prompt_embeds_ref"],
        negative_prompt_embeds_ref=body["negative_prompt_embeds_ref"],
        attempt=body["attempt"],
        model=body["model"],
        created_at=float(created_at),
    )
    unused = sorted(tensors.keys() - used)
    if unused:
        raise CheckpointError(f"checkpoint payload has tensors its metadata does not name: {unused}")
    return ckpt
