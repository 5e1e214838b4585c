"""Fragmented-MP4 segments per chunk, joining them into one file, and the live HLS playlist."""

import io
from fractions import Fraction

import av
import numpy as np
import pytest

from gpu_agents.segments import HlsPlaylist, SegmentError, encode_init_and_segment, join_segments
from gpu_agents.video import probe_mp4, read_mp4
from tests.test_video import _gradient_clip

FPS = 16


def _chunk_bounds(chunk_sizes: list[int]) -> list[tuple[int, int]]:
    starts = np.cumsum([0] + chunk_sizes)
    return list(zip(starts[:-1].tolist(), starts[1:].tolist()))


def _encode_chunks(clip: np.ndarray, chunk_sizes: list[int], fps: float = FPS) -> tuple[list[bytes], list[bytes]]:
    inits, media = [], []
    for start, stop in _chunk_bounds(chunk_sizes):
        init, segment = encode_init_and_segment(clip[start:stop], fps, first_frame_index=start)
        inits.append(init)
        media.append(segment)
    return inits, media


def _decode(data: bytes, fps: float = FPS) -> tuple[np.ndarray, list[int], list[bool]]:
    """Frames, their frame indices (pts in 1/fps units) and whether each packet is a keyframe."""
    with av.open(io.BytesIO(data)) as container:
        keyframes = [packet.is_keyframe for packet in container.demux(video=0) if packet.size > 0]
    with av.open(io.BytesIO(data)) as container:
        decoded = list(container.decode(video=0))
    indices = [round(float(frame.pts * frame.time_base * Fraction(fps).limit_denominator(1001))) for frame in decoded]
    return np.stack([frame.to_ndarray(format="rgb24") for frame in decoded]), indices, keyframes


def _mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize(
    "chunk_sizes, height, width",
    [([1, 4, 8], 64, 64), ([5, 8, 8, 4], 64, 64), ([1, 4, 8], 48, 80), ([8, 1, 4], 64, 64)],
)
def test_each_segment_decodes_to_its_frames(chunk_sizes, height, width):
    clip = _gradient_clip(sum(chunk_sizes), height, width)
    inits, media = _encode_chunks(clip, chunk_sizes)

    for (start, stop), init, segment in zip(_chunk_bounds(chunk_sizes), inits, media):
        frames, indices, keyframes = _decode(init + segment)
        assert frames.shape == (stop - start, height, width, 3)
        assert indices == list(range(start, stop))
        assert keyframes[0]
        assert _mean_abs_error(frames, clip[start:stop]) < 8


@pytest.mark.parametrize("chunk_sizes", [[1, 4, 8], [5, 8, 8, 4], [8, 1, 4]])
def test_init_segment_is_identical_for_every_chunk(chunk_sizes):
    inits, _ = _encode_chunks(_gradient_clip(sum(chunk_sizes), 64, 64), chunk_sizes)
    assert len(set(inits)) == 1
    assert inits[0][4:8] == b"ftyp"


@pytest.mark.parametrize("chunk_sizes, fps", [([1, 4, 8], 16), ([5, 8, 8, 4], 24000 / 1001)])
def test_joined_segments_are_one_video(chunk_sizes, fps):
    clip = _gradient_clip(sum(chunk_sizes), 64, 64)
    inits, media = _encode_chunks(clip, chunk_sizes, fps)
    joined = join_segments(inits[0], media)

    frames, indices, _ = _decode(joined, fps)
    assert indices == list(range(len(clip)))
    assert _mean_abs_error(frames, clip) < 8
    # Each segment starts from a keyframe, so decoding it alone gives the very pixels of the joined file.
    assert np.array_equal(frames, np.concatenate([read_mp4(inits[0] + segment) for segment in media]))
    assert probe_mp4(joined) == {"frames": len(clip), "width": 64, "height": 64, "fps": pytest.approx(fps, abs=1e-3),
                                 "codec": "h264"}


def test_segments_are_reproducible():
    clip = _gradient_clip(8, 64, 64)
    assert encode_init_and_segment(clip, FPS, 4) == encode_init_and_segment(clip, FPS, 4)


def test_chunk_longer_than_the_encoders_lookahead():
    frames, indices, _ = _decode(b"".join(encode_init_and_segment(_gradient_clip(48, 32, 32), FPS, 3)))
    assert len(frames) == 48 and indices == list(range(3, 51))


def test_join_segments_refuses_other_bytes():
    inits, media = _encode_chunks(_gradient_clip(5, 64, 64), [1, 4])
    with pytest.raises(SegmentError):
        join_segments(media[0], [inits[0]])  # init and media swapped
    with pytest.raises(SegmentError):
        join_segments(inits[0], [media[0][:-3]])  # truncated
    with pytest.raises(SegmentError):
        join_segments(inits[0], [])


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        encode_init_and_segment(np.zeros((2, 63, 64, 3), np.uint8), FPS, 0)
    with pytest.raises(ValueError, match="first_frame_index"):
        encode_init_and_segment(np.zeros((2, 64, 64, 3), np.uint8), FPS, -1)


def _three_segment_playlist() -> HlsPlaylist:
    playlist = HlsPlaylist()
    for index, frames in enumerate([5, 8, 4]):  # a 17-frame job in chunks of 2 latent frames, at 16 fps
        playlist.add_segment(f"segment-{index:04d}.m4s", frames / FPS)
    return playlist


PLAYLIST_HEAD = """\
#EXTM3U
#EXT-X-VERSION:7
#EXT-X-TARGETDURATION:1
#EXT-X-MEDIA-SEQUENCE:0
#EXT-X-PLAYLIST-TYPE:EVENT
#EXT-X-INDEPENDENT-SEGMENTS
#EXT-X-MAP:URI="init.mp4"
#EXTINF:0.312500,
segment-0000.m4s
#EXTINF:0.500000,
segment-0001.m4s
#EXTINF:0.250000,
segment-0002.m4s
"""


def test_playlist_while_growing():
    assert _three_segment_playlist().render(complete=False) == PLAYLIST_HEAD


def test_playlist_when_complete():
    assert _three_segment_playlist().render(complete=True) == PLAYLIST_HEAD + "#EXT-X-ENDLIST\n"


def test_playlist_target_duration():
    playlist = HlsPlaylist(init_uri="jobs/j1/init.mp4")
    assert "#EXT-X-TARGETDURATION:1\n" in playlist.render(complete=False)  # no segments yet
    playlist.add_segment("a.m4s", 2.0)
    playlist.add_segment("b.m4s", 2.01)
    text = playlist.render(complete=False)
    assert "#EXT-X-TARGETDURATION:3\n" in text and '#EXT-X-MAP:URI="jobs/j1/init.mp4"\n' in text
    # Declared up front, the target already covers segments to come and stays put as they arrive.
    declared = HlsPlaylist(target_duration_s=4.0)
    assert "#EXT-X-TARGETDURATION:4\n" in declared.render(complete=False)
    declared.add_segment("a.m4s", 3.8)
    assert "#EXT-X-TARGETDURATION:4\n" in declared.render(complete=False)


@pytest.mark.parametrize("uri, duration", [("", 1.0), ("a\nb.m4s", 1.0), ("a.m4s", 0.0), ("a.m4s", float("nan"))])
def test_playlist_rejects_bad_segments(uri, duration):
    with pytest.raises(ValueError):
        HlsPlaylist().add_segment(uri, duration)
