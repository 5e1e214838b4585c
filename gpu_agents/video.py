"""From latents to an MP4: VAE decoding, latent chunking and H.264 encoding with PyAV (all in memory)."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor

# libx264 constant-rate factor: 18 is visually lossless for most content.
DEFAULT_CRF = 18


@torch.inference_mode()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> np.ndarray:
    """Decode one video's latents (1, C, T, h, w) to uint8 frames (F, H, W, 3), as WanPipeline does.

    Pixels are rounded, (x * 255).round(), like diffusers' PyAV exporter `encode_video`
    (the older `export_to_video` truncates with astype(uint8) instead).
    """
    if latents.shape[0] != 1:
        raise ValueError(f"decode_latents takes one video at a time, got a batch of {latents.shape[0]}")
    video = vae.decode(denormalize_latents(vae, latents), return_dict=False)[0]
    return video_to_uint8(vae, video)


def denormalize_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Latents as the denoiser emits them (normalised per channel) -> what `vae.decode` takes, in the VAE's dtype."""
    z_dim = vae.config.z_dim
    latents = latents.to(vae.dtype)
    # Latents are stored normalised per channel; undo it exactly as WanPipeline does
    # (dividing by 1/std rather than multiplying by std; the rounding differs).
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    return latents / latents_std + latents_mean


def video_to_uint8(vae: AutoencoderKLWan, video: torch.Tensor) -> np.ndarray:
    """VAE output (1, 3, F, H, W) in [-1, 1] -> rounded uint8 frames (F, H, W, 3), as WanPipeline postprocesses."""
    video_processor = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial)
    frames = video_processor.postprocess_video(video, output_type="np")[0]  # (F, H, W, 3) floats in [0, 1]
    return (frames * 255).round().astype(np.uint8)


def split_latent_chunks(latents: torch.Tensor, frames_per_chunk: int) -> list[torch.Tensor]:
    """Split latents along the latent time axis (dim 2); the last chunk may be shorter.

    Chunks are contiguous copies, so each can be serialised on its own.
    """
    if frames_per_chunk < 1:
        raise ValueError(f"frames_per_chunk must be >= 1, got {frames_per_chunk}")
    return [chunk.contiguous() for chunk in torch.split(latents, frames_per_chunk, dim=2)]


def join_latent_chunks(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of split_latent_chunks."""
    if not chunks:
        raise ValueError("no chunks to join")
    return torch.cat(chunks, dim=2)


def encode_mp4(frames: np.ndarray, fps: float, crf: int = DEFAULT_CRF) -> bytes:
    """Encode uint8 RGB frames (F, H, W, 3) as an H.264 (yuv420p) MP4 held in memory.

    Every frame is written with pts = its index in a 1/fps time base, so none is dropped or duplicated.
    Height and width must be even (4:2:0 chroma subsampling halves both).
    """
    check_frames(frames, fps)
    buffer = io.BytesIO()
    # No "movflags=+faststart": its second pass reopens the output by file name, which a BytesIO
    # does not have, so the index (moov) stays at the end of the file.
    with av.open(buffer, mode="w", format="mp4") as container:
        mux_h264(container, frames, fps, crf)
    return buffer.getvalue()


def check_frames(frames: np.ndarray, fps: float) -> None:
    """Raise ValueError unless `frames` is non-empty uint8 (F, H, W, 3) with even sides and fps is positive."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 with shape (F, H, W, 3), got {frames.dtype} {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if num_frames == 0:
        raise ValueError("no frames to encode")
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even height and width, got {height}x{width}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")


def mux_h264(container: av.container.OutputContainer, frames: np.ndarray, fps: float, crf: int,
             first_pts: int = 0, encoder_options: dict[str, str] | None = None) -> None:
    """Add a libx264 (yuv420p) stream to `container` and encode `frames` into it, flushing the encoder.

    Frame i gets pts = first_pts + i in a 1/fps time base. `frames` must pass check_frames.
    """
    rate = Fraction(fps).limit_denominator(1001)  # 23.976 -> 24000/1001
    stream = container.add_stream("libx264", rate=rate)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.time_base = 1 / rate
    stream.options = {"crf": str(crf), **(encoder_options or {})}
    for pts, rgb in enumerate(frames, start=first_pts):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = pts
        frame.time_base = stream.time_base
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))  # flush frames the encoder still holds


def read_mp4(data: bytes) -> np.ndarray:
    """Decode every frame of an MP4 to uint8 RGB (F, H, W, 3)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack(frames)


def probe_mp4(data: bytes) -> dict:
    """Container facts without decoding: {"frames", "width", "height", "fps", "codec"}."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        # The mp4 index records the frame count; count packets only if a muxer left it out.
        num_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size > 0)
        return {
            "frames": num_frames,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate) if stream.average_rate else None,
            "codec": stream.codec_context.name,
        }
