"""schemas.compat: verdicts come from avro's ReaderWriterCompatibilityChecker; messages name the field."""
from __future__ import annotations

import json
from typing import Any

import pytest

from schemas.compat import (
    CompatibilityLevel,
    InvalidSchemaError,
    canonical_form,
    check_backward,
    check_backward_transitive,
    check_compatibility,
    check_forward,
    check_full,
    parse_schema,
)


def record(fields: list[dict[str, Any]], name: str = "VideoRequested", **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": "io.vidgen", "fields": fields, **extra}


def tier(symbols: list[str]) -> dict[str, Any]:
    return {"type": "enum", "name": "Tier", "symbols": symbols}


def params(steps_type: str) -> dict[str, Any]:
    return record([{"name": "steps", "type": steps_type}, {"name": "seed", "type": "long"}], name="GenerationParams")


JOB_ID = {"name": "job_id", "type": "string"}
OLD = record([JOB_ID, {"name": "frames", "type": "int"}])


def test_adding_a_field_with_a_default_is_backward_compatible() -> None:
    new = record([JOB_ID, {"name": "frames", "type": "int"}, {"name": "fps", "type": "int", "default": 24}])

    report = check_backward(new, OLD)

    assert report.compatible and report.messages == []


def test_adding_a_field_without_a_default_is_not_and_the_message_names_it() -> None:
    new = record([JOB_ID, {"name": "frames", "type": "int"}, {"name": "fps", "type": "int"}])

    report = check_backward(new, OLD)

    assert not report.compatible
    assert len(report.messages) == 1 and "'fps'" in report.messages[0] and "default" in report.messages[0]


def test_removing_a_field_is_backward_compatible() -> None:
    assert check_backward(record([JOB_ID]), OLD).compatible


def test_widening_int_to_long_is_compatible_and_narrowing_long_to_int_is_not() -> None:
    widened = record([JOB_ID, {"name": "frames", "type": "long"}])

    assert check_backward(widened, OLD).compatible
    narrowed = check_backward(OLD, widened)
    assert not narrowed.compatible
    assert narrowed.messages == ["field 'frames': type 'int' in the new schema cannot read 'long' from the old schema"]


def test_renaming_a_type_needs_an_alias() -> None:
    renamed = record(OLD["fields"], name="VideoRequest")
    aliased = record(OLD["fields"], name="VideoRequest", aliases=["io.vidgen.VideoRequested"])

    report = check_backward(renamed, OLD)

    assert not report.compatible and "io.vidgen.VideoRequested" in report.messages[0]
    assert check_backward(aliased, OLD).compatible


def test_enum_symbols_added_to_the_reader_are_compatible_removed_ones_the_writer_uses_are_not() -> None:
    old = record([JOB_ID, {"name": "tier", "type": tier(["DRAFT", "STANDARD"])}])
    more = record([JOB_ID, {"name": "tier", "type": tier(["DRAFT", "STANDARD", "PREMIUM"])}])
    fewer = record([JOB_ID, {"name": "tier", "type": tier(["DRAFT"])}])

    assert check_backward(more, old).compatible
    report = check_backward(fewer, old)
    assert not report.compatible
    assert "field 'tier'" in report.messages[0] and "STANDARD" in report.messages[0]


def test_a_change_inside_a_nested_named_record_is_found_and_located() -> None:
    retry = {"name": "retry", "type": ["null", "GenerationParams"]}  # a second use of the named type, by name
    old = record([JOB_ID, {"name": "params", "type": params("int")}, retry])
    new = record([JOB_ID, {"name": "params", "type": params("string")}, retry])

    report = check_backward(new, old)

    assert not report.compatible
    assert any("'params.steps'" in message and "'string'" in message for message in report.messages), report.messages
    # The second use of the named type is reported too, as a union that cannot read the old record.
    assert any("'retry'" in message for message in report.messages), report.messages


def test_forward_swaps_roles_and_full_needs_both() -> None:
    removed_required = record([JOB_ID])

    assert check_backward(removed_required, OLD).compatible
    forward = check_forward(removed_required, OLD)
    assert not forward.compatible and "'frames'" in forward.messages[0] and "old schema" in forward.messages[0]
    assert not check_full(removed_required, OLD).compatible


def test_transitive_checks_every_old_schema_and_says_which() -> None:
    v1 = record([JOB_ID])
    v2 = record([JOB_ID, {"name": "fps", "type": "int", "default": 24}])
    v3 = record([JOB_ID, {"name": "fps", "type": "int"}])  # fine against v2, not against v1

    assert check_backward(v3, v2).compatible
    report = check_backward_transitive(v3, [v1, v2])
    assert not report.compatible
    assert report.messages and all(message.startswith("old schema 1: ") for message in report.messages)
    assert check_compatibility(v3, {1: v1, 2: v2}, CompatibilityLevel.BACKWARD).compatible
    assert not check_compatibility(v3, {1: v1, 2: v2}, "backward_transitive").compatible
    assert check_compatibility(v3, {1: v1}, "NONE").compatible


def test_schemas_are_accepted_as_json_text_or_values_and_invalid_ones_are_refused_clearly() -> None:
    assert check_backward(json.dumps(OLD, indent=2), OLD).compatible

    with pytest.raises(InvalidSchemaError, match="not valid JSON"):
        parse_schema('{"type": "record"')
    with pytest.raises(InvalidSchemaError, match="NoSuchType"):
        parse_schema(record([{"name": "x", "type": "NoSuchType"}]))
    with pytest.raises(InvalidSchemaError, match="[Dd]efault"):
        parse_schema(record([{"name": "x", "type": "int", "default": "ten"}]))
    assert issubclass(InvalidSchemaError, ValueError)
    with pytest.raises(ValueError, match="BACKWARD_TRANSITIVE"):
        CompatibilityLevel.parse("SIDEWAYS")


def test_canonical_form_ignores_formatting_but_not_meaning() -> None:
    reordered = {"fields": [{"type": {"type": "string"}, "name": "job_id"}], "name": "io.vidgen.VideoRequested"}
    spaced = json.dumps({**reordered, "type": "record"}, indent=3)
    compact = json.dumps(record([JOB_ID]), separators=(",", ":"))
    with_default = record([{"name": "job_id", "type": "string", "default": ""}])

    assert canonical_form(spaced) == canonical_form(compact)
    assert canonical_form(with_default) != canonical_form(compact)
