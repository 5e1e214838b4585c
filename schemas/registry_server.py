"""A small Confluent-compatible schema registry for the embedded platform (Avro only).

It implements the REST subset that confluent-kafka's ``SchemaRegistryClient``, ``AvroSerializer`` and
``AvroDeserializer`` use: registering and looking up schemas under subjects, fetching schemas by id or guid,
listing subjects and versions, compatibility configuration and compatibility tests. Errors use Confluent's JSON
shape and codes, so the client raises ``SchemaRegistryError`` with the same ``http_status_code``/``error_code``
a real registry would give.

Schema ids are global and deduplicated: schemas that differ only in formatting (see
``schemas.compat.canonical_form``) get one id across all subjects. All state lives in one JSON file, rewritten
atomically on every change, so ids survive restarts. Subjects, versions and schemas are never deleted: the
DELETE endpoints answer 405, because an id that once framed a Kafka message must keep resolving.

Run it in-process with ``SchemaRegistryServer(path).start()`` (a background thread), in a foreground process
with ``python -m schemas.registry_server --state var/registry/schemas.json --port 8081``, or embed ``make_app(store)``
in another aiohttp application.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import avro.schema
from aiohttp import web

from schemas.compat import (
    CompatibilityLevel,
    CompatibilityReport,
    InvalidSchemaError,
    canonical_form,
    check_compatibility,
    parse_schema,
)

log = logging.getLogger(__name__)

__all__ = [
    "BadRequestError",
    "DEFAULT_COMPATIBILITY",
    "IncompatibleSchemaError",
    "InvalidCompatibilityLevelError",
    "InvalidVersionError",
    "RegistryError",
    "RegistryStateError",
    "SchemaNotFoundError",
    "SchemaRegistryServer",
    "SchemaStore",
    "StoredSchema",
    "SubjectConfigNotFoundError",
    "SubjectNotFoundError",
    "SubjectVersion",
    "UnprocessableSchemaError",
    "UnsupportedOperationError",
    "VersionNotFoundError",
    "main",
    "make_app",
]

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
AVRO = "AVRO"
DEFAULT_COMPATIBILITY = CompatibilityLevel.BACKWARD
STATE_FORMAT = 1
LATEST = "latest"


class RegistryError(Exception):
    """A request the registry refuses; ``http_status`` and ``error_code`` are Confluent's for the case."""

    http_status = 500
    error_code = 50001

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(RegistryError):
    http_status, error_code = 400, 400


class SubjectNotFoundError(RegistryError):
    http_status, error_code = 404, 40401


class VersionNotFoundError(RegistryError):
    http_status, error_code = 404, 40402


class SchemaNotFoundError(RegistryError):
    http_status, error_code = 404, 40403


class SubjectConfigNotFoundError(RegistryError):
    http_status, error_code = 404, 40408


class UnsupportedOperationError(RegistryError):
    http_status, error_code = 405, 405


class IncompatibleSchemaError(RegistryError):
    http_status, error_code = 409, 409

    def __init__(self, message: str, report: CompatibilityReport) -> None:
        super().__init__(message)
        self.report = report


class UnprocessableSchemaError(RegistryError):
    """Invalid Avro, a schema type other than AVRO, or features this registry does not implement."""

    http_status, error_code = 422, 42201


class InvalidVersionError(RegistryError):
    http_status, error_code = 422, 42202


class InvalidCompatibilityLevelError(RegistryError):
    http_status, error_code = 422, 42203


class RegistryStateError(RuntimeError):
    """The state file exists but cannot be read; refusing to start rather than hand out ids again."""


@dataclass(frozen=True)
class StoredSchema:
    """A schema with its global id; ``schema`` is the text as first registered."""

    id: int
    schema: str
    guid: str
    schema_type: str = AVRO

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "schemaType": self.schema_type, "schema": self.schema, "guid": self.guid}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> StoredSchema:
        return cls(id=int(value["id"]), schema=value["schema"], guid=value["guid"], schema_type=value["schemaType"])


