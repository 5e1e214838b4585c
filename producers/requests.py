"""The Python producer API for upstream services: publish VideoRequested events.

    from producers.requests import VideoRequests
    with VideoRequests(load_settings()) as requests:
        job_id = requests.submit("a red fox in the snow", tier="premium", steps=30)

Requests are keyed by job_id (all of a job's events share a partition, so they stay in order) and carry W3C
trace context. ``submit`` returns once the broker has acknowledged the request (acks=all, idempotent producer).

Image-to-video: ``submit(prompt, image=png_bytes)`` checks the image (compliance/input_image.py), stores it as a blob
under the job and names it in ``params.input_reference`` — the blob is written before the event that names it.
"""
from __future__ import annotations

from confluent_kafka import Producer

from compliance.input_image import InputImage, read_input_image
from streams import topics
from streams.blobs import BlobStore, open_blob_store
from streams.events import new_event, new_job_id
from streams.kafka import producer_config
from streams.serde import encode_key, event_codec
from streams.settings import Settings
from streams.tracing import current_trace_headers

DEFAULT_PARAMS = {
    "width": 64,
    "height": 64,
    "num_frames": 9,
    "fps": 8,
    "steps": 50,
    "guidance_scale": 5.0,
    "seed": 0,
}
#: What a preset changes in the defaults; explicit parameters still win.
PRESETS = {
    "quality": {"steps": 50, "guidance_scale": 5.0},  # many steps, classifier-free guidance
    "fast": {"steps": 4, "guidance_scale": 1.0},  # distilled few-step checkpoints: one transformer pass per step
}


class SubmitError(RuntimeError):
    pass


def parse_size(text: str) -> tuple[int, int]:
    """'64x48' → (64, 48), as (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must be WIDTHxHEIGHT, e.g. 64x64 (got {text!r})") from None
    return width, height


def video_request(prompt: str, *, job_id: str | None = None, tier: str = "standard", tenant: str = "default",
                  negative_prompt: str = "", consent_ref: str | None = None, model: str = "tiny-wan",
                  preset: str = "quality", input_reference: dict | None = None, guidance_scale_2: float | None = None,
                  seconds: float | None = None, **params) -> dict:
    """A VideoRequested event; unspecified generation parameters take the preset's, then DEFAULT_PARAMS.

    ``input_reference`` is the BlobRef of an image-to-video job's input image (``store_input_image``);
    ``guidance_scale_2`` the guidance of a two-expert model's low-noise expert (None: as guidance_scale);
    ``seconds`` the duration the client asked for, if it asked in seconds (num_frames is what it gets)."""
    unknown = set(params) - set(DEFAULT_PARAMS)
    if unknown:
        raise TypeError(f"unknown generation parameters: {', '.join(sorted(unknown))}")
    if tier.lower() not in topics.TIERS:
        raise ValueError(f"unknown tier {tier!r}; known: {', '.join(topics.TIERS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    params = {k: v for k, v in params.items() if v is not None}
    return new_event(
        job_id or new_job_id(),
        tenant=tenant,
        prompt=prompt,
        negative_prompt=negative_prompt,
        tier=tier.upper(),
        params={**DEFAULT_PARAMS, **PRESETS[preset], **params, "model": model, "preset": preset,
                "input_reference": input_reference, "guidance_scale_2": guidance_scale_2},
        consent_ref=consent_ref,
        seconds=seconds,
    )


def store_input_image(blobs: BlobStore, job_id: str, image: InputImage) -> dict:
    """The input image as a blob of its job; its BlobRef, for params.input_reference. Content-addressed: the same job
    id with another image (an Idempotency-Key reused) never replaces a blob an accepted request names."""
    return blobs.put(image.data, job_id, image.file_name, dtype=image.media_type, content_addressed=True)


class VideoRequests:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.codec = event_codec(settings)
        self.producer = Producer(producer_config(settings, "vidgen-submit"))
        self.blobs = open_blob_store(settings)

    def publish(self, request: dict) -> str:
        """Publish a VideoRequested built with video_request(); returns its job id once acknowledged."""
        self._publish(topics.REQUESTED, request)
        return request["job_id"]

    def _publish(self, topic: topics.Topic, event: dict, timeout_s: float = 30.0) -> None:
        errors: list[str] = []
        self.producer.produce(
            topic.name,
            key=encode_key(event["job_id"]),
            value=self.codec.encode(topic.name, event),
            headers=current_trace_headers(),
            on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
        )
        if self.producer.flush(timeout_s) or errors:
            raise SubmitError(f"{topic.name} event for job {event['job_id']} not acknowledged by the broker: "
                              f"{errors or 'timeout'}")

    def submit(self, prompt: str, *, image: bytes | InputImage | None = None, **kwargs) -> str:
        """Publish a request; ``image`` (PNG, JPEG or WebP bytes, or an InputImage already read) makes it
        image-to-video. Raises InputImageError for an image the platform does not accept, before anything is stored
        or published."""
        kwargs.setdefault("model", self.settings.default_model)
        if image is not None:
            checked = image if isinstance(image, InputImage) else read_input_image(image)
            kwargs["job_id"] = kwargs.get("job_id") or new_job_id()
            kwargs["input_reference"] = store_input_image(self.blobs, kwargs["job_id"], checked)
        return self.publish(video_request(prompt, **kwargs))

    def cancel(self, job_id: str, reason: str = "", requested_by: str = "") -> None:
        """Ask for a job to stop: a queued job is skipped, a running one stops within one step."""
        self._publish(topics.CONTROL, new_event(job_id, reason=reason, requested_by=requested_by))

    def close(self) -> None:
        self.producer.flush(10)
        self.producer.close()  # drop the broker connections now, not whenever the object is collected

    def __enter__(self) -> "VideoRequests":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
