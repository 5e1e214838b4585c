"""The `vidgen` command: one entry point for every process and tool of the platform."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

STAGES = {
    "prompt-encoder": "consumers.prompt_encoder",
    "scheduler": "consumers.scheduler",
    "gpu-agent": "gpu_agents.agent",
    "vae-decoder": "gpu_agents.decoder",
    "compliance": "consumers.compliance_stage",
    "tracker": "consumers.tracker",  # a faust app, not a StageRuntime stage: see cmd_stage
    "archiver": "consumers.archiver",  # copies every topic into hash-chained Avro files: see cmd_stage
    "lifecycle": "consumers.lifecycle",  # deletes blobs nothing needs any more, by the event log
}
BENCHMARKS = {
    "overhead": "bench.overhead", "checkpoint": "bench.checkpoint", "resume": "bench.resume",
    "streaming": "bench.streaming", "encoder": "bench.encoder", "watermark": "bench.watermark",
    "compliance": "bench.compliance", "intake": "bench.intake", "progress": "bench.progress",
    "fanout": "bench.fanout", "chaos": "bench.chaos", "dispatch": "bench.dispatch",
    "restart": "bench.restart",
    "families": "bench.families",
    "streamgen": "bench.streamgen",
    "parallel": "bench.parallel",
    "storage": "bench.storage",
    "idle": "bench.idle",
    "abuse": "bench.abuse",
}
SAMPLE_PROMPT = "a red fox trotting through fresh snow at dawn, cinematic"


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("httpx", "httpx2", "aiohttp.access"):  # a line per registry request is noise, not news
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from gateway.tenants import install_key_redaction

    install_key_redaction()  # no API key in any process's log, whatever quotes it


def load_stage(name: str):
    try:
        return importlib.import_module(STAGES[name]).STAGE
    except KeyError:
        raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


# -- commands ----------------------------------------------------------------------------------------------------
def cmd_broker(args) -> int:
    from streams.embedded import embedded_platform
    from streams.settings import load_settings

    from consumers.restore import ArchiveVerificationFailed, RestoreFailed, archived_partitions, restore_before_start

    settings = load_settings()
    try:
        with embedded_platform(settings, prepare=restore_before_start, partitions=archived_partitions) as running:
            print(f"kafka {running.kafka_bootstrap}  schema registry {running.schema_registry_url}", flush=True)
            print(f"recorded in {settings.platform_file}; Ctrl-C stops", flush=True)
            _wait_for_signal()
    except (ArchiveVerificationFailed, RestoreFailed) as exc:  # nothing started: the supervisor shows this, stops
        print(f"vidgen broker: {exc}", file=sys.stderr, flush=True)
        return 3
    return 0


def cmd_topics(args) -> int:
    from schemas.codec import EventCodec
    from streams.kafka import ensure_topics
    from streams.serde import registry_client
    from streams.settings import load_settings
    from streams.topics import CATALOGUE, value_schemas

    settings = load_settings()
    created = ensure_topics(settings)
    ids = EventCodec(registry_client(settings), value_schemas()).register_all()
    for topic in CATALOGUE:
        mark = "created" if topic.name in created else "exists"
        print(f"{topic.name:32} {topic.partitions:3} partitions  {topic.value_schema:20} "
              f"schema id {ids[topic.name + '-value']}  ({mark})")
    return 0


def cmd_stage(args) -> int:
    from streams.runtime import run_stage
    from streams.settings import load_settings

    if args.name == "tracker":  # the job-state table is a faust app with its own worker
        from consumers.tracker import run_tracker

        return run_tracker(load_settings())
    if args.name == "archiver":  # writes files per partition, committing only what is durably written
        from consumers.archiver import run_archiver

        return run_archiver(load_settings())
    if args.devices > 1:
        if args.name != "gpu-agent":
            raise SystemExit(f"--devices: only the gpu-agent stage runs across devices, not {args.name}")
        from gpu_agents import group

        if group.is_rank():  # one of the ranks torchrun started
            return group.main(load_settings())
        group.launch(args.devices, args.restarts)  # does not return: torchrun takes over this process
    run_stage(load_stage(args.name), load_settings())
    return 0


def cmd_up(args) -> int:
    from gateway.tenants import load_or_create, tenants_path
    from streams.settings import load_settings
    from streams.supervisor import SERVICE_NAMES, STAGE_NAMES, PlatformNotStarted, PlatformProcesses

    settings = load_settings()
    # The tenants file is made here, not by the gateway, so the first run can show its key on this terminal.
    tenants_file, (_, new_key) = tenants_path(settings), load_or_create(tenants_path(settings))
    # `vidgen broker` runs either way: with a named cluster it starts nothing but prepares topics and schemas.
    platform = PlatformProcesses(settings.var_dir, stages=STAGE_NAMES + SERVICE_NAMES)
    try:
        running = platform.start(on_restore=RestoreProgress(sys.stdout))
    except PlatformNotStarted as exc:
        print(f"vidgen up: {exc}", file=sys.stderr, flush=True)
        platform.stop()
        return 3
    platform.add_gateway(args.port, args.host)
    print(f"vidgen is up: kafka {running.kafka_bootstrap}, registry {running.schema_registry_url}, "
          f"stages {', '.join(platform.stage_names)}; logs in {platform.log_dir}.", flush=True)
    print(f"web page and API: http://{args.host}:{args.port}/ (tenants in {tenants_file})", flush=True)
    if new_key:
        print(f"API key of tenant 'dev' (shown once; only its hash is stored): {new_key}", flush=True)
    print("Ctrl-C stops.", flush=True)
    try:
        _wait_for_signal()
    finally:
        platform.stop()
    return 0


class RestoreProgress:
    """What `vidgen up` prints while `vidgen broker` restores the embedded broker from the archive."""

    def __init__(self, stream):
        self.stream = stream

    def __call__(self, status: dict) -> None:
        state = status.get("state")
        if state == "verifying":
            line = f"verifying the archive {status.get('archive')} ({status.get('series')} partitions)…"
        elif state == "restoring":
            line = (f"restoring: {status.get('records', 0):,} records so far ({status.get('topic')}), "
                    f"{status.get('elapsed_s', 0):.1f} s")
        elif state == "done":
            rate = status["records"] / status["produce_s"] if status.get("produce_s") else 0
            line = (f"restored {status['records']:,} records of {status['topics']} topics and {status['groups']} "
                    f"consumer groups from the archive in {status['seconds']:.2f} s"
                    + (f" ({rate:,.0f} records/s)" if rate else "") + "; " + archive_size(status.get("archive")))
        else:
            return  # a failure is reported by the caller, once
        print(line, file=self.stream, flush=True)


def archive_size(archive: str | None) -> str:
    from consumers.archive_retention import archive_usage, format_usage

    return format_usage(archive_usage(Path(archive))) if archive else "no archive"


def cmd_submit(args) -> int:
    from producers.requests import VideoRequests
    from streams.settings import load_settings

    image = read_image_file(args.image) if args.image else None  # before anything connects to the platform
    settings = load_settings()
    width, height = _parse_size(args.size)
    params = dict(width=width, height=height, num_frames=args.frames, steps=args.steps, seed=args.seed,
                  guidance_scale=args.guidance, guidance_scale_2=args.guidance_2, fps=args.fps, preset=args.preset)
    params["model"] = settings.default_model
    if args.model:
        params["model"] = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    check_submission(settings, args.prompt, params, has_image=image is not None)
    submitted_ms = int(time.time() * 1000)
    with VideoRequests(settings) as requests:
        job_id = requests.submit(args.prompt, tier=args.tier, negative_prompt=args.negative_prompt, image=image,
                                 **params)
    print(f"job {job_id} submitted ({args.tier})", flush=True)
    if not args.follow:
        return 0
    return follow(settings, job_id, submitted_ms, args.timeout)


def check_submission(settings, prompt: str, params: dict, has_image: bool) -> None:
    """The prompt encoder's own check, against the model's facts (family, modalities, limits), before anything is
    published: a request it would fail never leaves this machine. SystemExit with one line saying why."""
    from consumers.prompt_encoder import check_request
    from gpu_agents.models import ModelCatalogue
    from producers.requests import video_request
    from streams.stage import InvalidEvent

    stand_in = {"uri": "", "sha256": "", "bytes": 0} if has_image else None  # stored only once the check passes
    try:
        check_request(video_request(prompt, input_reference=stand_in, **params),
                      ModelCatalogue(settings.model_dirs, device="cpu"))
    except InvalidEvent as exc:
        raise SystemExit(f"vidgen submit: {exc}") from None


def read_image_file(path: str):
    """`submit --image`: the file as a checked InputImage; SystemExit with one line saying why not."""
    from compliance.input_image import InputImageError, read_input_image

    try:
        return read_input_image(Path(path).read_bytes())
    except OSError as exc:
        raise SystemExit(f"--image {path}: cannot read it: {exc.strerror or exc}") from None
    except InputImageError as exc:
        raise SystemExit(f"--image {path}: {exc}") from None


def cmd_cancel(args) -> int:
    from producers.requests import VideoRequests
    from streams.settings import load_settings

    with VideoRequests(load_settings()) as requests:
        requests.cancel(args.job_id, reason=args.reason, requested_by=os.environ.get("USER", ""))
    print(f"cancellation of job {args.job_id} requested")
    return 0


def follow(settings, job_id: str, submitted_ms: int, timeout_s: float) -> int:
    """Show the job's progress until it ends; the exit code says how it ended (0 published, 2 flagged, 3 failed,
    4 cancelled)."""
    from consumers.progress import follow_job
    from streams.blobs import open_blob_store

    bar = ProgressBar(sys.stderr)
    end = follow_job(settings, job_id, bar.update, submitted_ms, timeout_s)
    bar.close()
    event = end.event
    if end.topic.endswith("published"):
        store = open_blob_store(settings)
        path = store.local_file(store.key_of(event["video"]["uri"]))
        if path is None:  # an object store: a local copy to watch and verify
            path = settings.var_dir / "downloads" / f"{job_id}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(store.get(event["video"]))
        print(f"published: {event['frames']} frames {event['width']}x{event['height']} @ {event['fps']} fps")
        print(f"video: {path}")
        print(f"C2PA manifest: {event['manifest_label'] or 'none'}; watermark: "
              f"{event['watermark_payload'] or 'absent (' + event['watermark_note'] + ')'}; renditions: "
              + ", ".join(f"{r['name']} {r['width']}x{r['height']}" for r in event["renditions"]))
        print(f"check it: vidgen verify {path}")
        return 0
    if end.topic.endswith("flagged"):
        print(f"flagged ({event['stage']}, {event['decision']}): {', '.join(event['reasons'])} {event['evidence']}")
        return 2
    if end.topic.endswith("cancelled"):
        step = f" after step {event['stopped_at_step']}" if event["stopped_at_step"] is not None else ""
        print(f"cancelled{step}: {event['reason'] or 'no reason given'}")
        return 4
    print(f"failed in {event['stage']}: {event['reason']}")
    return 3


def queue_line(position: int, eta_s: float | None) -> str:
    """What `submit --follow` prints while the job waits: ``queued: position 3, about 12 s`` (no ETA when unknown)."""
    line = f"queued: position {position}"
    if eta_s is not None:
        line += f", about {max(1, round(eta_s))} s"
    return line


class ProgressBar:
    """A one-line bar on a terminal; on anything else, a line per stage change and every tenth of the steps.

    While the job waits in the fleet's queue, a ``queue_line`` each time it reads differently. The job's events are
    folded as the tracker folds them (consumers/job_state.py), so a position the scheduler sent before the job
    started, read late from its own topic, is not shown once the job runs.
    """

    WIDTH = 30

    def __init__(self, stream):
        self.stream = stream
        self.tty = stream.isatty()
        self.last_tenth = -1
        self.last_topic = ""
        self.state = None  # the job's state (consumers.job_state.JobState) folded from the events shown
        self.last_queue_line: str | None = None

    def update(self, job_event) -> None:
        from consumers.job_state import fold
        from streams import topics

        topic, event = job_event.topic, job_event.event
        try:
            self.state = fold(self.state, topic, event)
        except (KeyError, ValueError):  # a topic the fold does not know: the bar goes on without it
            pass
        position = None if self.state is None else self.state.queue_position
        if position is None:
            self.last_queue_line = None  # not waiting (any more): a requeued job's position is shown afresh
        if topic == topics.QUEUE.name:
            line = None if position is None else queue_line(position, self.state.queue_eta_s)
            if line is not None and line != self.last_queue_line:
                self.last_queue_line = line
                bar_open = self.tty and self.last_topic.endswith("step-progress")
                self.stream.write(("\n" if bar_open else "") + line + "\n")
                self.last_topic = topic
                self.stream.flush()
            return
        if topic.endswith("step-progress"):
            done, total = event["step"], event["total_steps"]
            filled = self.WIDTH * done // total
            line = f"denoising [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} steps"
            if self.tty:
                self.stream.write("\r" + line)
            elif done * 10 // total != self.last_tenth:
                self.last_tenth = done * 10 // total
                self.stream.write(line + "\n")
        elif topic != self.last_topic:  # one line per stage, not per chunk or segment
            stage = topic.removeprefix("vidgen.")
            self.stream.write(("\n" if self.tty and self.last_topic.endswith("step-progress") else "") + f"{stage}\n")
        self.last_topic = topic
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def cmd_demo(args) -> int:
    """make run: start the platform, generate one video with live progress, print the MP4's path, stop."""
    from producers.requests import VideoRequests
    from streams.settings import load_settings
    from streams.supervisor import STAGE_NAMES, PlatformProcesses

    var_dir = load_settings().var_dir
    print("starting the embedded broker, the schema registry, the stages, the archiver and the lifecycle ...",
          flush=True)
    # The archiver: what it makes survives a restart; the lifecycle: what it leaves behind goes when nothing needs it.
    platform = PlatformProcesses(var_dir, stages=STAGE_NAMES + ("archiver", "lifecycle"))
    try:
        settings = platform.start()
        print(f"platform up (kafka {settings.kafka_bootstrap}); logs in {platform.log_dir}", flush=True)
        width, height = _parse_size(args.size)
        submitted_ms = int(time.time() * 1000)
        with VideoRequests(settings) as requests:
            job_id = requests.submit(args.prompt, tier="standard", width=width, height=height,
                                     num_frames=args.frames, steps=args.steps, seed=args.seed)
        print(f"job {job_id}: {args.prompt!r}", flush=True)
        code = follow(settings, job_id, submitted_ms, args.timeout)
    finally:
        print("shutting down ...", flush=True)
        platform.stop()
    print("stopped cleanly." if code == 0 else "stopped.")
    return code


