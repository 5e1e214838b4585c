"""The OpenAPI 3.1 document of the gateway, generated from the route table the app registers.

``gateway.app.ROUTES`` is a list of ``Route``; ``build_app`` registers exactly those routes and ``openapi_document``
describes exactly those routes, so the document and the server cannot drift apart (a test compares the app's
router with the document in both directions). The websocket routes are described as GET operations answering
``101 Switching Protocols``, with the envelope schema and ``x-websocket: true``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from streams.topics import TIERS

API_VERSION = "1.0.0"
MAX_PROMPT_CHARS = 10_000  # informative only: the limit enforced is consumers.prompt_encoder.MAX_PROMPT_CHARS


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # aiohttp syntax; a variable may carry a regex: /static/{filename:.+}
    handler: Callable
    name: str  # operationId and aiohttp route name
    summary: str
    description: str = ""
    auth: bool = True
    request: str | None = None  # component schema of a JSON body
    responses: dict[int, tuple[str, Any]] = field(default_factory=dict)  # status → (description, schema name|content)
    query: tuple[dict, ...] = ()
    headers: tuple[dict, ...] = ()
    websocket: bool = False
    tag: str = "videos"

    @property
    def openapi_path(self) -> str:
        return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", self.path)

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"\{(\w+)(?::[^}]+)?\}", self.path)


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


BLOB = {"type": "object", "description": "A stored output, served by the gateway.",
        "properties": {"url": {"type": "string", "description": "gateway URL of the file"},
                       "sha256": _nullable({"type": "string"}), "bytes": _nullable({"type": "integer"})}}

SCHEMAS: dict[str, dict] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["code", "message", "type", "param"],
            "properties": {
                "code": {"type": "string", "description": "stable machine-readable code, e.g. invalid_parameter"},
                "message": {"type": "string", "description": "for people"},
                "type": {"type": "string", "description": "OpenAI-style error class, e.g. invalid_request_error"},
                "param": _nullable({"type": "string", "description": "the request field at fault"}),
            }}},
    },
    "CreateVideoRequest": {
        "type": "object", "required": ["prompt"], "additionalProperties": False,
        "description": ("The OpenAI Videos API body (model, prompt, size, seconds) plus vidgen's own fields. "
                        "Also accepted as multipart/form-data or application/x-www-form-urlencoded (numbers as "
                        "text). Unknown fields are rejected. frames = seconds × fps rounded to the nearest 4k+1; "
                        "an explicit frames wins; neither: 9 frames."),
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
            "model": {"type": "string", "description": "a model id of the platform's catalogue (default: the "
                                                       "platform's default model); filesystem paths are refused"},
            "size": {"type": "string", "pattern": r"^\d+x\d+$", "default": "64x64",
                     "description": "WIDTHxHEIGHT, each a multiple of 16, at most 1920"},
            "seconds": {"anyOf": [{"type": "string", "pattern": r"^\d+(\.\d+)?$"}, {"type": "number"}],
                        "description": "clip length; frames = round to the nearest 4k+1 of seconds × fps"},
            "frames": {"type": "integer", "minimum": 1, "maximum": 257, "description": "4k+1; wins over seconds"},
            "fps": {"type": "integer", "minimum": 1, "maximum": 120, "default": 8},
            "tier": {"type": "string", "enum": list(TIERS),
                     "description": "default: the tenant's tier; a tier above the tenant's is refused (403)"},
            "steps": {"type": "integer", "minimum": 1, "maximum": 1000, "description": "default: the preset's"},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "default": 0},
            "negative_prompt": {"type": "string", "maxLength": MAX_PROMPT_CHARS, "default": ""},
            "preset": {"type": "string", "enum": ["quality", "fast"], "default": "quality",
                       "description": "quality: 50 steps, guidance 5; fast: 4 steps, guidance 1"},
            "guidance_scale": {"type": "number", "minimum": 0, "description": "default: the preset's"},
            "guidance_scale_2": {"type": "number", "minimum": 0,
                                 "description": "a two-expert model's low-noise expert (Wan 2.2 A14B); default: as "
                                                "guidance_scale; refused for one-expert models"},
            "consent_ref": {"type": "string", "description": "consent record of a depicted person"},
            "input_reference": {
                "type": "string",
                "description": ("image-to-video: the input image, a PNG, JPEG or WebP of at most 10 MiB and 4096×4096 "
                                "pixels. In multipart/form-data a file part (what the openai SDK sends for "
                                "input_reference=open(path, 'rb')); in JSON a base64 data URL "
                                "(data:image/png;base64,...); a URL is never fetched. Anything else: 400 invalid_image "
                                "or image_too_large. A human face in it sends the job to content review (or blocks "
                                "it, as the platform's prompt policy says)."),
            },
        },
    },
    "Video": {
        "type": "object", "description": "The OpenAI Videos API video object, plus `vidgen`: the full job state.",
        "required": ["id", "object", "model", "status", "progress", "created_at", "completed_at", "size", "seconds",
                     "error", "queue_position", "queue_eta_seconds", "vidgen"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "video"},
            "model": {"type": "string"},
            "status": {"type": "string", "enum": ["queued", "in_progress", "completed", "failed"],
                       "description": "requested/queued → queued; running/decoding/review → in_progress; "
                                      "published → completed; flagged/failed/cancelled → failed (see error)"},
            "progress": {"type": "integer", "minimum": 0, "maximum": 100},
            "created_at": {"type": "integer", "description": "unix seconds"},
            "completed_at": _nullable({"type": "integer"}),
            "expires_at": {"type": "null"},
            "prompt": _nullable({"type": "string"}),
            "size": {"type": "string"},
            "seconds": {"type": "string", "description": "the duration asked for (when the request named seconds), "
                                                          "else frames / fps"},
            "duration_seconds": _nullable({"type": "number", "description": "the video's exact length: frames / fps"}),
            "remixed_from_video_id": {"type": "null"},
            "error": _nullable({"type": "object", "required": ["code", "message"],
                                "properties": {"code": {"type": "string",
                                                        "enum": ["content_flagged", "generation_failed", "cancelled"]},
                                               "message": {"type": "string"}}}),
            "queue_position": _nullable({"type": "integer", "minimum": 1,
                                         "description": "while the job waits in the fleet's queue: 1 = starts next; "
                                                        "null once it runs or has ended"}),
            "queue_eta_seconds": _nullable({"type": "number", "minimum": 0,
                                            "description": "while the job waits: seconds until it is expected to "
                                                           "start (from recent step times, as of the scheduler's "
                                                           "last estimate); null when unknown or not waiting"}),
            "vidgen": _ref("JobState"),
        },
    },
    "JobState": {
        "type": "object", "description": "consumers.job_state.to_public, with every stored file as a gateway URL.",
        "properties": {
            "job_id": {"type": "string"}, "tenant": {"type": "string"},
            "tier": _nullable({"type": "string", "enum": list(TIERS)}),
            "status": {"type": "string", "enum": ["requested", "queued", "running", "decoding", "review", "published",
                                                  "flagged", "failed", "cancelled"]},
            "terminal": {"type": "boolean"}, "prompt": _nullable({"type": "string"}),
            "params": _nullable({"type": "object", "description": "the generation parameters; input_reference (the "
                                                                   "input image) only as {sha256, bytes}, or null"}),
            "seconds_requested": _nullable({"type": "number", "description": "the duration asked for, when the "
                                                                             "request named seconds"}),
            "step": {"type": "integer"}, "total_steps": _nullable({"type": "integer"}),
            "progress": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
            "eta_ms": _nullable({"type": "integer"}),
            "queue_position": _nullable({"type": "integer", "minimum": 1,
                                         "description": "position in the fleet's queue while waiting (1 = next)"}),
            "queue_waiting": _nullable({"type": "integer", "description": "jobs waiting in the whole queue"}),
            "queue_eta_s": _nullable({"type": "number", "description": "seconds until the job should start, as of "
                                                                       "queue_at; null when unknown"}),
            "queue_at": _nullable({"type": "integer", "description": "epoch ms of the scheduler's estimate"}),
            "attempt": {"type": "integer"},
            "resumed_from_step": _nullable({"type": "integer"}),
            "generating_chunk": _nullable({"type": "integer", "description": "a model that streams while "
                                           "generating: the chunk being denoised (0-based)"}),
            "chunk_count": _nullable({"type": "integer", "description": "the job's latent chunks, once known"}),
            "checkpoints": {"type": "object"},
            "segments": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, "url": {"type": "string"}, "frame_start": {"type": "integer"},
                "frames": {"type": "integer"}, "is_last": {"type": "boolean"}}}},
            "segment_count": _nullable({"type": "integer"}),
            "init_segment": _nullable({"type": "string", "description": "URL"}),
            "playlist": _nullable({"type": "string", "description": "URL of the live HLS playlist"}),
            "outputs": _nullable({"type": "object", "properties": {
                "video": BLOB, "manifest": _nullable(BLOB), "playlist": _nullable(BLOB),
                "thumbnail": _nullable(BLOB), "spritesheet": _nullable(BLOB),
                "renditions": {"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string"}, "width": {"type": "integer"}, "height": {"type": "integer"},
                    "url": {"type": "string"}}}}}}),
            "flags": {"type": "array", "items": {"type": "object"}},
            "error": _nullable({"type": "object"}),
            "cancel_requested": _nullable({"type": "object"}),
            "deleted": _nullable({"type": "object", "description": "never shown: a deleted video answers 404"}),
            "requested_at": _nullable({"type": "integer", "description": "epoch ms"}),
            "started_at": _nullable({"type": "integer"}), "updated_at": _nullable({"type": "integer"}),
            "finished_at": _nullable({"type": "integer"}),
        },
    },
    "VideoList": {
        "type": "object", "required": ["object", "data", "first_id", "last_id", "has_more"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Video")},
                       "first_id": _nullable({"type": "string"}), "last_id": _nullable({"type": "string"}),
                       "has_more": {"type": "boolean"}},
    },
    "Model": {
        "type": "object", "required": ["id", "object", "created", "owned_by", "vidgen"],
        "description": "OpenAI's model object, plus `vidgen`: what requests to this model are checked against.",
        "properties": {
            "id": {"type": "string", "description": "the `model` of POST /v1/videos"},
            "object": {"const": "model"},
            "created": {"type": "integer", "description": "always 0"},
            "owned_by": {"const": "vidgen"},
            "vidgen": {
                "type": "object",
                "required": ["family", "modalities", "streams_while_generating", "experts", "limits", "default"],
                "properties": {
                    "family": {"type": "string", "description": "e.g. wan, ltx2"},
                    "modalities": {"type": "array", "items": {"type": "string", "enum": ["t2v", "i2v", "audio"]},
                                   "description": "t2v: text-to-video; i2v: needs or takes input_reference; "
                                                  "audio: the video has a sound track"},
                    "streams_while_generating": {
                        "type": "boolean",
                        "description": "true: chunk after chunk, each playable while later ones are denoised; "
                                       "false: the segments come once the last step is done (while decoding)"},
                    "experts": {"type": "integer", "minimum": 1,
                                "description": "2: guidance_scale_2 guides the low-noise expert"},
                    "limits": {"type": "object", "properties": {
                        "spatial_multiple": {"type": "integer", "description": "width and height are multiples"},
                        "temporal_multiple": {"type": "integer", "description": "frames = temporal_multiple·k+1"},
                        "max_side": {"type": "integer"}, "max_frames": {"type": "integer"},
                        "max_steps": {"type": "integer"}}},
                    "description": {"type": "string"},
                    "default": {"type": "boolean", "description": "the model used when a request names none"},
                }},
        },
    },
    "ModelList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"},
                       "data": {"type": "array", "items": _ref("Model"),
                                "description": "the default model first"}},
    },
    "Envelope": {
        "type": "object", "required": ["type", "data"],
        "description": ("A websocket message. `state` (the full JobState) comes first, then every change. "
                        "`queued` ({job_id, tier, at, position, waiting, eta_s}) comes when the prompt is encoded "
                        "and again whenever the job's queue position or ETA changes while it waits."),
        "properties": {"type": {"type": "string", "enum": ["state", "queued", "started", "progress", "checkpoint",
                                                           "segment", "flagged", "published", "failed", "cancelled",
                                                           "heartbeat"]},
                       "data": {"type": "object"}},
    },
    "Health": {"type": "object", "properties": {"status": {"const": "ok"}}},
}


# null is accepted for every optional field of a create request (OpenAI clients send it): it means "not given".
for _name, _schema in list(SCHEMAS["CreateVideoRequest"]["properties"].items()):
    if _name != "prompt":
        SCHEMAS["CreateVideoRequest"]["properties"][_name] = _nullable(_schema)


ERRORS = {
    400: "invalid request (the error's `param` names the field)",
    401: "missing or unknown API key",
    404: "no such video for this tenant (another tenant's video answers the same)",
    429: "rate limit (with Retry-After) or in-flight job quota reached",
}


def _json(schema: dict | str) -> dict:
    return {"application/json": {"schema": _ref(schema) if isinstance(schema, str) else schema}}


def _operation(route: Route) -> dict:
    op: dict[str, Any] = {"operationId": route.name, "summary": route.summary, "tags": [route.tag]}
    if route.description:
        op["description"] = route.description
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in route.path_params]
    params += [{"in": "query", **q} for q in route.query]
    params += [{"in": "header", **h} for h in route.headers]
    if params:
        op["parameters"] = params
    if route.request:
        op["requestBody"] = {"required": True, "content": {
            **_json(route.request),
            "multipart/form-data": {"schema": _ref(route.request)},
            "application/x-www-form-urlencoded": {"schema": _ref(route.request)}}}
    responses: dict[str, Any] = {}
    for status, (description, body) in sorted(route.responses.items()):
        entry: dict[str, Any] = {"description": description}
        if isinstance(body, str):
            entry["content"] = _json(body)
        elif isinstance(body, dict):
            entry["content"] = body
        if status == 429:
            entry["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                "description": "seconds (rate limit only)"}}
        responses[str(status)] = entry
    if route.auth:
        for status in (401, 429):
            responses.setdefault(str(status), {"description": ERRORS[status], "content": _json("Error")})
        op["security"] = [{"bearer": []}, {"api_key": []}]
    else:
        op["security"] = []
    responses.setdefault("default", {"description": "error", "content": _json("Error")})
    op["responses"] = responses
    if route.websocket:
        op["x-websocket"] = True
    return op


def openapi_document(routes: list[Route], server_url: str | None = None) -> dict:
    paths: dict[str, dict] = {}
    for route in routes:
        paths.setdefault(route.openapi_path, {})[route.method.lower()] = _operation(route)
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "vidgen gateway", "version": API_VERSION,
                 "description": ("Text-to-video jobs over HTTP, compatible in shape with the OpenAI Videos API. "
                                 "Authenticate with `Authorization: Bearer <API key>` (or `?api_key=` where headers "
                                 "cannot be set: websockets, the web page). Errors are "
                                 "`{\"error\": {\"code\", \"message\", \"type\", \"param\"}}`. Rate limits are per "
                                 "gateway process; in-flight job quotas are per tenant.")},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "api_key": {"type": "apiKey", "in": "query", "name": "api_key"}},
        },
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc

