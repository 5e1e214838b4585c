"""Avro schema compatibility, decided by the Apache ``avro`` library's ``ReaderWriterCompatibilityChecker``.

BACKWARD means a consumer on the new schema can read data written with an old one (new = reader, old = writer);
FORWARD swaps the roles; FULL is both. The verdict is always the library's. What this module adds is explanation:
the library reports messages and locations as two unpaired sets, with positional paths (``/fields/3/type``) that
restart at ``/`` inside unions, so a subclass of the checker records which reader/writer pair every verdict came
from and the report names fields by their dotted path instead (``params.steps``).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Mapping, Sequence, Union

import avro.errors
import avro.schema
from avro.compatibility import (
    ReaderWriter,
    ReaderWriterCompatibilityChecker,
    SchemaCompatibilityResult,
    SchemaCompatibilityType,
    SchemaIncompatibilityType,
)
from fastavro.schema import SchemaParseException as FastavroSchemaParseException
from fastavro.schema import UnknownType as FastavroUnknownType
from fastavro.schema import parse_schema as fastavro_parse_schema

#: A schema as JSON text, as its decoded JSON value (a dict, or a list for a top-level union), or already parsed.
SchemaInput = Union[str, dict[str, Any], list[Any], avro.schema.Schema]

__all__ = [
    "CompatibilityLevel",
    "CompatibilityReport",
    "InvalidSchemaError",
    "SchemaInput",
    "canonical_form",
    "check_backward",
    "check_backward_transitive",
    "check_compatibility",
    "check_forward",
    "check_full",
    "parse_schema",
]


class InvalidSchemaError(ValueError):
    """The text or value given is not a valid Avro schema (bad JSON, unknown type, bad default, ...)."""


@dataclass
class CompatibilityReport:
    """The verdict, and why not: one human-readable message per problem, naming the field where it can."""

    compatible: bool
    messages: list[str] = field(default_factory=list)

    @classmethod
    def combine(cls, reports: Iterable[CompatibilityReport]) -> CompatibilityReport:
        """Compatible only if every report is; messages in the order given."""
        reports = list(reports)
        return cls(
            compatible=all(report.compatible for report in reports),
            messages=[message for report in reports for message in report.messages],
        )


class CompatibilityLevel(str, Enum):
    """Confluent's compatibility levels: which direction(s) to check, and against the latest or all versions."""

    NONE = "NONE"
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"

    @classmethod
    def parse(cls, value: str) -> CompatibilityLevel:
        """The level named by ``value`` (case-insensitive); ValueError naming the valid levels otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).upper())
        except ValueError:
            valid = ", ".join(level.value for level in cls)
            raise ValueError(f"unknown compatibility level {value!r}; expected one of {valid}") from None

    @property
    def transitive(self) -> bool:
        return self.value.endswith("_TRANSITIVE")

    @property
    def checks_backward(self) -> bool:
        return self.value.startswith(("BACKWARD", "FULL"))

    @property
    def checks_forward(self) -> bool:
        return self.value.startswith(("FORWARD", "FULL"))


def parse_schema(schema: SchemaInput) -> avro.schema.Schema:
    """Parse and validate an Avro schema; InvalidSchemaError says what is wrong.

    Validated by fastavro too, because that is the parser the Confluent serializers use and, unlike ``avro``,
    it rejects defaults that do not match their field's type.
    """
    if isinstance(schema, avro.schema.Schema):
        return schema
    if isinstance(schema, str):
        try:
            decoded = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidSchemaError(f"schema is not valid JSON: {exc}") from exc
    elif isinstance(schema, (dict, list)):
        decoded = schema
    else:
        raise InvalidSchemaError(f"a schema must be JSON text, a dict or a list, not {type(schema).__name__}")
    try:
        parsed = avro.schema.parse(json.dumps(decoded))
    except (avro.errors.AvroException, TypeError, ValueError) as exc:
        raise InvalidSchemaError(f"invalid Avro schema: {exc}") from exc
    try:
        fastavro_parse_schema(decoded)
    except (FastavroSchemaParseException, FastavroUnknownType, TypeError, ValueError) as exc:
        raise InvalidSchemaError(f"invalid Avro schema: {exc}") from exc
    return parsed


def canonical_form(schema: SchemaInput) -> str:
    """A text equal for schemas that differ only in formatting: whitespace, key order, ``"int"`` vs
    ``{"type": "int"}``, full names vs namespace-relative ones.

    Unlike Avro's Parsing Canonical Form it keeps defaults, aliases, docs, logical types and custom properties,
    because those change what a reader does (a different default or logical type is a different schema).
    """
    return json.dumps(parse_schema(schema).to_json(), sort_keys=True, separators=(",", ":"))


def check_backward(new_schema: SchemaInput, old_schema: SchemaInput) -> CompatibilityReport:
    """Can a consumer using ``new_schema`` read data written with ``old_schema``?"""
    return _check_reader_writer(parse_schema(new_schema), parse_schema(old_schema), "new schema", "old schema")


def check_forward(new_schema: SchemaInput, old_schema: SchemaInput) -> CompatibilityReport:
    """Can a consumer still using ``old_schema`` read data written with ``new_schema``?"""
    return _check_reader_writer(parse_schema(old_schema), parse_schema(new_schema), "old schema", "new schema")


def check_full(new_schema: SchemaInput, old_schema: SchemaInput) -> CompatibilityReport:
    """Both backward and forward."""
    return CompatibilityReport.combine([check_backward(new_schema, old_schema), check_forward(new_schema, old_schema)])


def check_backward_transitive(new_schema: SchemaInput, old_schemas: Sequence[SchemaInput]) -> CompatibilityReport:
    """Backward against every old schema; messages say which one by its 1-based position in ``old_schemas``."""
    return check_compatibility(
        new_schema, dict(enumerate(old_schemas, start=1)), CompatibilityLevel.BACKWARD_TRANSITIVE, label="old schema"
    )


def check_compatibility(
    new_schema: SchemaInput,
    existing_versions: Mapping[int, SchemaInput],
    level: CompatibilityLevel | str,
    label: str = "version",
) -> CompatibilityReport:
    """Check ``new_schema`` the way a registry does before adding it as the next version of a subject.

    ``existing_versions`` maps version number to schema. Transitive levels check every version, the others only
    the highest; each message starts with ``"<label> <number>: "``.
    """
    level = CompatibilityLevel.parse(level)
    if level is CompatibilityLevel.NONE or not existing_versions:
        return CompatibilityReport(compatible=True)
    versions = sorted(existing_versions) if level.transitive else [max(existing_versions)]
    new_parsed = parse_schema(new_schema)
    reports = []
    for version in versions:
        old_parsed = parse_schema(existing_versions[version])
        checks = []
        if level.checks_backward:
            checks.append(check_backward(new_parsed, old_parsed))
        if level.checks_forward:
            checks.append(check_forward(new_parsed, old_parsed))
        report = CompatibilityReport.combine(checks)
        report.messages = [f"{label} {version}: {message}" for message in report.messages]
        reports.append(report)
    return CompatibilityReport.combine(reports)


def _check_reader_writer(
    reader: avro.schema.Schema, writer: avro.schema.Schema, reader_label: str, writer_label: str
) -> CompatibilityReport:
    checker = _TracingChecker()
    result = checker.get_compatibility(reader, writer)
    if result.compatibility is not SchemaCompatibilityType.incompatible:
        return CompatibilityReport(compatible=True)
    assert checker.root is not None
    messages = _Explainer(reader_label, writer_label).explain(checker.root)
    if not messages:  # the tracing missed something: fall back to the library's own words rather than say nothing
        messages = [f"{message} (at {', '.join(sorted(result.locations))})" for message in sorted(result.messages)]
    return CompatibilityReport(compatible=False, messages=messages)


@dataclass(eq=False)
class _Comparison:
    """One reader/writer pair the checker compared, where in the reader it sits, and what it concluded."""

    path: str
    reader: avro.schema.Schema
    writer: avro.schema.Schema
    memoized: bool
    result: SchemaCompatibilityResult | None = None
    children: list[_Comparison] = field(default_factory=list)

    @property
    def incompatible(self) -> bool:
        return self.result is not None and self.result.compatibility is SchemaCompatibilityType.incompatible


class _TracingChecker(ReaderWriterCompatibilityChecker):
    """The library's checker, unchanged in its verdicts, recording the tree of comparisons it makes."""

    def __init__(self) -> None:
        super().__init__()
        self.root: _Comparison | None = None
        self._in_progress: list[_Comparison] = []

    def get_compatibility(
        self,
        reader: avro.schema.Schema,
        writer: avro.schema.Schema,
        reference_token: str = ReaderWriterCompatibilityChecker.ROOT_REFERENCE_TOKEN,
        location: list[str] | None = None,
    ) -> SchemaCompatibilityResult:
        parent = self._in_progress[-1] if self._in_progress else None
        comparison = _Comparison(
            path=_child_path(parent, reference_token, location),
            reader=reader,
            writer=writer,
            memoized=ReaderWriter(reader, writer) in self.memoize_map,
        )
        if parent is None:
            self.root = comparison
        else:
            parent.children.append(comparison)
        self._in_progress.append(comparison)
        try:
            comparison.result = super().get_compatibility(reader, writer, reference_token, location)
        finally:
            self._in_progress.pop()
        return comparison.result


