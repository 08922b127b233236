"""The server's copy of the training pool (``samples.sqlite`` in the run directory).

``edge-qmul train`` imports the training file into this store once; from then on the run reads its
training samples from here (``pipeline.load_run_data``), so the dataset directory is only the import
source. Each row keeps the sample's label and the sha256 of its raw bytes. Purging a sample (after its
deletion certificate is issued) sets its pixels to NULL and records when and under which certificate;
the sha256 stays, so a certificate can still name what was deleted. A purge ends with VACUUM and a WAL
checkpoint, so the bytes leave the file rather than lingering in free pages or the write-ahead log.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from edge_qmul.errors import DataError, ForgetRequestError
from edge_qmul.ledger import SqliteStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    id          INTEGER PRIMARY KEY,   -- index into the training file
    label       INTEGER NOT NULL,
    sha256      TEXT NOT NULL,         -- content id: of the image file's bytes, or of the raw uint8 pixels
    pixels      BLOB,                  -- NULL once purged
    purged_at   TEXT,
    certificate TEXT                   -- request id of the certificate the purge followed
);
CREATE INDEX IF NOT EXISTS samples_sha256 ON samples (sha256);
CREATE TABLE IF NOT EXISTS provenance (   -- which device contributed which training sample (by content id)
    sha256 TEXT NOT NULL,
    device TEXT NOT NULL,
    PRIMARY KEY (sha256, device)
);
CREATE INDEX IF NOT EXISTS provenance_device ON provenance (device);
"""


