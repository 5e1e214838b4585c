"""Tenants and their API keys: who may call the gateway, at which tier, how fast and how much at once.

Tenants live in a TOML file, ``<var>/tenants.toml`` by default or the path in ``VIDGEN_TENANTS``::

    [tenants.acme]
    tier = "premium"          # the highest tier its jobs may run at (a request may ask for a lower one)
    rate_per_s = 20.0         # sustained requests per second (token bucket refill), per gateway process
    burst = 40                # bucket size: requests that may come at once
    max_in_flight = 50        # jobs not yet finished (published, flagged, failed, cancelled) at any time
    max_per_hour = 1000       # jobs created in any hour (every gateway together: gateway/quota.py)
    max_blocked_per_hour = 30 # prompts refused by the safety policy in the last hour before creation is throttled
    key_sha256 = ["9f86d0...", "..."]   # SHA-256 (hex) of each API key; the keys themselves are never stored

``create_tenant`` / ``add_key`` generate a key (``vg_`` + 32 random bytes, URL-safe base64), store only its
hash and return the key once. When no file exists, ``load_or_create`` writes one with a development tenant
``dev`` and returns its key so that the CLI can print it (once: it cannot be recovered afterwards).

Why a plain SHA-256 and not a password hash (bcrypt, scrypt, argon2): those are slow on purpose, to make guessing
a low-entropy *password* from a stolen hash expensive. An API key here is 256 random bits: no guessing of it is
feasible however fast the hash, so a slow hash would only add milliseconds to every request. Keys are looked
up by their digest (a dict), then confirmed with ``hmac.compare_digest``: timing can only tell an attacker how
the digest of their *own* guess compares with stored digests, and SHA-256's preimage resistance makes that
worthless for forging a key.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from streams.topics import TIERS

TENANTS_FILE = "tenants.toml"
KEY_PREFIX = "vg_"
DEV_TENANT = "dev"
_TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Lower number = higher tier. A tenant may ask for its own tier or a lower one.
TIER_RANK = {tier: rank for rank, tier in enumerate(TIERS)}  # premium 0, standard 1, free 2


class TenantError(ValueError):
    """A tenants file or a tenant definition that cannot be used (the message says why)."""


#: An API key as it may appear in text (a header line quoted in an error, a URL with ?api_key=).
_KEY_IN_TEXT = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_\-]{6,}")


def redact_keys(text: str) -> str:
    return _KEY_IN_TEXT.sub(KEY_PREFIX + "<redacted>", text)


class RedactKeys(logging.Filter):
    """On a log handler: API keys in a record's message or traceback are replaced before anything is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if KEY_PREFIX in message:
            record.msg, record.args = redact_keys(message), ()
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            if KEY_PREFIX in text:
                record.exc_text, record.exc_info = redact_keys(text), None
        return True


