"""Invisible per-job watermark for generated videos: DWT-DCT-SVD embedding, Reed–Solomon coding, voting across frames.

Plain functions, no Kafka. The algorithm is invisible-watermark's (``imwatermark``) ``dwtDctSvd`` (U channel, 4x4
blocks) with a coarser quantisation step, so ``imwatermark.WatermarkDecoder("bits", CODED_BITS).decode(bgr,
"dwtDctSvd", scales=[0, QIM_STEP, 0])`` reads a clean watermarked frame of ours (BGR, as cv2 wants; the tests check
this). It is re-implemented here in numpy, vectorised over the blocks of a frame, because the library's encoder

* loops over 4x4 blocks in Python (~12 ms per 256x256 frame; this one takes ~3 ms),
* writes the changed chroma back into a uint8 array (truncating, not rounding), and
* rebuilds the chroma plane with its horizontal and vertical detail bands swapped
  (``pywt.idwt2((ca1, (v1, h1, d1)))``), which smears chroma edges in every frame even where no bit changes them,
* and its decoder only returns hard bits per frame, so no soft vote across frames is possible.
At the same step (36) the library's output is ~36 dB PSNR on a natural 256x256 image, this one's ~42 dB.

How a bit is carried (per frame, per 8x8-pixel block):
the U chroma plane (OpenCV's YUV: U = 0.492 (B - Y) + 128) is split by a one-level Haar DWT; the low band (LL) is cut
into 4x4 blocks, each block's 2-D DCT is decomposed by SVD, and its largest singular value s0 is quantised
(quantisation index modulation) to (k + 0.25) * QIM_STEP for a 0 bit or (k + 0.75) * QIM_STEP for a 1 bit.
Blocks take the coded bits in raster order, cycling, so a 256x256 frame carries each of the 96 bits in 10-11 blocks.
Only U changes, so luma is untouched (the eye sees chroma detail least, and 4:2:0 video keeps U at half resolution,
which the 8x8-pixel blocks survive); the U change is applied to the RGB pixels as the B and G change that moves U
alone, then rounded.

Reading: every block gives a soft vote -sin(2 pi s0 / QIM_STEP) (+1 at a clean 1, -1 at a clean 0, 0 on a decision
boundary); the votes for each coded bit are summed over all its blocks in all frames and the sign is the bit.
This is a majority vote across frames weighted by how far each block lies from the decision boundary.

Payload and coding (see ``payload_for_job``): 6 payload bytes + 6 Reed–Solomon parity bytes = 12 bytes = 96 coded
bits; RS(12, 6) corrects any 3 wrong bytes. The codeword is XORed with a fixed pseudo-random mask before embedding,
so that unwatermarked content (a flat frame reads as all zeros or all ones, and the all-zero word is an RS codeword)
does not decode to a payload. A random 96-bit word decodes with probability ~1.3e-5 (words within 3 bytes of one
of the 2^48 codewords, out of 2^96).

Cost on 2 CPU cores (numpy, float64): ~3 ms per 256x256 frame to embed and ~1.5 ms to read; ~13 ms and ~6 ms at
512x512 (it grows with the pixel count). A 17-33-frame 256x256 clip takes ~0.05-0.1 s to embed.
Frames must be at least 256x256 (as imwatermark requires); smaller clips are returned unmarked, with a reason.
The mark survives H.264 at crf 23; it is not designed to survive cropping, rescaling or rotation.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from reedsolo import ReedSolomonError, RSCodec

METHOD = "dwtDctSvd+rs"
MIN_SIDE = 256  # pixels, both height and width (imwatermark refuses frames under 256x256 in area)

PAYLOAD_BYTES = 6  # 48 bits of sha256(job_id)
PARITY_BYTES = 6  # RS(12, 6): corrects 3 byte errors
CODED_BYTES = PAYLOAD_BYTES + PARITY_BYTES
CODED_BITS = 8 * CODED_BYTES  # 96

# Quantisation step for s0. imwatermark's default is 36; 48 was measured (H.264 crf 23, 256x256, natural images)
# to lift the bits read right from a single frame from ~85% to ~94%, at ~39.6 dB PSNR instead of ~42 dB,
# so that short clips (5 frames) still decode. Changing it makes earlier videos unreadable.
QIM_STEP = 48.0
BLOCK = 4  # side of an LL-band block (= 8 pixels)

# Colour conversion as OpenCV's COLOR_BGR2YUV / COLOR_YUV2BGR (BT.601 luma weights, U = 0.492 (B - Y) + 128).
_U_FROM_RGB = np.array([-0.492 * 0.299, -0.492 * 0.587, 0.492 * (1 - 0.114)])
# Moving U by dU with Y and V fixed moves R, G, B by dU times these (from OpenCV's YUV -> BGR inverse).
_RGB_PER_U = np.array([0.0, -0.395, 2.032])

# Orthonormal 4-point DCT-II matrix (what cv2.dct computes for a 4x4 block: DCT(X) = C X C^T).
_DCT = np.array([[np.sqrt((1 if k == 0 else 2) / BLOCK) * np.cos(np.pi * (2 * n + 1) * k / (2 * BLOCK))
                  for n in range(BLOCK)] for k in range(BLOCK)])

# Whitening mask XORed onto the RS codeword; fixed forever, or old videos stop reading.
_SCRAMBLE = np.unpackbits(np.frombuffer(hashlib.sha256(b"vidgen-watermark-v1").digest()[:CODED_BYTES], np.uint8))

_RS = RSCodec(PARITY_BYTES)


@dataclass(frozen=True)
class WatermarkResult:
    frames: np.ndarray  # (F, H, W, 3) uint8 RGB: watermarked, or the input unchanged when embedded is False
    embedded: bool
    reason: str  # "" when embedded, else why not
    payload_hex: str
    method: str = METHOD


@dataclass(frozen=True)
class WatermarkReading:
    payload: bytes | None  # None when Reed–Solomon decoding fails (no watermark, or too damaged)
    bits: list[int] = field(default_factory=list)  # the CODED_BITS voted coded bits, before RS correction
    frames_read: int = 0
    reason: str = ""  # "" when a payload was read, else why not


# -- payload and coding -----------------------------------------------------------------------------------------------
def payload_for_job(job_id: str) -> bytes:
    """The first PAYLOAD_BYTES (6) bytes of sha256(job_id): 48 bits.

    A read payload is looked up among published jobs. With N published jobs the chance that a given payload
    matches some other job is ~N / 2^48 (3.6e-9 for a million jobs); that two of N jobs share a payload at all is
    ~N^2 / 2^49 (0.2% for a million), which a lookup resolves by returning both candidates. More payload bytes would
    mean more coded bits, hence fewer blocks per bit and more bit errors after compression.
    """
    return hashlib.sha256(job_id.encode("utf-8")).digest()[:PAYLOAD_BYTES]


def coded_bits(payload: bytes) -> list[int]:
    """The CODED_BITS (96) bits embedded for a payload: the RS(12, 6) codeword, MSB first, XOR the scramble mask."""
    _check_payload(payload)
    codeword = np.frombuffer(bytes(_RS.encode(payload)), np.uint8)
    return (np.unpackbits(codeword) ^ _SCRAMBLE).tolist()


def decode_bits(bits: list[int] | np.ndarray) -> bytes | None:
    """The payload from CODED_BITS (possibly wrong) coded bits, or None when Reed–Solomon cannot correct them."""
    bits = np.asarray(bits, dtype=np.uint8)
    if bits.shape != (CODED_BITS,):
        raise ValueError(f"expected {CODED_BITS} coded bits, got {bits.shape}")
    codeword = np.packbits(bits ^ _SCRAMBLE).tobytes()
    try:
        payload, _, _ = _RS.decode(codeword)
    except ReedSolomonError:
        return None
    return bytes(payload)


def bit_accuracy(reading_bits: list[int] | np.ndarray, expected_coded_bits: list[int] | np.ndarray) -> float:
    """Share of coded bits read correctly (before RS correction); 0.0 when nothing was read."""
    read, expected = np.asarray(reading_bits), np.asarray(expected_coded_bits)
    if read.shape != expected.shape:
        return 0.0
    return float(np.mean(read == expected))


def _check_payload(payload: bytes) -> None:
    if len(payload) != PAYLOAD_BYTES:
        raise ValueError(f"the payload must be {PAYLOAD_BYTES} bytes, got {len(payload)}")


# -- embedding and reading --------------------------------------------------------------------------------------------
def too_small_reason(frames: np.ndarray) -> str:
    """Why frames (F, H, W, 3) cannot carry the watermark, or "" if they can."""
    height, width = frames.shape[1:3]
    if height < MIN_SIDE or width < MIN_SIDE:
        return f"frames are {width}x{height}; the watermark needs at least {MIN_SIDE}x{MIN_SIDE}"
    return ""


def embed_watermark(frames: np.ndarray, payload: bytes) -> WatermarkResult:
    """Watermark every frame of an RGB clip (F, H, W, 3) uint8 with the RS-coded payload.

    Frames under 256x256 are returned unchanged with embedded=False and the reason; nothing raises for size.
    Costs ~3 ms per 256x256 frame on CPU (one batched 4x4 SVD per 8x8-pixel block).
    """
    _check_frames(frames)
    _check_payload(payload)
    reason = too_small_reason(frames)
    if reason:
        return WatermarkResult(frames=frames, embedded=False, reason=reason, payload_hex=payload.hex())

    bits = np.asarray(coded_bits(payload), dtype=np.float64)
    # One frame at a time: the float arrays of a whole clip do not fit in cache and made large frames ~5x slower.
    marked = np.stack([_embed_frame(frame, bits) for frame in frames])
    return WatermarkResult(frames=marked, embedded=True, reason="", payload_hex=payload.hex())


def _embed_frame(frame: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """One RGB uint8 frame (H, W, 3) with the coded bits (floats 0/1) embedded."""
    rgb = frame[None].astype(np.float64)
    ll_blocks, grid = _ll_blocks(_u_plane(rgb))  # (1, nblocks, 4, 4)
    u, s, vt = np.linalg.svd(_DCT @ ll_blocks @ _DCT.T)
    block_bits = bits[np.arange(ll_blocks.shape[1]) % CODED_BITS]  # raster order, cycling through the bits
    s0 = s[..., 0]
    target = (np.floor(s0 / QIM_STEP) + 0.25 + 0.5 * block_bits) * QIM_STEP
    # Only s0 changes, so the DCT block changes by (target - s0) u0 v0^T; back through the inverse DCT to LL.
    dct_change = (target - s0)[..., None, None] * (u[..., :, :1] @ vt[..., :1, :])
    ll_change = _DCT.T @ dct_change @ _DCT
    u_change = _pixels_from_ll_blocks(ll_change, grid, frame.shape[:2])  # (1, H, W)
    marked = rgb[0] + u_change[0, ..., None] * _RGB_PER_U
    return np.clip(np.rint(marked), 0, 255).astype(np.uint8)


def read_watermark(frames: np.ndarray) -> WatermarkReading:
    """Read the payload from RGB frames (F, H, W, 3) uint8, voting every block of every frame per coded bit.

    Costs ~1.5 ms per 256x256 frame on CPU. The payload is None when RS decoding fails (bits still reported).
    """
    _check_frames(frames)
    reason = too_small_reason(frames)
    if reason:
        return WatermarkReading(payload=None, bits=[], frames_read=0, reason=reason)
    votes = bit_votes(frames)
    bits = (votes > 0).astype(np.uint8)
    payload = decode_bits(bits)
    return WatermarkReading(payload=payload, bits=bits.tolist(), frames_read=len(frames),
                            reason="" if payload is not None else "Reed-Solomon decoding failed: no readable watermark")


def bit_votes(frames: np.ndarray) -> np.ndarray:
    """Summed soft votes per coded bit (CODED_BITS floats; > 0 means 1), over every block of every frame."""
    block_votes = 0.0
    for frame in frames:  # one at a time: a whole long clip in float64 would take gigabytes
        ll_blocks, _ = _ll_blocks(_u_plane(frame[None].astype(np.float64)))
        s0 = np.linalg.svd(_DCT @ ll_blocks[0] @ _DCT.T, compute_uv=False)[:, 0]  # (nblocks,)
        # s0 at (k + 0.75) step (bit 1) gives +1, at (k + 0.25) step (bit 0) gives -1.
        block_votes = block_votes - np.sin(2 * np.pi * (s0 / QIM_STEP))
    bit_of_block = np.arange(block_votes.shape[0]) % CODED_BITS
    return np.bincount(bit_of_block, weights=block_votes, minlength=CODED_BITS)


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be non-empty uint8 RGB (F, H, W, 3), got {frames.dtype} {frames.shape}")


def _u_plane(rgb: np.ndarray) -> np.ndarray:
    """The U plane (F, H, W) in OpenCV's YUV, in floats, from RGB frames (channel order R, G, B)."""
    return rgb @ _U_FROM_RGB + 128.0


