"""VAE decoding against WanPipeline, latent chunking, and MP4 encoding with PyAV."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from gpu_agents.models import ModelCatalogue
from gpu_agents.video import decode_latents, encode_mp4, join_latent_chunks, probe_mp4, read_mp4, split_latent_chunks

MODEL_ID = "tiny-wan"


def _pipeline_frames(pipe, output_type: str, num_frames: int):
    with torch.inference_mode():
        return pipe(
            "a lighthouse at dusk",
            negative_prompt="",
            height=64,
            width=80,
            num_frames=num_frames,
            num_inference_steps=2,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(5),
            output_type=output_type,
            max_sequence_length=32,
        ).frames


def _gradient_clip(num_frames: int, height: int, width: int) -> np.ndarray:
    """A smooth colour gradient drifting one pixel per frame: easy for H.264, so errors stay small."""
    y = np.arange(height)[:, None]
    x = np.arange(width)[None, :]
    frames = []
    for index in range(num_frames):
        red = (x + index) * 255.0 / (width + num_frames)
        green = (y + index) * 255.0 / (height + num_frames)
        blue = np.full((height, width), 40.0 + 4 * index)
        frames.append(np.stack(np.broadcast_arrays(red, green, blue), axis=-1))
    return np.stack(frames).round().astype(np.uint8)


@pytest.mark.parametrize("num_frames", [1, 9])
def test_decode_latents_equals_pipeline(num_frames):
    pipe = ModelCatalogue().pipeline(MODEL_ID)
    latents = _pipeline_frames(pipe, "latent", num_frames)
    reference = _pipeline_frames(pipe, "np", num_frames)  # (1, F, H, W, 3) floats in [0, 1]

    frames = decode_latents(pipe.vae, latents)

    assert frames.dtype == np.uint8
    assert frames.shape == (num_frames, 64, 80, 3)
    assert np.array_equal(frames, (reference[0] * 255).round().astype(np.uint8))


def test_decode_latents_takes_one_video():
    vae = ModelCatalogue().vae(MODEL_ID)
    with pytest.raises(ValueError, match="one video"):
        decode_latents(vae, torch.zeros(2, 16, 1, 8, 8))


@pytest.mark.parametrize("frames_per_chunk", [1, 2, 3, 7, 10])
def test_latent_chunks_round_trip(frames_per_chunk):
    latents = torch.randn(1, 16, 7, 6, 10, generator=torch.Generator().manual_seed(0))
    chunks = split_latent_chunks(latents, frames_per_chunk)

    assert len(chunks) == -(-7 // frames_per_chunk)
    assert all(chunk.shape[2] <= frames_per_chunk for chunk in chunks)
    assert all(chunk.is_contiguous() for chunk in chunks)
    assert torch.equal(join_latent_chunks(chunks), latents)


def test_latent_chunks_reject_bad_input():
    with pytest.raises(ValueError):
        split_latent_chunks(torch.zeros(1, 16, 3, 8, 8), 0)
    with pytest.raises(ValueError):
        join_latent_chunks([])


@pytest.mark.parametrize("num_frames, height, width", [(17, 64, 64), (33, 48, 80), (1, 64, 64)])
def test_mp4_round_trip(num_frames, height, width):
    clip = _gradient_clip(num_frames, height, width)
    data = encode_mp4(clip, fps=16)

    assert data[4:8] == b"ftyp"
    assert probe_mp4(data) == {"frames": num_frames, "width": width, "height": height, "fps": 16.0, "codec": "h264"}
    decoded = read_mp4(data)
    assert decoded.shape == clip.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(np.int16) - clip.astype(np.int16)).mean() < 8


def test_mp4_keeps_frame_order():
    """Every frame survives in order: distinct flat grey levels come back where they were."""
    levels = np.linspace(30, 220, 21).round().astype(np.uint8)
    clip = np.broadcast_to(levels[:, None, None, None], (21, 32, 32, 3)).copy()
    decoded = read_mp4(encode_mp4(clip, fps=24))
    assert np.abs(decoded.mean(axis=(1, 2, 3)) - levels).max() < 3


def test_mp4_longer_than_the_encoders_lookahead():
    """libx264 holds back ~40 frames before its first packet; the frames after that keep their 1/fps stamps."""
    clip = _gradient_clip(50, 32, 32)
    data = encode_mp4(clip, fps=24)
    assert probe_mp4(data)["frames"] == 50
    assert np.abs(read_mp4(data).astype(np.int16) - clip.astype(np.int16)).mean() < 8


def test_mp4_fractional_fps():
    data = encode_mp4(_gradient_clip(5, 32, 32), fps=24000 / 1001)
    assert probe_mp4(data)["fps"] == pytest.approx(23.976, abs=1e-3)


def test_decoded_video_encodes():
    pipe = ModelCatalogue().pipeline(MODEL_ID)
    frames = decode_latents(pipe.vae, _pipeline_frames(pipe, "latent", 9))
    data = encode_mp4(frames, fps=16)
    assert probe_mp4(data)["frames"] == 9
    assert read_mp4(data).shape == frames.shape


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.zeros((3, 63, 64, 3), np.uint8), "even height and width"),
        (np.zeros((3, 64, 64, 3), np.float32), "uint8"),
        (np.zeros((3, 64, 64), np.uint8), "shape"),
        (np.zeros((0, 64, 64, 3), np.uint8), "no frames"),
    ],
)
def test_encode_mp4_rejects_bad_frames(frames, message):
    with pytest.raises(ValueError, match=message):
        encode_mp4(frames, fps=16)
