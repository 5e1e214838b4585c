"""The input image of an image-to-video job: what is accepted, read without trusting it. Plain functions, no Kafka.

The gateway, ``vidgen submit --image`` and the prompt encoder all read an input image with ``read_input_image``, so
an image one of them accepts is an image every later stage can read.

Accepted: a PNG, JPEG or WebP image as uploaded, at most ``MAX_INPUT_IMAGE_BYTES`` (10 MiB) and at most
``MAX_INPUT_IMAGE_SIDE`` (4096) pixels on either side. The format is recognised from the bytes (never from a file
name or a declared media type), and only these three decoders are tried. The dimensions come from the header and are
checked BEFORE any pixel is decoded: a decompression bomb (a few kilobytes of PNG that inflate to gigabytes) is
refused without costing its memory. Then the image is verified (PNG chunk checksums) and decoded once in full, so a
truncated or corrupt file is refused here rather than on a GPU. An animated PNG or WebP counts by its first frame.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

MAX_INPUT_IMAGE_BYTES = 10 * 1024 * 1024
MAX_INPUT_IMAGE_SIDE = 4096
#: PIL's format name → the media type the blob is stored with, and the file extension of its blob.
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class InputImageError(ValueError):
    """Not an image this platform accepts; the message says why. ``code`` is the gateway's error code."""

    code = "invalid_image"


class InputImageTooLarge(InputImageError):
    code = "image_too_large"


@dataclass(frozen=True)
class InputImage:
    """An accepted input image: the bytes as uploaded (stored and hashed unchanged) and what reading them found."""

    data: bytes
    media_type: str
    width: int
    height: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def file_name(self) -> str:
        return f"input.{EXTENSIONS[self.media_type]}"

    def rgb(self) -> np.ndarray:
        """The pixels as (H, W, 3) uint8 RGB, upright: a phone's JPEG stores its rotation in EXIF, and a face lying
        on its side is one the face detector cannot see."""
        with _open(self.data) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def _open(data: bytes) -> Image.Image:
    """The image, lazily: only its header is read here, and only the accepted formats' decoders are tried."""
    return Image.open(io.BytesIO(data), formats=tuple(MEDIA_TYPES))


def read_input_image(data: bytes) -> InputImage:
    """Check ``data`` as an input image (see the module docstring); raises InputImageError saying why not."""
    if len(data) > MAX_INPUT_IMAGE_BYTES:
        raise InputImageTooLarge(f"the image has {len(data):,} bytes; the limit is {MAX_INPUT_IMAGE_BYTES:,} bytes "
                                 f"({MAX_INPUT_IMAGE_BYTES // (1024 * 1024)} MiB)")
    if not data:
        raise InputImageError("the image is empty")
    try:
        with _open(data) as image:
            media_type, (width, height) = MEDIA_TYPES[image.format], image.size
    except Image.DecompressionBombError as exc:  # PIL's own ceiling, far above ours: a bomb by any measure
        raise InputImageTooLarge(f"the image declares too many pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError):  # UnidentifiedImageError is an OSError
        raise InputImageError("not a PNG, JPEG or WebP image") from None
    if width > MAX_INPUT_IMAGE_SIDE or height > MAX_INPUT_IMAGE_SIDE:
        raise InputImageTooLarge(f"the image is {width}×{height} pixels; the limit is "
                                 f"{MAX_INPUT_IMAGE_SIDE}×{MAX_INPUT_IMAGE_SIDE}")
    try:
        with _open(data) as image:
            image.verify()
        with _open(data) as image:  # verify() leaves it unusable
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's ways of saying corrupt or truncated
        raise InputImageError(f"the image ({media_type}) cannot be decoded: {exc}") from None
    return InputImage(data, media_type, width, height)
