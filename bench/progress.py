"""`vidgen bench progress`: a denoising step finished → its ``progress`` envelope at a websocket client.

The embedded broker and registry (`vidgen broker`), one gateway process (gateway/app.py's app over a JobsView:
one confluent-kafka reader of the lifecycle topics, fan-out on the aiohttp loop), websocket clients in other
processes, and this process as the GPU agents: it produces ``StepProgress`` events with the project's codec and
producer settings for a few jobs at once (a step every ``--interval-ms`` per job, the jobs staggered), noting the
wall-clock time just before it builds each event. Each client notes the wall-clock time a progress envelope
arrived; latency = arrival − step time (same machine, same clock). The first ``--warmup`` steps of each job are
left out (schema look-ups, connection set-up). Goal: p99 ≤ 30 ms.

The gateway, the clients and the producer are separate processes, so nobody shares an event loop; on a small
machine they share the cores, which the CPU column shows. Ends with ``RESULT p99_ms=.. p50_ms=.. samples=..``.

The helpers here (a bench gateway process, websocket client processes, a step producer) also serve
`vidgen bench fanout` (bench/fanout.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from gateway.server import raise_open_file_limit

from .common import CpuAccount, format_table, percentile, print_result, process_tree

TENANT = "bench"


# -- the platform, the gateway -------------------------------------------------------------------------------------
class BenchPlatform:
    """`vidgen broker` (no stages: this process plays the agents) + one gateway process + a bench tenant."""

    def __init__(self, prefix: str, with_tracker: bool = False, gateway_env: dict[str, str] | None = None):
        from streams.embedded import free_port
        from streams.supervisor import PlatformProcesses

        self.var_dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.platform = PlatformProcesses(self.var_dir, stages=("tracker",) if with_tracker else ())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.gateway: subprocess.Popen | None = None
        self.api_key = ""
        self.settings = None
        self.gateway_env = gateway_env or {}

    def start(self) -> "BenchPlatform":
        from gateway.tenants import TenantStore

        self.settings = self.platform.start()
        tenants = TenantStore()
        # No rate limit worth the name: thousands of websocket upgrades come at once.
        _, self.api_key = tenants.create_tenant(TENANT, "premium", rate_per_s=1e6, burst=10**6,
                                                max_in_flight=10**6, max_per_hour=10**9)
        tenants_file = tenants.save(self.var_dir / "tenants.toml")
        log = open(self.var_dir / "log" / "gateway.log", "ab")
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "bench.progress", "_gateway", "--port", str(self.port), "--tenants",
             str(tenants_file)], env={**self.platform.env, **self.gateway_env}, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
            text=True)
        log.close()
        line = self.gateway.stdout.readline()
        if not line.startswith("LISTENING"):
            raise RuntimeError(f"the gateway did not start ({line!r}); see {self.var_dir}/log/gateway.log")
        return self

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/_bench/stats", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(15)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait()
        self.platform.stop()


async def _serve_gateway(port: int, tenants_file: str) -> None:
    """The bench's gateway process: gateway/app.py's app over a JobsView, plus GET /_bench/stats."""
    from aiohttp import web

    from gateway.app import build_app
    from gateway.jobs import JobsView
    from gateway.server import GuardedAppRunner, ServeLimits
    from gateway.tenants import TenantStore
    from streams.settings import load_settings

    raise_open_file_limit()
    settings = load_settings()
    view = JobsView(settings)
    # One tenant's thousands of websockets from one address are this bench's load, not abuse (bench/abuse.py)
    limits = ServeLimits(max_connections=10**6, max_per_address=10**6, max_websockets_per_tenant=10**6)
    app = build_app(settings, jobs=view, tenants=TenantStore.load(tenants_file), publisher=object(), limits=limits)

    async def stats(request):
        return web.json_response({"subscribers": view.subscriber_count(), "jobs": view.jobs_count(),
                                  **view.counters})

    app.router.add_get("/_bench/stats", stats)  # no route name: public to the auth middleware
    app.on_shutdown.append(view.close_subscriptions)
    runner = GuardedAppRunner(app, limits, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    print("LISTENING", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()


# -- the clients ---------------------------------------------------------------------------------------------------
class ClientProcesses:
    """Websocket clients in ``procs`` processes; each socket is a path (with its query) on the gateway.

    Every socket waits for its first envelope (``state``), then the process prints READY; afterwards each socket
    notes (job_id, value, arrival time) of every ``progress`` envelope until it has seen ``last_step`` of each
    job it expects, or until ``timeout_s``.
    """

    def __init__(self, url: str, sockets: list[tuple[str, list[str]]], procs: int, last_step: int,
                 timeout_s: float, work_dir: Path):
        self.work_dir = work_dir
        self.processes: list[subprocess.Popen] = []
        self.outputs: list[Path] = []
        for i in range(procs):
            mine = sockets[i::procs]
            if not mine:
                continue
            spec = work_dir / f"client-{i}-{uuid.uuid4().hex[:6]}.json"
            out = spec.with_suffix(".out.json")
            spec.write_text(json.dumps({"url": url, "sockets": mine, "last_step": last_step,
                                        "timeout_s": timeout_s, "out": str(out)}))
            self.outputs.append(out)
            self.processes.append(subprocess.Popen([sys.executable, "-m", "bench.progress", "_client", str(spec)],
                                                   stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True))

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            line = process.stdout.readline()  # blocks; the client itself gives up at its own connect timeout
            if not line.startswith("READY"):
                raise RuntimeError(f"a client process failed to connect: {line.strip()!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("clients took too long to connect")

    def results(self, timeout_s: float) -> list[dict]:
        """Each process's {"records": [[job_id, value, t], ...], "sockets": n, "errors": [...]}."""
        out = []
        for process, path in zip(self.processes, self.outputs):
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGTERM)
                process.wait(10)
            out.append(json.loads(path.read_text()) if path.exists() else {"records": [], "errors": ["no output"]})
        return out

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


