"""The blob store behind the claim-check pattern: tensors and media live here, events carry a BlobRef to them.

A blob is written (atomically) before any event names it, and every read checks the sha256 the reference carries,
so a truncated or altered blob is an error, never silently wrong output. Keys are deterministic per job and name
(``<job_id>/latent-0000.safetensors``), so a redelivered stage rewrites the same blob instead of leaving orphans.

``VIDGEN_BLOB_URL`` picks the store:
  * ``file:///abs/dir`` (the default, under the var dir): files in a directory, which every process must share
    (one machine, or a ReadWriteMany volume);
  * ``s3://bucket/prefix``: any S3-compatible object store, through obstore (endpoint, region and credentials from
    the VIDGEN_BLOB_* settings; their absence means AWS's own endpoint and the AWS_* environment). Objects over
    8 MiB go up in parts; the bucket must exist.

Both offer the same methods (``BlobStore``); nothing outside this module sees a path or a client. A store that cannot
be reached raises ``BlobStoreUnavailable``: not the input's fault, so stages wait and retry rather than fail jobs.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import unquote, urlparse

_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9._=-]{1,128}$")
MULTIPART_THRESHOLD = 8 << 20  # S3 parts must be ≥ 5 MiB but the last; 8 MiB parts are what the AWS CLI uses
TMP_PREFIX = ".tmp-"


class BlobError(RuntimeError):
    """A blob is missing, unreadable, or not what its reference says."""


class BlobStoreUnavailable(BlobError):
    """The store cannot be reached or refuses the request (network, credentials, a 5xx): retry later."""


@dataclass(frozen=True)
class BlobStat:
    key: str  # "/"-joined segments, relative to the store's root
    size: int
    modified: float  # epoch seconds of the last write (S3: whole seconds)
    etag: str  # strong, quoted as in HTTP


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_segment(segment: str) -> str:
    if not _SAFE_SEGMENT.match(segment) or segment in (".", ".."):
        raise ValueError(f"unsafe blob path segment {segment!r}")
    return segment


class BlobStore:
    """What every store offers. Subclasses implement the raw operations on keys (the ``_`` methods and the
    key/URI mapping); checking references, content addressing and tensors live here once."""

    url: str

    # -- raw operations (per store) ------------------------------------------------------------------------------
    def _write(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def _read(self, key: str) -> bytes | None:
        raise NotImplementedError

    def _create(self, key: str) -> bool:
        raise NotImplementedError

    def uri_of(self, key: str) -> str:
        raise NotImplementedError

    def key_of(self, uri: str) -> str:
        """The key of a BlobRef's uri; BlobError when the uri is not in this store."""
        raise NotImplementedError

    def stat(self, key: str) -> BlobStat | None:
        raise NotImplementedError

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a blob."""
        raise NotImplementedError

    def delete(self, keys: Iterable[str]) -> None:
        """Delete blobs; absent ones are fine (S3's DeleteObjects does not say which existed)."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[BlobStat]:
        """Every blob whose key starts with ``prefix`` ("job-1/", "_cache/")."""
        raise NotImplementedError

    def presign(self, key: str, expires_s: float) -> str | None:
        """A URL that GETs the blob for ``expires_s`` seconds without credentials; None where the store cannot."""
        return None

    def local_file(self, key: str) -> Path | None:
        """The blob's file where the store is a local directory (to send it with sendfile); None otherwise."""
        return None

    # -- what callers use -----------------------------------------------------------------------------------------
    def key(self, *segments: str) -> str:
        return "/".join(_check_segment(s) for s in segments)

    def put(self, data: bytes, *segments: str, shape: tuple[int, ...] = (), dtype: str = "",
            content_addressed: bool = False) -> dict:
        """Write bytes under segments..., atomically (a reader sees all or nothing); returns the BlobRef record.

        content_addressed puts the sha256 in the name (``name.ext`` → ``name-<sha256[:16]>.ext``): writers that
        may produce different bytes for the same name (a cache filled by several processes) then never replace a
        blob that an event already names.
        """
        digest = sha256_hex(data)
        if content_addressed:
            stem, dot, ext = segments[-1].partition(".")
            segments = (*segments[:-1], f"{stem}-{digest[:16]}{dot}{ext}")
        key = self.key(*segments)
        self._write(key, data)
        return {"uri": self.uri_of(key), "sha256": digest, "bytes": len(data), "shape": [int(n) for n in shape],
                "dtype": dtype}

    def read(self, *segments: str) -> bytes | None:
        """A small mutable object by name (a pointer such as "newest checkpoint"), or None when absent.
        Unlike get(), there is no reference to check it against: callers check what it points to."""
        return self._read(self.key(*segments))

    def claim(self, *segments: str) -> bool:
        """Create an empty marker if it does not exist yet; True for the one caller that created it."""
        return self._create(self.key(*segments))

    def touch(self, *segments: str) -> None:
        """Create an empty marker, or renew its time if it exists (the dedupe ledger's marks)."""
        self._write(self.key(*segments), b"")

    def get(self, ref: dict) -> bytes:
        """The blob's bytes, after checking size and sha256 against the reference."""
        data = self._read(self.key_of(ref["uri"]))
        if data is None:
            raise BlobError(f"blob {ref['uri']} does not exist")
        if len(data) != ref["bytes"] or sha256_hex(data) != ref["sha256"]:
            raise BlobError(f"blob {ref['uri']} does not match its reference (size or sha256 differs)")
        return data

    def exists(self, ref: dict) -> bool:
        try:
            self.get(ref)
            return True
        except BlobStoreUnavailable:
            raise  # "cannot tell" is not "absent"
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


class LocalBlobStore(BlobStore):
    """Blobs as files under one directory; URIs are file:// URLs."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*(_check_segment(s) for s in key.split("/")))

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the event naming this blob may be read on another machine right away
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def _create(self, key: str) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x"):
                return True
        except FileExistsError:
            return False

    def uri_of(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_of(self, uri: str) -> str:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise BlobError(f"blob {uri} is not in this store ({self.url})")
        path = Path(unquote(parsed.path)).resolve()
        if self.root not in path.parents:
            raise BlobError(f"blob {uri} is outside the store root {self.root}")
        return path.relative_to(self.root).as_posix()

    def stat(self, key: str) -> BlobStat | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _file_stat(key, st)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                return f.read(max(0, end - start))
        except FileNotFoundError:
            raise BlobError(f"blob {key} does not exist in {self.url}") from None

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[BlobStat]:
        # Walk only the folder the prefix names ("job-1/lat" walks job-1/), then filter by the whole prefix.
        folder = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    continue  # a write in progress (or one that died): not a blob
                path = Path(dirpath, name)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        yield _file_stat(key, path.stat())
                    except FileNotFoundError:
                        continue  # deleted while listing

    def local_file(self, key: str) -> Path | None:
        return self._path(key)


def _file_stat(key: str, st: os.stat_result) -> BlobStat:
    # Files are only ever replaced whole (os.replace), so size and mtime in ns name one content: a strong validator.
    return BlobStat(key, st.st_size, st.st_mtime, f'"{st.st_size:x}-{st.st_mtime_ns:x}"')


class S3BlobStore(BlobStore):
    """Blobs as objects in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, R2, GCS's S3 API ...) under a prefix;
    URIs are ``s3://bucket/prefix/key``. obstore (Rust's object_store) does the signing, retries and multipart.

    ``options``: endpoint, region, access_key_id, secret_access_key, session_token (any may be absent). They go to
    the client only: never into a URI, an error message or a log line."""

    def __init__(self, url: str, options: dict[str, str] | None = None):
        from obstore.store import S3Store

        parsed = urlparse(url)
        if not parsed.netloc:
            raise ValueError(f"blob store {url!r} names no bucket: use s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        options = {k: v for k, v in (options or {}).items() if v}
        endpoint = options.pop("endpoint", None)
        config = {k: options[k] for k in ("region", "access_key_id", "secret_access_key", "session_token")
                  if k in options}
        client = {"connect_timeout": "5s", "timeout": "60s"}
        if endpoint:
            config["endpoint"] = endpoint
            client["allow_http"] = endpoint.startswith("http://")  # a plain-HTTP endpoint is a deliberate choice
        # A few quick retries inside one call; longer outages surface as BlobStoreUnavailable and the stage's own
        # retry waits (a default client would block for minutes on a store that does not answer).
        retry = {"max_retries": 3, "retry_timeout": timedelta(seconds=20),
                 "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5),
                             "base": 2}}
        self._store = S3Store(self.bucket, prefix=self.prefix or None, client_options=client, retry_config=retry,
                              **config)

    def __repr__(self) -> str:
        return f"S3BlobStore({self.url!r})"  # the client's config holds the secret key: never show it

    def _call(self, what: str, key: str, fn, *args, **kwargs):
        """One obstore call, its failures turned into this module's errors (without the client's config)."""
        import obstore.exceptions as ox

        try:
            return fn(self._store, *args, **kwargs)
        except (FileNotFoundError, ox.AlreadyExistsError, ox.PreconditionError):
            raise  # answers, not failures: the caller decides
        except (ox.BaseError, OSError) as exc:
            raise BlobStoreUnavailable(f"blob store {self.url}: {what} {key} failed: "
                                       f"{type(exc).__name__}: {_first_line(exc)}") from None

    def _write(self, key: str, data: bytes) -> None:
        import obstore as obs

        # A PUT is atomic in S3; bigger objects go up in parts (completed in one step, so equally atomic).
        self._call("writing", key, obs.put, key, data, use_multipart=len(data) > MULTIPART_THRESHOLD,
                   chunk_size=MULTIPART_THRESHOLD)

    def _read(self, key: str) -> bytes | None:
        import obstore as obs

        try:
            return bytes(self._call("reading", key, lambda store: obs.get(store, key).bytes()))
        except FileNotFoundError:
            return None

    def _create(self, key: str) -> bool:
        import obstore as obs
        import obstore.exceptions as ox

        try:
            self._call("creating", key, obs.put, key, b"", mode="create")  # If-None-Match: *
            return True
        except (ox.AlreadyExistsError, ox.PreconditionError):
            return False

    def uri_of(self, key: str) -> str:
        return f"{self.url}/{key}"

    def key_of(self, uri: str) -> str:
        if not uri.startswith(self.url + "/"):
            raise BlobError(f"blob {uri} is not in this store ({self.url})")
        key = uri[len(self.url) + 1:]
        try:
            return self.key(*key.split("/"))
        except ValueError as exc:
            raise BlobError(f"blob {uri}: {exc}") from None

    def stat(self, key: str) -> BlobStat | None:
        import obstore as obs

        try:
            return _object_stat(self._call("looking up", key, obs.head, key), key)
        except FileNotFoundError:
            return None

    def read_range(self, key: str, start: int, end: int) -> bytes:
        import obstore as obs

        if end <= start:
            return b""
        try:
            return bytes(self._call("reading", key, obs.get_range, key, start=start, end=end))
        except FileNotFoundError:
            raise BlobError(f"blob {key} does not exist in {self.url}") from None

    def delete(self, keys: Iterable[str]) -> None:
        import obstore as obs

        keys = list(keys)
        for start in range(0, len(keys), 1000):  # S3's DeleteObjects takes up to 1000 keys
            batch = keys[start:start + 1000]
            self._call("deleting", batch[0], obs.delete, batch)

    def list(self, prefix: str = "") -> Iterator[BlobStat]:
        import obstore as obs

        # obstore lists whole path segments ("job-1/pub" lists job-1/pub/...): ask for the folder, filter here.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        pages = iter(self._call("listing", prefix or "/", obs.list, prefix=folder or None))
        while True:  # the pages come as they are fetched: a failure may come with any of them
            page = self._call("listing", prefix or "/", lambda _store: next(pages, None))
            if page is None:
                return
            for meta in page:
                if meta["path"].startswith(prefix):
                    yield _object_stat(meta, meta["path"])

    def presign(self, key: str, expires_s: float) -> str | None:
        import obstore as obs

        return self._call("signing", key, obs.sign, "GET", key, timedelta(seconds=expires_s))


def _object_stat(meta: dict, key: str) -> BlobStat:
    return BlobStat(key, int(meta["size"]), meta["last_modified"].timestamp(), meta.get("e_tag") or '""')


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def open_blob_store(source) -> BlobStore:
    """The store of a Settings (blob_url and blob_options) or of a bare URL (no credentials: local stores, tests)."""
    url = source if isinstance(source, str) else source.blob_url
    options = {} if isinstance(source, str) else source.blob_options
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalBlobStore(unquote(parsed.path) if parsed.scheme else url)
    if parsed.scheme == "s3":
        return S3BlobStore(url, options)
    raise ValueError(f"unsupported blob store {url!r}: use file:///path or s3://bucket/prefix")