def cmd_storage(args) -> int:
    """What the blob store holds, per class (consumers/lifecycle.py: the classes the lifecycle keeps or deletes)."""
    import json

    from consumers.lifecycle import usage
    from streams.blobs import BlobStoreUnavailable, open_blob_store
    from streams.settings import load_settings

    store = open_blob_store(load_settings())
    try:
        report = usage(store.list())
    except BlobStoreUnavailable as exc:
        print(f"vidgen storage: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"store": store.url, "classes": report}, indent=2))
        return 0
    print(f"blob store {store.url}")
    print(f"{'CLASS':12} {'BLOBS':>10} {'BYTES':>16}")
    for blob_class, used in report.items():
        print(f"{blob_class:12} {used['count']:>10,} {used['bytes']:>16,}")
    return 0


def cmd_models(args) -> int:
    """Every model this platform serves: built in, and the local directories of VIDGEN_MODELS."""
    import json

    from gpu_agents.models import ModelCatalogue
    from streams.settings import load_settings

    catalogue = ModelCatalogue(load_settings().model_dirs, device="cpu")
    listed, problems = [], []
    for model_id in catalogue.model_ids():
        try:
            listed.append(catalogue.facts(model_id))
        except (OSError, ValueError) as exc:  # a configured directory that is missing or of no known family
            problems.append(f"{model_id}: {exc}")
    if args.json:
        print(json.dumps({"models": [facts.as_dict() for facts in listed], "problems": problems}, indent=2))
        return 1 if problems else 0
    rows = [("MODEL", "FAMILY", "MODALITIES", "STREAMS", "SIZE", "FRAMES", "SOURCE")]
    for facts in listed:
        rules = facts.rules
        rows.append((facts.model_id, facts.family, ",".join(facts.modalities),
                     "yes" if facts.streams_while_generating else "no",
                     f"×{rules.spatial_multiple} ≤{rules.max_side}px",
                     f"{rules.temporal_multiple}k+1 ≤{rules.max_frames}", facts.source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for problem in problems:
        print(f"cannot serve {problem}", file=sys.stderr)
    return 1 if problems else 0


def cmd_verify(args) -> int:
    """Provenance of a video file: C2PA state and assertions, the watermark, and its job when the log is reachable."""
    from consumers.verify import verify_file

    report = verify_file(args.file, trust_anchor=args.trust_anchor, look_up_job=not args.offline)
    print(report.render())
    return 0 if report.ok else 5


def cmd_gateway(args) -> int:
    from gateway.app import main as gateway_main

    return gateway_main(args.rest)


def cmd_tenants(args) -> int:
    from gateway.tenants import main as tenants_main

    return tenants_main(args.rest)


def cmd_simulate(args) -> int:
    from bench.simulate import main as simulate_main

    return simulate_main(args.rest)


def cmd_autoscale(args) -> int:
    from consumers.autoscaler import main as autoscale_main

    return autoscale_main(args.rest)


def cmd_audit(args) -> int:
    from consumers.audit import main_replay, main_verify

    return (main_verify if args.action == "verify" else main_replay)(args.rest)


def cmd_bench(args) -> int:
    try:
        module = importlib.import_module(BENCHMARKS[args.name])
    except KeyError:
        raise SystemExit(f"unknown benchmark {args.name!r}; benchmarks: {', '.join(BENCHMARKS)}") from None
    return module.main(args.bench_args)


def _parse_size(text: str) -> tuple[int, int]:
    from producers.requests import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise SystemExit(f"--size: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidgen", description="Text-to-video on Kafka.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("broker", help="run the embedded Tansu broker and schema registry (records var/run/platform.json)")
    sub.add_parser("topics", help="create the catalogue's topics and register the schemas on the configured cluster")
    stage = sub.add_parser("stage", help="run one stage process (scale out by running more)")
    stage.add_argument("name", choices=sorted(STAGES))
    stage.add_argument("--devices", type=int, default=1,
                       help="gpu-agent: an agent group of N processes, one per device, running each job together "
                            "(Ulysses or CFG parallelism; launched with torchrun)")
    stage.add_argument("--restarts", type=int, default=3,
                       help="an agent group: times torchrun restarts all ranks after one fails, before giving up")
    up = sub.add_parser("up", help="run the broker, the registry, one process per stage, the tracker, the archiver "
                                   "and the gateway until interrupted")
    up.add_argument("--port", type=int, default=8080, help="the gateway's port")
    up.add_argument("--host", default="127.0.0.1")

    def generation_args(p, frames=9, steps=None, size="64x64"):
        p.add_argument("--steps", type=int, default=steps, help="denoising steps (default: the preset's)")
        p.add_argument("--frames", type=int, default=frames, help="4k+1 frames")
        p.add_argument("--size", default=size, help="WIDTHxHEIGHT, multiples of 16")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the job to end")

    submit = sub.add_parser("submit", help="publish a VideoRequested; --follow shows progress until the job ends")
    submit.add_argument("prompt")
    submit.add_argument("--tier", choices=("premium", "standard", "free"), default="standard")
    submit.add_argument("--negative-prompt", default="")
    submit.add_argument("--preset", choices=("quality", "fast"), default="quality",
                        help="quality: 50 steps with guidance 5; fast: 4 steps, no guidance (distilled checkpoints)")
    submit.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the preset's)")
    submit.add_argument("--guidance-2", type=float, default=None,
                        help="guidance of a two-expert model's low-noise expert (default: as --guidance)")
    submit.add_argument("--fps", type=int, default=8)
    submit.add_argument("--model", default=None,
                        help="model id, or the path of a local diffusers-format directory (default: tiny-wan)")
    submit.add_argument("--image", default=None, metavar="FILE",
                        help="image-to-video: the input image (PNG, JPEG or WebP, at most 10 MiB and 4096×4096)")
    submit.add_argument("--follow", action="store_true")
    generation_args(submit)

    cancel = sub.add_parser("cancel", help="cancel a job: a queued one is skipped, a running one stops within a step")
    cancel.add_argument("job_id")
    cancel.add_argument("--reason", default="")

    demo = sub.add_parser("demo", help="start everything, generate one video with live progress, stop (make run)")
    demo.add_argument("prompt", nargs="?", default=SAMPLE_PROMPT)
    # 256x256: the smallest size the invisible watermark fits in, so the demo's video carries one.
    generation_args(demo, frames=17, steps=30, size="256x256")

    storage = sub.add_parser("storage", help="what the blob store holds per class (checkpoints, latents, segments, "
                                             "inputs, published, embeddings, ledger, other): blobs and bytes")
    storage.add_argument("--json", action="store_true")

    models = sub.add_parser("models", help="every model this platform serves: id, family, modalities (t2v, i2v, "
                                           "audio), whether it streams while generating, parameter limits")
    models.add_argument("--json", action="store_true")

    verify = sub.add_parser("verify", help="C2PA validation, watermark and job of a video file (exit 0: trusted "
                                           "and watermarked)")
    verify.add_argument("file")
    verify.add_argument("--trust-anchor", default=None,
                        help="PEM root to trust (default: the development root under var/c2pa, if present)")
    verify.add_argument("--offline", action="store_true", help="do not look the watermark up in the event log")

    # Commands with their own argument parsers get every argument after their name (see PASS_THROUGH).
    sub.add_parser("simulate", add_help=False,
                   help="discrete-event simulation of a GPU fleet (arrivals, tiers, failures, checkpoints, "
                        "autoscaling) with the platform's own scheduler and policy; `vidgen simulate --help`")
    sub.add_parser("gateway", add_help=False,
                   help="the HTTP API (OpenAI Videos shaped), websocket progress and the web page; "
                        "`vidgen gateway --help` for its options")
    sub.add_parser("tenants", add_help=False,
                   help="add, list, rotate-key, remove, set-limits: the gateway's tenants (running gateways pick "
                        "changes up within a second); `vidgen tenants --help`")
    sub.add_parser("autoscale", add_help=False,
                   help="desired replicas per stage from vidgen.stats (the scheduler's queue or consumer lag, and "
                        "utilisation), as a decision log and metrics; `vidgen autoscale --help` for the policy")
    audit = sub.add_parser("audit", help="verify the archive's hash chain, or replay the log and check every "
                                         "job's invariants")
    audit.add_argument("action", choices=("verify", "replay"))
    audit.add_argument("rest", nargs=argparse.REMAINDER)

    bench = sub.add_parser("bench", help="run a benchmark from bench/")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


COMMANDS = {
    "broker": cmd_broker, "topics": cmd_topics, "stage": cmd_stage, "up": cmd_up, "submit": cmd_submit,
    "demo": cmd_demo, "bench": cmd_bench, "cancel": cmd_cancel, "verify": cmd_verify, "models": cmd_models,
    "autoscale": cmd_autoscale, "audit": cmd_audit, "gateway": cmd_gateway, "simulate": cmd_simulate,
    "storage": cmd_storage, "tenants": cmd_tenants,
}


PASS_THROUGH = ("autoscale", "gateway", "simulate", "tenants")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in PASS_THROUGH:
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _setup_logging(args.verbose)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    from streams.settings import SettingsError

    try:
        return COMMANDS[args.command](args) or 0
    except SettingsError as exc:
        print(f"vidgen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
