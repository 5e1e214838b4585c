"""`vidgen bench restart`: SIGKILL every process of `vidgen up` at once with jobs in every state, start it again on
the same var directory, and count what the platform remembers; then time a restore of a 100,000-record archive.

Phase 1 (bench/restart_harness.py): `vidgen up` with the tiny model and one GPU agent; 12 jobs through the HTTP API:
4 published, 1 running (denoising, checkpointed at least once), 6 waiting behind it in the scheduler's queue, 1
cancelled while it waited. Then SIGKILL to the whole process group (broker, Tansu, stages, tracker, archiver,
gateway: nobody flushes, drains or checkpoints), and `vidgen up` again. Counted:

* forgotten: jobs whose GET /v1/videos/{id} answers 404 at the first poll once the gateway answers again;
* terminal / lost: jobs that end (a terminal event on the broker after the restart) within ``--timeout``, and
  the others (a job still unknown ``--unknown-grace`` seconds after the gateway came back is given up on);
* duplicated: jobs with more than one distinct terminal event id, or VideoPublished events with two event ids,
  on the broker after the run (read group-less from the beginning: restored records and new ones);
* restore_s, records: from ``<var>/run/restore.json`` (what `vidgen broker` restored before any stage started);
  nan and 0 when there is none.

The table also says, per job, what GET said before the kill and at the first poll after it, how it ended, and for
the running job the checkpoint it resumed from; whether the waiting jobs started in their queue order; and the
duplicates counted from the archive's files too (after a clean stop at the end).

Phase 2: a synthetic archive of ``--records`` records (default 100,000; values of 200-500 bytes, keys of a few
thousand jobs, spread over the archived topics and their partitions as a busy platform spreads them, timestamps
within the last minutes), written with the archiver's own ``ArchiveWriter``; a fresh Tansu broker and registry
with the topics created (nothing else runs); ``consumers.restore.restore_platform`` on it, timed: restore100k_s
and restore_rate (records restored per second). nan when the build has no restore.

The last line is ``RESULT jobs=12 terminal=.. lost=.. duplicated=.. forgotten=.. restore_s=.. records=..
restore100k_s=.. restore_rate=..``. Exit status 0 when nothing was lost, duplicated or forgotten.
"""
from __future__ import annotations

import argparse
import math
import random
import shutil
import tempfile
import time
import zlib
from pathlib import Path

from .common import format_table, print_result, run_stopping_on_sigterm, timed

JOBS = 12
FINISHED, WAITING, CANCELLED = 4, 6, 1  # and one running


def _say(text: str) -> None:
    print(text, flush=True)


