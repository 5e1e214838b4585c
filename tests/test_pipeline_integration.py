"""One platform, for real: the embedded Tansu broker, the schema registry and every stage as separate processes,
with every blob in an S3 bucket (moto's S3 server, bench/s3server.py).

Three jobs on three tiers go through while garbage and an invalid request sit on vidgen.requested between them.
Everything is checked by reading the topics back: the order of each job's events, one StepProgress per step,
the chunks, the trace context, a playable MP4 of the requested size, the final latent against diffusers' own
WanPipeline, the dead letters, and that no stage died.
"""
from __future__ import annotations

import io
import time
from collections import defaultdict

import pytest
import torch
from confluent_kafka import Producer
from PIL import Image

from consumers.progress import LIFECYCLE, read_events
from bench.families import input_png
from gpu_agents.encoding import encode_prompts
from gpu_agents.models import ModelCatalogue
from gpu_agents.video import join_latent_chunks, probe_mp4, read_mp4
from producers.requests import VideoRequests, video_request
from bench.s3server import s3_server
from streams import topics
from streams.blobs import open_blob_store
from streams.kafka import producer_config
from streams.supervisor import PlatformProcesses
from streams.tracing import trace_id_of

pytestmark = pytest.mark.integration

JOBS = [
    dict(prompt="a red fox in the snow", tier="premium", steps=4, num_frames=9, width=64, height=48,
         guidance_scale=5.0, seed=11),
    dict(prompt="waves on a beach at dusk", tier="standard", steps=5, num_frames=5, width=32, height=32,
         guidance_scale=1.0, seed=12),
    dict(prompt="a paper boat on a river", tier="free", steps=3, num_frames=9, width=48, height=32,
         guidance_scale=3.0, seed=13),
    # The other Wan variants (gpu_agents/families/wan.py): two experts with their own guidance, TI2V-5B's 48-channel
    # VAE from a text prompt and from an image, and the image-to-video A14B layout.
    dict(prompt="a kite over the dunes", tier="standard", steps=4, num_frames=9, width=32, height=32,
         guidance_scale=5.0, guidance_scale_2=3.0, seed=14, model="tiny-wan2.2-a14b"),
    dict(prompt="rain on a window", tier="premium", steps=3, num_frames=5, width=64, height=32,
         guidance_scale=4.0, seed=15, model="tiny-wan2.2-ti2v-5b"),
    dict(prompt="the picture comes alive", tier="standard", steps=3, num_frames=9, width=64, height=32,
         guidance_scale=4.0, seed=16, model="tiny-wan2.2-ti2v-5b", image=input_png()),
    dict(prompt="the picture comes alive", tier="free", steps=3, num_frames=5, width=32, height=48,
         guidance_scale=4.0, seed=17, model="tiny-wan2.2-i2v-a14b", image=input_png()),
    # Helios: streams while generating, two chunks (33 frames each), each sent when final.
    dict(prompt="a comet over a lake", tier="standard", steps=2, num_frames=37, width=32, height=32,
         guidance_scale=4.0, seed=19, model="tiny-helios"),
    # LTX-2: video and audio together, decoded in one piece.
    dict(prompt="a drummer on a rooftop", tier="premium", steps=3, num_frames=9, width=64, height=32,
         guidance_scale=4.0, seed=18, model="tiny-ltx2"),
]
STREAMING_JOB = len(JOBS) - 2
AUDIO_JOB = len(JOBS) - 1
GARBAGE = [b"this is not avro", b"\x00\x00\x00\x00\x63\x01\x02", b"\x00\xff\xff\xff\xff"]
BLOCKED = dict(prompt="Abr4ham L1ncoln giving a speech", tier="premium", steps=2, num_frames=5, width=32, height=32,
               guidance_scale=1.0, seed=2)  # a protected person, spelled to dodge a plain word match
INVALID = dict(prompt="ten frames cannot be", tier="standard", steps=2, num_frames=10, width=32, height=32,
               guidance_scale=1.0, seed=1)
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as env:
        yield env