def _child_path(parent: _Comparison | None, reference_token: str, location: list[str] | None) -> str:
    """Dotted field path of a comparison the checker starts from inside ``parent``.

    The library calls with token "type" (and location ending in the field's index) for a record field, "items"
    and "values" for arrays and maps, and the root token for union branches, which stay at the parent's path.
    """
    if parent is None:
        return ""
    if reference_token == "type" and location and isinstance(parent.reader, avro.schema.RecordSchema):
        field_name = parent.reader.fields[int(location[-1])].name
        return f"{parent.path}.{field_name}" if parent.path else field_name
    if reference_token == "items":
        return f"{parent.path}[]"
    if reference_token == "values":
        return f"{parent.path}{{}}"
    return parent.path


def _type_name(schema: avro.schema.Schema) -> str:
    return schema.fullname if isinstance(schema, avro.schema.NamedSchema) else str(schema.type)


class _Explainer:
    """Turns a traced comparison tree into one message per problem, worded for the roles the schemas play."""

    def __init__(self, reader_label: str, writer_label: str) -> None:
        self.reader_label = reader_label
        self.writer_label = writer_label

    def explain(self, comparison: _Comparison) -> list[str]:
        assert comparison.result is not None
        # The children whose problems made it into this result; a union tries branches whose failures do not count.
        contributing = [
            child
            for child in comparison.children
            if child.incompatible and child.result.messages <= comparison.result.messages
        ]
        own_kinds = Counter(comparison.result.incompatibilities)
        own_messages = set(comparison.result.messages)
        for child in contributing:
            own_kinds -= Counter(child.result.incompatibilities)
            own_messages -= child.result.messages
        messages = [text for kind in own_kinds for text in self._describe(comparison, kind, own_messages)]
        for child in contributing:
            if not child.memoized:  # a repeated pair was already explained where it was first compared
                messages.extend(self.explain(child))
        return messages

    def _describe(
        self, comparison: _Comparison, kind: SchemaIncompatibilityType, own_messages: set[str]
    ) -> list[str]:
        reader, writer = comparison.reader, comparison.writer
        where = f"field '{comparison.path}'" if comparison.path else "the top-level schema"
        new, old = self.reader_label, self.writer_label
        if kind is SchemaIncompatibilityType.reader_field_missing_default_value:
            # The library's message for this problem is the field's name.
            field_names = {reader_field.name for reader_field in getattr(reader, "fields", [])}
            missing = sorted(own_messages & field_names) or ["<unknown>"]
            prefix = f"{comparison.path}." if comparison.path else ""
            return [
                f"field '{prefix}{name}' is in the {new} without a default value and is missing from the {old}, "
                f"so records written with the {old} cannot be read"
                for name in missing
            ]
        if kind is SchemaIncompatibilityType.name_mismatch:
            return [
                f"{where}: {reader.type} '{reader.fullname}' in the {new} does not match '{writer.fullname}' in the "
                f"{old}; a renamed type needs the old full name in its aliases"
            ]
        if kind is SchemaIncompatibilityType.fixed_size_mismatch:
            return [
                f"{where}: fixed '{reader.fullname}' has size {reader.size} in the {new} but {writer.size} "
                f"in the {old}"
            ]
        if kind is SchemaIncompatibilityType.missing_enum_symbols:
            lacking = sorted(set(writer.symbols) - set(reader.symbols))
            return [
                f"{where}: enum '{reader.fullname}' in the {new} lacks symbol(s) {', '.join(lacking)} that the "
                f"{old} can write, and has no default symbol"
            ]
        if kind is SchemaIncompatibilityType.type_mismatch:
            return [
                f"{where}: type '{_type_name(reader)}' in the {new} cannot read '{_type_name(writer)}' from the {old}"
            ]
        if kind is SchemaIncompatibilityType.missing_union_branch:
            if isinstance(writer, avro.schema.UnionSchema):
                unreadable = [
                    _type_name(child.writer)
                    for child in comparison.children
                    if child.incompatible and child.writer in writer.schemas
                ]
            else:
                unreadable = [_type_name(writer)]
            return [
                f"{where}: the union in the {new} has no branch that can read "
                f"{', '.join(repr(name) for name in dict.fromkeys(unreadable))} from the {old}"
            ]
        return [f"{where}: {kind.value.replace('_', ' ')} between the {new} and the {old}"]
