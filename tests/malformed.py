"""Hypothesis strategies for malformed events on every stage input topic (issue 8, R2).

Each strategy draws a ``BadEvent``: the topic, the Kafka key and value bytes exactly as they go on the wire, the
category (``kind``) and what the platform must make of it (``expect``). Values that need the schema registry (real
schema ids, forged writer schemas) are built through a ``Forge`` bound to the platform's registry, so the same
strategies run against the embedded registry in the tests and against any Confluent-compatible one.

Wire-level garbage (``wire_garbage``) — every topic; the reader cannot decode it → expect ``dead-letter`` (DECODE):

* ``random-bytes``: arbitrary bytes (0–2 KB; the first byte is forced non-zero so it is never accidentally framed);
* ``empty`` (b"") and ``tombstone`` (a null value);
* ``short-frame``: a zero magic byte and fewer than 4 id bytes;
* ``bad-magic``: a valid Avro body behind a magic byte of 1..255;
* ``unknown-schema-id``: a 5-byte Confluent header whose id the registry does not hold (random 32-bit ids,
  0xFFFFFFFF, 0) and a valid body;
* ``foreign-schema-id``: the id of ANOTHER topic's registered schema (a different record) with this topic's body:
  the registry knows it, but it does not resolve against the reader's schema;
* ``truncated``: a correctly framed event of this topic cut short anywhere inside the Avro body
  (fastavro 1.13 rejects every such cut; checked in tests);
* ``timestamp-overflow``: a correctly framed, schema-valid event whose ``timestamp`` (or ``requested_at``) is a long
  outside the years 1..9999, so its timestamp-millis cannot become a datetime: fastavro raises OverflowError
  (found by this fuzzer: EventCodec.decode lets it through and the stage dies — see the report);
* ``forged-enum-type``: written with a forged writer schema — registered under a subject of its own,
  ``fuzz.forged-<topic>-enum-value`` — whose ``tier`` is an enum of ANOTHER name (``io.vidgen.ForgedTier``,
  symbols ``ULTRA``/``MEGA``): named types must match, so the reader cannot resolve it (VideoRequested,
  PromptEncoded: the only input events with an enum);
* ``forged-field-type``: a forged writer schema (subject ``fuzz.forged-<topic>-type-value``) whose
  ``params.width`` (or ``chunk_index``, ``segment_index``, ``job_id`` …) is a string: no promotion from string to
  int exists, so it cannot be resolved either.

About unknown enum SYMBOLS: Avro cannot carry a symbol the schema lacks, and a writer schema that only ADDS a symbol
to ``io.vidgen.Tier`` does resolve — Tier declares ``"default": "STANDARD"``, so per the Avro spec the reader maps an
unknown symbol to STANDARD (checked in ``test_unknown_enum_symbol_reads_as_the_enum_default``). Such events
(``forged-enum-symbol``, writer subject ``fuzz.forged-<topic>-symbol-value``, tier ``ULTRA``) are therefore not
dead letters: they decode as STANDARD and must then be rejected on their content, which is why they are always drawn
with otherwise meaningless parameters (→ ``reject``).

Schema-valid but meaningless (``meaningless``), encoded through the real codec and the topic's real schema id:

* vidgen.requested (→ ``reject``: INVALID dead letter + JobFailed): at least one of: empty / whitespace /
  10,001-char / 1 MiB prompt, 1 MiB negative prompt, width/height ≤ 0, not a multiple of 16, > 1920 or 2³¹−1,
  frames 0, negative, not 4k+1, > 257, 2³¹−1, steps 0, negative, 1001, 10⁹, fps 0, negative, > 120, guidance
  NaN / ±inf / negative, unknown model (names, "", absolute and relative paths), unknown preset — each also with
  job ids that are ordinary, empty, 10 KB, non-ASCII, or path-like ("../x", "a/b");
* vidgen.encoded.<tier> (→ ``reject``: HANDLER dead letter after the runtime's retries + JobFailed): blob refs to
  missing files, to a real file with the wrong sha256, to a file outside the store, to a non-file URI, or to a real
  blob that is not a tensor; and, with a real embeddings blob, parameters the denoiser cannot run (frames ≤ 0,
  width/height ≤ 0, steps < 0, sizes that cannot be allocated, unknown models); job ids as above (a path-like id
  fails in the blob store);
* vidgen.latent-chunks (→ ``reject``): chunk_count 0 / negative, chunk_index negative or ≥ chunk_count, no latent
  frames, a negative frame start (INVALID in check_chunk); and a first chunk (index 0) whose latent blob is missing,
  has the wrong sha256 or is not a tensor, whose fps is 0 or whose model is unknown (HANDLER);
* vidgen.latent-chunks, ``orphan-chunk`` (→ ``held``): a chunk 1..n−1 of a job whose chunk 0 never comes. The
  decoder holds early chunks until their turn, so such an input gets no outcome at all and its partition's
  committed offset stays below it for good (reported; drawn only when asked for);
* vidgen.decoded (→ ``reject`` when ``is_last``: the segment/video blob is missing, has the wrong sha256, or is not an
  MP4 → HANDLER; → ``ignored`` when not ``is_last``: compliance acts on the last segment only, by design);
* vidgen.control (→ ``ignored``): JobCancelled for jobs that do not exist, with empty, 10 KB, non-ASCII job ids and
  1 MiB reasons. The agents read the control topic without a group and only log what they cannot decode: nothing is
  dead-lettered and nothing may happen to any other job.

``expect`` values: ``dead-letter`` — a DeadLetter from the topic's stage naming this source topic/partition/offset;
``reject`` — that, or (for a job id) a terminal VideoFlagged/JobFailed with a reason; a non-empty job id must also
fail (JobFailed with a reason) or be flagged; ``ignored`` — no dead letter from a pipeline stage is required and
nothing may be emitted for its job id except by the tracker; ``held`` — see orphan chunks; ``duplicate`` — an event
whose stage dedupe key (job id) repeats an earlier bad event's (only the empty job id can), skipped by the dedupe
ledger by design.

Only the fast categories are cheap for every stage: schema-valid events that reach a handler exception (``slow``)
cost the runtime's retry back-off (0.2 s + 1.0 s) each, so tests cap them per topic.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field

import fastavro
from hypothesis import strategies as st

from schemas.codec import EventCodec, load_schema, value_subject
from streams import topics

INPUT_TOPICS: tuple[str, ...] = (
    topics.REQUESTED.name, *(t.name for t in topics.ENCODED.values()), topics.LATENT_CHUNKS.name,
    topics.DECODED.name, topics.CONTROL.name,
)
#: Which stage's consumer group reads a topic as its input (and so must dead-letter what it cannot take).
STAGE_OF = {
    topics.REQUESTED.name: "prompt-encoder",
    **{t.name: "scheduler" for t in topics.ENCODED.values()},
    topics.LATENT_CHUNKS.name: "vae-decoder",
    topics.DECODED.name: "compliance",
    topics.CONTROL.name: None,  # read without a group by every gpu-agent and the scheduler: undecodable requests
    # are only logged
}
MIB = 1024 * 1024
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)


@dataclass
class BadEvent:
    topic: str
    kind: str
    expect: str  # dead-letter | reject | ignored | held | duplicate
    key: bytes | None
    value: bytes | None
    job_id: str | None = None  # for events that decode
    slow: bool = False  # reaches a handler exception: costs the runtime's retry back-off
    note: str = ""
    partition: int = -1  # where it was produced (filled in by the producer)
    offset: int = -1
    headers: list = field(default_factory=list)

    def describe(self) -> str:
        value = self.value if self.value is None or len(self.value) <= 64 else self.value[:64] + b"..."
        jid = self.job_id if self.job_id is None or len(self.job_id) <= 40 else self.job_id[:40] + "..."
        return (f"{self.kind} on {self.topic}/{self.partition}@{self.offset} expect={self.expect} job_id={jid!r} "
                f"{self.note} value={value!r}")


# -- the registry side: real ids, forged writer schemas, blobs ---------------------------------------------------------
def _record_name(schema: dict) -> str:
    return schema["name"] if "." in schema["name"] else f"{schema.get('namespace', '')}.{schema['name']}"


def _forge_enum_type(schema: dict) -> dict | None:
    forged = json.loads(json.dumps(schema))
    for f in forged["fields"]:
        if f["name"] == "tier":
            f["type"] = {"type": "enum", "name": "ForgedTier", "namespace": "io.vidgen", "symbols": ["ULTRA", "MEGA"]}
            f.pop("default", None)
            return forged
    return None


def _forge_enum_symbol(schema: dict) -> dict | None:
    forged = json.loads(json.dumps(schema))
    for f in forged["fields"]:
        if f["name"] == "tier":
            f["type"]["symbols"] = [*f["type"]["symbols"], "ULTRA"]
            return forged
    return None


def _forge_field_type(schema: dict) -> tuple[dict, str]:
    """A writer schema with an int field turned into a string (no Avro promotion exists from string to int)."""
    forged = json.loads(json.dumps(schema))
    for f in forged["fields"]:
        if f["name"] == "params":
            for p in f["type"]["fields"]:
                if p["name"] == "width":
                    p["type"] = "string"
                    return forged, "params.width"
    for name in ("chunk_index", "segment_index", "stopped_at_step"):
        for f in forged["fields"]:
            if f["name"] == name:
                f["type"] = "string"
                f.pop("default", None)
                return forged, name
    forged["fields"][1]["type"] = "int"  # job_id: string → int
    return forged, forged["fields"][1]["name"]


class Forge:
    """What the strategies need from the platform: the real codec and schema ids, forged writer schemas registered
    under subjects of their own, and a few blobs (a real tensor, a file that is no tensor, a not-an-MP4)."""

    def __init__(self, codec: EventCodec, blobs=None, blob_root_uri: str = "file:///nonexistent/vidgen-blobs"):
        self.codec = codec
        self.registry = codec.registry
        self.blobs = blobs
        self.blob_root_uri = blob_root_uri.rstrip("/")
        self.schema_ids: dict[str, int] = {}  # topic → id of its value schema
        self.record_of_id: dict[int, str] = {}
        for topic in set(INPUT_TOPICS) | {t.name for t in topics.CATALOGUE}:
            registered = self.registry.get_latest_version(value_subject(topic))
            self.schema_ids[topic] = registered.schema_id
            self.record_of_id[registered.schema_id] = _record_name(json.loads(registered.schema.schema_str))
        self.parsed = {topic: fastavro.parse_schema(load_schema(codec.schema_of(topic))) for topic in INPUT_TOPICS}
        self.forged: dict[tuple[str, str], tuple[int, object, str]] = {}  # (topic, variant) → (id, parsed, note)
        for topic in INPUT_TOPICS:
            schema = load_schema(codec.schema_of(topic))
            variants = {"enum": (_forge_enum_type(schema), "tier: enum io.vidgen.ForgedTier"),
                        "symbol": (_forge_enum_symbol(schema), "tier: io.vidgen.Tier + ULTRA")}
            typed, where = _forge_field_type(schema)
            variants["type"] = (typed, f"{where}: string")
            for variant, (forged, note) in variants.items():
                if forged is None:
                    continue
                from confluent_kafka.schema_registry import Schema

                schema_id = self.registry.register_schema(f"fuzz.forged-{topic}-{variant}-value",
                                                          Schema(json.dumps(forged), "AVRO"))
                self.forged[(topic, variant)] = (schema_id, fastavro.parse_schema(forged), note)
        self.known_ids = set(self.record_of_id) | {v[0] for v in self.forged.values()}
        self.tensor_ref = self.not_a_tensor_ref = None
        if blobs is not None:
            import torch

            # Prompt embeddings of the tiny models' shape (1 × 32 tokens × 32), and a blob that is valid bytes but
            # no safetensors file and no MP4.
            self.tensor_ref = blobs.put_tensor(torch.zeros(1, 32, 32), "fuzz-fixtures", "embeds.safetensors")
            self.not_a_tensor_ref = blobs.put(b"this is neither safetensors nor an mp4\n" * 4, "fuzz-fixtures",
                                              "garbage.bin", dtype="video/mp4")

    def encode(self, topic: str, event: dict) -> bytes:
        return self.codec.encode(topic, event)

    def body(self, topic: str, event: dict, parsed=None) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed or self.parsed[topic], event)
        return buf.getvalue()

    def framed(self, schema_id: int, body: bytes, magic: int = 0) -> bytes:
        return bytes([magic]) + schema_id.to_bytes(4, "big") + body

    def foreign_ids(self, topic: str) -> list[int]:
        own = self.record_of_id[self.schema_ids[topic]]
        return sorted(i for i, name in self.record_of_id.items() if name != own)

    # blob references that cannot be read
    def missing_ref(self, name: str) -> dict:
        return {"uri": f"{self.blob_root_uri}/fuzz-missing/{name}", "sha256": "0" * 64, "bytes": 123, "shape": [],
                "dtype": "float32"}


# -- building blocks ----------------------------------------------------------------------------------------------------
_counter = iter(range(10**12))


def unique(prefix: str = "fuzz") -> str:
    return f"{prefix}-{next(_counter):07d}"


@st.composite
def job_ids(draw, allow_empty: bool = True) -> str:
    """Ordinary ids, and the ones a stage might choke on: empty, 10 KB, non-ASCII, path-like. Never repeated
    (except the empty id), so no bad event is mistaken for a duplicate of another."""
    shapes = ["plain", "huge", "unicode", "path", "dots"] + (["empty"] if allow_empty else [])
    shape = draw(st.sampled_from(shapes))
    base = unique()
    if shape == "empty":
        return ""
    if shape == "huge":
        return base + "-" + "j" * (10 * 1024 - len(base) - 1)
    if shape == "unicode":
        return base + draw(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12))
    if shape == "path":
        return draw(st.sampled_from(["../", "a/b/", "/abs/", "..\\", " "])) + base
    if shape == "dots":
        return base + draw(st.sampled_from(["/..", "/.", "\x00", "\n"]))
    return base


#: The timestamp-millis values a reader can turn into a datetime (years 1..9999); beyond them see TIMESTAMP_OVERFLOW.
TS_MIN, TS_MAX = -62_135_596_800_000, 253_402_300_799_999
TIMESTAMP_OVERFLOW = [TS_MAX + 1, -62_135_596_800_001, 2**53, 2**62, -(2**62), 2**63 - 1, -(2**63)]


def _timestamp() -> st.SearchStrategy[int]:
    return st.one_of(st.just(0), st.sampled_from([TS_MIN, TS_MAX]), st.integers(TS_MIN, TS_MAX),
                     st.integers(1_600_000_000_000, 1_900_000_000_000))


VALID_PARAMS = dict(width=32, height=32, num_frames=5, fps=8, steps=2, guidance_scale=1.0, seed=0, model="tiny-wan",
                    preset="fast", input_reference=None)

#: Each entry makes a request that check_request must refuse (field, value) or (request field, value).
PARAM_POISON: dict[str, list] = {
    "width": [-16, 0, 15, 33, 1936, 4096, INT32_MAX, INT32_MIN],
    "height": [-32, 0, 1, 40, 2048, INT32_MAX],
    "num_frames": [0, -1, -5, 2, 10, 261, 1001, INT32_MAX, INT32_MIN],
    "steps": [0, -1, 1001, 10**9, INT32_MAX, INT32_MIN],
    "fps": [0, -8, 121, 1000, INT32_MAX],
    "guidance_scale": [math.nan, math.inf, -math.inf, -1.0, -1e30],
    "model": ["nope", "", "tiny-wan ", "TINY-WAN", "/etc", "../../models/x", "/nonexistent/model", "s3://bucket/m"],
    "preset": ["", "ultra", "Fast", "quality ", "\x00"],
}
PROMPT_POISON = ["", " ", "\n\t  ", "x" * 10_001, "p" * MIB, "\u00e9" * (MIB // 2)]


@st.composite
def _poisoned_params(draw, at_least_one: bool = True) -> tuple[dict, list[str]]:
    params = dict(VALID_PARAMS)
    params["seed"] = draw(st.integers(-(2**63), 2**63 - 1))
    fields = draw(st.lists(st.sampled_from(sorted(PARAM_POISON)), min_size=1 if at_least_one else 0, max_size=3,
                           unique=True))
    for name in fields:
        params[name] = draw(st.sampled_from(PARAM_POISON[name]))
    return params, fields


# -- vidgen.requested ---------------------------------------------------------------------------------------------------
def _tier_event(draw, forge: Forge, topic: str, event: dict, kind: str) -> tuple[bytes, str]:
    """The event's bytes and kind: now and then (hypothesis leans to the low end: 10 is the rare case) framed
    with a forged schema whose tier enum has a symbol the real one lacks."""
    if draw(st.integers(1, 10)) == 10:
        schema_id, parsed, _ = forge.forged[(topic, "symbol")]
        return forge.framed(schema_id, forge.body(topic, dict(event, tier="ULTRA"), parsed)), "forged-enum-symbol"
    return forge.encode(topic, event), kind


@st.composite
def meaningless_request(draw, forge: Forge) -> BadEvent:
    """A VideoRequested the prompt encoder must refuse (check_request), framed with the real schema id — or, for
    ``forged-enum-symbol``, with a forged writer schema whose Tier has an extra symbol."""
    job_id = draw(job_ids())
    params, poisoned = draw(_poisoned_params(at_least_one=False))
    prompt = "a red fox in the snow"
    negative = ""
    what = [f"params.{p}" for p in poisoned]
    if not poisoned or draw(st.booleans()):
        choice = draw(st.sampled_from(["prompt", "negative_prompt"]))
        if choice == "prompt":
            prompt = draw(st.sampled_from(PROMPT_POISON))
        else:
            negative = draw(st.sampled_from(["n" * 10_001, "n" * MIB]))
        what.append(choice)
    event = dict(event_id=unique("ev"), job_id=job_id, timestamp=draw(_timestamp()),
                 tenant=draw(st.sampled_from(["default", "", "t" * 300, "../tenant"])), prompt=prompt,
                 negative_prompt=negative, tier=draw(st.sampled_from(["PREMIUM", "STANDARD", "FREE"])), params=params,
                 consent_ref=draw(st.one_of(st.none(), st.just(""), st.just("c" * 5000))))
    topic = topics.REQUESTED.name
    value, kind = _tier_event(draw, forge, topic, event, "meaningless-request")
    return BadEvent(topic, kind, "reject", job_id.encode("utf-8", "surrogatepass"), value, job_id=job_id,
                    note="bad: " + ",".join(what))


# -- vidgen.encoded.<tier> ----------------------------------------------------------------------------------------------
@st.composite
def meaningless_encoded(draw, forge: Forge, topic: str) -> BadEvent:
    job_id = draw(job_ids())
    tier = topic.rsplit(".", 1)[-1].upper()
    params = dict(VALID_PARAMS, seed=draw(st.integers(0, 2**31)))
    blob_case = draw(st.sampled_from(["missing", "wrong-sha", "outside-store", "not-file-uri", "not-a-tensor",
                                      "bad-params"] if forge.tensor_ref else ["missing", "outside-store",
                                                                               "not-file-uri"]))
    embeds = forge.missing_ref(f"{unique('emb')}.safetensors")
    if blob_case == "wrong-sha":
        embeds = dict(forge.tensor_ref, sha256="f" * 64)
    elif blob_case == "outside-store":
        embeds = dict(forge.tensor_ref or embeds, uri="file:///etc/hostname")
    elif blob_case == "not-file-uri":
        embeds = dict(embeds, uri=draw(st.sampled_from(["s3://bucket/x", "http://127.0.0.1:1/x", "", "::"])))
    elif blob_case == "not-a-tensor":
        embeds = dict(forge.not_a_tensor_ref)
    note = blob_case
    if blob_case == "bad-params":
        embeds = dict(forge.tensor_ref)
        # Only what the denoiser cannot run at all (fails at once): nothing that would run for long or allocate
        # gigabytes (see the report on steps=10**9).
        name, value = draw(st.sampled_from([
            ("num_frames", 0), ("num_frames", -7), ("width", 0), ("width", -16), ("height", -1), ("steps", -1),
            ("steps", INT32_MIN), ("width", 2**30), ("num_frames", INT32_MAX), ("model", "nope"), ("model", ""),
            ("model", "/nonexistent/model"),
        ]))
        params[name] = value
        if name in ("width", "height") and value == 2**30:
            params["height"] = 2**30
        note = f"params.{name}={value}"
    event = dict(event_id=unique("ev"), job_id=job_id, timestamp=draw(_timestamp()), tenant="default", tier=tier,
                 params=params, prompt_sha256=draw(st.sampled_from(["", "0" * 64, "not hex"])),
                 encoder=draw(st.sampled_from(["builtin:tiny-t5", "", "unknown-encoder"])), prompt_embeds=embeds,
                 negative_prompt_embeds=draw(st.one_of(st.none(), st.just(embeds))),
                 requested_at=draw(st.one_of(st.none(), _timestamp())), prompt_truncated=draw(st.booleans()),
                 embeddings_cached=draw(st.booleans()))
    value, kind = _tier_event(draw, forge, topic, event, "meaningless-encoded")
    return BadEvent(topic, kind, "reject", job_id.encode("utf-8", "surrogatepass"), value, job_id=job_id, slow=True,
                    note=note)


# -- vidgen.latent-chunks -----------------------------------------------------------------------------------------------
def _chunk(forge: Forge, job_id: str, **fields) -> dict:
    event = dict(event_id=unique("ev"), job_id=job_id, timestamp=0, tenant="default", chunk_index=0, chunk_count=1,
                 latent_frame_start=0, latent_frames=1, latent=forge.missing_ref(f"{unique('lat')}.safetensors"),
                 params=dict(VALID_PARAMS), attempt=1, prompt_sha256="", requested_at=None)
    event.update(fields)
    return event


@st.composite
def meaningless_chunk(draw, forge: Forge, orphans: bool = False) -> BadEvent:
    job_id = draw(job_ids())
    topic = topics.LATENT_CHUNKS.name
    cases = ["count-zero", "count-negative", "index-negative", "index-past-count", "index-huge", "no-frames",
             "negative-frames", "negative-start", "first-missing-blob", "first-fps-zero", "first-unknown-model"]
    if forge.tensor_ref:
        cases += ["first-wrong-sha", "first-not-a-tensor", "first-wrong-shape"]
    if orphans:
        cases.append("orphan-chunk")
    case = draw(st.sampled_from(cases))
    count = draw(st.integers(1, INT32_MAX))
    slow, expect = False, "reject"
    if case == "count-zero":
        fields = dict(chunk_count=0, chunk_index=0)
    elif case == "count-negative":
        fields = dict(chunk_count=draw(st.integers(INT32_MIN, -1)), chunk_index=0)
    elif case == "index-negative":
        fields = dict(chunk_count=count, chunk_index=draw(st.integers(INT32_MIN, -1)))
    elif case == "index-past-count":
        c = draw(st.integers(1, 1000))
        fields = dict(chunk_count=c, chunk_index=draw(st.integers(c, c + 1000)))
    elif case == "index-huge":
        fields = dict(chunk_count=draw(st.integers(1, 10)), chunk_index=INT32_MAX)
    elif case == "no-frames":
        fields = dict(latent_frames=0)
    elif case == "negative-frames":
        fields = dict(latent_frames=draw(st.integers(INT32_MIN, -1)))
    elif case == "negative-start":
        fields = dict(latent_frame_start=draw(st.integers(INT32_MIN, -1)))
    elif case == "orphan-chunk":
        c = draw(st.integers(2, 1000))
        fields = dict(chunk_count=c, chunk_index=draw(st.integers(1, c - 1)))
        expect = "held"
    else:  # a first chunk the decoder accepts and then cannot decode: retried, then dead-lettered
        slow = True
        fields = dict(chunk_count=draw(st.sampled_from([1, 2, count])), chunk_index=0)
        if case == "first-fps-zero":
            fields["params"] = dict(VALID_PARAMS, fps=0)
        elif case == "first-unknown-model":
            fields["params"] = dict(VALID_PARAMS, model=draw(st.sampled_from(["nope", "", "/nonexistent/m"])))
        elif case == "first-wrong-sha":
            fields["latent"] = dict(forge.tensor_ref, sha256="e" * 64)
        elif case == "first-not-a-tensor":
            fields["latent"] = dict(forge.not_a_tensor_ref)
        elif case == "first-wrong-shape":
            fields["latent"] = dict(forge.tensor_ref, shape=[1, 2, 3])
    event = _chunk(forge, job_id, **fields)
    return BadEvent(topic, case, expect, job_id.encode("utf-8", "surrogatepass"), forge.encode(topic, event),
                    job_id=job_id, slow=slow, note=json.dumps({k: v for k, v in fields.items() if k != "latent"}))


# -- vidgen.decoded -----------------------------------------------------------------------------------------------------
@st.composite
def meaningless_decoded(draw, forge: Forge) -> BadEvent:
    job_id = draw(job_ids())
    topic = topics.DECODED.name
    cases = ["last-missing-video", "last-missing-segment", "not-last"]
    if forge.tensor_ref:
        cases += ["last-wrong-sha", "last-not-an-mp4"]
    case = draw(st.sampled_from(cases))
    missing = forge.missing_ref(f"{unique('seg')}.m4s")
    video = segment = missing
    if case == "last-missing-segment":
        video = None
    elif case == "last-wrong-sha":
        video = dict(forge.not_a_tensor_ref, sha256="d" * 64)
    elif case == "last-not-an-mp4":
        video = dict(forge.not_a_tensor_ref)
    is_last = case != "not-last"
    params = dict(VALID_PARAMS)
    if draw(st.booleans()):
        name = draw(st.sampled_from(["fps", "width", "num_frames", "steps"]))
        params[name] = draw(st.sampled_from([0, -1, INT32_MAX]))
    event = dict(event_id=unique("ev"), job_id=job_id, timestamp=0, tenant="default",
                 segment_index=draw(st.integers(INT32_MIN, INT32_MAX)), is_last=is_last, segment=segment,
                 frame_start=draw(st.integers(INT32_MIN, INT32_MAX)), frames=draw(st.integers(INT32_MIN, INT32_MAX)),
                 video=video, params=params, init_segment=draw(st.one_of(st.none(), st.just(missing))),
                 playlist=None, decoder_id="", prompt_sha256="", requested_at=None)
    return BadEvent(topic, case, "reject" if is_last else "ignored", job_id.encode("utf-8", "surrogatepass"),
                    forge.encode(topic, event), job_id=job_id, slow=is_last, note=f"is_last={is_last}")


# -- vidgen.control -----------------------------------------------------------------------------------------------------
@st.composite
def meaningless_cancel(draw, forge: Forge) -> BadEvent:
    """JobCancelled for jobs nobody runs: the agents remember it and nothing else happens."""
    job_id = draw(job_ids())
    topic = topics.CONTROL.name
    event = dict(event_id=unique("ev"), job_id=job_id, timestamp=draw(_timestamp()),
                 reason=draw(st.sampled_from(["", "r" * MIB, "\u2603" * 100])),
                 requested_by=draw(st.sampled_from(["", "x" * 10_000])), stage=draw(st.sampled_from(["", "??"])),
                 stopped_at_step=draw(st.one_of(st.none(), st.integers(INT32_MIN, INT32_MAX))))
    return BadEvent(topic, "cancel-unknown-job", "ignored", job_id.encode("utf-8", "surrogatepass"),
                    forge.encode(topic, event), job_id=job_id)


def meaningless(forge: Forge, topic: str, orphans: bool = False) -> st.SearchStrategy[BadEvent]:
    """Schema-valid but meaningless events for one input topic."""
    if topic == topics.REQUESTED.name:
        return meaningless_request(forge)
    if topic in {t.name for t in topics.ENCODED.values()}:
        return meaningless_encoded(forge, topic)
    if topic == topics.LATENT_CHUNKS.name:
        return meaningless_chunk(forge, orphans)
    if topic == topics.DECODED.name:
        return meaningless_decoded(forge)
    if topic == topics.CONTROL.name:
        return meaningless_cancel(forge)
    raise KeyError(topic)


# -- wire-level garbage -------------------------------------------------------------------------------------------------
def _plain_event(forge: Forge, topic: str, job_id: str) -> dict:
    """A schema-valid event of the topic (its contents never matter: it only supplies an Avro body)."""
    name = forge.codec.schema_of(topic)
    if name == "VideoRequested":
        return dict(event_id=unique("ev"), job_id=job_id, timestamp=0, tenant="default", prompt="p",
                    negative_prompt="", tier="STANDARD", params=dict(VALID_PARAMS), consent_ref=None)
    if name == "PromptEncoded":
        return dict(event_id=unique("ev"), job_id=job_id, timestamp=0, tenant="default", tier="STANDARD",
                    params=dict(VALID_PARAMS), prompt_sha256="", encoder="", prompt_embeds=forge.missing_ref("x"),
                    negative_prompt_embeds=None, requested_at=None, prompt_truncated=False, embeddings_cached=False)
    if name == "LatentChunk":
        return _chunk(forge, job_id)
    if name == "VideoDecoded":
        ref = forge.missing_ref("s")
        return dict(event_id=unique("ev"), job_id=job_id, timestamp=0, tenant="default", segment_index=0,
                    is_last=True, segment=ref, frame_start=0, frames=1, video=ref, params=dict(VALID_PARAMS),
                    init_segment=None, playlist=None, decoder_id="", prompt_sha256="", requested_at=None)
    if name == "JobCancelled":
        return dict(event_id=unique("ev"), job_id=job_id, timestamp=0, reason="", requested_by="", stage="",
                    stopped_at_step=None)
    raise KeyError(name)


WIRE_KINDS = ("random-bytes", "empty", "tombstone", "short-frame", "bad-magic", "unknown-schema-id",
              "foreign-schema-id", "truncated", "forged-enum-type", "forged-field-type", "timestamp-overflow")


@st.composite
def wire_garbage(draw, forge: Forge, topic: str, skip: frozenset[str] = frozenset()) -> BadEvent:
    """Bytes the topic's reader cannot decode (→ DECODE dead letter). ``skip``: kinds not to draw."""
    kinds = [k for k in WIRE_KINDS
             if k not in skip and (k != "forged-enum-type" or (topic, "enum") in forge.forged)]
    kind = draw(st.sampled_from(kinds))
    job_id = unique("garbage")
    key = draw(st.one_of(st.none(), st.just(job_id.encode()), st.binary(min_size=0, max_size=64)))
    body = forge.body(topic, _plain_event(forge, topic, job_id))
    own_id = forge.schema_ids[topic]
    if kind == "random-bytes":
        value = draw(st.binary(min_size=1, max_size=2048))
        value = bytes([value[0] or 1]) + value[1:]  # a leading 0 could make it a (probably unknown) frame
    elif kind == "empty":
        value = b""
    elif kind == "tombstone":
        value = None
    elif kind == "short-frame":
        value = b"\x00" + draw(st.binary(min_size=0, max_size=3))
    elif kind == "bad-magic":
        value = forge.framed(own_id, body, magic=draw(st.integers(1, 255)))
    elif kind == "unknown-schema-id":
        schema_id = draw(st.one_of(st.just(0), st.just(2**32 - 1), st.just(2**31),
                                   st.integers(0, 2**32 - 1).filter(lambda i: i not in forge.known_ids)))
        value = forge.framed(schema_id, body)
    elif kind == "foreign-schema-id":
        value = forge.framed(draw(st.sampled_from(forge.foreign_ids(topic))), body)
    elif kind == "truncated":
        framed = forge.framed(own_id, body)
        value = framed[:draw(st.integers(5, len(framed) - 1))]
    elif kind == "timestamp-overflow":
        # Schema-valid Avro whose timestamp-millis is no datetime: fastavro raises OverflowError while reading it.
        event = _plain_event(forge, topic, job_id)
        where = draw(st.sampled_from(["timestamp", "requested_at"] if "requested_at" in event else ["timestamp"]))
        event[where] = draw(st.sampled_from(TIMESTAMP_OVERFLOW))
        value = forge.framed(own_id, forge.body(topic, event))
    elif kind == "forged-enum-type":
        schema_id, parsed, note = forge.forged[(topic, "enum")]
        value = forge.framed(schema_id, forge.body(topic, dict(_plain_event(forge, topic, job_id), tier="ULTRA"),
                                                    parsed))
    else:  # forged-field-type
        schema_id, parsed, note = forge.forged[(topic, "type")]
        event = _plain_event(forge, topic, job_id)
        if "params.width" in note:
            event["params"] = dict(event["params"], width="thirty-two")
        else:
            field_name = note.split(":")[0]
            event[field_name] = "not-a-number" if field_name != "job_id" else 7
        value = forge.framed(schema_id, forge.body(topic, event, parsed))
    # vidgen.control is read without a consumer group: what the agents cannot decode is logged, not dead-lettered.
    return BadEvent(topic, kind, "ignored" if STAGE_OF[topic] is None else "dead-letter", key, value)


def bad_events(forge: Forge, topic: str, meaningless_share: float = 0.5,
               orphans: bool = False) -> st.SearchStrategy[BadEvent]:
    """Wire garbage or meaningless events for one topic (about ``meaningless_share`` of the latter)."""
    weight = max(1, round(10 * meaningless_share))
    return st.integers(1, 10).flatmap(
        lambda n: meaningless(forge, topic, orphans) if n <= weight else wire_garbage(forge, topic))
