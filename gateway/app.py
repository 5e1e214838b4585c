"""The gateway's HTTP API (aiohttp): jobs in over POST, their state, list, outputs and cancellation out.

Routes (the table ``ROUTES`` below is what the app registers AND what /openapi.json describes):

  POST   /v1/videos                          create a job (OpenAI Videos API body + vidgen fields) → video object
  GET    /v1/videos                          the tenant's jobs, newest first: ?limit=1..100&after=<id>&order=asc|desc
  GET    /v1/videos/{video_id}               one job → video object (OpenAI shape + `vidgen`: the full state)
  POST   /v1/videos/{video_id}/media-token   a short-lived ?token= for its media URLs and websocket (a browser's)
  DELETE /v1/videos/{video_id}               delete it (OpenAI's shape; cancelled first if it has not ended)
  POST   /v1/videos/{video_id}/cancel        cancel it and keep it (asynchronous: a JobCancelled on vidgen.control)
  GET    /v1/videos/{video_id}/content       the final video, or ?variant=<rendition>|manifest|playlist|thumbnail|
                                             spritesheet; Range ok
  GET    /v1/videos/{video_id}/segments/{name}   live fMP4 segments, init.mp4 and playlist.m3u8 while it decodes
  GET    /v1/videos/{video_id}/published/{name}  files of the published set (rendition playlists and media)
         (these three also answer HEAD; ETags, Cache-Control, ranges and presigned redirects: gateway/delivery.py)
  GET    /v1/videos/{video_id}/events        websocket: the job's state, then every change (gateway/events.py)
  GET    /v1/events                          websocket: all of the tenant's jobs (gateway/events.py)
  GET    /v1/models                          the models this gateway serves (OpenAI list shape + `vidgen`: facts)
  GET    /v1/models/{model_id}               one of them; 404 model_not_found for any other id
  GET    /openapi.json, /healthz, /, /static/{filename}   without authentication

Tenancy and limits (gateway/tenants.py, gateway/limits.py):
* ``Authorization: Bearer <key>`` (or, where a browser cannot send a header — websockets, media URLs — ``?token=``
  from ``POST /v1/videos/{id}/media-token``, gateway/media_tokens.py, or ``?api_key=``) names the tenant; no key or
  an unknown key → 401.
* The tier is the tenant's. A request may name a tier at or BELOW its tenant's (a premium tenant may submit a
  cheap free job); a higher one is refused with 403 ``tier_not_allowed`` rather than silently lowered, so a
  client never believes it bought a tier it did not get.
* Rate limit: a token bucket per tenant and gateway process over every authenticated request → 429
  ``rate_limit_exceeded`` with ``Retry-After``.
* Quotas that hold across every gateway process (gateway/quota.py: a claim on ``vidgen.quota``, decided in that
  topic's order by every gateway alike, released when the job ends): jobs of the tenant not yet finished
  ≥ ``max_in_flight`` → 429 ``in_flight_limit``, without Retry-After (a job's end cannot be predicted); jobs created
  in the last hour ≥ ``max_per_hour`` → 429 ``hourly_limit`` with Retry-After. 429 rather than 403/409: the request
  is fine and will succeed later, which is what OpenAI clients' retry logic expects of a 429.
* Blocked prompts: once ``max_blocked_per_hour`` of the tenant's jobs were blocked by the content policy within the
  last hour, new ones → 429 ``blocked_prompt_limit`` with Retry-After (a flood of refused prompts ends at once and
  would otherwise barely count against the in-flight quota).
* ``Idempotency-Key``: the job id is uuid5(tenant, key), so every gateway process maps the same key to the same
  job. The same key with the same request returns the existing job (200, header ``Idempotent-Replayed: true``)
  and publishes nothing; with a different request → 409 ``idempotency_key_reused``. Within a process a record of
  the request's fingerprint decides; across processes the job's state (prompt, tier, parameters) does.
* Another tenant's job answers exactly as an unknown id: 404 ``video_not_found``.

Image-to-video: ``input_reference`` is the input image, as a multipart file part (what the ``openai`` SDK sends) or,
in a JSON body, a base64 data URL (``data:image/png;base64,...``; a URL is never fetched). It must be a PNG, JPEG or
WebP image of at most 10 MiB and 4096×4096 pixels (compliance/input_image.py), else 400 ``invalid_image`` or
``image_too_large`` with param ``input_reference``. The body limit (``MAX_CREATE_BODY_BYTES``) leaves room for the
largest image as a data URL, so the image's own limit, with its clear message, is what refuses a large image. The image
is stored as a blob under the job once the request is accepted, just before the VideoRequested that names it in
``params.input_reference``; clients see it by sha256 and size only, never its blob URI. An Idempotency-Key binds
the image by its sha256 like the prompt: another image with the same key → 409.

Validation reuses the pipeline's own checks (``producers.requests.parse_size`` / ``video_request``,
``gpu_agents.model_facts.check_request``, which the prompt encoder runs too), so the gateway refuses at once with 400
what the prompt encoder would fail later. The models' facts come as a description (gateway/model_description.py):
the gateway never imports torch, diffusers or transformers. Frames from ``seconds``: seconds × fps
rounded to the nearest 4k+1 (at least 1); an explicit ``frames`` wins. Only the catalogue's model ids are accepted
over HTTP (a client may not name a server directory).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import math
import re
import time
import urllib.parse
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from compliance.input_image import MAX_INPUT_IMAGE_BYTES, InputImage, InputImageError, read_input_image
from consumers.job_state import request_fingerprint
from gpu_agents.model_facts import MAX_PROMPT_CHARS, InvalidRequestError, check_request
from producers.requests import DEFAULT_PARAMS, PRESETS, parse_size, store_input_image, video_request
from streams import topics
from streams.blobs import open_blob_store
from streams.metrics import AUTH_FAILURES
from streams.events import new_job_id
from streams.settings import Settings, private_dir

from .delivery import serve_blob
from .errors import ApiError, ClientGone, error_middleware, not_found
from .jobs import BLOCKED_WINDOW_MS
from .limits import RateLimiter, retry_after_header
from .model_description import load_model_description
from .media_tokens import MediaTokens
from .openapi import Route, openapi_document
from .publisher import KafkaPublisher, PublishError
from .quota import FleetQuota, QuotaFollower, QuotaUnavailable
from .server import (SERVER_NAME, GuardedAppRunner, RateLimitedLog, ServeLimits, WebsocketCounts,
                     fit_to_open_file_limit, raise_open_file_limit)
from .tenants import Tenant, TenantStore, install_key_redaction

#: How often the gateway looks whether the tenants file changed (a stat: nothing is read unless it did).
TENANTS_POLL_S = 1.0

log = logging.getLogger(__name__)
#: The gateway's modules share state through string keys (app["jobs"], request["tenant"]: the shared contract
#: between its modules) rather than web.AppKey / web.RequestKey objects; aiohttp's advice about that is noise here.
warnings.filterwarnings("ignore", category=web.NotAppKeyWarning, module=r"gateway\.")

STATIC_DIR = Path(__file__).resolve().parent / "static"
IDEMPOTENCY_NAMESPACE = uuid.UUID("0b9d7c1e-3f57-4c2a-9a51-7d0f3e6b2a44")
MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20
MAX_SEED = 2**63 - 1  # GenerationParams.seed is an Avro long
MAX_NUMBER = 1e6  # the largest float parameter taken at all; the model's own limits come after
CREATE_FIELDS = ("prompt", "model", "size", "seconds", "frames", "fps", "tier", "steps", "seed", "negative_prompt",
                 "preset", "guidance_scale", "guidance_scale_2", "consent_ref", "input_reference")
#: The largest input image as a base64 data URL (4 characters per 3 bytes), plus 1 MiB for the other fields and the
#: multipart framing: a large image is refused by its own limit, with its own message, never by the body limit.
MAX_CREATE_BODY_BYTES = 4 * math.ceil(MAX_INPUT_IMAGE_BYTES / 3) + 1024 * 1024
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._=-]{1,128}$")
_CONTENT_TYPES = {".mp4": "video/mp4", ".m4s": "video/iso.segment", ".m3u8": "application/vnd.apple.mpegurl",
                  ".json": "application/json", ".html": "text/html", ".js": "text/javascript", ".css": "text/css",
                  ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon", ".jpg": "image/jpeg"}


# -- validation: the pipeline's own checks, loaded once (they import torch) --------------------------------------------
@functools.cache
class _CatalogueIds:
    """What check_request needs of a ModelCatalogue (``known``, ``facts``: the model's family, modalities and limits,
    read from config files, never a weight), limited to the gateway's ids: never a filesystem path."""

    def __init__(self, ids, catalogue):
        self.ids, self.catalogue = tuple(ids), catalogue

    def known(self, model_id: str) -> bool:
        return model_id in self.ids

    def model_ids(self) -> list[str]:
        return list(self.ids)

    def facts(self, model_id: str):
        return self.catalogue.facts(model_id)


