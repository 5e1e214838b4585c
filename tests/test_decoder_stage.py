"""The vae-decoder's handler as a plain function: order, duplicates, interleaved jobs, holds."""
import numpy as np
import torch

from gpu_agents.decoder import VaeDecoder
from gpu_agents.models import ModelCatalogue
from gpu_agents.video import decode_latents, read_mp4, split_latent_chunks
from streams.blobs import LocalBlobStore
from streams.events import new_event
from streams.settings import load_settings
from streams.stage import SourceMessage, StageContext

PARAMS = {"width": 64, "height": 64, "num_frames": 9, "fps": 8, "steps": 2, "guidance_scale": 1.0, "seed": 0,
          "model": "tiny-wan", "preset": "quality", "input_reference": None, "guidance_scale_2": None}


def _chunks(blobs, job_id, seed):
    latent = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    chunks = []
    for i, part in enumerate(split_latent_chunks(latent, 1)):
        ref = blobs.put_tensor(part, job_id, f"latent-{i}.safetensors")
        chunks.append(new_event(job_id, f"{job_id}-chunk-{i}", tenant="t", chunk_index=i, chunk_count=3,
                                latent_frame_start=i, latent_frames=1, latent=ref, params=PARAMS, attempt=1))
    return latent, chunks


def _feed(decoder, blobs, chunk, emitted, topic="vidgen.latent-chunks"):
    ctx = StageContext("vae-decoder", SourceMessage(topic, 0, 0, chunk["job_id"]), blobs,
                       lambda topic, event, key, headers: emitted.append(event))
    decoder.handle(chunk, ctx)
    return ctx


def test_a_job_that_ends_early_lets_go_of_its_chunks_and_keeps_its_segments(tmp_path):
    """A model streaming while generating sent two chunks of three, then the job was cancelled: the two segments
    stay, the held inputs are committed, and a late copy of a chunk decodes nothing."""
    blobs = LocalBlobStore(tmp_path)
    decoder = VaeDecoder(load_settings({"VIDGEN_VAR_DIR": str(tmp_path)}), blobs)
    _, chunks = _chunks(blobs, "job-x", 4)
    emitted = []
    for chunk in chunks[:2]:
        assert _feed(decoder, blobs, chunk, emitted).held == ["job-x"]
    cancelled = new_event("job-x", "job-x-cancelled", reason="user asked", requested_by="t", stage="gpu-agent",
                          stopped_at_step=3)
    ctx = _feed(decoder, blobs, cancelled, emitted, topic="vidgen.cancelled")
    assert ctx.released == ["job-x"] and "job-x" not in decoder.jobs
    assert [e["segment_index"] for e in emitted] == [0, 1] and all(blobs.exists(e["segment"]) for e in emitted)
    assert not _feed(decoder, blobs, chunks[2], emitted).held and len(emitted) == 2


def test_out_of_order_duplicated_and_interleaved_chunks_make_the_right_videos(tmp_path):
    blobs = LocalBlobStore(tmp_path)
    decoder = VaeDecoder(load_settings({"VIDGEN_VAR_DIR": str(tmp_path)}), blobs)
    latent_a, a = _chunks(blobs, "job-a", 1)
    latent_b, b = _chunks(blobs, "job-b", 2)
    emitted = []
    holds = []
    for chunk in (a[1], b[0], a[1], a[0], b[1], a[0], b[2], a[2]):  # early, duplicate, interleaved
        ctx = _feed(decoder, blobs, chunk, emitted)
        holds.append((chunk["job_id"], chunk["chunk_index"], bool(ctx.held), bool(ctx.released)))
    assert holds[-2:] == [("job-b", 2, False, True), ("job-a", 2, False, True)]  # each job's last releases it
    assert all(held for _, _, held, released in holds if not released)  # everything before is held
    vae = ModelCatalogue().vae("tiny-wan")
    for job_id, latent in (("job-a", latent_a), ("job-b", latent_b)):
        segments = [e for e in emitted if e["job_id"] == job_id]
        assert [s["segment_index"] for s in segments] == [0, 1, 2], "each segment once, in order"
        assert segments[-1]["is_last"] and segments[-1]["video"]
        video = read_mp4(blobs.get(segments[-1]["video"]))
        reference = decode_latents(vae, latent)
        assert video.shape == reference.shape == (9, 64, 64, 3)
        assert np.abs(video.astype(int) - reference.astype(int)).mean() < 8  # H.264 at crf 18
    assert not decoder.jobs


