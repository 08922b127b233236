"""Staged rollout of a signed bundle over the Flower network (ARCHITECTURE.md §9).

Server (``run_rollout``, the ServerApp in ``mode="rollout"``):

1. ``query.rollout`` phase ``status`` to every connected node: each device answers its partition id and
   the model version it runs;
2. waves: ``waves="5,25,100"`` are cumulative percentages of the fleet (``num-clients`` partitions in
   partition-id order; each wave has at least one device). The bundle goes to the wave's devices that do
   not run it yet (phase ``install``); each verifies it (signature, hashes), runs the on-board check,
   checks the profile's latency / memory budget, and — if it filed deletion requests — checks that its
   own forgotten samples now score like its unseen samples (loss-attack AUC, forget versus local
   held-out data, at most ``max-forget-auc``). Only then does it switch to the new model, keeping the
   parent for rollback. The forget check's result carries a level named like a certificate's:
   ``approximate-verified`` when it is conclusive at the device's sample counts and passed,
   ``approximate-inconclusive`` when the sampling noise of so few samples exceeds the limit's margin over
   0.5 (reported; the limit still applies), ``failed`` when it is conclusive and over the limit;
3. a wave passes when its pass rate (passed / wave devices; silence is a failure) is at least
   ``wave-pass-rate``; then the next wave starts. Otherwise that wave's devices roll back to the parent
   (phase ``rollback``) and the rollout stops as ``rolled-back``.

Every step is written to ``<run-dir>/rollout.sqlite`` (WAL, synchronous) before the next one starts, so a
server that crashes resumes the rollout where it stopped: finished waves are not repeated and devices
already running the bundle are not sent it again. A rolled-back or completed rollout is final; ship a fixed
model as a new bundle.

Device (``device_*``): everything on the board side uses only the on-board runtime (numpy + onnxruntime)
and the device's state dir; the bundle must verify against the fleet key pinned in the node config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edge_qmul.federated import messages, partition
from edge_qmul.federated.config import FederatedConfig
from edge_qmul.federated.task import Device
from flwr.app import ConfigRecord, RecordDict

from edge_qmul import data
from edge_qmul.atomic import write_json
from edge_qmul.errors import BundleError, ConfigError
from edge_qmul.ledger import SqliteStore
from edge_qmul.run import Run

log = logging.getLogger(__name__)

QUERY_ROLLOUT = "query.rollout"
_ROLLOUT, _RESULT = "rollout", "rollout-result"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id     TEXT PRIMARY KEY,    -- sha256 prefix of the bundle file
    bundle         TEXT NOT NULL,
    model_version  TEXT NOT NULL,
    parent_version TEXT,
    waves          TEXT NOT NULL,       -- JSON list of cumulative percentages
    pass_rate      REAL NOT NULL,
    status         TEXT NOT NULL,       -- running | completed | rolled-back
    next_wave      INTEGER NOT NULL,    -- index of the first wave not yet passed
    created        TEXT NOT NULL,
    updated        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id   TEXT NOT NULL,
    partition_id INTEGER NOT NULL,
    wave         INTEGER NOT NULL,
    status       TEXT NOT NULL,         -- installed | failed | rolled-back
    reasons      TEXT NOT NULL,         -- JSON list
    result       TEXT NOT NULL,         -- JSON: on-board figures
    updated      TEXT NOT NULL,
    PRIMARY KEY (rollout_id, partition_id)
);
"""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Rollout:
    rollout_id: str
    bundle: str
    model_version: str
    parent_version: str | None
    waves: list[int]
    pass_rate: float
    status: str
    next_wave: int


