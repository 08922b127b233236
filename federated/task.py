"""The device side: its share of the training data, its queue of pending deletion requests, its key.

A ``Device`` is rebuilt for every Flower message (each message runs in a fresh ClientApp process), so
everything that must survive between messages lives in its state: a JSON file plus a PEM key under the
node's ``state-dir`` (survives runs and reboots), or Flower's per-run ``context.state`` when no state dir
is configured (then the key is new every run and a server that registered an earlier key refuses it).

The pending queue is generated deterministically from the run config (``seed``, ``requests-per-client``,
``samples-per-request``, ``class-partitions``, ``leave-partitions``): on a real device it would be filled
by the user's deletion requests. (Devices that misbehave on purpose, for tests, are in tests/fleet/faults.py.)

Only sample *ids* leave the device, never sample contents. This module imports neither torch nor Flower's
heavy parts, so a ClientApp process starts quickly.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edge_qmul.federated import partition, protocol
from edge_qmul.federated.config import DeviceConfig, FederatedConfig
from edge_qmul.federated.protocol import DeviceBatch, ForgetRequest, Outcome, SignedRequest

from edge_qmul import data
from edge_qmul.atomic import write_json
from edge_qmul.errors import ConfigError, ForgetRequestError
from edge_qmul.run import Run

STATE_FORMAT = "edge-qmul/device-state/1"
STATE_FILE = "device.json"
KEY_FILE = "device_key.pem"


@dataclass(frozen=True)
class PendingRequest:
    """A request waiting for the server's acknowledgement (unsigned: it is signed afresh at every send)."""

    request_id: str
    kind: str
    sample_ids: tuple[int, ...] = ()
    klass: int | None = None

    def signed(self, device: int, key: Ed25519PrivateKey, now: int) -> SignedRequest:
        request = ForgetRequest(
            self.request_id, device, self.kind, self.sample_ids, self.klass, now, protocol.new_nonce()
        )
        return protocol.sign(request, key)

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "kind": self.kind, "sample_ids": list(self.sample_ids),
                "class": self.klass}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PendingRequest:
        return cls(d["request_id"], d["kind"], tuple(d["sample_ids"]), d["class"])


def request_id(seed: int, partition_id: int, tag: str) -> str:
    """Deterministic, device-scoped request id: re-filing the same request maps to the same ledger row."""
    digest = hashlib.sha256(f"{seed}/{partition_id}/{tag}".encode()).hexdigest()[:12]
    return f"p{partition_id}-{tag}-{digest}"


def own_samples(run_cfg: FederatedConfig, device_cfg: DeviceConfig) -> list[int]:
    split = data.Split.load(Run(run_cfg.run_path).require("split"))
    return partition.partition(split.train, device_cfg.num_partitions, device_cfg.partition_id)


def generate_requests(run_cfg: FederatedConfig, device_cfg: DeviceConfig, own: list[int]) -> list[PendingRequest]:
    """The device's deletion requests for this run config (disjoint sample sets, reproducible from ``seed``)."""
    pid = device_cfg.partition_id
    k, m = run_cfg.requests_per_client, run_cfg.samples_per_request
    if k * m > len(own):
        raise ConfigError(
            f"requests-per-client x samples-per-request = {k * m} exceeds the {len(own)} samples of device {pid}",
            "ask for fewer or smaller requests",
        )
    chosen = random.Random(f"{run_cfg.seed}/{pid}").sample(own, k * m) if k * m else []
    out = [
        PendingRequest(request_id(run_cfg.seed, pid, f"s{j}"), "samples", tuple(sorted(chosen[j * m : (j + 1) * m])))
        for j in range(k)
        if m > 0
    ]
    if pid in run_cfg.class_ids:
        split = data.Split.load(Run(run_cfg.run_path).require("split"))
        labels = data.load_dataset(split.dataset, split.root, seed=split.seed).train.labels
        klass = int(labels[own[0]])  # a class this device certainly holds
        out.append(PendingRequest(request_id(run_cfg.seed, pid, f"c{klass}"), "class", klass=klass))
    if pid in run_cfg.leave_ids:
        out.append(PendingRequest(request_id(run_cfg.seed, pid, "leave"), "client"))
    return out


def _fingerprint(run_cfg: FederatedConfig, device_cfg: DeviceConfig) -> str:
    basis = [run_cfg.seed, run_cfg.requests_per_client, run_cfg.samples_per_request, run_cfg.class_partitions,
             run_cfg.leave_partitions, device_cfg.partition_id, device_cfg.num_partitions]
    return hashlib.sha256(json.dumps(basis).encode()).hexdigest()[:16]


def _empty_state() -> dict[str, Any]:
    return {"format": STATE_FORMAT, "generated": "", "pending": [], "in_flight": [], "acked": {}, "refused": {},
            "receipts": {}}


