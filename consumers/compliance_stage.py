"""compliance: VideoDecoded (last segment) → checks → VideoPublished.

Consumes vidgen.decoded. Emits vidgen.published. A placeholder until the detectors, watermark and C2PA signing
land (issue 5): it verifies the video blob against its reference and publishes it.
"""
from __future__ import annotations

from streams import topics
from streams.blobs import LocalBlobStore
from streams.settings import Settings
from streams.stage import Stage, StageContext


class ComplianceStage:
    def __init__(self, settings: Settings, blobs: LocalBlobStore):
        pass  # the detectors, watermarker and signer will be set up here

    def handle(self, decoded: dict, ctx: StageContext) -> None:
        if not decoded["is_last"]:
            return
        video = decoded["video"] or decoded["segment"]
        ctx.blobs.get(video)  # BlobError (missing or altered) fails the job instead of publishing a bad link
        params = decoded["params"]
        ctx.emit(topics.PUBLISHED, ctx.event(
            decoded["job_id"], "published",
            tenant=decoded["tenant"], video=video, frames=decoded["frame_start"] + decoded["frames"],
            width=params["width"], height=params["height"], fps=params["fps"], params=params,
            renditions=[], manifest=None,
        ))


STAGE = Stage(
    name="compliance",
    consumes=(topics.DECODED,),
    emits=(topics.PUBLISHED,),
    build=ComplianceStage,
    dedupe_key=lambda decoded: f"{decoded['job_id']}/{decoded['segment_index']}",
    doc=__doc__,
)