#: Which request field a check_request / validate_generation_params message is about (its first word).
_MESSAGE_PARAMS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "size", "height": "size",
                   "num_frames": "frames", "steps": "steps", "guidance_scale": "guidance_scale",
                   "guidance_scale_2": "guidance_scale_2", "fps": "fps",
                   "unknown": "preset"}


#: A stand-in for the input image's BlobRef in the event parse_create validates (never published).
_IMAGE_NOT_YET_STORED = {"uri": "", "sha256": "", "bytes": 0, "shape": [], "dtype": ""}


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, "invalid_parameter", message, param=param)


def _integer(body: dict, name: str, form: bool) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if form and isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _invalid(name, f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, f"{name} must be an integer, got {json.dumps(value)}")
    return value


def _number(body: dict, name: str, form: bool) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str) and (form or name == "seconds"):  # OpenAI sends seconds as a string
        try:
            value = float(value.strip())
        except ValueError:
            raise _invalid(name, f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(name, f"{name} must be a finite number, got {json.dumps(value)}")
    if abs(value) > MAX_NUMBER:  # finite but absurd: 1e308 seconds would overflow the frame count
        raise _invalid(name, f"{name} must be at most {MAX_NUMBER:g}, got {value:g}")
    return float(value)


def _string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _invalid(name, f"{name} must be a string, got {json.dumps(value)}")
    return value


def frames_for_seconds(seconds: float, fps: int) -> int:
    """seconds × fps rounded to the nearest 4k+1 frame count (Wan's temporal compression), at least 1."""
    return 4 * max(0, round((seconds * fps - 1) / 4)) + 1


@dataclass
class CreateRequest:
    """A validated POST /v1/videos: what the VideoRequested will carry (apart from job id and timestamp)."""
    prompt: str
    negative_prompt: str
    tier: str
    model: str
    preset: str
    params: dict  # only what the client gave (the preset's and DEFAULT_PARAMS fill the rest)
    consent_ref: str | None
    seconds: float | None = None  # as asked, when the frame count came from seconds

    def event(self, job_id: str, tenant: Tenant, input_reference: dict | None = None) -> dict:
        return video_request(self.prompt, job_id=job_id, tier=self.tier, tenant=tenant.id,
                             negative_prompt=self.negative_prompt, consent_ref=self.consent_ref, model=self.model,
                             preset=self.preset, input_reference=input_reference, seconds=self.seconds,
                             **self.params)


def parse_create(body: dict, tenant: Tenant, *, form: bool, catalogue: _CatalogueIds,
                 default_model: str, aliases: dict[str, str] | None = None) -> CreateRequest:
    """Check a create body field by field; raises ApiError (400, or 403 for a tier above the tenant's)."""
    for name in body:
        if name not in CREATE_FIELDS:
            raise ApiError(400, "unknown_parameter", f"unknown field {name!r}; fields: {', '.join(CREATE_FIELDS)}",
                           param=name)
    prompt = _string(body, "prompt")
    if prompt is None:
        raise ApiError(400, "missing_parameter", "prompt is required", param="prompt")
    negative_prompt = _string(body, "negative_prompt") or ""
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:  # before anything else touches a huge string
            raise _invalid(name, f"{name} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    model = _string(body, "model") or default_model
    model = (aliases or {}).get(model, model)  # an operator's name for it (VIDGEN_MODEL_ALIASES: sora-2=...)
    if not catalogue.known(model):
        also = f"; also: {', '.join(aliases)} (aliases)" if aliases else ""
        raise ApiError(400, "unknown_model", f"unknown model {model!r}; models: {', '.join(catalogue.ids)}{also}",
                       param="model")
    tier = (_string(body, "tier") or tenant.tier).lower()
    if tier not in topics.TIERS:
        raise _invalid("tier", f"unknown tier {tier!r}; tiers: {', '.join(topics.TIERS)}")
    if not tenant.allows_tier(tier):
        raise ApiError(403, "tier_not_allowed", f"tier {tier} is above this tenant's tier ({tenant.tier})",
                       param="tier")
    preset = _string(body, "preset") or "quality"
    if preset not in PRESETS:
        raise _invalid("preset", f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    consent_ref = _string(body, "consent_ref")

    params: dict = {}
    size = _string(body, "size")
    if size is not None:
        try:
            params["width"], params["height"] = parse_size(size)
        except ValueError as exc:
            raise _invalid("size", str(exc)) from None
    fps = _integer(body, "fps", form)
    if fps is not None:
        params["fps"] = fps
    frames, seconds = _integer(body, "frames", form), _number(body, "seconds", form)
    if frames is not None:
        params["num_frames"] = frames
    elif seconds is not None:
        if seconds <= 0:
            raise _invalid("seconds", f"seconds must be positive, got {seconds:g}")
        params["num_frames"] = frames_for_seconds(seconds, fps or DEFAULT_PARAMS["fps"])
    for name in ("steps", "seed"):
        value = _integer(body, name, form)
        if value is not None:
            params[name] = value
    if "seed" in params and not 0 <= params["seed"] <= MAX_SEED:
        raise _invalid("seed", f"seed must be within 0..{MAX_SEED}, got {params['seed']}")
    for name in ("guidance_scale", "guidance_scale_2"):  # _2: a two-expert model's low-noise expert (Wan 2.2 A14B)
        guidance = _number(body, name, form)
        if guidance is not None:
            params[name] = guidance

    request = CreateRequest(prompt, negative_prompt, tier, model, preset, params, consent_ref,
                            seconds if frames is None else None)
    # The image is read after these cheap checks (read_input_reference); here it only counts as present or not,
    # which decides whether the model fits (text-to-video only, image-to-video only, or both).
    image_ref = _IMAGE_NOT_YET_STORED if body.get("input_reference") is not None else None
    try:  # the prompt encoder's own check, on the event it will receive
        check_request(request.event("validation", tenant, input_reference=image_ref), catalogue)
    except InvalidRequestError as exc:
        message = str(exc)
        param = ("input_reference" if "input_reference" in message
                 else _MESSAGE_PARAMS.get(message.split(" ", 1)[0], None))
        if param == "frames" and "num_frames" not in body and frames is None and seconds is not None:
            param = "seconds"
        raise _invalid(param, message.replace("num_frames", "frames")) from None
    return request


async def read_body(request: web.Request) -> tuple[dict, bool]:
    """The body as a dict, and whether it came as a form (whose values are text to convert). The body must arrive
    within the gateway's body deadline (gateway/server.py ServeLimits): a body sent a byte at a time is cut."""
    deadline_s = request.app["limits"].body_timeout_s
    try:
        async with asyncio.timeout(deadline_s):
            return await _read_body(request)
    except TimeoutError:
        raise ApiError(408, "request_timeout", f"the request body did not arrive within {deadline_s:g} s",
                       close=True) from None
    except (ConnectionError, asyncio.IncompleteReadError):
        raise ClientGone() from None
    except Exception as exc:  # noqa: BLE001 - aiohttp's payload errors: the client broke off mid-body
        if type(exc).__name__ in ("ClientPayloadError", "ContentLengthError", "TransferEncodingError"):
            raise ClientGone() from None
        raise


async def _read_body(request: web.Request) -> tuple[dict, bool]:
    ctype = request.content_type
    if ctype == "application/x-www-form-urlencoded":
        # Decoded strictly here (aiohttp's form parser replaces bytes that are not in the charset)
        try:
            text = (await request.read()).decode(request.charset or "utf-8")
            return dict(urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=False,
                                               errors="strict")), True
        except (UnicodeDecodeError, LookupError) as exc:
            raise ApiError(400, "invalid_body", f"the form is not text in charset {request.charset or 'utf-8'}: "
                                                f"{type(exc).__name__}") from None
    if ctype == "multipart/form-data":
        try:
            form = await request.post()
        except (ValueError, LookupError, AssertionError, BadHttpMessage) as exc:  # no boundary, an unknown
            # charset, a torn body, a part with too many or too long headers
            raise ApiError(400, "invalid_body", f"the {ctype} body cannot be read: {str(exc)[:200]}") from None
        body = {}
        for name, value in form.items():
            if not isinstance(value, str):
                if name != "input_reference":
                    raise ApiError(400, "unknown_parameter" if name not in CREATE_FIELDS else "invalid_parameter",
                                   f"field {name!r}: file uploads are not supported", param=name)
                value = value.file.read()  # the image as uploaded; read_input_reference checks it
            body[name] = value
        return body, True
    if ctype not in ("application/json", "application/octet-stream") and not ctype.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"send application/json, multipart/form-data or application/x-www-form-urlencoded, not {ctype}")
    try:
        text = await request.text()
    except (UnicodeDecodeError, LookupError):  # not text in its charset (UTF-8 by default), or an unknown charset
        raise ApiError(400, "invalid_json", f"the body is not text in charset {request.charset or 'utf-8'}") from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the body is nested too deeply to be a request") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return body, False


# -- the input image -----------------------------------------------------------------------------------------------
def input_image_bytes(value) -> bytes:
    """input_reference's bytes: a multipart file part's content as is, or a JSON data URL's base64 payload."""
    if isinstance(value, bytes):
        return value
    usage = "an image file part (multipart/form-data) or a data URL: data:image/png;base64,..."
    if not isinstance(value, str):
        raise _invalid("input_reference", f"input_reference must be {usage}, got {json.dumps(value)[:40]}")
    header, comma, payload = value.partition(",")
    if not (comma and header.lower().startswith("data:") and header.lower().endswith(";base64")):
        raise _invalid("input_reference", f"input_reference must be {usage} (a URL is never fetched)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as exc:
        raise _invalid("input_reference", f"input_reference: the data URL's base64 is invalid ({exc})") from None


async def read_input_reference(value) -> InputImage | None:
    """The request's input image, checked off the event loop (decoding a large image takes a few hundred ms)."""
    if value is None:
        return None
    data = input_image_bytes(value)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, read_input_image, data)
    except InputImageError as exc:
        raise ApiError(400, exc.code, f"input_reference: {exc}", param="input_reference") from None


# -- idempotency -------------------------------------------------------------------------------------------------------
def idempotent_job_id(tenant_id: str, key: str) -> str:
    return uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{tenant_id}\n{key}").hex


def fingerprint_of(event: dict, image: InputImage | None) -> str:
    """What an Idempotency-Key binds (consumers.job_state.request_fingerprint, which the tracker keeps for every
    job), before the input image's blob is written: the image by its sha256 and size, as the event will name it."""
    image_ref = None if image is None else {"uri": "", "sha256": image.sha256, "bytes": len(image.data)}
    return request_fingerprint({**event, "params": {**event["params"], "input_reference": image_ref}})


def _key_reused() -> ApiError:
    return ApiError(409, "idempotency_key_reused", "this Idempotency-Key was used with a different request",
                    param="Idempotency-Key")


#: How long an accepted request with an Idempotency-Key waits to see the job's first request on Kafka: another
#: gateway may have published one under the same key at the same moment, and the first on the log is the job's.
IDEMPOTENCY_CONFIRM_S = 5.0


class IdempotencyRecords:
    """(tenant, key) → (fingerprint, job id, publication future); bounded, oldest dropped first, 24 h at most."""

    def __init__(self, capacity: int = 100_000, ttl_s: float = 24 * 3600):
        self.capacity, self.ttl_s = capacity, ttl_s
        self._records: OrderedDict[tuple[str, str], tuple[str, str, asyncio.Future, float]] = OrderedDict()

    def get(self, tenant_id: str, key: str):
        record = self._records.get((tenant_id, key))
        if record is not None and time.monotonic() - record[3] > self.ttl_s:
            del self._records[(tenant_id, key)]
            return None
        return record

    def put(self, tenant_id: str, key: str, fingerprint: str, job_id: str, future: asyncio.Future) -> None:
        self._records[(tenant_id, key)] = (fingerprint, job_id, future, time.monotonic())
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def drop(self, tenant_id: str, key: str) -> None:
        self._records.pop((tenant_id, key), None)


# -- the video object --------------------------------------------------------------------------------------------------
_OPENAI_STATUS = {"requested": "queued", "queued": "queued", "running": "in_progress", "decoding": "in_progress",
                  "review": "in_progress", "published": "completed", "flagged": "failed", "failed": "failed",
                  "cancelled": "failed"}


def _name_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _gateway_url(uri: str | None, prefix: str) -> str | None:
    if uri is None or uri.startswith("/"):
        return uri  # already a gateway URL (a JobsView may rewrite them itself)
    return f"{prefix}/{_name_of(uri)}"


def _blob_url(ref: dict | None, url: str) -> dict | None:
    if ref is None:
        return None
    return {**{k: v for k, v in ref.items() if k != "uri"}, "url": ref.get("url") or url}


def public_state(state: dict) -> dict:
    """The job state with every stored file as a gateway URL (blob store URIs are internal)."""
    job_id = state["job_id"]
    base = f"/v1/videos/{job_id}"
    out = dict(state)
    out["segments"] = [{**{k: v for k, v in s.items() if k != "uri"}, "url": s.get("url") or _gateway_url(
        s.get("uri"), f"{base}/segments")} for s in state.get("segments") or ()]
    out["init_segment"] = _gateway_url(state.get("init_segment"), f"{base}/segments")
    out["playlist"] = _gateway_url(state.get("playlist"), f"{base}/segments")
    outputs = state.get("outputs")
    if outputs:
        outputs = dict(outputs)
        outputs["video"] = _blob_url(outputs.get("video"), f"{base}/content")
        for variant in ("manifest", "thumbnail", "spritesheet"):
            outputs[variant] = _blob_url(outputs.get(variant), f"{base}/content?variant={variant}")
        if outputs.get("playlist"):
            outputs["playlist"] = _blob_url(outputs["playlist"],
                                            f"{base}/published/{_name_of(outputs['playlist'].get('uri', ''))}")
        outputs["renditions"] = [_blob_url(r, f"{base}/content?variant={r['name']}")
                                 for r in outputs.get("renditions") or ()]
        out["outputs"] = outputs
    return out


def _job_error(state: dict) -> dict | None:
    status = state["status"]
    if status == "flagged":
        reasons = [r for f in state.get("flags") or () if f.get("decision") == "BLOCK" for r in f.get("reasons", ())]
        return {"code": "content_flagged",
                "message": "blocked by content policy" + (f": {'; '.join(reasons)}" if reasons else "")}
    if status == "failed":
        error = state.get("error") or {}
        return {"code": "generation_failed", "message": error.get("reason") or "generation failed"}
    if status == "cancelled":
        error = state.get("error") or {}
        return {"code": "cancelled", "message": "cancelled" + (f": {error['reason']}" if error.get("reason") else "")}
    return None


def video_object(state: dict) -> dict:
    """The OpenAI Videos API video object for a job's public state (consumers.job_state.to_public)."""
    params = state.get("params") or {}
    status = state["status"]
    progress = state.get("progress")
    percent = 100 if status == "published" else 0 if progress is None else min(99, int(progress * 100))
    frames, fps = params.get("num_frames"), params.get("fps")
    created_ms = state.get("requested_at") or state.get("updated_at") or 0
    return {
        "id": state["job_id"],
        "object": "video",
        "model": params.get("model"),
        "status": _OPENAI_STATUS.get(status, "queued"),
        "progress": percent,
        "created_at": created_ms // 1000,
        "completed_at": state["finished_at"] // 1000 if state.get("terminal") and state.get("finished_at") else None,
        "expires_at": None,
        "prompt": state.get("prompt"),
        "size": f"{params['width']}x{params['height']}" if "width" in params else None,
        # As asked (the SDK's "4"), when the client asked in seconds; the exact length in duration_seconds.
        "seconds": (f"{state['seconds_requested']:g}" if state.get("seconds_requested")
                    else f"{frames / fps:g}" if frames and fps else None),
        "duration_seconds": frames / fps if frames and fps else None,
        "remixed_from_video_id": None,
        "error": _job_error(state),
        # Where the job stands in the fleet's queue while it waits (the scheduler's QueuePosition); null otherwise.
        "queue_position": state.get("queue_position"),
        "queue_eta_seconds": state.get("queue_eta_s") if state.get("queue_position") is not None else None,
        "vidgen": public_state(state),
    }


# -- handlers ----------------------------------------------------------------------------------------------------------
def _own_job(request: web.Request) -> dict:
    video_id = request.match_info["video_id"]
    state = request.app["jobs"].get(video_id)
    if state is None or state.get("tenant") != request["tenant"].id or state.get("deleted"):
        raise not_found(video_id)  # the same answer for another tenant's job, a deleted one and no job at all
    return state


def _publish_failed(exc: Exception) -> ApiError:
    log.warning("publish failed: %s", exc)
    return ApiError(503, "unavailable", "the request could not be queued; retry shortly",
                    headers={"Retry-After": "1"})


def throttle_blocked_prompts(jobs, tenant: Tenant) -> None:
    """429 ``blocked_prompt_limit`` while the platform blocked ``max_blocked_per_hour`` of the tenant's jobs within
    the last hour: a client that keeps sending what the policy refuses is slowed down, whichever gateway it uses
    (every gateway sees every job's end)."""
    hour_ago = int(time.time() * 1000) - BLOCKED_WINDOW_MS
    blocked = jobs.blocked_since(tenant.id, hour_ago)
    if len(blocked) >= tenant.max_blocked_per_hour:
        wait_s = (blocked[-tenant.max_blocked_per_hour] - hour_ago) / 1000.0
        raise ApiError(429, "blocked_prompt_limit",
                       f"{len(blocked)} of this tenant's requests were blocked by the content policy within the last "
                       f"hour (limit {tenant.max_blocked_per_hour}); new ones are refused until fewer were",
                       headers={"Retry-After": retry_after_header(wait_s)})


async def create_video(request: web.Request) -> web.Response:
    app, tenant = request.app, request["tenant"]
    body, form = await read_body(request)
    create = parse_create(body, tenant, form=form, catalogue=app["catalogue"],
                          default_model=app["settings"].default_model, aliases=app["settings"].model_aliases)
    image = await read_input_reference(body.get("input_reference"))  # after the cheap checks of the other fields
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= 255 and key.isprintable()):
        raise ApiError(400, "invalid_parameter", "Idempotency-Key must be 1-255 printable characters",
                       param="Idempotency-Key")
    job_id = idempotent_job_id(tenant.id, key) if key else new_job_id()
    event = create.event(job_id, tenant)
    jobs, records = app["jobs"], app["idempotency"]

    if key:
        fingerprint = fingerprint_of(event, image)
        record = records.get(tenant.id, key)
        if record is not None:
            if record[0] != fingerprint:
                raise _key_reused()
            first = record[2]
            if not first.done():
                await asyncio.wait([first])  # the first request's publication; never raises here
            if not first.cancelled() and isinstance(first.exception(), ApiError):
                raise first.exception()  # the first request's answer (a quota's 429) is this one's too
            if first.cancelled() or first.exception() is not None:
                raise ApiError(503, "unavailable", "the first request with this Idempotency-Key could not be "
                                                   "queued; retry", headers={"Retry-After": "1"})
            return _replay(jobs, job_id)
        state = jobs.get(job_id)  # published by another gateway process, or before a restart
        if state is not None:
            if state.get("tenant") != tenant.id or jobs.request_fingerprint(job_id) not in (None, fingerprint):
                raise _key_reused()
            return _replay(jobs, job_id)

    throttle_blocked_prompts(jobs, tenant)
    published = asyncio.get_running_loop().create_future()
    if key:
        records.put(tenant.id, key, fingerprint, job_id, published)

    def fail(error: Exception | None) -> None:
        if key:
            records.drop(tenant.id, key)  # not accepted: the same key may be tried again
        if error is None:
            published.cancel()
        else:
            published.set_exception(error)
            published.exception()  # marked retrieved: no warning when nobody else waited on it

    quota, claimed = app["quota"], False
    try:
        verdict = await quota.claim(tenant, job_id)  # every gateway's claims of this tenant, in one order
        if not verdict.granted:
            wait_s = verdict.retry_after_s
            raise ApiError(429, verdict.code, verdict.message,
                           headers={} if wait_s is None else {"Retry-After": retry_after_header(wait_s)})
        claimed = True
        if image is not None:  # its blob first: the event names it
            stored = await asyncio.get_running_loop().run_in_executor(None, store_input_image, app["blobs"], job_id,
                                                                      image)
            event = create.event(job_id, tenant, input_reference=stored)
        await app["publisher"].publish_request(event)
    except BaseException as exc:
        if claimed:
            quota.release_soon(tenant.id, job_id, "not published")
        error = _publish_failed(exc) if isinstance(exc, (PublishError, QuotaUnavailable)) else exc
        fail(error if isinstance(error, Exception) and not isinstance(error, asyncio.CancelledError) else None)
        if error is not exc:
            raise error from None
        raise
    jobs.note_submitted(job_id, tenant.id, event)
    published.set_result(job_id)
    if key:
        # Another gateway may have published this job id (the same key) a moment before: the job is the first
        # request on the log, and ours, if it is not that one, is skipped by the platform.
        first = await jobs.first_request(job_id, IDEMPOTENCY_CONFIRM_S)
        if first is None:
            log.warning("job %s: its request was not seen on Kafka within %g s; answered without that check",
                        job_id, IDEMPOTENCY_CONFIRM_S)
        elif first != fingerprint:
            records.put(tenant.id, key, first, job_id, published)  # later requests compare with the job's own
            raise _key_reused()
    state = jobs.get(job_id)
    return web.json_response(video_object(state))


