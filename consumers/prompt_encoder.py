"""prompt-encoder: VideoRequested → prompt safety → text encoding → PromptEncoded on the tier's generation topic.

Consumes vidgen.requested. Emits vidgen.encoded.<tier>, or vidgen.flagged (PRE_GEN) when the prompt is blocked.
Invalid parameters fail the job here, before any GPU time is spent. A job id is encoded once: a request repeated
with the same job_id is a duplicate.
"""
from __future__ import annotations

import hashlib

from compliance.prompt_safety import evaluate_prompt
from gpu_agents.encoding import encode_prompts
from gpu_agents.models import (PRESETS, InvalidParamsError, ModelCatalogue, UnknownModelError, effective_guidance,
                               validate_generation_params)
from streams import topics
from streams.blobs import LocalBlobStore
from streams.settings import Settings
from streams.stage import InvalidEvent, Stage, StageContext

MAX_PROMPT_CHARS = 10_000


def check_request(request: dict, models: ModelCatalogue) -> None:
    """Raise InvalidEvent with the reason when the request cannot be generated."""
    params = request["params"]
    if not request["prompt"].strip():
        raise InvalidEvent("prompt is empty")
    if len(request["prompt"]) > MAX_PROMPT_CHARS:
        raise InvalidEvent(f"prompt has {len(request['prompt'])} characters; the limit is {MAX_PROMPT_CHARS}")
    if not models.known(params["model"]):
        raise InvalidEvent(str(UnknownModelError(params["model"])))
    try:
        validate_generation_params(params["width"], params["height"], params["num_frames"], params["steps"],
                                   params["guidance_scale"])
    except InvalidParamsError as exc:
        raise InvalidEvent(str(exc)) from exc
    if params["fps"] < 1 or params["fps"] > 120:
        raise InvalidEvent(f"fps must be within 1..120, got {params['fps']}")
    if params["preset"] not in PRESETS:
        raise InvalidEvent(f"unknown preset {params['preset']!r}; presets: {', '.join(PRESETS)}")


class PromptEncoder:
    def __init__(self, settings: Settings, blobs: LocalBlobStore):
        self.models = ModelCatalogue(settings.model_dirs)

    def handle(self, request: dict, ctx: StageContext) -> None:
        job_id, params = request["job_id"], request["params"]
        check_request(request, self.models)

        decision = evaluate_prompt(request["prompt"])
        if decision.action == "BLOCK":
            ctx.emit(topics.FLAGGED, ctx.event(
                job_id, "flagged",
                tenant=request["tenant"], stage="PRE_GEN", decision="BLOCK", reasons=decision.reasons,
                scores={}, evidence=decision.evidence, policy_version=decision.policy_version,
            ))
            return

        text = self.models.text_encoder(params["model"])
        # One prompt per forward pass, as diffusers' WanPipeline does, so outputs match it exactly.
        prompt_ref = ctx.blobs.put_tensor(encode_prompts(text, [request["prompt"]]), job_id, "prompt_embeds.safetensors")
        negative_ref = None
        if effective_guidance(params) > 1.0:
            negative = encode_prompts(text, [request["negative_prompt"]])
            negative_ref = ctx.blobs.put_tensor(negative, job_id, "negative_prompt_embeds.safetensors")

        ctx.emit(topics.encoded_topic(request["tier"]), ctx.event(
            job_id, "encoded",
            tenant=request["tenant"],
            tier=request["tier"],
            params=params,
            prompt_sha256=hashlib.sha256(request["prompt"].encode("utf-8")).hexdigest(),
            encoder=text.encoder_id,
            prompt_embeds=prompt_ref,
            negative_prompt_embeds=negative_ref,
            requested_at=request["timestamp"],
        ))


STAGE = Stage(
    name="prompt-encoder",
    consumes=(topics.REQUESTED,),
    emits=(*topics.ENCODED.values(), topics.FLAGGED),
    build=PromptEncoder,
    dedupe_key=lambda request: request["job_id"],
    doc=__doc__,
)
