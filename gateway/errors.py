"""Errors as JSON: every failure the gateway answers is ``{"error": {"code", "message", "type", "param"}}``.

``code`` is a stable machine-readable word (``invalid_parameter``, ``video_not_found``, ...), ``message`` is for
people, ``type`` is the OpenAI-style class of error (``invalid_request_error``, ``authentication_error``, ...) and
``param`` names the request field at fault, or is null. Handlers raise ``ApiError``; ``error_middleware`` turns it,
aiohttp's own HTTP errors (404 unknown path, 405 wrong method, 413 body too large) and any other exception into
that shape. An unexpected exception answers 500 with a generic message: the detail (stack trace included) goes
to the log only, never to the client.
"""
from __future__ import annotations

import asyncio
import logging
import uuid

from aiohttp import web

log = logging.getLogger(__name__)

#: OpenAI's error ``type`` per status, so OpenAI clients classify vidgen's errors as they would theirs.
_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 408: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
    416: "invalid_request_error", 429: "rate_limit_error", 501: "server_error", 503: "server_error",
}
#: Codes for aiohttp's own HTTP errors (raised by the router or the request parser, not by our handlers).
_HTTP_CODES = {
    404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type",
    400: "bad_request",
}


class ApiError(Exception):
    """An error the client should see: HTTP status, a stable code, a message, optionally the field at fault."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}
        self.close = close  # the connection ends after the answer (a body that did not arrive in time)

    def body(self) -> dict:
        return error_body(self.status, self.code, self.message, self.param)


class ClientGone(Exception):
    """The client broke the connection off before its request was read: nobody to answer, nothing to log loudly."""


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "type": _TYPES.get(status, "server_error" if status >= 500
                                                                          else "invalid_request_error"),
                      "param": param}}


def error_response(status: int, code: str, message: str, *, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(status, code, message, param), status=status, headers=headers)


def not_found(video_id: str) -> ApiError:
    """The one answer for an unknown job AND for another tenant's job: nothing tells the two apart."""
    return ApiError(404, "video_not_found", f"no video with id {video_id!r}", param="video_id")


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = web.json_response(exc.body(), status=exc.status, headers=exc.headers)
        if exc.close:
            response.force_close()
        return response
    except ClientGone:
        log.debug("%s %s: the client went away mid-request", request.method, request.path)
        response = error_response(400, "client_gone", "the connection broke off before the request was read")
        response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like are answers, not errors
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")}
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = {404: f"no route for {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}"}.get(exc.status, exc.reason)
        return error_response(exc.status, code, message, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client went away: nobody to answer
    except Exception:  # noqa: BLE001 - the one place that turns any failure into a JSON 500
        incident = uuid.uuid4().hex[:12]
        log.exception("unhandled error in %s %s (incident %s)", request.method, request.path, incident)
        return error_response(500, "internal_error", f"internal server error (incident {incident})")
