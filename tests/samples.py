"""One valid example of every event, as a stage would emit it."""
from streams.events import new_event

BLOB = {"uri": "file:///var/vidgen/blobs/j1/latent-0000.safetensors", "sha256": "ab" * 32, "bytes": 4096,
        "shape": [1, 16, 2, 8, 8], "dtype": "float32"}
MP4 = {"uri": "file:///var/vidgen/blobs/j1/video.mp4", "sha256": "cd" * 32, "bytes": 20480, "shape": [],
       "dtype": "video/mp4"}
PARAMS = {"width": 64, "height": 64, "num_frames": 9, "fps": 8, "steps": 20, "guidance_scale": 5.0, "seed": 7,
          "model": "tiny-wan", "preset": "quality", "input_reference": None, "guidance_scale_2": None}


def sample_events() -> dict[str, dict]:
    job = "j1"
    encoded = new_event(job, tenant="acme", tier="PREMIUM", params=PARAMS, prompt_sha256="ef" * 32, encoder="tiny-t5",
                        prompt_embeds=BLOB, negative_prompt_embeds=BLOB, requested_at=1_700_000_000_000,
                        prompt_truncated=True, embeddings_cached=True)
    return {
        "VideoRequested": new_event(job, tenant="acme", prompt="a fox", negative_prompt="blurry", tier="PREMIUM",
                                    params=PARAMS, consent_ref=None, seconds=4.0),
        "PromptEncoded": encoded,
        "StepProgress": new_event(job, step=3, total_steps=20, attempt=2, resumed_from_step=2, step_ms=15.5,
                                  agent_id="host-1", chunk_index=0, chunk_count=4),
        "LatentCheckpointed": new_event(job, step=10, total_steps=20, attempt=1, checkpoint=BLOB, agent_id="host-1"),
        "LatentChunk": new_event(job, tenant="acme", chunk_index=1, chunk_count=2, latent_frame_start=2,
                                 latent_frames=1, latent=BLOB, params=PARAMS, attempt=1, prompt_sha256="ef" * 32,
                                 requested_at=1_700_000_000_000, audio_latents=BLOB),
        "VideoDecoded": new_event(job, tenant="acme", segment_index=0, is_last=True, segment=MP4, frame_start=0,
                                  frames=9, video=MP4, params=PARAMS, init_segment=MP4, playlist=None,
                                  decoder_id="host-2", prompt_sha256="ef" * 32,
                                  requested_at=1_700_000_000_000),
        "VideoFlagged": new_event(job, tenant="acme", stage="PRE_GEN", decision="BLOCK", reasons=["NCII"],
                                  scores={"ncii": 0.93}, evidence="matched: ...", policy_version="1",
                                  ends_job=True),
        "VideoPublished": new_event(job, tenant="acme", video=MP4, frames=9, width=64, height=64, fps=8,
                                    params=PARAMS, renditions=[{"name": "360p", "width": 64, "height": 64,
                                                                "media": MP4, "bitrate": 250_000, "signed": True}],
                                    manifest=MP4, playlist=MP4, thumbnail=MP4, spritesheet=None,
                                    manifest_label="urn:c2pa:1234",
                                    watermark_payload="a1b2c3d4e5f6", watermark_note="", scores={"nsfw": 0.1},
                                    policy_version="detectors-1"),
        "JobCancelled": new_event(job, reason="user asked", requested_by="acme", stage="gpu-agent",
                                  stopped_at_step=4),
        "JobFailed": new_event(job, tenant="acme", stage="gpu-agent", reason="out of memory",
                               error_type="HANDLER", attempts=3),
        "StageStats": new_event("", stage="scheduler", instance="host-3-7", interval_s=10.0,
                                lag=[{"topic": "vidgen.encoded.premium", "partition": 3, "lag": 1}],
                                busy_fraction=0.25, gpu_utilization=None,
                                queue={"waiting": {"premium": 4, "standard": 0, "free": 117}, "running": 96,
                                       "agents": {"BUSY": 96, "IDLE": 0, "DRAINING": 2},
                                       "waiting_gpu_s": {"premium": 520.0, "standard": 0.0, "free": 15210.0},
                                       "arrived_gpu_s": 81234.5}),
        "AgentStatus": new_event("", agent_id="host-1-42-ab12", state="BUSY", epoch=2, step=7, total_steps=20,
                                 tier="FREE", models=["tiny-wan"], device="cpu", devices=2, free_memory_bytes=None,
                                 step_s=0.12,
                                 last_assignment=5, leader_epoch=1, finished_job_id="j0", finished_epoch=1,
                                 finished_outcome="COMPLETED", finished_reason=""),
        "Assignment": new_event(job, agent_id="host-1-42-ab12", kind="ASSIGN", epoch=2, seq=5, leader_epoch=1,
                                job=encoded),
        "SchedulerDecision": new_event(job, kind="REQUEUED", leader_epoch=1, scheduler_id="host-3-7", seq=0,
                                       agent_id="host-1-42-ab12", epoch=2, reason="preempted", job=None,
                                       source_topic="", source_partition=-1, source_offset=-1),
        "VideoDeleted": new_event(job, tenant="acme", requested_by="tenant:acme", reason="no longer wanted"),
        "QueuePosition": new_event(job, tenant="acme", tier="PREMIUM", position=3, waiting=12, eta_s=41.5),
        "QuotaClaim": new_event(job, tenant="acme", action="CLAIM", gateway_id="gateway-1f2e3d", max_in_flight=20,
                                max_per_hour=1000, reason=""),
        "BlobsDeleted": new_event(job, rule="job-ended", window_s=600.0, trigger="vidgen.published/2@17",
                                  store="file:///var/vidgen/blobs",
                                  blobs=[{"key": "j1/checkpoint-00010.safetensors", "blob_class": "checkpoint",
                                          "bytes": 4096, "modified": 1_700_000_000_000}], bytes=4096),
        "DeadLetter": new_event(job, stage="prompt-encoder", source_topic="vidgen.requested", source_partition=2,
                                source_offset=41, error_type="DECODE", error="not Confluent wire format",
                                raw_key=b"j1", raw_value=b"\xff\x00garbage",
                                headers=[{"key": "traceparent", "value": b"00-abc"}]),
    }


def strict_detection_policy(path) -> str:
    """The default policy with every threshold at zero: any video is blocked."""
    from compliance.detectors import DEFAULT_POLICY_PATH

    text = DEFAULT_POLICY_PATH.read_text()
    for key in ("version", "block_threshold", "review_threshold"):
        assert f"\n{key} = " in text, key
    text = (text.replace('version = "', 'version = "strict-', 1).replace("block_threshold = ", "block_threshold = 0.0 #")
            .replace("review_threshold = ", "review_threshold = 0.0 #"))
    path.write_text(text)
    return str(path)

#: A built-in model that takes an input image (gpu_agents/families/): image-to-video tests name it.
I2V_MODEL = "tiny-wan2.2-ti2v-5b"


def image_file(pixels, image_format: str = "PNG", **save_args) -> bytes:
    """An (H, W, 3) uint8 array as the bytes of an image file, e.g. an input image of an image-to-video job."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, image_format, **save_args)
    return out.getvalue()


def no_face_png() -> bytes:
    """scikit-image's cat (shipped with the wheel, no download): an image with no human face."""
    from skimage import data

    return image_file(data.chelsea())


def face_png() -> bytes:
    """scikit-image's astronaut (shipped with the wheel): a frontal human face."""
    from skimage import data

    return image_file(data.astronaut())
