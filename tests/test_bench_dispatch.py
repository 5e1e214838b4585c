"""bench/dispatch.py's own helpers (the benchmark itself runs as `vidgen bench dispatch`)."""
from __future__ import annotations

import zlib

import pytest

from bench.dispatch import FILLER_PARTITION_ORDER, FILLER_TIER, job_on_partition
from streams import topics
from streams.kafka import key_partition


def test_a_key_is_found_for_every_partition_a_filler_asks_for_and_never_for_one_that_does_not_exist():
    partitions = topics.ENCODED[FILLER_TIER].partitions
    for wanted in FILLER_PARTITION_ORDER:
        job_id = job_on_partition(wanted % partitions, partitions)
        assert key_partition(job_id, partitions) == wanted % partitions == zlib.crc32(job_id.encode()) % partitions
    with pytest.raises(ValueError):
        job_on_partition(partitions, partitions)  # the search would never end