@pytest.fixture(scope="module")
def run(tmp_path_factory, s3_env):
    var_dir = tmp_path_factory.mktemp("var")
    platform = PlatformProcesses(var_dir, env={
        "VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000",  # Tansu holds joins for half of it
        "VIDGEN_LATENT_CHUNK_FRAMES": "1",
        **s3_env,  # every blob in an S3 bucket: the platform as a fleet runs it
    })
    settings = platform.start()
    try:
        requests = VideoRequests(settings)
        raw = Producer(producer_config(settings, "test-garbage"))
        job_ids = []
        invalid_id = requests.submit(**INVALID)
        blocked_id = requests.submit(**BLOCKED)
        for i, job in enumerate(JOBS):
            if i < len(GARBAGE):
                raw.produce(topics.REQUESTED.name, key=f"garbage-{i}".encode(), value=GARBAGE[i])
                raw.flush(10)
            job_ids.append(requests.submit(**job))
        # An upstream retry: the same job submitted again must not be generated or published twice.
        requests.publish(video_request(job_id=job_ids[0], model=settings.default_model, **JOBS[0]))
        requests.close()
        raw.close()

        events: dict[str, list] = defaultdict(list)
        dead_letters = []
        deadline = time.monotonic() + TIMEOUT_S
        for job_event in read_events(settings, lifecycle=(*LIFECYCLE, topics.DEAD_LETTER)):
            if job_event is not None:
                if job_event.topic == topics.DEAD_LETTER.name:
                    dead_letters.append(job_event.event)
                else:
                    events[job_event.event["job_id"]].append(job_event)
            published = sum(any(e.topic == topics.PUBLISHED.name for e in events[j]) for j in job_ids)
            invalid_done = any(e.topic == topics.FAILED.name for e in events[invalid_id])
            blocked_done = any(e.topic == topics.FLAGGED.name for e in events[blocked_id])
            if (published == len(job_ids) and invalid_done and blocked_done
                    and len(dead_letters) >= len(GARBAGE) + 1):
                time.sleep(1.0)  # a moment for anything that should not come (a duplicate publication)
                break
            if time.monotonic() > deadline:
                pytest.fail(f"timed out: {published}/{len(job_ids)} published, {len(dead_letters)} dead letters; "
                            f"logs in {platform.log_dir}")
        # Catch late duplicates: read everything once more, from the start.
        events, dead_letters = defaultdict(list), []
        quiet_until = time.monotonic() + 2.0
        for job_event in read_events(settings, lifecycle=(*LIFECYCLE, topics.DEAD_LETTER)):
            if job_event is None:
                if time.monotonic() > quiet_until:
                    break
                continue
            quiet_until = time.monotonic() + 2.0
            if job_event.topic == topics.DEAD_LETTER.name:
                dead_letters.append(job_event.event)
            else:
                events[job_event.event["job_id"]].append(job_event)
        platform.check_alive()
        yield dict(settings=settings, job_ids=job_ids, invalid_id=invalid_id, blocked_id=blocked_id, events=events,
                   dead_letters=dead_letters, platform=platform)
    finally:
        codes = platform.stop()
        print("exit codes", codes)


def _by_topic(job_events):
    grouped = defaultdict(list)
    for job_event in job_events:
        grouped[job_event.topic].append(job_event)
    return grouped


