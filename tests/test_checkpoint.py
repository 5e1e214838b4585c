"""Denoising checkpoints: capture, bytes round trip and restore continue a run bit for bit."""

import dataclasses
import json
import os
import statistics
import struct
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from gpu_agents.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    DenoiseCheckpoint,
    capture,
    from_bytes,
    restore_generator,
    restore_scheduler,
    to_bytes,
)
from gpu_agents.denoise import StepInfo, denoise, position_scheduler, prepare_latents
from gpu_agents.encoding import encode_prompts
from gpu_agents.models import DenoiserParts

MODEL_ID = "tiny-wan"
WIDTH, HEIGHT, NUM_FRAMES, STEPS, SEED = 64, 64, 9, 6, 5
PROMPT, NEGATIVE_PROMPT = "a lighthouse in a storm", "blurry"
JOB_ID = "job-ckpt"
PROMPT_REF = {"uri": "file:///blobs/job-ckpt/prompt.safetensors", "sha256": "ab" * 32, "bytes": 4224,
              "shape": [1, 32, 32], "dtype": "float32"}
NEGATIVE_REF = {**PROMPT_REF, "uri": "file:///blobs/job-ckpt/negative.safetensors"}

# Real Wan 2.1 ships this sampler (diffusers' Wan docs: flow_shift 3.0 for 480p, 5.0 for 720p).
UNIPC_WAN_CONFIG = UniPCMultistepScheduler(
    prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
).config
# UniPC keeps solver_order (2) earlier outputs: step 1 is warm-up, at step 2 the history is first full,
# and the last step drops to first order (lower_order_final).
SPLIT_STEPS = [1, 2, STEPS - 1]


@pytest.fixture(autouse=True)
def inference_mode():
    """The agent denoises under inference mode, so checkpoints are taken from inference tensors."""
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def embeds(catalogue) -> tuple[torch.Tensor, torch.Tensor]:
    text_parts = catalogue.text_encoder(MODEL_ID)
    return encode_prompts(text_parts, [PROMPT]), encode_prompts(text_parts, [NEGATIVE_PROMPT])


@pytest.fixture(scope="module", params=["flow-match-euler", "unipc"])
def parts(request, catalogue) -> DenoiserParts:
    builtin = catalogue.denoiser(MODEL_ID)
    if request.param == "flow-match-euler":
        assert builtin.scheduler_class is FlowMatchEulerDiscreteScheduler
        return builtin
    return dataclasses.replace(builtin, scheduler_class=UniPCMultistepScheduler, scheduler_config=UNIPC_WAN_CONFIG)


@pytest.fixture(scope="module")
def unipc_parts(catalogue) -> DenoiserParts:
    builtin = catalogue.denoiser(MODEL_ID)
    return dataclasses.replace(builtin, scheduler_class=UniPCMultistepScheduler, scheduler_config=UNIPC_WAN_CONFIG)


def _run(parts, embeds, scheduler, latents, guidance_scale, start_step=0, end_step=None, on_step=None):
    prompt_embeds, negative_prompt_embeds = embeds
    return denoise(
        parts, scheduler, latents, prompt_embeds, negative_prompt_embeds, guidance_scale, STEPS,
        on_step=on_step, start_step=start_step, end_step=end_step,
    )


def _noise(parts) -> torch.Tensor:
    return prepare_latents(parts, WIDTH, HEIGHT, NUM_FRAMES, SEED)


_uninterrupted_cache: dict[tuple[str, float], torch.Tensor] = {}


def _uninterrupted(parts, embeds, guidance_scale) -> torch.Tensor:
    key = (parts.scheduler_class.__name__, guidance_scale)
    if key not in _uninterrupted_cache:
        _uninterrupted_cache[key] = _run(parts, embeds, parts.new_scheduler(), _noise(parts), guidance_scale)
    return _uninterrupted_cache[key]


