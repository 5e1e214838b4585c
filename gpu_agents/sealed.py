"""Sealed payloads: the one file format of the agents' saved state (denoising checkpoints, decoder states).

Tensors go in a safetensors file; everything else is a JSON body in its header metadata, with a format name and
version and a sha256 over the body and every tensor (safetensors has no checksum, and a flipped bit in a latent
would otherwise resume into a silently different video). No pickle: loading a payload runs no code.
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping

import diffusers
import safetensors.torch
import torch

_BODY_KEY = "body"


def seal(format_name: str, version: int, body: dict, tensors: Mapping[str, torch.Tensor],
         error: type[Exception], what: str) -> bytes:
    """One payload of `body` (JSON-able) and `tensors`; raises `error` when the body is not JSON-able."""
    body = {**body, "written_by": {"diffusers": diffusers.__version__, "torch": torch.__version__}}
    try:
        body_json = json.dumps(body, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise error(f"{what} has fields JSON cannot hold: {exc}") from exc
    metadata = {
        "format": format_name,
        "format_version": str(version),
        _BODY_KEY: body_json,
        "sha256": content_digest(body_json, tensors),
    }
    return safetensors.torch.save(dict(tensors), metadata=metadata)


def unseal(data: bytes, format_name: str, version: int, error: type[Exception],
           what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(body, tensors on the CPU) of a payload written by seal(); raises `error` for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    metadata = _read_metadata(data, error, what)
    if metadata.get("format") != format_name:
        raise error(f"not a {what} (format {metadata.get('format')!r}, expected {format_name!r})")
    if metadata.get("format_version") != str(version):
        raise error(f"{what} format version {metadata.get('format_version')!r}; this build reads version {version}")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types, and OverflowError on bad offsets
        raise error(f"{what} tensors are unreadable: {exc}") from exc
    body_json = metadata.get(_BODY_KEY, "")
    if metadata.get("sha256") != content_digest(body_json, tensors):
        raise error(f"{what} does not match its sha256: the payload is corrupt")
    try:
        return json.loads(body_json), tensors
    except ValueError as exc:
        raise error(f"{what} body is unreadable: {exc}") from exc


def _read_metadata(data: bytes, error: type[Exception], what: str) -> dict[str, str]:
    """The safetensors header's __metadata__ (safetensors.torch.load does not return it)."""
    # Layout: 8-byte little-endian header length, then that many bytes of JSON header, then tensor data.
    if len(data) < 8:
        raise error(f"{what} is truncated ({len(data)} bytes)")
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > len(data) - 8:
        raise error(f"{what} is truncated or not a safetensors payload (header runs past the end)")
    try:
        header = json.loads(data[8 : 8 + header_length])
    except ValueError as exc:
        raise error(f"{what} header is unreadable: {exc}") from exc
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise error(f"{what} header is unreadable: not a safetensors header")
    return metadata


def content_digest(body_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the JSON body and every tensor (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(body_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