@pytest.mark.parametrize("index", range(len(JOBS)))
def test_job_goes_through_every_stage_in_order(run, index):
    job, job_id = JOBS[index], run["job_ids"][index]
    grouped = _by_topic(run["events"][job_id])
    encoded_topic = topics.encoded_topic(job["tier"]).name
    for other in topics.ENCODED.values():
        if other.name != encoded_topic:
            assert not grouped[other.name], f"job of tier {job['tier']} went to {other.name}"

    assert len(grouped[topics.REQUESTED.name]) == (2 if index == 0 else 1)  # job 0 was submitted twice
    assert len(grouped[encoded_topic]) == 1, "a repeated request is encoded once"
    # A model that streams while generating takes `steps` per chunk: its steps span all chunks.
    catalogue, model = ModelCatalogue(), job.get("model", "tiny-wan")
    streaming_chunks, total = catalogue.denoiser(model).chunk_plan(job["width"], job["height"], job["num_frames"],
                                                                   job["steps"])
    steps = [e.event["step"] for e in grouped[topics.STEP_PROGRESS.name]]
    assert steps == list(range(1, total + 1)), "one StepProgress per step, in order"
    assert {e.event["total_steps"] for e in grouped[topics.STEP_PROGRESS.name]} == {total}

    # 1 latent frame per chunk here where the family decodes causally chunk by chunk; a streaming family's own
    # chunks; else the whole latent.
    per_latent = catalogue.facts(model).rules.temporal_multiple
    latent_frames = (job["num_frames"] - 1) // per_latent + 1
    count = streaming_chunks or (latent_frames if catalogue.chunk_frames(model, 1) else 1)
    chunks = [e.event for e in grouped[topics.LATENT_CHUNKS.name]]
    assert [c["chunk_index"] for c in chunks] == list(range(count))
    assert all(c["chunk_count"] == count for c in chunks)
    segments = [e.event for e in grouped[topics.DECODED.name]]
    assert [d["segment_index"] for d in segments] == list(range(count)), "a segment per chunk, in order"
    assert [d["is_last"] for d in segments] == [False] * (count - 1) + [True]
    assert [d["frame_start"] for d in segments] == [sum(d["frames"] for d in segments[:i]) for i in range(count)]
    assert sum(d["frames"] for d in segments) == job["num_frames"]
    assert segments[-1]["video"] is not None and all(d["video"] is None for d in segments[:-1])
    assert len(grouped[topics.PUBLISHED.name]) == 1, "published exactly once"
    # A detector may annotate a job for review (random-weight models make noise); nothing may end it.
    flags = [e.event for e in grouped[topics.FLAGGED.name]]
    assert not grouped[topics.FAILED.name] and all(f["ends_job"] is False and f["decision"] == "REVIEW"
                                                   for f in flags), flags

    # Causal order across stages: each stage's event was created after the one it came from.
    chain = [grouped[topics.REQUESTED.name][0], grouped[encoded_topic][0], grouped[topics.STEP_PROGRESS.name][0],
             grouped[topics.STEP_PROGRESS.name][-1],
             max(grouped[topics.LATENT_CHUNKS.name], key=lambda e: e.event["chunk_index"]),
             grouped[topics.DECODED.name][-1], grouped[topics.PUBLISHED.name][0]]
    stamps = [e.event["timestamp"] for e in chain]
    assert stamps == sorted(stamps)

    # One trace follows the job from the request to the publication.
    trace_ids = {trace_id_of(e.headers) for e in chain}
    assert len(trace_ids) == 1 and None not in trace_ids


@pytest.mark.parametrize("index", range(len(JOBS)))
def test_published_mp4_decodes_to_the_requested_video(run, index):
    job, job_id = JOBS[index], run["job_ids"][index]
    published = _by_topic(run["events"][job_id])[topics.PUBLISHED.name][0].event
    blobs = open_blob_store(run["settings"])
    frames = read_mp4(blobs.get(published["video"]))
    assert frames.shape == (job["num_frames"], job["height"], job["width"], 3)
    assert (published["frames"], published["width"], published["height"]) == (
        job["num_frames"], job["width"], job["height"])


