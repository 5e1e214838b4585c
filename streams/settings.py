"""Settings every vidgen process shares: where Kafka, the schema registry, blobs and models are.

Sources, later ones winning: built-in defaults → a TOML settings file (``VIDGEN_SETTINGS``) → environment variables.
When no Kafka cluster is named, processes use the embedded broker recorded by ``vidgen broker`` under
``<var>/run/platform.json``.

Environment variables:
  VIDGEN_VAR_DIR               working directory for run files, blobs, the registry's state (default ./var)
  VIDGEN_SETTINGS              path of a TOML settings file (layout in README.md)
  VIDGEN_KAFKA_BOOTSTRAP       bootstrap servers of a Kafka cluster; nothing embedded is started when set
  VIDGEN_KAFKA_<KEY>           any librdkafka client setting, passed through: VIDGEN_KAFKA_SECURITY_PROTOCOL=SASL_SSL
                               becomes security.protocol=SASL_SSL (underscores become dots)
  VIDGEN_SCHEMA_REGISTRY_URL   a Confluent-compatible schema registry; otherwise the embedded one is used
  VIDGEN_SCHEMA_REGISTRY_BASIC_AUTH   user:password for that registry
  VIDGEN_EMBEDDED_FETCH_WAITS_MS  the embedded broker's fetch wait per reader class, e.g. "pipeline=250"
                               (streams/kafka.py Latency; defaults progress=20,orders=50,pipeline=250,background=1000)
  VIDGEN_BLOB_URL              blob store (default file://<var>/blobs), or s3://bucket/prefix for an S3-compatible one
  VIDGEN_BLOB_ENDPOINT / _REGION / _ACCESS_KEY_ID / _SECRET_ACCESS_KEY / _SESSION_TOKEN   that S3 store's endpoint
                               (unset: AWS's), region and credentials (unset: the AWS_* variables); never logged
  VIDGEN_BLOB_REDIRECT         auto (default): the gateway redirects downloads to presigned URLs where the store can
                               sign them; never: it streams every byte itself
  VIDGEN_BLOB_PRESIGN_S        lifetime of those presigned URLs (default 300)
  VIDGEN_LIFECYCLE_<CLASS>_S   how long blobs of a class outlive what needs them (consumers/lifecycle.py): INTERMEDIATE
                               (600 after the job ends), EMBEDDINGS, LEDGER (7 days after last use), PUBLISHED,
                               TAKEN_DOWN (off: kept), DELETED (0); "off" keeps them
  VIDGEN_MODELS                local diffusers model directories: "name=/path,other=/path2"
  VIDGEN_DEFAULT_MODEL         model used when a request names none (default tiny-wan)
  VIDGEN_MODEL_ALIASES         other names the gateway takes for models, e.g. "sora-2=tiny-wan,sora-2-pro=wan2.1"
                               (clients written for OpenAI's model names; file: [model_aliases])
  VIDGEN_LATENT_CHUNK_FRAMES   latent frames per LatentChunk (default 2)
  VIDGEN_TIER_WEIGHTS          the scheduler's share of started jobs per tier: "premium=6,standard=3,free=1"
  VIDGEN_PREEMPT_AFTER_S       a job of a preempting tier waiting longer than this goes first and, with no agent
                               idle, preempts the lowest-tier running job (default 30; "off" never preempts)
  VIDGEN_PREEMPTING_TIERS      tiers whose overdue jobs preempt: "premium" (default)
  VIDGEN_AGENT_TIMEOUT_S       an agent silent this long is dead and its job resumes elsewhere (default 10)
  VIDGEN_SCHEDULER_GRACE_S     a new active scheduler hears from the agents this long before it starts jobs (2.5)
  VIDGEN_CHECKPOINT_EVERY_STEPS / VIDGEN_CHECKPOINT_EVERY_S   checkpoint cadence of running jobs (10 steps / 60 s)
"""
from __future__ import annotations

import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PLATFORM_FILE = "platform.json"
DAY_S = 24 * 3600.0
#: Blob classes' default windows (seconds; None: kept until something else removes them). Why these values: see
#: consumers/lifecycle.py.
LIFECYCLE_WINDOWS: dict[str, float | None] = {
    "intermediate": 600.0, "embeddings": 7 * DAY_S, "ledger": 7 * DAY_S,
    "published": None, "taken_down": None, "deleted": 0.0,
}
#: Fetch waits (ms) on the embedded broker by a reader's latency class (streams.kafka.Latency says why and who).
EMBEDDED_FETCH_WAITS_MS: dict[str, int] = {"progress": 20, "orders": 50, "pipeline": 250, "background": 1000}
BLOB_OPTIONS = ("endpoint", "region", "access_key_id", "secret_access_key", "session_token")