def install_key_redaction(logger: logging.Logger | None = None) -> None:
    """Every handler of ``logger`` (the root logger by default) redacts API keys."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactKeys) for f in handler.filters):
            handler.addFilter(RedactKeys())


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Tenant:
    id: str
    tier: str = "standard"
    rate_per_s: float = 10.0
    burst: int = 20
    max_in_flight: int = 20
    key_sha256: tuple[str, ...] = field(default=(), repr=False)
    max_per_hour: int = 1000
    max_blocked_per_hour: int = 30

    def __post_init__(self):
        if not _TENANT_ID.match(self.id):
            raise TenantError(f"tenant id {self.id!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if self.tier not in TIER_RANK:
            raise TenantError(f"tenant {self.id}: unknown tier {self.tier!r}; tiers: {', '.join(TIERS)}")
        if (not self.rate_per_s > 0 or self.burst < 1 or self.max_in_flight < 1 or self.max_per_hour < 1
                or self.max_blocked_per_hour < 1):
            raise TenantError(f"tenant {self.id}: rate_per_s must be > 0, burst, max_in_flight, max_per_hour and "
                              "max_blocked_per_hour >= 1")
        for digest in self.key_sha256:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise TenantError(f"tenant {self.id}: key_sha256 entries must be 64 lower-case hex digits")

    def allows_tier(self, tier: str) -> bool:
        return TIER_RANK[tier] >= TIER_RANK[self.tier]


class TenantStore:
    """The tenants of one gateway process, with their key digests indexed for authentication."""

    def __init__(self, tenants: list[Tenant] | tuple[Tenant, ...] = (), path: Path | None = None):
        self.path = Path(path) if path else None
        self._tenants: dict[str, Tenant] = {}
        self._by_digest: dict[str, str] = {}
        for tenant in tenants:
            self._put(tenant)

    def _put(self, tenant: Tenant) -> None:
        old = self._tenants.get(tenant.id)
        for digest in old.key_sha256 if old else ():
            self._by_digest.pop(digest, None)
        for digest in tenant.key_sha256:
            owner = self._by_digest.get(digest)
            if owner is not None and owner != tenant.id:
                raise TenantError(f"a key of tenant {tenant.id} is also a key of tenant {owner}")
            self._by_digest[digest] = tenant.id
        self._tenants[tenant.id] = tenant

    def __iter__(self):
        return iter(self._tenants.values())

    def __len__(self) -> int:
        return len(self._tenants)

    def get(self, tenant_id: str) -> Tenant | None:
        return self._tenants.get(tenant_id)

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant owning this API key, or None."""
        if not key or len(key) > 512:
            return None
        digest = hash_key(key)
        owner = self._by_digest.get(digest)
        if owner is None:
            return None
        tenant = self._tenants[owner]
        return tenant if any(hmac.compare_digest(digest, stored) for stored in tenant.key_sha256) else None

    # -- administration ------------------------------------------------------------------------------------------
    def create_tenant(self, tenant_id: str, tier: str = "standard", *, rate_per_s: float = 10.0, burst: int = 20,
                      max_in_flight: int = 20, max_per_hour: int = 1000,
                      max_blocked_per_hour: int = 30) -> tuple[Tenant, str]:
        """Add a tenant with one fresh API key; returns (tenant, key). The key is not stored, only its hash."""
        if tenant_id in self._tenants:
            raise TenantError(f"tenant {tenant_id} exists already; use add_key for another key")
        key = generate_key()
        tenant = Tenant(tenant_id, tier, float(rate_per_s), int(burst), int(max_in_flight), (hash_key(key),),
                        int(max_per_hour), int(max_blocked_per_hour))
        self._put(tenant)
        return tenant, key

    def add_key(self, tenant_id: str) -> str:
        """A new API key for an existing tenant (its other keys stay valid); returned once, stored hashed."""
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            raise TenantError(f"no tenant {tenant_id!r}")
        key = generate_key()
        self._put(replace(tenant, key_sha256=(*tenant.key_sha256, hash_key(key))))
        return key

    def revoke_key(self, tenant_id: str, key_sha256: str) -> None:
        tenant = self._tenants[tenant_id]
        self._put(replace(tenant, key_sha256=tuple(d for d in tenant.key_sha256 if d != key_sha256)))

    # -- the file ------------------------------------------------------------------------------------------------
    def save(self, path: Path | str | None = None) -> Path:
        """Write the tenants as TOML (atomically, mode 0600: the digests are not secrets, but why show them)."""
        path = Path(path or self.path or TENANTS_FILE)
        lines = ["# vidgen gateway tenants (gateway/tenants.py). Keys are stored as SHA-256 digests only.", ""]
        for t in self._tenants.values():
            lines += [f"[tenants.{json.dumps(t.id)}]", f"tier = {json.dumps(t.tier)}", f"rate_per_s = {float(t.rate_per_s)!r}",
                      f"burst = {int(t.burst)}", f"max_in_flight = {int(t.max_in_flight)}",
                      f"max_per_hour = {int(t.max_per_hour)}", f"max_blocked_per_hour = {int(t.max_blocked_per_hour)}",
                      "key_sha256 = [" + ", ".join(json.dumps(d) for d in t.key_sha256) + "]", ""]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines))
        os.replace(tmp, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: Path | str) -> "TenantStore":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TenantError(f"cannot read tenants file {path}: {exc}") from exc
        tenants = []
        known = {"tier", "rate_per_s", "burst", "max_in_flight", "key_sha256", "max_per_hour", "max_blocked_per_hour"}
        for tenant_id, entry in data.get("tenants", {}).items():
            unknown = set(entry) - known
            if unknown:
                raise TenantError(f"{path}: tenant {tenant_id}: unknown settings {', '.join(sorted(unknown))}")
            try:
                tenants.append(Tenant(tenant_id, entry.get("tier", "standard"), float(entry.get("rate_per_s", 10.0)),
                                      int(entry.get("burst", 20)), int(entry.get("max_in_flight", 20)),
                                      tuple(entry.get("key_sha256", ())), int(entry.get("max_per_hour", 1000)),
                                      int(entry.get("max_blocked_per_hour", 30))))
            except (TypeError, ValueError) as exc:
                raise TenantError(f"{path}: {exc}") from exc
        return cls(tenants, path)


def tenants_path(settings, environ: dict[str, str] | None = None) -> Path:
    """``VIDGEN_TENANTS`` if set, else ``<var>/tenants.toml``."""
    env = os.environ if environ is None else environ
    return Path(env.get("VIDGEN_TENANTS") or Path(settings.var_dir) / TENANTS_FILE)


def load_or_create(path: Path | str) -> tuple[TenantStore, str | None]:
    """The tenants in ``path``; when there is no such file, a new one with the development tenant ``dev``
    (standard tier), whose key is returned (else None) so the caller can show it once."""
    path = Path(path)
    if path.exists():
        return TenantStore.load(path), None
    store = TenantStore(path=path)
    _, key = store.create_tenant(DEV_TENANT, "standard", rate_per_s=20.0, burst=40, max_in_flight=20)
    store.save(path)
    return store, key
