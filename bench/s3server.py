"""A real S3-protocol server on loopback for the tests, `vidgen bench storage` and `make run-s3`: moto's server
(moto[server], a test extra), in its own process. Never part of a deployment: fleets use a real object store.

Why moto: of the S3 servers that install here (no Docker, no MinIO/Garage/VersityGW binaries), it is the one that
answers the protocol as S3 does for what vidgen uses — multipart uploads (EntityTooSmall for a small non-last part),
conditional writes (If-None-Match: * → 412), ranged GETs, prefix listings, presigned URLs checked against their
expiry. It checks neither credentials nor checksums, so the tests check those on the vidgen side.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BUCKET = "vidgen-test"
CREDENTIALS = {"VIDGEN_BLOB_ACCESS_KEY_ID": "test-key", "VIDGEN_BLOB_SECRET_ACCESS_KEY": "test-secret",
               "VIDGEN_BLOB_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_bucket(endpoint: str, bucket: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=10).close()


@contextmanager
def s3_server(log_dir: Path, bucket: str = BUCKET) -> Iterator[dict[str, str]]:
    """Start moto's S3 server, create ``bucket``; yields the VIDGEN_BLOB_* settings of a store in it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log_dir / "moto.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                create_bucket(endpoint, bucket)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start; see {log_dir / 'moto.log'}") from None
                time.sleep(0.1)
        yield {"VIDGEN_BLOB_URL": f"s3://{bucket}/blobs", "VIDGEN_BLOB_ENDPOINT": endpoint, **CREDENTIALS}
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    # `python -m bench.s3server CMD ARGS...`: run a command against a fresh S3 server (`make run-s3`: the demo).
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vidgen-s3-") as tmp, s3_server(Path(tmp)) as s3_env:
        print(f"S3 server at {s3_env['VIDGEN_BLOB_ENDPOINT']}, bucket {BUCKET}", file=sys.stderr, flush=True)
        sys.exit(subprocess.call(sys.argv[1:], env={**os.environ, **s3_env}))