@dataclass(frozen=True)
class SubjectVersion:
    """One version of a subject and the schema it points to."""

    subject: str
    version: int
    schema: StoredSchema

    def to_response(self) -> dict[str, Any]:
        # Confluent leaves schemaType out for Avro; the client defaults to it.
        return {
            "subject": self.subject,
            "version": self.version,
            "id": self.schema.id,
            "guid": self.schema.guid,
            "schema": self.schema.schema,
        }


@dataclass
class _State:
    """Everything persisted. Changes are made on a copy that replaces the original once it is on disk."""

    next_id: int = 1
    schemas: dict[int, StoredSchema] = field(default_factory=dict)
    subjects: dict[str, list[int]] = field(default_factory=dict)  # version n is the schema id at index n - 1
    global_level: CompatibilityLevel = DEFAULT_COMPATIBILITY
    subject_levels: dict[str, CompatibilityLevel] = field(default_factory=dict)

    def copy(self) -> _State:
        return _State(
            next_id=self.next_id,
            schemas=dict(self.schemas),
            subjects={subject: list(ids) for subject, ids in self.subjects.items()},
            global_level=self.global_level,
            subject_levels=dict(self.subject_levels),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "next_id": self.next_id,
            "schemas": [stored.to_json() for _, stored in sorted(self.schemas.items())],
            "subjects": self.subjects,
            "compatibility": {
                "global": self.global_level.value,
                "subjects": {subject: level.value for subject, level in self.subject_levels.items()},
            },
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> _State:
        if value.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown state format {value.get('format')!r}, expected {STATE_FORMAT}")
        schemas = {stored.id: stored for stored in map(StoredSchema.from_json, value["schemas"])}
        compatibility = value["compatibility"]
        return cls(
            next_id=max(int(value["next_id"]), max(schemas, default=0) + 1),
            schemas=schemas,
            subjects={subject: [int(schema_id) for schema_id in ids] for subject, ids in value["subjects"].items()},
            global_level=CompatibilityLevel.parse(compatibility["global"]),
            subject_levels={
                subject: CompatibilityLevel.parse(level) for subject, level in compatibility["subjects"].items()
            },
        )


@dataclass(frozen=True)
class _Candidate:
    """A schema from a request, validated, with the key that identifies it regardless of formatting."""

    text: str
    parsed: avro.schema.Schema
    canonical: str


class SchemaStore:
    """The registry's state and rules, usable without HTTP; safe to call from several threads.

    Every change is written to ``state_path`` (temp file, fsync, rename) before it becomes visible; if the
    write fails, nothing changes.
    """

    def __init__(self, state_path: Path | str) -> None:
        self.state_path = Path(state_path)
        self._lock = threading.RLock()
        self._state = self._load()
        self._ids_by_canonical: dict[str, int] = {}
        self._parsed: dict[int, avro.schema.Schema] = {}
        for schema_id, stored in sorted(self._state.schemas.items()):
            try:
                candidate = self._candidate(stored.schema, stored.schema_type)
            except UnprocessableSchemaError as exc:
                raise RegistryStateError(f"schema {schema_id} in {self.state_path} is unusable: {exc}") from exc
            self._ids_by_canonical.setdefault(candidate.canonical, schema_id)
            self._parsed[schema_id] = candidate.parsed

    # --- queries ---------------------------------------------------------------------------------------------

    def get_by_id(self, schema_id: int) -> StoredSchema:
        with self._lock:
            try:
                return self._state.schemas[schema_id]
            except KeyError:
                raise SchemaNotFoundError(f"Schema {schema_id} not found") from None

    def get_by_guid(self, guid: str) -> StoredSchema:
        with self._lock:
            for stored in self._state.schemas.values():
                if stored.guid == guid:
                    return stored
        raise SchemaNotFoundError(f"Schema with guid {guid} not found")

    def subjects(self) -> list[str]:
        with self._lock:
            return sorted(self._state.subjects)

    def versions(self, subject: str) -> list[int]:
        with self._lock:
            return list(range(1, len(self._schema_ids_of(subject)) + 1))

    def get_version(self, subject: str, version: int | str) -> SubjectVersion:
        """``version`` is a number, ``"latest"`` or -1 (Confluent's alias for latest)."""
        number = _parse_version(version)
        with self._lock:
            schema_ids = self._schema_ids_of(subject)
            if number == -1:
                number = len(schema_ids)
            if not 1 <= number <= len(schema_ids):
                raise VersionNotFoundError(f"Version {version} not found for subject '{subject}'")
            return SubjectVersion(subject, number, self._state.schemas[schema_ids[number - 1]])

    def versions_of_schema(self, schema_id: int) -> list[SubjectVersion]:
        """Every subject version that uses the schema, by subject then version."""
        with self._lock:
            stored = self.get_by_id(schema_id)
            return [
                SubjectVersion(subject, index + 1, stored)
                for subject, schema_ids in sorted(self._state.subjects.items())
                for index, candidate_id in enumerate(schema_ids)
                if candidate_id == schema_id
            ]

    def subjects_of_schema(self, schema_id: int) -> list[str]:
        return list(dict.fromkeys(version.subject for version in self.versions_of_schema(schema_id)))

    def lookup(self, subject: str, schema: str | dict | list, schema_type: str | None = AVRO) -> SubjectVersion:
        """The version of ``subject`` holding ``schema`` (compared by canonical form)."""
        candidate = self._candidate(schema, schema_type)
        with self._lock:
            schema_ids = self._schema_ids_of(subject)
            schema_id = self._ids_by_canonical.get(candidate.canonical)
            if schema_id not in schema_ids:
                raise SchemaNotFoundError(f"Schema not found under subject '{subject}'")
            return self._version_with(subject, schema_id)

    def compatibility_level(self, subject: str | None = None) -> CompatibilityLevel:
        """The level that applies to ``subject``: its own if set, else the global one."""
        with self._lock:
            if subject is not None and subject in self._state.subject_levels:
                return self._state.subject_levels[subject]
            return self._state.global_level

    def subject_compatibility_level(self, subject: str) -> CompatibilityLevel:
        """The level set on ``subject`` itself; SubjectConfigNotFoundError if it has none."""
        with self._lock:
            try:
                return self._state.subject_levels[subject]
            except KeyError:
                raise SubjectConfigNotFoundError(
                    f"Subject '{subject}' does not have subject-level compatibility configured"
                ) from None

    def test_compatibility(
        self,
        subject: str,
        schema: str | dict | list,
        version: int | str | None = None,
        schema_type: str | None = AVRO,
    ) -> CompatibilityReport:
        """Would ``schema`` be compatible under the subject's level? Against one version, or (``version`` None)
        against those registration would check: the latest, or all for transitive levels."""
        candidate = self._candidate(schema, schema_type)
        with self._lock:
            level = self.compatibility_level(subject)
            if version is None:
                existing = self._versions_to_check(subject)
            else:
                chosen = self.get_version(subject, version)
                existing = {chosen.version: self._parsed[chosen.schema.id]}
        return check_compatibility(candidate.parsed, existing, level)

    # --- changes ---------------------------------------------------------------------------------------------

    def register(
        self,
        subject: str,
        schema: str | dict | list,
        schema_type: str | None = AVRO,
        normalize: bool = False,
    ) -> SubjectVersion:
        """Add ``schema`` as the next version of ``subject`` unless it is already one (then that version).

        Raises IncompatibleSchemaError, storing nothing, if the subject's compatibility level rejects it. With
        ``normalize`` a schema new to the registry is stored in canonical form instead of as given.
        """
        candidate = self._candidate(schema, schema_type)
        with self._lock:
            schema_ids = self._state.subjects.get(subject, [])
            existing_id = self._ids_by_canonical.get(candidate.canonical)
            if existing_id in schema_ids:
                return self._version_with(subject, existing_id)
            level = self.compatibility_level(subject)
            report = check_compatibility(candidate.parsed, self._versions_to_check(subject), level)
            if not report.compatible:
                raise IncompatibleSchemaError(
                    f"Schema being registered is incompatible with an earlier schema for subject '{subject}' "
                    f"(compatibility {level.value}): {'; '.join(report.messages)}",
                    report,
                )
            state = self._state.copy()
            if existing_id is None:
                stored = StoredSchema(
                    id=state.next_id,
                    schema=candidate.canonical if normalize else candidate.text,
                    guid=str(uuid.uuid4()),
                )
                state.schemas[stored.id] = stored
                state.next_id += 1
            else:
                stored = state.schemas[existing_id]
            state.subjects.setdefault(subject, []).append(stored.id)
            self._commit(state)
            self._ids_by_canonical.setdefault(candidate.canonical, stored.id)
            self._parsed.setdefault(stored.id, candidate.parsed)
            registered = SubjectVersion(subject, len(state.subjects[subject]), stored)
        log.info("registered schema id %d as %s version %d", stored.id, subject, registered.version)
        return registered

    def set_compatibility_level(
        self, level: CompatibilityLevel | str, subject: str | None = None
    ) -> CompatibilityLevel:
        """Set the global level, or the level of one subject (which need not exist yet)."""
        try:
            parsed_level = CompatibilityLevel.parse(level)
        except ValueError as exc:
            raise InvalidCompatibilityLevelError(str(exc)) from None
        with self._lock:
            state = self._state.copy()
            if subject is None:
                state.global_level = parsed_level
            else:
                state.subject_levels[subject] = parsed_level
            self._commit(state)
        return parsed_level

    def delete_compatibility_level(self, subject: str | None = None) -> CompatibilityLevel:
        """Drop a subject's own level (it then follows the global one), or reset the global level to the
        default. Returns the level that was removed."""
        with self._lock:
            state = self._state.copy()
            if subject is None:
                removed, state.global_level = state.global_level, DEFAULT_COMPATIBILITY
            else:
                removed = self.subject_compatibility_level(subject)
                del state.subject_levels[subject]
            self._commit(state)
        return removed

    # --- internals -------------------------------------------------------------------------------------------

    def _schema_ids_of(self, subject: str) -> list[int]:
        try:
            return self._state.subjects[subject]
        except KeyError:
            raise SubjectNotFoundError(f"Subject '{subject}' not found.") from None

    def _version_with(self, subject: str, schema_id: int) -> SubjectVersion:
        # register() never adds a schema a subject already has, so there is exactly one such version.
        version = self._state.subjects[subject].index(schema_id) + 1
        return SubjectVersion(subject, version, self._state.schemas[schema_id])

    def _versions_to_check(self, subject: str) -> dict[int, avro.schema.Schema]:
        schema_ids = self._state.subjects.get(subject, [])
        return {version: self._parsed[schema_id] for version, schema_id in enumerate(schema_ids, start=1)}

    @staticmethod
    def _candidate(schema: str | dict | list, schema_type: str | None) -> _Candidate:
        if (schema_type or AVRO).upper() != AVRO:
            raise UnprocessableSchemaError(
                f"Invalid schema: schema type {schema_type} is not supported; this registry only stores AVRO schemas"
            )
        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            parsed = parse_schema(text)
        except InvalidSchemaError as exc:
            raise UnprocessableSchemaError(f"Invalid schema: {exc}") from None
        return _Candidate(text=text, parsed=parsed, canonical=canonical_form(parsed))

    def _load(self) -> _State:
        try:
            raw = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _State()
        try:
            return _State.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryStateError(f"cannot read schema registry state {self.state_path}: {exc}") from exc

    def _commit(self, state: _State) -> None:
        _write_atomically(self.state_path, json.dumps(state.to_json(), indent=1, sort_keys=True))
        self._state = state


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves either the old or the new file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as temp_file:
            temp_file.write(text)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    # The rename itself is only durable once the directory entry is.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _parse_version(version: int | str) -> int:
    """A version number from a path segment: 1.., or -1 for ``latest``."""
    if isinstance(version, str) and version.lower() == LATEST:
        return -1
    try:
        number = int(version)
    except (TypeError, ValueError):
        number = 0
    if number == -1 or 1 <= number <= 2**31 - 1:
        return number
    raise InvalidVersionError(
        f"The specified version '{version}' is not a valid version id. "
        "Allowed values are between [1, 2^31-1] and the string \"latest\""
    )


# --- HTTP ------------------------------------------------------------------------------------------------------

STORE_KEY = web.AppKey("schema_store", SchemaStore)


def make_app(store: SchemaStore) -> web.Application:
    """The registry's aiohttp application over ``store``."""
    app = web.Application(middlewares=[_errors_as_confluent_json])
    app[STORE_KEY] = store
    app.add_routes(
        [
            web.get("/", _root),
            web.get("/schemas/types", _schema_types),
            web.get("/schemas/ids/{id}", _schema_by_id),
            web.get("/schemas/ids/{id}/schema", _raw_schema_by_id),
            web.get("/schemas/ids/{id}/subjects", _subjects_of_schema),
            web.get("/schemas/ids/{id}/versions", _versions_of_schema),
            web.get("/schemas/guids/{guid}", _schema_by_guid),
            web.get("/subjects", _subjects),
            web.post("/subjects/{subject}", _lookup),
            web.delete("/subjects/{subject}", _refuse_delete),
            web.get("/subjects/{subject}/versions", _versions),
            web.post("/subjects/{subject}/versions", _register),
            web.get("/subjects/{subject}/versions/{version}", _version),
            web.delete("/subjects/{subject}/versions/{version}", _refuse_delete),
            web.get("/subjects/{subject}/versions/{version}/schema", _raw_version),
            web.get("/subjects/{subject}/versions/{version}/referencedby", _referenced_by),
            web.get("/config", _get_config),
            web.put("/config", _put_config),
            web.delete("/config", _delete_config),
            web.get("/config/{subject}", _get_config),
            web.put("/config/{subject}", _put_config),
            web.delete("/config/{subject}", _delete_config),
            web.get("/associations/resources/{namespace}/{name}", _associations),
            web.get("/mode", _mode),
            web.get("/mode/{subject}", _mode),
            web.post("/compatibility/subjects/{subject}/versions", _test_compatibility),
            web.post("/compatibility/subjects/{subject}/versions/{version}", _test_compatibility),
        ]
    )
    return app


def _reply(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type=CONTENT_TYPE)


@web.middleware
async def _errors_as_confluent_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error in Confluent's shape, ``{"error_code": N, "message": "..."}``."""
    try:
        return await handler(request)
    except RegistryError as exc:
        return _reply({"error_code": exc.error_code, "message": exc.message}, status=exc.http_status)
    except web.HTTPException as exc:  # no such route or method
        message = f"{exc.reason}: {request.method} {request.path}"
        return _reply({"error_code": exc.status, "message": message}, status=exc.status)
    except Exception as exc:
        log.exception("schema registry failed on %s %s", request.method, request.path)
        return _reply({"error_code": 50001, "message": f"Error in the schema registry: {exc}"}, status=500)


def _store(request: web.Request) -> SchemaStore:
    return request.app[STORE_KEY]


def _flag(request: web.Request, name: str) -> bool:
    """A boolean query parameter. The client sends both ``true`` (httpx) and ``True`` (str.format of a bool)."""
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false"):
        raise BadRequestError(f"query parameter {name} must be true or false, not {request.query[name]!r}")
    return value == "true"


def _page(items: Sequence[Any], request: web.Request) -> list[Any]:
    """Apply the ``offset`` and ``limit`` query parameters (a negative limit means no limit)."""
    try:
        offset = int(request.query.get("offset", 0))
        limit = int(request.query.get("limit", -1))
    except ValueError:
        raise BadRequestError("query parameters offset and limit must be integers") from None
    selected = list(items)[max(offset, 0):]
    return selected if limit < 0 else selected[:limit]


def _schema_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise SchemaNotFoundError(f"Schema {request.match_info['id']} not found: ids are integers") from None


async def _schema_request(request: web.Request) -> dict[str, Any]:
    """The JSON body of a register/lookup/compatibility request, with the parts this registry cannot honour
    refused. Content-Type is not checked: Confluent's and plain application/json both arrive here."""
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
    except ValueError as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequestError('request body must be a JSON object like {"schema": "..."}')
    if not isinstance(body.get("schema"), str) or not body["schema"].strip():
        raise UnprocessableSchemaError('Invalid schema: "schema" must be a non-empty string holding the schema JSON')
    if body.get("references"):
        raise UnprocessableSchemaError(
            "Invalid schema: schema references are not supported; inline named types where first used"
        )
    if body.get("metadata") or body.get("ruleSet"):
        raise UnprocessableSchemaError("Invalid schema: metadata and ruleSet (data contracts) are not supported")
    return body


async def _root(request: web.Request) -> web.Response:
    return _reply({})


async def _schema_types(request: web.Request) -> web.Response:
    return _reply([AVRO])


async def _schema_by_id(request: web.Request) -> web.Response:
    # The client also sends subject, format and reference_format; with Avro only and no references, none of
    # them changes the answer (Confluent uses subject to pick a schema context, which this registry lacks).
    stored = _store(request).get_by_id(_schema_id(request))
    return _reply({"schema": stored.schema, "guid": stored.guid})


async def _raw_schema_by_id(request: web.Request) -> web.Response:
    return _reply(json.loads(_store(request).get_by_id(_schema_id(request)).schema))


async def _schema_by_guid(request: web.Request) -> web.Response:
    stored = _store(request).get_by_guid(request.match_info["guid"])
    return _reply({"id": stored.id, "schema": stored.schema, "guid": stored.guid})


def _filtered_versions_of_schema(request: web.Request) -> list[SubjectVersion]:
    versions = _store(request).versions_of_schema(_schema_id(request))
    subject = request.query.get("subject")
    return [version for version in versions if subject is None or version.subject == subject]


async def _subjects_of_schema(request: web.Request) -> web.Response:
    subjects = dict.fromkeys(version.subject for version in _filtered_versions_of_schema(request))
    return _reply(_page(list(subjects), request))


async def _versions_of_schema(request: web.Request) -> web.Response:
    versions = _filtered_versions_of_schema(request)
    return _reply(_page([{"subject": v.subject, "version": v.version} for v in versions], request))


async def _subjects(request: web.Request) -> web.Response:
    prefix = request.query.get("subjectPrefix", "")
    # Nothing is ever deleted, so deleted=true changes nothing and deleted_only=true finds nothing.
    subjects = [] if _flag(request, "deleted_only") else _store(request).subjects()
    return _reply(_page([subject for subject in subjects if subject.startswith(prefix)], request))


async def _versions(request: web.Request) -> web.Response:
    versions = _store(request).versions(request.match_info["subject"])
    return _reply(_page([] if _flag(request, "deleted_only") else versions, request))


async def _version(request: web.Request) -> web.Response:
    found = _store(request).get_version(request.match_info["subject"], request.match_info["version"])
    return _reply(found.to_response())


async def _raw_version(request: web.Request) -> web.Response:
    found = _store(request).get_version(request.match_info["subject"], request.match_info["version"])
    return _reply(json.loads(found.schema.schema))


async def _referenced_by(request: web.Request) -> web.Response:
    _store(request).get_version(request.match_info["subject"], request.match_info["version"])
    return _reply([])  # references are not supported, so nothing refers to anything


async def _register(request: web.Request) -> web.Response:
    body = await _schema_request(request)
    registered = await asyncio.to_thread(
        _store(request).register,
        request.match_info["subject"],
        body["schema"],
        body.get("schemaType"),
        _flag(request, "normalize"),
    )
    # No "schema" in the answer: the client then caches the schema object it sent under this id.
    return _reply(
        {
            "id": registered.schema.id,
            "subject": registered.subject,
            "version": registered.version,
            "guid": registered.schema.guid,
        }
    )


async def _lookup(request: web.Request) -> web.Response:
    # normalize needs no handling (lookups always compare canonical forms); deleted finds nothing more.
    body = await _schema_request(request)
    found = await asyncio.to_thread(
        _store(request).lookup, request.match_info["subject"], body["schema"], body.get("schemaType")
    )
    return _reply(found.to_response())


async def _refuse_delete(request: web.Request) -> web.Response:
    raise UnsupportedOperationError(
        "Deleting subjects or versions is not supported by this registry: schema ids must keep resolving for "
        "messages already written"
    )


async def _get_config(request: web.Request) -> web.Response:
    store, subject = _store(request), request.match_info.get("subject")
    if subject is None or _flag(request, "defaultToGlobal"):
        level = store.compatibility_level(subject)
    else:
        level = store.subject_compatibility_level(subject)
    return _reply({"compatibilityLevel": level.value})


async def _put_config(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
    except ValueError as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequestError('request body must be a JSON object like {"compatibility": "BACKWARD"}')
    # set_compatibility sends "compatibility"; set_config may send "compatibilityLevel" instead.
    level = body.get("compatibility", body.get("compatibilityLevel"))
    unsupported = sorted(set(body) - {"compatibility", "compatibilityLevel"})
    if level is None or unsupported:
        raise InvalidCompatibilityLevelError(
            f"only the compatibility level can be configured here, got {sorted(body)}"
        )
    level = await asyncio.to_thread(_store(request).set_compatibility_level, level, request.match_info.get("subject"))
    return _reply({"compatibility": level.value})


async def _delete_config(request: web.Request) -> web.Response:
    removed = await asyncio.to_thread(_store(request).delete_compatibility_level, request.match_info.get("subject"))
    return _reply({"compatibilityLevel": removed.value})


async def _associations(request: web.Request) -> web.Response:
    # confluent-kafka 2.16's default subject name strategy asks this for every topic it serializes; no
    # associations (like a 404) makes it fall back to TopicNameStrategy, <topic>-value.
    return _reply([])


async def _mode(request: web.Request) -> web.Response:
    return _reply({"mode": "READWRITE"})


async def _test_compatibility(request: web.Request) -> web.Response:
    # Messages are returned whether or not verbose=true was asked for: they cost nothing and explain a False.
    body = await _schema_request(request)
    report = await asyncio.to_thread(
        _store(request).test_compatibility,
        request.match_info["subject"],
        body["schema"],
        request.match_info.get("version"),
        body.get("schemaType"),
    )
    return _reply({"is_compatible": report.compatible, "messages": report.messages})


# --- running it --------------------------------------------------------------------------------------------------


class SchemaRegistryServer:
    """The registry over one state file, served on ``host:port`` (port 0 picks a free one).

    ``start()``/``stop()`` run it on a background thread with its own event loop (for the embedded platform and
    tests); ``await serve_forever()`` runs it on the caller's loop until cancelled (for a foreground process).
    """

    def __init__(self, state_path: Path | str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = SchemaStore(state_path)
        self.host = host
        self.port = port
        self._url: str | None = None
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``; RuntimeError while not serving."""
        if self._url is None:
            raise RuntimeError("the schema registry is not serving; call start() first")
        return self._url

    def start(self, timeout_s: float = 10.0) -> str:
        """Serve on a background thread; returns the base URL once requests are accepted."""
        if self._thread is not None:
            raise RuntimeError(f"the schema registry is already serving on {self._url}")
        ready = threading.Event()
        startup_failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._bind())
            except BaseException as exc:
                startup_failure.append(exc)
                loop.close()
                ready.set()
                return
            self._loop = loop  # before ready: stop() right after start() needs it
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._unbind())
                loop.run_until_complete(loop.shutdown_default_executor())  # where asyncio.to_thread ran
                loop.close()

        self._thread = threading.Thread(target=run, name="schema-registry", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"the schema registry did not start within {timeout_s} s")
        if startup_failure:
            self._thread.join()
            self._thread = None
            failure = startup_failure[0]
            address = f"{self.host}:{self.port}"
            raise RuntimeError(f"the schema registry could not start on {address}: {failure}") from failure
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and wait for the background thread; no-op if not started."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"the schema registry thread did not stop within {timeout_s} s")
        self._thread = self._loop = None

    async def serve_forever(self) -> None:
        """Serve on the running event loop until cancelled."""
        await self._bind()
        try:
            await asyncio.Event().wait()
        finally:
            await self._unbind()

    def __enter__(self) -> SchemaRegistryServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _bind(self) -> None:
        runner = web.AppRunner(make_app(self.store), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port = runner.addresses[0][1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._url = f"http://{host}:{port}"
        log.info("schema registry serving %s from %s", self._url, self.store.state_path)

    async def _unbind(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self._url = None


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m schemas.registry_server --state FILE [--host H] [--port P]``: serve in the foreground."""
    parser = argparse.ArgumentParser(description="vidgen's embedded Confluent-compatible schema registry (Avro)")
    parser.add_argument("--state", required=True, type=Path, help="JSON file holding the registry's state")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(SchemaRegistryServer(args.state, args.host, args.port).serve_forever())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
