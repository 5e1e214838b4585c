"""Delivery renditions of a master video: an H.264 bitrate ladder and HLS VOD playlists for it.

Plain functions, no Kafka. Each rendition is a progressive MP4 from `gpu_agents.video.encode_mp4`, so it can be
served (and C2PA-signed) on its own as a download. A master with sound gives every rendition the same AAC track
(encoded again from the master's decoded samples: the rungs differ in pictures only).

HLS: a master playlist may only point at media playlists, never at a bare MP4, and a progressive MP4 cannot be an
HLS segment. So streaming is two steps per rendition:
1. `hls_media(rendition, segment_uri)` remuxes the MP4 (no re-encode) into ONE fragmented MP4 file and writes the
   media playlist that addresses its init section and fragments by byte range (FFmpeg's own HLS muxer does both);
2. `hls_vod_playlist(renditions, media_playlist_uris)` writes the master playlist over those media playlists.
The fragmented file is a different byte stream from the progressive one: a C2PA manifest on the progressive MP4
does not cover it, so `sign_hls_media` signs it on its own and moves the playlist's byte ranges to match.
"""
from __future__ import annotations

import io
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import av
import numpy as np

from gpu_agents.segments import top_level_boxes
from gpu_agents.video import encode_mp4


@dataclass(frozen=True)
class Rung:
    """One step of the ladder: frame size as a fraction of the master's, and libx264's constant-rate factor."""
    name: str
    scale: float
    crf: int


DEFAULT_LADDER = (Rung("native", scale=1.0, crf=20), Rung("half", scale=0.5, crf=23))
# Below this many pixels on the shorter side a rendition is not worth serving.
MIN_SIDE = 32


@dataclass(frozen=True)
class Rendition:
    name: str
    width: int
    height: int
    bitrate: int  # bits per second over the whole file: 8 * len(data) / duration (container overhead included)
    data: bytes  # progressive H.264 MP4, with the master's AAC track when it has one


@dataclass(frozen=True)
class HlsMedia:
    """One rendition ready for HLS: its media playlist and the single fragmented MP4 that playlist addresses."""
    playlist: str
    segment_data: bytes


def rendition_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) scaled and rounded to the nearest even numbers (4:2:0 chroma needs both even).

    Ties round down (65 -> 64, not 66), so a rendition is never larger than its scaled size.
    """
    def even(side: float) -> int:
        return max(2, 2 * math.ceil(side / 2 - 0.5))
    return even(width * scale), even(height * scale)


def encode_renditions(frames: np.ndarray, fps: float, ladder: Sequence[Rung] = DEFAULT_LADDER,
                      min_side: int = MIN_SIDE, audio: np.ndarray | None = None,
                      sample_rate: int | None = None) -> list[Rendition]:
    """Encode uint8 RGB master frames (F, H, W, 3) once per rung of `ladder`, in ladder order, each with the
    master's audio (float (samples, channels) at `sample_rate`, as `encode_mp4` takes it) when given.

    A rung is skipped when its shorter side falls below `min_side` or when it comes out the same size as an
    earlier rung (e.g. two rungs that round alike on a small master).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be non-empty uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    master_height, master_width = frames.shape[1:3]
    duration_s = len(frames) / fps
    renditions: list[Rendition] = []
    sizes_done: set[tuple[int, int]] = set()
    for rung in ladder:
        width, height = rendition_size(master_width, master_height, rung.scale)
        if min(width, height) < min_side or (width, height) in sizes_done:
            continue
        sizes_done.add((width, height))
        scaled = resize_frames(frames, width, height)
        data = encode_mp4(scaled, fps, crf=rung.crf, audio=audio, sample_rate=sample_rate)
        renditions.append(Rendition(rung.name, width, height, round(8 * len(data) / duration_s), data))
    return renditions


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize RGB frames with libswscale. Area averaging when shrinking (no aliasing), bicubic when enlarging."""
    master_height, master_width = frames.shape[1:3]
    if (master_width, master_height) == (width, height):
        return frames
    interpolation = "AREA" if width <= master_width and height <= master_height else "BICUBIC"
    resized = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for index, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        resized[index] = frame.reformat(width, height, interpolation=interpolation).to_ndarray()
    return resized


def h264_codecs_attribute(mp4: bytes) -> str:
    """RFC 6381 codec string ("avc1.PPCCLL") from the stream's avcC record: profile, constraint flags, level."""
    with av.open(io.BytesIO(mp4), mode="r") as container:
        avc_config = container.streams.video[0].codec_context.extradata
    if not avc_config or avc_config[0] != 1:  # avcC starts with configurationVersion 1
        raise ValueError("no avcC record: not an H.264 MP4")
    return "avc1." + avc_config[1:4].hex()


def aac_codecs_attribute(mp4: bytes) -> str | None:
    """RFC 6381 codec string ("mp4a.40.T") of the MP4's audio track, T being the AAC object type (2: AAC-LC) from its
    AudioSpecificConfig; None without an audio track."""
    with av.open(io.BytesIO(mp4), mode="r") as container:
        if not container.streams.audio:
            return None
        audio_config = container.streams.audio[0].codec_context.extradata
    if not audio_config:
        raise ValueError("no AudioSpecificConfig: not an AAC track")
    return f"mp4a.40.{audio_config[0] >> 3}"  # the object type is its first 5 bits


