"""Streaming output on a real broker: a segment is playable right after the first VideoDecoded, and a decoder
killed mid-job is replaced by another that finishes the same video."""
from __future__ import annotations

import hashlib
import io
import signal
import time

import av
import pytest
import torch
from confluent_kafka import Consumer, Producer, TopicPartition

from consumers.progress import EventLog
from gpu_agents.video import read_mp4
from producers.requests import VideoRequests
from streams import topics
from streams.blobs import open_blob_store
from streams.events import new_event, new_job_id
from streams.kafka import consumer_config, producer_config
from streams.serde import encode_key, event_codec
from streams.supervisor import PlatformProcesses

pytestmark = pytest.mark.integration

# Decoding a 256x256, 33-frame video chunk by chunk takes long enough here to kill a decoder in the middle.
STREAMED = dict(width=256, height=256, num_frames=33, steps=2, guidance_scale=1.0)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    processes = PlatformProcesses(tmp_path_factory.mktemp("streaming"),
                                  stages=("prompt-encoder", "scheduler", "gpu-agent", "vae-decoder", "vae-decoder", "compliance"),
                                  env={"VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000", "VIDGEN_LATENT_CHUNK_FRAMES": "1"})
    settings = processes.start()
    log = EventLog(settings)
    requests = VideoRequests(settings)
    yield dict(processes=processes, settings=settings, log=log, requests=requests,
               blobs=open_blob_store(settings))
    requests.close()
    log.close()
    processes.stop()


def _decode(*parts: bytes) -> int:
    with av.open(io.BytesIO(b"".join(parts))) as container:
        return sum(1 for _ in container.decode(video=0))


def _frames_digest(video: bytes) -> str:
    return hashlib.sha256(read_mp4(video).tobytes()).hexdigest()


def test_first_segment_is_playable_as_soon_as_it_is_announced(platform):
    log, blobs = platform["log"], platform["blobs"]
    job_id = platform["requests"].submit("a firework over a harbour", seed=1, **STREAMED)
    first = log.wait_for(lambda l: l.of(job_id, topics.DECODED), 180, "the first segment")[0]
    # Right now, before the rest is decoded: the playlist names a segment that plays with the init segment.
    playlist = blobs.get(first["playlist"]).decode()
    assert "#EXT-X-PLAYLIST-TYPE:EVENT" in playlist and '#EXT-X-MAP:URI="init.mp4"' in playlist
    named = [line for line in playlist.splitlines() if line and not line.startswith("#")]
    assert named[0] == "segment-00000.m4s"
    segment = blobs.get(first["segment"])
    assert blobs.key_of(first["segment"]["uri"]).rsplit("/", 1)[-1] == named[0]
    assert _decode(blobs.get(first["init_segment"]), segment) == first["frames"] == 1
    unfinished = not any(d["is_last"] for d in log.of(job_id, topics.DECODED)[:1])
    assert unfinished

    log.wait_for(lambda l: l.terminal(job_id), 180, "the job to end")
    segments = log.of(job_id, topics.DECODED)
    final_playlist = blobs.get(segments[-1]["playlist"]).decode()
    assert final_playlist.rstrip().endswith("#EXT-X-ENDLIST")
    assert len([line for line in final_playlist.splitlines() if line.endswith(".m4s")]) == len(segments) == 9
    assert _decode(blobs.get(segments[-1]["video"])) == STREAMED["num_frames"]