class SettingsError(RuntimeError):
    """The settings do not describe a usable platform (and the message says what is missing)."""


@dataclass
class Settings:
    var_dir: Path
    kafka_bootstrap: str | None = None
    #: librdkafka settings passed through to every client (security, SASL, TLS, tuning).
    kafka_client: dict[str, str] = field(default_factory=dict)
    schema_registry_url: str | None = None
    schema_registry_client: dict[str, str] = field(default_factory=dict)
    blob_url: str = ""
    #: The S3 store's endpoint, region and credentials (endpoint, region, access_key_id, secret_access_key,
    #: session_token): never printed, so kept out of repr().
    blob_options: dict[str, str] = field(default_factory=dict, repr=False)
    #: Downloads: "auto" redirects to a presigned URL where the store signs them, "never" streams through the gateway.
    blob_redirect: str = "auto"
    blob_presign_s: float = 300.0
    #: Blob class → seconds it outlives what needs it (None: kept); consumers/lifecycle.py applies them.
    lifecycle_windows: dict[str, float | None] = field(default_factory=lambda: dict(LIFECYCLE_WINDOWS))
    model_dirs: dict[str, str] = field(default_factory=dict)
    default_model: str = "tiny-wan"
    model_aliases: dict[str, str] = field(default_factory=dict)  # a name clients use → the model it means
    latent_chunk_frames: int = 2
    #: Relative share of started jobs per tier when all are backlogged (the scheduler's tier weights).
    tier_weights: dict[str, float] = field(default_factory=lambda: {"premium": 6.0, "standard": 3.0, "free": 1.0})
    #: The scheduler: preemption bound (None: never), tiers that preempt, dead-agent timeout, takeover grace.
    preempt_after_s: float | None = 30.0
    preempting_tiers: tuple[str, ...] = ("premium",)
    agent_timeout_s: float = 10.0
    scheduler_grace_s: float = 2.5
    #: Devices a job of each model needs (model id -> N; others 1): the scheduler places it only on agent groups of N.
    model_devices: dict[str, int] = field(default_factory=dict)
    #: An agent group's parallel mode (auto | ulysses | cfg) and the deadline of its collectives (a rank that stays
    #: silent that long breaks the group: gpu_agents/parallel.py).
    parallel_mode: str = "auto"
    group_timeout_s: float = 120.0
    #: Checkpoint a running job every N steps, and at least every S seconds (0 = never by time).
    checkpoint_every_steps: int = 10
    checkpoint_every_s: float = 60.0
    #: Prompt policy (compliance/prompt_policy.toml when unset), consent registry, and whether a prompt the
    #: policy sends to REVIEW is still generated (annotated) or stops there.
    prompt_policy: str | None = None
    consents: str | None = None
    review_proceeds: bool = True
    #: Prompts the encoder takes into one forward pass when several are waiting.
    encoder_batch: int = 8
    #: Post-generation detection policy (compliance/detection_policy.toml when unset).
    detection_policy: str | None = None
    #: C2PA signing certificate chain and key (PEM); unset: a development chain under var/c2pa.
    signing_chain: str | None = None
    signing_key: str | None = None
    #: Delivery renditions as ``name:scale:crf,...`` (compliance/renditions.py DEFAULT_LADDER when unset).
    rendition_ladder: str | None = None
    #: Serve Prometheus /metrics on this port (None: off); send a StageStats report every N seconds (0: off).
    metrics_port: int | None = None
    #: The address /metrics binds to: all interfaces when unset (a pod's scrape target), except in the gateway,
    #: which binds it where its API listens unless this says otherwise.
    metrics_host: str | None = None
    stats_interval_s: float = 10.0
    #: True when the addresses came from the embedded platform's run file (Tansu client workarounds apply).
    embedded: bool = False
    #: The embedded broker's fetch wait per latency class (streams.kafka.Latency).
    fetch_waits_ms: dict[str, int] = field(default_factory=lambda: dict(EMBEDDED_FETCH_WAITS_MS))
    #: [from, to) in epoch ms: dedupe marks made then are not trusted, because the embedded broker was restored from
    #: an archive that may lack their outputs (consumers/restore.py; from the run file).
    restore_window_ms: tuple[int, int] | None = None

    @property
    def run_dir(self) -> Path:
        return self.var_dir / "run"

    @property
    def platform_file(self) -> Path:
        return self.run_dir / PLATFORM_FILE

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap:
            raise SettingsError(
                "no Kafka cluster: set VIDGEN_KAFKA_BOOTSTRAP, or start the embedded broker with `vidgen broker` "
                f"(or `vidgen up`) so that {self.platform_file} exists"
            )
        return self.kafka_bootstrap

    def require_registry(self) -> str:
        if not self.schema_registry_url:
            raise SettingsError(
                "no schema registry: set VIDGEN_SCHEMA_REGISTRY_URL, or start the embedded one with `vidgen broker`"
            )
        return self.schema_registry_url


