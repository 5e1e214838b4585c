"""How the gateway holds its connections: limits in front of aiohttp's request handling (issue 24's probe).

1. A new connection is admitted only under the caps — ``max_connections`` in all, ``max_per_address`` from one
   client address. Over a cap it is answered at once with a JSON 503 (all) or 429 (one address) and
   ``Connection: close``, before anything of it is parsed: idle sockets from one client cannot starve the others.
2. A connection must complete a request's headers within ``header_timeout_s`` of opening, and of finishing its
   previous response (aiohttp's keep-alive timer runs from the connection's start: it is that deadline); a body
   must arrive within ``body_timeout_s`` (gateway/app.py read_body answers 408).
3. A request the HTTP parser refuses (a NUL in a header, a line too long) is answered with a JSON 400 that quotes
   nothing of it, and logged without its bytes — they may hold an API key — at most once per ``log_every_s``.
4. ``accept()`` failing (out of file descriptors) is logged once per ``log_every_s``, not once per attempt; the
   open-file limit is raised to its hard limit when the gateway starts (``raise_open_file_limit``).
5. Websockets per tenant are counted by ``WebsocketCounts`` (gateway/events.py answers 429 over the limit).

Settings (environment): VIDGEN_GATEWAY_MAX_CONNECTIONS, VIDGEN_GATEWAY_MAX_CONNECTIONS_PER_ADDRESS,
VIDGEN_GATEWAY_HEADER_TIMEOUT_S, VIDGEN_GATEWAY_BODY_TIMEOUT_S, VIDGEN_GATEWAY_MAX_WEBSOCKETS_PER_TENANT.

aiohttp has no connection limits of its own, so this subclasses its server and request handler (``web.Server``,
``web_protocol.RequestHandler``) and its app runner: the one place that leans on aiohttp's internals.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, fields

from aiohttp import web
from aiohttp.web_log import AccessLogger
from aiohttp.web_protocol import RequestHandler

from .errors import error_body

log = logging.getLogger(__name__)

#: What every response names as its server: no versions.
SERVER_NAME = "vidgen"
LINGERING_S = 1.0


@dataclass(frozen=True)
class ServeLimits:
    max_connections: int = 4096
    max_per_address: int = 256
    header_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    max_websockets_per_tenant: int = 100
    log_every_s: float = 10.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ServeLimits":
        env = os.environ if env is None else env
        names = {"max_connections": "MAX_CONNECTIONS", "max_per_address": "MAX_CONNECTIONS_PER_ADDRESS",
                 "header_timeout_s": "HEADER_TIMEOUT_S", "body_timeout_s": "BODY_TIMEOUT_S",
                 "max_websockets_per_tenant": "MAX_WEBSOCKETS_PER_TENANT"}
        values = {}
        for f in fields(cls):
            raw = env.get(f"VIDGEN_GATEWAY_{names[f.name]}") if f.name in names else None
            if raw in (None, ""):
                continue
            try:
                value = type(f.default)(raw)
            except ValueError:
                raise ValueError(f"VIDGEN_GATEWAY_{names[f.name]}={raw!r}: expected a number") from None
            if value <= 0:
                raise ValueError(f"VIDGEN_GATEWAY_{names[f.name]} must be positive, got {raw}")
            values[f.name] = value
        return cls(**values)


class RateLimitedLog:
    """One log line per interval for a kind of event, saying how many were not logged since."""

    def __init__(self, every_s: float, clock=time.monotonic):
        self.every_s, self.clock = every_s, clock
        self.next_at: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def __call__(self, kind: str, level: int, message: str, *args) -> bool:
        now = self.clock()
        if now < self.next_at.get(kind, 0.0):
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return False
        self.next_at[kind] = now + self.every_s
        skipped = self.suppressed.pop(kind, 0)
        log.log(level, message + (f" (and {skipped} more in the last {self.every_s:g} s)" if skipped else ""), *args)
        return True


def canned_response(status: int, code: str, message: str, retry_after_s: int = 1) -> bytes:
    """A whole HTTP/1.1 answer for a connection that will not be parsed."""
    body = json.dumps(error_body(status, code, message)).encode()
    reason = {429: "Too Many Requests", 503: "Service Unavailable"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Retry-After: {retry_after_s}\r\nConnection: close\r\nServer: {SERVER_NAME}\r\n\r\n").encode() + body


class ConnectionCounts:
    """Open connections, in all and per client address."""

    def __init__(self, limits: ServeLimits):
        self.limits = limits
        self.total = 0
        self.by_address: dict[str, int] = {}
        self.refused = {"total": 0, "address": 0}

    def admit(self, address: str) -> tuple[bytes, str] | None:
        """None when the connection may go on (and is counted), else (the answer that refuses it, why)."""
        if self.total >= self.limits.max_connections:
            self.refused["total"] += 1
            why = f"the gateway holds its limit of {self.limits.max_connections} connections"
            return canned_response(503, "too_many_connections", why), why
        if self.by_address.get(address, 0) >= self.limits.max_per_address:
            self.refused["address"] += 1
            why = f"more than {self.limits.max_per_address} connections from one address"
            return canned_response(429, "too_many_connections", why), why
        self.total += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1
        return None

    def release(self, address: str) -> None:
        self.total -= 1
        left = self.by_address.get(address, 1) - 1
        if left > 0:
            self.by_address[address] = left
        else:
            self.by_address.pop(address, None)


class WebsocketCounts:
    """Open websockets per tenant."""

    def __init__(self, limit: int):
        self.limit = limit
        self.by_tenant: dict[str, int] = {}

    def take(self, tenant: str) -> bool:
        if self.by_tenant.get(tenant, 0) >= self.limit:
            return False
        self.by_tenant[tenant] = self.by_tenant.get(tenant, 0) + 1
        return True

    def give_back(self, tenant: str) -> None:
        left = self.by_tenant.get(tenant, 1) - 1
        if left > 0:
            self.by_tenant[tenant] = left
        else:
            self.by_tenant.pop(tenant, None)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, admitted by the connection caps and quiet about unparsable requests."""

    def __init__(self, manager, *, guard: "GuardedServer", **kwargs):
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._address: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else str(peer)
        refusal = self._guard.counts.admit(address)
        if refusal is not None:
            answer, why = refusal
            transport.write(answer)
            transport.close()
            self._guard.logs("refused", logging.WARNING, "refusing connections (%s from %s): %s",
                             self._guard.counts.total, address, why)
            return  # never handed to aiohttp: no task, no parser
        self._address = address
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._address is None:
            return  # refused in connection_made
        self._guard.counts.release(self._address)
        self._address = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._address is not None:
            super().data_received(data)

    def eof_received(self) -> None:
        if self._address is not None:
            super().eof_received()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status < 500:  # the parser refused the request: its text may quote a header, so none of it is kept
            self._guard.logs("unparsable", logging.WARNING, "refused a request that is not valid HTTP/1.1 from %s "
                             "(%s)", getattr(request, "remote", "?"), type(exc).__name__ if exc else status)
            code, text = "bad_request", "the request is not valid HTTP/1.1 (a malformed line or header)"
        else:
            self._guard.logs("internal", logging.ERROR, "unhandled error outside the app (%s)",
                             type(exc).__name__ if exc else status)
            code, text = "internal_error", "internal server error"
        response = web.json_response(error_body(status, code, text), status=status,
                                     headers={"Server": SERVER_NAME})
        response.force_close()
        return response