def _replay(jobs, job_id: str) -> web.Response:
    state = jobs.get(job_id)
    if state is None:
        raise ApiError(409, "idempotency_in_progress", "the first request with this key is still being processed")
    return web.json_response(video_object(state), headers={"Idempotent-Replayed": "true"})


async def get_video(request: web.Request) -> web.Response:
    return web.json_response(video_object(_own_job(request)))


async def create_media_token(request: web.Request) -> web.Response:
    state = _own_job(request)
    token, expires_at = request.app["media_tokens"].issue(request["tenant"].id, state["job_id"])
    return web.json_response({"video_id": state["job_id"], "token": token, "expires_at": expires_at})


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise _invalid(name, f"{name} must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise _invalid(name, f"{name} must be within {low}..{high}, got {value}")
    return value


async def list_videos(request: web.Request) -> web.Response:
    limit = _query_int(request, "limit", DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT)
    after = request.query.get("after") or None
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise _invalid("order", f"order must be asc (oldest first) or desc (newest first), got {order!r}")
    tenant = request["tenant"]
    if after is not None:  # a cursor must be one of the tenant's own jobs
        state = request.app["jobs"].get(after)
        if state is None or state.get("tenant") != tenant.id:
            raise _invalid("after", f"after must be the id of one of your videos, got {after!r}")
    states = request.app["jobs"].list_for_tenant(tenant.id, limit + 1, after, newest_first=order == "desc")
    data = [video_object(s) for s in states[:limit]]
    return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None, "has_more": len(states) > limit})


