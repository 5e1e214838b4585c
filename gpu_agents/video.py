"""From latents to an MP4: VAE decoding, latent chunking, H.264 encoding and an optional AAC audio track with PyAV
(all in memory)."""

from __future__ import annotations

import io
from fractions import Fraction
from typing import NamedTuple

import av
import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor

# libx264 constant-rate factor: 18 is visually lossless for most content.
DEFAULT_CRF = 18

# FFmpeg's native AAC encoder (AAC-LC). It encodes 1024 samples per packet and starts with one priming packet (the
# encoder's delay: pts -1024), whose samples are not part of the audio.
AAC_ENCODER = "aac"
AAC_FRAME_SAMPLES = 1024
AAC_SAMPLE_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350})
# Generous for speech and effects at LTX-2's 24 kHz. AAC-LC allows at most 6144 bits per channel and packet, less than
# this below 16 kHz: there the encoder gets that cap (instead of clamping with a warning).
AAC_BITS_PER_SECOND_PER_CHANNEL = 96_000
AAC_MAX_BITS_PER_CHANNEL_AND_PACKET = 6144
CHANNEL_LAYOUTS = {1: "mono", 2: "stereo"}


class Audio(NamedTuple):
    """An audio track as float32 samples (samples, channels) in [-1, 1]; sample 0 plays with frame 0."""
    waveform: np.ndarray
    sample_rate: int


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


def encode_mp4(frames: np.ndarray, fps: float, crf: int = DEFAULT_CRF, audio: np.ndarray | None = None,
               sample_rate: int | None = None) -> bytes:
    """Encode uint8 RGB frames (F, H, W, 3) as an H.264 (yuv420p) MP4 held in memory, with an AAC track when
    `audio` (float samples (samples, channels), 1 or 2 channels, in [-1, 1]) and its `sample_rate` are given.

    Every frame is written with pts = its index in a 1/fps time base, so none is dropped or duplicated.
    Height and width must be even (4:2:0 chroma subsampling halves both). The audio is cut or padded with
    silence to the video's duration (to the sample); the muxer's edit list hides the AAC priming packet.
    """
    check_frames(frames, fps)
    waveform = None if audio is None and sample_rate is None else check_audio(audio, sample_rate)
    # A movie time scale of the sample rate makes the edit lists, and so the audio's duration, exact to the sample
    # (the default, milliseconds, rounds them). Only with audio: video-only files stay as they were.
    options = {} if waveform is None else {"movie_timescale": str(sample_rate)}
    buffer = io.BytesIO()
    # No "movflags=+faststart": its second pass reopens the output by file name, which a BytesIO
    # does not have, so the index (moov) stays at the end of the file.
    with av.open(buffer, mode="w", format="mp4", options=options) as container:
        video = add_h264_stream(container, frames, fps, crf)
        if waveform is not None:
            aac = add_aac_stream(container, sample_rate, waveform.shape[1])
        mux_frames(container, video, frames)
        if waveform is not None:
            num_samples = sample_at_frame(len(frames), fps, sample_rate)
            container.mux(encode_aac(aac, fit_length(waveform, num_samples)))
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


def check_audio(audio: np.ndarray | None, sample_rate: int | None) -> np.ndarray:
    """The waveform as contiguous float32 (samples, channels), clipped to [-1, 1]; ValueError if it cannot be one.

    Overshoot past ±1 (a vocoder's peaks) is clipped here because a player would clip it anyway; integer PCM is
    refused rather than scaled, since its full scale is not known from the array.
    """
    if audio is None or sample_rate is None:
        raise ValueError("audio and sample_rate go together: give both or neither")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if sample_rate not in AAC_SAMPLE_RATES:
        raise ValueError(f"AAC cannot carry {sample_rate} Hz; resample to one of {sorted(AAC_SAMPLE_RATES)}")
    audio = np.asarray(audio)
    if audio.ndim != 2 or audio.shape[1] not in CHANNEL_LAYOUTS or not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"audio must be float (samples, channels) with 1 or 2 channels, got {audio.dtype} "
                         f"{audio.shape}")
    if len(audio) == 0:
        raise ValueError("audio has no samples")
    if not np.isfinite(audio).all():
        raise ValueError("audio contains NaN or infinite samples")
    return np.ascontiguousarray(np.clip(audio, -1.0, 1.0), dtype=np.float32)


def frame_rate(fps: float) -> Fraction:
    """The exact rate the video is stamped with: 23.976 -> 24000/1001."""
    return Fraction(fps).limit_denominator(1001)


def sample_at_frame(frame_index: int, fps: float, sample_rate: int) -> int:
    """The audio sample that plays with the start of video frame `frame_index` (frame i starts at i / frame_rate)."""
    return round(frame_index * sample_rate / frame_rate(fps))


def fit_length(waveform: np.ndarray, num_samples: int) -> np.ndarray:
    """`waveform` cut to `num_samples`, or padded with silence to it."""
    if len(waveform) >= num_samples:
        return waveform[:num_samples]
    return np.concatenate([waveform, np.zeros((num_samples - len(waveform), waveform.shape[1]), np.float32)])


def add_h264_stream(container: av.container.OutputContainer, frames: np.ndarray, fps: float, crf: int,
                    encoder_options: dict[str, str] | None = None) -> av.VideoStream:
    """A libx264 (yuv420p) stream for frames shaped like `frames`, in a 1/fps time base."""
    rate = frame_rate(fps)
    stream = container.add_stream("libx264", rate=rate)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.time_base = 1 / rate
    stream.options = {"crf": str(crf), **(encoder_options or {})}
    return stream


