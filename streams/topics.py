"""The topic catalogue: every topic vidgen uses, with its partitions, key and value schema. Nothing else names topics.

Generation topics are split by tier so the scheduler can weigh them. Only the one active scheduler reads them (the
agents take orders from it), so a few partitions each are plenty: every partition is named in every fetch, and on
the embedded broker each costs CPU in every one (streams.kafka.Latency).
"""
from __future__ import annotations

from dataclasses import dataclass

TIERS = ("premium", "standard", "free")
DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    value_schema: str  # event name in schemas/
    key: str = "job_id"  # UTF-8 string key; job_id keeps a job's events in order on one partition
    retention_ms: int = 7 * DAY_MS
    doc: str = ""
    #: How long the archive (the embedded mode's durable store, consumers/archiver.py) keeps the topic's records;
    #: None: until deleted. Lifecycle events and publications stay; the chatter of running jobs goes.
    archive_retention_ms: int | None = None
    compacted: bool = False  # the broker keeps the latest record per key (cleanup.policy=compact)


REQUESTED = Topic("vidgen.requested", 6, "VideoRequested", doc="requests from upstream services and the gateway")
ENCODED = {
    tier: Topic(f"vidgen.encoded.{tier}", 3, "PromptEncoded", doc=f"generation queue of the {tier} tier")
    for tier in TIERS
}
STEP_PROGRESS = Topic("vidgen.step-progress", 6, "StepProgress", retention_ms=DAY_MS, archive_retention_ms=7 * DAY_MS)
LATENT_CHECKPOINTED = Topic("vidgen.latent-checkpointed", 6, "LatentCheckpointed", retention_ms=DAY_MS,
                            archive_retention_ms=7 * DAY_MS)
LATENT_CHUNKS = Topic("vidgen.latent-chunks", 6, "LatentChunk", retention_ms=DAY_MS, archive_retention_ms=7 * DAY_MS)
DECODED = Topic("vidgen.decoded", 6, "VideoDecoded")
FLAGGED = Topic("vidgen.flagged", 3, "VideoFlagged", retention_ms=30 * DAY_MS)
PUBLISHED = Topic("vidgen.published", 6, "VideoPublished", retention_ms=30 * DAY_MS)
FAILED = Topic("vidgen.failed", 3, "JobFailed", retention_ms=30 * DAY_MS)
CONTROL = Topic("vidgen.control", 3, "JobCancelled", doc="cancellation requests; every agent reads all of it")
CANCELLED = Topic("vidgen.cancelled", 3, "JobCancelled", retention_ms=30 * DAY_MS, doc="jobs stopped on request")
DELETED = Topic("vidgen.deleted", 3, "VideoDeleted", retention_ms=30 * DAY_MS,
                doc="videos their owners deleted: gone from the API, their blobs deleted by the lifecycle")
DEAD_LETTER = Topic("vidgen.dead-letter", 3, "DeadLetter", retention_ms=30 * DAY_MS)
STATS = Topic("vidgen.stats", 3, "StageStats", key="stage", retention_ms=DAY_MS, archive_retention_ms=DAY_MS,
              doc="stage processes' lag and busy reports, for `vidgen autoscale`")

# The fleet's one queue (consumers/scheduler.py): agents report on AGENTS and take work from ASSIGNMENTS; the active
# scheduler writes every decision to SCHEDULER_LOG (one partition: one order to fold on failover) and holds the
# single partition of SCHEDULER_LEASE through a consumer group, which is what makes it the active one.
AGENTS = Topic("vidgen.agents", 3, "AgentStatus", key="agent_id", retention_ms=DAY_MS, archive_retention_ms=DAY_MS,
               doc="GPU agents' state reports (about every second)")
ASSIGNMENTS = Topic("vidgen.assignments", 6, "Assignment", key="agent_id", retention_ms=DAY_MS,
                    archive_retention_ms=7 * DAY_MS,
                    doc="the scheduler's orders to agents; every agent reads all of it and takes its own")
SCHEDULER_LOG = Topic("vidgen.scheduler", 1, "SchedulerDecision", retention_ms=7 * DAY_MS,
                      doc="the active scheduler's decisions, folded by a new leader")
