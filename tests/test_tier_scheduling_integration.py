"""Tier shares across the fleet, on a real broker: with every tier backlogged, the scheduler starts jobs in the 6:3:1
weights on whichever agent is idle, nothing starves, and a job cancelled while it waits ends at the scheduler
without ever starting."""
from __future__ import annotations

from collections import Counter

import pytest

from producers.requests import VideoRequests
from streams import topics
from streams.supervisor import PlatformProcesses
from tests.fleet import FLEET_ENV, chunked_once, decisions, fleet_log, steps_of

pytestmark = pytest.mark.integration

TINY = dict(model="tiny-wan", width=16, height=16, num_frames=1, steps=2, guidance_scale=1.0)
PER_TIER = 15
FIRST = 20  # starts looked at: 12 premium, 6 standard, 2 free by the weights


def test_backlogged_tiers_start_by_weight_across_the_fleet_and_a_waiting_cancellation_is_honoured(tmp_path):
    processes = PlatformProcesses(tmp_path, stages=("prompt-encoder", "scheduler"), env={
        **FLEET_ENV,
        "VIDGEN_PREEMPT_AFTER_S": "off",  # premium jobs waiting for the agents must not jump the weights
    })
    settings = processes.start()
    log = fleet_log(settings)
    try:
        with VideoRequests(settings) as requests:
            jobs = {requests.submit(f"{tier} job {i}", tier=tier, seed=i, **TINY): tier
                    for i in range(PER_TIER) for tier in topics.TIERS}
            skipped = requests.submit("no longer wanted", tier="premium", **TINY)
            log.wait_for(lambda l: len(decisions(l, "QUEUED")) == len(jobs) + 1, 120, "the backlog to be queued")
            requests.cancel(skipped, reason="queued and cancelled", requested_by="test")
        [(topic, cancelled)] = log.wait_for(lambda l: l.terminal(skipped), 30, "the waiting job to be cancelled")
        assert topic == topics.CANCELLED.name and cancelled["stage"] == "scheduler"
        assert cancelled["stopped_at_step"] is None and cancelled["reason"] == "queued and cancelled"

        for _ in range(2):
            processes.add_stage("gpu-agent")  # two agents meet a full backlog in every tier
        for job_id in jobs:
            chunked_once(log, job_id, timeout_s=240)

        assigned = decisions(log, "ASSIGNED")
        order = [jobs[d["job_id"]] for d in assigned]
        assert sorted(d["job_id"] for d in assigned) == sorted(jobs), "every job started once"
        shares = Counter(order[:FIRST])
        print("start order:", "".join(tier[0] for tier in order), dict(shares))
        assert shares == {"premium": 12, "standard": 6, "free": 2}, order[:FIRST]
        assert set(order[:10]) == set(topics.TIERS), "no tier starves"
        assert len({d["agent_id"] for d in assigned}) == 2, "both agents took work"

        assert [d["kind"] for d in decisions(log, job_id=skipped)] == ["QUEUED", "CANCELLED"]
        assert not steps_of(log, skipped) and not log.of(skipped, topics.LATENT_CHUNKS)
        assert [t for t, _ in log.terminal(skipped)] == [topics.CANCELLED.name]
        processes.check_alive()
    finally:
        log.close()
        processes.stop()
