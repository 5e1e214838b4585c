"""The fleet's queue policy: which waiting job starts next, on which idle agent, and which running job yields.

Plain objects, no Kafka: the scheduler stage (consumers/scheduler.py) runs a ``QueuePolicy``, its unit tests call it
as functions, and a simulator can run the very same object.

Order of the waiting jobs, decided at each start:
1. **Overdue first.** A job of a preempting tier (premium by default) that has waited longer than
   ``preempt_after_s`` goes before anything else: it is the job a preemption was made for.
2. **Tier.** Smooth weighted round robin over the tiers with work waiting (streams/scheduling.py), across the whole
   fleet: with every tier backlogged, starts go 6:3:1, interleaved; a lone tier is served at once.
3. **Front of the tier.** A job that was preempted, or whose agent died or drained, goes back to the front of its
   tier (it has already waited its turn once), oldest first.
4. **Tenant.** Inside a tier, tenants with work waiting take turns, so one tenant's burst of 1,000 jobs keeps another
   tenant's single job waiting behind at most one of them per tenant.
5. **FIFO** inside a tenant.

Placement (model affinity): the job goes to an idle agent that has its model loaded; failing that, to an idle agent
with no model loaded, then to the one idle longest. A job is never held back for affinity: an idle agent always
takes the next job, loading the model if it must.

Devices: a job that needs N devices (its model's setting; 1 by default) runs only on an agent of N devices (an agent
group, gpu_agents/group.py), and an agent of N takes only such jobs. The order above is kept among the jobs that fit
the idle agents; a job no idle agent fits keeps its place for the next one that does, without holding others back.

Preemption: when an overdue job waits and no agent is idle, the running job of the lowest tier below it, least
advanced (fewest steps done), is asked to yield at its next step boundary; one preemption per overdue job.
"""
from __future__ import annotations

import copy
import heapq
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from streams.scheduling import DEFAULT_TIER_WEIGHTS, WeightedTierScheduler, validate_weights

DEFAULT_PREEMPT_AFTER_S = 30.0
DEFAULT_PREEMPTING_TIERS = ("premium",)


@dataclass
class WaitingJob:
    job_id: str
    tier: str  # lower-case tier name, a key of the tier weights
    tenant: str
    model: str
    steps: int
    queued_at: float  # seconds on the caller's clock: when the job (first) entered the queue
    steps_done: int = 0  # progress kept in its checkpoint, for a job that comes back (an estimate)
    payload: Any = None  # what the caller needs to start it (the PromptEncoded event)
    devices: int = 1  # the size of agent it runs on


@dataclass
class AgentView:
    """What the policy needs of an agent: its models, and its job when it runs one."""

    agent_id: str
    models: frozenset[str] = frozenset()
    idle_since: float = 0.0
    job_id: str | None = None
    tier: str | None = None
    step: int = 0
    total_steps: int = 0
    devices: int = 1  # an agent group's size


class TierQueue:
    """One tier's waiting jobs: the front (jobs that came back), then tenants in turn, FIFO inside a tenant."""

    def __init__(self) -> None:
        self.front: deque[WaitingJob] = deque()
        self.tenants: OrderedDict[str, deque[WaitingJob]] = OrderedDict()  # next tenant to serve first

    def __len__(self) -> int:
        return len(self.front) + sum(len(jobs) for jobs in self.tenants.values())

    def push(self, job: WaitingJob, front: bool = False) -> None:
        if front:
            # Oldest first among the jobs that came back: a job resumed twice keeps its place.
            index = next((i for i, other in enumerate(self.front) if other.queued_at > job.queued_at), len(self.front))
            self.front.insert(index, job)
        else:
            self.tenants.setdefault(job.tenant, deque()).append(job)  # a new tenant waits one turn of each other

    def pop(self, fits: Callable[[WaitingJob], bool] | None = None) -> WaitingJob | None:
        """The next job (that ``fits``; None if none does)."""
        for job in self.front:
            if fits is None or fits(job):
                self.front.remove(job)
                return job
        for tenant, jobs in self.tenants.items():
            job = next((job for job in jobs if fits is None or fits(job)), None)
            if job is None:
                continue  # this tenant keeps its turn
            jobs.remove(job)
            del self.tenants[tenant]
            if jobs:
                self.tenants[tenant] = jobs  # to the back of the turn
            return job
        return None

    def has(self, fits: Callable[[WaitingJob], bool] | None) -> bool:
        return bool(len(self)) if fits is None else any(fits(job) for job in self.in_order())

    def remove(self, job_id: str) -> WaitingJob | None:
        if (found := _remove_from(self.front, job_id)) is not None:
            return found
        for tenant, jobs in self.tenants.items():
            if (found := _remove_from(jobs, job_id)) is not None:
                if not jobs:
                    del self.tenants[tenant]
                return found
        return None

    def in_order(self) -> Iterator[WaitingJob]:
        """The order pop() would take them in, if nothing else arrived."""
        yield from self.front
        queues = [list(jobs) for jobs in self.tenants.values()]
        for rank in range(max((len(q) for q in queues), default=0)):
            for jobs in queues:
                if rank < len(jobs):
                    yield jobs[rank]