SCHEDULER_LEASE = Topic("vidgen.scheduler-lease", 1, "SchedulerDecision",
                        doc="holds no records: the scheduler that owns its one partition is the active one")
QUEUE = Topic("vidgen.queue", 6, "QueuePosition", retention_ms=DAY_MS, archive_retention_ms=DAY_MS,
              doc="waiting jobs' positions and ETAs")
# The gateways' fleet-wide quotas (gateway/quota.py): claims and releases keyed by tenant, folded alike by every gateway.
QUOTA = Topic("vidgen.quota", 3, "QuotaClaim", key="tenant", retention_ms=2 * DAY_MS, archive_retention_ms=2 * DAY_MS,
              doc="gateways' claims of a tenant's in-flight and hourly quotas, and their releases")
# What the lifecycle stage (consumers/lifecycle.py) deleted from the blob store, and by which rule: `vidgen audit`
# reads it to tell a blob that expired from one that went missing, so it lives as long as the jobs' own events do
# on Kafka, and for ever in the archive.
BLOB_LIFECYCLE = Topic("vidgen.blob-lifecycle", 3, "BlobsDeleted", retention_ms=30 * DAY_MS,
                       doc="blobs the lifecycle deleted (key job_id; a sweep's: its rule)")

CATALOGUE: tuple[Topic, ...] = (
    REQUESTED,
    *ENCODED.values(),
    STEP_PROGRESS,
    LATENT_CHECKPOINTED,
    LATENT_CHUNKS,
    DECODED,
    FLAGGED,
    PUBLISHED,
    FAILED,
    CONTROL,
    CANCELLED,
    DELETED,
    DEAD_LETTER,
    STATS,
    AGENTS,
    ASSIGNMENTS,
    SCHEDULER_LOG,
    SCHEDULER_LEASE,
    QUEUE,
    QUOTA,
    BLOB_LIFECYCLE,
)

# The job-state tracker's own topics (consumers/tracker.py; JSON values, made by faust, no Avro schema): not events of
# the catalogue, but state the platform needs back after a restart of the embedded broker, so the archive keeps them.
TRACKER_EVENTS = Topic("vidgen.tracker-events", 6, "", retention_ms=REQUESTED.retention_ms,
                       archive_retention_ms=7 * DAY_MS, doc="lifecycle events re-keyed by job for the tracker's table")
TRACKER_CHANGELOG = Topic("vidgen.tracker-job_state-changelog", 6, "", key="job_id", compacted=True,
                          doc="every job-state change (faust's changelog of table job_state); read latest by key")
STATE_TOPICS: tuple[Topic, ...] = (TRACKER_EVENTS, TRACKER_CHANGELOG)
#: What the archiver keeps and a restore of the embedded broker brings back.
ARCHIVED: tuple[Topic, ...] = CATALOGUE + STATE_TOPICS

BY_NAME = {topic.name: topic for topic in ARCHIVED}

#: Reports that no consumer group reads (the scheduler follows AGENTS, the autoscaler reads STATS by time, the gateways
#: follow QUOTA): a record on them moves no group's committed offsets, so the archiver's record of the groups'
#: positions ignores them.
UNGROUPED: tuple[Topic, ...] = (STATS, AGENTS, QUOTA)

#: Topics whose events end a job: exactly one of them per job (on vidgen.flagged, only decision BLOCK ends it).
TERMINAL = (PUBLISHED, FLAGGED, FAILED, CANCELLED)


def topic(name: str) -> Topic:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}; known: {', '.join(BY_NAME)}") from None


def encoded_topic(tier: str) -> Topic:
    """Generation topic of a tier (accepts the Avro enum symbol, e.g. PREMIUM)."""
    try:
        return ENCODED[tier.lower()]
    except KeyError:
        raise ValueError(f"unknown tier {tier!r}; known: {', '.join(TIERS)}") from None


def value_schemas() -> dict[str, str]:
    """topic name → event name, for the codec."""
    return {t.name: t.value_schema for t in CATALOGUE}
