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
          "model": "tiny-wan", "preset": "quality"}


def _chunks(blobs, job_id, seed):
    latent = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    chunks = []
    for i, part in enumerate(split_latent_chunks(latent, 1)):
        ref = blobs.put_tensor(part, job_id, f"latent-{i}.safetensors")
        chunks.append(new_event(job_id, f"{job_id}-chunk-{i}", tenant="t", chunk_index=i, chunk_count=3,
                                latent_frame_start=i, latent_frames=1, latent=ref, params=PARAMS, attempt=1))
    return latent, chunks


def _feed(decoder, blobs, chunk, emitted):
    ctx = StageContext("vae-decoder", SourceMessage("vidgen.latent-chunks", 0, 0, chunk["job_id"]), blobs,
                       lambda topic, event, key, headers: emitted.append(event))
    decoder.handle(chunk, ctx)
    return ctx


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