def _remove_from(jobs: deque[WaitingJob], job_id: str) -> WaitingJob | None:
    for job in jobs:
        if job.job_id == job_id:
            jobs.remove(job)
            return job
    return None


@dataclass
class QueuePolicy:
    tier_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIER_WEIGHTS))
    #: An overdue job of these tiers goes first and may preempt; None: never preempt.
    preempt_after_s: float | None = DEFAULT_PREEMPT_AFTER_S
    preempting_tiers: tuple[str, ...] = DEFAULT_PREEMPTING_TIERS

    def __post_init__(self) -> None:
        self.tier_weights = validate_weights(self.tier_weights)
        unknown = set(self.preempting_tiers) - set(self.tier_weights)
        if unknown:
            raise ValueError(f"preempting tiers {sorted(unknown)} are not among the tiers {list(self.tier_weights)}")
        if self.preempt_after_s is not None and self.preempt_after_s < 0:
            raise ValueError(f"preempt_after_s must be at least 0, got {self.preempt_after_s}")
        self.picker = WeightedTierScheduler(self.tier_weights)
        self.tiers = {tier: TierQueue() for tier in self.tier_weights}
        self.by_id: dict[str, WaitingJob] = {}
        self.sizes: Counter[int] = Counter()  # waiting jobs by devices needed

    # -- the queue ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.by_id)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self.by_id

    def add(self, job: WaitingJob, front: bool = False) -> None:
        if job.tier not in self.tiers:
            raise ValueError(f"unknown tier {job.tier!r}; tiers: {', '.join(self.tiers)}")
        if job.job_id in self.by_id:
            return
        self.tiers[job.tier].push(job, front)
        self.by_id[job.job_id] = job
        self.sizes[job.devices] += 1

    def remove(self, job_id: str) -> WaitingJob | None:
        job = self.by_id.get(job_id)
        if job is not None:
            self.tiers[job.tier].remove(job_id)
            self._forget(job)
        return job

    def waiting_by_tier(self) -> dict[str, int]:
        return {tier: len(queue) for tier, queue in self.tiers.items()}

    # -- starting jobs -----------------------------------------------------------------------------------------
    def overdue(self, now: float) -> list[WaitingJob]:
        """Jobs of preempting tiers waiting longer than the bound, oldest first."""
        if self.preempt_after_s is None:
            return []
        bound = self.preempt_after_s
        late = []
        for tier in self.preempting_tiers:
            queue = self.tiers[tier]
            for jobs in (queue.front, *queue.tenants.values()):  # each is oldest first: stop at the first on time
                for job in jobs:
                    if now - job.queued_at < bound:
                        break
                    late.append(job)
        return sorted(late, key=lambda job: (job.queued_at, -self.tier_weights[job.tier]))

    def next_job(self, now: float, devices: Iterable[int] | None = None) -> WaitingJob | None:
        """Take the job that starts next (see the module doc for the order); only jobs needing one of ``devices``
        (the sizes of the idle agents; None: any)."""
        fits = self._fitting(devices)
        late = [job for job in self.overdue(now) if fits is None or fits(job)]
        if late:
            return self.remove(late[0].job_id)
        tier = self.picker.pick(tier for tier, queue in self.tiers.items() if queue.has(fits))
        if tier is None:
            return None
        job = self.tiers[tier].pop(fits)
        self._forget(job)
        return job

    def _fitting(self, devices: Iterable[int] | None) -> Callable[[WaitingJob], bool] | None:
        """A filter on device counts, or None when every waiting job fits (the common case: no scan)."""
        if devices is None:
            return None
        sizes = set(devices)
        if sizes.issuperset(size for size, count in self.sizes.items() if count):
            return None
        return lambda job: job.devices in sizes

    def _forget(self, job: WaitingJob) -> None:
        del self.by_id[job.job_id]
        self.sizes[job.devices] -= 1

    def take(self, job_id: str, now: float) -> WaitingJob | None:
        """Take a job that started elsewhere (a new leader folding the log) as next_job(now) took it: with the
        same tier pick and tenant turn, so the credits and turns go on where the old leader left them."""
        job = self.by_id.get(job_id)
        if job is None or self.overdue(now):
            return self.remove(job_id)  # an overdue job (or none): next_job() makes no pick for it either
        # The idle agents' sizes at that start are not in the log: those of the job's own size is the usual case.
        fits = self._fitting((job.devices,))
        self.picker.pick(tier for tier, queue in self.tiers.items() if queue.has(fits))
        queue = self.tiers[job.tier]
        if next(j for j in queue.in_order() if fits is None or fits(j)) is not job:
            return self.remove(job_id)  # not the job that pick would have taken (a log from other settings)
        queue.pop(fits)
        self._forget(job)
        return job

    @staticmethod
    def place(job: WaitingJob, idle: list[AgentView]) -> AgentView:
        """Model affinity: an idle agent with the job's model, else one with none loaded, else the longest idle."""
        with_model = [agent for agent in idle if job.model in agent.models]
        empty = [agent for agent in idle if not agent.models]
        return min(with_model or empty or idle, key=lambda agent: (agent.idle_since, agent.agent_id))

    def dispatch(self, idle: Iterable[AgentView], now: float) -> list[tuple[WaitingJob, AgentView]]:
        """Start as many waiting jobs as there are idle agents; returns (job, agent) pairs, in start order."""
        idle = list(idle)
        starts = []
        while idle and (job := self.next_job(now, {agent.devices for agent in idle})) is not None:
            agent = self.place(job, [agent for agent in idle if agent.devices == job.devices])
            idle.remove(agent)
            starts.append((job, agent))
        return starts

    def preemption(self, running: Iterable[AgentView], asked: set[str], now: float) -> AgentView | None:
        """The agent to ask to yield, when an overdue job waits that no earlier request is already making room
        for (``asked``: the job ids of running jobs already asked to yield); None otherwise. Call it only when no
        agent is idle."""
        late = self.overdue(now)
        if len(late) <= len(asked):
            return None
        waiting = late[len(asked)]
        waiting_weight = self.tier_weights[waiting.tier]
        candidates = [agent for agent in running if agent.job_id and agent.job_id not in asked
                      and agent.devices == waiting.devices
                      and agent.tier in self.tier_weights and self.tier_weights[agent.tier] < waiting_weight]
        if not candidates:
            return None
        return min(candidates, key=lambda a: (self.tier_weights[a.tier], a.step, -a.total_steps, a.agent_id))

    # -- what people see ---------------------------------------------------------------------------------------
    def predicted_order(self, now: float, limit: int | None = None) -> list[WaitingJob]:
        """The order the waiting jobs would start in if nothing else arrived (for positions): the same picks as
        next_job(), made on copies so the queue itself is untouched."""
        shadow = copy.copy(self)
        shadow.picker = copy.deepcopy(self.picker)
        shadow.tiers = {tier: _copy_tier(queue) for tier, queue in self.tiers.items()}
        shadow.by_id = dict(self.by_id)
        shadow.sizes = Counter(self.sizes)
        order = []
        while (limit is None or len(order) < limit) and (job := shadow.next_job(now)) is not None:
            order.append(job)
        return order


def _copy_tier(queue: TierQueue) -> TierQueue:
    twin = TierQueue()
    twin.front = deque(queue.front)
    twin.tenants = OrderedDict((tenant, deque(jobs)) for tenant, jobs in queue.tenants.items())
    return twin


def start_estimates(order: list[WaitingJob], busy_until: list[float], step_s: dict[str, float], now: float,
                    default_step_s: float | None) -> list[float | None]:
    """Seconds until each job of ``order`` starts: each goes to the agent that frees up first (``busy_until``:
    one entry per live agent, the time its current job should end, ``now`` when idle) and holds it for its
    remaining steps × the model's recent step time. None once a job's model has no step time yet."""
    if not busy_until:
        return [None] * len(order)
    free_at = list(busy_until)
    heapq.heapify(free_at)
    estimates: list[float | None] = []
    unknown = False
    for job in order:
        start = heapq.heappop(free_at)
        per_step = step_s.get(job.model, default_step_s)
        unknown = unknown or per_step is None
        estimates.append(None if unknown else max(0.0, start - now))
        heapq.heappush(free_at, start + (job.steps - job.steps_done) * (per_step or 0.0))
    return estimates
