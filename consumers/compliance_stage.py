"""compliance: VideoDecoded (last segment) → detectors → watermark → renditions → C2PA signatures → VideoPublished.

Consumes vidgen.decoded. Emits vidgen.published, or vidgen.flagged (POST_GEN) when the detector ensemble blocks
the video (or sends it to REVIEW and the platform holds reviewed jobs): a flagged job is never published.

Order matters: the detectors judge the decoded frames; the watermark goes into every frame before anything is
encoded; every file is signed last, so each C2PA signature covers the final bytes. The master is the watermarked
video at full quality; the renditions are the delivery ladder, each a signed progressive MP4, plus an HLS VOD master
playlist over fragmented copies of them, and two signed JPEG stills (a thumbnail and a spritesheet: compliance/stills.py). All of it is plain functions from compliance/; this module only strings
them together and stores the results as blobs (content-addressed: a redelivered job re-signs to new bytes, and must
never overwrite a file an already-emitted event names). A video with sound keeps it: the master's audio track is
read with its frames and goes into the master and every rendition (the watermark is in the frames only; each C2PA
hash covers the whole file, audio included). The input image of an image-to-video job
(``params.input_reference``) is named as an ingredient in every file's manifest.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from compliance.detectors import Assessment, assess, load_detection_policy
from compliance.input_image import read_input_image
from compliance.provenance import (GenerationClaims, InputIngredient, SignedVideo, ensure_dev_chain,
                                   load_signing_material, make_signer, sign_video)
from compliance.renditions import (DEFAULT_LADDER, HlsMedia, Rendition, Rung, encode_renditions, hls_media,
                                   hls_vod_playlist, sign_hls_media)
from compliance.stills import spritesheet_jpeg, thumbnail_jpeg
from compliance.watermark import embed_watermark, payload_for_job
from gpu_agents.video import Audio, encode_mp4, read_audio, read_mp4
from streams import topics
from streams.blobs import BlobStore, sha256_hex
from streams.metrics import COMPLIANCE_SECONDS, JOB_SECONDS, observe_since
from streams.settings import Settings, SettingsError
from streams.stage import Stage, StageContext

log = logging.getLogger(__name__)


def parse_ladder(text: str) -> tuple[Rung, ...]:
    """``name:scale:crf,...`` (e.g. ``native:1:23,half:0.5:23``) → rungs."""
    rungs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            name, scale, crf = item.split(":")
            rungs.append(Rung(name, float(scale), int(crf)))
        except ValueError:
            raise SettingsError(f"rendition {item!r}: expected name:scale:crf, e.g. half:0.5:23") from None
    if not rungs:
        raise SettingsError("the rendition ladder is empty")
    return tuple(rungs)


@dataclass
class FinishedVideo:
    """Everything compliance makes of one job, before it is stored."""

    master: SignedVideo
    renditions: list[tuple[Rendition, bytes, HlsMedia]]  # (rendition, its signed MP4, its signed HLS copy)
    watermark_payload: str | None
    watermark_note: str
    thumbnail: bytes | None = None  # signed JPEGs (compliance/stills.py)
    spritesheet: bytes | None = None


class ComplianceStage:
    def __init__(self, settings: Settings, blobs: BlobStore):
        self.policy = load_detection_policy(settings.detection_policy)
        self.review_proceeds = settings.review_proceeds
        self.ladder = parse_ladder(settings.rendition_ladder) if settings.rendition_ladder else DEFAULT_LADDER
        if settings.signing_chain:
            material = load_signing_material(settings.signing_chain, settings.signing_key)
        else:
            material = ensure_dev_chain(settings.var_dir / "c2pa")  # development only: say so in every log
            log.warning("compliance: signing with the development certificate chain in %s", settings.var_dir / "c2pa")
        self.signer = make_signer(material)

    # -- the recipe ------------------------------------------------------------------------------------------
    def handle(self, decoded: dict, ctx: StageContext) -> None:
        if not decoded["is_last"]:
            return  # segments are for watching early; the checks run on the whole video
        job_id, params = decoded["job_id"], decoded["params"]
        self.timings = timings = {}
        with phase(timings, "read"):
            video = ctx.blobs.get(decoded["video"] or decoded["segment"])  # BlobError fails the job
            frames, audio = read_mp4(video), read_audio(video)
            inputs = input_ingredients(params, ctx.blobs)
        with phase(timings, "detectors"):
            assessment = assess(frames, self.policy)
        if assessment.decision != "ALLOW":
            ends_job = assessment.decision == "BLOCK" or not self.review_proceeds
            ctx.emit(topics.FLAGGED, ctx.event(
                job_id, "flagged", tenant=decoded["tenant"], stage="POST_GEN", decision=assessment.decision,
                reasons=assessment.reasons, scores=scores_of(assessment), evidence=json.dumps(assessment.evidence),
                policy_version=assessment.policy_version, ends_job=ends_job,
            ))
            if ends_job:
                observe_since(JOB_SECONDS, ("flagged",), decoded.get("requested_at"))
                return

        finished = self.finish(frames, decoded, timings, inputs, audio)
        with phase(timings, "store"):
            refs = self.store(finished, job_id, ctx.blobs)
        ctx.emit(topics.PUBLISHED, ctx.event(
            job_id, "published",
            tenant=decoded["tenant"], video=refs["master"], frames=len(frames),
            width=params["width"], height=params["height"], fps=params["fps"], params=params,
            renditions=refs["renditions"], manifest=refs["manifest"], playlist=refs["playlist"],
            thumbnail=refs.get("thumbnail"), spritesheet=refs.get("spritesheet"),
            manifest_label=finished.master.manifest_label, watermark_payload=finished.watermark_payload,
            watermark_note=finished.watermark_note, scores=scores_of(assessment),
            policy_version=assessment.policy_version,
        ))
        observe_since(JOB_SECONDS, ("published",), decoded.get("requested_at"))
        for name, ms in timings.items():
            COMPLIANCE_SECONDS.labels(name).observe(ms / 1000.0)
        log.info("compliance: job %s published in %.0f ms (%s)", job_id, sum(timings.values()),
                 ", ".join(f"{name} {ms:.0f}" for name, ms in timings.items()))

    def finish(self, frames, decoded: dict, timings: dict[str, float],
               inputs: tuple[InputIngredient, ...] = (), audio: Audio | None = None) -> FinishedVideo:
        """Watermark every frame, encode the master and the renditions (with `audio`, the decoded video's sound,
        when it has some), sign each file (naming its inputs)."""
        job_id, params = decoded["job_id"], decoded["params"]
        with phase(timings, "watermark"):
            watermarked = embed_watermark(frames, payload_for_job(job_id))
        payload = watermarked.payload_hex if watermarked.embedded else None
        claims = GenerationClaims(
            job_id=job_id, prompt_sha256=decoded.get("prompt_sha256", ""), seed=params["seed"],
            steps=params["steps"], model=params["model"], width=params["width"], height=params["height"],
            frames=len(frames), watermark_payload_hex=payload, inputs=inputs,
        )

        def sign(data: bytes) -> bytes:
            return sign_video(data, signer=self.signer, claims=claims).data

        sound = {} if audio is None else dict(audio=audio.waveform, sample_rate=audio.sample_rate)
        with phase(timings, "master"):
            master = sign_video(encode_mp4(watermarked.frames, params["fps"], **sound), signer=self.signer,
                                claims=claims)
        renditions = []
        with phase(timings, "renditions"):
            for rendition in encode_renditions(watermarked.frames, params["fps"], self.ladder, **sound):
                hls = sign_hls_media(hls_media(rendition, f"{rendition.name}.m4s"), sign)
                renditions.append((rendition, sign(rendition.data), hls))
        with phase(timings, "stills"):
            thumbnail = sign_video(thumbnail_jpeg(watermarked.frames), signer=self.signer, claims=claims,
                                   mime="image/jpeg").data
            sheet, _layout = spritesheet_jpeg(watermarked.frames)
            spritesheet = sign_video(sheet, signer=self.signer, claims=claims, mime="image/jpeg").data
        return FinishedVideo(master, renditions, payload, watermarked.reason, thumbnail, spritesheet)

    def store(self, finished: FinishedVideo, job_id: str, blobs: BlobStore) -> dict:
        """Blobs for the master, its manifest, each rendition (progressive MP4 and HLS copy) and the playlists.

        One folder per signing, named after the signed master's hash: a redelivered job is signed again (new
        timestamps, new bytes) into a folder of its own, so no file an emitted event names is ever replaced, and
        the playlists' relative links stay within one consistent set."""
        folder = (job_id, "published", sha256_hex(finished.master.data)[:16])
        master = blobs.put(finished.master.data, *folder, "video.mp4", dtype="video/mp4")
        manifest = blobs.put(finished.master.manifest_json.encode("utf-8"), *folder, "manifest.json",
                             dtype="application/json")
        renditions = []
        for rendition, signed, hls in finished.renditions:
            media = blobs.put(signed, *folder, f"{rendition.name}.mp4", dtype="video/mp4")
            renditions.append({"name": rendition.name, "width": rendition.width, "height": rendition.height,
                               "media": media, "bitrate": rendition.bitrate, "signed": True})
            blobs.put(hls.segment_data, *folder, f"{rendition.name}.m4s", dtype="video/mp4")
            blobs.put(hls.playlist.encode("utf-8"), *folder, f"{rendition.name}.m3u8",
                      dtype="application/vnd.apple.mpegurl")
        master_playlist = hls_vod_playlist([rendition for rendition, _, _ in finished.renditions],
                                           [f"{rendition.name}.m3u8" for rendition, _, _ in finished.renditions])
        playlist = blobs.put(master_playlist.encode("utf-8"), *folder, "master.m3u8",
                             dtype="application/vnd.apple.mpegurl")
        stills = {name: blobs.put(data, *folder, f"{name}.jpg", dtype="image/jpeg")
                  for name, data in (("thumbnail", finished.thumbnail), ("spritesheet", finished.spritesheet))
                  if data is not None}
        return dict(master=master, manifest=manifest, renditions=renditions, playlist=playlist, **stills)


def input_ingredients(params: dict, blobs: BlobStore) -> tuple[InputIngredient, ...]:
    """The input image of an image-to-video job, for the manifest; none for text-to-video. Read as the prompt encoder
    read it (it accepted the image), so its media type is the bytes', whatever the BlobRef's dtype says."""
    ref = params.get("input_reference")
    if ref is None:
        return ()
    image = read_input_image(blobs.get(ref))
    return (InputIngredient(image.data, image.media_type, image.file_name),)


@contextmanager
def phase(timings: dict[str, float], name: str) -> Iterator[None]:
    """Adds the block's wall time (ms) to timings[name]: the stage logs where a job's time went."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + (time.perf_counter() - started) * 1000


def scores_of(assessment: Assessment) -> dict[str, float]:
    return {**assessment.scores, "ensemble": assessment.score}


STAGE = Stage(
    name="compliance",
    consumes=(topics.DECODED,),
    emits=(topics.PUBLISHED, topics.FLAGGED),
    build=ComplianceStage,
    dedupe_key=lambda decoded: f"{decoded['job_id']}/{decoded['segment_index']}",
    doc=__doc__,
)
