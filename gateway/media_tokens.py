"""Short-lived signed tokens for one video's media URLs and websocket, so a web page never puts its API key in a URL.

A media element (``<video src>``), a plain link and a websocket cannot send an Authorization header. With an API key
in their URL, the key lands in browser history, server and proxy logs for as long as it is valid (until revoked).
Instead, the page asks ``POST /v1/videos/{id}/media-token`` (with its key in the header) for a token that grants
reading that one video's media and events, for ``TOKEN_TTL_S``, and puts ``?token=`` in those URLs.

A token is ``<signature>.<expiry, epoch seconds>.<tenant>``, the signature an HMAC-SHA256 of (tenant, video id,
expiry) under the gateways' shared secret: every gateway process that has the secret verifies it, without any
store. The secret is ``VIDGEN_GATEWAY_URL_SECRET`` (set the same value on every gateway of a fleet), else a random one
kept in ``<var>/gateway-url-secret`` (mode 0600), which the gateways of one machine share.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

#: How long a media token is valid (a page refreshes it before then).
TOKEN_TTL_S = 3600
SECRET_FILE = "gateway-url-secret"


class MediaTokens:
    def __init__(self, secret: bytes, ttl_s: int = TOKEN_TTL_S, clock=time.time):
        if len(secret) < 16:
            raise ValueError("the media-token secret must be at least 16 bytes")
        self.secret, self.ttl_s, self.clock = secret, ttl_s, clock

    @classmethod
    def from_settings(cls, settings, environ: dict[str, str] | None = None) -> "MediaTokens":
        from streams.settings import private_dir

        env = os.environ if environ is None else environ
        configured = env.get("VIDGEN_GATEWAY_URL_SECRET")
        if configured:
            return cls(configured.encode("utf-8"))
        path = private_dir(Path(settings.var_dir)) / SECRET_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls(path.read_bytes())
        with os.fdopen(fd, "wb") as f:
            secret = secrets.token_bytes(32)
            f.write(secret)
        return cls(secret)

    def _signature(self, tenant_id: str, video_id: str, expires: int) -> str:
        mac = hmac.new(self.secret, f"{tenant_id}\n{video_id}\n{expires}".encode("utf-8"), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode("ascii")

    def issue(self, tenant_id: str, video_id: str) -> tuple[str, int]:
        """(token, expiry in epoch seconds) for reading ``video_id``'s media and events as ``tenant_id``."""
        expires = int(self.clock()) + self.ttl_s
        return f"{self._signature(tenant_id, video_id, expires)}.{expires}.{tenant_id}", expires

    def verify(self, token: str, video_id: str | None) -> str | None:
        """The tenant the token speaks for, if it is valid for ``video_id`` now; else None."""
        if not token or video_id is None or len(token) > 256:
            return None
        signature, _, rest = token.partition(".")
        expires_text, _, tenant_id = rest.partition(".")
        if not expires_text.isdigit() or not tenant_id:
            return None
        expires = int(expires_text)
        if expires < self.clock():
            return None
        if not hmac.compare_digest(signature, self._signature(tenant_id, video_id, expires)):
            return None
        return tenant_id