# -- phase 1 ---------------------------------------------------------------------------------------------------------
def restart_phase(args) -> dict:
    from .restart_harness import (Api, Plan, UpProcess, archived_jobs, broker_jobs, by_role, drive_to_mixed_state,
                                  first_start_order, is_terminal, log_tail, queue_order, wait_restore_report,
                                  write_tenants)

    var_dir = (Path(args.var_dir).resolve() if args.var_dir
               else Path(tempfile.mkdtemp(prefix="vidgen-bench-restart-")) / "var")
    var_dir.mkdir(parents=True, exist_ok=True)
    key = write_tenants(var_dir)
    up = UpProcess(var_dir, env={"VIDGEN_CHECKPOINT_EVERY_STEPS": str(args.checkpoint_every)})
    api = Api(up.base, key)
    result: dict = {"var_dir": var_dir}
    try:
        up.start()
        _say(f"vidgen up (var {var_dir}, port {up.port}): gateway up after {up.wait_ready():.1f} s")
        plan = Plan(finished=FINISHED, waiting=WAITING, cancelled=CANCELLED, running_s=args.running_s,
                    timeout_s=args.timeout)
        jobs = drive_to_mixed_state(up, api, plan, say=_say)
        ids = [j.job_id for j in jobs]
        running = by_role(jobs, "running")[0]
        _say(f"{len(jobs)} jobs: " + ", ".join(f"{sum(j.role == r for j in jobs)} {r}"
                                               for r in ("finished", "running", "waiting", "cancelled"))
             + f"; the running job at step {running.before['vidgen']['step']}/{running.before['vidgen']['total_steps']}"
               f" with a checkpoint at step {running.before['vidgen']['checkpoints']['last_step']}")
        waiting = by_role(jobs, "waiting")
        order_before = queue_order({j.job_id: j.before for j in waiting}, waiting)

        killed = up.kill()
        _say(f"SIGKILL to {len(killed)} processes of vidgen up at once")
        restarted_at = time.time()
        up.start()
        ready_s = up.wait_ready()
        first: dict[str, dict | None] = {}
        for job in jobs:  # the first poll: what a client asking right away is told
            first[job.job_id] = api.get(job.job_id)[1]
        forgotten = sum(1 for v in first.values() if v is None)
        report = wait_restore_report(var_dir, restarted_at)
        _say(f"vidgen up again: gateway up after {ready_s:.1f} s; {forgotten} of {len(jobs)} jobs unknown at the "
             f"first poll; restore report: {report if report is not None else 'none'}")

        # Until every job has ended, or the timeout; a job still unknown after the grace period is given up on.
        deadline = time.monotonic() + args.timeout
        unknown_since = {job_id: time.monotonic() for job_id, v in first.items() if v is None}
        final: dict[str, dict | None] = dict(first)
        while time.monotonic() < deadline:
            up.check_alive()
            pending = [job_id for job_id in ids if not is_terminal(final.get(job_id))]
            pending = [job_id for job_id in pending
                       if job_id not in unknown_since or time.monotonic() - unknown_since[job_id] < args.unknown_grace]
            if not pending:
                break
            for job_id in pending:
                final[job_id] = api.get(job_id)[1]
                if final[job_id] is not None:
                    unknown_since.pop(job_id, None)
            time.sleep(0.5)
        settle = time.monotonic()
        time.sleep(2.0)  # anything that should not come (a second publication) has a moment to come
        broker = broker_jobs(up.settings(), ids)
        listed = {v["id"] for v in api.list(100)}
        resumed_from = {a: s.get("resumed_from_step") for a, s in broker[running.job_id].first_steps.items()}
        started = first_start_order(broker, waiting)
        up.stop()
        archive = archived_jobs(var_dir / "archive", ids)
        result.update(
            jobs=jobs, first=first, final=final, broker=broker, archive=archive, listed=listed, report=report,
            ready_s=ready_s, forgotten=forgotten, order_before=order_before, started=started,
            resumed_from=resumed_from, waited_s=settle - (deadline - args.timeout), killed=len(killed),
            problems=log_tail(up.log_dir))
        return result
    finally:
        up.close()
        result.setdefault("problems", log_tail(up.log_dir))


def report_phase1(result: dict) -> dict:
    jobs, broker, archive = result["jobs"], result["broker"], result["archive"]
    rows = []
    for job in jobs:
        b, first, final = broker[job.job_id], result["first"][job.job_id], result["final"][job.job_id]
        before = job.before["vidgen"]
        resume = ""
        if job.role == "running":
            attempts = sorted(result["resumed_from"])
            resume = ", ".join(f"attempt {a} from {result['resumed_from'][a]}" for a in attempts if a > 1) or "-"
        rows.append((f"{job.job_id[:8]} {job.role}", f"{before['status']} {before['step']}/{before['total_steps']}",
                     "404" if first is None else first["vidgen"]["status"],
                     "unknown" if final is None else final["vidgen"]["status"], b.outcome, len(b.terminal_ids),
                     len(b.published_ids), b.published_copies, "yes" if job.job_id in result["listed"] else "no",
                     resume))
    print()
    print(format_table(["job", "before the kill", "first GET after", "last GET", "on the broker", "terminal ids",
                        "published ids", "published copies", "listed", "resumed"], rows))
    terminal = sum(1 for b in broker.values() if b.terminal_ids)
    duplicated = sum(1 for b in broker.values() if b.duplicated)
    archive_duplicated = sum(1 for b in archive.values() if b.duplicated)
    order = result["order_before"]
    waiting_started = [job_id for job_id in result["started"] if broker[job_id].first_step_ms is not None]
    order_kept = "n/a" if order is None or len(waiting_started) < len(order) else (
        "yes" if waiting_started == order else "no")
    report = result["report"] or {}
    print()
    print(format_table(["measure", "value"], [
        ("processes killed", result["killed"]),
        ("gateway up again after (s)", result["ready_s"]),
        ("restore: state", report.get("state", "none")),
        ("restore: seconds", report.get("seconds", math.nan)),
        ("restore: records / topics / partitions / groups",
         "/".join(str(report.get(k, "-")) for k in ("records", "topics", "partitions", "groups"))),
        ("jobs unknown at the first poll (forgotten)", result["forgotten"]),
        ("jobs terminal on the broker", f"{terminal}/{len(jobs)}"),
        ("jobs listed by GET /v1/videos", f"{len(result['listed'] & {j.job_id for j in jobs})}/{len(jobs)}"),
        ("waiting jobs started in their queue order", order_kept),
        ("duplicated (broker) / (archive)", f"{duplicated} / {archive_duplicated}"),
        ("waited for the jobs (s)", result["waited_s"]),
    ], "{:.2f}"))
    if result.get("problems"):
        print("\nerrors in the platform's logs:\n" + result["problems"])
    return dict(terminal=terminal, lost=len(jobs) - terminal, duplicated=duplicated, forgotten=result["forgotten"],
                restore_s=float(report["seconds"]) if "seconds" in report else math.nan,
                records=int(report.get("records", 0) or 0))


