import pytest
import torch

from streams.blobs import BlobError, LocalBlobStore, open_blob_store


def test_tensor_round_trip_keeps_dtype_and_shape(tmp_path):
    store = open_blob_store((tmp_path / "blobs").as_uri())
    tensor = torch.randn(1, 16, 3, 4, 4).to(torch.bfloat16)
    ref = store.put_tensor(tensor, "job-1", "latent.safetensors")
    assert ref["shape"] == [1, 16, 3, 4, 4] and ref["dtype"] == "bfloat16" and ref["uri"].startswith("file://")
    assert torch.equal(store.get_tensor(ref), tensor)


def test_altered_or_missing_blob_is_an_error(tmp_path):
    store = LocalBlobStore(tmp_path)
    ref = store.put(b"some media bytes", "job-1", "video.mp4", dtype="video/mp4")
    path = store.local_path(ref)
    path.write_bytes(b"some media bytez")
    with pytest.raises(BlobError, match="does not match"):
        store.get(ref)
    path.unlink()
    with pytest.raises(BlobError, match="does not exist"):
        store.get(ref)


def test_paths_cannot_escape_the_store(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    with pytest.raises(ValueError):
        store.put(b"x", "..", "etc")
    outside = {"uri": (tmp_path / "secret").as_uri(), "sha256": "0" * 64, "bytes": 1}
    with pytest.raises(BlobError, match="outside"):
        store.get(outside)
