"""Server-side intake of signed forget requests: verify, check ownership, refuse replays, record.

For each device batch, in order:

1. the batch's partition id must lie in the provenance the server recorded; the device's key must be the
   one registered for it (trust on first use with a proof of possession, or pinned from a key file);
2. per request: signature (before anything else is parsed), device field, timestamp window, nonce never
   seen before for this device, ownership of every sample against the provenance table, and a request id
   that is either new or recorded with exactly the same content;
3. an accepted request is committed to the forget ledger (``Ledger.add``, SQLite WAL, synchronous=FULL)
   *before* the outcome is returned, so an acknowledgement always describes a durable row. The nonce is
   recorded after the ledger row: a crash in between lets the identical retransmission through, where it
   meets the ledger's idempotency and is acknowledged as already recorded; the other order would refuse it
   as a replay and lose the request.

Refusals are logged (and kept in the ``intake_log`` table) with the request id, the device and the reason
code; sample ids and payloads never appear in logs. When the request id cannot be trusted (malformed or
unverifiable payload) the payload's sha256 is logged instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from edge_qmul.federated import partition
from edge_qmul.federated.protocol import (
    ACCEPTED,
    ALREADY_RECORDED,
    REFUSED,
    DeviceBatch,
    ForgetRequest,
    Outcome,
    ProtocolError,
    SignedRequest,
    key_fingerprint,
    public_key_from_bytes,
    verify,
    verify_key_proof,
)
from edge_qmul.federated.store import FleetStore, LogRow

from edge_qmul import data
from edge_qmul.ledger import Ledger
from edge_qmul.run import Run

log = logging.getLogger(__name__)

REFUSAL_REASONS: dict[str, str] = {
    "malformed": "the payload is not a canonical, well-formed forget request",
    "malformed-batch": "the device's reply could not be decoded as a batch of signed requests",
    "malformed-key": "the device presented something that is not an Ed25519 public key",
    "partition-mismatch": "the device's partition id or partition count does not match the recorded provenance",
    "bad-key-proof": "first contact, but the device did not prove possession of the key it presented",
    "key-mismatch": "the device presented a key other than the one registered for it",
    "bad-signature": "the signature does not verify with the device's registered key",
    "device-mismatch": "the request names another device than the one that sent it",
    "expired": "the request's timestamp is older than the replay window (max-request-age)",
    "from-future": "the request's timestamp is ahead of the server clock by more than the allowed skew",
    "replayed-nonce": "this device already sent a request with this nonce",
    "not-owner": "the request names samples that the training provenance does not attribute to this device",
    "bad-class": "the class is outside the dataset's classes",
    "empty-selection": "the device has no training samples matching the request",
    "request-id-conflict": "the request id is already recorded with different content or by another device",
}
MAX_CLOCK_SKEW = 300  # seconds a device clock may run ahead of the server's


@dataclass(frozen=True)
class BatchResult:
    """The outcomes of one batch, and whether its sender proved to be the device it claims to be (only then
    may it be told anything about that device's requests, e.g. receipts)."""

    authenticated: bool
    outcomes: list[Outcome]


class Intake:
    """Verifies device batches against the run's provenance and writes accepted requests to the ledger."""

    def __init__(
        self,
        run_dir: Path,
        num_partitions: int,
        *,
        max_request_age: int = 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.num_partitions = num_partitions
        self.max_request_age = max_request_age
        self.clock = clock
        run = Run(self.run_dir)
        self.split = data.Split.load(run.require("split"))
        self.ledger = Ledger(run.path("ledger"))
        self.store = FleetStore(run.path("ledger"))
        self._labels: np.ndarray | None = None
        self._owned: dict[int, frozenset[int]] = {}
        self._recorded: dict[str, tuple[str, str, list[int]]] | None = None
        train = self.split.train
        if self.store.record_provenance(
            partition.SCHEME, partition.train_fingerprint(train), num_partitions,
            partition.assignment(train, num_partitions),
        ):
            log.info("recorded training provenance: %d samples in %d partitions", len(train), num_partitions)
        # Nonces can be dropped once the timestamp window alone refuses any replay of them.
        self.store.prune_nonces(self.clock() - max_request_age - MAX_CLOCK_SKEW)

    def close(self) -> None:
        self.ledger.close()
        self.store.close()

    def __enter__(self) -> Intake:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pin_keys(self, keys: dict[int, bytes]) -> None:
        self.store.pin(keys)
        for pid, raw in sorted(keys.items()):
            log.info("device %d: pinned key %s from the key file", pid, key_fingerprint(raw))

    def owned(self, partition_id: int) -> frozenset[int]:
        if partition_id not in self._owned:
            self._owned[partition_id] = frozenset(self.store.owned_by(partition_id))
        return self._owned[partition_id]

    def labels(self) -> np.ndarray:
        """Training-pool labels, loaded on the first class request only (loading a dataset is slow)."""
        if self._labels is None:
            source = data.load_dataset(self.split.dataset, self.split.root, seed=self.split.seed)
            self._labels = source.train.labels
        return self._labels

    # -----------------------------------------------------------------------------------------------

    def process(self, batch: DeviceBatch, node_id: int | None = None) -> BatchResult:
        """Verify and record one device's batch; one outcome per entry, in entry order."""
        pid = batch.partition_id
        try:
            public_key = self._authenticate(batch)
        except ProtocolError as err:
            log.warning("refused the whole batch of device %s (node %s, %d requests): %s",
                        pid, node_id, len(batch.entries), err.reason)
            refused = [self._refuse(i, "", e.sha256, pid, node_id, err.reason) for i, e in enumerate(batch.entries)]
            return BatchResult(False, refused)
        self.store.touch(pid)
        return BatchResult(True, [self._one(i, e, pid, public_key, node_id) for i, e in enumerate(batch.entries)])

    def _authenticate(self, batch: DeviceBatch) -> Ed25519PublicKey:
        pid = batch.partition_id
        if batch.num_partitions != self.num_partitions or not 0 <= pid < self.num_partitions:
            raise ProtocolError(
                "partition-mismatch",
                f"device claims partition {pid} of {batch.num_partitions}; provenance has {self.num_partitions}",
            )
        public_key = public_key_from_bytes(batch.public_key)
        registered = self.store.device(pid)
        if registered is None:
            verify_key_proof(public_key, pid, batch.key_proof)
            if self.store.register_tofu(pid, batch.public_key):
                log.info("device %d: registered key %s on first contact (TOFU)", pid, key_fingerprint(batch.public_key))
            registered = self.store.device(pid)
        if registered is None or registered.public_key != batch.public_key:
            raise ProtocolError(
                "key-mismatch",
                f"device {pid} presented key {key_fingerprint(batch.public_key)}, registered key is "
                f"{key_fingerprint(registered.public_key) if registered else '-'}",
            )
        return public_key

    def _one(
        self, index: int, entry: SignedRequest, pid: int, public_key: Ed25519PublicKey, node_id: int | None
    ) -> Outcome:
        try:
            request = verify(entry, public_key)
        except ProtocolError as err:
            return self._refuse(index, "", entry.sha256, pid, node_id, err.reason)
        rid = request.request_id
        reason = self._check_fresh(request, pid)
        if reason:
            # A replayed or stale request is refused without touching the nonce table: its nonce is either
            # already there or the timestamp window refuses it anyway.
            return self._refuse(index, rid, entry.sha256, pid, node_id, reason)
        try:
            ids, spec = self._resolve(request, pid)
            status = self._record(request, ids, spec, pid)
        except ProtocolError as err:
            self.store.record_nonce(pid, request.nonce, rid, self.clock())
            return self._refuse(index, rid, entry.sha256, pid, node_id, err.reason)
        # After the ledger commit (see the module docstring for why this order).
        self.store.record_nonce(pid, request.nonce, rid, self.clock())
        if request.kind == "client":
            self.store.mark_left(pid)
        self.store.log(LogRow(pid, node_id, rid, entry.sha256, status, ""))
        log.info("%s forget request %s (%s, %d samples) from device %d", status, rid, request.kind, len(ids), pid)
        return Outcome(index, rid, status)

    def _check_fresh(self, request: ForgetRequest, pid: int) -> str:
        if request.device != pid:
            return "device-mismatch"
        now = self.clock()
        if request.timestamp < now - self.max_request_age:
            return "expired"
        if request.timestamp > now + MAX_CLOCK_SKEW:
            return "from-future"
        if self.store.nonce_seen(pid, request.nonce):
            return "replayed-nonce"
        return ""

    def _resolve(self, request: ForgetRequest, pid: int) -> tuple[list[int], dict[str, object]]:
        """The training samples a request covers, checked against provenance, and the ledger spec.

        The spec records what was asked (counts, class, device), never the sample ids themselves.
        """
        own = self.owned(pid)
        if request.kind == "samples":
            if not set(request.sample_ids) <= own:
                raise ProtocolError("not-owner", f"request {request.request_id} names samples of other devices")
            return list(request.sample_ids), {"device": pid, "count": len(request.sample_ids)}
        if request.kind == "class":
            labels = self.labels()
            if request.klass is None or request.klass > int(labels.max()):
                raise ProtocolError("bad-class", f"request {request.request_id}: class out of range")
            ids = sorted(i for i in own if int(labels[i]) == request.klass)
            if not ids:
                raise ProtocolError("empty-selection", f"request {request.request_id}: no own samples of the class")
            return ids, {"device": pid, "class": request.klass}
        return sorted(own), {"device": pid, "partition": pid, "num_partitions": self.num_partitions}

    def _record(self, request: ForgetRequest, ids: Sequence[int], spec: dict[str, object], pid: int) -> str:
        """Commit to the ledger; returns the status. Ledger errors (I/O) propagate: nothing is acknowledged."""
        if self._recorded is None:  # one read of the ledger per intake, then kept in step with our writes
            self._recorded = {r.request_id: (r.kind, r.source, r.sample_ids) for r in self.ledger.requests()}
        source = f"device:{pid}"
        content = (request.kind, source, sorted({int(i) for i in ids}))
        existing = self._recorded.get(request.request_id)
        if existing is not None and existing != content:
            raise ProtocolError(
                "request-id-conflict", f"request id {request.request_id} is recorded with other content"
            )
        added = self.ledger.add(request.request_id, request.kind, spec, ids, source=source)
        self._recorded[request.request_id] = content
        return ACCEPTED if added else ALREADY_RECORDED

    def _refuse(self, index: int, rid: str, sha: str, pid: int | None, node_id: int | None, reason: str) -> Outcome:
        self.store.log(LogRow(pid, node_id, rid, sha, REFUSED, reason))
        log.warning(
            "refused forget request %s from device %s (node %s): %s",
            rid or f"<payload sha256 {sha[:16]}>", pid, node_id, reason,
        )
        return Outcome(index, rid, REFUSED, reason)
