"""Tier lanes on a real broker: with every tier backlogged, an agent starts jobs in the 6:3:1 weights, nothing
starves, and a job cancelled while still queued is skipped when reached."""
from __future__ import annotations

from collections import Counter

import pytest

from producers.requests import VideoRequests
from streams import topics
from streams.supervisor import PlatformProcesses
from consumers.progress import EventLog

pytestmark = pytest.mark.integration

TINY = dict(width=16, height=16, num_frames=1, steps=2, guidance_scale=1.0)
PER_TIER = 15
FIRST = 20  # starts looked at: 12 premium, 6 standard, 2 free by the weights
TOLERANCE = 2


def test_backlogged_tiers_start_by_weight_and_a_queued_cancellation_is_honoured(tmp_path):
    processes = PlatformProcesses(tmp_path, stages=("prompt-encoder",),
                                  env={"VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000"})
    settings = processes.start()
    log = EventLog(settings)
    try:
        with VideoRequests(settings) as requests:
            jobs = {requests.submit(f"{tier} job {i}", tier=tier, seed=i, **TINY): tier
                    for i in range(PER_TIER) for tier in topics.TIERS}
            skipped = requests.submit("no longer wanted", tier="premium", **TINY)
            requests.cancel(skipped, reason="queued and cancelled")
        log.wait_for(lambda l: sum(len(l.on(t)) for t in topics.ENCODED.values()) == len(jobs) + 1, 120,
                     "the backlog to be encoded")

        processes.add_stage("gpu-agent")  # one agent meets a full backlog in every tier
        log.wait_for(lambda l: all(l.of(j, topics.LATENT_CHUNKS) for j in jobs), 180, "every job to be generated")

        first_step = {j: log.of(j, topics.STEP_PROGRESS)[0]["timestamp"] for j in jobs}
        order = [jobs[j] for j in sorted(jobs, key=first_step.get)]
        shares = Counter(order[:FIRST])
        print("start order:", "".join(tier[0] for tier in order), dict(shares))
        expected = {"premium": 12, "standard": 6, "free": 2}
        for tier, count in expected.items():
            assert abs(shares[tier] - count) <= TOLERANCE, (shares, order[:FIRST])

        [(topic, cancelled)] = log.terminal(skipped)
        assert topic == topics.CANCELLED.name and cancelled["stopped_at_step"] is None
        assert not log.of(skipped, topics.STEP_PROGRESS)
        processes.check_alive()
    finally:
        log.close()
        processes.stop()
