"""Staged rollout of a signed bundle over the Flower network (ARCHITECTURE.md §9).

Server (``run_rollout``, the ServerApp in ``mode="rollout"``):

1. ``query.rollout`` phase ``status`` to every connected node: each device answers its device id (its
   public key hex) and the model version it runs. The node -> device mapping comes from these replies;
2. waves: ``waves="5,25,100"`` are cumulative percentages of the fleet: the devices that answered, plus those
   an interrupted run of this rollout already recorded, in device-id order (each wave has at least one
   device). The bundle goes to the wave's devices that do not run it yet (phase ``install``); each verifies
   it against its pinned fleet key (signature, hashes), runs the on-board check, checks the profile's
   latency / memory budget, and — if it filed deletion requests the server acknowledged — checks that its
   own forgotten samples now score like its held-out samples (loss-attack AUC of ``covered()`` against
   ``held_out()``, at most ``max-forget-auc``). Only then does it install the model into its state dir and
   switch to it, keeping the parent for rollback. The forget check's result carries a level named like a
   certificate's: ``approximate-verified`` when it is conclusive at the device's sample counts and passed,
   ``approximate-inconclusive`` when the sampling noise of so few samples exceeds the limit's margin over
   0.5 (reported; the limit still applies), ``failed`` when it is conclusive and over the limit;
3. a wave passes when its pass rate (passed / wave devices; silence is a failure) is at least
   ``wave-pass-rate``; then the next wave starts. Otherwise that wave's devices roll back to the parent
   (phase ``rollback``) and the rollout stops as ``rolled-back``.

Every step is written to ``<run-dir>/rollout.sqlite`` (WAL, synchronous), keyed by device id, before the
next one starts, so a server that crashes resumes the rollout where it stopped: finished waves are not
repeated and devices already running the bundle are not sent it again. A rolled-back or completed rollout
is final; ship a fixed model as a new bundle.

Device (``device_handle``): only the message (the bundle's bytes) and the device's state dir
(``edge_qmul.devices.state``): its pinned fleet key, its own samples, its installed models. The checks use
the on-board runtime (numpy + onnxruntime); nothing reads the server's run directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from edge_qmul.federated import messages
from edge_qmul.federated.config import FederatedConfig
from flwr.app import ConfigRecord, RecordDict

from edge_qmul.atomic import write_json
from edge_qmul.errors import BundleError, ConfigError
from edge_qmul.ledger import SqliteStore
from edge_qmul.run import Run

if TYPE_CHECKING:
    from edge_qmul.devices.state import DeviceState

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
CREATE TABLE IF NOT EXISTS rollout_device_results (
    rollout_id   TEXT NOT NULL,
    device_id    TEXT NOT NULL,         -- the device's public key hex, as it answered the status query
    wave         INTEGER NOT NULL,
    status       TEXT NOT NULL,         -- installed | failed | rolled-back | rollback-unconfirmed
    reasons      TEXT NOT NULL,         -- JSON list
    result       TEXT NOT NULL,         -- JSON: on-board figures
    updated      TEXT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
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

    def record(self, rollout_id: str, device_id: str, wave: int, status: str, reasons: list[str],
               result: dict[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO rollout_device_results VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (rollout_id, device_id, wave, status, json.dumps(reasons), json.dumps(result), _now()))

    def devices(self, rollout_id: str) -> dict[str, dict[str, Any]]:
        """device id -> its wave, status, reasons and on-board figures in this rollout."""
        rows = self._conn.execute(
            "SELECT device_id, wave, status, reasons, result FROM rollout_device_results WHERE rollout_id = ?",
            (rollout_id,)).fetchall()
        return {r[0]: {"wave": r[1], "status": r[2], "reasons": json.loads(r[3]), "result": json.loads(r[4])}
                for r in rows}


def parse_waves(text: str) -> list[int]:
    try:
        waves = [int(p) for p in text.split(",") if p.strip()]
    except ValueError as err:
        raise ConfigError(f"waves={text!r} must be comma-separated percentages", 'write e.g. waves="5,25,100"') from err
    if not waves or waves != sorted(set(waves)) or waves[0] < 1 or waves[-1] != 100:
        raise ConfigError(f"waves={text!r} must increase strictly from >= 1 and end at 100", 'e.g. waves="5,25,100"')
    return waves


def wave_members(waves: list[int], fleet: int) -> list[list[int]]:
    """Cumulative positions (in the fleet's device-id order) per wave: the first ceil(p% x fleet) devices, at
    least one more per wave."""
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
    waves: list[dict[str, Any]] = field(default_factory=list)  # each with its wall "seconds" (send to verdict)
    evidence_level: str | None = None  # the bundle's: the level of the requests the model honours
    status_seconds: float = 0.0  # the status query round (which device runs what)


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
    t = time.perf_counter()
    replies = exchange(grid, {n: _request("status") for n in nodes}, QUERY_ROLLOUT, cfg.reply_timeout)
    summary.status_seconds = time.perf_counter() - t
    where: dict[str, int] = {}  # device id -> the node it answered on
    for node, reply in sorted(replies.items()):
        device = str(_result(reply.content).get("device-id", ""))
        if not device:
            log.warning("node %d answered the status query without a device id; left out", node)
        elif device in where:
            log.warning("device %s answered on nodes %d and %d; using %d", device[:16], where[device], node,
                        where[device])
        else:
            where[device] = node
    fleet = sorted(set(where) | set(done))
    plan = [[fleet[i] for i in wave] for wave in wave_members(state.waves, len(fleet))] if fleet else []
    if not fleet:
        log.warning("rollout %s: no device answered the status query", rollout_id)
    for k in range(state.next_wave, len(plan)):
        t = time.perf_counter()
        targets = [d for d in plan[k] if done.get(d, {}).get("status") != "installed"]
        content = _request("install", **{"rollout-id": rollout_id, "bundle": blob,
                                         "max-forget-auc": cfg.max_forget_auc})
        answers = exchange(grid, {where[d]: content for d in targets if d in where}, QUERY_ROLLOUT,
                           cfg.reply_timeout)
        by_node = {n: _result(r.content) for n, r in answers.items()}
        passed: list[str] = []
        forget_checks: dict[str, dict[str, Any]] = {}
        with RolloutStore(Run(cfg.run_path).path("rollout_db")) as store:
            for d in targets:
                res = by_node.get(where.get(d, -1))
                if res is None or res.get("device-id") != d:
                    reasons = ["not connected" if d not in where else "no reply" if res is None
                               else "replied as another device"]
                    store.record(rollout_id, d, k, "failed", reasons, {})
                    done[d] = {"status": "failed", "reasons": reasons}
                    continue
                ok = bool(res["passed"])
                reasons = json.loads(str(res["reasons"]))
                store.record(rollout_id, d, k, "installed" if ok else "failed", reasons,
                             {key: v for key, v in res.items() if key not in ("reasons", "passed")})
                done[d] = {"status": "installed" if ok else "failed", "reasons": reasons}
                if "forget-level" in res:
                    forget_checks[d] = {"auc": res["forget-auc"], "samples": res["forget-samples"],
                                        "held_out": res["forget-held-out"], "level": res["forget-level"]}
                if ok:
                    passed.append(d)
                else:
                    log.warning("rollout %s wave %d: device %s refused or failed: %s", rollout_id, k + 1, d[:16],
                                "; ".join(reasons))
        rate = len(passed) / len(targets) if targets else 1.0
        wave = {"wave": k + 1, "percent": state.waves[k], "devices": targets, "passed": passed, "pass_rate": rate,
                "forget_checks": forget_checks, "seconds": time.perf_counter() - t}
        summary.waves.append(wave)
        if rate >= cfg.wave_pass_rate:
            with RolloutStore(Run(cfg.run_path).path("rollout_db")) as store:
                store.set_state(rollout_id, "running" if k + 1 < len(plan) else "completed", k + 1)
            log.info("rollout %s wave %d (%d%%): %d/%d passed", rollout_id, k + 1, state.waves[k], len(passed),
                     len(targets))
            continue
        # the wave failed: its devices that switched go back to the parent, and the rollout stops
        back = exchange(grid, {where[d]: _request("rollback", **{"rollout-id": rollout_id,
                                                                 "version": manifest["model_version"]})
                               for d in passed}, QUERY_ROLLOUT, cfg.reply_timeout)
        with RolloutStore(Run(cfg.run_path).path("rollout_db")) as store:
            for d in passed:
                ok = where[d] in back
                store.record(rollout_id, d, k, "rolled-back" if ok else "rollback-unconfirmed", [], {})
            store.set_state(rollout_id, "rolled-back", k)
        wave["rolled_back"] = passed
        log.warning("rollout %s wave %d failed (pass rate %.2f < %.2f): rolled back %d device(s); stopped",
                    rollout_id, k + 1, rate, cfg.wave_pass_rate, len(passed))
        summary.status = "rolled-back"
        break
    else:
        summary.status = "completed"
        if plan:
            log.info("rollout %s of %s completed", rollout_id, manifest["model_version"])
    if not plan:
        summary.status = "running"  # nothing reached: the rollout stays open for a run that finds devices
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


def _active(state: DeviceState) -> str:
    models = state.models()
    return models[0].version if models else ""


def device_handle(state: DeviceState, content: RecordDict) -> RecordDict:
    """The ClientApp's ``query.rollout`` handler body: status, install or rollback on this device's state."""
    record = content.get(_ROLLOUT)
    if not isinstance(record, ConfigRecord):
        raise messages.ProtocolError("malformed-batch", "no rollout record", "update the server")
    phase = str(record["phase"])
    if phase == "status":
        out: dict[str, Any] = {"device-id": state.device_id, "active": _active(state)}
    elif phase == "install":
        out = _install(state, bytes(record["bundle"]), float(record["max-forget-auc"]))  # type: ignore[arg-type]
    elif phase == "rollback":
        models = state.models()
        rolled = bool(models) and models[0].version == str(record["version"])
        if rolled:
            parent = models[0].parent
            if parent:
                state.activate(parent)
            else:
                state.deactivate()  # the bundle was the first rollout here: back to the factory model
        out = {"device-id": state.device_id, "active": _active(state), "rolled-back": rolled}
    else:
        raise messages.ProtocolError("malformed-batch", f"unknown rollout phase {phase!r}", "update the device")
    return RecordDict({_RESULT: ConfigRecord(out)})


def _install(state: DeviceState, blob: bytes, max_auc: float) -> dict[str, Any]:
    from edge_qmul.devices import runtime  # numpy + onnxruntime only

    out: dict[str, Any] = {"device-id": state.device_id, "passed": False, "version": ""}
    reasons: list[str] = []
    # The bundle is unpacked in a private directory in the device's own state dir; only a verified, checked
    # model is installed (DeviceState.install_model), the rest is removed.
    work = Path(tempfile.mkdtemp(prefix=".rollout-", dir=state.dir))
    try:
        (work / "bundle.tar").write_bytes(blob)
        result = runtime.check_bundle_in_fresh_process(work / "bundle.tar", runtime.load_public_key(state.fleet_key),
                                                        work / "files", runs=20, warmup=2)
        manifest = json.loads((work / "files" / runtime.MANIFEST).read_text())
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
        forget = forget_check(state, work / "files" / runtime.MODEL_FILE)
        if forget is not None:
            auc, n_forgotten, n_held = forget
            out["forget-auc"], out["forget-samples"], out["forget-held-out"] = auc, n_forgotten, n_held
            out["forget-level"] = forget_check_level(auc, n_forgotten, n_held, max_auc)
            if auc > max_auc:
                reasons.append(f"own forgotten samples still look like members: loss-attack AUC {auc:.3f} "
                               f"> {max_auc}")
        if not reasons:
            active = _active(state)
            if active != out["version"]:
                state.install_model(out["version"], work / "files", parent=active)
    except runtime.BadInputError as err:  # refused bundle (BundleRefused) or a broken board
        reasons.append(err.message)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["reasons"] = json.dumps(reasons)
    out["passed"] = not reasons
    return out


def forget_check_level(auc: float, n_forgotten: int, n_held: int, max_auc: float, confidence: float = 0.95) -> str:
    """The on-board forget check's level, by the rule validation applies to ``loss_auc``
    (``edge_qmul.evidence.loss_auc_power``): inconclusive when its verdict would be noise at these sizes."""
    from edge_qmul.evidence import loss_auc_power

    power = loss_auc_power(n_forgotten, n_held, limit=max_auc, confidence=confidence, value=auc)
    if "inconclusive" in power:
        return "approximate-inconclusive"
    return "approximate-verified" if auc <= max_auc else "failed"


def forget_check(state: DeviceState, model: Path) -> tuple[float, int, int] | None:
    """Loss-attack AUC of the device's forgotten samples against its held-out samples, with both sample
    counts (None: no acknowledged request, or no held-out pool to compare with).

    Forgotten = ``covered()``: the samples its acknowledged or honoured requests name (for a leave request,
    its whole contributed pool); held-out = ``held_out()``: its pool that it never contributed. Both are read
    from its own data root (``pixels``), at the model's input size. AUC = P(loss of a forgotten sample <
    loss of a held-out sample): 0.5 when the model treats them alike, towards 1 when it still fits the
    forgotten ones as it fits training data.
    """
    forgotten, held = state.covered(), state.held_out()
    if not forgotten:
        return None
    if not held:
        log.warning("device %s has no held-out samples: its forget check cannot run", state.device_id[:16])
        return None
    from edge_qmul.devices import runtime

    session = runtime.create_session(model.read_bytes(), model, threads=1)
    shape = session.get_inputs()[0].shape  # (batch, C, H, W): the size and colour the model takes
    size = shape[2] if isinstance(shape[2], int) and shape[2] == shape[3] else None
    color = {1: "grayscale", 3: "rgb"}.get(shape[1], "auto") if isinstance(shape[1], int) else "auto"

    def losses(hashes: list[str]) -> np.ndarray:
        images, labels, scale = state.pixels(hashes, image_size=size, color=color)
        x = np.ascontiguousarray(images.astype(np.float32) / np.float32(scale))
        logits = runtime.infer_all(session, model, x, 0).astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        return np.asarray(lse - logits[np.arange(len(labels)), labels])

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
