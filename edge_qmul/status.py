"""``edge-qmul status``: a run's ledger, models, bundles, rollouts and certificates at a glance.

Reads only what the other stages wrote; nothing here changes a file.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from edge_qmul.errors import CheckpointError
from edge_qmul.ledger import Ledger


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError, ValueError):
        return None


def collect(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist", "pass the --run of an edge-qmul run")
    out: dict[str, Any] = {"run": str(run_dir)}
    ledger_path = run_dir / "ledger.sqlite"
    if ledger_path.exists():
        with Ledger(ledger_path) as ledger:
            rows = ledger.requests()
        out["ledger"] = {
            "requests": len(rows),
            "honoured": sum(r.honoured_by is not None for r in rows),
            "pending": [r.request_id for r in rows if r.honoured_by is None],
            "samples": len({i for r in rows for i in r.sample_ids}),
            "by_source": dict(Counter(r.source.split(":")[0] for r in rows)),
            "by_model": dict(Counter(r.honoured_by for r in rows if r.honoured_by)),
        }
    models = []
    for log_path in sorted((run_dir / "unlearn").glob("*/log.json")):
        meta = _json(log_path) or {}
        models.append({k: meta.get(k) for k in ("method", "forget_count", "seconds", "created")})
    latest = _json(run_dir / "unlearn" / "latest.json")
    out["models"] = {"results": models, "latest": latest.get("method") if latest else None}
    validation = _json(run_dir / "validation.json")
    if validation:
        out["validation"] = {k: validation.get(k) for k in ("method", "device", "passed", "model_sha256")}
    bundles = []
    for path in sorted((run_dir / "bundles").glob("*.tar")):
        from edge_qmul.export.bundle import read_manifest

        m = read_manifest(path)
        bundles.append({"path": str(path), **{k: m.get(k) for k in ("model_version", "parent_version", "device",
                                                                      "created")},
                        "honoured_requests": len(m.get("honoured_request_ids", []))})
    out["bundles"] = bundles
    rollout_db = run_dir / "rollout.sqlite"
    if rollout_db.exists():
        from edge_qmul.federated.rollout import RolloutStore

        with RolloutStore(rollout_db) as store:
            out["rollouts"] = [
                {"rollout_id": r.rollout_id, "model_version": r.model_version, "status": r.status,
                 "waves_passed": f"{r.next_wave}/{len(r.waves)}",
                 "devices": dict(Counter(d["status"] for d in store.devices(r.rollout_id).values()))}
                for r in store.all()
            ]
    certs = sorted((run_dir / "certificates").glob("*.json"))
    out["certificates"] = {"issued": len(certs), "files": [c.name for c in certs[-5:]]}
    purge = _json(run_dir / "purge.json")
    if purge:
        out["purged_samples"] = purge.get("purged", 0)
    return out


def render(status: dict[str, Any]) -> str:
    lines = [f"run {status['run']}"]
    led = status.get("ledger")
    if led:
        lines.append(f"ledger: {led['requests']} requests ({led['samples']} samples), {led['honoured']} honoured, "
                     f"{len(led['pending'])} pending; by source {led['by_source']}")
        for model, n in led["by_model"].items():
            lines.append(f"  honoured by {model}: {n}")
    else:
        lines.append("ledger: none (no forget requests filed)")
    models = status["models"]
    lines.append(f"models: {', '.join(m['method'] for m in models['results']) or 'none'} "
                 f"(latest: {models['latest'] or '-'})")
    v = status.get("validation")
    if v:
        lines.append(f"validation: {v['method']} for {v['device']}: {'passed' if v['passed'] else 'FAILED'}")
    for b in status["bundles"]:
        lines.append(f"bundle {b['model_version']} for {b['device']} (parent {b['parent_version'] or '-'}), "
                     f"honours {b['honoured_requests']} request(s)")
    for r in status.get("rollouts", []):
        lines.append(f"rollout {r['rollout_id']}: {r['model_version']} {r['status']}, waves {r['waves_passed']}, "
                     f"devices {r['devices']}")
    c = status["certificates"]
    lines.append(f"certificates: {c['issued']} issued" + (f"; {status['purged_samples']} raw samples purged"
                                                          if "purged_samples" in status else ""))
    return "\n".join(lines)
