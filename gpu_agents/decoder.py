"""vae-decoder: LatentChunk × K → causal VAE decode, chunk by chunk → a playable fMP4 segment per chunk → VideoDecoded.

Consumes vidgen.latent-chunks, and vidgen.cancelled / vidgen.failed to let go of a job that stopped before its last
chunk (a model that streams while generating sends chunks as they finish). Emits vidgen.decoded: one event per segment as soon as it is decoded, each naming
the segment, the job's init segment and the live HLS playlist (EVENT, then ENDLIST); the last also names the
complete video. Each job keeps its own causal cache, so jobs interleaved on one decoder never mix, and the frames
equal a one-shot decode of the whole latent. Early chunks wait for their turn (even ahead of chunk 0);
duplicates are ignored. A job's inputs stay uncommitted until its last segment is out, so a decoder that dies
mid-job leaves the whole job to be replayed from chunk 0 by the next one, which writes the same segments under the
same event ids. A chunk that fails leaves its job as it was, so the runtime's retry takes up the same chunk; one
that keeps failing fails the job, whose held chunks are then committed and whose later chunks are ignored.
"""
from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass, field, replace
from typing import Any

from streams import topics
from streams.blobs import BlobStore
from streams.metrics import DECODE_CHUNK_SECONDS
from streams.settings import Settings
from streams.stage import InvalidEvent, Stage, StageContext

from .families.base import ChunkDecoder
from .models import ModelCatalogue
from .segments import HlsPlaylist, encode_init_and_segment, join_segments

FINISHED_REMEMBERED = 10_000
PLAYLIST = "playlist.m3u8"
INIT_SEGMENT = "init.mp4"


def segment_name(index: int) -> str:
    return f"segment-{index:05d}.m4s"


def check_chunk(chunk: dict) -> None:
    if chunk["chunk_count"] < 1 or not 0 <= chunk["chunk_index"] < chunk["chunk_count"]:
        raise InvalidEvent(f"chunk {chunk['chunk_index']} of {chunk['chunk_count']} is out of range")
    if chunk["latent_frames"] < 1 or chunk["latent_frame_start"] < 0:
        raise InvalidEvent("chunk has no latent frames or a negative start")


@dataclass
class JobStream:
    """One job being decoded: its causal cache, what has been written, and chunks that came early."""

    state: Any  # the family decoder's state of this job (gpu_agents/streaming_vae.py for causal VAEs)
    chunk_count: int
    next_index: int = 0
    early: dict[int, dict] = field(default_factory=dict)
    init_ref: dict | None = None
    init: bytes = b""
    segments: list[bytes] = field(default_factory=list)
    playlist: HlsPlaylist = field(default_factory=HlsPlaylist)