def test_a_model_that_streams_while_generating_sends_each_chunk_before_the_next_is_denoised(run):
    job, job_id = JOBS[STREAMING_JOB], run["job_ids"][STREAMING_JOB]
    grouped = _by_topic(run["events"][job_id])
    steps = [e.event for e in grouped[topics.STEP_PROGRESS.name]]
    chunk_count, total = ModelCatalogue().denoiser(job["model"]).chunk_plan(job["width"], job["height"],
                                                                             job["num_frames"], job["steps"])
    assert chunk_count >= 2 and [s["step"] for s in steps] == list(range(1, total + 1))
    assert [(s["chunk_index"], s["chunk_count"]) for s in steps] == [
        (i // job["steps"], chunk_count) for i in range(total)], "each step says its chunk"
    first_chunk = min(e.event["timestamp"] for e in grouped[topics.LATENT_CHUNKS.name] if e.event["chunk_index"] == 0)
    # Chunk 0 left when its own last step was done, before chunk 1's first step (how soon its segment plays while
    # later chunks are denoised is timing: `vidgen bench streamgen` measures it).
    assert first_chunk <= steps[job["steps"]]["timestamp"]


def test_a_model_that_makes_sound_publishes_a_video_with_its_audio_track(run):
    """LTX-2's audio through the decoder, the segments and compliance: an AAC track as long as the video."""
    job, job_id = JOBS[AUDIO_JOB], run["job_ids"][AUDIO_JOB]
    grouped = _by_topic(run["events"][job_id])
    [chunk] = [e.event for e in grouped[topics.LATENT_CHUNKS.name]]
    assert chunk["audio_latents"] is not None
    published = grouped[topics.PUBLISHED.name][0].event
    blobs = open_blob_store(run["settings"])
    for output in (published["video"], *(rendition["media"] for rendition in published["renditions"])):
        audio = probe_mp4(blobs.get(output))["audio"]
        assert audio["codec"] == "aac" and audio["channels"] == 2
        assert abs(audio["duration_s"] - job["num_frames"] / 8) <= 1 / 8, audio  # fps 8: VideoRequests' default
    segment = blobs.get(grouped[topics.DECODED.name][0].event["segment"])
    init = blobs.get(grouped[topics.DECODED.name][0].event["init_segment"])
    assert probe_mp4(init + segment)["audio"]["codec"] == "aac"


@pytest.mark.parametrize("index", [0, 1, 3, 4, 5, 6])
def test_final_latent_equals_the_diffusers_pipeline(run, index):
    """Each family variant's latent, made by the platform, against diffusers' own pipeline for that model."""
    job, job_id = JOBS[index], run["job_ids"][index]
    blobs = open_blob_store(run["settings"])
    chunks = sorted((e.event for e in _by_topic(run["events"][job_id])[topics.LATENT_CHUNKS.name]),
                    key=lambda c: c["chunk_index"])
    latent = join_latent_chunks([blobs.get_tensor(c["latent"]) for c in chunks])

    catalogue, model = ModelCatalogue(), job.get("model", "tiny-wan")
    image = {"image": Image.open(io.BytesIO(job["image"]))} if "image" in job else {}
    expert_2 = {"guidance_scale_2": job["guidance_scale_2"]} if "guidance_scale_2" in job else {}
    with torch.inference_mode():
        # Embeddings passed in: WanImageToVideoPipeline's own prompt cleaning needs ftfy, which is not installed.
        embeds = encode_prompts(catalogue.text_encoder(model), [job["prompt"], ""])
        reference = catalogue.pipeline(model, image=bool(image))(
            prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], height=job["height"], width=job["width"],
            num_frames=job["num_frames"], num_inference_steps=job["steps"], guidance_scale=job["guidance_scale"],
            generator=torch.Generator().manual_seed(job["seed"]), output_type="latent", **image, **expert_2,
        ).frames
    torch.testing.assert_close(latent, reference, rtol=0, atol=1e-5)


def test_garbage_goes_to_the_dead_letter_topic_with_its_reason(run):
    letters = {bytes(d["raw_value"]): d for d in run["dead_letters"] if d["error_type"] == "DECODE"}
    for i, garbage in enumerate(GARBAGE):
        letter = letters[garbage]
        assert letter["source_topic"] == topics.REQUESTED.name
        assert letter["stage"] == "prompt-encoder"
        assert bytes(letter["raw_key"]) == f"garbage-{i}".encode()
        assert letter["source_offset"] >= 0 and letter["error"]


def test_invalid_request_is_dead_lettered_and_its_job_fails_with_the_reason(run):
    letters = [d for d in run["dead_letters"] if d["job_id"] == run["invalid_id"]]
    assert len(letters) == 1 and letters[0]["error_type"] == "INVALID"
    assert "4k+1" in letters[0]["error"] or "frames" in letters[0]["error"]
    grouped = _by_topic(run["events"][run["invalid_id"]])
    assert len(grouped[topics.FAILED.name]) == 1
    assert grouped[topics.FAILED.name][0].event["stage"] == "prompt-encoder"
    assert not any(grouped[t.name] for t in topics.ENCODED.values())


def test_blocked_prompt_is_flagged_with_its_reason_and_never_encoded(run):
    job_events = run["events"][run["blocked_id"]]
    assert [e.topic for e in job_events] == [topics.REQUESTED.name, topics.FLAGGED.name]
    flagged = job_events[1].event
    assert (flagged["stage"], flagged["decision"], flagged["ends_job"]) == ("PRE_GEN", "BLOCK", True)
    assert flagged["reasons"] == ["REAL_PERSON"]
    assert "lincoln" in flagged["evidence"].lower() and flagged["policy_version"]


def test_once_jobs_end_the_lifecycle_removes_their_intermediates_and_the_audit_stays_green(run):
    """The lifecycle stage, started now with no window: every ended job's checkpoints, latents and unsigned
    segments go (each deletion announced on vidgen.blob-lifecycle first), the published sets stay byte for byte,
    and the audit of the whole log counts the deleted blobs as expired, not missing."""
    from consumers.audit import BlobChecker, kafka_events, replay
    from consumers.lifecycle import INTERMEDIATE_CLASSES, classify

    platform, settings = run["platform"], run["settings"]
    store = open_blob_store(settings)
    assert store.url.startswith("s3://")
    job_ids = run["job_ids"]
    before = {job_id: [classify(s.key) for s in store.list(f"{job_id}/")] for job_id in job_ids}
    assert all(INTERMEDIATE_CLASSES & set(classes) for classes in before.values()), before

    platform.add_stage("lifecycle", env={"VIDGEN_LIFECYCLE_INTERMEDIATE_S": "0"})
    announced: dict[str, set[str]] = defaultdict(set)
    deadline = time.monotonic() + 60
    for job_event in read_events(settings, lifecycle=(topics.BLOB_LIFECYCLE,)):
        if job_event is not None:
            announced[job_event.event["job_id"]] |= {b["key"] for b in job_event.event["blobs"]}
        if set(job_ids) <= set(announced) and not any(
                classify(s.key) in INTERMEDIATE_CLASSES for j in job_ids for s in store.list(f"{j}/")):
            break
        assert time.monotonic() < deadline, f"lifecycle not done: {sorted(announced)}; logs in {platform.log_dir}"

    for index, job_id in enumerate(job_ids):
        left = {classify(s.key) for s in store.list(f"{job_id}/")}
        assert left <= {"published", "input"}, (job_id, left)  # a published job keeps its input: a C2PA ingredient
        assert ("input" in left) == ("image" in JOBS[index])
        assert all(classify(key) in INTERMEDIATE_CLASSES | {"input"} for key in announced[job_id])
        published = _by_topic(run["events"][job_id])[topics.PUBLISHED.name][0].event
        for ref in (published["video"], published["manifest"], published["playlist"],
                    *(r["media"] for r in published["renditions"])):
            store.get(ref)  # sha256 checked
    report = replay(list(kafka_events(settings)), BlobChecker(store))
    assert report.ok, report.summary()
    assert report.report["summary"]["blobs"]["expired"] > 0  # the latents and segments the events name


def test_stages_survive_bad_input_and_stop_cleanly(run):
    run["platform"].check_alive()
    codes = run["platform"].stop()
    assert all(code == 0 for code in codes.values()), codes
