"""Stills of a published video: a thumbnail (one representative frame) and a spritesheet (a grid of frames).

Plain functions, no Kafka: frames in (the watermarked ones, so a still carries the mark where it is big enough),
JPEG bytes out, which the compliance stage signs with C2PA like the video (``sign_video(..., mime="image/jpeg")``).

* The thumbnail is the frame with the most detail (the largest variance of its luma) among a handful spread over the
  video: the first frame of a generated clip is often the least resolved, and a flat frame tells nothing.
* The spritesheet shows ``SPRITE_FRAMES`` frames evenly spaced in time, left to right then top to bottom, each
  scaled to ``SPRITE_TILE_WIDTH`` pixels wide, for scrubbing previews.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

JPEG_QUALITY = 90
THUMBNAIL_CANDIDATES = 8
SPRITE_FRAMES = 16
SPRITE_TILE_WIDTH = 160


def representative_frame(frames: np.ndarray) -> int:
    """The index of the frame with the most detail among ``THUMBNAIL_CANDIDATES`` evenly spaced ones."""
    candidates = sorted({round(i) for i in np.linspace(0, len(frames) - 1, min(THUMBNAIL_CANDIDATES, len(frames)))})
    luma = [(frames[i].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).var() for i in candidates]
    return candidates[int(np.argmax(luma))]


def thumbnail_jpeg(frames: np.ndarray) -> bytes:
    """The representative frame (uint8 RGB, frames × H × W × 3) as a JPEG of the video's size."""
    return _jpeg(frames[representative_frame(frames)])


def sprite_grid(count: int) -> tuple[int, int]:
    """(columns, rows) of a spritesheet of ``count`` tiles: as square as it gets, never an empty row."""
    columns = math.ceil(math.sqrt(count))
    return columns, math.ceil(count / columns)


def spritesheet_jpeg(frames: np.ndarray, tiles: int = SPRITE_FRAMES,
                     tile_width: int = SPRITE_TILE_WIDTH) -> tuple[bytes, dict]:
    """A grid of ``tiles`` frames evenly spaced in time; the JPEG and its layout (columns, rows, tile size, and the
    frame index of each tile, in reading order)."""
    count = min(tiles, len(frames))
    indices = [round(i) for i in np.linspace(0, len(frames) - 1, count)]
    height, width = frames.shape[1:3]
    tile_w = min(tile_width, width)
    tile_h = max(1, round(height * tile_w / width))
    columns, rows = sprite_grid(count)
    sheet = Image.new("RGB", (columns * tile_w, rows * tile_h))
    for n, index in enumerate(indices):
        tile = Image.fromarray(frames[index]).resize((tile_w, tile_h), Image.Resampling.LANCZOS)
        sheet.paste(tile, ((n % columns) * tile_w, (n // columns) * tile_h))
    layout = {"columns": columns, "rows": rows, "tile_width": tile_w, "tile_height": tile_h, "frames": indices}
    return _jpeg(np.asarray(sheet)), layout


def _jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
