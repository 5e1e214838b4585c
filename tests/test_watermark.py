"""compliance.watermark: embed -> H.264 (crf 23) -> read recovers the job's payload; small frames are skipped."""
import cv2
import numpy as np
import pytest
from imwatermark import WatermarkDecoder
from skimage import data

from compliance import watermark as wm
from gpu_agents.video import encode_mp4, read_mp4

CRF = 23
FPS = 8
NUM_FRAMES = 17
SIZE = 256


def astronaut_clip(num_frames: int = NUM_FRAMES, size: int = SIZE) -> np.ndarray:
    """A natural 256x256 clip: the astronaut, panning diagonally (2 px down, 1 px right per frame)."""
    big = cv2.resize(data.astronaut(), (size + 2 * num_frames,) * 2, interpolation=cv2.INTER_AREA)
    return np.stack([big[2 * i:2 * i + size, i:i + size] for i in range(num_frames)])


def gradient_noise_clip(num_frames: int = NUM_FRAMES, size: int = SIZE) -> np.ndarray:
    """Smooth colour gradients drifting over time, with light per-frame noise (like faint generated output)."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:size, 0:size] / size
    frames = []
    for i in range(num_frames):
        shift = i / num_frames
        rgb = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * (x + shift)), 0.4 + 0.3 * y, 0.6 - 0.2 * x * y], axis=-1)
        noisy = rgb * 255 + rng.normal(0, 4, rgb.shape)
        frames.append(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    return np.stack(frames)


def through_h264(frames: np.ndarray) -> np.ndarray:
    return read_mp4(encode_mp4(frames, FPS, crf=CRF))


@pytest.mark.parametrize("make_clip", [astronaut_clip, gradient_noise_clip], ids=["astronaut", "gradient-noise"])
@pytest.mark.parametrize("job_id", ["job-7f3a", "job-0001"])
def test_payload_survives_h264(make_clip, job_id):
    clip = make_clip()
    payload = wm.payload_for_job(job_id)
    result = wm.embed_watermark(clip, payload)
    assert result.embedded and result.reason == ""
    assert result.method == "dwtDctSvd+rs" and result.payload_hex == payload.hex()
    assert result.frames.shape == clip.shape and result.frames.dtype == np.uint8
    assert cv2.PSNR(clip, result.frames) > 38  # invisible enough: a ~39.6 dB change at QIM_STEP 48

    reading = wm.read_watermark(through_h264(result.frames))
    assert reading.frames_read == NUM_FRAMES
    assert wm.bit_accuracy(reading.bits, wm.coded_bits(payload)) >= 0.95
    assert reading.payload == payload


def test_clean_frames_read_exactly_and_imwatermark_agrees():
    clip = astronaut_clip(num_frames=3)
    payload = wm.payload_for_job("job-clean")
    marked = wm.embed_watermark(clip, payload).frames
    reading = wm.read_watermark(marked)
    assert reading.bits == wm.coded_bits(payload) and reading.payload == payload
    # Same algorithm as the library's dwtDctSvd: its own decoder reads one clean frame of ours (BGR, as cv2 wants).
    decoder = WatermarkDecoder("bits", wm.CODED_BITS)
    bgr = cv2.cvtColor(marked[0], cv2.COLOR_RGB2BGR)
    library_bits = np.asarray(decoder.decode(bgr, "dwtDctSvd", scales=[0, wm.QIM_STEP, 0]), dtype=int)
    assert wm.bit_accuracy(library_bits, wm.coded_bits(payload)) >= 0.98


def test_frames_below_256_are_returned_unmarked_with_a_reason():
    clip = astronaut_clip(num_frames=4, size=128)
    result = wm.embed_watermark(clip, wm.payload_for_job("job-small"))
    assert not result.embedded
    assert result.reason == "frames are 128x128; the watermark needs at least 256x256"
    assert result.frames is clip
    reading = wm.read_watermark(clip)
    assert reading.payload is None and reading.reason == result.reason


def test_one_short_side_is_too_small():
    clip = np.zeros((2, 240, 320, 3), np.uint8)
    result = wm.embed_watermark(clip, wm.payload_for_job("job-wide"))
    assert not result.embedded and result.reason.startswith("frames are 320x240")


@pytest.mark.parametrize("make_clip", [astronaut_clip, gradient_noise_clip], ids=["astronaut", "gradient-noise"])
def test_unwatermarked_clip_reads_no_payload(make_clip):
    assert wm.read_watermark(through_h264(make_clip())).payload is None


@pytest.mark.parametrize("level", [0, 128, 255])
def test_flat_frames_read_no_payload(level):
    # A flat frame reads as all-equal bits; unscrambled, the all-zero word would be a valid RS codeword.
    assert wm.read_watermark(np.full((2, SIZE, SIZE, 3), level, np.uint8)).payload is None


def test_random_words_rarely_decode():
    # False positives of RS(12, 6) on random words: expected ~1.3e-5 each, so none in 2000 (fixed seed).
    rng = np.random.default_rng(0)
    decoded = sum(wm.decode_bits(rng.integers(0, 2, wm.CODED_BITS)) is not None for _ in range(2000))
    assert decoded == 0


def test_rs_corrects_three_wrong_bytes_not_four():
    payload = wm.payload_for_job("job-rs")
    bits = np.array(wm.coded_bits(payload))
    three = bits.copy()
    three[[0, 17, 95]] ^= 1  # bytes 0, 2 and 11
    assert wm.decode_bits(three) == payload
    four = bits.copy()
    four[[0, 17, 40, 95]] ^= 1  # bytes 0, 2, 5 and 11
    assert wm.decode_bits(four) != payload


def test_payloads_differ_between_jobs_and_are_stable():
    payloads = {wm.payload_for_job(f"job-{i}") for i in range(1000)}
    assert len(payloads) == 1000
    assert wm.payload_for_job("job-1") == wm.payload_for_job("job-1")
    assert all(len(p) == wm.PAYLOAD_BYTES for p in payloads)
    assert len(wm.coded_bits(wm.payload_for_job("job-1"))) == wm.CODED_BITS == 96


def test_wrong_payload_length_is_refused():
    with pytest.raises(ValueError, match="6 bytes"):
        wm.embed_watermark(astronaut_clip(num_frames=1), b"short")


def test_bit_accuracy():
    assert wm.bit_accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    assert wm.bit_accuracy([], [1, 0]) == 0.0
