"""The blob store's contract, on a local directory and on a real S3-protocol server (moto, bench/s3server.py): the same
tests for both, so a stage cannot tell them apart."""
import time
import urllib.request

import pytest
import torch

from bench.s3server import s3_server
from streams.blobs import BlobError, BlobStoreUnavailable, LocalBlobStore, S3BlobStore, open_blob_store
from streams.ledger import ProcessedLedger
from streams.settings import load_settings


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as env:
        yield env


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_blob_store((tmp_path / "blobs").as_uri())
    env = request.getfixturevalue("s3_env")
    # One prefix per test: they share the bucket.
    settings = load_settings({**env, "VIDGEN_BLOB_URL": f"{env['VIDGEN_BLOB_URL']}/{tmp_path.name}",
                              "VIDGEN_VAR_DIR": str(tmp_path)})
    return open_blob_store(settings)


def test_tensor_round_trip_keeps_dtype_and_shape(store):
    tensor = torch.randn(1, 16, 3, 4, 4).to(torch.bfloat16)
    ref = store.put_tensor(tensor, "job-1", "latent.safetensors")
    assert ref["shape"] == [1, 16, 3, 4, 4] and ref["dtype"] == "bfloat16"
    assert ref["uri"].startswith(store.url + "/job-1/")
    assert torch.equal(store.get_tensor(ref), tensor)


def test_altered_or_missing_blob_is_an_error(store):
    ref = store.put(b"some media bytes", "job-1", "video.mp4", dtype="video/mp4")
    key = store.key_of(ref["uri"])
    assert key == "job-1/video.mp4"
    store.put(b"some media bytez", "job-1", "video.mp4")  # what an attacker or a bug might do
    with pytest.raises(BlobError, match="does not match"):
        store.get(ref)
    store.delete([key, "job-1/never-was"])  # an absent key is fine
    with pytest.raises(BlobError, match="does not exist"):
        store.get(ref)
    assert not store.exists(ref)


def test_keys_cannot_escape_the_store(store, tmp_path):
    with pytest.raises(ValueError):
        store.put(b"x", "..", "etc")
    for outside in ((tmp_path / "secret").as_uri(), "s3://another-bucket/blobs/job-1/video.mp4",
                    f"{store.url}/../x", f"{store.url}-other/job-1/video.mp4"):
        with pytest.raises(BlobError):
            store.get({"uri": outside, "sha256": "0" * 64, "bytes": 1})


def test_claim_is_granted_once_and_touch_renews(store):
    assert store.claim("job-1", "attempt-0001")
    assert not store.claim("job-1", "attempt-0001")
    store.touch("_ledger", "mark")
    first = store.stat("_ledger/mark")
    assert first.size == 0
    time.sleep(1.1)  # S3 keeps whole seconds
    store.touch("_ledger", "mark")
    assert store.stat("_ledger/mark").modified > first.modified


def test_stat_list_ranges_and_content_addressing(store):
    a = store.put(b"0123456789", "job-2", "segment-00000.m4s")
    b = store.put(b"abc", "job-2", "published", "f00", "video.mp4")
    c = store.put(b"cached", "_cache", "entry.bin", content_addressed=True)
    assert c["uri"].endswith(f"entry-{c['sha256'][:16]}.bin")
    stat = store.stat("job-2/segment-00000.m4s")
    assert stat.size == 10 and stat.etag.startswith('"') and abs(stat.modified - time.time()) < 60
    assert store.stat("job-2/nothing") is None
    assert sorted(s.key for s in store.list("job-2/")) == ["job-2/published/f00/video.mp4", "job-2/segment-00000.m4s"]
    assert [s.key for s in store.list("job-2/pub")] == ["job-2/published/f00/video.mp4"]
    assert store.read_range("job-2/segment-00000.m4s", 2, 5) == b"234"
    assert store.read_range("job-2/segment-00000.m4s", 8, 100) == b"89"
    assert store.get(a) == b"0123456789" and store.get(b) == b"abc"
    assert store.read("job-2", "pointer.json") is None


def test_only_an_object_store_presigns_and_its_url_serves_the_bytes(store):
    ref = store.put(b"signed bytes", "job-3", "video.mp4")
    url = store.presign(store.key_of(ref["uri"]), 60)
    if isinstance(store, LocalBlobStore):
        assert url is None and store.local_file("job-3/video.mp4").read_bytes() == b"signed bytes"
        return
    assert store.local_file("job-3/video.mp4") is None
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"signed bytes"


def test_the_dedupe_ledger_on_the_store(store):
    ledger = ProcessedLedger(store, "decoder")
    assert not ledger.seen("job-1/e1")
    ledger.mark("job-1/e1")
    assert ledger.seen("job-1/e1") and not ledger.seen("job-1/e2")
    now_ms = int(time.time() * 1000)
    assert not ProcessedLedger(store, "decoder", (now_ms - 60_000, now_ms + 60_000)).seen("job-1/e1")


def test_large_objects_go_up_in_parts(s3_env, tmp_path):
    store = open_blob_store(load_settings({**s3_env, "VIDGEN_VAR_DIR": str(tmp_path)}))
    data = bytes(range(256)) * (38 * 1024 + 3)  # ~9.5 MiB: a part of 8 MiB and the rest
    ref = store.put(data, "job-4", "checkpoint-00010.safetensors")
    assert store.get(ref) == data
    assert store.stat("job-4/checkpoint-00010.safetensors").etag.endswith('-2"')  # S3's multipart ETag: md5-parts


def test_an_unreachable_store_is_a_clear_error_that_never_shows_the_secret(tmp_path):
    from bench.s3server import free_port

    settings = load_settings({"VIDGEN_VAR_DIR": str(tmp_path), "VIDGEN_BLOB_URL": "s3://bucket/prefix",
                              "VIDGEN_BLOB_ENDPOINT": f"http://127.0.0.1:{free_port()}",
                              "VIDGEN_BLOB_ACCESS_KEY_ID": "AKIDEXAMPLE",
                              "VIDGEN_BLOB_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-very-secret"})
    store = open_blob_store(settings)
    assert isinstance(store, S3BlobStore) and "very-secret" not in repr(store) + repr(settings)
    started = time.monotonic()
    with pytest.raises(BlobStoreUnavailable) as failure:
        store.put(b"x", "job-1", "video.mp4")
    assert time.monotonic() - started < 30
    assert "s3://bucket/prefix" in str(failure.value) and "very-secret" not in str(failure.value)
    with pytest.raises(BlobStoreUnavailable):
        store.exists({"uri": "s3://bucket/prefix/job-1/video.mp4", "sha256": "0" * 64, "bytes": 1})


def test_an_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        open_blob_store("gs://bucket/x")
