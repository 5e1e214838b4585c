"""The prompt-encoder handler on its own (no broker): embedding cache, batching, truncation, policy outcomes."""
from dataclasses import replace

import pytest
import torch

from compliance.input_image import read_input_image
from consumers import prompt_encoder as stage_module
from consumers.embedding_cache import EmbeddingCache, cache_key
from consumers.prompt_encoder import PromptEncoder
from gpu_agents.encoding import encode_prompts
from producers.requests import store_input_image, video_request
from streams import topics
from streams.blobs import LocalBlobStore
from streams.settings import load_settings
from streams.stage import InvalidEvent, SourceMessage, StageContext
from tests.samples import I2V_MODEL, face_png, no_face_png

PARAMS = dict(width=64, height=64, num_frames=5, steps=2, seed=1, model="tiny-wan")
PROMPTS = ["a red fox in snow", "a lighthouse at night", "rain on a window", "a paper boat on a pond",
           "a city street in fog", "two cats asleep", "a violin on a chair", "waves on black sand"]


@pytest.fixture
def encoder(tmp_path, monkeypatch):
    settings = load_settings({"VIDGEN_VAR_DIR": str(tmp_path)})
    handler = PromptEncoder(settings, LocalBlobStore(tmp_path / "blobs"))
    passes = []  # batch size of every forward pass the stage makes
    real_encode = stage_module.encode_prompts

    def counting_encode(parts, prompts):
        passes.append(len(prompts))
        return real_encode(parts, prompts)

    monkeypatch.setattr(stage_module, "encode_prompts", counting_encode)
    handler.passes = passes
    return handler


def run(handler: PromptEncoder, request: dict) -> list[tuple[str, dict]]:
    emitted = []
    ctx = StageContext("prompt-encoder", SourceMessage(topics.REQUESTED.name, 0, 0, request["job_id"]),
                       handler.cache.blobs, lambda topic, event, key, headers: emitted.append((topic.name, event)))
    handler.handle(request, ctx)
    return emitted


def encoded_of(emitted):
    [event] = [event for topic, event in emitted if topic.startswith("vidgen.encoded.")]
    return event


def test_repeated_prompt_skips_the_encoder_and_names_the_same_blobs(encoder):
    first = encoded_of(run(encoder, video_request(PROMPTS[0], job_id="job-a", **PARAMS)))
    assert encoder.passes == [2]  # prompt and negative prompt, one pass
    second = encoded_of(run(encoder, video_request(PROMPTS[0], job_id="job-b", **PARAMS)))
    assert encoder.passes == [2]  # no new pass
    assert second["prompt_embeds"] == first["prompt_embeds"]
    assert second["negative_prompt_embeds"] == first["negative_prompt_embeds"]
    assert (first["embeddings_cached"], second["embeddings_cached"]) == (False, True)
    assert (encoder.cache.hits, encoder.cache.misses) == (1, 1)


@pytest.mark.parametrize("change", [
    dict(prompt=PROMPTS[1]),
    dict(negative_prompt="blurry, low quality"),
])
def test_a_different_prompt_or_negative_prompt_is_a_miss(encoder, change):
    run(encoder, video_request(PROMPTS[0], job_id="job-a", **PARAMS))
    request = video_request(change.get("prompt", PROMPTS[0]), job_id="job-b",
                            negative_prompt=change.get("negative_prompt", ""), **PARAMS)
    assert encoded_of(run(encoder, request))["embeddings_cached"] is False
    assert len(encoder.passes) == 2


def test_cache_key_covers_encoder_prompt_negative_and_length():
    base = ("enc@32", "a fox", "blurry", 32)
    variants = [("enc@64", "a fox", "blurry", 32), ("enc@32", "a fox ", "blurry", 32),
                ("enc@32", "a fox", "", 32), ("enc@32", "a fox", "blurry", 64)]
    keys = {cache_key(*base)} | {cache_key(*variant) for variant in variants}
    assert len(keys) == 5
    assert cache_key(*base) == cache_key(*base)


