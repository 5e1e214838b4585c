"""The gateway's index of every job, and the finished jobs' states, out of the process's memory.

A gateway that kept every job it ever saw in memory grew by ~15 KB per job for as long as it ran, and a listing
sorted all of a tenant's jobs on the event loop. Here (SQLite, the standard library's: no server, a file per
gateway process that it deletes when it stops — the tracker's changelog is the durable copy, read again at start):

* every job with a known tenant has a row ``(tenant, sort_at, job_id)`` with an index in listing order, so a page of
  a listing is one range read of ``limit`` rows, however many jobs the tenant has;
* a finished job's state (the tracker has folded all of it and nobody follows it) is stored in its row and leaves
  memory (``gateway.jobs.JobsView`` evicts it); asking for it reads it back.

All calls come from the event loop's thread; each takes microseconds (no fsync: it is a cache).
"""
from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from pathlib import Path

from consumers.job_state import JobState, to_public

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    sort_at INTEGER NOT NULL,
    first_request TEXT,
    state TEXT,
    public TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, sort_at DESC, job_id DESC);
"""


class JobIndex:
    """``directory``: where the file goes (None: in memory, for tests and views without settings)."""

    def __init__(self, directory: Path | str | None = None):
        if directory is None:
            self.path = None
            self.db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        else:
            Path(directory).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"gateway-jobs-{os.getpid()}-", suffix=".sqlite", dir=directory)
            os.close(fd)
            self.path = Path(name)
            self.db = sqlite3.connect(name, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=OFF")
            self.db.execute("PRAGMA synchronous=OFF")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def place(self, job_id: str, tenant: str, sort_at: int) -> None:
        """The job's place in its tenant's listing (new, or moved)."""
        self.db.execute("INSERT INTO jobs (job_id, tenant, sort_at) VALUES (?, ?, ?) ON CONFLICT (job_id) "
                        "DO UPDATE SET tenant = excluded.tenant, sort_at = excluded.sort_at", (job_id, tenant, sort_at))

    def shelve(self, job_id: str, state: JobState, first_request: str | None) -> None:
        """A finished job's state, kept here instead of in memory, with its public form (what GET and listings
        show, read back without folding anything)."""
        self.db.execute("UPDATE jobs SET state = ?, public = ?, first_request = ? WHERE job_id = ?",
                        (_json(state.to_dict()), _json(to_public(state)), first_request, job_id))

    def take(self, job_id: str) -> tuple[JobState, str | None] | None:
        """A shelved job's state and first request's fingerprint, which leave the shelf (the job is back in memory);
        None if it is not shelved."""
        row = self.db.execute("SELECT state, first_request FROM jobs WHERE job_id = ? AND state IS NOT NULL",
                              (job_id,)).fetchone()
        if row is None:
            return None
        self.db.execute("UPDATE jobs SET state = NULL, public = NULL WHERE job_id = ?", (job_id,))
        return JobState.from_dict(json.loads(row[0]), owned=True), row[1]

    def peek(self, job_id: str) -> JobState | None:
        """A shelved job's state, left on the shelf."""
        row = self.db.execute("SELECT state FROM jobs WHERE job_id = ? AND state IS NOT NULL", (job_id,)).fetchone()
        return None if row is None else JobState.from_dict(json.loads(row[0]), owned=True)

    def public(self, job_id: str) -> dict | None:
        """A shelved job's public form (consumers.job_state.to_public)."""
        row = self.db.execute("SELECT public FROM jobs WHERE job_id = ? AND public IS NOT NULL", (job_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def remove(self, job_id: str) -> None:
        self.db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    def page(self, tenant: str, limit: int, after: str | None = None,
             newest_first: bool = True) -> list[tuple[str, str | None]]:
        """(job id, a shelved job's public form as JSON, else None) of the tenant's jobs in listing order (newest
        first, or oldest first), after the job ``after`` (which must be the tenant's: else an empty page)."""
        order, beyond = ("DESC", "<") if newest_first else ("ASC", ">")
        if after is None:
            return self.db.execute(f"SELECT job_id, public FROM jobs WHERE tenant = ? ORDER BY sort_at {order}, "
                                   f"job_id {order} LIMIT ?", (tenant, limit)).fetchall()
        cursor = self.db.execute("SELECT sort_at FROM jobs WHERE job_id = ? AND tenant = ?",
                                 (after, tenant)).fetchone()
        if cursor is None:
            return []
        return self.db.execute(f"SELECT job_id, public FROM jobs WHERE tenant = ? AND (sort_at, job_id) {beyond} "
                               f"(?, ?) ORDER BY sort_at {order}, job_id {order} LIMIT ?",
                               (tenant, cursor[0], after, limit)).fetchall()

    def count(self, shelved: bool | None = None) -> int:
        where = "" if shelved is None else (" WHERE state IS NOT NULL" if shelved else " WHERE state IS NULL")
        return self.db.execute("SELECT count(*) FROM jobs" + where).fetchone()[0]


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"))
