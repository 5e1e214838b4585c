"""`vidgen bench idle`: what the embedded platform costs at rest, and the progress latency it keeps.

1. Starts `vidgen up` (the embedded broker and registry, every stage, the tracker, the archiver, the lifecycle, a
   gateway) in a fresh var dir, as a person on a laptop would.
2. Waits until it settles: the gateway answers /healthz, then CPU use over ``--settle-window-s`` windows stops
   falling (two windows in a row within 0.02 cores; at most ``--settle-max-s``).
3. Samples every process's CPU time over ``--window-s`` seconds with no job at all, per role (`vidgen broker` with
   its Tansu child is "broker").
4. Stops it, then runs `vidgen bench progress`'s measurement (broker, tracker, gateway, websocket clients, this
   process producing StepProgress) with the same client settings: step finished → websocket envelope.

Ends with ``RESULT idle_cpu_cores=… broker_cpu_cores=… progress_p99_ms=…``. Goal: idle_cpu_cores ≤ 0.10 with
progress_p99_ms ≤ 30. Options after ``--`` go to the progress measurement (``-- --steps 100``).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import cpu_seconds, format_table, print_result, process_tree, wait_healthy


def role_of(pid: int) -> str:
    """What a process of `vidgen up` is, from its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    if "stage" in argv and argv.index("stage") + 1 < len(argv):
        return argv[argv.index("stage") + 1]
    for role in ("broker", "gateway", "up"):
        if role in argv:
            return role
    name = Path(argv[0]).name if argv and argv[0] else "?"
    return "broker" if "tansu" in name.lower() or "calfkit" in " ".join(argv).lower() else name


def cores_by_role(root_pid: int, window_s: float) -> tuple[dict[str, float], float]:
    """Cores each role kept busy over ``window_s`` (processes found at the start), and the total."""
    pids = sorted(process_tree([root_pid]))
    roles = {pid: role_of(pid) for pid in pids}
    before = {pid: cpu_seconds([pid]) for pid in pids}
    time.sleep(window_s)
    used: dict[str, float] = {}
    for pid in pids:
        after = cpu_seconds([pid])
        if before[pid] is not None and after is not None:
            used[roles[pid]] = used.get(roles[pid], 0.0) + (after - before[pid]) / window_s
    return used, sum(used.values())


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    own, progress_argv = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="vidgen bench idle")
    parser.add_argument("--window-s", type=float, default=30.0, help="the idle sample")
    parser.add_argument("--settle-window-s", type=float, default=3.0)
    parser.add_argument("--settle-max-s", type=float, default=90.0)
    parser.add_argument("--skip-progress", action="store_true", help="only the idle sample")
    parser.add_argument("--fetch-waits", default="", help="VIDGEN_EMBEDDED_FETCH_WAITS_MS for both measurements, "
                                                          "e.g. pipeline=250 (the settings' curve)")
    args = parser.parse_args(own)
    if args.fetch_waits:
        os.environ["VIDGEN_EMBEDDED_FETCH_WAITS_MS"] = args.fetch_waits  # the progress platform's processes too

    from streams.embedded import free_port

    from .progress import measure, progress_parser

    progress_args = progress_parser("vidgen bench idle -- ").parse_args(
        progress_argv or ["--steps", "150", "--with-tracker"])
    var_dir = Path(tempfile.mkdtemp(prefix="vidgen-bench-idle-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VIDGEN_") or k == "VIDGEN_EMBEDDED_FETCH_WAITS_MS"}
    up = subprocess.Popen([sys.executable, "-m", "vidgen", "up", "--port", str(port)],
                          env={**env, "VIDGEN_VAR_DIR": str(var_dir)}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        started = time.monotonic()
        for line in up.stdout:
            if line.startswith("vidgen is up"):
                break
        else:
            raise SystemExit(f"`vidgen up` exited ({up.wait()}); logs in {var_dir}/log")
        wait_healthy(f"http://127.0.0.1:{port}", up, args.settle_max_s, var_dir / "log")
        deadline = time.monotonic() + args.settle_max_s
        previous, settle = None, []
        while time.monotonic() < deadline:
            _, total = cores_by_role(up.pid, args.settle_window_s)
            settle.append(total)
            if previous is not None and abs(total - previous) <= 0.02:
                break
            previous = total
        print(f"`vidgen up` started and settled in {time.monotonic() - started:.0f} s (CPU over the last "
              f"windows: {', '.join(f'{c:.2f}' for c in settle[-4:])} cores)", flush=True)
        used, total = cores_by_role(up.pid, args.window_s)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)  # Ctrl-C: `vidgen up` stops its processes in order
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    print(format_table(("process (idle)", "cores"), sorted(used.items(), key=lambda item: -item[1])
                       + [("all of vidgen up", total)], float_format="{:.3f}"))
    print(f"goal idle_cpu_cores <= 0.10: {'met' if total <= 0.10 else 'NOT met'}", flush=True)
    p99 = "skipped"
    if not args.skip_progress:
        measured = measure(progress_args)
        p99 = round(measured["p99_ms"], 2) if measured else "nan"
    from streams.settings import load_settings

    print(f"fetch waits (ms): {load_settings().fetch_waits_ms}")
    print_result(idle_cpu_cores=round(total, 3), broker_cpu_cores=round(used.get("broker", 0.0), 3),
                 progress_p99_ms=p99)
    return 0
