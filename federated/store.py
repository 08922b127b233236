"""Fleet state kept next to the forget ledger, in the same SQLite file (WAL): device keys, provenance,
seen nonces and an intake log.

The tables belong to this module; ``edge_qmul.ledger`` owns ``requests`` and ``meta``. Both open the same
file with their own connection, so the compliance record (ledger + who filed what + which key signed it)
is one file to copy and back up.

Key registration is trust on first use (TOFU): the first time a device contacts the server it presents
its Ed25519 public key together with a proof of possession, and the server records it; every later
request must verify against that recorded key. TOFU trusts whoever speaks first for a partition, so a
fleet that cannot rule out an impostor at first contact pre-registers keys instead (``pin``, fed from a key
file provisioned at manufacturing time). A pinned key always wins over a TOFU registration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from edge_qmul.errors import ConfigError
from edge_qmul.ledger import SqliteStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    partition_id INTEGER PRIMARY KEY,
    public_key   TEXT NOT NULL,     -- Ed25519 raw public key, hex
    registered   TEXT NOT NULL,     -- 'tofu' (first contact) or 'pinned' (key file)
    first_seen   TEXT NOT NULL,
    last_seen    TEXT,
    left_at      TEXT               -- set when the device files a whole-client deletion
);
CREATE TABLE IF NOT EXISTS provenance (
    sample_id    INTEGER PRIMARY KEY,   -- training-pool index (split.json 'train')
    partition_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS provenance_by_partition ON provenance (partition_id, sample_id);
CREATE TABLE IF NOT EXISTS nonces (
    partition_id INTEGER NOT NULL,
    nonce        TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    seen_at      REAL NOT NULL,         -- server clock, unix seconds
    PRIMARY KEY (partition_id, nonce)
);
CREATE TABLE IF NOT EXISTS intake_log (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    at             TEXT NOT NULL,
    partition_id   INTEGER,
    node_id        TEXT,                -- Flower node ids are unsigned 64-bit: beyond SQLite INTEGER
    request_id     TEXT,                -- '' when the payload could not be parsed
    payload_sha256 TEXT NOT NULL,
    outcome        TEXT NOT NULL,       -- accepted | already-recorded | refused
    reason         TEXT NOT NULL        -- refusal code ('' unless refused)
);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Device:
    partition_id: int
    public_key: bytes
    registered: str
    first_seen: str
    last_seen: str | None
    left_at: str | None


@dataclass(frozen=True)
class LogRow:
    partition_id: int | None
    node_id: int | None
    request_id: str
    payload_sha256: str
    outcome: str
    reason: str


class FleetStore(SqliteStore):
    schema = _SCHEMA
    what = "fleet tables in"

    # -- provenance ---------------------------------------------------------------------------------

    def record_provenance(self, scheme: str, fingerprint: str, num_partitions: int, owner: Mapping[int, int]) -> bool:
        """Store sample -> partition once; later calls must describe the same assignment.

        Returns True if the rows were written now. A different scheme, train list or partition count is
        refused: ownership decisions already made against the old assignment would silently change.
        """
        wanted = {
            "provenance.scheme": scheme,
            "provenance.train": fingerprint,
            "provenance.partitions": str(num_partitions),
        }
        with self._tx() as conn:
            have = dict(conn.execute("SELECT key, value FROM fleet_meta WHERE key LIKE 'provenance.%'").fetchall())
            if have:
                if have != wanted:
                    raise ConfigError(
                        f"{self.path} records training provenance for {have.get('provenance.partitions')} partitions "
                        f"({have.get('provenance.scheme')}, train list {have.get('provenance.train', '')[:12]}), "
                        f"not {num_partitions} partitions of this run's train list",
                        "use num-clients equal to the fleet the model was trained on, or a fresh run directory",
                    )
                return False
            conn.executemany("INSERT INTO fleet_meta VALUES (?, ?)", sorted(wanted.items()))
            conn.executemany("INSERT INTO provenance VALUES (?, ?)", sorted(owner.items()))
        return True

    def owned_by(self, partition_id: int) -> list[int]:
        rows = self._conn.execute(
            "SELECT sample_id FROM provenance WHERE partition_id = ? ORDER BY sample_id", (partition_id,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    # -- devices ------------------------------------------------------------------------------------

    def device(self, partition_id: int) -> Device | None:
        row = self._conn.execute(
            "SELECT partition_id, public_key, registered, first_seen, last_seen, left_at FROM devices "
            "WHERE partition_id = ?",
            (partition_id,),
        ).fetchone()
        if row is None:
            return None
        return Device(int(row[0]), bytes.fromhex(row[1]), row[2], row[3], row[4], row[5])

    def devices(self) -> list[Device]:
        ids = [int(r[0]) for r in self._conn.execute("SELECT partition_id FROM devices ORDER BY partition_id")]
        return [d for d in (self.device(i) for i in ids) if d is not None]

    def register_tofu(self, partition_id: int, public_key: bytes) -> bool:
        """Register a key on first contact; returns False if the device already has a key (nothing changes)."""
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO devices (partition_id, public_key, registered, first_seen, last_seen) "
                "VALUES (?, ?, 'tofu', ?, ?)",
                (partition_id, public_key.hex(), _now(), _now()),
            )
        return cur.rowcount == 1

    def pin(self, keys: Mapping[int, bytes]) -> None:
        """Pre-register keys (from a key file); they replace any TOFU registration for those devices."""
        with self._tx() as conn:
            for partition_id, public_key in sorted(keys.items()):
                conn.execute(
                    "INSERT INTO devices (partition_id, public_key, registered, first_seen) VALUES (?, ?, 'pinned', ?) "
                    "ON CONFLICT (partition_id) DO UPDATE SET public_key = excluded.public_key, registered = 'pinned'",
                    (partition_id, public_key.hex(), _now()),
                )

    def touch(self, partition_id: int) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE devices SET last_seen = ? WHERE partition_id = ?", (_now(), partition_id))

    def mark_left(self, partition_id: int) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE devices SET left_at = ? WHERE partition_id = ? AND left_at IS NULL", (_now(), partition_id)
            )

    # -- replay protection --------------------------------------------------------------------------

    def nonce_seen(self, partition_id: int, nonce: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM nonces WHERE partition_id = ? AND nonce = ?", (partition_id, nonce)
        ).fetchone()
        return row is not None

    def record_nonce(self, partition_id: int, nonce: str, request_id: str, seen_at: float) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO nonces VALUES (?, ?, ?, ?)", (partition_id, nonce, request_id, seen_at)
            )

    def prune_nonces(self, older_than: float) -> int:
        """Forget nonces first seen before ``older_than``; only safe once the timestamp window refuses them."""
        with self._tx() as conn:
            cur = conn.execute("DELETE FROM nonces WHERE seen_at < ?", (older_than,))
        return cur.rowcount

    # -- intake log ---------------------------------------------------------------------------------

    def log(self, row: LogRow) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO intake_log (at, partition_id, node_id, request_id, payload_sha256, outcome, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (_now(), row.partition_id, None if row.node_id is None else str(row.node_id), row.request_id,
                 row.payload_sha256, row.outcome, row.reason),
            )

    def intake_log(self) -> list[LogRow]:
        rows = self._conn.execute(
            "SELECT partition_id, node_id, request_id, payload_sha256, outcome, reason FROM intake_log ORDER BY id"
        ).fetchall()
        return [LogRow(r[0], None if r[1] is None else int(r[1]), r[2], r[3], r[4], r[5]) for r in rows]