def _env_passthrough(environ: dict[str, str]) -> dict[str, str]:
    prefix = "VIDGEN_KAFKA_"
    return {
        name[len(prefix):].lower().replace("_", "."): value
        for name, value in environ.items()
        if name.startswith(prefix) and name != "VIDGEN_KAFKA_BOOTSTRAP"
    }


def _parse_pairs(text: str, variable: str, shape: str) -> dict[str, str]:
    """"a=x,b=y" → {"a": "x", "b": "y"}; SettingsError naming ``variable`` for an entry not of ``shape``."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise SettingsError(f"{variable} entry {item!r} is not {shape}")
        pairs[name.strip()] = value.strip()
    return pairs


def _parse_model_devices(text: str) -> dict[str, int]:
    """"tiny-wan=2,wan-14b=4" -> {"tiny-wan": 2, "wan-14b": 4}."""
    devices = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, count = (part.strip() for part in item.partition("="))
        if not sep or not name or not count:
            raise ValueError(f"model_devices entry {item!r} is not model=N")
        devices[name] = int(count)
    return devices


def private_dir(path: Path) -> Path:
    """Make ``path`` (the var folder: prompts in the archive, the tenants' key digests, the dedupe ledgers) readable by
    its owner alone: created 0700, or tightened if an earlier version left it open to others."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077 and path.stat().st_uid == os.getuid():
        path.chmod(0o700)
        log.warning("%s was readable by others (mode %o); now owner-only", path, mode)
    return path


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if environ is None else environ)
    file_settings: dict = {}
    if env.get("VIDGEN_SETTINGS"):
        path = Path(env["VIDGEN_SETTINGS"])
        try:
            file_settings = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc}") from exc

    kafka = file_settings.get("kafka", {})
    registry = file_settings.get("schema_registry", {})
    var_dir = Path(env.get("VIDGEN_VAR_DIR") or file_settings.get("var_dir") or "var").resolve()
    settings = Settings(
        var_dir=var_dir,
        kafka_bootstrap=env.get("VIDGEN_KAFKA_BOOTSTRAP") or kafka.get("bootstrap"),
        kafka_client={**{k: str(v) for k, v in kafka.get("client", {}).items()}, **_env_passthrough(env)},
        schema_registry_url=env.get("VIDGEN_SCHEMA_REGISTRY_URL") or registry.get("url"),
        schema_registry_client={k: str(v) for k, v in registry.get("client", {}).items()},
        blob_url=env.get("VIDGEN_BLOB_URL") or file_settings.get("blobs", {}).get("url") or (var_dir / "blobs").as_uri(),
        model_dirs={**file_settings.get("models", {}),
                    **_parse_pairs(env.get("VIDGEN_MODELS", ""), "VIDGEN_MODELS", "name=/path")},
        model_aliases={**file_settings.get("model_aliases", {}),
                       **_parse_pairs(env.get("VIDGEN_MODEL_ALIASES", ""), "VIDGEN_MODEL_ALIASES", "alias=model")},
        default_model=env.get("VIDGEN_DEFAULT_MODEL") or file_settings.get("default_model") or "tiny-wan",
        latent_chunk_frames=int(env.get("VIDGEN_LATENT_CHUNK_FRAMES") or file_settings.get("latent_chunk_frames") or 2),
    )
    weights = env.get("VIDGEN_TIER_WEIGHTS") or file_settings.get("tier_weights")
    if weights:
        from .scheduling import parse_weights

        try:
            settings.tier_weights = parse_weights(weights) if isinstance(weights, str) else {
                k: float(v) for k, v in weights.items()}
        except ValueError as exc:
            raise SettingsError(f"tier weights: {exc}") from exc
    scheduler = file_settings.get("scheduler", {})
    preempt = env.get("VIDGEN_PREEMPT_AFTER_S") or scheduler.get("preempt_after_s")
    try:
        if preempt is not None and str(preempt).strip().lower() in ("off", "none", "never"):
            settings.preempt_after_s = None
        elif preempt not in (None, ""):
            settings.preempt_after_s = float(preempt)
        tiers = env.get("VIDGEN_PREEMPTING_TIERS") or scheduler.get("preempting_tiers")
        if tiers:
            settings.preempting_tiers = tuple(t.strip() for t in (tiers.split(",") if isinstance(tiers, str) else tiers)
                                              if t.strip())
        settings.agent_timeout_s = float(env.get("VIDGEN_AGENT_TIMEOUT_S") or scheduler.get("agent_timeout_s") or 10.0)
        settings.scheduler_grace_s = float(env.get("VIDGEN_SCHEDULER_GRACE_S") or scheduler.get("grace_s") or 2.5)
        devices = env.get("VIDGEN_MODEL_DEVICES") or scheduler.get("model_devices") or {}
        settings.model_devices = _parse_model_devices(devices) if isinstance(devices, str) else {
            str(model): int(n) for model, n in devices.items()}
    except ValueError as exc:
        raise SettingsError(f"scheduler settings: {exc}") from exc
    if any(n < 1 for n in settings.model_devices.values()):
        raise SettingsError(f"model_devices: every model needs at least 1 device, got {settings.model_devices}")
    agents = file_settings.get("agents", {})
    settings.parallel_mode = (env.get("VIDGEN_PARALLEL_MODE") or agents.get("parallel_mode") or "auto").strip().lower()
    if settings.parallel_mode not in ("auto", "ulysses", "cfg"):
        raise SettingsError(f"parallel_mode must be auto, ulysses or cfg, got {settings.parallel_mode!r}")
    try:
        settings.group_timeout_s = float(env.get("VIDGEN_GROUP_TIMEOUT_S") or agents.get("group_timeout_s") or 120.0)
    except ValueError as exc:
        raise SettingsError(f"agent settings: {exc}") from exc
    if settings.group_timeout_s <= 0:
        raise SettingsError("group_timeout_s must be positive")
    if settings.preempt_after_s is not None and settings.preempt_after_s < 0:
        raise SettingsError("preempt_after_s must be at least 0 (or off)")
    if settings.agent_timeout_s <= 0:
        raise SettingsError("agent_timeout_s must be positive")
    checkpoints = file_settings.get("checkpoints", {})
    settings.checkpoint_every_steps = int(env.get("VIDGEN_CHECKPOINT_EVERY_STEPS") or checkpoints.get("every_steps") or 10)
    settings.checkpoint_every_s = float(env.get("VIDGEN_CHECKPOINT_EVERY_S") or checkpoints.get("every_s") or 60.0)
    if settings.checkpoint_every_steps < 1:
        raise SettingsError("checkpoint_every_steps must be at least 1")
    safety = file_settings.get("safety", {})
    settings.prompt_policy = env.get("VIDGEN_PROMPT_POLICY") or safety.get("prompt_policy")
    settings.consents = env.get("VIDGEN_CONSENTS") or safety.get("consents")
    settings.review_proceeds = _flag(env.get("VIDGEN_REVIEW_PROCEEDS"), safety.get("review_proceeds", True))
    settings.encoder_batch = int(env.get("VIDGEN_ENCODER_BATCH") or safety.get("encoder_batch") or 8)
    settings.detection_policy = env.get("VIDGEN_DETECTION_POLICY") or safety.get("detection_policy")
    provenance = file_settings.get("provenance", {})
    settings.signing_chain = env.get("VIDGEN_SIGNING_CHAIN") or provenance.get("signing_chain")
    settings.signing_key = env.get("VIDGEN_SIGNING_KEY") or provenance.get("signing_key")
    settings.rendition_ladder = env.get("VIDGEN_RENDITIONS") or provenance.get("renditions")
    if bool(settings.signing_chain) != bool(settings.signing_key):
        raise SettingsError("signing needs both a certificate chain and a key (VIDGEN_SIGNING_CHAIN, VIDGEN_SIGNING_KEY)")
    observability = file_settings.get("observability", {})
    port = env.get("VIDGEN_METRICS_PORT") or observability.get("metrics_port")
    settings.metrics_port = int(port) if port else None
    settings.metrics_host = env.get("VIDGEN_METRICS_HOST") or observability.get("metrics_host") or None
    interval = env.get("VIDGEN_STATS_INTERVAL_S") or observability.get("stats_interval_s")
    settings.stats_interval_s = float(interval) if interval not in (None, "") else 10.0
    if settings.encoder_batch < 1:
        raise SettingsError("encoder_batch must be at least 1")
    waits = env.get("VIDGEN_EMBEDDED_FETCH_WAITS_MS") or file_settings.get("kafka", {}).get("embedded_fetch_waits_ms")
    if waits:
        try:
            pairs = (waits.split(",") if isinstance(waits, str) else [f"{k}={v}" for k, v in waits.items()])
            for name, _, value in (pair.strip().partition("=") for pair in pairs if pair.strip()):
                if name not in EMBEDDED_FETCH_WAITS_MS or int(value) < 1:
                    raise ValueError(f"{name}={value}")
                settings.fetch_waits_ms[name] = int(value)
        except ValueError as exc:
            raise SettingsError(f"embedded fetch waits: {exc}; expected e.g. pipeline=100,background=1000 "
                                f"(classes: {', '.join(EMBEDDED_FETCH_WAITS_MS)})") from None
    _load_blob_settings(settings, env, file_settings.get("blobs", {}), file_settings.get("lifecycle", {}))
    if env.get("VIDGEN_SCHEMA_REGISTRY_BASIC_AUTH"):
        settings.schema_registry_client["basic.auth.user.info"] = env["VIDGEN_SCHEMA_REGISTRY_BASIC_AUTH"]
    if settings.latent_chunk_frames < 1:
        raise SettingsError("latent_chunk_frames must be at least 1")

    # No cluster named: use what the embedded platform recorded, if it runs.
    if not settings.kafka_bootstrap or not settings.schema_registry_url:
        embedded = read_platform_file(settings.platform_file)
        if embedded:
            if not settings.kafka_bootstrap:
                settings.kafka_bootstrap = embedded["kafka_bootstrap"]
                settings.embedded = True
                if embedded.get("restore_window_ms"):
                    settings.restore_window_ms = tuple(embedded["restore_window_ms"])
            settings.schema_registry_url = settings.schema_registry_url or embedded.get("schema_registry_url")
    return settings


