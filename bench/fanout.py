"""`vidgen bench fanout`: how many websocket subscribers one gateway process serves at p99 ≤ 100 ms.

The set-up of `vidgen bench progress` (bench/progress.py): the embedded broker, one gateway process (gateway/app.py
over a JobsView), this process producing ``StepProgress`` events as the agents would, and websocket clients in
several other processes (each with many sockets). For each level N (``--levels``) N sockets connect, jobs step every
``--interval-ms`` for ``--steps`` steps, and every progress envelope's latency (arrival − step time) is measured at
every socket. Mode ``job`` (default): the sockets watch ``/v1/videos/{id}/events`` of ``--jobs`` jobs, N / jobs
each (every socket gets one job's steps); mode ``tenant``: every socket is a ``/v1/events`` feed of one tenant (and
gets every job's steps). The levels go up until one misses the goal (p99 > ``--goal-ms``, a socket failing to
connect, or more than 1 % of the envelopes missing, e.g. subscribers dropped as too slow).

Ends with ``RESULT subscribers=<largest N that met the goal> p99_ms=<its p99>`` (subscribers=0 if none did).
Goal: ≥ 2,000 subscribers. On a small machine the clients share the cores with the gateway and the broker, which the
CPU columns show.
"""
from __future__ import annotations

import argparse
import os
import uuid

from .common import CpuAccount, format_table, percentile, print_result, process_tree
from gateway.server import raise_open_file_limit

from .progress import BenchPlatform, ClientProcesses, StepProducer, latencies_ms


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen bench fanout")
    parser.add_argument("--levels", default="250,500,1000,2000,4000", help="subscriber counts to try, ascending")
    parser.add_argument("--mode", choices=("job", "tenant"), default="job")
    parser.add_argument("--jobs", type=int, default=None, help="jobs stepping at once (default: 20 job, 1 tenant)")
    parser.add_argument("--steps", type=int, default=30, help="steps per job and level")
    parser.add_argument("--interval-ms", type=float, default=100.0, help="time between two steps of a job")
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each job left out")
    parser.add_argument("--goal-ms", type=float, default=100.0)
    parser.add_argument("--keep-going", action="store_true", help="try every level even after one missed the goal")
    parser.add_argument("--per-step", action="store_true", help="also print each step's p50/p99 (where time goes)")
    args = parser.parse_args(argv)
    levels = sorted(int(v) for v in args.levels.split(","))
    jobs_per_level = args.jobs or (20 if args.mode == "job" else 1)
    raise_open_file_limit()

    bench = BenchPlatform("vidgen-bench-fanout-").start()
    producer = StepProducer(bench.settings)
    key = f"api_key={bench.api_key}"
    rows, best = [], (0, None)
    try:
        for n in levels:
            run = uuid.uuid4().hex[:6]
            jobs = [f"fanout-{n}-{run}-{i}" for i in range(jobs_per_level)]
            for job_id in jobs:
                producer.request(job_id)
            producer.flush()
            if args.mode == "job":
                sockets = [(f"/v1/videos/{jobs[i % len(jobs)]}/events?{key}", [jobs[i % len(jobs)]])
                           for i in range(n)]
            else:
                sockets = [(f"/v1/events?{key}", jobs) for _ in range(n)]
            duration_s = args.steps * args.interval_ms / 1000
            before = bench.stats()
            clients = ClientProcesses(bench.url, sockets, args.client_procs, args.steps, duration_s + 120,
                                      bench.var_dir)
            try:
                clients.wait_ready(180)
                connected = True
            except (RuntimeError, TimeoutError) as exc:
                print(f"{n} subscribers: {exc}")
                connected = False
            if connected:
                pids = {"gateway": [bench.gateway.pid], "clients": [p.pid for p in clients.processes],
                        "broker": sorted(process_tree([bench.platform.broker.pid])), "producer": [os.getpid()]}
                with CpuAccount(pids) as cpu:
                    producer.run_steps(jobs, args.steps, args.interval_ms / 1000)
                results = clients.results(duration_s + 60)
            else:
                cpu, results = None, []
            clients.kill()
            after = bench.stats()
            values = latencies_ms(results, producer.step_times, args.warmup)
            if args.per_step and results:
                by_step: dict[int, list[float]] = {}
                for result in results:
                    for job_id, value, arrived in result["records"]:
                        sent = producer.step_times.get((job_id, value))
                        if sent is not None:
                            by_step.setdefault(value, []).append((arrived - sent) * 1000)
                print(format_table(("step", "samples", "p50 ms", "p99 ms"), [
                    (step, len(v), percentile(v, 50), percentile(v, 99)) for step, v in sorted(by_step.items())],
                    float_format="{:.1f}"))
            expected = sum(len(j) for _, j in sockets) * (args.steps - args.warmup)
            dropped = after.get("slow_subscribers", 0) - before.get("slow_subscribers", 0)
            errors = sum(r.get("error_count", 0) for r in results)
            p50 = percentile(values, 50) if values else float("nan")
            p99 = percentile(values, 99) if values else float("nan")
            complete = connected and len(values) >= 0.99 * expected
            met = complete and p99 <= args.goal_ms
            rows.append((n, len(values), expected, p50, p99, max(values) if values else float("nan"), dropped,
                         errors, *(cpu.cores(k) if cpu else None for k in ("gateway", "clients", "broker", "other")),
                         "yes" if met else "no"))
            print(format_table(("subscribers", "samples", "expected", "p50 ms", "p99 ms", "max ms", "dropped",
                                "errors", "gateway", "clients", "broker", "other", "goal"), rows[-1:],
                               float_format="{:.1f}"), flush=True)
            if met:
                best = (n, p99)
            elif not args.keep_going:
                break
        producer.close()
    finally:
        bench.stop()

    rate = jobs_per_level * 1000 / args.interval_ms
    per_socket = rate if args.mode == "tenant" else 1000 / args.interval_ms
    print(f"\nmode {args.mode}: {jobs_per_level} jobs stepping every {args.interval_ms:g} ms ({rate:.0f} steps/s), "
          f"{per_socket:.0f} envelopes/s per socket, {args.steps} steps per level; {args.client_procs} client "
          f"processes; cores = average CPU cores used while the steps ran")
    print(format_table(("subscribers", "samples", "expected", "p50 ms", "p99 ms", "max ms", "dropped", "errors",
                        "gateway", "clients", "broker", "other", "goal"), rows, float_format="{:.1f}"))
    n, p99 = best
    print(f"largest level with p99 <= {args.goal_ms:g} ms: {n} subscribers (goal >= 2000: "
          f"{'met' if n >= 2000 else 'NOT met'})")
    print_result(subscribers=n, p99_ms=round(p99, 2) if p99 is not None else "nan")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