class GuardedServer(web.Server):
    """aiohttp's low-level server making GuardedRequestHandlers, with one set of counts for all of them."""

    def __init__(self, handler, *, limits: ServeLimits, **kwargs):
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.counts = ConnectionCounts(limits)
        self.logs = RateLimitedLog(limits.log_every_s)

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, guard=self, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` serving the app through a GuardedServer."""

    def __init__(self, app: web.Application, limits: ServeLimits, **kwargs):
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        app = self._app
        loop = asyncio.get_running_loop()
        app._set_loop(loop)
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        # as web.Application._make_handler builds its server, with the header deadline as the keep-alive timeout
        kwargs = {"access_log_class": AccessLogger, **self._kwargs, "debug": app._debug, **(app._handler_args or {}),
                  "keepalive_timeout": self.limits.header_timeout_s,
                  # after an answer to a request whose body is still coming (a 408), read what is left for at most
                  # this long before closing (aiohttp's default, 10 s, would keep a slow sender's socket open)
                  "lingering_time": LINGERING_S}
        server = GuardedServer(app._handle, request_factory=app._make_request, loop=loop, limits=self.limits,
                               **kwargs)
        install_accept_error_log(loop, server.logs)
        return server


def install_accept_error_log(loop: asyncio.AbstractEventLoop, logs: RateLimitedLog) -> None:
    """accept() failing (EMFILE: out of file descriptors) makes asyncio log every attempt with a traceback; this
    logs it once per interval, without one. Other loop errors go to the previous handler."""
    previous = loop.get_exception_handler()

    def handler(loop, context) -> None:
        if "accept" in str(context.get("message", "")):
            logs("accept", logging.ERROR, "accepting connections fails: %s (the open-file limit?)",
                 context.get("exception") or context.get("message"))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's open-file limit to its hard limit; returns (soft, hard) after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft, hard


def fit_to_open_file_limit(limits: ServeLimits, soft: int) -> ServeLimits:
    """Connection caps below the open-file limit, with room for the process's own files and Kafka sockets: a cap
    above it would let accept() fail instead of answering over-cap clients."""
    room = max(soft - 256, 16)
    if limits.max_connections <= room:
        return limits
    log.warning("max connections %d lowered to %d: the open-file limit is %d", limits.max_connections, room, soft)
    from dataclasses import replace

    return replace(limits, max_connections=room, max_per_address=min(limits.max_per_address, room))
