from streams.offsets import OffsetTracker

TP = ("vidgen.latent-chunks", 0)


def test_commit_position_follows_processed_offsets():
    tracker = OffsetTracker()
    for offset in (5, 6, 7):
        tracker.started(TP, offset)
        tracker.done(TP, offset)
    assert tracker.commit_positions() == {TP: 8}
    tracker.committed({TP: 8})
    assert tracker.commit_positions() == {}  # nothing moved


def test_held_input_pins_the_partition_until_released():
    tracker = OffsetTracker()
    tracker.started(TP, 10)
    tracker.hold("job-a", TP, 10, "job-a/chunk-0")  # job a waits for more chunks
    for offset in (11, 12):  # job b completes meanwhile
        tracker.started(TP, offset)
        tracker.done(TP, offset)
    assert tracker.commit_positions() == {TP: 10}
    tracker.committed({TP: 10})
    assert tracker.is_held(TP, 10)
    assert tracker.release("job-a") == ["job-a/chunk-0"]
    assert tracker.commit_positions() == {TP: 13}


def test_forget_drops_revoked_partitions_and_reports_lost_units():
    tracker = OffsetTracker()
    other = ("vidgen.latent-chunks", 1)
    tracker.started(TP, 3)
    tracker.hold("job-a", TP, 3, "k")
    tracker.started(other, 9)
    tracker.done(other, 9)
    assert tracker.forget({TP}) == ["job-a"]
    assert tracker.commit_positions() == {other: 10}
    assert tracker.release("job-a") == []


def test_an_input_that_is_not_due_keeps_its_partition_waiting_until_then():
    from streams.runtime import DueTimes

    other = ("vidgen.failed", 1)
    due, tracker = DueTimes(), OffsetTracker()
    tracker.started(TP, 4)  # NotDue: neither done nor held, so the position stays on it
    due.wait(TP, 4, 100.0)
    due.wait(other, 9, 50.0)
    assert tracker.commit_positions() == {TP: 4}
    assert TP in due and due.due(49.9) == []
    assert due.due(50.0) == [(*other, 9)] and other not in due  # resumed (at its input) once: no longer waiting
    assert due.due(99.0) == [] and due.due(100.0) == [(*TP, 4)]
    due.wait(TP, 5, 200.0)
    due.wait(other, 10, 300.0)
    due.forget({TP})  # revoked: its new owner starts from the committed position, unpaused
    assert TP not in due and due.due(1e9) == [(*other, 10)]