def test_a_cache_entry_whose_blob_is_gone_is_a_miss(encoder, tmp_path):
    first = encoded_of(run(encoder, video_request(PROMPTS[0], job_id="job-a", **PARAMS)))
    blobs = encoder.cache.blobs
    blobs.delete([blobs.key_of(first["prompt_embeds"]["uri"])])
    encoder.cache = EmbeddingCache(encoder.cache.blobs)  # a new process: nothing in memory
    second = encoded_of(run(encoder, video_request(PROMPTS[0], job_id="job-b", **PARAMS)))
    assert second["embeddings_cached"] is False
    assert encoder.cache.blobs.get_tensor(second["prompt_embeds"]).shape == (1, 32, 32)


def test_guidance_off_needs_no_negative_but_a_later_guided_job_gets_one(encoder):
    fast = encoded_of(run(encoder, video_request(PROMPTS[0], job_id="job-a", preset="fast", **PARAMS)))
    assert fast["negative_prompt_embeds"] is None and encoder.passes == [1]
    guided = encoded_of(run(encoder, video_request(PROMPTS[0], job_id="job-b", **PARAMS)))
    assert guided["negative_prompt_embeds"] is not None and encoder.passes == [1, 2]


def test_a_batch_is_one_forward_pass_and_equals_one_at_a_time(encoder):
    requests = [video_request(prompt, job_id=f"job-{i}", **PARAMS) for i, prompt in enumerate(PROMPTS)]
    encoder.prepare(requests)
    # 8 prompts + one shared negative prompt (""), once
    assert encoder.passes == [9]
    text = encoder.models.text_encoder("tiny-wan")
    for request in requests:
        event = encoded_of(run(encoder, request))
        assert event["embeddings_cached"] is False  # made for this very job, in the batch
        alone = encode_prompts(text, [request["prompt"]])
        batched = encoder.cache.blobs.get_tensor(event["prompt_embeds"])
        torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
        assert not torch.equal(batched, torch.zeros_like(batched))
    assert encoder.passes == [9]  # handle() found everything prepared


def test_a_batch_skips_invalid_blocked_and_cached_requests(encoder):
    run(encoder, video_request(PROMPTS[0], job_id="job-cached", **PARAMS))
    bad = video_request(PROMPTS[1], job_id="job-bad", **{**PARAMS, "width": 63})
    blocked = video_request("Abraham Lincoln giving a speech", job_id="job-blocked", **PARAMS)
    fresh = video_request(PROMPTS[2], job_id="job-fresh", **PARAMS)
    again = video_request(PROMPTS[0], job_id="job-again", **PARAMS)
    encoder.prepare([bad, blocked, fresh, again])
    # Only the fresh request is encoded: its prompt and its negative prompt (an entry holds both).
    assert encoder.passes == [2, 2]


def test_a_long_prompt_is_truncated_and_says_so(encoder):
    short = encoded_of(run(encoder, video_request("a fox", job_id="job-a", **PARAMS)))
    long = encoded_of(run(encoder, video_request("a fox " * 40, job_id="job-b", **PARAMS)))
    assert (short["prompt_truncated"], long["prompt_truncated"]) == (False, True)
    assert encoder.cache.blobs.get_tensor(long["prompt_embeds"]).shape == (1, 32, 32)


def test_batch_size_comes_from_settings(tmp_path):
    settings = replace(load_settings({"VIDGEN_VAR_DIR": str(tmp_path), "VIDGEN_ENCODER_BATCH": "32"}))
    assert PromptEncoder(settings, LocalBlobStore(tmp_path / "blobs")).batch_size == 32