def codecs_attribute(mp4: bytes) -> str:
    """The HLS CODECS value of an MP4: its H.264 codec string, and its AAC one when it has sound."""
    return ",".join(filter(None, (h264_codecs_attribute(mp4), aac_codecs_attribute(mp4))))


def hls_vod_playlist(renditions: Sequence[Rendition], uris: Sequence[str]) -> str:
    """HLS master playlist: one variant per rendition, `uris[i]` being the URI of rendition i's media playlist.

    BANDWIDTH should be the peak segment bitrate; it is the whole-file average here, which is exact when the
    rendition is a single segment (short clips: x264 places keyframes ~10 s apart) and an underestimate otherwise.
    """
    if len(renditions) != len(uris):
        raise ValueError(f"{len(renditions)} renditions but {len(uris)} URIs")
    if not renditions:
        raise ValueError("a master playlist needs at least one rendition")
    lines = ["#EXTM3U", "#EXT-X-VERSION:7", "#EXT-X-INDEPENDENT-SEGMENTS"]
    # Highest bitrate first: players that ignore BANDWIDTH start with the first variant listed.
    for rendition, uri in sorted(zip(renditions, uris), key=lambda pair: -pair[0].bitrate):
        if not uri or any(character in uri for character in "\r\n"):
            raise ValueError(f"bad playlist URI {uri!r}")
        lines.append(
            f"#EXT-X-STREAM-INF:BANDWIDTH={rendition.bitrate},AVERAGE-BANDWIDTH={rendition.bitrate},"
            f'RESOLUTION={rendition.width}x{rendition.height},CODECS="{codecs_attribute(rendition.data)}"'
        )
        lines.append(uri)
    return "\n".join(lines) + "\n"


def hls_media(rendition: Rendition, segment_uri: str) -> HlsMedia:
    """Remux a rendition into one fragmented MP4 plus the byte-range VOD media playlist that addresses it.

    The playlist names the file `segment_uri` (relative to the playlist, as HLS resolves URIs). Stream copy: the
    H.264 (and the AAC, when there is sound) is not re-encoded, so pictures are identical to the progressive MP4's.
    """
    if not segment_uri or any(character in segment_uri for character in '\r\n"'):
        raise ValueError(f"bad segment URI {segment_uri!r}")
    # FFmpeg's HLS muxer opens its outputs by file name, so it works in a scratch directory.
    with tempfile.TemporaryDirectory(prefix="vidgen-hls-") as scratch:
        playlist_path = Path(scratch) / "media.m3u8"
        hls_options = {
            "hls_segment_type": "fmp4",
            "hls_flags": "single_file",  # one file, segments addressed with EXT-X-BYTERANGE
            "hls_playlist_type": "vod",
            "hls_time": "4",  # target segment length; cuts fall on keyframes only
        }
        with av.open(io.BytesIO(rendition.data), mode="r") as source, \
                av.open(str(playlist_path), mode="w", format="hls", options=hls_options) as target:
            source_streams = [source.streams.video[0], *source.streams.audio[:1]]
            target_streams = {stream.index: target.add_stream_from_template(stream) for stream in source_streams}
            for packet in source.demux(source_streams):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                packet.stream = target_streams[packet.stream.index]
                target.mux(packet)
        segment_files = [path for path in Path(scratch).iterdir() if path != playlist_path]
        if len(segment_files) != 1:
            raise RuntimeError(f"expected one fragmented MP4 from the HLS muxer, got {segment_files}")
        segment_file = segment_files[0]
        playlist = playlist_path.read_text()
        segment_data = segment_file.read_bytes()
    # The muxer refers to the file by its scratch name, as the EXT-X-MAP URI and as each segment's URI line.
    playlist = playlist.replace(f'URI="{segment_file.name}"', f'URI="{segment_uri}"')
    playlist = "\n".join(segment_uri if line == segment_file.name else line for line in playlist.splitlines()) + "\n"
    return HlsMedia(playlist=playlist, segment_data=segment_data)


def sign_hls_media(media: HlsMedia, sign: Callable[[bytes], bytes]) -> HlsMedia:
    """Sign the fragmented MP4 of an HLS rendition and move its playlist's byte ranges to match.

    A C2PA signer inserts its manifest as one top-level ``uuid`` box (after ``ftyp``) and changes nothing else, so
    every range after the insertion point moves by the box's size and the range that spans it (the init section,
    EXT-X-MAP) grows by that size. Checked, not assumed: the signed file must tile into the same boxes plus one.
    """
    signed = sign(media.segment_data)
    before = top_level_boxes(media.segment_data)
    after = top_level_boxes(signed)
    inserted = [(offset, size) for box_type, offset, size in after if box_type == b"uuid"]
    if len(after) != len(before) + 1 or len(inserted) != 1:
        raise RuntimeError("signing the fragmented MP4 did not add exactly one top-level uuid box")
    at, delta = inserted[0]

    def moved(match: re.Match) -> str:
        length, offset = int(match["length"]), int(match["offset"])
        if offset >= at:
            offset += delta
        elif offset + length > at:
            length += delta
        return f"{match['prefix']}{length}@{offset}"

    playlist = BYTERANGE.sub(moved, media.playlist)
    return HlsMedia(playlist=playlist, segment_data=signed)


BYTERANGE = re.compile(r'(?P<prefix>BYTERANGE[:=]"?)(?P<length>\d+)@(?P<offset>\d+)')