async def _run_client(spec_path: str) -> None:
    import aiohttp

    raise_open_file_limit()
    spec = json.loads(Path(spec_path).read_text())
    url, last_step, timeout_s = spec["url"], spec["last_step"], spec["timeout_s"]
    sockets = spec["sockets"]
    records: list[list] = []
    errors: list[str] = []
    counts = {"ready": 0, "settled": 0}
    opened: list = []
    all_settled = asyncio.Event()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    connect_slots = asyncio.Semaphore(64)  # a burst of thousands of handshakes helps nobody

    def settled(ok: bool) -> None:
        counts["ready" if ok else "failed"] = counts.get("ready" if ok else "failed", 0) + 1
        counts["settled"] += 1
        if counts["settled"] == len(sockets):
            all_settled.set()

    async def connect(session, path: str, per_job: bool):
        async with connect_slots:
            for _ in range(200):
                try:
                    ws = await session.ws_connect(url + path, autoping=True, max_msg_size=0, compress=0)
                except aiohttp.WSServerHandshakeError as exc:
                    if exc.status != 404:  # 404: the job is not known to the gateway yet
                        raise
                    await asyncio.sleep(0.1)
                    continue
                if per_job:  # the job's state comes first, once the subscription is in place
                    first = await ws.receive(timeout=30)
                    if first.type != aiohttp.WSMsgType.TEXT or json.loads(first.data)["type"] != "state":
                        raise RuntimeError(f"first message {first.type} {first.data!r:.80}")
                return ws
            raise RuntimeError("the job never became known to the gateway")

    async def one(session, path: str, jobs: list[str]) -> None:
        waiting = set(jobs)
        try:
            ws = await connect(session, path, per_job="/v1/videos/" in path)
        except Exception as exc:  # noqa: BLE001 - reported, counted
            errors.append(f"{path.split('?')[0]}: {exc!r}")
            settled(False)
            return
        settled(True)
        opened.append(ws)  # closed once every socket is done: closing is work that would skew the others' times
        while waiting:
            msg = await ws.receive()
            arrived = time.time()
            if msg.type != aiohttp.WSMsgType.TEXT:
                errors.append(f"{path.split('?')[0]}: {msg.type.name} close code {ws.close_code} {msg.extra}")
                return
            envelope = json.loads(msg.data)
            if envelope["type"] == "progress":
                data = envelope["data"]
                if data["job_id"] in waiting:
                    records.append([data["job_id"], data["value"], arrived])
                    if data["value"] >= last_step:
                        waiting.discard(data["job_id"])

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(one(session, path, jobs)) for path, jobs in sockets]
        try:
            await asyncio.wait_for(all_settled.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        if counts["ready"] == len(sockets):
            print(f"READY {counts['ready']}", flush=True)
        else:
            print(f"FAILED {counts['ready']}/{len(sockets)} connected; {errors[:3]}", flush=True)
        stopper = asyncio.create_task(stop.wait())
        everyone = asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait([everyone, stopper], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for task in [*tasks, stopper]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    Path(spec["out"]).write_text(json.dumps({"records": records, "sockets": len(sockets), "errors": errors[:50],
                                             "error_count": len(errors)}))


# -- the producer: this process plays the GPU agents --------------------------------------------------------------------
class StepProducer:
    """Produces jobs' events as the agents do (the project's codec and producer settings), noting step times."""

    def __init__(self, settings):
        from confluent_kafka import Producer

        from streams.kafka import producer_config
        from streams.serde import event_codec

        self.codec = event_codec(settings)
        self.producer = Producer(producer_config(settings, "bench-agents"))
        self.step_times: dict[tuple[str, int], float] = {}

    def produce(self, topic_name: str, event: dict) -> None:
        from streams.serde import encode_key

        self.producer.produce(topic_name, key=encode_key(event["job_id"]), value=self.codec.encode(topic_name, event))
        self.producer.poll(0)

    def request(self, job_id: str) -> None:
        from streams import topics
        from streams.events import new_event

        params = {"width": 64, "height": 64, "num_frames": 9, "fps": 8, "steps": 50, "guidance_scale": 5.0,
                  "seed": 1, "model": "tiny-wan", "preset": "quality", "input_reference": None, "guidance_scale_2": None}
        self.produce(topics.REQUESTED.name, new_event(job_id, tenant=TENANT, prompt="bench", negative_prompt="",
                                                      tier="PREMIUM", params=params, consent_ref=None))

    def step(self, job_id: str, step: int, total: int, step_ms: float) -> None:
        from streams import topics
        from streams.events import derive_event_id

        finished = time.time()  # the step is done: what follows is the platform's latency
        self.produce(topics.STEP_PROGRESS.name, {
            "event_id": derive_event_id(job_id, "gpu-agent", "step", 1, step), "job_id": job_id,
            "timestamp": int(finished * 1000), "step": step, "total_steps": total, "attempt": 1,
            "resumed_from_step": None, "step_ms": step_ms, "agent_id": "bench"})
        self.step_times[(job_id, step)] = finished

    def run_steps(self, jobs: list[str], steps: int, interval_s: float) -> float:
        """Every job steps every ``interval_s`` (staggered over the interval); returns the seconds it took."""
        start = time.perf_counter() + 0.05
        offsets = [interval_s * i / len(jobs) for i in range(len(jobs))]
        for n in range(1, steps + 1):
            for job_id, offset in zip(jobs, offsets):
                target = start + (n - 1) * interval_s + offset
                delay = target - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                self.step(job_id, n, steps, interval_s * 1000)
        self.flush()
        return time.perf_counter() - start

    def flush(self) -> None:
        assert self.producer.flush(30) == 0, "events not delivered"

    def close(self) -> None:
        self.flush()
        self.producer.close()


def latencies_ms(results: list[dict], step_times: dict[tuple[str, int], float], warmup: int) -> list[float]:
    out = []
    for result in results:
        for job_id, value, arrived in result["records"]:
            sent = step_times.get((job_id, value))
            if sent is not None and value > warmup:
                out.append((arrived - sent) * 1000)
    return out


# -- the benchmark ---------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    if argv and argv[0] == "_gateway":
        parser = argparse.ArgumentParser(prog="bench.progress _gateway")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--tenants", required=True)
        args = parser.parse_args(argv[1:])
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        profile = os.environ.get("VIDGEN_BENCH_PROFILE")  # a file for the gateway's cProfile stats
        if profile:
            import cProfile

            cProfile.runctx("asyncio.run(_serve_gateway(args.port, args.tenants))", globals(), locals(), profile)
        else:
            asyncio.run(_serve_gateway(args.port, args.tenants))
        return 0
    if argv and argv[0] == "_client":
        asyncio.run(_run_client(argv[1]))
        return 0

    args = progress_parser().parse_args(argv)
    measured = measure(args)
    if measured is None:
        print_result(p99_ms="nan", p50_ms="nan", samples=0)
        return 1
    print_result(p99_ms=round(measured["p99_ms"], 2), p50_ms=round(measured["p50_ms"], 2),
                 samples=measured["samples"])
    return 0


def progress_parser(prog: str = "vidgen bench progress") -> argparse.ArgumentParser:
    """The measurement's options (also `vidgen bench idle`'s, which runs it after the idle sample)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--jobs", type=int, default=4, help="jobs stepping at once")
    parser.add_argument("--steps", type=int, default=250, help="steps per job")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="time between two steps of a job")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes")
    parser.add_argument("--sockets-per-job", type=int, default=2, help="per-job sockets (spread over the clients)")
    parser.add_argument("--tenant-feeds", type=int, default=2, help="/v1/events sockets (all of the jobs)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps of each job left out")
    parser.add_argument("--with-tracker", action="store_true", help="run the tracker too (more load, same path)")
    parser.add_argument("--fetch-wait-ms", type=int, default=None,
                        help="the gateway's fetch.wait.max.ms (default: the platform's client settings)")
    return parser


def measure(args: argparse.Namespace) -> dict | None:
    """Run the measurement and print what it saw; {"p99_ms", "p50_ms", "samples"}, or None without samples."""
    raise_open_file_limit()

    gateway_env = {} if args.fetch_wait_ms is None else {"VIDGEN_KAFKA_FETCH_WAIT_MAX_MS": str(args.fetch_wait_ms)}
    bench = BenchPlatform("vidgen-bench-progress-", with_tracker=args.with_tracker, gateway_env=gateway_env).start()
    clients = None
    try:
        producer = StepProducer(bench.settings)
        run = uuid.uuid4().hex[:6]
        jobs = [f"progress-{run}-{i}" for i in range(args.jobs)]
        for job_id in jobs:
            producer.request(job_id)
        producer.flush()
        key = f"api_key={bench.api_key}"
        sockets = [(f"/v1/videos/{job_id}/events?{key}", [job_id]) for job_id in jobs
                   for _ in range(args.sockets_per_job)]
        sockets += [(f"/v1/events?{key}", jobs) for _ in range(args.tenant_feeds)]
        duration_s = args.steps * args.interval_ms / 1000
        clients = ClientProcesses(bench.url, sockets, args.client_procs, args.steps, duration_s + 60,
                                  bench.var_dir)
        clients.wait_ready(60)
        pids = {"gateway": [bench.gateway.pid], "clients": [p.pid for p in clients.processes],
                "broker": sorted(process_tree([bench.platform.broker.pid])), "producer": [os.getpid()]}
        with CpuAccount(pids) as cpu:  # while the steps run (the clients exit soon after the last one)
            took = producer.run_steps(jobs, args.steps, args.interval_ms / 1000)
        results = clients.results(duration_s + 60)
        stats = bench.stats()
        producer.close()
    finally:
        if clients is not None:
            clients.kill()
        bench.stop()

    values = latencies_ms(results, producer.step_times, args.warmup)
    errors = [e for r in results for e in r.get("errors", [])]
    expected = sum(len(j) for _, j in sockets) * (args.steps - args.warmup)
    rate = args.jobs * 1000 / args.interval_ms
    print(f"{args.jobs} jobs × {args.steps} steps every {args.interval_ms:g} ms ({rate:.0f} steps/s, took "
          f"{took:.1f} s); {len(sockets)} sockets in {len(clients.processes)} client processes "
          f"({args.sockets_per_job} per job + {args.tenant_feeds} tenant feeds); samples {len(values)} of "
          f"{expected} expected")
    if errors:
        print(f"client errors ({len(errors)}): {errors[:5]}")
    print(f"gateway: {stats.get('live_events', 0)} live events folded, {stats.get('envelopes', 0)} envelopes queued, "
          f"{stats.get('slow_subscribers', 0)} slow subscribers dropped")
    print(format_table(("process", "cores"), [(name, cpu.cores(name)) for name in (*pids, "other")],
                       float_format="{:.2f}"))
    if not values:
        print("no samples")
        return None
    p50, p99 = percentile(values, 50), percentile(values, 99)
    print(format_table(("latency", "ms"), [("p50", p50), ("p90", percentile(values, 90)), ("p99", p99),
                                           ("max", max(values))], float_format="{:.2f}"))
    print(f"goal p99 <= 30 ms: {'met' if p99 <= 30 else 'NOT met'}")
    return {"p99_ms": p99, "p50_ms": p50, "samples": len(values)}


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
