"""Helpers every benchmark shares: statistics, timing, CPU accounting of other processes, tables, the RESULT line.

A benchmark prints whatever it likes for people, then ends with exactly one machine-readable line,
``RESULT key=value ...`` (see ``result_line``), which tools read from the last line of stdout.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path



# -- statistics -------------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the two nearest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    below, above = math.floor(rank), math.ceil(rank)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


# -- timing ---------------------------------------------------------------------------------------------------------
class Stopwatch:
    """Elapsed seconds on the monotonic high-resolution clock; ``seconds`` is live until ``stop``."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stopped: float | None = None

    def stop(self) -> float:
        self.stopped = time.perf_counter()
        return self.seconds

    @property
    def seconds(self) -> float:
        return (self.stopped if self.stopped is not None else time.perf_counter()) - self.started


@contextmanager
def timed() -> Iterator[Stopwatch]:
    """``with timed() as watch: ...`` then ``watch.seconds``."""
    watch = Stopwatch()
    try:
        yield watch
    finally:
        watch.stop()


# -- CPU use of other processes (Linux /proc; None elsewhere) ---------------------------------------------------------
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone, or no /proc
        return None
    # The command name (field 2) is in parentheses and may contain spaces; fields after it are plain.
    return text[text.rindex(")") + 2:].split()


def process_tree(root_pids: Iterable[int]) -> set[int]:
    """The given processes and all their live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))  # fields[1] is the ppid
    tree: set[int] = set()
    pending = list(root_pids)
    while pending:
        pid = pending.pop()
        if pid not in tree:
            tree.add(pid)
            pending.extend(parents.get(pid, ()))
    return tree


def cpu_seconds(pids: Iterable[int]) -> float | None:
    """User + system CPU seconds used so far by these processes (None without /proc)."""
    total, found = 0.0, False
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            found = True
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime
    return total if found else None


def machine_busy_seconds() -> float | None:
    """CPU seconds every core of the machine has spent busy since boot (None without /proc)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


class CpuAccount:
    """CPU seconds used during a ``with`` block by named groups of processes, and by everything else ("other").

    "other" is what the machine spent beyond the named groups: another job, a test run, a noisy neighbour.
    Measurements taken while it was high are suspect. Resolution is a clock tick (10 ms) per process.
    """

    OTHER = "other"

    def __init__(self, groups: dict[str, Iterable[int]]):
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.used: dict[str, float] = {}
        self.watch = Stopwatch()
        self._start: dict[str, float | None] = {}

    def _snapshot(self) -> dict[str, float | None]:
        snapshot: dict[str, float | None] = {name: cpu_seconds(pids) for name, pids in self.groups.items()}
        snapshot[self.OTHER] = machine_busy_seconds()
        return snapshot

    def __enter__(self) -> "CpuAccount":
        self.watch = Stopwatch()
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.watch.stop()
        end = self._snapshot()
        if any(v is None for v in (*end.values(), *self._start.values())):
            return  # no /proc: nothing is accounted
        self.used = {name: end[name] - self._start[name] for name in self.groups}
        self.used[self.OTHER] = max(0.0, end[self.OTHER] - self._start[self.OTHER] - sum(self.used.values()))

    def cores(self, name: str) -> float | None:
        """Average cores the group kept busy during the block (None when not measured)."""
        if name not in self.used or self.watch.seconds <= 0:
            return None
        return self.used[name] / self.watch.seconds


def cpu_load(pids: Iterable[int], window_s: float) -> float | None:
    """Cores these processes kept busy, on average, over the next ``window_s`` seconds (0.5 = half a core)."""
    pids = list(pids)
    before = cpu_seconds(pids)
    time.sleep(window_s)
    after = cpu_seconds(pids)
    if before is None or after is None:
        return None
    return max(0.0, after - before) / window_s


# -- a gateway's start ------------------------------------------------------------------------------------------------
def wait_healthy(base: str, process, timeout_s: float, log_path) -> None:
    """Until the gateway at ``base`` answers /healthz (raises if ``process`` exits first or it takes too long)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the process exited ({process.returncode}); see {log_path}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway did not answer in {timeout_s} s; see {log_path}")
        time.sleep(0.1)


def start_gateway(platform, tenants_file, port: int, preexec_fn=None):
    """`vidgen gateway` on ``port`` over a PlatformProcesses' broker, its log beside the platform's; returns the
    process once /healthz answers."""
    import subprocess
    import sys

    log_path = platform.log_dir / "gateway.log"
    with open(log_path, "ab") as log_file:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "vidgen", "gateway", "--port", str(port), "--tenants", str(tenants_file)],
            env=platform.env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=preexec_fn)
    wait_healthy(f"http://127.0.0.1:{port}", gateway, 90.0, log_path)
    return gateway


def stop_process(process, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``timeout_s``."""
    import subprocess

    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()



# -- output -----------------------------------------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]], float_format: str = "{:.3f}") -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned; floats through float_format."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return float_format.format(value)
        return "" if value is None else str(value)

    lines = [[cell(v) for v in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    rendered = [
        "  ".join(text.ljust(widths[i]) if i == 0 else text.rjust(widths[i]) for i, text in enumerate(line))
        for line in lines
    ]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)


def _result_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    text = str(value)
    if not text or any(c.isspace() or c == "=" for c in text):
        raise ValueError(f"RESULT values must be non-empty and hold no spaces or '=': {text!r}")
    return text


def result_line(**fields: object) -> str:
    """``RESULT k1=v1 k2=v2 ...`` in the order given; floats to 4 significant digits."""
    return "RESULT " + " ".join(f"{key}={_result_value(value)}" for key, value in fields.items())


def print_result(**fields: object) -> None:
    """Print the RESULT line; call it last, it must be the final line of stdout."""
    print(result_line(**fields), flush=True)


# -- running ---------------------------------------------------------------------------------------------------------
def _stop_on_sigterm(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally that stops the platform


def run_stopping_on_sigterm(run, *args):
    """``run(*args)``, with SIGTERM raising KeyboardInterrupt meanwhile, so a benchmark that started a platform
    stops it (its ``finally``) when it is itself stopped; the registry client's per-request log lines muted."""
    import logging
    import signal

    logging.getLogger("httpx2").setLevel(logging.WARNING)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return run(*args)
    finally:
        signal.signal(signal.SIGTERM, previous)
