"""Playable output while a video is still decoding: fragmented-MP4 segments and a live HLS playlist.

Each chunk of decoded frames is encoded on its own, in a short-lived container, into an init segment
(ftyp + moov: codec setup, no samples) and a media segment (moof + mdat: the chunk's frames). Every
chunk's frames are stamped with their global frame indices, so the media segments of a job line up on one
timeline: init + segment 0 + segment 1 + ... is one valid fragmented MP4, and an HLS playlist listing the
segments behind one EXT-X-MAP plays while later chunks are still being made.

The init segment carries only settings that are equal for every chunk of a job (size, frame rate, CRF, and the
audio's sample rate and channels), so it comes out byte-identical each time and is stored once.

Audio (AAC) cannot be cut at arbitrary samples the way the video is cut at frames: an AAC packet holds 1024
samples and decodes only together with the packet before it (overlapping transforms), and a fresh encoder starts
with a priming packet. Encoding each chunk's audio on its own would put a glitch (or a gap) at every chunk boundary.
So each segment carries the very packets ONE continuous encode of the job's whole track has between its chunk's
first frame and the next chunk's, both rounded to the nearest packet: the segments join gaplessly (the joined
track equals the continuous encode byte for byte), and each segment's audio starts within half a packet (512
samples, 21 ms at 24 kHz) of its frames. The priming packet is left out rather than hidden by an edit list (which
would have to be in the init segment): FFmpeg applies such an edit list to whatever fragment it reads first, which
shifts a segment played on its own by a packet. Without the priming packet the job's first half packet of sound (512
samples, 21 ms at 24 kHz) decodes silent; after that the joined track decodes as the continuous encode does.
"""

from __future__ import annotations

import io
import math
import struct

import av
import numpy as np

from .video import (AAC_FRAME_SAMPLES, DEFAULT_CRF, add_aac_stream, add_h264_stream, check_audio, check_frames,
                    encode_aac, fit_length, mux_frames, mux_h264, sample_at_frame)

# empty_moov: the moov comes first and holds no samples, so it does not depend on the chunk;
# frag_keyframe: fragments start at keyframes (each chunk starts with one, being a fresh encoder);
# default_base_moof: sample offsets relative to their own moof, so a segment is valid wherever it lands;
# frag_discont: take the fragment's decode time (tfdt) from the frames' timestamps instead of starting at 0;
# skip_trailer: no mfra index at the end, which would only be valid at the end of a single-chunk file.
FRAGMENTED_MP4_OPTIONS = {
    "movflags": "frag_keyframe+empty_moov+default_base_moof+frag_discont+skip_trailer",
    # Keep timestamps as given: shifting them to start at 0 would put every chunk at the start of the video.
    "avoid_negative_ts": "disabled",
}

# No B-frames: with them libx264 delays decode timestamps by two frames, which shifts every later chunk
# two frames late (the first chunk has no earlier frames to borrow the time from). With only I and P
# frames, decode time equals presentation time and each segment starts exactly at its first frame's index.
# (It also makes libx264's output byte-reproducible here, which B-frame decisions were not.)
SEGMENT_ENCODER_OPTIONS = {"bf": "0"}

_INIT_BOXES = frozenset({b"ftyp", b"moov", b"free"})
_MEDIA_BOXES = frozenset({b"styp", b"sidx", b"moof", b"mdat", b"free"})


class SegmentError(ValueError):
    """Bytes that are not the init or media segment they are passed as."""


def encode_init_and_segment(
    frames: np.ndarray, fps: float, first_frame_index: int, crf: int = DEFAULT_CRF,
    audio: np.ndarray | None = None, sample_rate: int | None = None,
) -> tuple[bytes, bytes]:
    """Encode one chunk of uint8 RGB frames (F, H, W, 3) as (init segment, media segment).

    H.264 (libx264, yuv420p, I and P frames only, starting with a keyframe). Frame i of the chunk is
    stamped first_frame_index + i in a 1/fps time base, so the job's segments follow one another.

    `audio` is the JOB's whole audio track, not the chunk's part: float (samples, channels), 1 or 2 channels, in
    [-1, 1], sample 0 playing with frame 0, with its `sample_rate`. Pass the same track for every chunk; the segment
    gets an AAC track with this chunk's share of it (see the module's docstring). A track shorter than the video
    is padded with silence; a longer one is cut where the last chunk ends.
    """
    check_frames(frames, fps)
    if first_frame_index < 0:
        raise ValueError(f"first_frame_index must be >= 0, got {first_frame_index}")
    waveform = None if audio is None and sample_rate is None else check_audio(audio, sample_rate)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", options=FRAGMENTED_MP4_OPTIONS) as container:
        if waveform is None:
            mux_h264(container, frames, fps, crf, first_pts=first_frame_index, encoder_options=SEGMENT_ENCODER_OPTIONS)
        else:
            video = add_h264_stream(container, frames, fps, crf, SEGMENT_ENCODER_OPTIONS)
            aac = add_aac_stream(container, sample_rate, waveform.shape[1])
            mux_frames(container, video, frames, first_pts=first_frame_index)
            container.mux(chunk_aac_packets(aac, waveform, fps, first_frame_index, len(frames)))
    data = buffer.getvalue()
    media_start = next((offset for box_type, offset, _ in top_level_boxes(data) if box_type == b"moof"), None)
    if media_start is None:
        raise SegmentError("the muxer wrote no fragment")  # ffmpeg without fragmented-MP4 support
    return data[:media_start], data[media_start:]


