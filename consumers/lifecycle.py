"""lifecycle: a job's terminal event → (after its window) its intermediate blobs deleted → BlobsDeleted; a deleted
video → every blob of its job deleted → BlobsDeleted.

Consumes the terminal topics (``streams.topics.TERMINAL``: vidgen.published, vidgen.flagged — only a BLOCK ends a
job there; a held REVIEW may still be published, from the intermediates —, vidgen.failed, vidgen.cancelled) and
vidgen.deleted.
Emits ``BlobsDeleted`` on vidgen.blob-lifecycle, naming every key it deletes, its class, size and the rule that
applied, *before* deleting: `vidgen audit` reads those events to tell a blob that expired from one that went
missing. Between inputs it sweeps the blobs no job owns (below). The deletion is driven by the event log through a
consumer group, so it survives restarts, and it never touches a job that has not ended.

Classes (``classify``, also what `vidgen storage` reports): ``checkpoint`` (checkpoint-NNNNN.safetensors, the
checkpoint.json pointer, attempt-NNNN claim markers: gpu_agents/resume.py), ``latent`` (latent-NNNN.safetensors and
audio-latents.safetensors: gpu_agents/agent.py), ``segment`` (the decoder's init.mp4, segment-NNNNN.m4s,
playlist.m3u8 and unsigned video.mp4: gpu_agents/decoder.py), ``input`` (an image-to-video job's uploaded
input-<sha16>.<ext>: producers/requests.py), ``published`` (``<job>/published/<sha16>/…``: consumers/
compliance_stage.py), ``embeddings`` (``_cache/text-embeddings/…``: consumers/embedding_cache.py), ``ledger``
(``_ledger/…``: streams/ledger.py, and this stage's own plans), ``other`` (anything else: never deleted here).

Rules and windows (``RULES``; seconds in ``settings.lifecycle_windows``, env ``VIDGEN_LIFECYCLE_<WINDOW>_S``, "off"
keeps the class), and why:

* ``job-ended`` (window ``intermediate``, default 600 s after the terminal event): checkpoints, latents, segments and
  — for a job that did not publish — its input image. A published job's input image is an ingredient of its C2PA
  manifest and stays with the published set. A terminal job never resumes, so its checkpoints are dead; but the
  decoder and compliance may handle its inputs once more after the embedded broker was restored from the archive
  (consumers/restore.py re-runs the inputs of the last seconds before a crash, streams/embedded.py), and the archive
  holds only what it flushed (VIDGEN_ARCHIVE_FLUSH_S, 1 s): a terminal event is durable there only a flush after it
  was sent. The window must exceed both by far; 10 minutes also covers an archiver that lags. After a restore the
  clock of every job that ended before it starts again at the restore (``job_due_s``), since the restored stages
  replay from then.
* ``embeddings-unused`` (window ``embeddings``, 7 days after the entry was last written): a prompt-embedding cache
  entry is shared by every job with the same prompt, so no job's end may remove it. The cache rewrites an entry's
  entry.json when it serves one older than half the window (consumers/embedding_cache.py), so an entry in use never
  expires, and a job that got it from the cache has at least half a window to load it. Sweep.
* ``ledger-expired`` (window ``ledger``, 7 days after the mark): a dedupe mark only matters while its input may be
  delivered again, which is at most the input topics' retention (7 days for the pipeline's inputs; a group that lost
  its offsets re-reads that far). The lifecycle's own inputs live 30 days, but a re-handled terminal event finds
  nothing left and does nothing. Sweep.
* ``published-retention`` (window ``published``, default off: kept): a published set (master, renditions, manifest,
  playlists) older than the window, and the job's input image once no published set of it remains. Sweep.
* ``deleted`` (window ``deleted``, 0: at once after the VideoDeleted on vidgen.deleted: its owner deleted the video
  through the API): every blob of the job. Blobs a still-running job writes after it (it is cancelled at the same
  time) go with its terminal event, by job-ended.
* ``taken-down`` (window ``taken_down``, default off: quarantined, kept but never served): every blob of the job.
  Its event (a takedown: issue 17) does not exist yet; wiring it means calling ``job_plan`` with its rule, as
  ``handle`` does for job-ended and deleted.

Sweeps run every ``sweep_interval_s`` (a tenth of the smallest sweep window, between 5 s and an hour) and emit
their BlobsDeleted with job_id "". On a store with millions of ledger marks a bucket lifecycle rule on ``_ledger/``
does the same job for free: set the ledger window off then.

Delivery. A terminal event not yet due raises NotDue: the runtime pauses its partition until then (events of a
partition are in time order, so the ones behind it are due later anyway). Once due, the job's listing becomes a
*plan* (kept as a small blob under ``_ledger/lifecycle-plans/``, removed by the ledger sweep), then the plan's
BlobsDeleted is sent and flushed, then its keys are deleted. A redelivered terminal event (a crash, a rebalance, a
restore that lost the BlobsDeleted) finds the plan and sends the same event (same id, same keys) and deletes what
is left; nothing is deleted twice and no deletion goes unannounced. A store that cannot be reached raises
BlobStoreUnavailable, which the runtime retries; this stage never fails a job (``fails_jobs=False``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

from streams import topics
from streams.blobs import BlobStat, BlobStore
from streams.kafka import Latency
from streams.ledger import LEDGER_DIR
from streams.settings import Settings
from streams.stage import NotDue, Stage, StageContext

from .embedding_cache import CACHE_DIR, ENTRY_NAME, TEXT_EMBEDDINGS
from .job_state import epoch_ms

log = logging.getLogger(__name__)

# -- classes ------------------------------------------------------------------------------------------------------
CHECKPOINT, LATENT, SEGMENT, INPUT = "checkpoint", "latent", "segment", "input"
PUBLISHED, EMBEDDINGS, LEDGER, OTHER = "published", "embeddings", "ledger", "other"
BLOB_CLASSES = (CHECKPOINT, LATENT, SEGMENT, INPUT, PUBLISHED, EMBEDDINGS, LEDGER, OTHER)
#: What only a running job needs: none of it is left a window after the job ended.
INTERMEDIATE_CLASSES = frozenset({CHECKPOINT, LATENT, SEGMENT})
PUBLISHED_DIR = "published"  # consumers/compliance_stage.py: <job>/published/<sha16>/...

#: A job folder's own files, by the names their writers give them.
_JOB_FILES = (
    (re.compile(r"checkpoint-\d+\.safetensors|checkpoint\.json|attempt-\d+"), CHECKPOINT),
    (re.compile(r"latent-\d+\.safetensors|audio-latents\.safetensors"), LATENT),
    (re.compile(r"init\.mp4|segment-\d+\.m4s|playlist\.m3u8|video\.mp4"), SEGMENT),
    (re.compile(r"input-[0-9a-f]{16}\.(?:png|jpg|webp)"), INPUT),
)


def classify(key: str) -> str:
    """The class of a blob key (module docstring)."""
    parts = key.split("/")
    if parts[0] == CACHE_DIR:
        return EMBEDDINGS if len(parts) > 2 and parts[1] == TEXT_EMBEDDINGS else OTHER
    if parts[0] == LEDGER_DIR:
        return LEDGER
    if len(parts) >= 4 and parts[1] == PUBLISHED_DIR:
        return PUBLISHED
    if len(parts) == 2:
        for pattern, blob_class in _JOB_FILES:
            if pattern.fullmatch(parts[1]):
                return blob_class
    return OTHER


def usage(stats: Iterable[BlobStat]) -> dict[str, dict[str, int]]:
    """Blob count and bytes per class (every class, in BLOB_CLASSES order), plus "total": `vidgen storage`."""
    out = {blob_class: {"count": 0, "bytes": 0} for blob_class in BLOB_CLASSES}
    for stat in stats:
        out[classify(stat.key)]["count"] += 1
        out[classify(stat.key)]["bytes"] += stat.size
    out["total"] = {"count": sum(c["count"] for c in out.values()), "bytes": sum(c["bytes"] for c in out.values())}
    return out


# -- the policy ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    name: str
    window: str  # its entry in settings.lifecycle_windows: seconds after the trigger, None: kept
    classes: frozenset[str]  # what it deletes
    trigger: str  # what starts its clock
    #: The input image stays while the job has a published set (an ingredient of its C2PA manifest).
    input_follows_publication: bool = False


_JOB_CLASSES = frozenset({CHECKPOINT, LATENT, SEGMENT, INPUT, PUBLISHED, OTHER})
JOB_ENDED = Rule("job-ended", "intermediate", INTERMEDIATE_CLASSES | {INPUT},
                 "the job's terminal event", input_follows_publication=True)
EMBEDDINGS_UNUSED = Rule("embeddings-unused", "embeddings", frozenset({EMBEDDINGS}),
                         "the last write of a cache entry's entry.json (renewed while the entry is used)")
LEDGER_EXPIRED = Rule("ledger-expired", "ledger", frozenset({LEDGER}), "the mark's last write")
PUBLISHED_RETENTION = Rule("published-retention", "published", frozenset({PUBLISHED, INPUT}),
                           "the publication (the newest write in a published set)", input_follows_publication=True)
TAKEN_DOWN = Rule("taken-down", "taken_down", _JOB_CLASSES,
                  "a takedown of the published video (issue 17; until the window ends: kept, never served)")
DELETED = Rule("deleted", "deleted", _JOB_CLASSES, "a deletion of the video (issue 18)")
RULES = {rule.name: rule for rule in (JOB_ENDED, EMBEDDINGS_UNUSED, LEDGER_EXPIRED, PUBLISHED_RETENTION,
                                      TAKEN_DOWN, DELETED)}

MIN_SWEEP_S, MAX_SWEEP_S = 5.0, 3600.0
SWEEP_RETRY_S = 30.0  # after a sweep failed (the store unreachable): sooner than the next regular one
MAX_BLOBS_PER_EVENT = 1000  # keeps a BlobsDeleted far below Kafka's message size limit


def ends_job(topic_name: str, event: dict) -> bool:
    """Whether the event ends its job for good: a publication, a failure, a cancellation, a BLOCK. A REVIEW flag,
    held or not, does not: a reviewer may still let the job publish, from its intermediates."""
    if topic_name == topics.FLAGGED.name:
        return event.get("decision", "BLOCK") == "BLOCK"
    return topic_name in (topics.PUBLISHED.name, topics.FAILED.name, topics.CANCELLED.name)


def job_due_s(ended_s: float, window_s: float, restored_s: float | None = None) -> float:
    """When a job's blobs go: the window after its end, or after the embedded broker's restore when that came later
    (the restored stages may replay the inputs of jobs that ended before it)."""
    return max(ended_s, restored_s or 0.0) + window_s


def select_job_blobs(rule: Rule, job_id: str, stats: Iterable[BlobStat], published: bool) -> list[BlobStat]:
    """What ``rule`` deletes of one job's blobs, from a listing of its folder; ``published``: the job published
    (its input image then follows the published set wherever the rule says so)."""
    mine = [s for s in stats if s.key.split("/", 1)[0] == job_id]
    classes = rule.classes
    if rule.input_follows_publication and (published or any(classify(s.key) == PUBLISHED for s in mine)):
        classes = classes - {INPUT}
    return sorted((s for s in mine if classify(s.key) in classes), key=lambda s: s.key)


def expired_embeddings(stats: Iterable[BlobStat], now_s: float, window_s: float) -> dict[str, list[BlobStat]]:
    """Cache entry folder → its blobs, for every entry whose entry.json was last written more than ``window_s``
    ago (an entry without one, left by a crash, by its newest blob)."""
    folders: dict[str, list[BlobStat]] = defaultdict(list)
    for stat in stats:
        if classify(stat.key) == EMBEDDINGS:
            folders[stat.key.rsplit("/", 1)[0]].append(stat)
    expired = {}
    for folder, blobs in sorted(folders.items()):
        entry = [s for s in blobs if s.key.endswith("/" + ENTRY_NAME)]
        written = entry[0].modified if entry else max(s.modified for s in blobs)
        if now_s - written > window_s:
            expired[folder] = sorted(blobs, key=lambda s: s.key)
    return expired


def expired_ledger(stats: Iterable[BlobStat], now_s: float, window_s: float) -> list[BlobStat]:
    """Dedupe marks (and lifecycle plans) last written more than ``window_s`` ago."""
    return sorted((s for s in stats if classify(s.key) == LEDGER and now_s - s.modified > window_s),
                  key=lambda s: s.key)


def expired_published(stats: Iterable[BlobStat], now_s: float, window_s: float) -> list[BlobStat]:
    """Published sets whose newest blob is older than ``window_s``, and the input image of every job that has no
    published set left."""
    sets: dict[tuple[str, str], list[BlobStat]] = defaultdict(list)
    inputs: dict[str, list[BlobStat]] = defaultdict(list)
    for stat in stats:
        blob_class = classify(stat.key)
        if blob_class == PUBLISHED:
            job_id, _, folder = stat.key.split("/")[:3]
            sets[(job_id, folder)].append(stat)
        elif blob_class == INPUT:
            inputs[stat.key.split("/", 1)[0]].append(stat)
    goes: list[BlobStat] = []
    kept_jobs, expired_jobs = set(), set()
    for (job_id, _folder), blobs in sets.items():
        if now_s - max(s.modified for s in blobs) > window_s:
            goes += blobs
            expired_jobs.add(job_id)
        else:
            kept_jobs.add(job_id)
    for job_id in expired_jobs - kept_jobs:
        goes += inputs.get(job_id, [])
    return sorted(goes, key=lambda s: s.key)


def sweep_interval_s(windows: dict[str, float | None]) -> float | None:
    """How often to sweep: a tenth of the smallest window a sweep applies, within [5 s, 1 h]; None: no sweep."""
    enabled = [windows.get(rule.window) for rule in (EMBEDDINGS_UNUSED, LEDGER_EXPIRED, PUBLISHED_RETENTION)]
    enabled = [w for w in enabled if w is not None]
    if not enabled:
        return None
    return min(max(min(enabled) / 10, MIN_SWEEP_S), MAX_SWEEP_S)


def deleted_blobs(stats: Iterable[BlobStat]) -> list[dict]:
    """BlobsDeleted.blobs records."""
    return [{"key": s.key, "blob_class": classify(s.key), "bytes": s.size, "modified": int(s.modified * 1000)}
            for s in stats]


def _readable_plan(raw: bytes) -> dict | None:
    try:
        plan = json.loads(raw)
    except ValueError:
        return None
    ok = isinstance(plan, dict) and isinstance(plan.get("blobs"), list) and isinstance(plan.get("trigger"), str)
    return plan if ok else None


def _batches(items: list, size: int) -> list[list]:
    return [items[start:start + size] for start in range(0, len(items), size)]


# -- the stage ----------------------------------------------------------------------------------------------------
class Lifecycle:
    """The handler: terminal events → job-ended deletions; tick() → sweeps."""

    def __init__(self, settings: Settings, blobs: BlobStore, clock: Callable[[], float] = time.time):
        self.windows = dict(settings.lifecycle_windows)
        self.restored_s = settings.restore_window_ms[1] / 1000 if settings.restore_window_ms else None
        self.clock = clock
        self.sweep_every_s = sweep_interval_s(self.windows)
        self.next_sweep_s = 0.0  # the first sweep comes with the first tick

    # -- the recipe ------------------------------------------------------------------------------------------
    def handle(self, event: dict, ctx: StageContext) -> None:
        rule = DELETED if ctx.source.topic == topics.DELETED.name else JOB_ENDED
        window = self.windows.get(rule.window)
        if window is None or (rule is JOB_ENDED and not ends_job(ctx.source.topic, event)):
            return
        job_id = event["job_id"]
        try:
            folder = ctx.blobs.key(job_id) + "/"
        except ValueError:
            log.info("lifecycle: job id %r cannot name a blob folder, so the job has no blobs", job_id)
            return
        due = job_due_s(epoch_ms(event["timestamp"]) / 1000, window, self.restored_s)
        if due > self.clock():
            raise NotDue(due)
        plan = self.job_plan(ctx, job_id, folder, rule, published=ctx.source.topic == topics.PUBLISHED.name)
        if plan is not None:
            self.announce_and_delete(ctx, job_id, rule, plan["blobs"], plan["trigger"])

    def job_plan(self, ctx: StageContext, job_id: str, folder: str, rule: Rule, published: bool) -> dict | None:
        """What ``rule`` deletes of this job, decided once: the plan made by an earlier delivery of its event, else
        one made now from the job's folder (None: nothing to delete)."""
        segments = plan_segments(job_id, rule)
        raw = ctx.blobs.read(*segments)
        if raw is not None:
            plan = _readable_plan(raw)
            if plan is not None:
                return plan
            log.warning("lifecycle: the plan of job %s is unreadable; making it again", job_id)
        goes = select_job_blobs(rule, job_id, ctx.blobs.list(folder), published)
        if not goes:
            return None
        source = ctx.source
        plan = {"job_id": job_id, "rule": rule.name, "blobs": deleted_blobs(goes),
                "trigger": f"{source.topic}/{source.partition}@{source.offset}"}
        ctx.blobs.put(json.dumps(plan).encode("utf-8"), *segments, dtype="application/json")
        return plan

    def announce_and_delete(self, ctx: StageContext, job_id: str, rule: Rule, blobs: list[dict], trigger: str,
                            *id_parts: object) -> None:
        """BlobsDeleted first (flushed: durable), then the deletion. Ids from (job, rule, id_parts, batch)."""
        for index, batch in enumerate(_batches(blobs, MAX_BLOBS_PER_EVENT)):
            ctx.emit(topics.BLOB_LIFECYCLE, ctx.event(
                job_id, rule.name, *id_parts, index, rule=rule.name, window_s=float(self.windows[rule.window]),
                trigger=trigger, store=ctx.blobs.url, blobs=batch, bytes=sum(b["bytes"] for b in batch),
            ), key=job_id or rule.name)
        ctx.flush()
        ctx.blobs.delete([b["key"] for b in blobs])
        log.info("lifecycle: %s: %d blobs, %d bytes deleted (%s)", job_id or "sweep", len(blobs),
                 sum(b["bytes"] for b in blobs), rule.name)

    # -- sweeps ----------------------------------------------------------------------------------------------
    def tick(self, ctx: StageContext) -> None:
        if self.sweep_every_s is None or self.clock() < self.next_sweep_s:
            return
        self.next_sweep_s = self.clock() + min(self.sweep_every_s, SWEEP_RETRY_S)  # unless it succeeds
        self.sweep(ctx)
        self.next_sweep_s = self.clock() + self.sweep_every_s

    def sweep(self, ctx: StageContext) -> None:
        """Every sweep rule whose window is on, each with its own BlobsDeleted."""
        now = self.clock()
        stamp = int(now * 1000)  # a sweep's event ids: its rule and time
        window = self.windows.get(EMBEDDINGS_UNUSED.window)
        if window is not None:
            folders = expired_embeddings(ctx.blobs.list(f"{CACHE_DIR}/{TEXT_EMBEDDINGS}/"), now, window)
            # Served (and renewed) since the listing? Then it stays: asked once per expired entry, just before.
            goes = [s for folder, blobs in folders.items()
                    if not self._renewed(ctx.blobs, f"{folder}/{ENTRY_NAME}", now, window) for s in blobs]
            if goes:
                self.announce_and_delete(ctx, "", EMBEDDINGS_UNUSED, deleted_blobs(goes), "", stamp)
        window = self.windows.get(LEDGER_EXPIRED.window)
        if window is not None:
            goes = expired_ledger(ctx.blobs.list(f"{LEDGER_DIR}/"), now, window)
            if goes:
                self.announce_and_delete(ctx, "", LEDGER_EXPIRED, deleted_blobs(goes), "", stamp)
        window = self.windows.get(PUBLISHED_RETENTION.window)
        if window is not None:
            goes = expired_published(ctx.blobs.list(), now, window)
            if goes:
                self.announce_and_delete(ctx, "", PUBLISHED_RETENTION, deleted_blobs(goes), "", stamp)

    @staticmethod
    def _renewed(blobs: BlobStore, entry_key: str, now: float, window: float) -> bool:
        entry = blobs.stat(entry_key)
        return entry is not None and now - entry.modified <= window


def plan_segments(job_id: str, rule: Rule) -> tuple[str, ...]:
    """Where a job's plan for a rule is kept: with the dedupe marks, whose sweep removes it after the ledger window
    (by then its terminal event cannot be redelivered)."""
    digest = hashlib.sha256(f"{job_id}/{rule.name}".encode("utf-8")).hexdigest()
    return (LEDGER_DIR, "lifecycle-plans", digest[:2], digest)


STAGE = Stage(
    name="lifecycle",
    consumes=(*topics.TERMINAL, topics.DELETED),
    emits=(topics.BLOB_LIFECYCLE,),
    build=Lifecycle,
    fails_jobs=False,
    latency=Latency.BACKGROUND,  # its work waits a window anyway
    doc=__doc__,
)
