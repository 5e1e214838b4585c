"""The embedded platform as integration tests start it."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from streams.settings import Settings
from streams.supervisor import PlatformProcesses


@contextmanager
def running_platform(var_dir: Path, stages: tuple[str, ...] = (), **env: str) -> Iterator[tuple[PlatformProcesses,
                                                                                                 Settings]]:
    """`vidgen broker` plus the given stages, stopped afterwards. Sessions of 3 s: Tansu holds a group join for half
    the session timeout, so the default would cost every test seconds."""
    platform = PlatformProcesses(var_dir, stages=stages, env={"VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000", **env})
    settings = platform.start()
    try:
        yield platform, settings
    finally:
        platform.stop()
