"""A partition revoked mid-job, for real: the agent checkpoints at the next step boundary, stops without
committing, and when the job comes back it resumes from that checkpoint.

The agent runs in this process so the test can make librdkafka revoke its partitions (unsubscribe), as a
rebalance does: the revocation is served on the agent's own consumer thread, inside its poll.
"""
from __future__ import annotations

import threading
import time

import pytest

from consumers.progress import EventLog
from gpu_agents.agent import STAGE as AGENT
from producers.requests import VideoRequests
from streams import topics
from streams.long_jobs import LongJobRuntime
from streams.supervisor import PlatformProcesses

pytestmark = pytest.mark.integration

# Long enough that the revocation (a trip through the group coordinator) lands while the job runs.
LONG_JOB = dict(model="tiny-wan-5m", width=128, height=128, num_frames=17, steps=300, guidance_scale=5.0)


def test_revoked_mid_job_checkpoints_stops_uncommitted_and_resumes(tmp_path):
    processes = PlatformProcesses(tmp_path, stages=("prompt-encoder",),
                                  env={"VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000",
                                       "VIDGEN_CHECKPOINT_EVERY_STEPS": "1000"})
    settings = processes.start()
    log = EventLog(settings)
    agent = LongJobRuntime(AGENT, settings)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        with VideoRequests(settings) as requests:
            job_id = requests.submit("a windmill at dusk", seed=9, **LONG_JOB)
        log.wait_for(lambda l: len(l.of(job_id, topics.STEP_PROGRESS)) >= 5, 120, "step 5")
        agent.consumer.unsubscribe()  # the group takes every partition away, the running job's included
        log.wait_for(lambda l: agent.counters.interrupted == 1, 60, "the job to stop")
        checkpointed = log.wait_for(lambda l: l.of(job_id, topics.LATENT_CHECKPOINTED), 10, "its checkpoint")
        time.sleep(0.5)  # the reader catches up with everything the job emitted before it stopped
        attempt_one = [s["step"] for s in log.of(job_id, topics.STEP_PROGRESS) if s["attempt"] == 1]
        checkpoints = [c["step"] for c in log.of(job_id, topics.LATENT_CHECKPOINTED) if c["attempt"] == 1]
        assert checkpointed[0]["attempt"] == 1
        assert attempt_one[-1] < LONG_JOB["steps"], "stopped mid-job"
        # No periodic checkpoint at this cadence: the only one is the revocation's, at the step it stopped after.
        assert checkpoints == [attempt_one[-1]]
        assert not log.of(job_id, topics.LATENT_CHUNKS)

        agent.consumer.subscribe([t.name for t in AGENT.consumes], on_assign=agent._on_assign,
                                 on_revoke=agent._on_revoke, on_lost=agent._on_revoke)
        resumed = log.wait_for(lambda l: [s for s in l.of(job_id, topics.STEP_PROGRESS) if s["attempt"] == 2],
                               60, "the job to come back")
        assert resumed[0]["resumed_from_step"] == attempt_one[-1], "its offset was not committed; it resumed"
        log.wait_for(lambda l: l.of(job_id, topics.LATENT_CHUNKS), 120, "the job to finish")
        steps = [s["step"] for s in log.of(job_id, topics.STEP_PROGRESS) if s["attempt"] == 2]
        assert steps == list(range(attempt_one[-1] + 1, LONG_JOB["steps"] + 1))
    finally:
        agent.stopping.set()
        thread.join(30)
        log.close()
        processes.stop()