def test_a_late_duplicate_after_the_job_is_done_is_ignored(tmp_path):
    blobs = LocalBlobStore(tmp_path)
    decoder = VaeDecoder(load_settings({"VIDGEN_VAR_DIR": str(tmp_path)}), blobs)
    _, chunks = _chunks(blobs, "job-c", 3)
    emitted = []
    for chunk in chunks:
        _feed(decoder, blobs, chunk, emitted)
    count = len(emitted)
    ctx = _feed(decoder, blobs, chunks[1], emitted)
    assert len(emitted) == count and not ctx.held


class FlakyBlobStore(LocalBlobStore):
    """A blob store whose next put of a blob named ``fail_on`` raises once, after the VAE has decoded the chunk."""

    def __init__(self, root, fail_on: str):
        super().__init__(root)
        self.fail_on = fail_on

    def put(self, data, job_id, name, **kwargs):
        if name == self.fail_on:
            self.fail_on = None
            raise OSError(f"disk full writing {name}")
        return super().put(data, job_id, name, **kwargs)


def test_a_chunk_that_fails_once_is_retried_from_the_same_causal_state(tmp_path):
    blobs = FlakyBlobStore(tmp_path, fail_on="segment-00001.m4s")
    decoder = VaeDecoder(load_settings({"VIDGEN_VAR_DIR": str(tmp_path)}), blobs)
    latent, chunks = _chunks(blobs, "job-d", 4)
    emitted = []
    _feed(decoder, blobs, chunks[2], emitted)  # early: waits for chunk 1
    _feed(decoder, blobs, chunks[0], emitted)
    try:
        _feed(decoder, blobs, chunks[1], emitted)
        raise AssertionError("the segment write should have failed")
    except OSError:
        pass
    job = decoder.jobs["job-d"]
    assert (job.next_index, job.state.frames_decoded, len(job.segments)) == (1, 1, 1), "the job is as it was"
    assert sorted(job.early) == [1, 2], "the failed chunk and the early one still wait"
    ctx = _feed(decoder, blobs, chunks[1], emitted)  # the runtime's retry of the same input
    assert ctx.released == ["job-d"]
    assert [(e["segment_index"], e["frame_start"], e["frames"]) for e in emitted] == [(0, 0, 1), (1, 1, 4), (2, 5, 4)]
    video = read_mp4(blobs.get(emitted[-1]["video"]))
    reference = decode_latents(ModelCatalogue().vae("tiny-wan"), latent)
    assert np.abs(video.astype(int) - reference.astype(int)).mean() < 8


def test_an_abandoned_job_is_dropped_and_its_later_chunks_are_ignored(tmp_path):
    blobs = LocalBlobStore(tmp_path)
    decoder = VaeDecoder(load_settings({"VIDGEN_VAR_DIR": str(tmp_path)}), blobs)
    _, chunks = _chunks(blobs, "job-e", 5)
    emitted = []
    assert _feed(decoder, blobs, chunks[0], emitted).held == ["job-e"]
    decoder.abandon("job-e")  # the runtime failed the job (a chunk kept failing)
    assert "job-e" not in decoder.jobs
    ctx = _feed(decoder, blobs, chunks[2], emitted)
    assert not ctx.held and len(emitted) == 1, "a chunk of a failed job is neither held nor decoded"
