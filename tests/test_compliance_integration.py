"""Compliance on the real platform: a generated job ends signed, watermarked and published; a job the detection
policy blocks ends flagged and is never published.

Every stage runs as its own process on the embedded broker. The first job goes through the default policy; then
the compliance process is replaced by one whose policy blocks everything, and a second job goes through it.
"""
from __future__ import annotations

import signal
import time

import pytest

from compliance.provenance import ensure_dev_chain, verify_video
from compliance.watermark import payload_for_job, read_watermark
from consumers.progress import EventLog
from gpu_agents.segments import top_level_boxes
from gpu_agents.video import read_mp4
from producers.requests import VideoRequests
from streams import topics
from streams.blobs import open_blob_store
from streams.supervisor import PlatformProcesses
from tests.samples import strict_detection_policy

pytestmark = pytest.mark.integration

JOB = dict(tier="premium", steps=3, num_frames=9, width=256, height=256, guidance_scale=1.0)
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    var_dir = tmp_path_factory.mktemp("var")
    platform = PlatformProcesses(var_dir, env={"VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000"})
    settings = platform.start()
    log = EventLog(settings)
    requests = VideoRequests(settings)
    try:
        published_id = requests.submit(prompt="a lighthouse on a cliff", seed=21, **JOB)
        log.wait_for(lambda log: log.terminal(published_id), TIMEOUT_S, "the first job to end")

        [compliance] = platform.stages["compliance"]
        platform.signal_stage(compliance.pid, signal.SIGTERM)
        assert compliance.wait(30) == 0
        platform.add_stage("compliance", env={
            "VIDGEN_DETECTION_POLICY": strict_detection_policy(var_dir / "strict-policy.toml")})
        flagged_id = requests.submit(prompt="a lighthouse at night", seed=22, **JOB)
        log.wait_for(lambda log: log.terminal(flagged_id), TIMEOUT_S, "the second job to end")
        time.sleep(1.0)  # a moment for anything that should not come (a publication after the flag)
        platform.check_alive()
        yield dict(settings=settings, log=log, published_id=published_id, flagged_id=flagged_id,
                   blobs=open_blob_store(settings), root=ensure_dev_chain(var_dir / "c2pa").root_pem)
    finally:
        requests.close()
        log.close()
        platform.stop()


def test_generated_job_is_published_signed_and_trusted(run):
    [(topic, published)] = run["log"].terminal(run["published_id"])
    assert topic == topics.PUBLISHED.name
    master = run["blobs"].get(published["video"])
    report = verify_video(master, trust_anchors_pem=run["root"])
    assert report.validation_state == "Trusted"
    assert report.manifest_label == published["manifest_label"]
    actions = report.assertions["c2pa.actions.v2"]["actions"]
    assert actions[0]["action"] == "c2pa.created" and actions[0]["digitalSourceType"].endswith(
        "trainedAlgorithmicMedia")
    assert report.assertions["io.vidgen.generation"]["job_id"] == run["published_id"]
    for rendition in published["renditions"]:
        assert verify_video(run["blobs"].get(rendition["media"]), trust_anchors_pem=run["root"]).trusted


def test_one_flipped_byte_makes_the_published_video_invalid(run):
    [(_, published)] = run["log"].terminal(run["published_id"])
    data = bytearray(run["blobs"].get(published["video"]))
    offset, size = next((offset, size) for box, offset, size in top_level_boxes(bytes(data)) if box == b"mdat")
    data[offset + size // 2] ^= 0x40
    assert verify_video(bytes(data), trust_anchors_pem=run["root"]).validation_state == "Invalid"


def test_published_frames_carry_the_jobs_watermark(run):
    [(_, published)] = run["log"].terminal(run["published_id"])
    frames = read_mp4(run["blobs"].get(published["video"]))
    assert len(frames) == JOB["num_frames"]
    assert read_watermark(frames).payload == payload_for_job(run["published_id"])
    assert published["watermark_payload"] == payload_for_job(run["published_id"]).hex()


def test_job_above_the_threshold_is_flagged_and_never_published(run):
    job_id = run["flagged_id"]
    [(topic, flagged)] = run["log"].terminal(job_id)
    assert topic == topics.FLAGGED.name
    assert (flagged["stage"], flagged["decision"], flagged["ends_job"]) == ("POST_GEN", "BLOCK", True)
    assert {"faces", "frequency", "temporal", "nsfw", "ensemble"} <= set(flagged["scores"])
    assert run["log"].of(job_id, topics.DECODED), "it was generated and decoded before compliance stopped it"
    assert not run["log"].of(job_id, topics.PUBLISHED)


def test_vidgen_verify_names_the_state_the_watermark_and_the_job(run, tmp_path):
    from consumers.verify import verify_file

    [(_, published)] = run["log"].terminal(run["published_id"])
    path = tmp_path / "downloaded.mp4"
    path.write_bytes(run["blobs"].get(published["video"]))
    report = verify_file(str(path), settings=run["settings"])
    assert report.ok and report.provenance.validation_state == "Trusted"  # the dev root under var/c2pa by default
    assert report.watermark.payload == payload_for_job(run["published_id"])
    assert [job["job_id"] for job in report.jobs] == [run["published_id"]]
    text = report.render()
    assert "C2PA: Trusted" in text and run["published_id"] in text and "io.vidgen.generation" in text

    tampered = bytearray(path.read_bytes())
    offset, size = next((o, n) for box, o, n in top_level_boxes(bytes(tampered)) if box == b"mdat")
    tampered[offset + size // 3] ^= 0x10
    path.write_bytes(bytes(tampered))
    report = verify_file(str(path), settings=run["settings"], look_up_job=False)
    assert not report.ok and report.provenance.validation_state == "Invalid"