async def delete_video(request: web.Request) -> web.Response:
    """OpenAI's DELETE: the video is gone for its owner (404 from now on, its blobs deleted by the lifecycle); one
    still waiting or running is cancelled first, so it stops using the fleet."""
    state = _own_job(request)
    job_id, tenant, jobs = state["job_id"], request["tenant"], request.app["jobs"]
    publisher = request.app["publisher"]
    by = f"tenant:{tenant.id}"
    try:
        if not state.get("terminal"):
            await publisher.publish_cancel(job_id, reason="deleted through the API", requested_by=by)
        deleted = await publisher.publish_delete(job_id, tenant.id, reason="deleted through the API",
                                                 requested_by=by)
    except PublishError as exc:
        raise _publish_failed(exc) from None
    jobs.note_deleted(deleted)
    return web.json_response({"id": job_id, "object": "video.deleted", "deleted": True})


async def cancel_video(request: web.Request) -> web.Response:
    state = _own_job(request)
    if state.get("terminal"):
        raise ApiError(409, "video_finished", f"video {state['job_id']} has already ended ({state['status']})")
    tenant = request["tenant"]
    reason = request.query.get("reason", "cancelled through the API")
    if len(reason) > 500:
        raise _invalid("reason", f"reason has {len(reason)} characters; the limit is 500")
    try:
        cancel = await request.app["publisher"].publish_cancel(state["job_id"], reason=reason,
                                                               requested_by=f"tenant:{tenant.id}")
    except PublishError as exc:
        raise _publish_failed(exc) from None
    state = dict(request.app["jobs"].get(state["job_id"]) or state)
    if not state.get("cancel_requested"):  # until the request comes back from Kafka into the job's state
        state["cancel_requested"] = {"at": cancel.get("timestamp") if cancel else None, "reason": reason,
                                     "requested_by": f"tenant:{tenant.id}"}
    return web.json_response(video_object(state))


