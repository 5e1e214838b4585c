"""Fleet-wide quotas: a tenant's jobs in flight and jobs created per hour, held however many gateways take requests.

A quota a gateway counts in its own memory lets N gateways admit N times the limit. So room in a tenant's quotas
is claimed on ``vidgen.quota`` (key: the tenant, so all of one tenant's records are in one order), and every
gateway folds that order the same way (``QuotaLedger``, a plain function of the records): a claim is granted when,
at its place in the log, the tenant holds fewer than ``max_in_flight`` jobs and created fewer than ``max_per_hour``
in the hour before it; a release gives a job's room back. Whichever gateway reads the log decides each claim
alike, so no two gateways can both take the last place. The limits travel in the claim, so the decision does not
depend on which gateway's tenants file is newer.

Admitting a job (``FleetQuota.claim``), in order:

1. If the tenant is at its limit in this gateway's fold, release first those of its held jobs that have ended (the
   view says so), so a client that waited for a job to end is not refused because the release is still on its way.
   A claim the fold would refuse now is refused without being written (a flood over the limit costs the log
   nothing); only a release not yet read could make that wrong, and a retry then succeeds.
2. Write the claim and learn its offset from the broker's acknowledgement.
3. Wait until the fold has applied every record before that offset: this gateway's own records are known from
   their acknowledgements, so with one gateway (or no other gateway writing at that moment) the claim is decided
   at once; otherwise the follower thread reads the others' records (at the progress latency while a claim waits).
4. The fold's verdict: granted, or refused with the limit that refused it (and, for the hourly one, when room
   comes back). A granted job whose request then cannot be published is released at once.

Room comes back through releases, written by any gateway as its view sees the job end: at once by the gateway that
claimed it, by any other ``RELEASE_GRACE_S`` after the end (the claiming gateway may be gone). A sweep through every
held job every ``SWEEP_S`` releases what ended before the gateway started, and a job no gateway ever saw requested
(its gateway died between the claim and the request) ``ORPHAN_S`` after the claim. A release written twice changes
nothing the second time.

The follower reads the topic from its start (its retention is two days: claims older than that are of no
use), so a gateway that starts knows every held job. What is not enforced: requests published on
``vidgen.requested`` by other producers than the gateways (upstream services) claim nothing.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
import time
import uuid
from dataclasses import dataclass

from consumers.job_state import epoch_ms
from streams import topics
from streams.events import new_event, now_ms

log = logging.getLogger(__name__)

HOUR_MS = 3600 * 1000
#: How often a gateway looks through every held job for those that ended unnoticed (its view tells it of each end as
#: it happens; this catches what happened before it started, and jobs that were never requested).
SWEEP_S = 15.0
#: A job that ended is released by its own gateway at once, by any other after this long.
RELEASE_GRACE_S = 5.0
#: A held job that no gateway has seen requested this long after its claim is released (its gateway died).
ORPHAN_S = 60.0
#: The quota follower's poll while a claim waits, and while none does (a claim that starts waiting is seen within it).
BUSY_POLL_S, IDLE_POLL_S = 0.02, 0.25
#: How long a request waits for its claim's verdict before it is answered 503 (the follower is stuck or gone).
VERDICT_TIMEOUT_S = 10.0
CLAIM, RELEASE = "CLAIM", "RELEASE"
_MISSING = object()


class QuotaUnavailable(RuntimeError):
    """A claim could not be decided (the message says why): the request is answered 503, to be retried."""


@dataclass(frozen=True)
class Verdict:
    granted: bool
    code: str = ""  # when refused: in_flight_limit or hourly_limit
    message: str = ""
    retry_after_s: float | None = None  # when room comes back, if that can be known (the hourly limit)


@dataclass
class _Held:
    claimed_ms: int
    gateway_id: str


class _TenantQuota:
    __slots__ = ("held", "created")

    def __init__(self):
        self.held: dict[str, _Held] = {}  # job id → its claim, while the job holds room
        self.created: collections.deque = collections.deque()  # (claimed_ms, job id) of the last hour's grants


class QuotaLedger:
    """The fold of ``vidgen.quota``: records in log order in, each claim's verdict out. Knows no Kafka."""

    def __init__(self):
        self.tenants: dict[str, _TenantQuota] = {}

    def tenant(self, tenant_id: str) -> _TenantQuota:
        quota = self.tenants.get(tenant_id)
        if quota is None:
            quota = self.tenants[tenant_id] = _TenantQuota()
        return quota

    def apply(self, record: dict) -> Verdict | None:
        """Fold one record; a claim's verdict (None for a release)."""
        quota, job_id, at = self.tenant(record["tenant"]), record["job_id"], epoch_ms(record["timestamp"])
        if record["action"] == RELEASE:
            quota.held.pop(job_id, None)
            return None
        if job_id in quota.held:  # the same job claimed again (two gateways, one Idempotency-Key): one place
            return Verdict(True)
        refused = self.refusal(record["tenant"], int(record["max_in_flight"]), int(record["max_per_hour"]), at)
        if refused is not None:
            return refused
        quota.held[job_id] = _Held(at, record["gateway_id"])
        quota.created.append((at, job_id))
        return Verdict(True)

    def refusal(self, tenant_id: str, max_in_flight: int, max_per_hour: int, at: int) -> Verdict | None:
        """The verdict on a claim at time ``at`` if it would be refused, else None."""
        quota = self.tenant(tenant_id)
        while quota.created and quota.created[0][0] <= at - HOUR_MS:
            quota.created.popleft()
        if len(quota.held) >= max_in_flight:
            return Verdict(False, "in_flight_limit", f"this tenant has {max_in_flight} jobs in flight, its limit; "
                                                     "retry when one has ended")
        if len(quota.created) >= max_per_hour:
            wait_s = (quota.created[0][0] + HOUR_MS - at) / 1000.0
            return Verdict(False, "hourly_limit", f"this tenant created {max_per_hour} jobs in the last hour, its "
                                                  "limit", retry_after_s=max(wait_s, 1.0))
        return None

    def in_flight(self, tenant_id: str) -> int:
        quota = self.tenants.get(tenant_id)
        return 0 if quota is None else len(quota.held)


