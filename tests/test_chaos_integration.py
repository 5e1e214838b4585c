"""Chaos on the real platform (issue 8, R1), reduced for CI: 8 jobs over the three tiers while the driver SIGKILLs and
restarts a process of every stage at a random moment — the prompt encoder with a request in flight, the active
scheduler and a standby, an agent
mid-denoise, a decoder mid-stream, the compliance stage with a verdict pending, the tracker, the archiver.

Afterwards (bench/chaos_harness.py does the work; `vidgen bench chaos` runs the same at full size): the audit replay
over Kafka finds no violation, every job is terminal, none is lost, none has two terminal events or two publications,
every latent chunk and every decoded video equals the fault-free result exactly, every published master is the
fault-free master (within the encoder's run-to-run noise; see bench/chaos_harness.py), the tracker's table and the
archive agree, and no process died other than by the driver's hand.

What is robust on the embedded broker: the driver waits for a warm-up job before the storm, a SIGKILLed member's
partitions move after ~5.5 s (session 3 s), so every wait is bounded but generous. What is not asserted: that
each kill landed exactly mid-work (a job may finish between the moment the log shows it and the signal; the kill
log says what was seen), nor any timing.
"""
from __future__ import annotations

import time

import pytest

from bench.chaos_harness import CHAOS_STAGES, ChaosConfig, run_chaos

# ~60 s on an idle 2-core machine; a busy one (other suites running) has taken up to ~4 minutes.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

# One round: every stage once, the scheduler twice (the active one, then a standby).
CONFIG = ChaosConfig(jobs=8, kills=len(CHAOS_STAGES) + 1, seed=20261124, submit_over_s=16.0, storm_s=20.0,
                     gap_s=(0.5, 2.0), opportunity_s=10.0, finish_timeout_s=150.0, streamed_every=4, large_every=8)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    started = time.monotonic()
    result = run_chaos(CONFIG, tmp_path_factory.mktemp("chaos"), progress=print)
    print(result.describe())
    print("RESULT", result.result_fields(), f"in {time.monotonic() - started:.1f} s")
    return result


def test_every_stage_was_killed_and_restarted(chaos):
    assert len(chaos.kills) == CONFIG.kills
    assert set(chaos.kills_by_stage()) == set(CHAOS_STAGES), chaos.describe()
    assert all(k.replacement_pid for k in chaos.kills)
    assert not chaos.crashed, chaos.describe()
    scheduler_kills = [k.doing for k in chaos.kills if k.stage == "scheduler"]
    assert len(scheduler_kills) == 2, chaos.describe()
    assert any(doing.startswith("active scheduler") for doing in scheduler_kills), chaos.describe()


def test_every_job_is_terminal_once_and_published_once(chaos):
    assert chaos.lost == 0 and chaos.not_terminal_in_time == 0, chaos.describe()
    assert chaos.duplicated == 0, chaos.describe()
    assert chaos.unpublished == 0, chaos.describe()
    assert chaos.terminal == CONFIG.jobs


def test_every_video_equals_the_fault_free_one(chaos):
    assert chaos.mismatched == 0, chaos.describe()
    assert all(j.problems == [] for j in chaos.jobs)


def test_the_audit_replay_over_kafka_finds_no_violation(chaos):
    assert not chaos.audit_violations, chaos.audit_summary


def test_the_tracker_and_the_archive_agree_with_the_log(chaos):
    assert not chaos.tracker_wrong, chaos.describe()
    assert not chaos.archive_problems, chaos.describe()
