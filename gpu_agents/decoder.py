"""vae-decoder: LatentChunk × K → VAE decode → H.264 MP4 → VideoDecoded.

Consumes vidgen.latent-chunks. Emits vidgen.decoded. A job's chunks are collected (duplicates ignored, any order)
and their inputs held uncommitted until the job's video is written, so a decoder that dies mid-job leaves every
chunk to be replayed by the next one.
"""
from __future__ import annotations

from streams import topics
from streams.blobs import LocalBlobStore
from streams.settings import Settings
from streams.stage import InvalidEvent, Stage, StageContext

from .models import ModelCatalogue
from .video import decode_latents, encode_mp4, join_latent_chunks


def check_chunk(chunk: dict) -> None:
    if chunk["chunk_count"] < 1 or not 0 <= chunk["chunk_index"] < chunk["chunk_count"]:
        raise InvalidEvent(f"chunk {chunk['chunk_index']} of {chunk['chunk_count']} is out of range")
    if chunk["latent_frames"] < 1 or chunk["latent_frame_start"] < 0:
        raise InvalidEvent("chunk has no latent frames or a negative start")


class VaeDecoder:
    def __init__(self, settings: Settings, blobs: LocalBlobStore):
        self.models = ModelCatalogue(settings.model_dirs)
        self.pending: dict[str, dict[int, dict]] = {}  # job_id → chunk_index → LatentChunk

    def handle(self, chunk: dict, ctx: StageContext) -> None:
        check_chunk(chunk)
        job_id = chunk["job_id"]
        received = self.pending.setdefault(job_id, {})
        received.setdefault(chunk["chunk_index"], chunk)
        if len(received) < chunk["chunk_count"]:
            ctx.hold(job_id)
            return

        ordered = [received[i] for i in range(chunk["chunk_count"])]
        params = chunk["params"]
        latents = join_latent_chunks([ctx.blobs.get_tensor(c["latent"]) for c in ordered])
        frames = decode_latents(self.models.vae(params["model"]), latents)
        video = ctx.blobs.put(encode_mp4(frames, params["fps"]), job_id, "video.mp4", dtype="video/mp4")
        ctx.emit(topics.DECODED, ctx.event(
            job_id, "segment", 0,
            tenant=chunk["tenant"], segment_index=0, is_last=True, segment=video, frame_start=0,
            frames=int(frames.shape[0]), video=video, params=params,
        ))
        ctx.release(job_id)
        del self.pending[job_id]

    def forget(self, job_ids: list[str]) -> None:
        """A rebalance moved these jobs' partitions away: their new owner replays the chunks."""
        for job_id in job_ids:
            self.pending.pop(job_id, None)


STAGE = Stage(
    name="vae-decoder",
    consumes=(topics.LATENT_CHUNKS,),
    emits=(topics.DECODED,),
    build=VaeDecoder,
    doc=__doc__,
)