class RolloutStore(SqliteStore):
    schema = _SCHEMA
    what = "rollout store"

    def get(self, rollout_id: str) -> Rollout | None:
        row = self._conn.execute(
            "SELECT rollout_id, bundle, model_version, parent_version, waves, pass_rate, status, next_wave "
            "FROM rollouts WHERE rollout_id = ?", (rollout_id,)).fetchone()
        if row is None:
            return None
        return Rollout(row[0], row[1], row[2], row[3], json.loads(row[4]), float(row[5]), row[6], int(row[7]))

    def all(self) -> list[Rollout]:
        ids = [r[0] for r in self._conn.execute("SELECT rollout_id FROM rollouts ORDER BY created, rollout_id")]
        return [r for i in ids if (r := self.get(i)) is not None]

    def create(self, r: Rollout) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR IGNORE INTO rollouts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (r.rollout_id, r.bundle, r.model_version, r.parent_version, json.dumps(r.waves),
                          r.pass_rate, r.status, r.next_wave, _now(), _now()))

    def set_state(self, rollout_id: str, status: str, next_wave: int) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE rollouts SET status = ?, next_wave = ?, updated = ? WHERE rollout_id = ?",
                         (status, next_wave, _now(), rollout_id))

    def record(self, rollout_id: str, pid: int, wave: int, status: str, reasons: list[str],
               result: dict[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO rollout_devices VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (rollout_id, pid, wave, status, json.dumps(reasons), json.dumps(result), _now()))

    def devices(self, rollout_id: str) -> dict[int, dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT partition_id, wave, status, reasons, result FROM rollout_devices WHERE rollout_id = ?",
            (rollout_id,)).fetchall()
        return {int(r[0]): {"wave": r[1], "status": r[2], "reasons": json.loads(r[3]), "result": json.loads(r[4])}
                for r in rows}


def parse_waves(text: str) -> list[int]:
    try:
        waves = [int(p) for p in text.split(",") if p.strip()]
    except ValueError as err:
        raise ConfigError(f"waves={text!r} must be comma-separated percentages", 'write e.g. waves="5,25,100"') from err
    if not waves or waves != sorted(set(waves)) or waves[0] < 1 or waves[-1] != 100:
        raise ConfigError(f"waves={text!r} must increase strictly from >= 1 and end at 100", 'e.g. waves="5,25,100"')
    return waves


def wave_partitions(waves: list[int], fleet: int) -> list[list[int]]:
    """Cumulative partition ids per wave: the first ceil(p% x fleet) partitions, at least one per wave."""
    out, prev = [], 0
    for pct in waves:
        upto = min(fleet, max(prev + 1, math.ceil(pct * fleet / 100)))
        out.append(list(range(upto)))
        prev = upto
    return out


# ---------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------


@dataclass
class RolloutSummary:
    rollout_id: str
    model_version: str
    status: str
    waves: list[dict[str, Any]] = field(default_factory=list)
    evidence_level: str | None = None  # the bundle's: the level of the requests the model honours


def _request(phase: str, **fields: Any) -> RecordDict:
    return RecordDict({_ROLLOUT: ConfigRecord({"phase": phase, **fields})})


def run_rollout(grid: Any, cfg: FederatedConfig, exchange: Any, wait_for_nodes: Any,
                flower_run_id: int = 0) -> RolloutSummary:
    """Roll ``cfg.bundle`` out in waves (see the module docstring); resumes a rollout that was interrupted."""
    from edge_qmul.export.bundle import read_manifest  # server side only (onnx, cryptography)

    bundle = Path(cfg.bundle)
    if not bundle.is_file():
        raise BundleError(f"bundle {bundle} does not exist", "build it with `edge-qmul bundle`")
    blob = bundle.read_bytes()
    manifest = read_manifest(bundle)
    rollout_id = hashlib.sha256(blob).hexdigest()[:16]
    waves = parse_waves(cfg.waves)
    with RolloutStore(Run(cfg.run_path).path("rollout_db")) as store:
        store.create(Rollout(rollout_id, str(bundle), manifest["model_version"], manifest.get("parent_version"),
                             waves, cfg.wave_pass_rate, "running", 0))
        state = store.get(rollout_id)
        assert state is not None
        done = store.devices(rollout_id)
    summary = RolloutSummary(rollout_id, manifest["model_version"], state.status,
                             evidence_level=manifest.get("evidence_level"))
    if state.status != "running":
        log.info("rollout %s of %s is already %s", rollout_id, state.model_version, state.status)
        return summary
    if state.next_wave:
        log.info("resuming rollout %s at wave %d of %d", rollout_id, state.next_wave + 1, len(waves))

    nodes = wait_for_nodes(grid, cfg.num_clients, cfg.connect_timeout)
    replies = exchange(grid, {n: _request("status") for n in nodes}, QUERY_ROLLOUT, cfg.reply_timeout)
    where: dict[int, int] = {}  # partition -> node
    for node, reply in replies.items():
        info = _result(reply.content)
        where[int(info["partition-id"])] = node
    plan = wave_partitions(state.waves, cfg.num_clients)
    for k in range(state.next_wave, len(plan)):
        targets = [p for p in plan[k] if done.get(p, {}).get("status") != "installed"]
        missing = [p for p in targets if p not in where]
        content = _request("install", **{"rollout-id": rollout_id, "bundle": blob,
                                         "max-forget-auc": cfg.max_forget_auc})
        answers = exchange(grid, {where[p]: content for p in targets if p in where}, QUERY_ROLLOUT,
                           cfg.reply_timeout)
        by_node = {n: _result(r.content) for n, r in answers.items()}
        passed: list[int] = []
        forget_checks: dict[int, dict[str, Any]] = {}
        with RolloutStore(Run(cfg.run_path).path("rollout_db")) as store:
            for p in targets:
                res = by_node.get(where.get(p, -1))
                if res is None:
                    reasons = ["not connected" if p in missing else "no reply"]
                    store.record(rollout_id, p, k, "failed", reasons, {})
                    done[p] = {"status": "failed", "reasons": reasons}
                    continue
                ok = bool(res["passed"])
                reasons = json.loads(str(res["reasons"]))
                store.record(rollout_id, p, k, "installed" if ok else "failed", reasons,
                             {key: v for key, v in res.items() if key not in ("reasons", "passed")})
                done[p] = {"status": "installed" if ok else "failed", "reasons": reasons}
                if "forget-level" in res:
                    forget_checks[p] = {"auc": res["forget-auc"], "samples": res["forget-samples"],
                                        "held_out": res["forget-held-out"], "level": res["forget-level"]}
                if ok:
                    passed.append(p)
                else:
                    log.warning("rollout %s wave %d: device %d refused or failed: %s", rollout_id, k + 1, p,
                                "; ".join(reasons))
        rate = len(passed) / len(targets) if targets else 1.0
        wave = {"wave": k + 1, "percent": state.waves[k], "devices": targets, "passed": passed, "pass_rate": rate,
                "forget_checks": forget_checks}
        summary.waves.append(wave)
        if rate >= cfg.wave_pass_rate:
            with RolloutStore(Run(cfg.run_path).path("rollout_db")) as store:
                store.set_state(rollout_id, "running" if k + 1 < len(plan) else "completed", k + 1)
            log.info("rollout %s wave %d (%d%%): %d/%d passed", rollout_id, k + 1, state.waves[k], len(passed),
                     len(targets))
            continue
        # the wave failed: its devices that switched go back to the parent, and the rollout stops
        back = exchange(grid, {where[p]: _request("rollback", **{"rollout-id": rollout_id}) for p in passed},
                        QUERY_ROLLOUT, cfg.reply_timeout)
        with RolloutStore(Run(cfg.run_path).path("rollout_db")) as store:
            for p in passed:
                ok = where[p] in back
                store.record(rollout_id, p, k, "rolled-back" if ok else "rollback-unconfirmed", [], {})
            store.set_state(rollout_id, "rolled-back", k)
        wave["rolled_back"] = passed
        log.warning("rollout %s wave %d failed (pass rate %.2f < %.2f): rolled back %d device(s); stopped",
                    rollout_id, k + 1, rate, cfg.wave_pass_rate, len(passed))
        summary.status = "rolled-back"
        break
    else:
        summary.status = "completed"
        log.info("rollout %s of %s completed", rollout_id, manifest["model_version"])
    write_json(Run(cfg.run_path).path("rollouts") / f"{rollout_id}-run{flower_run_id}.json", asdict(summary))
    return summary


def _result(content: RecordDict) -> dict[str, Any]:
    record = content.get(_RESULT)
    if not isinstance(record, ConfigRecord):
        raise messages.ProtocolError("malformed-batch", "rollout reply without a result record",
                                     "update the device software")
    return dict(record)


# ---------------------------------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------------------------------


def device_handle(device: Device, content: RecordDict) -> RecordDict:
    """The ClientApp's ``query.rollout`` handler body."""
    record = content.get(_ROLLOUT)
    if not isinstance(record, ConfigRecord):
        raise messages.ProtocolError("malformed-batch", "no rollout record", "update the server")
    phase = str(record["phase"])
    models = device.state.setdefault("model", {"active": None, "previous": None, "rollout": None})
    if phase == "status":
        out: dict[str, Any] = {"partition-id": device.partition_id, "active": models["active"] or ""}
    elif phase == "install":
        out = _install(device, str(record["rollout-id"]), bytes(record["bundle"]),  # type: ignore[arg-type]
                       float(record["max-forget-auc"]))  # type: ignore[arg-type]
    elif phase == "rollback":
        rolled = models["rollout"] == record["rollout-id"]
        if rolled:
            models.update(active=models["previous"], rollout=None)
        out = {"partition-id": device.partition_id, "active": models["active"] or "", "rolled-back": rolled}
    else:
        raise messages.ProtocolError("malformed-batch", f"unknown rollout phase {phase!r}", "update the device")
    device.save()
    return RecordDict({_RESULT: ConfigRecord(out)})


def _install(device: Device, rollout_id: str, blob: bytes, max_auc: float) -> dict[str, Any]:
    from edge_qmul.devices import runtime  # numpy + onnxruntime only

    models = device.state["model"]
    # The verified model stays in the device's state dir (it is what the device now runs); a device
    # without one keeps it in a private temporary directory for this process only.
    root = Path(device.cfg.state_dir) if device.cfg.state_dir else Path(tempfile.mkdtemp(prefix="edge-qmul-device-"))
    base = root / "rollouts" / rollout_id
    base.mkdir(parents=True, exist_ok=True)
    (base / "bundle.tar").write_bytes(blob)
    out: dict[str, Any] = {"partition-id": device.partition_id, "passed": False, "version": ""}
    reasons: list[str] = []
    try:
        if not device.cfg.fleet_key:
            raise runtime.BadInputError("no fleet key is pinned on this device", "set node config fleet-key")
        key = runtime.load_public_key(device.cfg.fleet_key)
        result = runtime.check_bundle_in_fresh_process(base / "bundle.tar", key, base / "files", runs=20,
                                                        warmup=2)
        manifest = json.loads((base / "files" / runtime.MANIFEST).read_text())
        out["version"] = manifest["model_version"]
        reasons += result["reasons"]
        profile = manifest.get("profile", {})
        out["latency-ms-p95"] = float(result["latency_ms_p95"])
        if profile.get("latency_budget_ms") and result["latency_ms_p95"] > profile["latency_budget_ms"]:
            reasons.append(f"latency p95 {result['latency_ms_p95']:.3f} ms over the budget "
                           f"{profile['latency_budget_ms']} ms")
        rss = result.get("peak_rss_mb")
        if profile.get("memory_budget_mb") and rss is not None and rss > profile["memory_budget_mb"]:
            reasons.append(f"peak memory {rss} MB over the budget {profile['memory_budget_mb']} MB")
        forget = forget_check(device, base / "files" / runtime.MODEL_FILE)
        if forget is not None:
            auc, n_forgotten, n_held = forget
            out["forget-auc"], out["forget-samples"], out["forget-held-out"] = auc, n_forgotten, n_held
            out["forget-level"] = forget_check_level(auc, n_forgotten, n_held, max_auc)
            if auc > max_auc:
                reasons.append(f"own forgotten samples still look like members: loss-attack AUC {auc:.3f} "
                               f"> {max_auc}")
    except runtime.BadInputError as err:  # refused bundle (BundleRefused) or a broken board
        reasons.append(err.message)
    out["reasons"] = json.dumps(reasons)
    if not reasons:
        out["passed"] = True
        if models["active"] != out["version"]:
            models.update(previous=models["active"], active=out["version"], rollout=rollout_id)
    return out


def filed_samples(device: Device) -> list[int]:
    """Training samples of this device that its acknowledged deletion requests cover."""
    own = partition.partition(data.Split.load(Run(device.run_cfg.run_path).require("split")).train,
                              device.cfg.num_partitions, device.partition_id)
    ids: set[int] = set()
    labels = None
    for req in device.state.get("filed", {}).values():
        if req["kind"] == "samples":
            ids.update(req["sample_ids"])
        elif req["kind"] == "client":
            ids.update(own)
        elif req["kind"] == "class":
            if labels is None:
                split = data.Split.load(Run(device.run_cfg.run_path).require("split"))
                labels = data.load_dataset(split.dataset, split.root, seed=split.seed).train.labels
            ids.update(i for i in own if int(labels[i]) == req["class"])
    return sorted(ids)


def forget_check_level(auc: float, n_forgotten: int, n_held: int, max_auc: float, confidence: float = 0.95) -> str:
    """The on-board forget check's level, by the rule validation applies to ``loss_auc``
    (``edge_qmul.evidence.loss_auc_power``): inconclusive when its verdict would be noise at these sizes."""
    from edge_qmul.evidence import loss_auc_power

    power = loss_auc_power(n_forgotten, n_held, limit=max_auc, confidence=confidence, value=auc)
    if "inconclusive" in power:
        return "approximate-inconclusive"
    return "approximate-verified" if auc <= max_auc else "failed"


def forget_check(device: Device, model: Path) -> tuple[float, int, int] | None:
    """Loss-attack AUC of the device's forgotten samples against its held-out samples, with both sample
    counts (None: nothing filed).

    AUC = P(loss of a forgotten sample < loss of a held-out sample): 0.5 when the model treats them alike,
    towards 1 when it still fits the forgotten ones as it fits training data. Held-out samples are the
    device's share of the validation split (never trained on).
    """
    forgotten = filed_samples(device)
    if not forgotten:
        return None
    from edge_qmul.devices import runtime

    split = data.Split.load(Run(device.run_cfg.run_path).require("split"))
    source = data.load_dataset(split.dataset, split.root, seed=split.seed)
    held = partition.partition(split.val, device.cfg.num_partitions, device.partition_id) if len(split.val) >= \
        device.cfg.num_partitions else list(split.val)
    session = runtime.create_session(model.read_bytes(), model, threads=1)

    def losses(ids: list[int]) -> np.ndarray:
        pool = source.pool("train")
        x = pool.images[np.asarray(ids)].astype(np.float32) / np.float32(pool.scale)
        y = pool.labels[np.asarray(ids)].astype(np.int64)
        logits = runtime.infer_all(session, model, np.ascontiguousarray(x), 0).astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        return np.asarray(lse - logits[np.arange(len(y)), y])

    lf, lh = losses(forgotten), losses(held)
    # Mann-Whitney: fraction of (forgotten, held-out) pairs where the forgotten sample has the lower loss
    order = np.concatenate([lf, lh]).argsort(kind="mergesort")
    ranks = np.empty(len(order), dtype=np.float64)
    ranks[order] = np.arange(1, len(order) + 1)
    auc_high = (ranks[: len(lf)].sum() - len(lf) * (len(lf) + 1) / 2) / (len(lf) * len(lh))
    return float(1.0 - auc_high), len(lf), len(lh)


def current_fleet_version(run_dir: Path, device: str) -> str | None:
    """The model version of the last rollout to this device profile that completed (None: the factory model):
    what a new bundle for that profile replaces."""
    from edge_qmul.export.bundle import read_manifest  # server side only (onnx, cryptography)

    db = Run(run_dir).path("rollout_db")
    if not db.exists():
        return None
    with RolloutStore(db) as store:
        done = [r for r in store.all() if r.status == "completed" and Path(r.bundle).exists()
                and read_manifest(Path(r.bundle)).get("device") == device]
    return done[-1].model_version if done else None


def describe_rollouts(run: Run) -> dict[str, Any]:
    """The federated layer's part of ``Run.describe``: each rollout's status and its devices' outcomes."""
    if not run.exists("rollout_db"):
        return {}
    with RolloutStore(run.path("rollout_db")) as store:
        rollouts = []
        for r in store.all():
            counts: dict[str, int] = {}
            for d in store.devices(r.rollout_id).values():
                counts[d["status"]] = counts.get(d["status"], 0) + 1
            rollouts.append({"rollout_id": r.rollout_id, "model_version": r.model_version, "status": r.status,
                             "waves_passed": f"{r.next_wave}/{len(r.waves)}", "devices": counts})
    return {"rollouts": rollouts}
