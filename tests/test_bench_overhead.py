"""`vidgen bench overhead`'s end-of-job decision and platform, no broker: a REVIEW flag the job goes on from is not its
end (the tiny models' noise always earns one), a flag that ends the job is; the platform runs every listed stage."""
from __future__ import annotations

import pytest

from bench.overhead import JobFailed, TerminalWatch, platform_processes, published
from consumers.audit import is_terminal as audit_is_terminal
from consumers.progress import JobEvent, is_terminal
from streams import supervisor
from tests.test_job_state import cancelled, failed, flagged
from tests.test_job_state import published as publication


def job_event(topic_and_event: tuple[str, dict]) -> JobEvent:
    return JobEvent(*topic_and_event)


def watch_over(*events: tuple[str, dict] | None) -> TerminalWatch:
    """A TerminalWatch reading these events, as read_events yields them (None: a poll with nothing new)."""
    def stream():
        yield from (None if e is None else job_event(e) for e in events)
        raise AssertionError("read past the events given")  # wait() must have returned or raised by now
    return TerminalWatch(stream())


def test_a_review_flag_the_job_goes_on_from_is_not_its_end():
    review = flagged("j1", decision="REVIEW", ends_job=False)
    assert published(job_event(review)) is False
    seen = watch_over(review, None, publication("j1")).wait(["j1"], timeout_s=5)
    assert list(seen) == ["j1"]


@pytest.mark.parametrize("flag", [
    flagged("j1", decision="BLOCK", ends_job=True),
    flagged("j1", decision="BLOCK"),  # from before ends_job existed
    flagged("j1", decision="REVIEW", ends_job=True),  # held for a reviewer: nothing is published
], ids=["block", "block-without-ends_job", "held-review"])
def test_a_flag_that_ends_the_job_fails_it(flag):
    with pytest.raises(JobFailed, match="vidgen.flagged"):
        published(job_event(flag))
    with pytest.raises(JobFailed, match="vidgen.flagged"):
        watch_over(flag, publication("j1")).wait(["j1"], timeout_s=5)


@pytest.mark.parametrize("end", [failed("j1"), cancelled("j1")], ids=["failed", "cancelled"])
def test_a_failure_or_cancellation_fails_the_job(end):
    with pytest.raises(JobFailed):
        watch_over(end).wait(["j1"], timeout_s=5)


def test_other_jobs_ends_are_ignored_and_every_job_is_waited_for():
    seen = watch_over(flagged("other", decision="BLOCK", ends_job=True), publication("j1"),
                      flagged("j2", decision="REVIEW", ends_job=False), publication("j2")).wait(["j1", "j2"], 5)
    assert sorted(seen) == ["j1", "j2"]


def test_the_follower_and_the_audit_share_one_rule():
    for topic_and_event in [flagged("j1", "REVIEW", ends_job=False), flagged("j1", "REVIEW", ends_job=True),
                            flagged("j1", "REVIEW"), flagged("j1", "BLOCK"), publication("j1"), failed("j1"),
                            cancelled("j1")]:
        assert is_terminal(job_event(topic_and_event)) == audit_is_terminal(*topic_and_event)


def test_the_platform_runs_every_stage_the_supervisor_lists(tmp_path, monkeypatch):
    assert platform_processes(tmp_path, {}).stage_names == supervisor.STAGE_NAMES
    # A stage added to the pipeline (e.g. a scheduler between the prompt encoder and the GPU agents) is run too.
    stages = (*supervisor.STAGE_NAMES[:1], "scheduler", *supervisor.STAGE_NAMES[1:])
    monkeypatch.setattr(supervisor, "STAGE_NAMES", stages)
    assert platform_processes(tmp_path, {}).stage_names == stages