# -- phase 2 ---------------------------------------------------------------------------------------------------------
#: How a busy platform's records spread over the archived topics (share of records per topic).
TOPIC_MIX = {
    "vidgen.step-progress": 40, "vidgen.agents": 10, "vidgen.latent-chunks": 6, "vidgen.decoded": 6,
    "vidgen.latent-checkpointed": 5, "vidgen.scheduler": 5, "vidgen.queue": 5, "vidgen.assignments": 3,
    "vidgen.requested": 2, "vidgen.encoded.premium": 1, "vidgen.encoded.standard": 1, "vidgen.encoded.free": 1,
    "vidgen.published": 2, "vidgen.stats": 2, "vidgen.control": 1, "vidgen.cancelled": 1, "vidgen.failed": 1,
    "vidgen.tracker-events": 6, "vidgen.tracker-job_state-changelog": 2,
}


def synthetic_archive(directory: Path, count: int, seed: int = 7) -> dict:
    """``count`` records written with the archiver's ArchiveWriter; returns what it holds."""
    from consumers.archiver import ArchiveSettings, ArchiveWriter
    from streams import topics

    archived = {t.name: t for t in getattr(topics, "ARCHIVED", topics.CATALOGUE)}
    mix = {name: share for name, share in TOPIC_MIX.items() if name in archived}
    names, weights = list(mix), list(mix.values())
    rng = random.Random(seed)
    job_ids = [f"{rng.getrandbits(128):032x}" for _ in range(max(10, count // 40))]
    agents = [f"gpu-host-{i}-{1000 + i}.{rng.getrandbits(24):06x}" for i in range(8)]
    stages = ["prompt-encoder", "scheduler", "gpu-agent", "vae-decoder", "compliance"]
    writer = ArchiveWriter(ArchiveSettings(directory, flush_records=1 << 30, flush_s=1e9, rotate_bytes=8 << 20))
    offsets: dict[tuple[str, int], int] = {}
    now_ms = int(time.time() * 1000)
    payload = rng.randbytes(600)
    for i in range(count):
        name = rng.choices(names, weights)[0]
        topic = archived[name]
        key_text = (rng.choice(agents) if topic.key == "agent_id" else rng.choice(stages) if topic.key == "stage"
                    else rng.choice(job_ids))
        key = key_text.encode()
        partition = zlib.crc32(key) % topic.partitions
        offset = offsets.get((name, partition), 0)
        offsets[(name, partition)] = offset + 1
        size = rng.randint(200, 500)
        if topic.value_schema:  # Confluent wire format: magic 0, a schema id, the Avro body
            value = b"\0" + (1 + names.index(name)).to_bytes(4, "big") + payload[:size - 5]
        else:  # the tracker's topics: JSON
            value = (b'{"job_id":"' + key + b'","state":"' + payload[:size].hex().encode()[:size - 40] + b'"}')
        headers = [("traceparent", f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01".encode())] \
            if rng.random() < 0.5 else None
        writer.append(name, partition, offset, now_ms - (count - i) * 3, 1, key, value, headers)
    writer.flush()
    writer.close()
    return dict(records=count, topics=len({n for n, _ in offsets}), partitions=len(offsets))


def restore_rate_phase(args) -> dict:
    from dataclasses import replace

    from streams import topics
    from streams.embedded import TansuBroker
    from streams.kafka import ensure_topics
    from schemas.registry_server import SchemaRegistryServer
    from streams.settings import load_settings

    work = Path(tempfile.mkdtemp(prefix="vidgen-bench-restore-"))
    out = dict(restore100k_s=math.nan, restore_rate=math.nan, restored=0, note="")
    try:
        archive = work / "synthetic-archive"  # not <var>/archive: nothing but this call restores it
        with timed() as written:
            held = synthetic_archive(archive, args.records)
        size = sum(p.stat().st_size for p in archive.rglob("*.avro"))
        _say(f"synthetic archive: {held['records']} records, {held['topics']} topics, {held['partitions']} "
             f"partitions, {size / 1e6:.1f} MB, written in {written.seconds:.1f} s")
        try:
            from consumers.restore import restore_platform
        except ImportError as exc:
            out["note"] = f"no restore in this build ({exc})"
            _say(out["note"])
            return out
        var_dir = work / "var"
        broker = TansuBroker(var_dir / "log" / "broker.log")
        registry = SchemaRegistryServer(var_dir / "registry" / "schemas.json")
        try:
            settings = replace(load_settings({"VIDGEN_VAR_DIR": str(var_dir)}), kafka_bootstrap=broker.start(),
                               schema_registry_url=registry.start(), embedded=True)
            ensure_topics(settings, getattr(topics, "ARCHIVED", topics.CATALOGUE))
            with timed() as restoring:
                report = restore_platform(settings, archive_dir=archive)
            restored = int(getattr(report, "records", 0) or 0)
            out.update(restore100k_s=restoring.seconds, restored=restored,
                       restore_rate=restored / restoring.seconds if restoring.seconds > 0 else math.nan,
                       report=report, on_broker=records_on_broker(settings))
            _say(f"restored {restored} records in {restoring.seconds:.2f} s ({out['restore_rate']:.0f} records/s); "
                 f"the broker's partitions end at {out['on_broker']} records in all")
        finally:
            registry.stop()
            broker.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return out


def records_on_broker(settings) -> int | None:
    """The sum of the archived topics' high watermarks (None when the broker does not say)."""
    from confluent_kafka import Consumer, TopicPartition

    from streams import topics
    from streams.kafka import consumer_config

    consumer = Consumer(consumer_config(settings, group_id="vidgen.bench-restart"))
    try:
        total = 0
        for topic in getattr(topics, "ARCHIVED", topics.CATALOGUE):
            for partition in range(topic.partitions):
                _low, high = consumer.get_watermark_offsets(TopicPartition(topic.name, partition), timeout=10)
                total += high
        return total
    except Exception:  # noqa: BLE001 - a count for the table only
        return None
    finally:
        consumer.close()


def run(args) -> int:
    fields = dict(jobs=JOBS, terminal=0, lost=JOBS, duplicated=0, forgotten=JOBS, restore_s=math.nan, records=0)
    ok = True
    if not args.skip_restart:
        result = restart_phase(args)
        fields.update(report_phase1(result))
        ok = fields["lost"] == 0 and fields["duplicated"] == 0 and fields["forgotten"] == 0
    rate = dict(restore100k_s=math.nan, restore_rate=math.nan)
    if args.records > 0:
        print()
        rate = restore_rate_phase(args)
    print()
    print(format_table(["result", "value"], [
        ("jobs", JOBS), ("terminal", fields["terminal"]), ("lost", fields["lost"]),
        ("duplicated", fields["duplicated"]), ("forgotten", fields["forgotten"]), ("restore_s", fields["restore_s"]),
        ("records", fields["records"]), (f"restore of {args.records} records (s)", rate["restore100k_s"]),
        ("restore rate (records/s)", rate["restore_rate"])], "{:.2f}"))
    print_result(**fields, restore100k_s=rate["restore100k_s"], restore_rate=rate["restore_rate"])
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen bench restart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--running-s", type=float, default=30.0,
                        help="how long the running job denoises uninterrupted (its steps are sized from this)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds after the restart for every job to end")
    parser.add_argument("--unknown-grace", type=float, default=30.0,
                        help="a job still unknown this long after the gateway came back is given up on (lost)")
    parser.add_argument("--records", type=int, default=100_000, help="records of the synthetic archive (0: skip)")
    parser.add_argument("--skip-restart", action="store_true", help="only the restore-rate phase")
    parser.add_argument("--var-dir", help="the platform's var directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic archive and its broker's files")
    args = parser.parse_args(argv)
    return run_stopping_on_sigterm(run, args)
