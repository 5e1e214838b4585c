"""Fleet-wide quotas (gateway/quota.py): the fold of vidgen.quota as a plain function, and FleetQuota's ordering of
its own records with every other gateway's. (Two gateways on the real broker: tests/test_gateway_ws_integration.py.)"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from gateway.quota import CLAIM, HOUR_MS, RELEASE, FleetQuota, QuotaLedger
from gateway.tenants import Tenant
from streams.events import new_event

T0 = 1_800_000_000_000


def claim(job_id, at=T0, tenant="acme", in_flight=2, per_hour=1000, gateway="g1"):
    return new_event(job_id, timestamp=at, tenant=tenant, action=CLAIM, gateway_id=gateway, max_in_flight=in_flight,
                     max_per_hour=per_hour, reason="")


def release(job_id, at=T0, tenant="acme", gateway="g1"):
    return new_event(job_id, timestamp=at, tenant=tenant, action=RELEASE, gateway_id=gateway, max_in_flight=0,
                     max_per_hour=0, reason="ended")


def test_claims_are_granted_in_log_order_up_to_the_in_flight_limit_and_releases_give_room_back():
    ledger = QuotaLedger()
    verdicts = [ledger.apply(claim(j)) for j in ("a", "b", "c")]
    assert [v.granted for v in verdicts] == [True, True, False]
    assert verdicts[2].code == "in_flight_limit" and verdicts[2].retry_after_s is None
    assert ledger.apply(claim("a")).granted, "the same job claimed again (another gateway, one key): one place"
    assert ledger.in_flight("acme") == 2 and ledger.in_flight("globex") == 0
    assert ledger.apply(claim("x", tenant="globex")).granted, "tenants are counted apart"
    assert ledger.apply(release("zzz")) is None and ledger.in_flight("acme") == 2, "an unknown job: nothing"
    ledger.apply(release("a"))
    ledger.apply(release("a"))  # written by two gateways: once is enough
    assert ledger.in_flight("acme") == 1
    assert ledger.apply(claim("c")).granted
    assert not ledger.apply(claim("d")).granted


def test_the_limits_are_the_claims_own():
    ledger = QuotaLedger()
    assert [ledger.apply(claim(j, in_flight=1)).granted for j in ("a", "b")] == [True, False]
    assert ledger.apply(claim("b", in_flight=3)).granted, "a gateway with a newer tenants file"


def test_the_hourly_limit_counts_creations_in_the_hour_before_each_claim():
    ledger = QuotaLedger()
    for n, at in enumerate((T0, T0 + 1000, T0 + 2000)):
        assert ledger.apply(claim(f"j{n}", at=at, in_flight=100, per_hour=3)).granted
        ledger.apply(release(f"j{n}", at=at + 10))  # ended at once: in flight does not hold them back
    refused = ledger.apply(claim("j3", at=T0 + 600_000, in_flight=100, per_hour=3))
    assert not refused.granted and refused.code == "hourly_limit"
    assert refused.retry_after_s == pytest.approx((HOUR_MS - 600_000) / 1000)  # when j0 leaves the window
    assert ledger.apply(claim("j4", at=T0 + HOUR_MS, in_flight=100, per_hour=3)).granted
    assert not ledger.apply(claim("j5", at=T0 + HOUR_MS + 1, in_flight=100, per_hour=3)).granted


class Log:
    """vidgen.quota as one partition that two gateways write: ``publish_quota`` appends this gateway's record
    after whatever ``others`` wrote first (records it has not read yet)."""

    def __init__(self):
        self.records: list[dict] = []
        self.others: list[dict] = []

    async def publish_quota(self, record):
        self.records.extend(self.others)
        self.others = []
        self.records.append(record)
        return 0, len(self.records) - 1


class NoJobs:
    def state(self, job_id):
        return None


def test_a_claim_waits_for_other_gateways_records_before_it_and_counts_them():
    async def scenario():
        log = Log()
        quota = FleetQuota(log, NoJobs(), gateway_id="g1")
        tenant = Tenant("acme", max_in_flight=2)
        assert (await quota.claim(tenant, "mine-1")).granted  # one writer: decided from its own acknowledgement
        log.others = [claim("theirs", gateway="g2")]  # another gateway took the last place just before us
        waiting = asyncio.create_task(quota.claim(tenant, "mine-2"))
        await asyncio.sleep(0.05)
        assert not waiting.done(), "decided before the record ahead of it was read"
        quota._known(0, 1, log.records[1], read=True)  # the follower brings it
        verdict = await asyncio.wait_for(waiting, 1)
        assert not verdict.granted and verdict.code == "in_flight_limit"
        assert quota.in_flight("acme") == 2

        # A record the follower read past (not a claim: a gap) does not hold the fold up.
        log.others = [None]
        waiting = asyncio.create_task(quota.claim(Tenant("globex"), "g-1"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        quota._known(0, 4, log.records[4], read=True)  # the follower's next record is our own claim, past the gap
        assert (await asyncio.wait_for(waiting, 1)).granted

    asyncio.run(scenario())


class Jobs:
    def __init__(self):
        self.states = {}

    def state(self, job_id):
        state = self.states.get(job_id)
        return None if state is None else SimpleNamespace(terminal=state["terminal"],
                                                          finished_at=state.get("finished_at"))


def test_the_sweep_releases_ended_jobs_at_once_when_they_are_its_own_and_after_a_grace_when_not():
    async def scenario():
        from streams.events import now_ms

        log, jobs = Log(), Jobs()
        quota = FleetQuota(log, jobs, gateway_id="g1")
        tenant = Tenant("acme", max_in_flight=6)
        for job_id in ("mine", "running"):
            assert (await quota.claim(tenant, job_id)).granted
        log.others = [claim("theirs", at=now_ms(), gateway="g2", in_flight=6),
                      claim("theirs-old", at=now_ms(), gateway="g2", in_flight=6),
                      claim("orphan", at=now_ms() - 61_000, gateway="g3", in_flight=6)]
        waiting = asyncio.create_task(quota.claim(tenant, "last"))
        await asyncio.sleep(0.01)
        for offset, record in enumerate(log.records):  # the follower reads the partition
            quota._known(0, offset, record, read=True)
        assert (await asyncio.wait_for(waiting, 1)).granted
        assert quota.in_flight("acme") == 6
        jobs.states = {"mine": {"terminal": True, "finished_at": now_ms()},
                       "running": {"terminal": False},
                       "theirs": {"terminal": True, "finished_at": now_ms()},
                       "theirs-old": {"terminal": True, "finished_at": now_ms() - 6_000},
                       "last": {"terminal": False}}
        assert await quota.sweep() == 3  # mine (own, at once), theirs-old (past the grace), orphan (never seen)
        released = {r["job_id"]: r["reason"] for r in log.records if r["action"] == RELEASE}
        assert released == {"mine": "ended", "theirs-old": "ended", "orphan": "never requested"}
        assert quota.in_flight("acme") == 3  # running, theirs, last

    asyncio.run(scenario())


def test_a_jobs_end_in_the_view_releases_it_at_once_if_it_is_this_gateways_and_after_the_grace_if_not(monkeypatch):
    import gateway.quota
    from tests.fakes import FakeJobsView
    from tests.test_job_state import requested

    monkeypatch.setattr(gateway.quota, "RELEASE_GRACE_S", 0.05)

    async def scenario():
        log, jobs = Log(), FakeJobsView()
        quota = FleetQuota(log, jobs, gateway_id="g1")
        await quota.start()  # no follower: this process is the only writer
        tenant = Tenant("acme", max_in_flight=5)
        for job_id in ("mine", "theirs"):
            jobs.fold(*requested(job_id))
        assert (await quota.claim(Tenant("globex"), "elsewhere")).granted  # offset 0
        log.others = [claim("theirs", gateway="g2", in_flight=5)]  # another gateway's, just before ours
        mine = asyncio.create_task(quota.claim(tenant, "mine"))
        await asyncio.sleep(0.01)
        quota._known(0, 1, log.records[1], read=True)  # the follower reads it
        assert (await mine).granted and quota.in_flight("acme") == 2
        jobs.fail("mine")
        jobs.fail("theirs")
        await asyncio.sleep(0.01)
        assert [r["job_id"] for r in log.records if r["action"] == RELEASE] == ["mine"]
        await asyncio.sleep(0.1)
        assert [r["job_id"] for r in log.records if r["action"] == RELEASE] == ["mine", "theirs"]
        assert quota.in_flight("acme") == 0
        await quota.stop()

    asyncio.run(scenario())
