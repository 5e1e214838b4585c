"""Runs the whole platform on one machine: `vidgen broker` and one `vidgen stage NAME` process per stage.

`vidgen up`, `vidgen demo`, the integration tests and the benchmarks all start the platform this way, so what
they exercise is exactly what an operator runs: separate processes talking over the broker.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .settings import Settings, load_settings, private_dir, read_platform_file

log = logging.getLogger(__name__)

STAGE_NAMES = ("prompt-encoder", "scheduler", "gpu-agent", "vae-decoder", "compliance")
#: What `vidgen up` runs besides the pipeline: the job-state tracker, the archiver and the blob lifecycle (and a
#: gateway).
SERVICE_NAMES = ("tracker", "archiver", "lifecycle")
#: On one machine the denoiser should win the cores: everything else only needs CPU between denoising steps, and
#: on a small CPU box two torch threads stall whenever another process takes a core. (A real deployment puts the
#: agents on their own GPU machines; this only shapes `vidgen up`, `demo`, the tests and the benchmarks.)
#: The decoder too: for a model that streams while generating it is on the path to the first frame, which must not
#: wait for the last chunk's denoising (seen at nice 10 beside a browser: the first segment only after the last step).
FOREGROUND_STAGES = ("gpu-agent", "vae-decoder")
#: Stopped after every other process: the archiver keeps what they wrote last (streams/embedded.py restores it).
STOPPED_LAST = ("archiver",)
RESTORE_STATUS_FILE = "restore.json"  # written by the restore while `vidgen broker` starts (consumers/restore.py)


class PlatformNotStarted(RuntimeError):
    """`vidgen broker` gave up before the platform was announced (a restore that failed says why)."""


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
BACKGROUND_NICENESS = 10


class PlatformProcesses:
    """`vidgen broker` (which starts Tansu and the registry unless the settings name real ones) plus stages."""
    def __init__(self, var_dir: Path, stages: tuple[str, ...] = STAGE_NAMES, env: dict[str, str] | None = None):
        self.var_dir = private_dir(Path(var_dir).resolve())
        self.stage_names = stages
        self.env = {**os.environ, **(env or {}), "VIDGEN_VAR_DIR": str(self.var_dir)}
        self.broker: subprocess.Popen | None = None
        self.stages: dict[str, list[subprocess.Popen]] = {}
        self.log_dir = self.var_dir / "log"

    def _spawn(self, args: list[str], log_name: str, env: dict[str, str] | None = None,
               foreground: bool = False) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        background = not foreground  # the broker (and Tansu, its child) and the CPU stages
        with open(self.log_dir / f"{log_name}.log", "ab") as log_file:
            return subprocess.Popen(
                [sys.executable, "-m", "vidgen", *args], env={**self.env, **(env or {})}, stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=(lambda: os.nice(BACKGROUND_NICENESS)) if background else None,
                # Its own process group: a terminal's Ctrl-C reaches `vidgen up` alone, which then stops the
                # stages, the archiver and the broker in that order (all at once would lose the last records).
                process_group=0,
            )

    def settings(self) -> Settings:
        return load_settings(self.env)

    def start(self, timeout_s: float = 60.0, on_restore: Callable[[dict], None] | None = None) -> Settings:
        """Start `vidgen broker`, wait until it announces the platform (after restoring the embedded broker from the
        archive: ``on_restore`` sees its progress; a restore that moves on does not time out), then the stages."""
        platform_file = self.var_dir / "run" / "platform.json"
        restore_file = self.var_dir / "run" / RESTORE_STATUS_FILE
        platform_file.unlink(missing_ok=True)
        restore_file.unlink(missing_ok=True)
        self.broker = self._spawn(["broker"], "broker")
        deadline = time.monotonic() + timeout_s
        restore_status = None
        while read_platform_file(platform_file) is None:
            status = read_json(restore_file)
            if status is not None and status != restore_status:
                restore_status = status
                deadline = max(deadline, time.monotonic() + timeout_s)  # restoring: progress, not a hang
                if on_restore is not None:
                    on_restore(status)
            if self.broker.poll() is not None:
                if status is not None and status.get("state") == "failed":
                    raise PlatformNotStarted(status.get("error", "the restore failed"))
                raise PlatformNotStarted(f"`vidgen broker` exited ({self.broker.returncode}); see "
                                         f"{self.log_dir}/broker.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the platform did not come up in {timeout_s} s; see {self.log_dir}/broker.log")
            time.sleep(0.05)
        status = read_json(restore_file)
        if on_restore is not None and status is not None and status != restore_status:
            on_restore(status)
        for name in self.stage_names:
            self.add_stage(name)
        return self.settings()

    def add_stage(self, name: str, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start one more process of a stage; ``env`` adds settings for this process only, ``args`` options of
        `vidgen stage` (``("--devices", "2")``: an agent group)."""
        process = self._spawn(["stage", name, *args], f"{name}-{len(self.stages.get(name, []))}", env,
                              foreground=name in FOREGROUND_STAGES)
        self.stages.setdefault(name, []).append(process)
        return process

    def add_gateway(self, port: int, host: str = "127.0.0.1", args: tuple[str, ...] = (),
                    env: dict[str, str] | None = None) -> subprocess.Popen:
        """A gateway process (HTTP API, websockets, web page) on host:port, supervised like a stage; ``args`` are
        more `vidgen gateway` options (``("--tenants", path)``), ``env`` settings for this process only."""
        process = self._spawn(["gateway", "--host", host, "--port", str(port), *args],
                              "gateway" + (f"-{len(self.stages['gateway'])}" if self.stages.get("gateway") else ""), env)
        self.stages.setdefault("gateway", []).append(process)
        return process

    def signal_stage(self, pid: int, sig: int) -> subprocess.Popen:
        """Send a stage process a signal (SIGKILL to crash it, SIGTERM to drain it); it is no longer supervised."""
        for processes in self.stages.values():
            for process in processes:
                if process.pid == pid:
                    processes.remove(process)
                    process.send_signal(sig)
                    return process
        raise KeyError(f"no supervised stage process with pid {pid}")

    def check_alive(self) -> None:
        """Raise if a process died on its own (a stage must survive bad input)."""
        for name, processes in self.stages.items():
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"stage {name} exited with {process.returncode}; see {self.log_dir}")
        if self.broker is not None and self.broker.poll() is not None:
            raise RuntimeError(f"the broker exited with {self.broker.returncode}")

    def stop(self, timeout_s: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every stage (each finishes its message and leaves its group), then the archiver (which archives
        what they wrote last and records the groups' final positions), then the broker."""
        codes = {}
        running = [(n, p) for n, ps in self.stages.items() for p in ps if p.poll() is None]
        for wave in ([r for r in running if r[0] not in STOPPED_LAST], [r for r in running if r[0] in STOPPED_LAST]):
            for _, process in wave:
                process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for name, process in wave:
                try:
                    codes[name] = process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("stage %s did not stop in time; killing it", name)
                    process.kill()
                    codes[name] = process.wait()
        if self.broker is not None and self.broker.poll() is None:
            self.broker.send_signal(signal.SIGTERM)
            try:
                codes["broker"] = self.broker.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                codes["broker"] = self.broker.wait()
        return codes

    def __enter__(self) -> "PlatformProcesses":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