class _Partition:
    """One partition's records, applied in offset order. Records come from two sides: this gateway's own, known
    from their acknowledgements, and the follower's, which reads every record in order (so once it delivers
    offset o, any offset below o it did not deliver does not exist)."""

    __slots__ = ("next", "waiting", "floor")

    def __init__(self, start: int):
        self.next = start  # the next offset to apply
        self.waiting: dict[int, dict] = {}  # offset → record, not applied yet
        self.floor = start  # every offset below it has been read by the follower


class FleetQuota:
    """The gateway's side of the quotas: claims, releases, the follower and the sweep (see the module's doc).

    ``publisher.publish_quota(record)`` writes a record and returns (partition, offset) once acknowledged;
    ``follower``: a ``QuotaFollower`` (reads every gateway's records) or None when this process is the only writer
    (tests over an in-memory publisher). ``jobs``: the gateway's JobsView (which jobs have ended)."""

    def __init__(self, publisher, jobs, follower: "QuotaFollower | None" = None, gateway_id: str | None = None):
        self.publisher, self.jobs, self.follower = publisher, jobs, follower
        self.gateway_id = gateway_id or f"gateway-{uuid.uuid4().hex[:12]}"
        self.ledger = QuotaLedger()
        self.partitions: dict[int, _Partition] = {}
        self.verdicts: dict[str, asyncio.Future] = {}  # claim event id → its verdict, while it is awaited
        self._releasing: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life ---------------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.follower is not None:
            starts = await self._loop.run_in_executor(None, self.follower.open, lambda: bool(self.verdicts))
            self.partitions = {partition: _Partition(offset) for partition, offset in starts.items()}
            # Every record there is, applied before the first claim is decided (a claim waits for them anyway).
            await self._loop.run_in_executor(None, self.follower.follow, self._from_follower, self._applied)
        if hasattr(self.jobs, "add_end_listener"):
            self.jobs.add_end_listener(self._job_ended)
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self.follower is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.follower.stop)

    # -- claims and releases ------------------------------------------------------------------------------------------
    async def claim(self, tenant, job_id: str) -> Verdict:
        """Room for ``job_id`` in the quotas of ``tenant`` (a gateway.tenants.Tenant), decided in log order."""
        if self.ledger.in_flight(tenant.id) >= tenant.max_in_flight:  # 1. what ended gives its room back first
            await asyncio.gather(*(self.release(tenant.id, held, why)
                                   for held, why in self._ended(tenant.id, grace_s=0.0, everyone=True)))
        # What the log would refuse as this gateway knows it is refused without a claim (a flood of requests over
        # the limit writes nothing). Only a release not read yet could make it wrong, and then a retry succeeds.
        refused = self.ledger.refusal(tenant.id, tenant.max_in_flight, tenant.max_per_hour, now_ms())
        if refused is not None:
            return refused
        record = self._record(job_id, tenant.id, CLAIM, max_in_flight=tenant.max_in_flight,
                              max_per_hour=tenant.max_per_hour)
        verdict = self.verdicts[record["event_id"]] = asyncio.get_running_loop().create_future()
        try:
            partition, offset = await self.publisher.publish_quota(record)  # 2.
            self._known(partition, offset, record)  # 3. (and the follower's records, as they come)
            try:
                return await asyncio.wait_for(verdict, VERDICT_TIMEOUT_S)  # 4.
            except asyncio.TimeoutError:
                # The claim is on the log and may be granted there: released, so that it holds nothing if it was.
                self.release_soon(tenant.id, job_id, "not decided in time")
                raise QuotaUnavailable(f"the quota claim of job {job_id} was not decided within "
                                       f"{VERDICT_TIMEOUT_S:g} s (the quota log is not being read)") from None
        finally:
            self.verdicts.pop(record["event_id"], None)

    async def release(self, tenant_id: str, job_id: str, reason: str) -> None:
        """Give the job's room back (written once per gateway at a time; idempotent in the fold)."""
        if (tenant_id, job_id) in self._releasing:
            return
        self._releasing.add((tenant_id, job_id))
        try:
            record = self._record(job_id, tenant_id, RELEASE, reason=reason)
            partition, offset = await self.publisher.publish_quota(record)
            self._known(partition, offset, record)
        except Exception as exc:  # noqa: BLE001 - the sweep tries again
            log.warning("quota: releasing job %s of %s failed (%s); the sweep retries", job_id, tenant_id, exc)
        finally:
            self._releasing.discard((tenant_id, job_id))

    def release_soon(self, tenant_id: str, job_id: str, reason: str) -> None:
        """``release`` in a task of its own (from a request that is failing, which may be cancelled)."""
        task = asyncio.get_running_loop().create_task(self.release(tenant_id, job_id, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _record(self, job_id: str, tenant_id: str, action: str, **fields) -> dict:
        return new_event(job_id, tenant=tenant_id, action=action, gateway_id=self.gateway_id,
                         **{"max_in_flight": 0, "max_per_hour": 0, "reason": "", **fields})

    def in_flight(self, tenant_id: str) -> int:
        return self.ledger.in_flight(tenant_id)

    # -- the fold, in offset order ------------------------------------------------------------------------------------
    def _known(self, partition: int, offset: int, record: dict, *, read: bool = False) -> None:
        """A record and where it is; applies whatever is now contiguous on its partition. On the loop thread."""
        part = self.partitions.get(partition)
        if part is None:  # no follower: this process writes every record there is
            part = self.partitions[partition] = _Partition(offset)
        if offset >= part.next:
            part.waiting[offset] = record
        if read:
            part.floor = max(part.floor, offset)
        while True:
            record = part.waiting.pop(part.next, _MISSING)
            if record is _MISSING:
                if part.next < part.floor:  # no record there (the follower read past it): nothing to apply
                    part.next += 1
                    continue
                return
            part.next += 1
            if record is None:  # a record that is not a quota record (logged by the follower)
                continue
            verdict = self.ledger.apply(record)
            waiter = self.verdicts.get(record["event_id"])
            if waiter is not None and verdict is not None and not waiter.done():
                waiter.set_result(verdict)

    def _applied(self, partition: int) -> int:
        """From the follower's thread: offsets below this are applied already (this gateway's own records, known
        from their acknowledgements), so the follower need not decode them. (An int read: atomic.)"""
        part = self.partitions.get(partition)
        return -1 if part is None else part.next

    def _from_follower(self, partition: int, offset: int, record: dict | None) -> None:
        """From the follower's thread."""
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(functools.partial(self._known, partition, offset, record, read=True))

    # -- the sweep ----------------------------------------------------------------------------------------------------
    def _job_ended(self, tenant_id: str, job_id: str) -> None:
        """The view saw a job end: its room goes back — at once if this gateway claimed it, else after the grace
        (its own gateway's release normally comes first)."""
        quota = self.ledger.tenants.get(tenant_id)
        held = quota.held.get(job_id) if quota else None
        if held is None:
            return
        if held.gateway_id == self.gateway_id:
            self.release_soon(tenant_id, job_id, "ended")
        else:
            self._loop.call_later(RELEASE_GRACE_S, self._release_if_held, tenant_id, job_id)

    def _release_if_held(self, tenant_id: str, job_id: str) -> None:
        quota = self.ledger.tenants.get(tenant_id)
        if quota is not None and job_id in quota.held:
            self.release_soon(tenant_id, job_id, "ended")

    def _ended(self, tenant_id: str, grace_s: float, everyone: bool) -> list[tuple[str, str]]:
        """(job id, why) of held jobs of the tenant to release: ended (this gateway's at once, others' after
        ``grace_s``; any gateway's when ``everyone``), or never seen requested ``ORPHAN_S`` after their claim."""
        now = now_ms()
        quota = self.ledger.tenants.get(tenant_id)
        ended = []
        for job_id, held in list(quota.held.items()) if quota else ():
            state = self.jobs.state(job_id)
            if state is None:
                if now - held.claimed_ms > ORPHAN_S * 1000:
                    ended.append((job_id, "never requested"))
            elif state.terminal:
                if everyone or held.gateway_id == self.gateway_id or now - (state.finished_at or 0) > grace_s * 1000:
                    ended.append((job_id, "ended"))
        return ended

    async def sweep(self) -> int:
        """Release every held job that ended or was never requested (see ``_ended``); how many were released."""
        released = 0
        for tenant_id in list(self.ledger.tenants):
            for job_id, why in self._ended(tenant_id, RELEASE_GRACE_S, everyone=False):
                await self.release(tenant_id, job_id, why)
                released += 1
        return released

    async def _sweep_forever(self) -> None:
        while True:  # first at once: what ended while no gateway was running is released at start
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("quota: the sweep failed")
            await asyncio.sleep(SWEEP_S)


class QuotaFollower:
    """Reads every partition of ``vidgen.quota`` from its start and hands (partition, offset, record) to
    ``FleetQuota``: the history first, then, on a thread, what comes — at the progress latency while a claim waits
    (``busy()``), in the background otherwise."""

    def __init__(self, settings):
        self.settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._follower = self._codec = None

    def open(self, busy) -> dict[int, int]:
        """Assign every partition at its start; returns the start offsets (blocking)."""
        self._busy = busy
        from streams.kafka import Latency, TopicFollower
        from streams.serde import event_codec

        self._codec = event_codec(self.settings)
        self._follower = TopicFollower(self.settings, topics.QUOTA, "vidgen-gateway-quota", start="beginning",
                                       latency=lambda: Latency.PROGRESS if busy() else Latency.BACKGROUND,
                                       latencies=(Latency.PROGRESS, Latency.BACKGROUND))
        return dict(self._follower.next)

    def follow(self, deliver, applied) -> None:
        """Read to the end (blocking), then follow on a thread. ``applied(partition)``: offsets below it need no
        decoding (their records are known already)."""
        def handle(msg) -> None:
            partition, offset = msg.partition(), msg.offset()
            deliver(partition, offset, None if offset < applied(partition) else self._decode(msg))

        count = self._follower.read_to_end(handle)
        log.info("quota: %d records of %s read", count, topics.QUOTA.name)
        self._thread = threading.Thread(target=self._follow, args=(handle,), name="gateway-quota", daemon=True)
        self._thread.start()

    def _decode(self, msg) -> dict | None:
        from schemas.codec import DecodeError, RegistryUnavailableError

        while True:
            try:
                return self._codec.decode(topics.QUOTA.name, msg.value())
            except DecodeError as exc:  # not a claim of anyone's: every gateway skips it alike
                log.warning("quota: skipping an unreadable record at %d@%d: %s", msg.partition(), msg.offset(), exc)
                return None
            except RegistryUnavailableError as exc:  # the record may be a claim: never skipped, waited for
                log.warning("quota: %s; retrying", exc)
                if self._stop.wait(1.0):
                    return None

    def _follow(self, handle) -> None:
        try:
            while not self._stop.is_set():
                try:
                    # Short polls only while a claim waits: an idle gateway wakes four times a second, not fifty.
                    msg = self._follower.poll(BUSY_POLL_S if self._busy() else IDLE_POLL_S)
                    if msg is not None:
                        handle(msg)
                except Exception:  # noqa: BLE001 - a broker hiccup must not end the follower (claims would wait)
                    log.exception("quota: following %s failed; going on", topics.QUOTA.name)
                    self._stop.wait(0.5)
        finally:
            self._follower.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
