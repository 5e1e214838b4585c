"""The blob store behind the claim-check pattern: tensors and media live here, events carry a BlobRef to them.

A blob is written (atomically) before any event names it, and every read checks the sha256 the reference carries,
so a truncated or altered blob is an error, never silently wrong output. Paths are deterministic per job and name,
so a redelivered stage rewrites the same blob instead of leaving orphans.

``VIDGEN_BLOB_URL`` picks the store: ``file:///abs/dir`` (the default, under the var dir). An S3-compatible store
plugs in behind the same three methods.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9._=-]{1,128}$")


class BlobError(RuntimeError):
    """A blob is missing, unreadable, or not what its reference says."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_segment(segment: str) -> str:
    if not _SAFE_SEGMENT.match(segment) or segment in (".", ".."):
        raise ValueError(f"unsafe blob path segment {segment!r}")
    return segment


class LocalBlobStore:
    """Blobs as files under one directory; URIs are file:// URLs."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    def path_for(self, *segments: str) -> Path:
        return self.root.joinpath(*(_check_segment(s) for s in segments))

    def put(self, data: bytes, *segments: str, shape: tuple[int, ...] = (), dtype: str = "",
            content_addressed: bool = False) -> dict:
        """Write bytes under root/segments..., atomically; returns the BlobRef record.

        content_addressed puts the sha256 in the file name (``name.ext`` → ``name-<sha256[:16]>.ext``): writers that
        may produce different bytes for the same name (a cache filled by several processes) then never replace a
        blob that an event already names.
        """
        if content_addressed:
            stem, dot, ext = segments[-1].partition(".")
            segments = (*segments[:-1], f"{stem}-{sha256_hex(data)[:16]}{dot}{ext}")
        path = self.path_for(*segments)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the event naming this blob may be read on another machine right away
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return {
            "uri": path.as_uri(),
            "sha256": sha256_hex(data),
            "bytes": len(data),
            "shape": [int(n) for n in shape],
            "dtype": dtype,
        }

    def read(self, *segments: str) -> bytes | None:
        """A small mutable object by name (a pointer such as "newest checkpoint"), or None when absent.
        Unlike get(), there is no reference to check it against: callers check what it points to."""
        try:
            return self.path_for(*segments).read_bytes()
        except FileNotFoundError:
            return None

    def claim(self, *segments: str) -> bool:
        """Create an empty marker if it does not exist yet; True for the one caller that created it."""
        path = self.path_for(*segments)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x"):
                return True
        except FileExistsError:
            return False

    def local_path(self, ref: dict) -> Path:
        parsed = urlparse(ref["uri"])
        if parsed.scheme != "file":
            raise BlobError(f"blob {ref['uri']} is not in this store ({self.root.as_uri()})")
        path = Path(unquote(parsed.path)).resolve()
        if self.root not in path.parents:
            raise BlobError(f"blob {ref['uri']} is outside the store root {self.root}")
        return path

    def get(self, ref: dict) -> bytes:
        """The blob's bytes, after checking size and sha256 against the reference."""
        path = self.local_path(ref)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobError(f"blob {ref['uri']} does not exist") from None
        if len(data) != ref["bytes"] or sha256_hex(data) != ref["sha256"]:
            raise BlobError(f"blob {ref['uri']} does not match its reference (size or sha256 differs)")
        return data

    def exists(self, ref: dict) -> bool:
        try:
            self.get(ref)
            return True
        except BlobError:
            return False

    # Tensors travel as safetensors: no pickle, exact dtypes (bfloat16 included), shape and dtype in the ref too.
    def put_tensor(self, tensor, *segments: str, content_addressed: bool = False) -> dict:
        from safetensors.torch import save

        data = save({"tensor": tensor.detach().contiguous().cpu()})
        return self.put(data, *segments, shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."),
                        content_addressed=content_addressed)

    def get_tensor(self, ref: dict):
        from safetensors.torch import load

        tensor = load(self.get(ref))["tensor"]
        if list(tensor.shape) != list(ref.get("shape") or tensor.shape):
            raise BlobError(f"blob {ref['uri']} holds shape {list(tensor.shape)}, the reference says {ref['shape']}")
        return tensor


def open_blob_store(url: str) -> LocalBlobStore:
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalBlobStore(unquote(parsed.path) if parsed.scheme else url)
    raise ValueError(f"unsupported blob store {url!r}: use file:///path (S3-compatible stores are planned)")