def _checkpoint_after(parts, embeds, guidance_scale, split_at, **capture_kwargs) -> DenoiseCheckpoint:
    scheduler = parts.new_scheduler()
    latents = _run(parts, embeds, scheduler, _noise(parts), guidance_scale, end_step=split_at)
    return capture(JOB_ID, scheduler, latents, split_at, STEPS, **capture_kwargs)


def _resume(parts, embeds, ckpt, guidance_scale) -> torch.Tensor:
    scheduler = parts.new_scheduler()
    restore_scheduler(scheduler, ckpt)
    return _run(parts, embeds, scheduler, ckpt.latents, guidance_scale, start_step=ckpt.step)


# --------------------------------------------------------------------------------------------------
# Bit-identical resume
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
@pytest.mark.parametrize("split_at", SPLIT_STEPS)
def test_resume_from_bytes_equals_the_uninterrupted_run(parts, embeds, guidance_scale, split_at):
    ckpt = from_bytes(to_bytes(_checkpoint_after(parts, embeds, guidance_scale, split_at)))
    assert ckpt.step == split_at
    resumed = _resume(parts, embeds, ckpt, guidance_scale)
    assert torch.equal(resumed, _uninterrupted(parts, embeds, guidance_scale))


def test_a_checkpoint_taken_mid_run_is_unaffected_by_the_run_going_on(parts, embeds):
    """Captured from on_step while the run continues (and writes over its tensors) before serialising."""
    split_at = 2
    checkpoints: list[DenoiseCheckpoint] = []
    scheduler = parts.new_scheduler()

    def checkpoint_at_split(info: StepInfo) -> None:
        if info.step == split_at:
            checkpoints.append(capture(JOB_ID, scheduler, info.latents, info.step, info.total_steps))

    live_latents = _run(parts, embeds, scheduler, _noise(parts), 5.0, on_step=checkpoint_at_split)
    # Scribble over everything the live run still holds; the checkpoint must own its copies.
    live_latents.fill_(0)
    for value in vars(scheduler).values():
        for tensor in value if isinstance(value, list) else [value]:
            if isinstance(tensor, torch.Tensor):
                tensor.fill_(0)

    (ckpt,) = checkpoints
    resumed = _resume(parts, embeds, from_bytes(to_bytes(ckpt)), 5.0)
    assert torch.equal(resumed, _uninterrupted(parts, embeds, 5.0))


def test_restoring_directly_without_bytes_also_resumes_exactly(parts, embeds):
    ckpt = _checkpoint_after(parts, embeds, 5.0, 3)
    assert torch.equal(_resume(parts, embeds, ckpt, 5.0), _uninterrupted(parts, embeds, 5.0))
    # Restoring copies: the same checkpoint can seed a second scheduler.
    assert torch.equal(_resume(parts, embeds, ckpt, 5.0), _uninterrupted(parts, embeds, 5.0))


def test_dropping_the_unipc_history_breaks_the_resume(unipc_parts, embeds):
    """The equality above depends on the multistep history, so those tests can fail."""
    split_at = 2
    ckpt = from_bytes(to_bytes(_checkpoint_after(unipc_parts, embeds, 5.0, split_at)))
    assert all(output is not None for output in ckpt.scheduler_state["model_outputs"])
    assert ckpt.scheduler_state["lower_order_nums"] == 2
    assert ckpt.scheduler_state["last_sample"] is not None

    scheduler = unipc_parts.new_scheduler()
    restore_scheduler(scheduler, ckpt)
    fresh = unipc_parts.new_scheduler()
    fresh.set_timesteps(STEPS)
    for name in ("model_outputs", "timestep_list", "lower_order_nums", "last_sample"):
        setattr(scheduler, name, getattr(fresh, name))  # position kept, history forgotten
    forgetful = _run(unipc_parts, embeds, scheduler, ckpt.latents, 5.0, start_step=split_at)
    assert not torch.equal(forgetful, _uninterrupted(unipc_parts, embeds, 5.0))


# --------------------------------------------------------------------------------------------------
# Contents and serialisation
# --------------------------------------------------------------------------------------------------


