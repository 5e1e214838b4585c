"""W3C trace context in Kafka headers (``traceparent``/``tracestate``), through OpenTelemetry.

Each handled message becomes a span whose parent is the context its headers carry, and every event the handler
emits carries the new span's context, so one trace follows a job across stages. Spans are exported only when
the operator configures an exporter (OTEL_* environment variables with an SDK exporter); otherwise they cost
little and go nowhere.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.trace import TracerProvider

Headers = list[tuple[str, bytes]]

_provider = TracerProvider()
_tracer = _provider.get_tracer("vidgen")


def headers_to_carrier(headers: Headers | None) -> dict[str, str]:
    return {k: v.decode("latin-1") for k, v in (headers or []) if v is not None}


@contextmanager
def consume_span(stage: str, topic: str, headers: Headers | None) -> Iterator[trace.Span]:
    parent = extract(headers_to_carrier(headers))
    with _tracer.start_as_current_span(f"{stage} process {topic}", context=parent, kind=trace.SpanKind.CONSUMER) as span:
        yield span


def current_trace_headers() -> Headers:
    """traceparent (and tracestate) of the current span, ready for a Kafka message; a new trace when none is active."""
    carrier: dict[str, str] = {}
    if not trace.get_current_span().get_span_context().is_valid:
        with _tracer.start_as_current_span("vidgen produce", kind=trace.SpanKind.PRODUCER):
            inject(carrier)
    else:
        inject(carrier)
    return [(k, v.encode("latin-1")) for k, v in carrier.items()]


def trace_id_of(headers: Headers | None) -> str | None:
    """The trace id (32 hex digits) named by a message's traceparent, if any."""
    span_context = trace.get_current_span(extract(headers_to_carrier(headers))).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None
