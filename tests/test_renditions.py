"""H.264 rendition ladder and HLS playlists (compliance/renditions.py)."""
import re

import numpy as np
import pytest

from compliance.renditions import (
    DEFAULT_LADDER,
    Rung,
    encode_renditions,
    hls_media,
    hls_vod_playlist,
    rendition_size,
)
from gpu_agents.video import probe_mp4, read_mp4

FPS = 8
NUM_FRAMES = 9


@pytest.fixture(scope="module")
def master():
    """Smooth moving gradients plus a little noise (per-pixel colour noise would not survive 4:2:0 chroma).

    130 wide: even, but half of it is odd, so the half rung has to round (65 -> 64).
    """
    t, y, x = np.meshgrid(np.arange(NUM_FRAMES), np.arange(96), np.arange(130), indexing="ij")
    red = 127 + 100 * np.sin(x / 9 + t / 2)
    green = 127 + 100 * np.cos(y / 7 - t / 3)
    blue = 2 * (x + y) % 256
    noise = np.random.default_rng(0).normal(0, 4, (NUM_FRAMES, 96, 130, 3))
    return np.clip(np.stack([red, green, blue], axis=-1) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def renditions(master):
    return encode_renditions(master, FPS)


def test_default_ladder_sizes_bitrates_and_decoding(renditions):
    assert [r.name for r in renditions] == [rung.name for rung in DEFAULT_LADDER]
    assert [(r.width, r.height) for r in renditions] == [(130, 96), (64, 48)]
    for rendition in renditions:
        assert rendition.width % 2 == 0 and rendition.height % 2 == 0
        assert rendition.bitrate > 0
        assert rendition.bitrate == round(8 * len(rendition.data) / (NUM_FRAMES / FPS))
        probe = probe_mp4(rendition.data)
        assert probe["codec"] == "h264" and probe["frames"] == NUM_FRAMES
        assert (probe["width"], probe["height"]) == (rendition.width, rendition.height)
        assert read_mp4(rendition.data).shape == (NUM_FRAMES, rendition.height, rendition.width, 3)
    assert renditions[0].bitrate > renditions[1].bitrate


def test_native_rung_keeps_the_pictures(master, renditions):
    decoded = read_mp4(renditions[0].data).astype(np.int16)
    # Lossy, but close: at crf 20 smooth content stays within a few levels on average.
    assert np.abs(decoded - master).mean() < 6


def test_rungs_too_small_or_duplicated_are_skipped():
    frames = np.zeros((3, 64, 64, 3), dtype=np.uint8)
    ladder = (Rung("a", 1.0, 20), Rung("same-size", 1.01, 23), Rung("tiny", 0.25, 23), Rung("b", 0.5, 23))
    assert [(r.name, r.width) for r in encode_renditions(frames, FPS, ladder)] == [("a", 64), ("b", 32)]
    assert encode_renditions(frames, FPS, ladder, min_side=48)[-1].name == "a"


def test_odd_master_is_rounded_to_even():
    assert rendition_size(65, 33, 1.0) == (64, 32)  # ties round down: never larger than the scaled size
    assert rendition_size(67, 35, 1.0) == (66, 34)
    assert rendition_size(100, 60, 0.33) == (32, 20)  # 33 -> 32 (a tie), 19.8 -> 20 (nearest)
    frames = np.zeros((2, 33, 65, 3), dtype=np.uint8)
    (native,) = encode_renditions(frames, FPS, (Rung("native", 1.0, 20),))
    assert (native.width, native.height) == (64, 32)


def test_master_playlist_lists_every_rendition(renditions):
    uris = [f"{r.name}/index.m3u8" for r in renditions]
    playlist = hls_vod_playlist(renditions, uris)
    lines = playlist.splitlines()
    assert lines[0] == "#EXTM3U"
    variants = {}
    for line, next_line in zip(lines, lines[1:]):
        if line.startswith("#EXT-X-STREAM-INF:"):
            assert not next_line.startswith("#")
            variants[next_line] = line
    assert set(variants) == set(uris)
    for rendition, uri in zip(renditions, uris):
        attributes = variants[uri]
        assert f"BANDWIDTH={rendition.bitrate}," in attributes
        assert f"RESOLUTION={rendition.width}x{rendition.height}" in attributes
        assert re.search(r'CODECS="avc1\.[0-9a-f]{6}"', attributes)
    with pytest.raises(ValueError):
        hls_vod_playlist(renditions, uris[:1])


def test_media_playlist_addresses_one_fragmented_mp4(renditions):
    rendition = renditions[1]
    media = hls_media(rendition, "half.mp4")
    lines = media.playlist.splitlines()
    assert lines[0] == "#EXTM3U" and lines[-1] == "#EXT-X-ENDLIST"
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in lines
    init_length, init_offset = map(int, re.search(r'#EXT-X-MAP:URI="half.mp4",BYTERANGE="(\d+)@(\d+)"',
                                                  media.playlist).groups())
    ranges = [(init_offset, init_length)]
    for line, next_line in zip(lines, lines[1:]):
        if line.startswith("#EXT-X-BYTERANGE:"):
            length, offset = map(int, line.split(":", 1)[1].split("@"))
            ranges.append((offset, length))
            assert next_line == "half.mp4"
    # Init section and fragments tile the file exactly, in order.
    position = 0
    for offset, length in ranges:
        assert offset == position
        position += length
    assert position == len(media.segment_data)
    durations = [float(line.split(":")[1].rstrip(",")) for line in lines if line.startswith("#EXTINF:")]
    assert sum(durations) == pytest.approx(NUM_FRAMES / FPS, abs=1 / FPS)
    # Stream copy: the same pictures as the progressive MP4.
    assert np.array_equal(read_mp4(media.segment_data), read_mp4(rendition.data))