def _ll_blocks(plane: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Haar LL band of (F, H, W) cut into 4x4 blocks: (F, rows * cols, 4, 4) in raster order, and (rows, cols).

    The LL coefficient of a 2x2 pixel square is its sum / 2 (pywt's orthonormal Haar). As in imwatermark, the
    plane is cut to whole 8x8-pixel blocks; pixels beyond the last whole block carry nothing.
    """
    rows, cols = plane.shape[1] // (2 * BLOCK), plane.shape[2] // (2 * BLOCK)
    cut = plane[:, :rows * 2 * BLOCK, :cols * 2 * BLOCK]
    ll = (cut[:, 0::2, 0::2] + cut[:, 0::2, 1::2] + cut[:, 1::2, 0::2] + cut[:, 1::2, 1::2]) / 2
    blocks = ll.reshape(len(plane), rows, BLOCK, cols, BLOCK).transpose(0, 1, 3, 2, 4)
    return blocks.reshape(len(plane), rows * cols, BLOCK, BLOCK), (rows, cols)


def _pixels_from_ll_blocks(ll_blocks: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A change of LL blocks (F, n, 4, 4) as a change of the pixel plane (F, H, W): LL + d moves each of its 2x2
    pixels by d / 2 (Haar detail bands unchanged); pixels outside the block grid do not move."""
    rows, cols = grid
    ll = ll_blocks.reshape(len(ll_blocks), rows, cols, BLOCK, BLOCK).transpose(0, 1, 3, 2, 4)
    ll = ll.reshape(len(ll_blocks), rows * BLOCK, cols * BLOCK)
    plane = np.zeros((len(ll_blocks), *size))
    plane[:, :rows * 2 * BLOCK, :cols * 2 * BLOCK] = np.repeat(np.repeat(ll / 2, 2, axis=1), 2, axis=2)
    return plane
