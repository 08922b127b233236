"""The forget ledger: a SQLite database (WAL mode) of deletion requests, idempotent by request id.

A request is durable once ``add`` returns: it is committed before anyone is told it was accepted.
Rows hold request ids and sample indices only, never sample contents.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Self

from edge_qmul.errors import LedgerError

SCHEMA_VERSION = 1
KINDS = ("samples", "class", "count", "fraction", "client")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    request_id  TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    spec        TEXT NOT NULL,      -- the selection as filed (JSON)
    sample_ids  TEXT NOT NULL,      -- resolved training-sample indices (JSON list, sorted)
    source      TEXT NOT NULL,      -- 'cli', 'api', or a device id
    created_at  TEXT NOT NULL,
    honoured_by TEXT                -- model version that first honours it; NULL while pending
);
"""


@dataclass(frozen=True)
class Request:
    request_id: str
    kind: str
    spec: dict[str, object]
    sample_ids: list[int]
    source: str
    created_at: str
    honoured_by: str | None


class SqliteStore:
    """A SQLite file in WAL mode with synchronous commits; subclasses declare their tables.

    WAL lets readers proceed while a writer commits; ``synchronous=FULL`` makes a commit durable
    before it returns, which is what "written before acknowledged" relies on.
    """

    schema: ClassVar[str] = ""
    what: ClassVar[str] = "database"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(self.schema)
            self._initialise()
        except sqlite3.DatabaseError as err:
            raise LedgerError(
                f"cannot open the {self.what} {self.path}: {err}",
                "check the file is an edge-qmul ledger (SQLite) and the directory is writable",
            ) from err

    def _initialise(self) -> None:
        """Hook for rows a new file needs (runs inside the open's error handling)."""

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; any exception in the block (a refusal included) rolls it back. Inside ``batch`` it
        is a savepoint of the batch's transaction: rolled back alone, committed with the batch."""
        nested = self._conn.in_transaction
        try:
            self._conn.execute("SAVEPOINT one" if nested else "BEGIN IMMEDIATE")
            yield self._conn
            self._conn.execute("RELEASE one" if nested else "COMMIT")
        except BaseException as err:
            if nested and self._conn.in_transaction:
                self._conn.execute("ROLLBACK TO one")
                self._conn.execute("RELEASE one")
            elif self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            if isinstance(err, sqlite3.DatabaseError):
                raise LedgerError(f"{self.what} {self.path}: {err}", "retry; if it persists, restore the file") from err
            raise

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Many writes committed together at the end of the block, with one durable commit instead of one each
        (a fleet's batch of requests). Each write inside is its own savepoint: one that is refused or fails rolls
        back alone and the others stay; an exception out of the block rolls back the whole batch."""
        with self._tx():
            yield


class Ledger(SqliteStore):
    schema = _SCHEMA
    what = "forget ledger"

    def _initialise(self) -> None:
        self._conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )

    def add(
        self, request_id: str, kind: str, spec: Mapping[str, object], sample_ids: Sequence[int], source: str = "cli"
    ) -> bool:
        """Record a request; returns False if this request id is already recorded with the same content."""
        if kind not in KINDS:
            raise LedgerError(f"unknown request kind {kind!r}", f"use one of {KINDS}")
        ids = sorted({int(i) for i in sample_ids})
        with self._tx() as conn:
            row = conn.execute(
                "SELECT sample_ids FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            if row is not None:
                if json.loads(row[0]) != ids:
                    raise LedgerError(
                        f"request id {request_id!r} is already recorded with different samples",
                        "use a new request id for a new request",
                    )
                return False
            conn.execute(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (
                    request_id,
                    kind,
                    json.dumps(spec, sort_keys=True),
                    json.dumps(ids),
                    source,
                    datetime.now(UTC).isoformat(timespec="seconds"),
                ),
            )
        return True

    def requests(self) -> list[Request]:
        rows = self._conn.execute(
            "SELECT request_id, kind, spec, sample_ids, source, created_at, honoured_by "
            "FROM requests ORDER BY created_at, request_id"
        ).fetchall()
        return [Request(r[0], r[1], json.loads(r[2]), json.loads(r[3]), r[4], r[5], r[6]) for r in rows]

    def forget_ids(self) -> list[int]:
        """The union of every recorded request's samples (honoured ones stay forgotten)."""
        return sorted({i for r in self.requests() for i in r.sample_ids})

    def mark_honoured(self, request_ids: Sequence[str], model_version: str) -> None:
        with self._tx() as conn:
            conn.executemany(
                "UPDATE requests SET honoured_by = ? WHERE request_id = ? AND honoured_by IS NULL",
                [(model_version, rid) for rid in request_ids],
            )
