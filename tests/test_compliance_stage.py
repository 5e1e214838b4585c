"""The compliance handler on its own (no broker): what a published job carries, and what a flagged one does not."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from compliance.input_image import read_input_image
from compliance.provenance import ensure_dev_chain, verify_video
from compliance.watermark import payload_for_job, read_watermark
from consumers.compliance_stage import ComplianceStage, parse_ladder
from gpu_agents.segments import top_level_boxes
from gpu_agents.video import encode_mp4, probe_mp4, read_mp4
from producers.requests import store_input_image
from streams import topics
from streams.blobs import LocalBlobStore
from streams.settings import SettingsError, load_settings
from streams.stage import SourceMessage, StageContext
from tests.samples import PARAMS, no_face_png, strict_detection_policy



def clip(size: int, frames: int = 9) -> np.ndarray:
    """A smooth moving gradient with a little noise: no face, no flicker, nothing a detector should mind."""
    rng = np.random.default_rng(3)
    ramp = np.linspace(40, 200, size)
    video = np.stack([np.broadcast_to((ramp[None, :] + 3 * t)[..., None], (size, size, 3)) for t in range(frames)])
    return np.clip(video + rng.normal(0, 2, video.shape), 0, 255).astype(np.uint8)


def run_stage(tmp_path, frames: np.ndarray, job_id: str = "job-c1", input_image: bytes | None = None,
              **env) -> list[tuple[str, dict]]:
    settings = load_settings({"VIDGEN_VAR_DIR": str(tmp_path), **env})
    blobs = LocalBlobStore(tmp_path / "blobs")
    stage = ComplianceStage(settings, blobs)
    params = {**PARAMS, "width": frames.shape[2], "height": frames.shape[1], "num_frames": len(frames)}
    if input_image is not None:
        params["input_reference"] = store_input_image(blobs, job_id, read_input_image(input_image))
    video = blobs.put(encode_mp4(frames, params["fps"]), job_id, "video.mp4", dtype="video/mp4")
    decoded = dict(job_id=job_id, tenant="acme", segment_index=0, is_last=True, segment=video, frame_start=0,
                   frames=len(frames), video=video, params=params, init_segment=None, playlist=None,
                   decoder_id="d", prompt_sha256="ab" * 32, timestamp=0)
    emitted = []
    ctx = StageContext("compliance", SourceMessage(topics.DECODED.name, 0, 0, job_id), blobs,
                       lambda topic, event, key, headers: emitted.append((topic.name, event)))
    stage.handle(decoded, ctx)
    return emitted, blobs, settings


@pytest.fixture(scope="module")
def published_256(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compliance")
    emitted, blobs, settings = run_stage(tmp_path, clip(256))
    [(topic, event)] = emitted
    assert topic == topics.PUBLISHED.name
    return event, blobs, ensure_dev_chain(settings.var_dir / "c2pa").root_pem


def test_master_is_signed_trusted_with_the_dev_root_and_says_how_it_was_made(published_256):
    event, blobs, root = published_256
    report = verify_video(blobs.get(event["video"]), trust_anchors_pem=root)
    assert report.validation_state == "Trusted"
    assert report.manifest_label == event["manifest_label"] and event["manifest_label"].startswith("urn:")
    generation = report.assertions["io.vidgen.generation"]
    assert (generation["job_id"], generation["seed"], generation["model"]) == ("job-c1", PARAMS["seed"], "tiny-wan")
    assert generation["prompt_sha256"] == "ab" * 32
    assert generation["watermark_payload_hex"] == event["watermark_payload"]


def test_one_flipped_byte_of_the_media_makes_it_invalid(published_256):
    event, blobs, root = published_256
    data = bytearray(blobs.get(event["video"]))
    mdat = next((offset, size) for box, offset, size in top_level_boxes(bytes(data)) if box == b"mdat")
    data[mdat[0] + mdat[1] // 2] ^= 0x01
    assert verify_video(bytes(data), trust_anchors_pem=root).validation_state == "Invalid"


def test_every_frame_carries_the_jobs_watermark(published_256):
    event, blobs, _ = published_256
    assert event["watermark_payload"] == payload_for_job("job-c1").hex() and event["watermark_note"] == ""
    for ref in [event["video"]] + [r["media"] for r in event["renditions"] if r["width"] >= 256]:
        assert read_watermark(read_mp4(blobs.get(ref))).payload == payload_for_job("job-c1")


def test_renditions_are_signed_decodable_and_described(published_256):
    event, blobs, root = published_256
    assert [(r["name"], r["width"], r["height"]) for r in event["renditions"]] == [
        ("native", 256, 256), ("half", 128, 128)]
    for rendition in event["renditions"]:
        data = blobs.get(rendition["media"])  # sha256 checked against the event
        assert verify_video(data, trust_anchors_pem=root).validation_state == "Trusted"
        probe = probe_mp4(data)
        assert (probe["width"], probe["height"], probe["frames"]) == (rendition["width"], rendition["height"], 9)
        assert rendition["bitrate"] > 0 and rendition["signed"]


def test_a_thumbnail_and_a_spritesheet_are_signed_jpegs_of_the_watermarked_frames(published_256):
    import io

    from PIL import Image

    from compliance.stills import SPRITE_TILE_WIDTH, representative_frame, sprite_grid

    event, blobs, root = published_256
    thumbnail, sheet = blobs.get(event["thumbnail"]), blobs.get(event["spritesheet"])
    for data in (thumbnail, sheet):
        report = verify_video(data, trust_anchors_pem=root, mime="image/jpeg")
        assert report.validation_state == "Trusted"
        assert report.assertions["io.vidgen.generation"]["job_id"] == "job-c1"
    assert event["thumbnail"]["dtype"] == "image/jpeg" and blobs.key_of(event["thumbnail"]["uri"]).endswith(".jpg")
    image = Image.open(io.BytesIO(thumbnail))
    assert image.format == "JPEG" and image.size == (256, 256)
    master = read_mp4(blobs.get(event["video"]))
    chosen = master[representative_frame(master)].astype(float)
    assert abs(np.asarray(image.convert("RGB"), float) - chosen).mean() < 4  # that frame, JPEG-compressed
    columns, rows = sprite_grid(9)
    assert Image.open(io.BytesIO(sheet)).size == (columns * SPRITE_TILE_WIDTH, rows * SPRITE_TILE_WIDTH)
    assert (columns, rows) == (3, 3)


def test_the_representative_frame_is_the_most_detailed_one():
    from compliance.stills import representative_frame

    frames = np.full((9, 32, 32, 3), 128, np.uint8)
    frames[5] = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert representative_frame(frames) == 5


def test_hls_playlists_address_signed_fragmented_copies(published_256):
    event, blobs, root = published_256
    folder = blobs.local_file(blobs.key_of(event["playlist"]["uri"])).parent
    master = blobs.get(event["playlist"]).decode()
    assert master.startswith("#EXTM3U") and "native.m3u8" in master and "half.m3u8" in master
    for name in ("native", "half"):
        media_playlist = (folder / f"{name}.m3u8").read_text()
        fmp4 = (folder / f"{name}.m4s").read_bytes()
        assert verify_video(fmp4, trust_anchors_pem=root).validation_state == "Trusted"
        ranges = [tuple(map(int, part.split("@"))) for line in media_playlist.splitlines() if "BYTERANGE" in line
                  for part in [line.split("BYTERANGE")[1].strip(':="')]]
        init_length, init_offset = ranges[0]
        assert init_offset == 0 and init_length + sum(length for length, _ in ranges[1:]) == len(fmp4)
        boxes = {offset: box for box, offset, _ in top_level_boxes(fmp4)}
        assert all(boxes.get(offset) in (b"sidx", b"moof") for _, offset in ranges[1:])
        assert len(read_mp4(fmp4)) == 9  # the signed fragmented file still plays


def test_detector_scores_and_policy_version_are_published(published_256):
    event, _, _ = published_256
    assert {"faces", "frequency", "temporal", "nsfw", "ensemble"} <= set(event["scores"])
    assert all(0.0 <= score <= 1.0 for score in event["scores"].values())
    assert event["policy_version"]


def test_frames_below_the_watermark_minimum_publish_with_the_reason(tmp_path):
    [(topic, event)] = run_stage(tmp_path, clip(128))[0]
    assert topic == topics.PUBLISHED.name
    assert event["watermark_payload"] is None and "256x256" in event["watermark_note"]


def test_a_video_above_the_threshold_is_flagged_and_never_published(tmp_path):
    emitted, blobs, _ = run_stage(tmp_path, clip(128), VIDGEN_DETECTION_POLICY=strict_detection_policy(tmp_path / "p.toml"))
    assert [topic for topic, _ in emitted] == [topics.FLAGGED.name]
    flagged = emitted[0][1]
    assert (flagged["stage"], flagged["decision"], flagged["ends_job"]) == ("POST_GEN", "BLOCK", True)
    assert {"faces", "frequency", "temporal", "nsfw", "ensemble"} <= set(flagged["scores"])
    assert flagged["policy_version"].startswith("strict-")
    assert not (tmp_path / "blobs" / "job-c1" / "published").exists()


def test_the_input_image_is_an_ingredient_of_every_signed_file(tmp_path):
    image = no_face_png()
    emitted, blobs, settings = run_stage(tmp_path, clip(128), input_image=image)
    [(topic, event)] = emitted
    assert topic == topics.PUBLISHED.name
    root = ensure_dev_chain(settings.var_dir / "c2pa").root_pem
    for media in (event["video"], *(r["media"] for r in event["renditions"])):
        report = verify_video(blobs.get(media), trust_anchors_pem=root)
        assert report.trusted, report.validation_errors
        [ingredient] = report.ingredients
        assert (ingredient["relationship"], ingredient["sha256"]) == ("inputTo", hashlib.sha256(image).hexdigest())


def test_rendition_ladder_setting():
    assert [(r.name, r.scale, r.crf) for r in parse_ladder("native:1:23, quarter:0.25:28")] == [
        ("native", 1.0, 23), ("quarter", 0.25, 28)]
    with pytest.raises(SettingsError, match="name:scale:crf"):
        parse_ladder("native-1-23")
