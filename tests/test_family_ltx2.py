"""The LTX-2 family: video and audio denoised together equal diffusers' LTX2Pipeline bit for bit, resume exactly,
and decode to the pipeline's frames and waveform (gpu_agents/families/ltx2.py)."""
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import ByT5Tokenizer, Gemma3TextModel

from gpu_agents.checkpoint import capture, from_bytes, restore_scheduler, to_bytes
from gpu_agents.denoise import denoise
from gpu_agents.encoding import encode_prompts, token_counts
from gpu_agents.families.base import AUDIO, T2V, Guidance, InvalidParamsError
from gpu_agents.families.ltx2 import HEADER_SIZE, Ltx2Decoder, Ltx2EulerScheduler, Ltx2Prediction
from gpu_agents.models import ModelCatalogue, check_params
from gpu_agents.video import fit_length, sample_at_frame

MODEL = "tiny-ltx2"
PROMPT, NEGATIVE = "a robot dancing in the rain", "blurry"
WIDTH, HEIGHT, NUM_FRAMES, FPS, STEPS, SEED = 32, 64, 9, 16, 5, 7
# A scheduler config unlike the tiny model's plain one: dynamic shifting with the values LTX2Pipeline falls back to
# (mu from max_image_seq_len, whatever the video's size) and a stretched terminal sigma. Not copied from a real
# checkpoint's scheduler_config.json (none at hand): it checks that the family follows whatever the config says.
DYNAMIC_SHIFTING = {"use_dynamic_shifting": True, "base_shift": 0.95, "max_shift": 2.05, "base_image_seq_len": 1024,
                    "max_image_seq_len": 4096, "shift_terminal": 0.1}


def _pipeline_call(pipe, guidance_scale, output_type, num_frames=NUM_FRAMES, fps=FPS):
    """LTX2Pipeline's default call (STG, modality guidance and rescale off), same seed and sizes."""
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, num_frames=num_frames,
                frame_rate=fps, num_inference_steps=STEPS, guidance_scale=guidance_scale,
                max_sequence_length=pipe.tokenizer.model_max_length,
                generator=torch.Generator().manual_seed(SEED), output_type=output_type, return_dict=False)


def _run(denoiser, embeds, guidance_scale, **kwargs):
    latents = denoiser.prepare_latents(WIDTH, HEIGHT, NUM_FRAMES, SEED, fps=FPS)
    scheduler = kwargs.pop("scheduler", None) or denoiser.new_scheduler()
    return denoise(denoiser, scheduler, latents, embeds[0], embeds[1], guidance_scale, STEPS, **kwargs)


def _denormalized(pipe, vaes, video, audio):
    """Our outputs as LTX2Pipeline(output_type="latent") returns them: denormalised video and audio latents."""
    video = pipe._denormalize_latents(video, vaes.video.latents_mean, vaes.video.latents_std,
                                      vaes.video.config.scaling_factor)
    packed = pipe._denormalize_audio_latents(pipe._pack_audio_latents(audio), vaes.audio.latents_mean,
                                             vaes.audio.latents_std)
    return video, pipe._unpack_audio_latents(packed, audio.shape[2], num_mel_bins=audio.shape[3])


# -- (a) the explicit loop equals the pipeline ------------------------------------------------------------------------


