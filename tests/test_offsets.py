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
