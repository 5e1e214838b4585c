"""`vidgen bench chaos`: many jobs across the tiers while processes of every stage are SIGKILLed and restarted at
random moments (agents mid-denoise, decoders mid-stream, the compliance stage mid-check, the prompt encoder, the
active scheduler and a standby, the tracker, the archiver); then every job must be terminal, none lost, none
published twice, every video equal to the fault-free result, and `vidgen audit replay` over Kafka must find no
violation.

The driver and the checks are bench/chaos_harness.py (the integration test runs the same at a reduced size). The run
is reproducible in what it plans (jobs, stage order, pauses, choices among candidates: ``--seed``); the moments
depend on timing, so the kill log is printed. Ends with
``RESULT terminal=<n> lost=<n> duplicated=<n> mismatched=<n> kills=<n> jobs=<n> audit_violations=<n> seconds=<s> ...
kills_scheduler=<n> ...``.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from .common import format_table, print_result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen bench chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", default="tiny-wan-5m")
    parser.add_argument("--submit-over", type=float, default=None, metavar="S",
                        help="spread the submissions over S seconds (default: 1.5 s per job)")
    parser.add_argument("--large-every", type=int, default=10, metavar="N",
                        help="every N-th job is 256x256 and so watermarked (0: none)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds after the storm for every job to end")
    parser.add_argument("--var-dir", help="where the platform keeps its files (default: a new temporary directory)")
    args = parser.parse_args(argv)
    logging.getLogger("bench.chaos_harness").setLevel(logging.WARNING)

    from .chaos_harness import ChaosConfig, run_chaos

    config = ChaosConfig(jobs=args.jobs, kills=args.kills, seed=args.seed, model=args.model,
                         submit_over_s=args.submit_over if args.submit_over is not None else 1.5 * args.jobs,
                         large_every=args.large_every, finish_timeout_s=args.timeout)
    var_dir = Path(args.var_dir) if args.var_dir else Path(tempfile.mkdtemp(prefix="vidgen-bench-chaos-"))
    result = run_chaos(config, var_dir, progress=lambda text: print(text, flush=True))
    print()
    print(result.describe())
    print()
    stages = sorted({k.stage for k in result.kills})
    print(format_table(["stage", "kills", "with a job in flight", "idle"], [
        (stage, sum(k.stage == stage for k in result.kills),
         sum(k.stage == stage and not k.doing.startswith("idle") for k in result.kills),
         sum(k.stage == stage and k.doing.startswith("idle") for k in result.kills)) for stage in stages]))
    print()
    fields = result.result_fields()
    print(format_table(["check", "value"], [(k, v) for k, v in fields.items() if k != "seed"], "{:.1f}"))
    print("\nPASSED: every job terminal, none lost or duplicated, every video equal to the fault-free one, audit clean"
          if result.ok else "\nFAILED: see the violations, problems and kill log above", flush=True)
    print_result(**fields)
    return 0 if result.ok else 1