def test_blocked_prompt_is_flagged_and_not_encoded(encoder):
    emitted = run(encoder, video_request("Abr4ham L1ncoln giving a speech", job_id="job-x", **PARAMS))
    assert [topic for topic, _ in emitted] == [topics.FLAGGED.name]
    flagged = emitted[0][1]
    assert (flagged["stage"], flagged["decision"], flagged["reasons"], flagged["ends_job"]) == (
        "PRE_GEN", "BLOCK", ["REAL_PERSON"], True)
    assert encoder.passes == []


@pytest.mark.parametrize(("proceeds", "expected_topics"), [
    ("true", [topics.FLAGGED.name, topics.ENCODED["standard"].name]),
    ("false", [topics.FLAGGED.name]),
])
def test_review_proceeds_or_holds_as_configured(tmp_path, proceeds, expected_topics):
    settings = load_settings({"VIDGEN_VAR_DIR": str(tmp_path), "VIDGEN_REVIEW_PROCEEDS": proceeds})
    handler = PromptEncoder(settings, LocalBlobStore(tmp_path / "blobs"))
    emitted = run(handler, video_request("a face swap video of my friend", job_id="job-r", **PARAMS))
    assert [topic for topic, _ in emitted] == expected_topics
    flagged = emitted[0][1]
    assert (flagged["decision"], flagged["reasons"]) == ("REVIEW", ["REAL_PERSON"])
    assert flagged["ends_job"] is (proceeds == "false")


def test_a_valid_consent_for_the_person_lets_the_prompt_through(tmp_path):
    consents = tmp_path / "consents.toml"
    consents.write_text('[consents.C-42]\nperson = "abraham-lincoln"\n')
    settings = load_settings({"VIDGEN_VAR_DIR": str(tmp_path), "VIDGEN_CONSENTS": str(consents)})
    handler = PromptEncoder(settings, LocalBlobStore(tmp_path / "blobs"))
    request = video_request("Abraham Lincoln giving a speech", job_id="job-c", **PARAMS)
    assert [t for t, _ in run(handler, {**request, "consent_ref": "C-42"})] == [topics.ENCODED["standard"].name]
    assert [t for t, _ in run(handler, {**request, "job_id": "job-d", "consent_ref": "C-41"})] == [
        topics.FLAGGED.name]


def image_request(handler: PromptEncoder, job_id: str, image: bytes) -> dict:
    """An image-to-video request whose input image is a blob, as the gateway or `vidgen submit --image` store it."""
    ref = store_input_image(handler.cache.blobs, job_id, read_input_image(image))
    return video_request("the scene comes to life", job_id=job_id, input_reference=ref,
                         **{**PARAMS, "model": I2V_MODEL})


def test_a_face_in_the_input_image_is_flagged_for_review_and_the_image_travels_on(tmp_path):
    settings = load_settings({"VIDGEN_VAR_DIR": str(tmp_path), "VIDGEN_REVIEW_PROCEEDS": "true"})
    handler = PromptEncoder(settings, LocalBlobStore(tmp_path / "blobs"))
    emitted = run(handler, image_request(handler, "job-face", face_png()))
    assert [topic for topic, _ in emitted] == [topics.FLAGGED.name, topics.ENCODED["standard"].name]
    flagged = emitted[0][1]
    assert (flagged["stage"], flagged["decision"], flagged["reasons"]) == ("PRE_GEN", "REVIEW", ["INPUT_FACE"])
    request = image_request(handler, "job-cat", no_face_png())
    [(topic, encoded)] = run(handler, request)
    assert encoded["params"]["input_reference"] == request["params"]["input_reference"]  # for the GPU side


def test_an_input_image_that_is_no_image_makes_the_request_invalid(encoder):
    ref = encoder.cache.blobs.put(b"<html>not an image</html>", "job-bad", "input.png", dtype="image/png")
    request = video_request("the scene comes to life", job_id="job-bad", input_reference=ref,
                            **{**PARAMS, "model": I2V_MODEL})
    with pytest.raises(InvalidEvent, match="input_reference: not a PNG, JPEG or WebP image"):
        run(encoder, request)
    assert encoder.passes == []