async def _serve_file(request: web.Request, uri: str, what: str, ref: dict | None = None) -> web.StreamResponse:
    """The blob ``uri`` of a job the tenant owns (gateway/delivery.py: ETags, ranges, redirects); ``ref`` is the
    BlobRef naming it where the job's state has one (its sha256 is the ETag)."""
    suffix = "." + _name_of(uri).rpartition(".")[2]
    return await serve_blob(request, uri, what, _CONTENT_TYPES.get(suffix, "application/octet-stream"), ref)


async def video_content(request: web.Request) -> web.StreamResponse:
    state = _own_job(request)
    variant = request.query.get("variant", "video")
    if state["status"] != "published" or not state.get("outputs"):
        raise ApiError(409, "video_not_ready", f"video {state['job_id']} is {state['status']}, not completed; "
                                               "follow its segments while it decodes", param="variant")
    outputs = state["outputs"]
    refs = {"video": outputs.get("video"), "manifest": outputs.get("manifest"), "playlist": outputs.get("playlist"),
            "thumbnail": outputs.get("thumbnail"), "spritesheet": outputs.get("spritesheet"),
            **{r["name"]: r for r in outputs.get("renditions") or ()}}
    ref = refs.get(variant)
    if ref is None:
        known = ", ".join(name for name, r in refs.items() if r)
        raise _invalid("variant", f"unknown variant {variant!r}; this video has: {known}")
    return await _serve_file(request, ref["uri"], f"{variant} of video {state['job_id']}", ref)


async def video_segment(request: web.Request) -> web.StreamResponse:
    state = _own_job(request)
    name = request.match_info["name"]
    uris = [s["uri"] for s in state.get("segments") or () if s.get("uri")]
    uris += [u for u in (state.get("init_segment"), state.get("playlist")) if u]
    for uri in uris:
        if _name_of(uri) == name:
            return await _serve_file(request, uri, f"segment {name}")
    raise ApiError(404, "file_not_found", f"video {state['job_id']} has no segment {name!r} (yet)", param="name")


async def video_published_file(request: web.Request) -> web.StreamResponse:
    """A file of the published set (the folder of the final video): rendition playlists and media segments,
    which the master playlist names relatively."""
    state = _own_job(request)
    name = request.match_info["name"]
    video = (state.get("outputs") or {}).get("video") if state["status"] == "published" else None
    if video is None:
        raise ApiError(409, "video_not_ready", f"video {state['job_id']} is {state['status']}, not completed")
    if not _SAFE_NAME.match(name) or name in (".", ".."):
        raise ApiError(404, "file_not_found", f"no file {name!r}", param="name")
    uri = f"{video['uri'].rsplit('/', 1)[0]}/{name}"
    outputs = state["outputs"]
    refs = [outputs.get("video"), outputs.get("manifest"), outputs.get("playlist"), *(outputs.get("renditions") or ())]
    ref = next((r for r in refs if r and r.get("uri") == uri), None)
    return await _serve_file(request, uri, f"file {name}", ref)