def _load_blob_settings(settings: Settings, env: dict[str, str], blobs: dict, lifecycle: dict) -> None:
    """[blobs] endpoint/region/credentials/redirect/presign_s and [lifecycle] <class>_s, under the environment."""
    for option in BLOB_OPTIONS:
        value = env.get(f"VIDGEN_BLOB_{option.upper()}") or blobs.get(option)
        if value:
            settings.blob_options[option] = str(value)
    settings.blob_redirect = str(env.get("VIDGEN_BLOB_REDIRECT") or blobs.get("redirect") or "auto").strip().lower()
    if settings.blob_redirect not in ("auto", "never"):
        raise SettingsError(f"blob redirect must be auto or never, got {settings.blob_redirect!r}")
    try:
        settings.blob_presign_s = float(env.get("VIDGEN_BLOB_PRESIGN_S") or blobs.get("presign_s") or 300.0)
        for name in LIFECYCLE_WINDOWS:
            value = env.get(f"VIDGEN_LIFECYCLE_{name.upper()}_S", lifecycle.get(f"{name}_s"))
            if value is None or value == "":
                continue
            text = str(value).strip().lower()
            settings.lifecycle_windows[name] = None if text in ("off", "none", "keep", "never") else float(text)
    except ValueError as exc:
        raise SettingsError(f"blob settings: {exc}") from exc
    if not 1 <= settings.blob_presign_s <= 7 * DAY_S:
        raise SettingsError("blob presign_s must be between 1 s and 7 days (S3's limit)")
    if any(w is not None and w < 0 for w in settings.lifecycle_windows.values()):
        raise SettingsError(f"lifecycle windows cannot be negative: {settings.lifecycle_windows}")


def _flag(text: str | None, default: bool) -> bool:
    if text is None or text == "":
        return bool(default)
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if text.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"expected true or false, got {text!r}")


def read_platform_file(path: Path) -> dict | None:
    """The embedded platform's addresses, or None when it is not running (no file, or its process is gone)."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise SettingsError(f"cannot read the embedded platform's run file {path}: {exc}") from exc
    if not _process_alive(record.get("pid")):
        return None  # left behind by a killed `vidgen broker`
    return record


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