def test_every_field_survives_the_round_trip(parts, embeds):
    ckpt = _checkpoint_after(
        parts, embeds, 5.0, 2,
        generator=torch.Generator().manual_seed(123),
        prompt_embeds_ref=PROMPT_REF,
        negative_prompt_embeds_ref=NEGATIVE_REF,
        attempt=3,
        model=MODEL_ID,
        created_at=1_700_000_000.25,
    )
    back = from_bytes(to_bytes(ckpt))
    assert (back.job_id, back.step, back.total_steps, back.attempt, back.model, back.created_at) == (
        JOB_ID, 2, STEPS, 3, MODEL_ID, 1_700_000_000.25
    )
    assert back.prompt_embeds_ref == PROMPT_REF and back.negative_prompt_embeds_ref == NEGATIVE_REF
    assert back.scheduler_class == type(parts.new_scheduler()).__name__
    assert back.scheduler_config == ckpt.scheduler_config
    assert torch.equal(back.latents, ckpt.latents) and back.latents.dtype == ckpt.latents.dtype
    assert torch.equal(back.generator_state, ckpt.generator_state)
    assert back.scheduler_state.keys() == ckpt.scheduler_state.keys()
    for name, value in ckpt.scheduler_state.items():
        _assert_same_value(back.scheduler_state[name], value, name)


def _assert_same_value(actual, expected, name):
    assert type(actual) is type(expected), name
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), name
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), name
        for index, (a, e) in enumerate(zip(actual, expected)):
            _assert_same_value(a, e, f"{name}[{index}]")
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and np.array_equal(actual, expected), name
    else:
        assert actual == expected, name


def test_unipc_state_includes_lists_with_none_entries(unipc_parts, embeds):
    ckpt = from_bytes(to_bytes(_checkpoint_after(unipc_parts, embeds, 5.0, 1)))
    model_outputs, timestep_list = ckpt.scheduler_state["model_outputs"], ckpt.scheduler_state["timestep_list"]
    assert model_outputs[0] is None and isinstance(model_outputs[1], torch.Tensor)
    assert timestep_list[0] is None and timestep_list[1].dim() == 0
    assert ckpt.scheduler_state["this_order"] == 1  # set by step(), absent from a fresh instance


def test_generator_state_restores_the_random_stream():
    generator = torch.Generator().manual_seed(99)
    torch.randn(5, generator=generator)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    position_scheduler(scheduler, STEPS)
    ckpt = from_bytes(to_bytes(capture(JOB_ID, scheduler, torch.zeros(2), 0, STEPS, generator=generator)))
    expected = torch.randn(7, generator=generator)
    assert torch.equal(torch.randn(7, generator=restore_generator(ckpt)), expected)
    assert restore_generator(dataclasses.replace(ckpt, generator_state=None)) is None


