"""`vidgen bench intake`: how many POST /v1/videos one gateway process accepts per second at p99 ≤ 50 ms.

Starts the embedded broker and registry only (no stages: requests are published, nobody generates them), one
gateway process (`gateway.app.main`, the real app: Kafka publisher with acks=all, the jobs view following the
lifecycle topics), and, per concurrency level, a load generator in its own process (aiohttp client, closed loop:
N connections each POSTing the next request as soon as the last one was answered), so the client never shares
the gateway's event loop. Every accepted request was acknowledged by the broker before its answer.

Prints per level: requests/s, p50/p99/max latency, errors, the gateway's CPU (cores). Ends with
``RESULT rps=<highest rps among levels with p99 ≤ --p99-ms> p99_ms=<its p99> concurrency=<its level>``
(rps=0 when no level met the target).

Options: --levels 1,4,16,32,64 --duration 5 --warmup 1 --p99-ms 50 --body-frames 5.
On a small machine the load generator and the broker compete with the gateway for cores; the gateway's CPU
column tells whether the gateway (1.0 = one full core) or the machine was the limit.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cpu_seconds, format_table, percentile, print_result, start_gateway, stop_process

BODY = {"prompt": "a red fox trotting through fresh snow", "size": "64x64", "frames": 5, "steps": 2,
        "preset": "fast"}


# -- the load generator (its own process) -----------------------------------------------------------------------------
async def _drive(url: str, key: str, concurrency: int, duration_s: float, warmup_s: float) -> dict:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps(BODY).encode()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            sent = time.perf_counter()
            if sent >= stop_at:
                return
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError:
                status = 0
            done = time.perf_counter()
            if sent >= measure_from:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(done - sent)

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    ok = len(latencies)
    return {"ok": ok, "errors": sum(n for s, n in statuses.items() if s != 200), "statuses": statuses,
            "rps": ok / duration_s,
            "p50_ms": percentile(latencies, 50) * 1000 if ok else None,
            "p99_ms": percentile(latencies, 99) * 1000 if ok else None,
            "max_ms": max(latencies) * 1000 if ok else None}


def _load_main(argv: list[str]) -> int:
    url, key, concurrency, duration_s, warmup_s = argv
    result = asyncio.run(_drive(url, key, int(concurrency), float(duration_s), float(warmup_s)))
    print(json.dumps(result), flush=True)
    return 0


# -- the benchmark ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--load"]:
        return _load_main(argv[1:])
    parser = argparse.ArgumentParser(prog="vidgen bench intake", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,4,16,32,64", help="concurrent connections per level")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each level")
    parser.add_argument("--p99-ms", type=float, default=50.0, help="latency target")
    args = parser.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",")]

    from gateway.tenants import TenantStore
    from streams.embedded import free_port
    from streams.supervisor import PlatformProcesses

    var_dir = Path(tempfile.mkdtemp(prefix="vidgen-bench-intake-"))
    platform = PlatformProcesses(var_dir, stages=())
    gateway = None
    rows, results = [], []
    try:
        platform.start()
        tenants = TenantStore()
        # Limits out of the way: this measures intake, not the limiter refusing it.
        _, key = tenants.create_tenant("bench", "premium", rate_per_s=1e9, burst=10**9,
                                       max_in_flight=10**9, max_per_hour=10**9)
        tenants_file = tenants.save(var_dir / "tenants.toml")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        gateway = start_gateway(platform, tenants_file, port)
        print(f"gateway pid {gateway.pid} on {base}; broker and registry from {var_dir}", flush=True)
        for concurrency in levels:
            before = cpu_seconds([gateway.pid])
            load = subprocess.run(
                [sys.executable, "-m", "bench.intake", "--load", f"{base}/v1/videos", key, str(concurrency),
                 str(args.duration), str(args.warmup)],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
                timeout=args.duration + args.warmup + 120)
            after = cpu_seconds([gateway.pid])
            if load.returncode != 0:
                raise RuntimeError(f"load generator failed: {load.stderr[-2000:]}")
            result = json.loads(load.stdout.strip().splitlines()[-1])
            gateway_cores = None if before is None or after is None else (after - before) / (args.duration + args.warmup)
            results.append((concurrency, result))
            rows.append([concurrency, result["rps"], result["p50_ms"], result["p99_ms"], result["max_ms"],
                         result["errors"], gateway_cores])
            print(f"concurrency {concurrency}: {result['rps']:.0f} req/s, p99 {result['p99_ms'] or 0:.1f} ms, "
                  f"{result['errors']} errors {result['statuses']}", flush=True)
    finally:
        stop_process(gateway)
        platform.stop()

    print()
    print(format_table(["concurrency", "req/s", "p50 ms", "p99 ms", "max ms", "errors", "gateway cores"], rows,
                       float_format="{:.1f}"))
    eligible = [(c, r) for c, r in results if r["p99_ms"] is not None and r["p99_ms"] <= args.p99_ms
                and r["errors"] == 0]
    if eligible:
        concurrency, best = max(eligible, key=lambda item: item[1]["rps"])
        print_result(rps=round(best["rps"]), p99_ms=round(best["p99_ms"], 1), concurrency=concurrency)
    else:
        print_result(rps=0, p99_ms=min((r["p99_ms"] for _, r in results if r["p99_ms"]), default=0.0),
                     concurrency=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