def test_noise_equals_the_pipelines(catalogue):
    denoiser, pipe = catalogue.denoiser(MODEL), catalogue.pipeline(MODEL)
    video, extras = denoiser.outputs(denoiser.prepare_latents(WIDTH, HEIGHT, NUM_FRAMES, SEED, fps=FPS))
    generator = torch.Generator().manual_seed(SEED)
    ref_video = pipe.prepare_latents(1, 4, HEIGHT, WIDTH, NUM_FRAMES, 0.0, torch.float32, "cpu", generator)
    audio_frames = round(NUM_FRAMES / FPS * 16000 / 160 / 4.0)
    ref_audio = pipe.prepare_audio_latents(1, 2, audio_frames, 8, 0.0, torch.float32, "cpu", generator)
    assert torch.equal(pipe._pack_latents(video), ref_video)
    assert torch.equal(pipe._pack_audio_latents(extras["audio"]), ref_audio)
    assert video.shape == (1, 4, 5, HEIGHT // 2, WIDTH // 2) and extras["audio"].shape == (1, 2, audio_frames, 2)


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_explicit_loop_equals_pipeline(catalogue, embeds, guidance_scale):
    """Video AND audio latents bit for bit: one packed tensor, one scheduler, guidance in x0 space with its sigma."""
    denoiser, vaes, pipe = catalogue.denoiser(MODEL), catalogue.vae(MODEL), catalogue.pipeline(MODEL)
    ref_video, ref_audio = _pipeline_call(pipe, guidance_scale, "latent")
    video, extras = denoiser.outputs(_run(denoiser, embeds, guidance_scale))
    video, audio = _denormalized(pipe, vaes, video, extras["audio"])
    assert torch.equal(video, ref_video), (video - ref_video).abs().max()
    assert torch.equal(audio, ref_audio), (audio - ref_audio).abs().max()


def test_guidance_and_negative_prompt_matter(catalogue, embeds):
    """The comparison above is not vacuous: guidance and the negative prompt change both outputs."""
    denoiser = catalogue.denoiser(MODEL)
    guided, unguided = _run(denoiser, embeds, 4.0), _run(denoiser, embeds, 1.0)
    other_negative = (embeds[0], encode_prompts(catalogue.text_encoder(MODEL), ["sharp"]))
    for other in (unguided, _run(denoiser, other_negative, 4.0)):
        for ours, theirs in zip(_split(denoiser, guided), _split(denoiser, other)):
            assert not torch.allclose(ours, theirs)


def _split(denoiser, latents):
    video, extras = denoiser.outputs(latents)
    return video, extras["audio"]


def test_dynamic_shifting_schedule_equals_pipeline(catalogue, embeds):
    """With dynamic shifting and a terminal sigma, the family's scheduler sets the pipeline's sigmas (mu from the
    config, not from the video size) and the result is still bit-identical."""
    denoiser, vaes = catalogue.denoiser(MODEL), catalogue.vae(MODEL)
    shifted = dataclasses.replace(denoiser, scheduler_config=Ltx2EulerScheduler(**DYNAMIC_SHIFTING).config)
    pipe = catalogue.family(MODEL).pipeline(catalogue.text_encoder(MODEL), shifted, vaes)
    pipe.set_progress_bar_config(disable=True)
    ref_video, ref_audio = _pipeline_call(pipe, 4.0, "latent")
    video, extras = shifted.outputs(_run(shifted, embeds, 4.0))
    video, audio = _denormalized(pipe, vaes, video, extras["audio"])
    assert torch.equal(video, ref_video) and torch.equal(audio, ref_audio)
    plain = denoiser.new_scheduler()
    shifted_scheduler = shifted.new_scheduler()
    plain.set_timesteps(STEPS)
    shifted_scheduler.set_timesteps(STEPS)
    assert not torch.equal(plain.sigmas, shifted_scheduler.sigmas)


def test_prompt_embeddings_pack_both_streams_and_the_mask(catalogue, embeds):
    text, denoiser = catalogue.text_encoder(MODEL), catalogue.denoiser(MODEL)
    assert isinstance(text.tokenizer, ByT5Tokenizer) and isinstance(text.text_encoder.gemma, Gemma3TextModel)
    prompt = embeds[0]
    assert prompt.shape == (1, 32, 32 + 32 + 1)
    video, audio, mask = denoiser.split_prompt_embeds(prompt)
    # The connectors' mask, which the transformer gets: all ones in LTX-2.0's connectors (padding is replaced by
    # learned registers, or, as here without registers, the additive mask they return is all < 1e-6).
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.ones_like(mask))
    assert not torch.equal(video, audio)
    assert token_counts(text, [PROMPT, "x" * 40]) == [len(PROMPT) + 1, 41]
    with pytest.raises(ValueError, match="channels"):
        denoiser.split_prompt_embeds(prompt[..., :-1])