async def job_events(request: web.Request) -> web.StreamResponse:
    from .events import job_events as handler  # helper WS's module; imported when first used

    return await handler(request)


async def tenant_events(request: web.Request) -> web.StreamResponse:
    from .events import tenant_events as handler

    return await handler(request)



# -- models ----------------------------------------------------------------------------------------------------------
def _model_ids_served(app: web.Application) -> list[str]:
    """The gateway's model ids, its default model first (what the web page preselects)."""
    default = app["settings"].default_model
    ids = list(app["model_ids"])
    return [default, *(i for i in ids if i != default)] if default in ids else ids


#: What a model object's ``vidgen`` carries of ModelFacts.as_dict() (``source`` may name a server directory: never).
MODEL_FACTS = ("family", "modalities", "streams_while_generating", "experts", "limits", "description")


def model_object(app: web.Application, model_id: str) -> dict:
    """The OpenAI model object, plus ``vidgen``: the model's facts (never its source directory)."""
    facts = app["catalogue"].facts(model_id).as_dict()
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "vidgen",
            "vidgen": {**{k: facts[k] for k in MODEL_FACTS}, "default": model_id == app["settings"].default_model}}



async def list_models(request: web.Request) -> web.Response:
    data = []
    for model_id in _model_ids_served(request.app):
        try:
            data.append(model_object(request.app, model_id))
        except Exception as exc:  # noqa: BLE001 - a broken model directory must not hide the other models
            log.warning("model %s left out of /v1/models: %s", model_id, exc)
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    if model_id not in request.app["model_ids"]:
        raise ApiError(404, "model_not_found", f"no model with id {model_id!r}; GET /v1/models lists them",
                       param="model_id")
    try:
        return web.json_response(model_object(request.app, model_id))
    except Exception as exc:  # noqa: BLE001 - e.g. its directory is gone: say so, without the path
        log.warning("model %s: facts unavailable: %s", model_id, exc)
        raise ApiError(503, "model_unavailable", f"model {model_id!r} cannot be read right now") from None


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app["openapi"])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _static_path(app: web.Application, name: str) -> Path:
    shown = name[:80] + ("..." if len(name) > 80 else "")
    if "\x00" in name or len(name) > 255:  # no asset has such a name; the filesystem would raise
        raise ApiError(404, "not_found", f"no file {shown!r}")
    root = app["static_dir"].resolve()
    try:
        path = (root / name).resolve()
        found = root in path.parents and path.is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, and the like
        found = False
    if not found:
        raise ApiError(404, "not_found", f"no file {shown!r}")
    return path


async def index_page(request: web.Request) -> web.StreamResponse:
    try:
        return web.FileResponse(_static_path(request.app, "index.html"))
    except ApiError:
        return web.Response(text="<!doctype html><title>vidgen</title><p>vidgen gateway: see "
                                 "<a href='/openapi.json'>/openapi.json</a></p>", content_type="text/html")


async def static_file(request: web.Request) -> web.StreamResponse:
    path = _static_path(request.app, request.match_info["filename"])
    return web.FileResponse(path, headers={"Content-Type": _CONTENT_TYPES.get(path.suffix,
                                                                              "application/octet-stream")})


# -- the route table: registered by build_app, described by /openapi.json ------------------------------------------
_V = "#/components/schemas/"
_ID = {"name": "Idempotency-Key", "required": False, "schema": {"type": "string", "maxLength": 255},
       "description": "same key + same request → the same job, published once; another request → 409"}
_FILE = {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}
_RANGE = {"name": "Range", "required": False, "schema": {"type": "string"},
          "description": "one range: bytes=START-END, bytes=START- or bytes=-SUFFIX (several ranges: the whole file)"}
#: The file routes (gateway/delivery.py): what every one of them answers, besides its own errors.
_DELIVERY_HEADERS = (_RANGE, {"name": "If-None-Match", "required": False, "schema": {"type": "string"},
                              "description": "ETags (or *): 304 when the file still has one of them"},
                     {"name": "If-Range", "required": False, "schema": {"type": "string"},
                      "description": "an ETag or date: the Range only if the file is still that version"})
_DELIVERY = ("Strong ETags (`\"sha256-<hex>\"` where the job names the file by its sha256), "
             "`Cache-Control: private` — `immutable` for the published set and the decoder's segments, "
             "`no-cache` for the live playlist — and single byte ranges; HEAD answers the same headers. Where the "
             "blob store can presign URLs (S3) and VIDGEN_BLOB_REDIRECT is auto, media answer 307 to a short-lived "
             "presigned URL (after the tenant and existence checks); playlists are always served by the gateway, "
             "so their relative URIs stay gateway URLs.")
_DELIVERY_RESPONSES = {200: ("the file", _FILE), 206: ("the requested byte range", _FILE),
                       304: ("the client's copy is current (If-None-Match / If-Modified-Since)", None),
                       307: ("redirect to a presigned URL of the blob store (Location), valid for "
                             "VIDGEN_BLOB_PRESIGN_S seconds", None),
                       416: ("range not satisfiable (Content-Range: bytes */SIZE)", "Error"),
                       503: ("the blob store is unreachable (Retry-After)", "Error")}

