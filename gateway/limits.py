"""Per-tenant request rate limiting: a token bucket per tenant, in this process's memory.

Each tenant's bucket holds up to ``burst`` tokens and refills at ``rate_per_s``; a request takes one token, and a
request that finds none is answered 429 with ``Retry-After`` (whole seconds until a token is back).

The limits are per gateway PROCESS: N gateway processes behind a load balancer let a tenant through at up to
N × rate_per_s. That is deliberate (no shared store on the request path, so intake stays at thousands of
requests/s); divide the configured rate by the number of processes, or put a shared limiter (Redis, the load
balancer) in front, when the limit must be exact. The in-flight job quota, by contrast, is counted from the
platform's job states, which every process sees (see gateway/app.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take a token: 0.0 when granted, else the seconds until one will be available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class RateLimiter:
    """One bucket per tenant id, created full on a tenant's first request; settings follow the tenant."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, tenant_id: str, rate_per_s: float, burst: int) -> float:
        """0.0 when the request may go ahead, else the seconds the client should wait."""
        now = self.clock()
        bucket = self._buckets.get(tenant_id)
        if bucket is None:
            bucket = self._buckets[tenant_id] = TokenBucket(rate_per_s, burst, float(burst), now)
        elif bucket.rate_per_s != rate_per_s or bucket.burst != burst:  # the tenants file was reloaded
            bucket.rate_per_s, bucket.burst = rate_per_s, burst
        return bucket.take(now)


def retry_after_header(wait_s: float) -> str:
    """Retry-After takes whole seconds; never 0 (that would invite an immediate retry that fails again)."""
    return str(max(1, math.ceil(wait_s)))