def test_prediction_steps_only_with_the_family_scheduler(catalogue, embeds):
    denoiser = catalogue.denoiser(MODEL)
    latents = denoiser.prepare_latents(WIDTH, HEIGHT, NUM_FRAMES, SEED, fps=FPS)
    scheduler = denoiser.new_scheduler()
    assert isinstance(scheduler, Ltx2EulerScheduler) and isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    scheduler.set_timesteps(STEPS)
    with torch.inference_mode():
        prediction = denoiser.predict(latents, scheduler.timesteps[0], embeds[0], embeds[1], Guidance(4.0), None)
        assert isinstance(prediction, Ltx2Prediction)
        stepped = scheduler.step(prediction, scheduler.timesteps[0], latents, return_dict=False)[0]
    assert torch.equal(stepped[:, :HEADER_SIZE], latents[:, :HEADER_SIZE])  # the header never changes
    with pytest.raises(InvalidParamsError, match="guidance_scale_2"):
        denoiser.predict(latents, scheduler.timesteps[0], embeds[0], embeds[1], Guidance(4.0, 2.0), None)
    with pytest.raises(ValueError, match="packed"):
        denoiser.outputs(torch.zeros(1, 4, 2, 8, 8))
    with pytest.raises(ValueError, match="header"):
        denoiser.outputs(latents[:, 1:])


# -- (b) resume --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 3, STEPS - 1])
def test_resume_from_checkpoint_is_bit_identical(catalogue, embeds, split):
    denoiser = catalogue.denoiser(MODEL)
    uninterrupted = _run(denoiser, embeds, 4.0)
    taken = []

    def on_step(step):
        if step.step == split:
            taken.append(to_bytes(capture("job-ltx2", scheduler, step.latents, step.step, STEPS, model=MODEL)))

    scheduler = denoiser.new_scheduler()
    _run(denoiser, embeds, 4.0, scheduler=scheduler, on_step=on_step, end_step=split)
    ckpt = from_bytes(taken[0])
    assert ckpt.scheduler_class == "Ltx2EulerScheduler" and ckpt.latents.shape == uninterrupted.shape
    fresh = denoiser.new_scheduler()
    restore_scheduler(fresh, ckpt)
    resumed = denoise(denoiser, fresh, ckpt.latents, embeds[0], embeds[1], 4.0, STEPS, start_step=split)
    assert torch.equal(resumed, uninterrupted)


# -- (c) decode --------------------------------------------------------------------------------------------------------


def test_decode_equals_pipeline_and_audio_lasts_as_long_as_the_video(catalogue, embeds):
    denoiser, decoder, pipe = catalogue.denoiser(MODEL), catalogue.chunk_decoder(MODEL), catalogue.pipeline(MODEL)
    assert isinstance(decoder, Ltx2Decoder) and not catalogue.family(MODEL).causal_decode
    assert catalogue.chunk_frames(MODEL, 2) is None  # the agent emits the whole latent as one chunk
    ref_frames, ref_audio = _pipeline_call(pipe, 4.0, "np")
    video, extras = denoiser.outputs(_run(denoiser, embeds, 4.0))

    state = decoder.new_state()
    frames = decoder.decode_chunk(state, video)
    assert frames.dtype == np.uint8 and frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert np.array_equal(frames, (ref_frames[0] * 255).round().astype(np.uint8))  # as video_to_uint8 rounds
    assert state.frames_decoded == NUM_FRAMES
    with pytest.raises(ValueError, match="whole latent"):
        decoder.decode_chunk(state, video)

    waveform, sample_rate = decoder.decode_audio(extras["audio"])
    assert waveform.dtype == np.float32 and waveform.ndim == 2 and waveform.shape[1] == 2
    assert np.array_equal(waveform, ref_audio[0].numpy().T)
    assert np.abs(waveform).max() <= 1.0
    # 9 frames at 16 fps = 0.5625 s; 14 audio latent frames -> 53 mel frames -> 8484 samples at 16 kHz = 0.530 s.
    video_s, audio_s = NUM_FRAMES / FPS, waveform.shape[0] / sample_rate
    assert sample_rate == 16000 and abs(audio_s - video_s) <= 1 / FPS, (audio_s, video_s)
    fitted = fit_length(waveform, sample_at_frame(NUM_FRAMES, FPS, sample_rate))  # as the media path muxes it
    assert fitted.shape == (9000, 2) and np.array_equal(fitted[:waveform.shape[0]], waveform)


