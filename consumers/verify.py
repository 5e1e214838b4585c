"""`vidgen verify FILE`: where a video came from — its C2PA state, assertions and ingredients (the input image of an
image-to-video job, with its sha256), the invisible watermark read from its frames, its audio track (if any: the C2PA
hash covers it, the watermark does not), and, when the event log is reachable, the job whose publication carries
that watermark.

The file checks are compliance/ functions; this module adds the one look-up that needs Kafka (vidgen.published,
read from the beginning without a consumer group).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from compliance.provenance import UNSIGNED, ProvenanceReport, verify_video
from compliance.watermark import WatermarkReading, read_watermark
from streams import topics
from streams.settings import Settings, load_settings

LOOKUP_QUIET_S = 2.0  # the published topic is read to its end when nothing new comes for this long
LOOKUP_TIMEOUT_S = 30.0


@dataclass
class VerifyReport:
    path: str
    provenance: ProvenanceReport
    trust_anchor: str  # where the trusted root came from, for the reader of the report
    watermark: WatermarkReading | None
    watermark_error: str = ""
    jobs: list[dict] = field(default_factory=list)  # published events whose watermark or manifest matches
    lookup_note: str = ""
    audio: dict | None = None  # probe_mp4's facts of the audio track, when the file has one
    audio_note: str = ""  # otherwise why not: no track, or the file could not be read

    @property
    def ok(self) -> bool:
        return self.provenance.trusted and self.watermark is not None and self.watermark.payload is not None

    def render(self) -> str:
        p = self.provenance
        lines = [f"file: {self.path}", f"C2PA: {p.validation_state} (trust anchor: {self.trust_anchor})"]
        if p.validation_state != UNSIGNED:
            lines.append(f"  manifest: {p.manifest_label}  claim generator: {p.claim_generator}")
            for code in p.validation_errors:
                lines.append(f"  error: {code}")
            for label, data in p.assertions.items():
                lines.append(f"  assertion {label}: {json.dumps(data, sort_keys=True, default=str)[:300]}")
            for ingredient in p.ingredients:  # e.g. the input image of an image-to-video job
                line = f"  ingredient {ingredient['title']} ({ingredient['format']}, {ingredient['relationship']})"
                if ingredient["sha256"]:
                    line += f", sha256 {ingredient['sha256']} ({ingredient['bytes']} bytes)"
                lines.append(line)
        if self.watermark is None:
            lines.append(f"watermark: not read ({self.watermark_error})")
        elif self.watermark.payload is None:
            lines.append(f"watermark: none found ({self.watermark.reason or 'no decodable payload'})")
        else:
            lines.append(f"watermark: {self.watermark.payload.hex()} (read from {self.watermark.frames_read} frames)")
        if self.audio:
            lines.append(f"audio: {self.audio['codec']} {self.audio['sample_rate']} Hz {self.audio['channels']} ch "
                         f"{self.audio['duration_s']:.3f} s")
        elif self.audio_note:
            lines.append(f"audio: {self.audio_note}")
        if self.lookup_note:
            lines.append(f"job: {self.lookup_note}")
        for job in self.jobs:
            lines.append(f"job: {job['job_id']} (tenant {job['tenant']}, published {job['timestamp']}, "
                         f"model {job['params']['model']}, seed {job['params']['seed']})")
        return "\n".join(lines)


def default_trust_anchor(settings: Settings) -> Path | None:
    """The development root, when this machine made one (var/c2pa): the only root a fresh install trusts."""
    path = settings.var_dir / "c2pa" / "dev-root.pem"
    return path if path.is_file() else None


def verify_file(path: str, trust_anchor: str | None = None, look_up_job: bool = True,
                settings: Settings | None = None) -> VerifyReport:
    settings = settings or load_settings()
    data = Path(path).read_bytes()
    anchor_path = Path(trust_anchor) if trust_anchor else default_trust_anchor(settings)
    anchor_pem = anchor_path.read_text() if anchor_path else None
    anchor_note = str(anchor_path) if anchor_path else "none given; a valid signature can be at most 'Valid'"
    try:
        provenance = verify_video(data, trust_anchors_pem=anchor_pem)
    except Exception as exc:  # noqa: BLE001 - c2pa refuses what is not an MP4 at all
        provenance = ProvenanceReport("Invalid", validation_errors=[f"unreadable: {exc}"])

    from gpu_agents.video import probe_mp4, read_mp4

    report = VerifyReport(str(path), provenance, anchor_note, None)
    try:
        report.watermark = read_watermark(read_mp4(data))
    except Exception as exc:  # noqa: BLE001 - not decodable video
        report.watermark_error = f"{type(exc).__name__}: {exc}"
    try:
        report.audio = probe_mp4(data).get("audio")
        report.audio_note = "" if report.audio else "none"
    except Exception as exc:  # noqa: BLE001 - not a readable MP4
        report.audio_note = f"not read ({type(exc).__name__}: {exc})"
    if look_up_job:
        find_jobs(report, settings)
    return report


def find_jobs(report: VerifyReport, settings: Settings) -> None:
    """Published events that name this watermark payload or this manifest label."""
    payload = report.watermark.payload.hex() if report.watermark and report.watermark.payload else None
    label = report.provenance.manifest_label
    if payload is None and label is None:
        report.lookup_note = "nothing to look up (no watermark, no manifest)"
        return
    if not settings.kafka_bootstrap or not settings.schema_registry_url:
        report.lookup_note = "event log not reachable (no cluster configured and no embedded platform running)"
        return
    from consumers.progress import read_events

    deadline = time.monotonic() + LOOKUP_TIMEOUT_S
    quiet_since = time.monotonic()
    for job_event in read_events(settings, lifecycle=(topics.PUBLISHED,)):
        now = time.monotonic()
        if job_event is None:
            if now - quiet_since > LOOKUP_QUIET_S or now > deadline:
                break
            continue
        quiet_since = now
        event = job_event.event
        if (payload and event.get("watermark_payload") == payload) or (label and event.get("manifest_label") == label):
            report.jobs.append(event)
    if not report.jobs:
        report.lookup_note = "no published job carries this watermark or manifest"