def test_a_decoder_killed_mid_job_is_replaced_and_the_video_is_the_same(platform):
    log, blobs, requests = platform["log"], platform["blobs"], platform["requests"]
    reference_job = requests.submit("a sailing boat at noon", seed=2, **STREAMED)
    log.wait_for(lambda l: l.terminal(reference_job), 180, "the fault-free run")
    # The decoder's complete video (before compliance, which watermarks each job with its own id).
    reference = blobs.get(next(d["video"] for d in log.of(reference_job, topics.DECODED) if d["is_last"]))

    job_id = requests.submit("a sailing boat at noon", seed=2, **STREAMED)  # the same video, another job
    first = log.wait_for(lambda l: l.of(job_id, topics.DECODED), 180, "the first segment")[0]
    victim = int(first["decoder_id"].rsplit("-", 1)[1])
    platform["processes"].signal_stage(victim, signal.SIGKILL)
    killed_at = time.time()
    assert not any(d["is_last"] for d in log.of(job_id, topics.DECODED)), "it finished before it could be killed"

    log.wait_for(lambda l: l.terminal(job_id), 180, "the surviving decoder to finish")
    time.sleep(1.0)
    ends = log.terminal(job_id)
    assert [t for t, _ in ends] == [topics.PUBLISHED.name], "published exactly once"
    decoded = blobs.get(next(d["video"] for d in log.of(job_id, topics.DECODED) if d["is_last"]))
    assert _frames_digest(decoded) == _frames_digest(reference)
    assert decoded == reference, "the replacement writes byte-identical segments"
    segments = {d["segment_index"] for d in log.of(job_id, topics.DECODED)}
    assert segments == set(range(9))
    replacement = {d["decoder_id"] for d in log.of(job_id, topics.DECODED) if d["timestamp"].timestamp() > killed_at}
    assert replacement and first["decoder_id"] not in replacement, "the rest came from another decoder"
    platform["processes"].add_stage("vae-decoder")


def _committed(settings, group_id: str, topic: str, partition: int) -> int:
    consumer = Consumer(consumer_config(settings, group_id, "test-offsets"))  # reads the group's offsets, never joins
    try:
        return consumer.committed([TopicPartition(topic, partition)], timeout=10)[0].offset
    finally:
        consumer.close()


def test_a_chunk_that_keeps_failing_fails_its_job_and_frees_the_partition(platform):
    """Chunk 1 of a 3-chunk job names a latent whose bytes are not what its sha256 says: after the retries the job
    fails with the reason, the inputs held for it are committed, its chunk 2 is not held, and a job behind it on
    the same partition is decoded; the committed position moves past all of them."""
    settings, log, blobs = platform["settings"], platform["log"], platform["blobs"]
    params = dict(width=64, height=64, num_frames=9, fps=8, steps=2, guidance_scale=1.0, seed=0, model="tiny-wan",
                  preset="fast")
    broken, behind = new_job_id(), new_job_id()
    chunks = []
    for job_id, count in ((broken, 3), (behind, 1)):
        latent = torch.randn(1, 16, count, 8, 8, generator=torch.Generator().manual_seed(7))
        for index in range(count):
            ref = blobs.put_tensor(latent[:, :, index:index + 1].contiguous(), job_id, f"latent-{index}.safetensors")
            if job_id == broken and index == 1:
                ref = dict(ref, sha256="0" * 64)
            chunks.append(new_event(job_id, f"{job_id}-chunk-{index}", tenant="default", chunk_index=index,
                                    chunk_count=count, latent_frame_start=index, latent_frames=1, latent=ref,
                                    params=dict(params, num_frames=1 + 4 * (count - 1)), attempt=1,
                                    prompt_sha256="", requested_at=None))
    topic, codec = topics.LATENT_CHUNKS.name, event_codec(settings)
    offsets = []
    producer = Producer(producer_config(settings, "test-chunks"))
    for chunk in chunks:  # one partition, in this order, so the broken job's inputs sit in front of the other's
        producer.produce(topic, key=encode_key(chunk["job_id"]), value=codec.encode(topic, chunk), partition=0,
                         on_delivery=lambda err, msg: offsets.append(msg.offset()))
    producer.flush(10)
    producer.close()
    assert len(offsets) == 4

    failed = log.wait_for(lambda l: l.of(broken, topics.FAILED), 60, "the broken job to fail")
    assert failed[0]["stage"] == "vae-decoder" and "sha256" in failed[0]["reason"], failed[0]
    log.wait_for(lambda l: [d for d in l.of(behind, topics.DECODED) if d["is_last"]], 60, "the job behind it")
    assert [d["segment_index"] for d in log.of(broken, topics.DECODED)] == [0]
    assert any(l["job_id"] == broken for l in log.on(topics.DEAD_LETTER))
    deadline = time.monotonic() + 30
    while _committed(settings, "vidgen.vae-decoder", topic, 0) <= max(offsets) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _committed(settings, "vidgen.vae-decoder", topic, 0) > max(offsets), "held inputs pin the partition"