def sample_sha256(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


class SampleStore(SqliteStore):
    schema = _SCHEMA
    what = "sample store"

    def ingest(
        self, images: np.ndarray, labels: np.ndarray, scale: float, content_ids: Sequence[str] | None = None
    ) -> int:
        """Import the whole training file once (a second call with the same shape is a no-op). Each row keeps
        its content id: ``content_ids`` (e.g. the sha256 of an image file's bytes) or the pixels' sha256."""
        shape = [int(s) for s in images.shape[1:]]
        meta = self.meta()
        if meta:
            if meta["shape"] != shape or meta["count"] != len(images):
                raise DataError(f"{self.path} holds another training pool ({meta['count']} x {meta['shape']})",
                                "use a fresh run directory")
            return 0
        with self._tx() as conn:
            conn.executemany(
                "INSERT INTO samples (id, label, sha256, pixels) VALUES (?, ?, ?, ?)",
                ((i, int(labels[i]), content_ids[i] if content_ids is not None else sample_sha256(images[i]),
                  images[i].tobytes()) for i in range(len(images))),
            )
            for key, value in (("shape", shape), ("count", len(images)), ("scale", float(scale))):
                conn.execute("INSERT INTO store_meta VALUES (?, ?)", (key, json.dumps(value)))
        return len(images)

    def meta(self) -> dict[str, object]:
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM store_meta")}

    def load(self) -> tuple[np.ndarray, np.ndarray, float, set[int]]:
        """(images with purged rows zeroed, labels, scale, purged ids)."""
        meta = self.meta()
        shape = tuple(int(s) for s in meta["shape"])  # type: ignore[attr-defined]
        count = int(meta["count"])  # type: ignore[call-overload]
        images = np.zeros((count, *shape), dtype=np.uint8)
        labels = np.zeros(count, dtype=np.int64)
        purged: set[int] = set()
        for i, label, pixels in self._conn.execute("SELECT id, label, pixels FROM samples"):
            labels[i] = label
            if pixels is None:
                purged.add(int(i))
            else:
                images[i] = np.frombuffer(pixels, dtype=np.uint8).reshape(shape)
        return images, labels, float(meta["scale"]), purged  # type: ignore[arg-type]

    def _select_in(self, query: str, values: Sequence[object]) -> Iterator[tuple[Any, ...]]:
        """Rows of ``query`` (its ``IN ({marks})`` filled) for ``values``, in chunks under SQLite's bound-parameter
        limit."""
        for chunk in range(0, len(values), 900):
            part = list(values[chunk : chunk + 900])
            yield from self._conn.execute(query.format(marks=",".join("?" * len(part))), part)

    def hashes(self, ids: Sequence[int]) -> dict[int, str]:
        return dict(self._select_in("SELECT id, sha256 FROM samples WHERE id IN ({marks})", [int(i) for i in ids]))

    def ids_for_hashes(self, hashes: Sequence[str]) -> dict[str, list[int]]:
        """{content id: the sample ids with it} for the given ids that the store holds (duplicates share one)."""
        out: dict[str, list[int]] = {}
        for i, sha in self._select_in("SELECT id, sha256 FROM samples WHERE sha256 IN ({marks})", sorted(set(hashes))):
            out.setdefault(sha, []).append(int(i))
        return out

    # -- provenance (edge_qmul.provenance) ------------------------------------------------------------
    def record_provenance(self, pairs: Sequence[tuple[str, str]]) -> int:
        """Store (device id, content id) pairs once; recording the same pairs again is a no-op, other pairs are
        refused (a run's provenance is fixed when it is trained)."""
        have = set(self._conn.execute("SELECT device, sha256 FROM provenance").fetchall())
        want = set(pairs)
        if have:
            if have != want:
                raise DataError(f"{self.path} already records another training provenance "
                                f"({len(have)} samples)", "use a fresh run directory")
            return 0
        with self._tx() as conn:
            conn.executemany("INSERT INTO provenance (device, sha256) VALUES (?, ?)", sorted(want))
        return len(want)

    def has_provenance(self) -> bool:
        return self._conn.execute("SELECT 1 FROM provenance LIMIT 1").fetchone() is not None

    def devices(self) -> dict[str, int]:
        """{device id: number of samples it contributed}."""
        return dict(self._conn.execute("SELECT device, COUNT(*) FROM provenance GROUP BY device").fetchall())

    def contributed_by(self, device: str) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT sha256 FROM provenance WHERE device = ? ORDER BY sha256",
                                                 (device,))]

    def owners(self, hashes: Sequence[str]) -> dict[str, set[str]]:
        """{content id: the devices that contributed it} for the given ids that have provenance."""
        out: dict[str, set[str]] = {}
        for sha, device in self._select_in("SELECT sha256, device FROM provenance WHERE sha256 IN ({marks})",
                                           sorted(set(hashes))):
            out.setdefault(sha, set()).add(device)
        return out

    def check_owned(self, device: str, hashes: Sequence[str]) -> dict[str, list[int]]:
        """{content id: sample ids} for a deletion request by ``device``, or one ForgetRequestError naming
        what is wrong: a hash no device contributed to the training set, or one another device contributed."""
        if not hashes:
            raise ForgetRequestError(f"device {device}: the request names no sample", "name at least one content id")
        owners = self.owners(hashes)
        unknown = sorted({h for h in hashes if h not in owners})
        if unknown:
            raise ForgetRequestError(
                f"device {device}: {len(unknown)} content id(s) are not in the training set's provenance "
                f"(e.g. {unknown[0][:16]}…)", "a device can ask only for samples it contributed to training")
        foreign = sorted({h for h in hashes if device not in owners[h]})
        if foreign:
            raise ForgetRequestError(
                f"device {device}: {len(foreign)} content id(s) were contributed by other devices "
                f"(e.g. {foreign[0][:16]}…)", "a device can ask only for samples it contributed to training")
        return self.ids_for_hashes(hashes)

    def purged(self) -> set[int]:
        return {int(r[0]) for r in self._conn.execute("SELECT id FROM samples WHERE pixels IS NULL")}

    def purge(self, ids_by_certificate: Mapping[str, Sequence[int]]) -> int:
        """Drop the pixels of these samples (keeping label and sha256); returns how many were dropped."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        n = 0
        with self._tx() as conn:
            for certificate, ids in ids_by_certificate.items():
                for i in ids:
                    cur = conn.execute(
                        "UPDATE samples SET pixels = NULL, purged_at = ?, certificate = ? "
                        "WHERE id = ? AND pixels IS NOT NULL", (now, certificate, int(i)))
                    n += cur.rowcount
        self._conn.execute("VACUUM")  # rewrite the file: no free page keeps the old bytes
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # and no WAL frame either
        return n
