"""`vidgen submit --follow` while a job waits: one "queued: position N, about M s" line per change (no Kafka)."""
from __future__ import annotations

import io

from consumers.progress import FOLLOWED, LIFECYCLE, JobEvent
from streams import topics
from tests.test_job_state import T0, encoded, queued_at, requested, step
from vidgen.cli import ProgressBar, queue_line


def test_queue_line_says_the_position_and_the_eta_in_whole_seconds():
    assert queue_line(3, 12.4) == "queued: position 3, about 12 s"
    assert queue_line(1, 0.2) == "queued: position 1, about 1 s"  # never "about 0 s"
    assert queue_line(2, None) == "queued: position 2"  # an unknown ETA is left out


def _lines(*events) -> list[str]:
    out = io.StringIO()
    bar = ProgressBar(out)
    for topic_name, event in events:
        bar.update(JobEvent(topic_name, event))
    bar.close()
    return out.getvalue().splitlines()


def test_follow_prints_a_queue_line_only_when_it_changes_and_none_once_the_job_runs():
    lines = _lines(
        requested("j1"), encoded("j1"),
        queued_at("j1", 3, T0 + 200, eta_s=12.2), queued_at("j1", 3, T0 + 300, eta_s=11.9),  # both "about 12 s"
        queued_at("j1", 2, T0 + 150, eta_s=30.0),  # older than the one shown: not news
        queued_at("j1", 2, T0 + 500, eta_s=None), queued_at("j1", 1, T0 + 800, eta_s=2.0),
        queued_at("j1", 0, T0 + 900, eta_s=0.0),  # assigned: nothing to say
        step("j1", 1, total=2), queued_at("j1", 1, T0 + 850, eta_s=1.0),  # read late: from before the start
        step("j1", 2, total=2))
    queue_lines = [line for line in lines if line.startswith("queued:")]
    assert queue_lines == ["queued: position 3, about 12 s", "queued: position 2", "queued: position 1, about 2 s"]
    assert lines[:2] == ["requested", "encoded.premium"]
    assert lines[-1].startswith("denoising [") and lines[-1].endswith("2/2 steps")
    assert not any("queue" in line and not line.startswith("queued:") for line in lines)  # no bare stage line


def test_a_requeued_job_shows_its_position_again():
    lines = _lines(encoded("j1"), queued_at("j1", 1, T0 + 200, eta_s=3.0), step("j1", 1, total=4),
                   queued_at("j1", 1, T0 + 1500, eta_s=3.0),  # preempted after step 1, first in line again
                   step("j1", 2, total=4, attempt=2, resumed_from=1))
    assert [line for line in lines if line.startswith("queued:")] == ["queued: position 1, about 3 s"] * 2


def test_follow_reads_the_queue_positions_besides_the_lifecycle():
    assert FOLLOWED == (*LIFECYCLE, topics.QUEUE)
