"""``edge-qmul status``: a run's ledger, models, bundles, rollouts and certificates at a glance.

Reads only what the other stages wrote; nothing here changes a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_qmul.run import Run


def collect(run_dir: Path) -> dict[str, Any]:
    """``Run.describe`` with the sections of the export layer (validation, bundles, certificates) and the
    federated layer (rollouts)."""
    from edge_qmul.export.bundle import describe_section
    from edge_qmul.federated.rollout import describe_rollouts

    return Run(run_dir).describe([describe_section, describe_rollouts])


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
    for error in [*models.get("errors", []), *status.get("errors", [])]:
        lines.append(f"error: {error}")
    for b in status.get("bundles", []):
        lines.append(f"bundle {b['model_version']} for {b['device']} (parent {b['parent_version'] or '-'}), "
                     f"honours {b['honoured_requests']} request(s), evidence {b.get('evidence_level') or '-'}")
    for r in status.get("rollouts", []):
        lines.append(f"rollout {r['rollout_id']}: {r['model_version']} {r['status']}, waves {r['waves_passed']}, "
                     f"devices {r['devices']}")
    c = status.get("certificates", {"issued": 0})
    levels = ", ".join(f"{level} {n}" for level, n in sorted(c.get("by_level", {}).items()))
    lines.append(f"certificates: {c['issued']} issued" + (f" ({levels})" if levels else "")
                 + (f"; {status['purged_samples']} raw samples purged" if "purged_samples" in status else ""))
    return "\n".join(lines)
