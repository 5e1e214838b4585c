"""The Helios family: a video denoised chunk after chunk through the shared loop equals diffusers' HeliosPipeline bit
for bit, each chunk is reported once by the step that finishes it, a resume after any step of any chunk is exact, the
packed latents do not grow with the video, and each chunk decodes to the pipeline's frames
(gpu_agents/families/helios.py)."""
import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers.pipelines.helios import pipeline_helios
from diffusers.pipelines.wan import pipeline_wan
from diffusers.utils.torch_utils import randn_tensor

from gpu_agents.checkpoint import capture, from_bytes, restore_scheduler, to_bytes
from gpu_agents.denoise import denoise
from gpu_agents.encoding import encode_prompts, token_counts
from gpu_agents.families.base import T2V, Denoiser, Guidance, InvalidParamsError
from gpu_agents.families.helios import (HEADER_SIZE, HeliosChunkDecoder, HeliosChunkScheduler, HeliosLayout,
                                        chunk_schedule)
from gpu_agents.models import ModelCatalogue, check_params

MODEL = "tiny-helios"
PROMPT, NEGATIVE = "a robot dancing in the rain", "blurry"
# 97 frames: ceil(97 / 33) = 3 chunks of 9 latent frames, 99 frames cut to 97 by the pipeline as by the decoder.
WIDTH, HEIGHT, NUM_FRAMES, STEPS, SEED, GUIDANCE = 16, 16, 97, 3, 7, 4.0
CHUNKS, FRAMES_PER_CHUNK = 3, 9  # latent frames per chunk (the pipeline's default)


def _pipeline_call(pipe, output_type, num_frames=NUM_FRAMES, steps=STEPS, guidance_scale=GUIDANCE, **kwargs):
    """HeliosPipeline's default text-to-video call, prompts as strings (so its own encoding is compared too)."""
    # Helios' prompt_clean calls ftfy, which is not installed here; Wan's cleaning is the same without it.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_helios, "basic_clean", pipeline_wan.basic_clean)
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, num_frames=num_frames,
                    num_inference_steps=steps, guidance_scale=guidance_scale,
                    max_sequence_length=pipe.tokenizer.model_max_length,
                    generator=torch.Generator().manual_seed(SEED), output_type=output_type, return_dict=False,
                    **kwargs)[0]


@dataclasses.dataclass
class Run:
    final: torch.Tensor
    finished: dict[int, tuple[int, torch.Tensor]]  # chunk index -> (global step that finished it, its latents)
    reported_at: list[int]  # every step at which finished_chunk returned something
    checkpoints: dict[int, bytes]  # step -> checkpoint taken right after it
    scheduler: HeliosChunkScheduler


def _run(denoiser, embeds, num_frames=NUM_FRAMES, steps=STEPS, guidance_scale=GUIDANCE, keep_checkpoints=False,
         scheduler=None, start_step=0, latents=None):
    chunks, total = denoiser.chunk_plan(WIDTH, HEIGHT, num_frames, steps)
    scheduler = scheduler or denoiser.new_scheduler()
    if latents is None:
        latents = denoiser.prepare_latents(WIDTH, HEIGHT, num_frames, SEED)
    run = Run(final=None, finished={}, reported_at=[], checkpoints={}, scheduler=scheduler)

    def on_step(step):
        finished = denoiser.finished_chunk(step.latents)
        if finished is not None:
            index, chunk_latents = finished
            assert index not in run.finished, f"chunk {index} reported twice"
            run.finished[index] = (step.step, chunk_latents)
            run.reported_at.append(step.step)
        if keep_checkpoints:
            run.checkpoints[step.step] = to_bytes(capture("job-helios", scheduler, step.latents, step.step, total,
                                                          model=MODEL))

    run.final = denoise(denoiser, scheduler, latents, embeds[0], embeds[1], guidance_scale, total, on_step=on_step,
                        start_step=start_step)
    return run


@pytest.fixture(scope="module")
def reference(catalogue):
    """The pipeline's latents (output_type="latent": every chunk's, normalised) and frames ("np")."""
    pipe = catalogue.pipeline(MODEL)
    return _pipeline_call(pipe, "latent"), _pipeline_call(pipe, "np")