def test_numpy_and_tuple_attributes_round_trip():
    """Other diffusers schedulers keep numpy arrays and scalars; the encoding is generic over them."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    position_scheduler(scheduler, STEPS)
    scheduler.extra_table = np.linspace(0, 1, 5, dtype=np.float64)
    scheduler.extra_scalar = np.float32(0.1)
    scheduler.extra_pair = (np.int64(3), [None, torch.arange(3, dtype=torch.int32)], "note", float("inf"))
    ckpt = capture(JOB_ID, scheduler, torch.ones(3), 0, STEPS)
    back = from_bytes(to_bytes(ckpt))
    for name in ("extra_table", "extra_scalar", "extra_pair"):
        _assert_same_value(back.scheduler_state[name], ckpt.scheduler_state[name], name)
    assert back.scheduler_state["extra_scalar"].dtype == np.float32

    restored = FlowMatchEulerDiscreteScheduler(shift=7.0)
    restore_scheduler(restored, back)
    assert restored.extra_pair[2] == "note" and restored.step_index is None and restored.begin_index == 0


def test_from_bytes_moves_the_latents_side_to_the_requested_device(parts, embeds):
    # "meta" stands in for an accelerator: what lived with the latents moves, the generator state does not.
    ckpt = _checkpoint_after(parts, embeds, 5.0, 2, generator=torch.Generator().manual_seed(1))
    moved = from_bytes(to_bytes(ckpt), device="meta")
    assert moved.latents.device.type == "meta"
    assert moved.scheduler_state["timesteps"].device.type == "meta"
    assert moved.generator_state.device.type == "cpu"
    assert from_bytes(to_bytes(ckpt)).latents.device.type == "cpu"


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


def _with_metadata(data: bytes, **changes: str) -> bytes:
    """The same tensors re-saved with some metadata entries replaced."""
    (header_length,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + header_length])["__metadata__"]
    return safetensors.torch.save(safetensors.torch.load(data), metadata={**metadata, **changes})


@pytest.fixture(scope="module")
def payload(unipc_parts, embeds) -> bytes:
    with torch.inference_mode():
        return to_bytes(_checkpoint_after(unipc_parts, embeds, 5.0, 2))


def test_the_reference_payload_reads(payload):
    assert from_bytes(payload).step == 2


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda data: b"", "truncated"),
        (lambda data: data[: len(data) // 2], "unreadable|truncated"),
        (lambda data: b"\x00" * 64, "unreadable|truncated"),
        (lambda data: b"not a checkpoint at all, just some text", "truncated|unreadable"),
        # One bit flipped in the last tensor bytes, and in the header's JSON body.
        (lambda data: data[:-1] + bytes([data[-1] ^ 0x01]), "sha256"),
        (lambda data: data.replace(b'\\"step\\": 2', b'\\"step\\": 3', 1), "sha256"),
        (lambda data: _with_metadata(data, format_version=str(FORMAT_VERSION + 1)), "format version"),
        (lambda data: _with_metadata(data, format="something-else"), "not a denoising checkpoint"),
        (lambda data: safetensors.torch.save({"weight": torch.zeros(3)}), "not a denoising checkpoint"),
    ],
    ids=["empty", "truncated", "zeros", "text", "tensor-bit-flip", "metadata-edit", "version", "format", "other"],
)
def test_a_corrupt_or_foreign_payload_raises(payload, corrupt, message):
    bad = corrupt(payload)
    assert bad != payload
    with pytest.raises(CheckpointError, match=message):
        from_bytes(bad)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_restore_refuses_another_scheduler_class_or_config(unipc_parts, payload):
    ckpt = from_bytes(payload)
    with pytest.raises(CheckpointError, match="UniPCMultistepScheduler state.*FlowMatchEulerDiscreteScheduler"):
        restore_scheduler(FlowMatchEulerDiscreteScheduler(shift=7.0), ckpt)
    other_shift = UniPCMultistepScheduler.from_config(UNIPC_WAN_CONFIG, flow_shift=5.0)
    with pytest.raises(CheckpointError, match=r"config differs.*\['flow_shift'\]"):
        restore_scheduler(other_shift, ckpt)


def test_restore_refuses_a_scheduler_with_state_the_checkpoint_lacks(unipc_parts, embeds):
    # Captured before the first step, when UniPC has no this_order yet; a used instance has one.
    ckpt = _checkpoint_after(unipc_parts, embeds, 5.0, 0)
    used = unipc_parts.new_scheduler()
    _run(unipc_parts, embeds, used, _noise(unipc_parts), 5.0, end_step=1)
    with pytest.raises(CheckpointError, match=r"attributes the checkpoint lacks: \['this_order'\]"):
        restore_scheduler(used, ckpt)


def test_capture_refuses_state_it_cannot_round_trip():
    scheduler = UniPCMultistepScheduler.from_config(UNIPC_WAN_CONFIG)
    position_scheduler(scheduler, STEPS)
    scheduler.solver_p = FlowMatchEulerDiscreteScheduler()  # a nested scheduler is not plain state
    with pytest.raises(CheckpointError, match="solver_p has type .*FlowMatchEulerDiscreteScheduler"):
        capture(JOB_ID, scheduler, torch.zeros(2), 0, STEPS)
    scheduler.solver_p = None
    scheduler.model_outputs = [None, {"not": "a tensor"}]
    with pytest.raises(CheckpointError, match=r"model_outputs\[1\] has type builtins.dict"):
        capture(JOB_ID, scheduler, torch.zeros(2), 0, STEPS)
    scheduler.model_outputs = [None, None]
    scheduler.names = np.array(["a", "b"])  # numpy strings: no tensor form
    with pytest.raises(CheckpointError, match="names is numpy <U1"):
        capture(JOB_ID, scheduler, torch.zeros(2), 0, STEPS)


def test_capture_refuses_a_scheduler_not_at_the_step(parts, embeds):
    with pytest.raises(CheckpointError, match="cannot checkpoint.*set up for 6 steps"):
        capture(JOB_ID, parts.new_scheduler(), _noise(parts), 0, STEPS)
    scheduler = parts.new_scheduler()
    latents = _run(parts, embeds, scheduler, _noise(parts), 5.0, end_step=2)
    with pytest.raises(CheckpointError, match="scheduler is at step 2, but start_step is 3"):
        capture(JOB_ID, scheduler, latents, 3, STEPS)


# --------------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------------


def _median_seconds(action, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def _report(capsys, label: str, ckpt: DenoiseCheckpoint, capture_action, step_s: float | None) -> None:
    capture_s = _median_seconds(capture_action, repeats=20)
    to_bytes_s = _median_seconds(lambda: to_bytes(ckpt), repeats=5)
    data = to_bytes(ckpt)
    from_bytes_s = _median_seconds(lambda: from_bytes(data), repeats=5)
    versus_step = "" if step_s is None else f" = {capture_s / step_s:.2%} of a {step_s * 1e3:.2f} ms step"
    with capsys.disabled():
        print(
            f"\n[{label}] capture {capture_s * 1e3:.3f} ms{versus_step}; "
            f"to_bytes {to_bytes_s * 1e3:.2f} ms, from_bytes {from_bytes_s * 1e3:.2f} ms, {len(data) / 1e6:.3f} MB"
        )


def test_capture_cost_compared_with_a_step(parts, embeds, capsys):
    """Reported, not asserted: capture runs on the denoising path, serialisation does not."""
    _run(parts, embeds, parts.new_scheduler(), _noise(parts), 5.0)  # warm-up: first steps are slow
    scheduler = parts.new_scheduler()
    step_seconds: list[float] = []
    latents = _run(parts, embeds, scheduler, _noise(parts), 5.0, end_step=STEPS - 1,
                   on_step=lambda info: step_seconds.append(info.elapsed_s))
    ckpt = capture(JOB_ID, scheduler, latents, STEPS - 1, STEPS)
    label = f"{type(scheduler).__name__}, tiny-wan {WIDTH}x{HEIGHT}x{NUM_FRAMES}, CFG 5"
    _report(capsys, label, ckpt, lambda: capture(JOB_ID, scheduler, latents, STEPS - 1, STEPS),
            statistics.median(step_seconds))


def test_capture_cost_at_wan_480p_size(capsys):
    """Wan 2.1 480p, 81 frames: 16x21x60x104 latents (8.4 MB), UniPC history full (model run replaced by noise)."""
    scheduler = UniPCMultistepScheduler.from_config(UNIPC_WAN_CONFIG)
    position_scheduler(scheduler, 50)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 21, 60, 104, generator=generator)
    for t in scheduler.timesteps[:2]:
        latents = scheduler.step(torch.randn(latents.shape, generator=generator), t, latents, return_dict=False)[0]
    ckpt = capture(JOB_ID, scheduler, latents, 2, 50)
    _report(capsys, "UniPC, Wan 480p x 81 frames, CPU", ckpt, lambda: capture(JOB_ID, scheduler, latents, 2, 50), None)
