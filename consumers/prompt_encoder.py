"""prompt-encoder: VideoRequested → prompt policy → text encoding → PromptEncoded on the tier's generation topic.

Consumes vidgen.requested. Emits vidgen.encoded.<tier>, or vidgen.flagged (PRE_GEN) when the policy blocks the
prompt or the input image of an image-to-video job (a face in it: INPUT_FACE), or sends it to REVIEW and the
platform holds reviewed prompts (``review_proceeds = false``); a REVIEW that proceeds is flagged as an annotation
(ends_job false) and encoded. Invalid parameters fail the job here, before any GPU time is spent, and so does an
input image that is not an acceptable image. A job id is encoded once: a request repeated with the same job_id is a
duplicate.

Encoding happens once per distinct prompt: embeddings are cached by (encoder, prompt, negative prompt, max length)
(consumers/embedding_cache.py), and when several requests are waiting the stage encodes every uncached prompt of the
batch in one forward pass (``prepare``), which only warms the cache that ``handle`` reads.
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict

from compliance.input_image import InputImage, InputImageError, read_input_image
from compliance.prompt_safety import (PromptDecision, combine_decisions, evaluate_input_image, evaluate_prompt,
                                      load_consents, load_policy)
from gpu_agents.encoding import encode_prompts, token_counts
from gpu_agents.model_facts import MAX_PROMPT_CHARS, InvalidRequestError  # noqa: F401 (MAX_PROMPT_CHARS re-exported)
from gpu_agents.model_facts import check_request as check_request_facts
from gpu_agents.models import (InvalidParamsError, ModelCatalogue, TextEncoderParts, UnknownModelError, check_params,
                               effective_guidance)
from streams import topics
from streams.blobs import BlobStore
from streams.settings import Settings
from streams.stage import InvalidEvent, Stage, StageContext

from .embedding_cache import CachedEmbeddings, EmbeddingCache, cache_key

log = logging.getLogger(__name__)



def check_request(request: dict, models: ModelCatalogue) -> None:
    """Raise InvalidEvent with the reason when the request cannot be generated (gpu_agents/model_facts.py, which the
    gateway runs too)."""
    try:
        check_request_facts(request, models)
    except InvalidRequestError as exc:
        raise InvalidEvent(str(exc)) from exc


def input_image_of(request: dict, blobs: BlobStore) -> InputImage | None:
    """The input image of an image-to-video request, read and checked; None for text-to-video. An image the gateway
    would have refused makes the request invalid (events can come from anywhere, not only through the gateway)."""
    ref = request["params"].get("input_reference")
    if ref is None:
        return None
    try:
        return read_input_image(blobs.get(ref))  # BlobError (missing, altered) is retried, then dead-lettered
    except InputImageError as exc:
        raise InvalidEvent(f"input_reference: {exc}") from exc


class PromptEncoder:
    def __init__(self, settings: Settings, blobs: BlobStore):
        self.models = ModelCatalogue(settings.model_dirs)
        self.policy = load_policy(settings.prompt_policy)
        self.consents = load_consents(settings.consents) if settings.consents else {}
        self.review_proceeds = settings.review_proceeds
        self.batch_size = settings.encoder_batch
        self.cache = EmbeddingCache(blobs, expires_after_s=settings.lifecycle_windows.get("embeddings"))

    # -- the recipe ------------------------------------------------------------------------------------------
    def handle(self, request: dict, ctx: StageContext) -> None:
        job_id, params = request["job_id"], request["params"]
        check_request(request, self.models)
        image = input_image_of(request, ctx.blobs)

        decision = self.judge(request, image)
        if decision.action != "ALLOW":
            ends_job = decision.action == "BLOCK" or not self.review_proceeds
            ctx.emit(topics.FLAGGED, ctx.event(
                job_id, "flagged",
                tenant=request["tenant"], stage="PRE_GEN", decision=decision.action, reasons=decision.reasons,
                scores={}, evidence=decision.evidence, policy_version=decision.policy_version, ends_job=ends_job,
            ))
            if ends_job:
                return

        text = self.models.text_encoder(params["model"])
        embeddings, cached = self.embeddings_for(request, text)
        truncated = token_counts(text, [request["prompt"]])[0] > text.max_sequence_length
        ctx.emit(topics.encoded_topic(request["tier"]), ctx.event(
            job_id, "encoded",
            tenant=request["tenant"],
            tier=request["tier"],
            params=params,
            prompt_sha256=hashlib.sha256(request["prompt"].encode("utf-8")).hexdigest(),
            encoder=text.encoder_id,
            prompt_embeds=embeddings.prompt_embeds,
            negative_prompt_embeds=embeddings.negative_prompt_embeds,
            requested_at=request["timestamp"],
            prompt_truncated=truncated,
            embeddings_cached=cached,
        ))

    def judge(self, request: dict, image: InputImage | None = None) -> PromptDecision:
        # Only the prompt is judged: the negative prompt lists what the video must NOT show. The input image is
        # judged by handle() only: prepare() must stay cheap, and a blocked image only wastes one encoder row there.
        decision = evaluate_prompt(request["prompt"], consent_ref=request.get("consent_ref"), policy=self.policy,
                                   consents=self.consents)
        if image is None:
            return decision
        return combine_decisions(decision, evaluate_input_image(image, policy=self.policy))

    # -- embeddings: cache first, then the encoder -----------------------------------------------------------
    def embeddings_for(self, request: dict, text: TextEncoderParts) -> tuple[CachedEmbeddings, bool]:
        """(embeddings, from an earlier job's prompt?). A miss here means prepare() did not see this request (a
        lone request, a retry): it is encoded on its own, exactly as prepare() would have."""
        key, need_negative = self._cache_key(request, text)
        embeddings = self.cache.get(key, need_negative)
        if embeddings is None:
            self._encode_into_cache([request], text)
            embeddings = self.cache.peek(key, need_negative)
        return embeddings, embeddings.made_for != request["job_id"]

    def prepare(self, requests: list[dict]) -> None:
        """Encode every valid, allowed, uncached prompt of a batch in one forward pass per text encoder."""
        by_encoder: dict[str, tuple[TextEncoderParts, list[dict]]] = {}
        for request in requests:
            try:
                check_request(request, self.models)
            except InvalidEvent:
                continue  # handle() dead-letters it
            if self.judge(request).action == "BLOCK":
                continue
            text = self.models.text_encoder(request["params"]["model"])
            if self.cache.peek(*self._cache_key(request, text)) is None:
                by_encoder.setdefault(text.encoder_id, (text, []))[1].append(request)
        for text, waiting in by_encoder.values():
            self._encode_into_cache(waiting, text)

    def _cache_key(self, request: dict, text: TextEncoderParts) -> tuple[str, bool]:
        need_negative = effective_guidance(request["params"]) > 1.0
        negative = request["negative_prompt"] if need_negative else ""
        return cache_key(text.encoder_id, request["prompt"], negative, text.max_sequence_length), need_negative

    def _encode_into_cache(self, requests: list[dict], text: TextEncoderParts) -> None:
        """One forward pass over the prompts (and the negative prompts guidance needs) of these requests."""
        rows: dict[str, int] = {}  # text → its row of the batch: each distinct string is encoded once
        slots: dict[str, dict[str, int]] = defaultdict(dict)  # cache key → role → row
        made_for: dict[str, str] = {}
        for request in requests:
            key, need_negative = self._cache_key(request, text)
            made_for.setdefault(key, request["job_id"])
            wanted = {"prompt": request["prompt"]}
            if need_negative:
                wanted["negative"] = request["negative_prompt"]
            for role, string in wanted.items():
                slots[key][role] = rows.setdefault(string, len(rows))
        embeddings = encode_prompts(text, list(rows))
        for key, roles in slots.items():
            negative = embeddings[roles["negative"]:roles["negative"] + 1].clone() if "negative" in roles else None
            self.cache.put(key, made_for[key], embeddings[roles["prompt"]:roles["prompt"] + 1].clone(), negative)
        log.debug("encoded %d texts for %d requests in one pass", len(rows), len(requests))


STAGE = Stage(
    name="prompt-encoder",
    consumes=(topics.REQUESTED,),
    emits=(*topics.ENCODED.values(), topics.FLAGGED),
    build=PromptEncoder,
    dedupe_key=lambda request: request["job_id"],
    doc=__doc__,
)