@pytest.fixture(scope="module")
def uninterrupted(catalogue, embeds) -> Run:
    return _run(catalogue.denoiser(MODEL), embeds, keep_checkpoints=True)


def _video_latents(run: Run) -> torch.Tensor:
    return torch.cat([run.finished[index][1] for index in sorted(run.finished)], dim=2)


# -- (a) the explicit loop equals the pipeline ------------------------------------------------------------------------


def test_chunk_plan_and_noise_equal_the_pipelines(catalogue):
    denoiser, pipe = catalogue.denoiser(MODEL), catalogue.pipeline(MODEL)
    assert denoiser.chunk_plan(WIDTH, HEIGHT, NUM_FRAMES, STEPS) == (CHUNKS, CHUNKS * STEPS)
    assert [denoiser.chunk_plan(WIDTH, HEIGHT, n, 5) for n in (1, 33, 34, 65, 66, 101)] == [
        (1, 5), (1, 5), (2, 10), (2, 10), (2, 10), (4, 20)]  # the pipeline's ceil(num_frames / 33)
    latents = denoiser.prepare_latents(WIDTH, HEIGHT, NUM_FRAMES, SEED)
    layout, chunk, local, _ = HeliosLayout.read(latents)
    assert (chunk, local, layout.chunk_count) == (0, 0, CHUNKS)
    generator = torch.Generator().manual_seed(SEED)
    draws = [pipe.prepare_latents(1, 16, HEIGHT, WIDTH, 33, torch.float32, "cpu", generator) for _ in range(CHUNKS)]
    assert torch.equal(layout.current(latents), draws[0])
    # The scheduler's noise for later chunks: the pipeline's later draws, re-seeded or from a kept generator state.
    scheduler = denoiser.new_scheduler()
    assert torch.equal(scheduler._noise(layout, 1, 1), draws[1])
    assert torch.equal(scheduler._noise(layout, 2, 1), draws[2])
    scheduler.noise_generator_state = None
    assert torch.equal(scheduler._noise(layout, 2, 1), draws[2])