# How far past a chunk's last packet the continuous encode must run for that packet to come out as it would in
# the encode of the whole track: its transform window reaches one packet further and the encoder's window-switching
# looks one more ahead; one more to spare. (tests/test_audio_media.py checks the joined track against the whole.)
AAC_LOOKAHEAD_SAMPLES = 3 * AAC_FRAME_SAMPLES


def audio_packet_boundary(frame_index: int, fps: float, sample_rate: int) -> int:
    """Where the audio of the chunk starting at `frame_index` starts: the packet start nearest to that frame's."""
    return AAC_FRAME_SAMPLES * round(sample_at_frame(frame_index, fps, sample_rate) / AAC_FRAME_SAMPLES)


def chunk_aac_packets(stream: av.AudioStream, waveform: np.ndarray, fps: float, first_frame_index: int,
                      num_frames: int) -> list[av.Packet]:
    """The packets of one continuous AAC encode of `waveform` that play with frames [first, first + num_frames).

    Only the track's beginning is encoded, up to the lookahead those packets need, so a job of N chunks encodes
    about N/2 times its whole track: little next to the video for clips of seconds (a minute of 24 kHz stereo
    encodes in about 1 s on one core).
    """
    sample_rate = stream.codec_context.sample_rate
    start = audio_packet_boundary(first_frame_index, fps, sample_rate)
    stop = audio_packet_boundary(first_frame_index + num_frames, fps, sample_rate)
    packets = encode_aac(stream, fit_length(waveform, stop + AAC_LOOKAHEAD_SAMPLES))
    return [packet for packet in packets if start <= packet.pts < stop]


def join_segments(init: bytes, segments: list[bytes]) -> bytes:
    """The whole video as one fragmented MP4 file: the init segment, then the media segments in order.

    The result is what a player fetching the HLS playlist sees, as one file; PyAV/ffmpeg and browsers
    read it like any MP4 (the moov is at the front, so it also plays while downloading).
    """
    if not segments:
        raise SegmentError("no media segments to join")
    _check_boxes(init, _INIT_BOXES, first=b"ftyp", what="init segment")
    for index, segment in enumerate(segments):
        _check_boxes(segment, _MEDIA_BOXES, first=None, what=f"media segment {index}")
    return init + b"".join(segments)


def _check_boxes(data: bytes, allowed: frozenset[bytes], first: bytes | None, what: str) -> None:
    box_types = [box_type for box_type, _, _ in top_level_boxes(data)]
    if not box_types or (first is not None and box_types[0] != first) or not set(box_types) <= allowed:
        raise SegmentError(f"{what} has top-level boxes {[t.decode('latin-1') for t in box_types]}")


def top_level_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset, size) of each top-level ISO-BMFF box; raises SegmentError if they do not tile `data`."""
    boxes = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 8:
            raise SegmentError(f"truncated box header at byte {offset}")
        size, box_type = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1:  # a 64-bit size follows the type
            if len(data) - offset < 16:
                raise SegmentError(f"truncated box header at byte {offset}")
            (size,) = struct.unpack_from(">Q", data, offset + 8)
            header = 16
        elif size == 0:  # the box runs to the end of the data
            size = len(data) - offset
        if size < header or offset + size > len(data):
            raise SegmentError(f"box {box_type!r} at byte {offset} claims {size} bytes, {len(data) - offset} remain")
        boxes.append((box_type, offset, size))
        offset += size
    return boxes


class HlsPlaylist:
    """A live HLS media playlist over fragmented-MP4 segments that share one init segment.

    While the job runs the playlist is an EVENT playlist that only grows; once complete it gets
    EXT-X-ENDLIST. HLS forbids changing EXT-X-TARGETDURATION while a playlist grows, and a job's later
    chunks are longer than its first (4T frames against 1 + 4(T-1)), so pass `target_duration_s` (the
    longest segment expected) when it is known; the target is the ceiling of the longest of that and the
    segments so far.
    """

    def __init__(self, init_uri: str = "init.mp4", target_duration_s: float | None = None) -> None:
        _check_uri(init_uri)
        if target_duration_s is not None:
            _check_duration(target_duration_s)
        self.init_uri = init_uri
        self.target_duration_s = target_duration_s
        self.segments: list[tuple[str, float]] = []  # (uri, duration in seconds), in play order

    def add_segment(self, uri: str, duration_s: float) -> None:
        """Append the next media segment."""
        _check_uri(uri)
        _check_duration(duration_s)
        self.segments.append((uri, duration_s))

    def render(self, complete: bool) -> str:
        """The playlist text; `complete` adds EXT-X-ENDLIST (no more segments will come)."""
        longest = max([self.target_duration_s or 0.0] + [duration for _, duration in self.segments])
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:7",
            f"#EXT-X-TARGETDURATION:{max(1, math.ceil(longest))}",
            "#EXT-X-MEDIA-SEQUENCE:0",
            "#EXT-X-PLAYLIST-TYPE:EVENT",
            # Every segment starts with a keyframe, so a player may start at any of them.
            "#EXT-X-INDEPENDENT-SEGMENTS",
            f'#EXT-X-MAP:URI="{self.init_uri}"',
        ]
        for uri, duration in self.segments:
            lines += [f"#EXTINF:{duration:.6f},", uri]
        if complete:
            lines.append("#EXT-X-ENDLIST")
        return "\n".join(lines) + "\n"


def _check_uri(uri: str) -> None:
    # A line break or quote would change the playlist's structure.
    if not uri or any(char in uri for char in '\r\n"'):
        raise ValueError(f"unusable playlist URI {uri!r}")


def _check_duration(duration_s: float) -> None:
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"segment duration must be a positive number of seconds, got {duration_s}")