class Device:
    """One board: configuration, key and persistent state; ``save()`` after every change."""

    STATE_RECORD = "edge-qmul-device"  # key of the ConfigRecord in context.state (no state dir)

    def __init__(
        self,
        device_cfg: DeviceConfig,
        run_cfg: FederatedConfig,
        key: Ed25519PrivateKey,
        state: dict[str, Any],
        context_state: Any = None,
    ) -> None:
        self.cfg = device_cfg
        self.run_cfg = run_cfg
        self.key = key
        self.state = state
        self._context_state = context_state  # flwr RecordDict when there is no state dir

    # -- persistence --------------------------------------------------------------------------------

    @classmethod
    def open(cls, device_cfg: DeviceConfig, run_cfg: FederatedConfig, context_state: Any = None) -> Device:
        """Load (or create) the device's key and state from its state dir or from Flower's context.state."""
        if device_cfg.state_dir:
            root = Path(device_cfg.state_dir)
            key = protocol.load_or_create_key(root / KEY_FILE)
            state = _read_state(root / STATE_FILE)
            return cls(device_cfg, run_cfg, key, state)
        from flwr.app import ConfigRecord  # local import: only needed without a state dir

        record = context_state.get(cls.STATE_RECORD) if context_state is not None else None
        if isinstance(record, ConfigRecord):
            key = protocol.private_key_from_bytes(record["key"])
            state = json.loads(record["state"])  # type: ignore[arg-type]
        else:
            key, state = protocol.generate_key(), _empty_state()
        return cls(device_cfg, run_cfg, key, state, context_state)

    def save(self) -> None:
        if self.cfg.state_dir:
            write_json(Path(self.cfg.state_dir) / STATE_FILE, self.state)
            return
        from flwr.app import ConfigRecord

        if self._context_state is not None:
            self._context_state[self.STATE_RECORD] = ConfigRecord(
                {"key": protocol.private_key_bytes(self.key), "state": json.dumps(self.state).encode()}
            )

    # -- the queue ----------------------------------------------------------------------------------

    @property
    def partition_id(self) -> int:
        return self.cfg.partition_id

    def pending(self) -> list[PendingRequest]:
        return [PendingRequest.from_json(d) for d in self.state["pending"]]

    def refresh_queue(self) -> None:
        """Add this run config's generated requests that the device has not filed yet."""
        fingerprint = _fingerprint(self.run_cfg, self.cfg)
        if self.state["generated"] == fingerprint:
            return
        known = {p.request_id for p in self.pending()} | set(self.state["acked"]) | set(self.state["refused"])
        new = [r for r in generate_requests(self.run_cfg, self.cfg, own_samples(self.run_cfg, self.cfg))
               if r.request_id not in known]
        self.state["pending"].extend(r.to_json() for r in new)
        self.state["generated"] = fingerprint

    def outgoing(self, now: int | None = None) -> DeviceBatch:
        """Sign every pending request (fresh nonce and timestamp) into a batch; remembers what was sent."""
        now = int(time.time()) if now is None else now
        pid = self.partition_id
        labelled: list[tuple[str, SignedRequest]] = [
            (f"req:{p.request_id}", p.signed(pid, self.key, now)) for p in self.pending()
        ]
        self.state["in_flight"] = [label for label, _ in labelled]
        return DeviceBatch(
            partition_id=pid,
            num_partitions=self.cfg.num_partitions,
            public_key=protocol.public_key_bytes(self.key),
            key_proof=protocol.key_proof(self.key, pid),
            entries=[signed for _, signed in labelled],
        )

    def apply_outcomes(self, outcomes: list[Outcome]) -> dict[str, int]:
        """Settle the in-flight batch against the server's outcomes (one per entry, in order).

        Recorded requests (accepted / already recorded) leave the queue. Refused ones leave it too, into
        ``refused`` with the reason: a refusal is a verdict on that request (re-sending it unchanged would be
        refused again); a real device reports it to its user. A lost acknowledgement leaves the queue as it
        was, so the next query re-sends those requests and the server answers "already-recorded".
        """
        in_flight: list[str] = self.state["in_flight"]
        if len(outcomes) != len(in_flight):
            raise ForgetRequestError(
                f"device {self.partition_id}: {len(outcomes)} outcomes for {len(in_flight)} sent requests",
                "the acknowledgement does not belong to the last batch; the queue is kept and re-sent",
            )
        settled: dict[str, str] = {}
        counts = {"acked": 0, "refused": 0}
        for outcome, label in zip(outcomes, in_flight, strict=True):
            name = label.partition(":")[2]
            if outcome.request_id != name and (outcome.recorded or outcome.request_id):
                # A refusal may carry no id (the server does not parse what it could not verify); anything
                # else naming another request means the outcomes belong to a different batch.
                raise ForgetRequestError(
                    f"device {self.partition_id}: outcome {outcome.index} names request {outcome.request_id!r}, "
                    f"expected {name!r}",
                    "the acknowledgement does not match the batch; the queue is kept and re-sent",
                )
            elif outcome.recorded:
                self.state["acked"][name] = outcome.status
                sent = next((d for d in self.state["pending"] if d["request_id"] == name), None)
                if sent is not None:  # what it covers, for the on-board forget check after a rollout
                    self.state.setdefault("filed", {})[name] = sent
                settled[name] = "acked"
                counts["acked"] += 1
            else:
                self.state["refused"][name] = outcome.reason
                settled[name] = "refused"
                counts["refused"] += 1
        self.state["pending"] = [d for d in self.state["pending"] if d["request_id"] not in settled]
        self.state["in_flight"] = []
        return counts

    def apply_receipt(self, honoured: dict[str, str]) -> int:
        """Record which model version first honours each of this device's requests."""
        self.state["receipts"].update(honoured)
        return len(honoured)


def _read_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return _empty_state()
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ForgetRequestError(
            f"device state {path} is unreadable ({err.__class__.__name__})",
            "restore it from backup, or delete it to re-file the generated requests (they are idempotent)",
        ) from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ForgetRequestError(f"device state {path} is not an {STATE_FORMAT} file", "delete it to start afresh")
    return state