class VaeDecoder:
    def __init__(self, settings: Settings, blobs: BlobStore):
        self.models = ModelCatalogue(settings.model_dirs)
        self.jobs: dict[str, JobStream] = {}
        self.finished: dict[str, None] = {}  # recently completed or failed jobs, oldest first
        self.decoder_id = f"{socket.gethostname()}-{os.getpid()}"

    def decoder(self, model_id: str) -> ChunkDecoder:
        return self.models.chunk_decoder(model_id)

    def handle(self, event: dict, ctx: StageContext) -> None:
        if ctx.source.topic != topics.LATENT_CHUNKS.name:
            self.end_early(event["job_id"], ctx)
            return
        self.decode_chunks(event, ctx)

    def end_early(self, job_id: str, ctx: StageContext) -> None:
        """The job was cancelled or failed. A model that streams while generating may have sent some of its chunks:
        their segments stay playable, the rest never comes, so the held inputs are committed and later copies of
        its chunks ignored."""
        if self.jobs.pop(job_id, None) is not None:
            ctx.release(job_id)
        self._remember_finished(job_id)

    def decode_chunks(self, chunk: dict, ctx: StageContext) -> None:
        check_chunk(chunk)
        job_id = chunk["job_id"]
        job = self.jobs.get(job_id)
        if job is None:
            if job_id in self.finished:
                return  # a late chunk of a job this decoder completed or gave up on (after a restart: the ledger)
            # HLS forbids a growing target duration: fix it from the longest segment a chunk can make (the
            # first latent frame yields 1 video frame, every later one temporal_multiple, e.g. 4 for Wan).
            frames_per_latent = self.models.facts(chunk["params"]["model"]).rules.temporal_multiple
            longest_s = frames_per_latent * chunk["latent_frames"] / chunk["params"]["fps"]
            state = self.decoder(chunk["params"]["model"]).new_state(chunk["params"]["num_frames"])
            job = self.jobs[job_id] = JobStream(state, chunk["chunk_count"],
                                                playlist=HlsPlaylist(INIT_SEGMENT, longest_s))
        if chunk["chunk_count"] != job.chunk_count:
            raise InvalidEvent(f"chunk says {chunk['chunk_count']} chunks, the job's first said {job.chunk_count}")
        if chunk["chunk_index"] >= job.next_index:
            job.early.setdefault(chunk["chunk_index"], chunk)  # a duplicate of a decoded chunk just waits
        # decode_next changes the job only once its chunk has succeeded: if it raises, the chunk stays waiting and
        # the runtime's retry of this input decodes it again from the same causal state.
        while job.next_index in job.early:
            self.decode_next(job, job.early[job.next_index], ctx)
            del job.early[job.next_index]
            job.next_index += 1
        if job.next_index == job.chunk_count:
            ctx.release(job_id)
            del self.jobs[job_id]
            self._remember_finished(job_id)
        else:
            ctx.hold(job_id)

    def decode_next(self, job: JobStream, chunk: dict, ctx: StageContext) -> None:
        """Decode the job's next chunk into a segment, store it with the playlist, and announce it. ``job`` takes
        the new state, segment and playlist only once all of that has succeeded."""
        job_id, params, index = chunk["job_id"], chunk["params"], chunk["chunk_index"]
        state = replace(job.state)  # decode_chunk gives the copy a new cache list: job.state stays as it was
        first_frame = state.frames_decoded
        with DECODE_CHUNK_SECONDS.labels(params["model"]).time():
            decoder = self.decoder(params["model"])
            frames = decoder.decode_chunk(state, ctx.blobs.get_tensor(chunk["latent"]))
            waveform, sample_rate = self.audio_of(chunk, decoder, ctx)
            init, media = encode_init_and_segment(frames, params["fps"], first_frame, audio=waveform,
                                                  sample_rate=sample_rate)
        if job.init_ref is None:
            init_ref = ctx.blobs.put(init, job_id, INIT_SEGMENT, dtype="video/mp4")
        else:
            init, init_ref = job.init, job.init_ref
        segment_ref = ctx.blobs.put(media, job_id, segment_name(index), dtype="video/iso.segment")
        segments = [*job.segments, media]
        playlist = copy.deepcopy(job.playlist)
        playlist.add_segment(segment_name(index), len(frames) / params["fps"])
        is_last = index == job.chunk_count - 1
        playlist_ref = ctx.blobs.put(playlist.render(complete=is_last).encode(), job_id, PLAYLIST,
                                     dtype="application/vnd.apple.mpegurl")
        video_ref = None
        if is_last:
            video_ref = ctx.blobs.put(join_segments(init, segments), job_id, "video.mp4", dtype="video/mp4")
        ctx.emit(topics.DECODED, ctx.event(
            job_id, "segment", index,
            tenant=chunk["tenant"], segment_index=index, is_last=is_last, segment=segment_ref,
            frame_start=first_frame, frames=len(frames), video=video_ref, params=params,
            init_segment=init_ref, playlist=playlist_ref, decoder_id=self.decoder_id,
            prompt_sha256=chunk.get("prompt_sha256", ""), requested_at=chunk.get("requested_at"),
        ))
        job.state, job.init, job.init_ref, job.segments, job.playlist = state, init, init_ref, segments, playlist

    def audio_of(self, chunk: dict, decoder: ChunkDecoder, ctx: StageContext) -> tuple[object, int | None]:
        """(waveform, sample rate) of a chunk that carries the job's audio latents (a model that makes sound), else
        (None, None). The audio spans the whole video, so it comes with a job of one chunk (non-causal decode)."""
        if chunk.get("audio_latents") is None:
            return None, None
        if chunk["chunk_count"] != 1 or not hasattr(decoder, "decode_audio"):
            raise InvalidEvent(f"audio latents on chunk {chunk['chunk_index']} of {chunk['chunk_count']} of a "
                               f"{chunk['params']['model']} job: audio comes with a one-chunk job of a model that "
                               f"makes sound")
        return decoder.decode_audio(ctx.blobs.get_tensor(chunk["audio_latents"]))

    def forget(self, job_ids: list[str]) -> None:
        """A rebalance moved these jobs' partitions away: their new owner replays them from chunk 0."""
        for job_id in job_ids:
            self.jobs.pop(job_id, None)

    def abandon(self, job_id: str) -> None:
        """The runtime failed this job (a chunk kept failing): drop it, and ignore its chunks still to come."""
        self.jobs.pop(job_id, None)
        self._remember_finished(job_id)

    def _remember_finished(self, job_id: str) -> None:
        self.finished[job_id] = None
        if len(self.finished) > FINISHED_REMEMBERED:
            self.finished.pop(next(iter(self.finished)))


STAGE = Stage(
    name="vae-decoder",
    # The end of a job that stopped early (cancelled, failed), so a partly streamed job does not hold its partition.
    consumes=(topics.LATENT_CHUNKS, topics.CANCELLED, topics.FAILED),
    emits=(topics.DECODED,),
    build=VaeDecoder,
    doc=__doc__,
)