def test_explicit_loop_equals_pipeline(uninterrupted, reference, catalogue):
    """Every chunk's latents bit for bit, chained through the history window, the prefix frame and K scheduler runs."""
    ref_latents, _ = reference
    assert ref_latents.shape == (1, 16, CHUNKS * FRAMES_PER_CHUNK, HEIGHT // 8, WIDTH // 8)
    video = _video_latents(uninterrupted)
    assert torch.equal(video, ref_latents), (video - ref_latents).abs().max()
    # outputs(): the last chunk (the packed latents never hold more); the agent streams chunks with finished_chunk.
    last, extras = catalogue.denoiser(MODEL).outputs(uninterrupted.final)
    assert torch.equal(last, ref_latents[:, :, -FRAMES_PER_CHUNK:]) and extras == {}
    # The scheduler laid out K runs of the pipeline's per-chunk schedule (set up at its first step).
    tokens = HeliosLayout.read(uninterrupted.final)[0].tokens  # 9 latent frames x (2 x 2) / patch (1, 2, 2)
    chunk_timesteps, _ = chunk_schedule(catalogue.denoiser(MODEL).scheduler_config, STEPS, tokens)
    assert torch.equal(uninterrupted.scheduler.timesteps, chunk_timesteps.repeat(CHUNKS))


def test_prompt_embeddings_equal_the_pipelines(catalogue, embeds):
    pipe, text = catalogue.pipeline(MODEL), catalogue.text_encoder(MODEL)
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():  # as in the pipeline's __call__
        patch.setattr(pipeline_helios, "basic_clean", pipeline_wan.basic_clean)
        ref, ref_negative = pipe.encode_prompt(PROMPT, NEGATIVE, max_sequence_length=32, device="cpu")
    assert torch.equal(embeds[0], ref) and torch.equal(embeds[1], ref_negative)
    assert embeds[0].shape == (1, 32, 32)
    assert token_counts(text, [PROMPT, "x" * 40]) == [len(PROMPT) + 1, 41]


def test_without_guidance_equals_pipeline(catalogue, embeds):
    """Guidance off (one transformer call a step), two chunks, two steps each."""
    denoiser, pipe = catalogue.denoiser(MODEL), catalogue.pipeline(MODEL)
    run = _run(denoiser, embeds, num_frames=65, steps=2, guidance_scale=1.0)
    ref = _pipeline_call(pipe, "latent", num_frames=65, steps=2, guidance_scale=1.0)
    assert torch.equal(_video_latents(run), ref)
    assert not torch.equal(run.final, _run(denoiser, embeds, num_frames=65, steps=2).final)


def test_decoded_frames_equal_pipeline(uninterrupted, reference, catalogue):
    """Each chunk decoded alone, as the pipeline does; the last cut so the job has its num_frames (here what the
    pipeline's cut to 4k+1 leaves: 99 -> 97)."""
    _, ref_frames = reference
    decoder = catalogue.chunk_decoder(MODEL)
    assert isinstance(decoder, HeliosChunkDecoder)
    state = decoder.new_state(num_frames=NUM_FRAMES)
    decoded = [decoder.decode_chunk(state, uninterrupted.finished[i][1]) for i in range(CHUNKS)]
    assert [len(frames) for frames in decoded] == [33, 33, 31] and state.frames_decoded == NUM_FRAMES
    frames = np.concatenate(decoded)
    assert frames.dtype == np.uint8 and frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert np.array_equal(frames, (ref_frames[0] * 255).round().astype(np.uint8))  # as video_to_uint8 rounds
    with pytest.raises(ValueError, match="a chunk too many"):
        decoder.decode_chunk(state, uninterrupted.finished[0][1])
    # A job of fewer frames than its chunks make: the pipeline's first num_frames frames.
    short = decoder.new_state(num_frames=69)
    assert sum(len(decoder.decode_chunk(short, uninterrupted.finished[i][1])) for i in range(CHUNKS)) == 69
    with pytest.raises(TypeError):
        decoder.new_state()  # the decoder stage must pass the job's num_frames


# -- (b) each chunk once, at the step that finishes it ----------------------------------------------------------------


def test_finished_chunks_come_once_at_their_last_step(uninterrupted, reference, catalogue):
    ref_latents, _ = reference
    assert uninterrupted.reported_at == [STEPS, 2 * STEPS, 3 * STEPS]
    for index, (step, latents) in uninterrupted.finished.items():
        assert step == (index + 1) * STEPS
        assert latents.shape == (1, 16, FRAMES_PER_CHUNK, 2, 2)
        assert torch.equal(latents, ref_latents[:, :, index * FRAMES_PER_CHUNK:(index + 1) * FRAMES_PER_CHUNK])
    denoiser = catalogue.denoiser(MODEL)
    assert denoiser.finished_chunk(denoiser.prepare_latents(WIDTH, HEIGHT, NUM_FRAMES, SEED)) is None
    assert Denoiser.finished_chunk(denoiser, uninterrupted.final) is None  # the default: non-streaming families
    assert Denoiser.chunk_plan(denoiser, WIDTH, HEIGHT, NUM_FRAMES, STEPS) == (None, STEPS)


# -- (c) resume after any step ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", range(1, CHUNKS * STEPS + 1))
def test_resume_after_any_step_is_bit_identical(catalogue, embeds, uninterrupted, split):
    """Every step of every chunk (first, middle, last): capture -> bytes -> fresh scheduler -> the same video."""
    denoiser = catalogue.denoiser(MODEL)
    ckpt = from_bytes(uninterrupted.checkpoints[split])
    assert ckpt.scheduler_class == "HeliosChunkScheduler" and ckpt.step == split
    fresh = denoiser.new_scheduler()
    restore_scheduler(fresh, ckpt)
    resumed = _run(denoiser, embeds, scheduler=fresh, start_step=split, latents=ckpt.latents)
    assert torch.equal(resumed.final, uninterrupted.final)
    later = {index: value for index, value in uninterrupted.finished.items() if value[0] > split}
    assert resumed.finished.keys() == later.keys()
    for index, (step, latents) in later.items():
        assert resumed.finished[index][0] == step and torch.equal(resumed.finished[index][1], latents)


def test_resume_without_the_generator_state_reseeds(catalogue, embeds, uninterrupted):
    """A checkpoint whose scheduler kept no generator state (one taken before the first rollover, or edited) still
    resumes exactly: the next chunk's noise is re-drawn from the seed in the header."""
    denoiser = catalogue.denoiser(MODEL)
    ckpt = from_bytes(uninterrupted.checkpoints[STEPS + 1])
    assert ckpt.scheduler_state["noise_generator_state"] is not None
    ckpt.scheduler_state["noise_generator_state"] = None
    fresh = denoiser.new_scheduler()
    restore_scheduler(fresh, ckpt)
    assert torch.equal(_run(denoiser, embeds, scheduler=fresh, start_step=STEPS + 1, latents=ckpt.latents).final,
                       uninterrupted.final)


def test_scheduler_refuses_latents_of_another_position(catalogue, embeds, uninterrupted):
    denoiser = catalogue.denoiser(MODEL)
    ckpt = from_bytes(uninterrupted.checkpoints[4])
    fresh = denoiser.new_scheduler()
    restore_scheduler(fresh, ckpt)
    other = from_bytes(uninterrupted.checkpoints[5]).latents
    with pytest.raises(ValueError, match="stands at step 4"):
        denoise(denoiser, fresh, other, embeds[0], embeds[1], GUIDANCE, CHUNKS * STEPS, start_step=4)
    with pytest.raises(ValueError, match="do not divide"):
        denoise(denoiser, denoiser.new_scheduler(), denoiser.prepare_latents(WIDTH, HEIGHT, NUM_FRAMES, SEED),
                embeds[0], embeds[1], GUIDANCE, 8)


# -- (d) constant size, (e) checkpoint size ---------------------------------------------------------------------------


def test_packed_latents_and_checkpoints_do_not_grow_with_the_video(catalogue, embeds, uninterrupted, record_property):
    denoiser = catalogue.denoiser(MODEL)
    shape = denoiser.latent_shape(WIDTH, HEIGHT, NUM_FRAMES)
    six = 193  # ceil(193 / 33) = 6 chunks
    assert denoiser.chunk_plan(WIDTH, HEIGHT, six, STEPS)[0] == 6
    assert denoiser.latent_shape(WIDTH, HEIGHT, six) == shape == denoiser.latent_shape(WIDTH, HEIGHT, 1441)
    # header + chunk (16x9x2x2) + window of max(16+2+1, 9) frames + prefix frame
    assert shape == (1, HEADER_SIZE + 16 * 4 * (9 + 19 + 1))
    long_run = _run(denoiser, embeds, num_frames=six, steps=STEPS, keep_checkpoints=True)
    assert sorted(long_run.finished) == list(range(6)) and long_run.final.shape == shape
    sizes_3 = [len(data) for _, data in sorted(uninterrupted.checkpoints.items())]
    sizes_6 = [len(data) for _, data in sorted(long_run.checkpoints.items())]
    # The same at the same place in a chunk but for the scheduler's timestep table (8 bytes a step: 3 chunks more
    # here) and a few more digits in the metadata.
    assert 8 * 3 * STEPS <= max(sizes_6) - max(sizes_3) <= 8 * 3 * STEPS + 16
    assert max(sizes_3) < 24_000
    record_property("checkpoint_bytes_3_chunks", sizes_3)
    record_property("checkpoint_bytes_6_chunks", sizes_6)
    print(f"checkpoint bytes per step, 3 chunks: {sizes_3}; 6 chunks: {sizes_6}")


# -- header exactness ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7, 2 ** 63 - 1, -1, -2 ** 63])
def test_header_keeps_any_seed_and_the_exact_timestep(catalogue, seed):
    denoiser = catalogue.denoiser(MODEL)
    latents = denoiser.prepare_latents(WIDTH, HEIGHT, NUM_FRAMES, seed)
    layout, _, _, timestep = HeliosLayout.read(latents)
    assert layout.seed == seed % 2 ** 64
    assert torch.Generator().manual_seed(layout.seed).initial_seed() == \
        torch.Generator().manual_seed(seed).initial_seed()
    timesteps, _ = chunk_schedule(denoiser.scheduler_config, STEPS, layout.tokens)
    assert timestep == float(timesteps[0])  # float64, exact, through three float32 parts
    noise = randn_tensor(layout.chunk_shape(1), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    assert torch.equal(layout.current(latents), noise)
    with pytest.raises(ValueError, match="header"):
        HeliosLayout.read(latents[:, 1:])


def test_predict_returns_the_chunks_velocity(catalogue, embeds):
    denoiser = catalogue.denoiser(MODEL)
    latents = denoiser.prepare_latents(WIDTH, HEIGHT, NUM_FRAMES, SEED)
    with torch.inference_mode():
        velocity = denoiser.predict(latents, torch.tensor(0.0), embeds[0], embeds[1], Guidance(GUIDANCE), None)
        assert velocity.shape == (1, 16, FRAMES_PER_CHUNK, 2, 2)
        with pytest.raises(InvalidParamsError, match="guidance_scale_2"):
            denoiser.predict(latents, None, embeds[0], embeds[1], Guidance(GUIDANCE, 2.0), None)
    with pytest.raises(ValueError, match="no Helios chunk has finished"):
        denoiser.outputs(latents)


# -- facts, local directory ------------------------------------------------------------------------------------------


def _params(**overrides):
    return {"width": 64, "height": 32, "num_frames": 97, "fps": 16, "steps": 4, "guidance_scale": 5.0, "seed": 1,
            "model": MODEL, "preset": "quality", "input_reference": None, **overrides}


def test_facts_and_parameter_rules(catalogue):
    facts = catalogue.facts(MODEL)
    assert facts.family == "helios" and facts.modalities == (T2V,) and facts.streams_while_generating
    assert facts.rules.spatial_multiple == 16 and facts.rules.temporal_multiple == 4
    assert facts.rules.max_frames == 1441  # a minute at 24 fps: 44 chunks
    assert MODEL in {f.model_id for f in catalogue.all_facts()}
    check_params(_params(), catalogue)
    check_params(_params(num_frames=1441), catalogue)
    with pytest.raises(InvalidParamsError, match="at most 1441"):
        check_params(_params(num_frames=1445), catalogue)
    with pytest.raises(InvalidParamsError, match="multiple of 16"):
        check_params(_params(width=40), catalogue)
    with pytest.raises(InvalidParamsError, match="4k\\+1"):
        check_params(_params(num_frames=96), catalogue)
    with pytest.raises(InvalidParamsError, match="takes no input_reference"):
        check_params(_params(input_reference={"uri": "file:///b/x.png", "sha256": "00" * 32, "bytes": 1}), catalogue)
    assert isinstance(catalogue.denoiser(MODEL).new_scheduler(), HeliosChunkScheduler)


def test_builtin_parts_are_in_eval_mode(catalogue):
    text, denoiser, vae = catalogue.text_encoder(MODEL), catalogue.denoiser(MODEL), catalogue.vae(MODEL)
    for module in (text.text_encoder, denoiser.transformer, vae):
        assert not any(m.training for m in module.modules())


def test_local_directory_loads_and_gives_the_same_latents(catalogue, embeds, uninterrupted, tmp_path):
    catalogue.save_pretrained(MODEL, tmp_path)
    local = ModelCatalogue(model_dirs={"m": str(tmp_path)})
    facts = local.facts("m")
    assert facts.family == "helios" and facts.streams_while_generating and facts.rules == catalogue.facts(MODEL).rules
    text = local.text_encoder("m")
    assert text.max_sequence_length == 32
    local_embeds = (encode_prompts(text, [PROMPT]), encode_prompts(text, [NEGATIVE]))
    assert torch.equal(local_embeds[0], embeds[0]) and torch.equal(local_embeds[1], embeds[1])
    denoiser = local.denoiser("m")
    run = _run(denoiser, local_embeds)
    assert torch.equal(run.final, uninterrupted.final)
    assert torch.equal(_video_latents(run), _video_latents(uninterrupted))
    decoder, reference = local.chunk_decoder("m"), catalogue.chunk_decoder(MODEL)
    chunk = uninterrupted.finished[1][1]
    assert np.array_equal(decoder.decode_chunk(decoder.new_state(num_frames=NUM_FRAMES), chunk),
                          reference.decode_chunk(reference.new_state(num_frames=NUM_FRAMES), chunk))
    # A multi-stage (pyramid) schedule, which HeliosPipeline cannot run, is refused when the model is looked at.
    config_path = tmp_path / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "stages": 3}))
    with pytest.raises(ValueError, match="one-stage"):
        ModelCatalogue(model_dirs={"m": str(tmp_path)}).facts("m")