def mux_frames(container: av.container.OutputContainer, stream: av.VideoStream, frames: np.ndarray,
               first_pts: int = 0) -> None:
    """Encode `frames` into `stream` with pts first_pts, first_pts + 1, ... and mux them, flushing the encoder."""
    # 1/fps, not the stream's time base: the muxer changes that (to 1/12288 for 24 fps) when it writes the header, at
    # the first packet, which libx264 holds back ~40 frames; frames stamped after that in the stream's new time base
    # went backwards in time and failed the mux ("pts < dts") from ~42 frames on.
    time_base = 1 / stream.codec_context.framerate
    for pts, rgb in enumerate(frames, start=first_pts):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = pts
        frame.time_base = time_base
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))  # flush frames the encoder still holds


def mux_h264(container: av.container.OutputContainer, frames: np.ndarray, fps: float, crf: int,
             first_pts: int = 0, encoder_options: dict[str, str] | None = None) -> None:
    """Add a libx264 (yuv420p) stream to `container` and encode `frames` into it, flushing the encoder.

    Frame i gets pts = first_pts + i in a 1/fps time base. `frames` must pass check_frames.
    """
    mux_frames(container, add_h264_stream(container, frames, fps, crf, encoder_options), frames, first_pts)


def add_aac_stream(container: av.container.OutputContainer, sample_rate: int, channels: int) -> av.AudioStream:
    """An AAC-LC stream in a 1/sample_rate time base. Add it before muxing anything: the header lists every stream."""
    stream = container.add_stream(AAC_ENCODER, rate=sample_rate, layout=CHANNEL_LAYOUTS[channels])
    stream.time_base = Fraction(1, sample_rate)
    packet_cap = AAC_MAX_BITS_PER_CHANNEL_AND_PACKET * sample_rate // AAC_FRAME_SAMPLES
    stream.codec_context.bit_rate = min(AAC_BITS_PER_SECOND_PER_CHANNEL, packet_cap) * channels
    return stream


def encode_aac(stream: av.AudioStream, waveform: np.ndarray) -> list[av.Packet]:
    """All AAC packets of `waveform` (float32 (samples, channels)), sample 0 at pts 0, encoder flushed.

    The first packet is the encoder's priming (pts -AAC_FRAME_SAMPLES); the last one's duration ends the audio.
    """
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(waveform.T), format="fltp",
                                       layout=CHANNEL_LAYOUTS[waveform.shape[1]])
    frame.sample_rate = stream.codec_context.sample_rate
    frame.pts = 0
    frame.time_base = stream.time_base
    return [*stream.encode(frame), *stream.encode(None)]  # PyAV cuts the frame into encoder-sized ones


def read_mp4(data: bytes) -> np.ndarray:
    """Decode every frame of an MP4 to uint8 RGB (F, H, W, 3)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack(frames)


def read_audio(data: bytes) -> Audio | None:
    """Decode an MP4's first audio track to float32 (samples, channels), sample 0 at time 0; None without one.

    The samples end where the track's packets say the audio ends: the decoder also returns the encoder's padding
    in the last AAC packet, which the muxer marks by giving that packet a shorter duration. So an `encode_mp4` file
    gives back exactly as many samples as it was given.
    """
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        sample_rate = stream.codec_context.sample_rate
        channels = len(stream.codec_context.layout.channels)
        to_samples = stream.time_base * sample_rate
        decoded, end = [], 0
        for packet in container.demux(stream):
            if packet.pts is not None and packet.duration:
                end = max(end, round((packet.pts + packet.duration) * to_samples))
            decoded += packet.decode()
    if not decoded:
        return Audio(np.zeros((0, channels), np.float32), sample_rate)
    waveform = np.concatenate([frame.to_ndarray() for frame in decoded], axis=1).T.astype(np.float32)
    # Keep the samples on the file's timeline: a track that starts late (a segment on its own) starts with silence.
    start = round(decoded[0].pts * decoded[0].time_base * sample_rate)
    if start > 0:
        waveform = np.concatenate([np.zeros((start, channels), np.float32), waveform])
    else:
        waveform = waveform[-start:]
    return Audio(np.ascontiguousarray(waveform[:end]), sample_rate)


def probe_mp4(data: bytes) -> dict:
    """Container facts without decoding: {"frames", "width", "height", "fps", "codec"}, and, when the file has an
    audio track, "audio": {"codec", "sample_rate", "channels", "duration_s"}."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        # The mp4 index records the frame count; count packets only if a muxer left it out.
        num_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size > 0)
        facts = {
            "frames": num_frames,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate) if stream.average_rate else None,
            "codec": stream.codec_context.name,
        }
        if container.streams.audio:
            facts["audio"] = _audio_facts(container, container.streams.audio[0])
        return facts


def _audio_facts(container: av.container.InputContainer, stream: av.AudioStream) -> dict:
    # From the packets, not the header: a fragmented MP4's header predates its samples, and FFmpeg states the
    # duration of a lone segment from time 0. The first packet may be AAC priming, before the stated start.
    container.seek(0)
    end = max((packet.pts + packet.duration for packet in container.demux(stream)
               if packet.pts is not None and packet.duration), default=0)
    start = stream.start_time or 0
    return {
        "codec": stream.codec_context.name,
        "sample_rate": stream.codec_context.sample_rate,
        "channels": len(stream.codec_context.layout.channels),
        "duration_s": float(max(0, end - start) * stream.time_base),
    }