ROUTES: list[Route] = [
    Route("POST", "/v1/videos", create_video, "createVideo", "Create a video job", request="CreateVideoRequest",
          headers=(_ID,),
          responses={200: ("the job (Idempotent-Replayed: true when an Idempotency-Key replayed it)", "Video"),
                     400: ("invalid request; `param` names the field (input_reference: invalid_image or "
                           "image_too_large)", "Error"),
                     403: ("a tier above the tenant's", "Error"),
                     409: ("Idempotency-Key reused with a different request", "Error"),
                     415: ("unsupported content type", "Error"),
                     429: ("rate limit (Retry-After), in-flight quota (in_flight_limit), hourly quota "
                           "(hourly_limit, Retry-After) or blocked prompts (blocked_prompt_limit, Retry-After)",
                           "Error"),
                     503: ("the request could not be queued", "Error")}),
    Route("GET", "/v1/videos", list_videos, "listVideos", "The tenant's videos, newest first",
          query=({"name": "limit", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT,
                                              "default": DEFAULT_LIST_LIMIT}},
                 {"name": "after", "schema": {"type": "string"}, "description": "a video id: the page after it"},
                 {"name": "order", "schema": {"type": "string", "enum": ["asc", "desc"], "default": "desc"},
                  "description": "desc: newest first; asc: oldest first"}),
          responses={200: ("a page of videos", "VideoList"), 400: ("bad limit or cursor", "Error")}),
    Route("GET", "/v1/videos/{video_id}", get_video, "getVideo", "A video job's state",
          responses={200: ("the job", "Video"), 404: ("no such video for this tenant", "Error")}),
    Route("POST", "/v1/videos/{video_id}/media-token", create_media_token, "createMediaToken",
          "A short-lived token for this video's media URLs and websocket",
          description=("For a browser, whose media elements, links and websockets cannot send an Authorization "
                       "header: `?token=` on /content, /segments/, /published/ and /events of this video reads it "
                       "as its tenant until `expires_at` (epoch seconds), so the API key never goes into a URL."),
          responses={200: ("the token", {"application/json": {"schema": {
              "type": "object", "required": ["video_id", "token", "expires_at"],
              "properties": {"video_id": {"type": "string"}, "token": {"type": "string"},
                             "expires_at": {"type": "integer"}}}}}),
                     404: ("no such video for this tenant", "Error")}),
    Route("DELETE", "/v1/videos/{video_id}", delete_video, "deleteVideo", "Delete a video",
          description=("OpenAI's delete: publishes a VideoDeleted on vidgen.deleted (after a JobCancelled on "
                       "vidgen.control if the job has not ended): the video answers 404 from then on, leaves the "
                       "listing, and the lifecycle deletes every blob of the job at once (rule deleted)."),
          responses={200: ("deleted", {"application/json": {"schema": {
              "type": "object", "required": ["id", "object", "deleted"],
              "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["video.deleted"]},
                             "deleted": {"type": "boolean"}}}}}),
                     404: ("no such video for this tenant", "Error"),
                     503: ("the deletion could not be queued", "Error")}),
    Route("POST", "/v1/videos/{video_id}/cancel", cancel_video, "cancelVideo", "Cancel a video job, keeping it",
          description=("Publishes a JobCancelled on vidgen.control: a queued job is skipped, a running one stops "
                       "within a step; the job then ends with status failed, error.code cancelled, and stays "
                       "listed (DELETE removes it)."),
          query=({"name": "reason", "schema": {"type": "string", "maxLength": 500}},),
          responses={200: ("the job, with vidgen.cancel_requested set", "Video"),
                     404: ("no such video for this tenant", "Error"), 409: ("the job has already ended", "Error"),
                     503: ("the cancellation could not be queued", "Error")}),
    Route("GET", "/v1/videos/{video_id}/content", video_content, "getVideoContent",
          "The final video, a rendition, the C2PA manifest or the HLS master playlist",
          description=_DELIVERY,
          query=({"name": "variant", "schema": {"type": "string", "default": "video"},
                  "description": "video (default), a rendition name, manifest, playlist, thumbnail (a representative "
                                 "frame, signed JPEG) or spritesheet (a grid of frames, signed JPEG)"},),
          headers=_DELIVERY_HEADERS,
          responses={**_DELIVERY_RESPONSES,
                     400: ("unknown variant", "Error"), 404: ("no such video for this tenant", "Error"),
                     409: ("the video is not completed yet", "Error")}),
    Route("GET", "/v1/videos/{video_id}/segments/{name}", video_segment, "getVideoSegment",
          "A live segment (init.mp4, segment-NNNNN.m4s) or the live HLS playlist (playlist.m3u8)",
          description=_DELIVERY, headers=_DELIVERY_HEADERS,
          responses={**_DELIVERY_RESPONSES, 404: ("no such video or segment", "Error")}),
    Route("GET", "/v1/videos/{video_id}/published/{name}", video_published_file, "getPublishedFile",
          "A file of the published set (master.m3u8, <rendition>.m3u8, <rendition>.m4s, ...)",
          description=_DELIVERY, headers=_DELIVERY_HEADERS,
          responses={**_DELIVERY_RESPONSES, 404: ("no such video or file", "Error"),
                     409: ("the video is not completed yet", "Error")}),
    Route("GET", "/v1/videos/{video_id}/events", job_events, "videoEvents", "Websocket: one job's progress",
          description=("Upgrade to a websocket; the server sends a `state` envelope, then every change "
                       "(queued, started, progress, checkpoint, segment, flagged, published, failed, cancelled) "
                       "and heartbeats. 404 (before the upgrade) for another tenant's or an unknown job."),
          websocket=True, tag="events",
          responses={101: ("switching to the websocket protocol; messages are Envelope", {
              "application/json": {"schema": {"$ref": _V + "Envelope"}}}),
                     404: ("no such video for this tenant", "Error")}),
    Route("GET", "/v1/events", tenant_events, "tenantEvents", "Websocket: progress of all of the tenant's jobs",
          websocket=True, tag="events",
          responses={101: ("switching to the websocket protocol; messages are Envelope", {
              "application/json": {"schema": {"$ref": _V + "Envelope"}}})}),
    Route("GET", "/v1/models", list_models, "listModels", "The models this gateway serves",
          description=("OpenAI's model list; each model's `vidgen` says its family, modalities (t2v, i2v, audio), "
                       "whether it streams while generating (chunk after chunk, playable before the last step) and "
                       "its limits (sizes are multiples of spatial_multiple up to max_side; frames have the form "
                       "temporal_multiple·k+1 up to max_frames). The gateway's default model comes first."),
          tag="models", responses={200: ("the models", "ModelList")}),
    Route("GET", "/v1/models/{model_id:.+}", get_model, "getModel", "One model the gateway serves", tag="models",
          responses={200: ("the model", "Model"), 404: ("the gateway serves no model with this id", "Error"),
                     503: ("the model's configuration cannot be read", "Error")}),
    Route("GET", "/openapi.json", openapi_json, "openapi", "This document", auth=False, tag="meta",
          responses={200: ("the OpenAPI 3.1 document", {"application/json": {"schema": {"type": "object"}}})}),
    Route("GET", "/healthz", healthz, "health", "Liveness", auth=False, tag="meta",
          responses={200: ("the process serves requests", "Health")}),
    Route("GET", "/", index_page, "indexPage", "The web page", auth=False, tag="page",
          responses={200: ("HTML", {"text/html": {"schema": {"type": "string"}}})}),
    Route("GET", "/static/{filename:.+}", static_file, "staticFile", "The web page's assets", auth=False, tag="page",
          responses={200: ("a file", {"application/octet-stream": {"schema": {"type": "string"}}}),
                     404: ("no such file", "Error")}),
]


# -- middleware and app ------------------------------------------------------------------------------------------------
#: Routes a browser reaches without headers — websockets, and media elements' and links' URLs — where the key may
#: come as ?api_key=; every other route takes it in the Authorization header only (a query string ends up in
#: proxies' and servers' logs and in browser history).
QUERY_KEY_ROUTES = frozenset({"videoEvents", "tenantEvents", "getVideoContent", "getVideoSegment",
                              "getPublishedFile"})


def _api_key(request: web.Request, route: Route) -> str | None:
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    if "api_key" in request.query and route.name not in QUERY_KEY_ROUTES:
        raise ApiError(401, "api_key_in_query", "send your API key in the Authorization header: ?api_key= is taken "
                                                "only on websockets and media URLs",
                       headers={"WWW-Authenticate": 'Bearer realm="vidgen"'})
    return request.query.get("api_key")


