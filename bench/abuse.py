"""`vidgen bench abuse`: another tenant's latency while one client abuses the gateway (issue 24).

Starts the embedded broker and registry (no stages), one gateway process (the real `vidgen gateway`, its open-file
limit lowered to ``--nofile`` as in the probe that found the exhaustion) with two tenants, then, phase by phase,
an abuser in its own process from another loopback address (127.0.0.2), while this process — the other tenant,
from 127.0.0.1 — sends GET /v1/videos one after the other and times each:

1. ``baseline``: no abuse;
2. ``idle``: the abuser opens ``--idle`` TCP connections and sends nothing;
3. ``slow_body``: ``--slow`` connections each send a POST's headers, then a byte of its body every second;
4. ``websockets``: ``--websockets`` websocket upgrades with the abuser's key, held open;
5. ``list_flood``: the abuser, who created ``--jobs`` jobs first, lists them 100 at a time over ``--listers``
   connections as fast as the gateway answers (a listing used to sort all of a tenant's jobs on the event loop).

Prints per phase the other tenant's p50/p99/max, errors, and what the abuser's connections got (admitted, refused
with 429/503, closed). Ends with ``RESULT baseline_p99_ms=… idle_p99_ms=… slow_body_p99_ms=… websockets_p99_ms=…
list_flood_p99_ms=… worst_delta_ms=…`` (the largest p99 above the baseline's). The machine is shared: compare phases of one run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import format_table, percentile, print_result, start_gateway, stop_process

ABUSER_ADDRESS = "127.0.0.2"


# -- the abuser (its own process) ---------------------------------------------------------------------------------------
async def _abuse(mode: str, host: str, port: int, key: str, count: int, hold_s: float) -> dict:
    import aiohttp

    outcome = {"opened": 0, "refused": 0, "failed": 0}
    held = []

    async def connect():
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(ABUSER_ADDRESS, 0))
        except OSError:
            outcome["failed"] += 1
            return None
        outcome["opened"] += 1
        held.append(writer)
        return reader, writer

    if mode == "list_flood":
        headers = {"Authorization": f"Bearer {key}"}
        connector = aiohttp.TCPConnector(limit=0, local_addr=(ABUSER_ADDRESS, 0))
        stop_at = time.monotonic() + hold_s

        async def lister(session):
            while time.monotonic() < stop_at:
                async with session.get(f"http://{host}:{port}/v1/videos?limit=100", headers=headers) as response:
                    await response.read()
                    outcome["opened" if response.status == 200 else "refused"] += 1

        async with aiohttp.ClientSession(connector=connector) as session:
            print("ready", flush=True)
            await asyncio.gather(*(lister(session) for _ in range(count)))
        return outcome

    if mode == "websockets":
        connector = aiohttp.TCPConnector(limit=0, local_addr=(ABUSER_ADDRESS, 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            sockets = []
            for _ in range(count):
                try:
                    sockets.append(await session.ws_connect(f"http://{host}:{port}/v1/events",
                                                            headers={"Authorization": f"Bearer {key}"}))
                    outcome["opened"] += 1
                except aiohttp.WSServerHandshakeError as exc:
                    outcome["refused" if exc.status in (429, 503) else "failed"] += 1
                except aiohttp.ClientError:
                    outcome["failed"] += 1
            print("ready", flush=True)
            await asyncio.sleep(hold_s)
            for ws in sockets:
                await ws.close()
        return outcome

    pending = []
    for _ in range(count):
        opened = await connect()
        if opened is None:
            continue
        reader, writer = opened
        if mode == "slow_body":
            writer.write(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() +
                         b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
        pending.append(reader)
    await asyncio.sleep(0.5)
    for reader in pending:  # a refused connection was answered at once and closed
        try:
            async with asyncio.timeout(0.01):
                if (await reader.read(256)).startswith(b"HTTP/1.1 4") or reader.at_eof():
                    outcome["refused"] += 1
        except (TimeoutError, OSError):
            pass
    print("ready", flush=True)
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        if mode == "slow_body":
            for writer in held:
                if not writer.is_closing():
                    writer.write(b" ")
    for writer in held:
        writer.close()
    return outcome


def _abuser_main(argv: list[str]) -> int:
    mode, host, port, key, count, hold_s = argv
    print(json.dumps(asyncio.run(_abuse(mode, host, int(port), key, int(count), float(hold_s)))), flush=True)
    return 0


# -- the other tenant ---------------------------------------------------------------------------------------------------
async def _measure(base: str, key: str, duration_s: float) -> dict:
    import aiohttp

    latencies, errors = [], 0
    headers = {"Authorization": f"Bearer {key}"}
    stop_at = time.perf_counter() + duration_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            try:
                async with session.get(f"{base}/v1/videos?limit=5", headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append((time.perf_counter() - sent) * 1000.0)
            else:
                errors += 1
            await asyncio.sleep(0.01)
    return {"n": len(latencies), "errors": errors, "p50_ms": percentile(latencies, 50) if latencies else None,
            "p99_ms": percentile(latencies, 99) if latencies else None, "max_ms": max(latencies, default=None)}


async def _create_jobs(base: str, key: str, count: int, concurrency: int = 16) -> None:
    """The abuser's jobs (nothing runs them: they stay requested), listed in the list flood."""
    import aiohttp

    body = {"prompt": "a red fox trotting through fresh snow", "size": "64x64", "frames": 5, "steps": 2}
    remaining = iter(range(count))

    async def creator(session):
        for _ in remaining:
            async with session.post(f"{base}/v1/videos", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                if r.status != 200:
                    raise RuntimeError(f"creating the abuser's jobs: {r.status} {await r.text()}")

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(creator(session) for _ in range(concurrency)))
    print(f"the abuser created {count} jobs in {time.monotonic() - started:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--abuse"]:
        return _abuser_main(argv[1:])
    parser = argparse.ArgumentParser(prog="vidgen bench abuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per phase")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections")
    parser.add_argument("--slow", type=int, default=200, help="slow-body connections")
    parser.add_argument("--websockets", type=int, default=300, help="websocket upgrades")
    parser.add_argument("--nofile", type=int, default=1024, help="the gateway's open-file limit (soft and hard)")
    parser.add_argument("--jobs", type=int, default=3000, help="jobs the abuser creates before its list flood")
    parser.add_argument("--listers", type=int, default=8, help="the list flood's connections")
    args = parser.parse_args(argv)

    from gateway.tenants import TenantStore
    from streams.embedded import free_port
    from streams.supervisor import PlatformProcesses

    var_dir = Path(tempfile.mkdtemp(prefix="vidgen-bench-abuse-"))
    platform = PlatformProcesses(var_dir, stages=())
    gateway = None
    rows, p99 = [], {}
    try:
        platform.start()
        tenants = TenantStore()
        _, victim = tenants.create_tenant("victim", "premium", rate_per_s=1e6, burst=10**6,
                                          max_in_flight=10**6, max_per_hour=10**9)
        _, abuser = tenants.create_tenant("abuser", "free", rate_per_s=1e6, burst=10**6,
                                          max_in_flight=10**6, max_per_hour=10**9)
        tenants_file = tenants.save(var_dir / "tenants.toml")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = platform.log_dir / "gateway.log"

        def lower_nofile() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))

        gateway = start_gateway(platform, tenants_file, port, preexec_fn=lower_nofile)
        log_size = log_path.stat().st_size
        print(f"gateway pid {gateway.pid} on {base} (open-file limit {args.nofile}); logs in {var_dir}/log",
              flush=True)
        asyncio.run(_create_jobs(base, abuser, args.jobs))
        phases = [("baseline", None, 0), ("idle", "idle", args.idle), ("slow_body", "slow_body", args.slow),
                  ("websockets", "websockets", args.websockets), ("list_flood", "list_flood", args.listers)]
        for name, mode, count in phases:
            abuse, outcome = None, {}
            if mode is not None:
                abuse = subprocess.Popen(
                    [sys.executable, "-m", "bench.abuse", "--abuse", mode, "127.0.0.1", str(port), abuser, str(count),
                     str(args.duration + 1.0)],
                    stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
                if abuse.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"the {mode} abuser did not start")
            result = asyncio.run(_measure(base, victim, args.duration))
            if abuse is not None:
                out, _ = abuse.communicate(timeout=args.duration + 60)
                outcome = json.loads(out.strip().splitlines()[-1])
            p99[name] = result["p99_ms"]
            rows.append([name, count, result["n"], result["p50_ms"], result["p99_ms"], result["max_ms"],
                         result["errors"], outcome.get("opened", "-"), outcome.get("refused", "-"),
                         outcome.get("failed", "-")])
            print(f"{name}: other tenant p99 {result['p99_ms'] or 0:.1f} ms, {result['errors']} errors; "
                  f"abuser {outcome}", flush=True)
            time.sleep(1.0)
        log_growth = log_path.stat().st_size - log_size
    finally:
        stop_process(gateway)
        platform.stop()

    print()
    print(format_table(["phase", "abuse", "requests", "p50 ms", "p99 ms", "max ms", "errors", "abuser opened",
                        "refused", "failed"], rows, float_format="{:.1f}"))
    print(f"gateway log grew {log_growth:,} bytes during the abuse")
    deltas = [v - p99["baseline"] for k, v in p99.items() if k != "baseline" and v is not None]
    print_result(baseline_p99_ms=round(p99["baseline"], 1), idle_p99_ms=round(p99["idle"], 1),
                 slow_body_p99_ms=round(p99["slow_body"], 1), websockets_p99_ms=round(p99["websockets"], 1),
                 list_flood_p99_ms=round(p99["list_flood"], 1),
                 worst_delta_ms=round(max(deltas, default=0.0), 1), log_bytes=log_growth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
