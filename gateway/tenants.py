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

import contextlib
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

log = logging.getLogger(__name__)

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
        self._seen = _file_identity(self.path)

    def reload_if_changed(self) -> bool:
        """Read the tenants file again if it changed since it was read (`vidgen tenants` rewrites it atomically);
        True if the tenants changed. A file that cannot be used is logged and the tenants stay as they were: a
        typo in the file must not lock every client out."""
        seen = _file_identity(self.path)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            fresh = TenantStore.load(self.path)
        except TenantError as exc:
            log.error("tenants: %s; keeping the %d tenants read before", exc, len(self._tenants))
            return False
        self._tenants, self._by_digest = fresh._tenants, fresh._by_digest
        log.info("tenants: %d tenants read again from %s", len(self._tenants), self.path)
        return True

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

    def rotate_key(self, tenant_id: str, keep_old: bool = False) -> str:
        """A new key for the tenant; its other keys are revoked unless ``keep_old`` (a grace period for clients
        being moved over: revoke them later with another rotation)."""
        tenant = self._existing(tenant_id)
        key = generate_key()
        self._put(replace(tenant, key_sha256=(*(tenant.key_sha256 if keep_old else ()), hash_key(key))))
        return key

    def set_limits(self, tenant_id: str, **limits) -> Tenant:
        """Change a tenant's tier or limits (the Tenant fields: tier, rate_per_s, burst, max_in_flight, max_per_hour,
        max_blocked_per_hour); None leaves one as it is."""
        tenant = self._existing(tenant_id)
        unknown = set(limits) - LIMIT_FIELDS
        if unknown:
            raise TenantError(f"unknown settings {', '.join(sorted(unknown))}; settings: {', '.join(LIMIT_FIELDS)}")
        changed = replace(tenant, **{k: v for k, v in limits.items() if v is not None})
        self._put(changed)
        return changed

    def remove(self, tenant_id: str) -> None:
        """The tenant and its keys go (its jobs stay on the log; a new tenant of the same id would see them)."""
        tenant = self._existing(tenant_id)
        for digest in tenant.key_sha256:
            self._by_digest.pop(digest, None)
        del self._tenants[tenant_id]

    def _existing(self, tenant_id: str) -> Tenant:
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            raise TenantError(f"no tenant {tenant_id!r}")
        return tenant

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
        self._seen = _file_identity(path)
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


#: What ``set_limits`` may change.
LIMIT_FIELDS = frozenset({"tier", "rate_per_s", "burst", "max_in_flight", "max_per_hour", "max_blocked_per_hour"})


def _file_identity(path: Path | None) -> tuple | None:
    try:
        stat = path.stat() if path is not None else None
    except OSError:
        return None
    return None if stat is None else (stat.st_ino, stat.st_mtime_ns, stat.st_size)


@contextlib.contextmanager
def locked(path: Path):
    """One `vidgen tenants` change at a time on this file (an advisory lock beside it)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    """``vidgen tenants add|list|rotate-key|remove|set-limits``: change the tenants file, which running gateways
    read again within a second. A new key is printed once; only its SHA-256 is stored."""
    import argparse
    import sys

    from streams.settings import load_settings

    parser = argparse.ArgumentParser(prog="vidgen tenants", description="change the gateway's tenants file; running "
                                     "gateways read it again within a second")
    parser.add_argument("--file", default=None, help="the tenants file (default: VIDGEN_TENANTS or "
                                                     "<var>/tenants.toml)")
    sub = parser.add_subparsers(dest="action", required=True)

    def limit_options(p, defaults: bool) -> None:
        p.add_argument("--tier", choices=TIERS, default="standard" if defaults else None)
        for name, kind, default in (("rate-per-s", float, 10.0), ("burst", int, 20), ("max-in-flight", int, 20),
                                    ("max-per-hour", int, 1000), ("max-blocked-per-hour", int, 30)):
            p.add_argument(f"--{name}", type=kind, default=default if defaults else None)

    add = sub.add_parser("add", help="a new tenant with one key (printed once)")
    add.add_argument("tenant")
    limit_options(add, defaults=True)
    sub.add_parser("list", help="the tenants, their tiers and limits (never keys)")
    rotate = sub.add_parser("rotate-key", help="a new key (printed once); the old ones stop working")
    rotate.add_argument("tenant")
    rotate.add_argument("--keep-old", action="store_true", help="keep the old keys valid too (rotate again later)")
    remove = sub.add_parser("remove", help="remove a tenant and its keys")
    remove.add_argument("tenant")
    limits = sub.add_parser("set-limits", help="change a tenant's tier or limits")
    limits.add_argument("tenant")
    limit_options(limits, defaults=False)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    path = Path(args.file) if args.file else tenants_path(load_settings())
    try:
        with locked(path):
            store = TenantStore.load(path) if path.exists() else TenantStore(path=path)
            fields = {name: getattr(args, name, None) for name in LIMIT_FIELDS}
            if args.action == "list":
                print(f"{'tenant':<24} {'tier':<9} {'rate/s':>8} {'burst':>6} {'in flight':>9} {'per hour':>9} "
                      f"{'blocked/h':>9} {'keys':>4}")
                for t in store:
                    print(f"{t.id:<24} {t.tier:<9} {t.rate_per_s:>8g} {t.burst:>6} {t.max_in_flight:>9} "
                          f"{t.max_per_hour:>9} {t.max_blocked_per_hour:>9} {len(t.key_sha256):>4}")
                return 0
            if args.action == "add":
                _, key = store.create_tenant(args.tenant, **fields)
            elif args.action == "rotate-key":
                key = store.rotate_key(args.tenant, keep_old=args.keep_old)
            elif args.action == "remove":
                store.remove(args.tenant)
                key = None
            else:
                store.set_limits(args.tenant, **fields)
                key = None
            store.save(path)
    except TenantError as exc:
        print(f"vidgen tenants: {exc}", file=sys.stderr)
        return 2
    if key is not None:
        print(f"API key of tenant {args.tenant} (shown once; only its hash is stored):\n  {key}")
    else:
        print(f"{path}: tenant {args.tenant} {'removed' if args.action == 'remove' else 'updated'}")
    return 0