@pytest.mark.parametrize("num_frames,fps,within_a_frame", [(17, 8, True), (121, 24, True), (33, 24, False)])
def test_audio_length_follows_frames_and_fps(catalogue, num_frames, fps, within_a_frame):
    """The audio's latent length is the video's duration (num_frames / fps) at 25 latent frames per second, rounded;
    the causal audio VAE makes 4L - 3 mel frames (10 ms each) of them. So LTX2Pipeline's audio is up to 50 ms short
    of the video: more than a frame at 24 fps for some lengths (33 frames: 45 ms), hence the media path (gpu_agents/
    segments.py, video.py) pads the track to the video's length."""
    denoiser = catalogue.denoiser(MODEL)
    _, extras = denoiser.outputs(denoiser.prepare_latents(WIDTH, HEIGHT, num_frames, SEED, fps=fps))
    frames = extras["audio"].shape[2]
    assert frames == round(num_frames / fps * 25)
    shortfall_s = num_frames / fps - (4 * frames - 3) / 100
    assert 0 <= shortfall_s <= 0.05 and (shortfall_s <= 1 / fps) == within_a_frame
    waveform = np.ones(((4 * frames - 3) * 160, 2), np.float32)
    assert fit_length(waveform, sample_at_frame(num_frames, fps, 16000)).shape[0] == round(num_frames / fps * 16000)


# -- (d) facts, (e) local directory ----------------------------------------------------------------------------------


def _params(**overrides):
    return {"width": 64, "height": 32, "num_frames": 9, "fps": 8, "steps": 4, "guidance_scale": 5.0, "seed": 1,
            "model": MODEL, "preset": "quality", "input_reference": None, **overrides}


def test_facts_and_parameter_rules(catalogue):
    facts = catalogue.facts(MODEL)
    assert facts.family == "ltx2" and facts.modalities == (T2V, AUDIO) and not facts.streams_while_generating
    # LTX2Pipeline needs multiples of 32 whatever the VAE; the tiny VAE compresses time 2x (real LTX-2: 8x, 8k+1).
    assert facts.rules.spatial_multiple == 32 and facts.rules.temporal_multiple == 2
    assert MODEL in {f.model_id for f in catalogue.all_facts()}
    check_params(_params(), catalogue)
    with pytest.raises(InvalidParamsError, match="multiple of 32"):
        check_params(_params(width=48), catalogue)
    with pytest.raises(InvalidParamsError, match="2k\\+1"):
        check_params(_params(num_frames=8), catalogue)
    with pytest.raises(InvalidParamsError, match="takes no input_reference"):
        check_params(_params(input_reference={"uri": "file:///b/x.png", "sha256": "00" * 32, "bytes": 1}), catalogue)
    with pytest.raises(InvalidParamsError, match="has one"):
        check_params(_params(guidance_scale_2=3.0), catalogue)


def test_builtin_parts_are_in_eval_mode(catalogue):
    text, denoiser, vaes = catalogue.text_encoder(MODEL), catalogue.denoiser(MODEL), catalogue.vae(MODEL)
    for module in (text.text_encoder, denoiser.transformer, vaes):
        assert not any(m.training for m in module.modules())


def test_local_directory_loads_and_gives_the_same_latents(catalogue, embeds, tmp_path):
    catalogue.save_pretrained(MODEL, tmp_path)
    local = ModelCatalogue(model_dirs={"m": str(tmp_path)})
    facts = local.facts("m")
    assert facts.family == "ltx2" and facts.modalities == (T2V, AUDIO) and facts.rules == catalogue.facts(MODEL).rules
    text = local.text_encoder("m")
    assert text.max_sequence_length == 32 and text.tokenizer.padding_side == "left"
    local_embeds = (encode_prompts(text, [PROMPT]), encode_prompts(text, [NEGATIVE]))
    assert torch.equal(local_embeds[0], embeds[0]) and torch.equal(local_embeds[1], embeds[1])
    denoiser = local.denoiser("m")
    assert isinstance(denoiser.new_scheduler(), Ltx2EulerScheduler)
    latents = _run(denoiser, local_embeds, 4.0)
    assert torch.equal(latents, _run(catalogue.denoiser(MODEL), embeds, 4.0))
    video, extras = denoiser.outputs(latents)
    decoder = local.chunk_decoder("m")
    reference = catalogue.chunk_decoder(MODEL)
    assert np.array_equal(decoder.decode_chunk(decoder.new_state(), video),
                          reference.decode_chunk(reference.new_state(), video))
    assert np.array_equal(decoder.decode_audio(extras["audio"])[0], reference.decode_audio(extras["audio"])[0])