def _failed_authentication(request: web.Request, code: str) -> None:
    """Counted per client address (vidgen_gateway_auth_failures_total) and logged at a bounded rate."""
    address = request.remote or "?"
    failures = request.app["auth_failures"]
    failures[address] = failures.get(address, 0) + 1
    AUTH_FAILURES.labels(address=address if len(failures) <= MAX_FAILURE_ADDRESSES else "other").inc()
    request.app["auth_log"]("auth", logging.WARNING, "failed authentication from %s (%s, %d from there so far)",
                            address, code, failures[address])


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    route = request.app["route_specs"].get(request.match_info.route.name)
    if route is None or not route.auth:  # public routes, and unknown paths (answered 404/405 as JSON)
        return await handler(request)
    challenge = {"WWW-Authenticate": 'Bearer realm="vidgen"'}
    if "token" in request.query and route.name in QUERY_KEY_ROUTES and "Authorization" not in request.headers:
        tenant_id = request.app["media_tokens"].verify(request.query["token"], request.match_info.get("video_id"))
        tenant = request.app["tenants"].get(tenant_id) if tenant_id is not None else None
        if tenant is None:
            _failed_authentication(request, "invalid_token")
            raise ApiError(401, "invalid_token", "the media token is not valid for this video, or has expired; ask "
                                                 "POST /v1/videos/{video_id}/media-token for another",
                           headers=challenge)
    else:
        try:
            key = _api_key(request, route)
        except ApiError:
            _failed_authentication(request, "api_key_in_query")
            raise
        if not key:
            _failed_authentication(request, "missing_api_key")
            raise ApiError(401, "missing_api_key", "send your API key: Authorization: Bearer <key>",
                           headers=challenge)
        tenant = request.app["tenants"].authenticate(key)
        if tenant is None:
            _failed_authentication(request, "invalid_api_key")
            raise ApiError(401, "invalid_api_key", "the API key is not valid", headers=challenge)
    wait_s = request.app["limiter"].check(tenant.id, tenant.rate_per_s, tenant.burst)
    if wait_s > 0:
        raise ApiError(429, "rate_limit_exceeded",
                       f"more than {tenant.rate_per_s:g} requests/s (burst {tenant.burst}); retry later",
                       headers={"Retry-After": retry_after_header(wait_s)})
    request["tenant"] = tenant
    return await handler(request)


#: Headers on every answer: no MIME sniffing; the page's own (below) keep it from being framed or loading anything
#: from elsewhere.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; media-src 'self' blob:; img-src 'self' data: blob:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                                "frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
}
#: Addresses counted one by one in the failed-authentication metric; the rest are "other" (bounded cardinality).
MAX_FAILURE_ADDRESSES = 1000


async def _response_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_NAME  # no versions
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    route = request.match_info.route.name if request.match_info is not None else None
    if route in ("indexPage", "staticFile"):
        response.headers.update(PAGE_HEADERS)


def build_app(settings: Settings, *, jobs, tenants: TenantStore, publisher, model_ids: tuple[str, ...] | None = None,
              static_dir: Path | None = None, limiter: RateLimiter | None = None,
              limits: ServeLimits | None = None, quota: FleetQuota | None = None) -> web.Application:
    """The gateway's aiohttp app over a JobsView (gateway/jobs.py), tenants and a publisher (gateway/publisher.py).

    ``jobs.start/stop`` and ``publisher.start/stop`` (where they exist) run at the app's start-up and clean-up.
    """
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=MAX_CREATE_BODY_BYTES)
    description = load_model_description(settings)  # the models' facts, without torch (gateway/model_description.py)
    builtin_ids = [m for m in description.model_ids() if m not in settings.model_dirs]
    app["settings"], app["jobs"], app["tenants"], app["publisher"] = settings, jobs, tenants, publisher
    app["model_ids"] = tuple(model_ids or (*builtin_ids, *sorted(settings.model_dirs)))
    app["catalogue"] = _CatalogueIds(app["model_ids"], description)
    app["blobs"] = open_blob_store(settings)
    app["static_dir"] = Path(static_dir or STATIC_DIR)
    app["limiter"] = limiter or RateLimiter()
    app["limits"] = limits = limits or ServeLimits()
    app["websockets"] = WebsocketCounts(limits.max_websockets_per_tenant)
    app["auth_failures"] = {}
    app["auth_log"] = RateLimitedLog(limits.log_every_s)
    app.on_response_prepare.append(_response_headers)
    app["idempotency"] = IdempotencyRecords()
    app["media_tokens"] = MediaTokens.from_settings(settings)
    app["quota"] = quota or FleetQuota(publisher, jobs, QuotaFollower(settings) if isinstance(publisher, KafkaPublisher)
                                       else None)
    app["route_specs"] = {route.name: route for route in ROUTES}
    app["openapi"] = openapi_document(ROUTES)
    for route in ROUTES:
        if route.method == "GET" and not route.websocket:  # with HEAD, which caches and download managers send
            app.router.add_get(route.path, route.handler, name=route.name)
        else:
            app.router.add_route(route.method, route.path, route.handler, name=route.name)

    async def start(app: web.Application) -> None:
        for part in (publisher, jobs, app["quota"]):
            if hasattr(part, "start"):
                await part.start()
        if tenants.path is not None:
            app["tenants_watch"] = asyncio.create_task(_watch_tenants(tenants))

    async def stop(app: web.Application) -> None:
        if "tenants_watch" in app:
            app["tenants_watch"].cancel()
        for part in (app["quota"], jobs, publisher):
            if hasattr(part, "stop"):
                try:
                    await part.stop()
                except Exception:  # noqa: BLE001 - stop the other part anyway
                    log.exception("stopping %s failed", type(part).__name__)

    app.on_startup.append(start)
    if hasattr(jobs, "close_subscriptions"):  # open websockets would otherwise hold the shutdown for its timeout
        app.on_shutdown.append(jobs.close_subscriptions)
    app.on_cleanup.append(stop)
    return app


async def _watch_tenants(tenants: TenantStore) -> None:
    """`vidgen tenants` changes (new tenants, rotated keys, limits) reach a running gateway within a second."""
    while True:
        await asyncio.sleep(TENANTS_POLL_S)
        try:
            tenants.reload_if_changed()  # on the loop: a request never sees half of a reload (a stat; a small file)
        except Exception:  # noqa: BLE001 - the next look tries again
            log.exception("tenants: reading the tenants file again failed")


def run_gateway(settings: Settings, host: str = "127.0.0.1", port: int = 8080, *,
                tenants_file: str | Path | None = None) -> int:
    """Serve the gateway until SIGINT/SIGTERM: JobsView, Kafka publisher, tenants (created with a dev key on the
    first run, printed once)."""
    from .jobs import JobsView  # helper WS's module
    from .publisher import KafkaPublisher
    from .tenants import load_or_create, tenants_path

    from streams.metrics import serve_metrics

    serve_metrics(settings.metrics_port, settings.metrics_host or host)  # not on every interface behind a loopback API
    private_dir(settings.var_dir)
    soft, _hard = raise_open_file_limit()
    limits = fit_to_open_file_limit(ServeLimits.from_env(), soft)
    path = Path(tenants_file) if tenants_file else tenants_path(settings)
    tenants, new_key = load_or_create(path)
    if new_key:
        print(f"created {path} with tenant 'dev'; its API key (shown once, only its hash is stored):\n"
              f"  {new_key}", flush=True)
    app = build_app(settings, jobs=JobsView(settings), tenants=tenants, publisher=KafkaPublisher(settings),
                    limits=limits)
    print(f"vidgen gateway on http://{host}:{port} ({len(tenants)} tenants from {path})", flush=True)
    asyncio.run(serve(app, host, port, limits))
    return 0


async def serve(app: web.Application, host: str, port: int, limits: ServeLimits) -> None:
    """Serve ``app`` through gateway/server.py's connection limits until SIGINT or SIGTERM."""
    import signal

    runner = GuardedAppRunner(app, limits, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """``python -c 'from gateway.app import main; main()' --port N`` until `vidgen gateway` exists."""
    import argparse
    import sys

    from streams.settings import load_settings

    parser = argparse.ArgumentParser(prog="vidgen gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--tenants", default=None, help="tenants file (default: VIDGEN_TENANTS or <var>/tenants.toml)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpx2", "aiohttp.access"):  # a line per registry request is noise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    install_key_redaction()
    return run_gateway(load_settings(), args.host, args.port, tenants_file=args.tenants)
