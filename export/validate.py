"""Validate the exported int8 model in onnxruntime, the runtime the boards use (ARCHITECTURE.md §5–§6).

Every number comes from onnxruntime outputs: parity with the torch int8 model, FA / RA / TA,
MIA-efficacy, a loss-threshold attack (AUC, TPR at 1% FPR, bootstrap interval), latency and peak
memory of the on-board runtime with the device profile's threads, and file size. The unlearned QAT
copy is measured too, to show whether quantizing it moved forgetting. Results go to
``validation.json`` and ``validation.md`` (with plots); the caller exits non-zero if a check fails.

When the forget set is whole classes, the model is judged on what should survive: ``ta_drop`` is the
test accuracy lost on the retained classes only (``TA_retained`` against ``TA_before_retained``; a
forgotten class's test accuracy is meant to fall), and the forgotten classes' FA is compared with the
retrained reference's (``class_fa_gap_to_retrain``).

The record holds everything a verdict is computed from (values, limits, the budgets table, the sample
counts that set a statistical check's noise), so ``recheck`` can recompute every verdict from it: a
bundle trusts no ``passed`` flag it did not compute.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edge_qmul.devices.profiles import DeviceProfile
from edge_qmul.devices.runtime import run_in_fresh_process, top1_agrees, top_classes
from edge_qmul.export.budgets import CHECKS, Budgets
from edge_qmul.export.onnx_export import INPUT, INT8_KERNELS, check_contract, check_fusion, require_file

from edge_qmul import __version__, pipeline
from edge_qmul.atomic import write_bytes, write_json, write_text
from edge_qmul.errors import ExportError
from edge_qmul.evidence import fa_minus_ta_power, loss_auc_power
from edge_qmul.metrics import (
    EvalSets,
    accuracy,
    evaluate_logits,
    logits_of,
    loss_attack,
    per_sample_loss,
    roc_points,
    true_label_confidence,
)
from edge_qmul.run import Run, ids_hash, sha256_file

PROBE_SIZE = 64
DEFAULT_SOURCE = "default budgets"  # Budgets.source of the shipped defaults (export/budgets.py)
# Quantization "moved forgetting" when FA or the attack AUC shifts by more than this between the QAT
# copy (what was unlearned) and the int8 model (what ships).
FA_SHIFT, AUC_SHIFT = 1.0, 0.02


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_logits(session: Any, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    outs = [session.run(None, {INPUT: b.numpy()})[0] for b in x.split(batch_size)]
    return torch.from_numpy(np.concatenate(outs)) if outs else torch.empty(0, 0)


def run_on_board_check(model: Path, probe: Path, threads: int, runs: int = 200) -> dict[str, Any]:
    """The on-board runtime in a fresh process: latency and peak RSS as a board would see them."""
    result, proc = run_in_fresh_process(["--model", str(model), "--probe", str(probe), "--threads", str(threads),
                                         "--runs", str(runs)])
    if result is None:
        raise ExportError(f"the on-board runtime failed on {model}: {proc.stderr.strip()}",
                          "run `python -m edge_qmul.devices.runtime --help` and check the model file")
    return result


@dataclass
class Report:
    """The outcome of a validation: every check with its value and limit, the metrics, the verdict, and the
    full record (what ``validation.json`` holds when a run is validated)."""

    checks: dict[str, dict[str, Any]]
    metrics: dict[str, Any]
    passed: bool
    record: dict[str, Any]


Validation = Report  # the name the run-directory stage has always returned


@dataclass
class _Logits:
    """Logits of the sets that plots and metrics share (forget, test; before unlearning; QAT copy)."""

    f: torch.Tensor
    t: torch.Tensor
    before_f: torch.Tensor | None
    before_t: torch.Tensor | None
    qat_f: torch.Tensor | None
    qat_t: torch.Tensor | None


def validate(
    onnx_path: str | Path,
    sets: EvalSets,
    *,
    profile: DeviceProfile,
    budgets: Budgets,
    int8: Any = None,
    before: Any = None,
    qat: Any = None,
    retrain_mia: float | None = None,
    probe_path: Path | None = None,
    forgotten_classes: set[int] | None = None,
    retrain_fa: float | None = None,
) -> Report:
    """Check an int8 ONNX model in onnxruntime against ``budgets`` on the forget / retain / test ``sets``.

    Optional references make more checks possible: ``int8`` (the torch int8 model the ONNX was exported from:
    parity), ``before`` (the deployed model before unlearning: TA drop), ``qat`` (the unlearned QAT copy: did
    quantization move forgetting), ``retrain_mia`` / ``retrain_fa`` (MIA-efficacy / forget accuracy of a
    retrained model). ``forgotten_classes``: the forget set is every training sample of these classes, so
    ``ta_drop`` counts only the test samples of the other classes and the forgotten classes' FA is compared
    with ``retrain_fa``. A check whose value cannot be computed is reported as skipped. Latency and peak
    memory come from the on-board runtime in a fresh process on a probe set (written to ``probe_path``, or a
    temporary file).
    """
    report, _ = _validate(Path(onnx_path), sets, profile, budgets, int8, before, qat,
                          _Reference(retrain_mia, retrain_fa), probe_path, forgotten_classes)
    return report


@dataclass(frozen=True)
class _Reference:
    """What the retrained reference scored on the same sets (None: the run has no retrain)."""

    mia: float | None = None
    fa: float | None = None


def _validate(
    model_path: Path, sets: EvalSets, profile: DeviceProfile, budgets: Budgets, int8: Any, before: Any, qat: Any,
    reference: _Reference, probe_path: Path | None, forgotten_classes: set[int] | None,
) -> tuple[Report, _Logits]:
    require_file(model_path, "export the model first (`edge-qmul export`, or eq.export_onnx)")
    c, h, w = (int(d) for d in sets.test_x.shape[1:])
    check_contract(model_path, (c, h, w))
    kernels = check_fusion(model_path)  # a float op inside the int8 region is refused (exit 8), whatever the budgets
    session = ort_session(model_path, profile.threads)
    f, r, t = (ort_logits(session, x) for x in (sets.forget_x, sets.retain_x, sets.test_x))
    with torch.no_grad():
        t_torch = logits_of(int8, sets.test_x) if int8 is not None else None
        before_t = logits_of(before, sets.test_x) if before is not None else None
        before_f = logits_of(before, sets.forget_x) if before is not None else None
        qat_f = qat_t = None
        if qat is not None:
            qat.eval()
            qat_f, qat_t = logits_of(qat, sets.forget_x), logits_of(qat, sets.test_x)
    core = evaluate_logits(f, r, t, sets)
    classes = sorted(int(c) for c in forgotten_classes) if forgotten_classes else None
    # the test samples of the classes that should survive a class request
    kept = ~torch.isin(sets.test_y, torch.tensor(classes)) if classes else None
    attack = loss_attack(per_sample_loss(f, sets.forget_y), per_sample_loss(t, sets.test_y))

    with tempfile.TemporaryDirectory() as tmp:
        probe = probe_path or Path(tmp) / "probe-set.npz"
        _write_probe(probe, sets.test_x[:PROBE_SIZE], t[:PROBE_SIZE])
        board = run_on_board_check(model_path, probe, profile.threads)
        probe_sha = sha256_file(probe)

    metrics: dict[str, Any] = {
        **core,
        "loss_auc": attack["auc"],
        "loss_auc_interval": [attack["auc_low"], attack["auc_high"]],
        "tpr_at_1fpr": attack["tpr_at_1fpr"],
        "parity_top1": None if t_torch is None else 100.0 * float(top1_agrees(t.numpy(), t_torch.numpy()).mean()),
        "parity_ties": None if t_torch is None else int((top_classes(t_torch.numpy()).sum(axis=1) > 1).sum()),
        "max_logit_diff": None if t_torch is None else float((t - t_torch).abs().max()),
        "latency_ms_p50": board["latency_ms_p50"],
        "latency_ms_p95": board["latency_ms_p95"],
        "peak_memory_mb": board["peak_rss_mb"],
        "size_bytes": model_path.stat().st_size,
        "int8_kernels": sum(n for op, n in kernels.items() if op in INT8_KERNELS),
        "TA_before": None if before_t is None else accuracy(before_t, sets.test_y),
        "FA_before": None if before_f is None else accuracy(before_f, sets.forget_y),
        "MIA_retrain": reference.mia,
        "FA_retrain": reference.fa,
        "forgotten_classes": classes,
        "TA_retained": None if kept is None or not bool(kept.any()) else accuracy(t[kept], sets.test_y[kept]),
        "TA_before_retained": None if kept is None or before_t is None or not bool(kept.any())
        else accuracy(before_t[kept], sets.test_y[kept]),
        "forget_samples": len(sets.forget_y),  # the sample counts that set the statistical checks' noise
        "test_samples": len(sets.test_y),
    }
    metrics.update(derived_metrics(metrics))
    if qat_f is not None and qat_t is not None:
        qat_attack = loss_attack(per_sample_loss(qat_f, sets.forget_y), per_sample_loss(qat_t, sets.test_y),
                                 bootstrap=0)
        qat_fa = accuracy(qat_f, sets.forget_y)
        metrics["qat"] = {"FA": qat_fa, "loss_auc": qat_attack["auc"]}
        fa_shift, auc_shift = core["FA"] - qat_fa, attack["auc"] - qat_attack["auc"]
        metrics["quantization_shift"] = {
            "FA": fa_shift,
            "loss_auc": auc_shift,
            "moved_forgetting": abs(fa_shift) > FA_SHIFT or abs(auc_shift) > AUC_SHIFT,
        }
    checks = _judge(metrics, profile, budgets)
    passed = all(c["passed"] for c in checks.values())
    record = {
        "toolkit_version": __version__,
        "model": str(model_path.name),
        "model_sha256": sha256_file(model_path),
        "probe_sha256": probe_sha,
        "device": profile.name,
        "threads": profile.threads,
        "budgets": budgets.source,
        # the budgets file and its full merged table: a bundle reloads the file and refuses if a limit changed
        "budgets_file": budgets_file(budgets),
        "budgets_limits": dict(budgets.limits),
        "confidence": budgets.confidence,
        "passed": passed,
        "inconclusive": [n for n, c in checks.items() if "inconclusive" in c],
        "checks": checks,
        "metrics": metrics,
        "on_board": board,
    }
    return Report(checks, metrics, passed, record), _Logits(f, t, before_f, before_t, qat_f, qat_t)


_SKIPPED = {"mia_gap_to_retrain": "no retrained reference", "parity_top1": "no torch int8 model to compare with",
            "max_logit_diff": "no torch int8 model to compare with", "ta_drop": "no model from before unlearning",
            "class_fa_gap_to_retrain": "no retrained reference"}


def derived_metrics(m: dict[str, Any]) -> dict[str, float | None]:
    """The checks' values computed from the measured metrics (validation writes them; ``recheck`` recomputes
    them from the record). A class request's ``ta_drop`` counts the retained classes only."""
    by_class = bool(m.get("forgotten_classes"))
    ta_before, ta = (m["TA_before_retained"], m["TA_retained"]) if by_class else (m["TA_before"], m["TA"])
    return {
        "ta_drop": None if ta_before is None or ta is None else ta_before - ta,
        "fa_minus_ta": m["FA"] - m["TA"],
        "mia_gap_to_retrain": None if m["MIA_retrain"] is None else abs(m["MIA"] - m["MIA_retrain"]),
        "class_fa_gap_to_retrain": None if not by_class or m.get("FA_retrain") is None
        else abs(m["FA"] - m["FA_retrain"]),
    }


def _skip_reason(name: str, metrics: dict[str, Any]) -> str:
    if name == "class_fa_gap_to_retrain" and not metrics.get("forgotten_classes"):
        return "the forget set is not whole classes"
    return _SKIPPED.get(name, "not measured")


def _judge(metrics: dict[str, Any], profile: DeviceProfile, budgets: Budgets) -> dict[str, Any]:
    """Every budgeted check's verdict from the metrics (and, for the statistical checks, the sample counts
    ``forget_samples`` / ``test_samples`` recorded with them)."""
    profile_limits = {"latency_ms_p95": profile.latency_budget_ms, "peak_memory_mb": profile.memory_budget_mb}
    checks: dict[str, dict[str, Any]] = {}
    for name, check in CHECKS.items():
        if name not in budgets.limits:
            continue
        value, limit = metrics[name], budgets.limit(name, profile_limits)
        if value is None:
            checks[name] = {"value": None, "limit": limit, "passed": True, "skipped": _skip_reason(name, metrics)}
            continue
        ok = value >= limit if check.direction == "min" else value <= limit
        checks[name] = {"value": float(value), "limit": limit, "passed": bool(ok)}
        if check.statistical:
            n_f, n_t = int(metrics["forget_samples"]), int(metrics["test_samples"])
            if name == "fa_minus_ta":
                power = fa_minus_ta_power(n_f, n_t, metrics["TA"] / 100.0, limit=limit, confidence=budgets.confidence,
                                          value=float(value))
            else:
                power = loss_auc_power(n_f, n_t, limit=limit, confidence=budgets.confidence, value=float(value))
            checks[name].update(power)
            if "inconclusive" in power:
                checks[name]["passed"] = True  # its verdict would be noise at this size: reported, not blocking
    return checks


def budgets_file(budgets: Budgets) -> str | None:
    """The absolute path of the budgets file that overrode the defaults (None: the shipped defaults)."""
    return None if budgets.source == DEFAULT_SOURCE else str(Path(budgets.source).resolve())


def recheck(record: dict[str, Any], model_path: Path, profile: DeviceProfile, budgets: Budgets
            ) -> tuple[dict[str, Any], list[str]]:
    """Recompute every verdict of a validation record from its recorded values with ``budgets`` and
    ``profile``; returns the recomputed checks and what disagrees with the record (empty: it is consistent).

    What is recomputed: each check's value from the recorded metrics (derived ones such as ``ta_drop`` from
    their parts), its limit from ``budgets`` (whose table must equal the recorded one), its verdict from the
    check's direction, a statistical check's noise and inconclusive verdict from the recorded sample counts,
    the overall verdict, and the model's file size. What cannot be: the measured metrics themselves (FA, TA,
    latency, ...), which only a new validation measures again."""
    problems: list[str] = []
    m, checks = record.get("metrics"), record.get("checks")
    if not isinstance(m, dict) or not isinstance(checks, dict):
        return {}, ["it has no metrics or checks"]
    if record.get("budgets_limits") != dict(budgets.limits) or record.get("confidence") != budgets.confidence:
        recorded = record.get("budgets_limits")
        if not isinstance(recorded, dict):
            return {}, ["it records no budgets table (validated by an older toolkit)"]
        changed = sorted(k for k in set(recorded) | set(budgets.limits) if recorded.get(k) != budgets.limits.get(k))
        changed_text = ", ".join(f"{k} {recorded.get(k, 'absent')} -> {budgets.limits.get(k, 'absent')}"
                                 for k in changed)
        if record.get("confidence") != budgets.confidence:
            changed_text += f"{', ' if changed_text else ''}confidence {record.get('confidence')} -> "
            changed_text += f"{budgets.confidence}"
        return {}, [f"the budgets changed since validation ({changed_text})"]
    try:
        derived = derived_metrics(m)
        for name, value in derived.items():
            if not _same(m.get(name), value):
                problems.append(f"metric {name} is {m.get(name)!r} but its parts give {value!r}")
        expected = _judge({**m, **derived}, profile, budgets)
    except (KeyError, TypeError, ValueError) as err:
        return {}, [f"its metrics are incomplete or not numbers ({err.__class__.__name__}: {err})"]
    size = model_path.stat().st_size
    if m.get("size_bytes") != size:
        problems.append(f"it measured a {m.get('size_bytes')}-byte model, {model_path.name} has {size} bytes")
    for name in sorted(set(checks) - set(expected)):
        problems.append(f"check {name} is not in the budgets")
    for name, want in expected.items():
        got = checks.get(name)
        if not isinstance(got, dict):
            problems.append(f"check {name} is missing")
            continue
        for field in ("value", "limit", "noise"):
            if not _same(got.get(field), want.get(field)):
                problems.append(f"check {name} records {field} {got.get(field)!r}, recomputed {want.get(field)!r}")
        if got.get("passed") is not want["passed"]:
            problems.append(f"check {name} records passed={got.get('passed')!r}, its value and limit give "
                            f"{want['passed']}")
        if ("inconclusive" in got) != ("inconclusive" in want) or ("skipped" in got) != ("skipped" in want):
            state = "inconclusive" if "inconclusive" in got else "skipped" if "skipped" in got else "judged"
            problems.append(f"check {name} is recorded as {state} but is not")
    overall = all(c["passed"] for c in expected.values())
    if record.get("passed") is not overall:
        problems.append(f"it records passed={record.get('passed')!r}, its checks give {overall}")
    return expected, problems


def _same(a: Any, b: Any) -> bool:
    """Equal, with float rounding allowed (a JSON round trip is exact; arithmetic order may not be)."""
    if a is None or b is None:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int | float) or not isinstance(b, int | float):
        return bool(a == b)
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def validate_run(
    run_dir: Run | Path, profile: DeviceProfile, budgets: Budgets, *, method: str | None = None
) -> Report:
    """Validate a run's exported int8 model against its data, its deployed model and its retrain reference;
    writes the validation record, its markdown report with plots, and the probe set for bundles."""
    run = pipeline.as_run(run_dir)
    model_path = require_file(run.path("int8_onnx"), run.fix("int8_onnx"))
    q = pipeline.load_quantized(run)
    c, h, w = q.model_cfg.in_channels, q.model_cfg.image_size, q.model_cfg.image_size
    proto = check_contract(model_path, (c, h, w), q.model_cfg.num_classes)
    meta = {p.key: p.value for p in proto.metadata_props}
    method = method or meta.get("method") or pipeline.latest_method(run)
    rd = pipeline.load_run_data(run)
    sets = rd.eval_sets()
    result = pipeline.load_result_full(run, method, q, rd.split.forget)
    report, lg = _validate(model_path, sets, profile, budgets, result.int8, q.int8, result.qat(q),
                           _retrain_reference(run, q, rd.split.forget, sets), run.path("probe"),
                           forgotten_classes(run, rd))
    record = {**report.record, "forget_hash": ids_hash(rd.split.forget), "method": method}
    plots = _plots(run, lg, sets, report.metrics, q.model_cfg.num_classes)
    write_json(run.path("validation"), record)
    write_text(run.path("validation_md"), _markdown(record, plots))
    return Report(report.checks, report.metrics, report.passed, record)


def forgotten_classes(run: Run, rd: pipeline.RunData) -> set[int] | None:
    """The classes a run forgets whole (None: the forget set is not whole classes).

    The ledger's requests of kind "class" must cover every forgotten sample, and each of their classes must
    be forgotten whole: every training sample of it is in the forget set (a federated device's class request
    covers only its own share of a class, which the model should still know)."""
    forget = set(rd.split.forget)
    if not forget or not run.exists("ledger"):
        return None
    with run.ledger() as ledger:
        requests = [r for r in ledger.requests() if r.kind == "class"]
    classes = {c for r in requests if isinstance(c := r.spec.get("class"), int)}
    if not classes or not forget <= {i for r in requests for i in r.sample_ids}:
        return None
    labels = rd.source.train.labels
    whole = all(i in forget for i in rd.split.train if int(labels[i]) in classes)
    return classes if whole else None


def _retrain_reference(run: Run, q: pipeline.Quantized, forget_ids: list[int], sets: EvalSets) -> _Reference:
    if not run.exists("result", method=pipeline.REFERENCE):
        return _Reference()
    ref = pipeline.load_result_full(run, pipeline.REFERENCE, q, forget_ids)
    with torch.no_grad():
        f, r, t = (logits_of(ref.int8, x) for x in (sets.forget_x, sets.retain_x, sets.test_x))
    scores = evaluate_logits(f, r, t, sets)
    return _Reference(scores["MIA"], scores["FA"])


def _write_probe(path: Path, pixels: torch.Tensor, logits: torch.Tensor) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, pixels=pixels.numpy().astype(np.float32), reference_logits=logits.numpy().astype(np.float32))
    write_bytes(path, buf.getvalue())


def check_mark(c: dict[str, Any]) -> str:
    """✓ passed, ✗ failed, ? could not fail at this sample size (does not block)."""
    return "?" if "inconclusive" in c else "✓" if c["passed"] else "✗"


def check_value_text(c: dict[str, Any]) -> str:
    if c["value"] is None:
        return "skipped"
    return f"{c['value']:.4g}" + (f" ±{c['noise']:.2g}" if "noise" in c else "")


def _plots(run: Run, lg: _Logits, sets: EvalSets, metrics: dict[str, Any], num_classes: int) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert lg.before_f is not None and lg.before_t is not None and lg.qat_f is not None and lg.qat_t is not None
    f, t, before_f, before_t, qat_f, qat_t = lg.f, lg.t, lg.before_f, lg.before_t, lg.qat_f, lg.qat_t
    files = {k: run.path("validation_plot", method=k).name for k in ("roc", "per_class", "conf")}

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (fl, tl) in {"int8 (onnxruntime)": (f, t), "QAT copy (torch)": (qat_f, qat_t)}.items():
        fpr, tpr = roc_points(per_sample_loss(fl, sets.forget_y), per_sample_loss(tl, sets.test_y))
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set(xlabel="false positive rate (test)", ylabel="true positive rate (forget)",
           title=f"loss attack, forget vs test: AUC {metrics['loss_auc']:.3f}")
    ax.legend(loc="lower right")
    _save(fig, run.root / files["roc"])

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    classes = np.arange(num_classes)
    for ax, (title, y, b, a) in zip(
        axes, (("forget set", sets.forget_y, before_f, f), ("test set", sets.test_y, before_t, t)), strict=True
    ):
        acc_b = [_class_accuracy(b, y, int(c)) for c in classes]
        acc_a = [_class_accuracy(a, y, int(c)) for c in classes]
        ax.bar(classes - 0.2, acc_b, width=0.4, label="before unlearning")
        ax.bar(classes + 0.2, acc_a, width=0.4, label="after (int8, onnxruntime)")
        ax.set(title=f"per-class accuracy, {title}", xlabel="class", xticks=classes)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(loc="lower left")
    _save(fig, run.root / files["per_class"])

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = [i / 40 for i in range(41)]
    ax.hist(true_label_confidence(f, sets.forget_y).ravel(), bins=bins, alpha=0.6, density=True, label="forget")
    ax.hist(true_label_confidence(t, sets.test_y).ravel(), bins=bins, alpha=0.6, density=True, label="test")
    ax.set(xlabel="confidence in the true label", ylabel="density", title="int8 model: forget vs test")
    ax.set_yscale("log")
    ax.legend()
    _save(fig, run.root / files["conf"])
    return files


def _class_accuracy(logits: torch.Tensor, y: torch.Tensor, c: int) -> float:
    mask = y == c
    return 100.0 * float((logits.argmax(1)[mask] == c).float().mean()) if bool(mask.any()) else 0.0


def _save(fig: Any, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def _markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    m = report["metrics"]
    lines = [
        f"# Validation: {report['model']} against the {report['device']} profile",
        "",
        f"- model sha256 `{report['model_sha256']}`, method `{report['method']}`, "
        f"{report['threads']} thread(s), budgets: {report['budgets']}",
        f"- latency and peak memory measured on this host ({report['on_board'].get('machine', 'unknown')}), "
        f"not on a {report['device']} board: judged against the {report['device']} profile's budgets",
        f"- result: **{'PASS' if report['passed'] else 'FAIL'}**",
        "",
        "| check | value | limit | |",
        "|---|---|---|---|",
    ]
    for name, c in report["checks"].items():
        op = "≥" if CHECKS[name].direction == "min" else "≤"
        lines.append(f"| {name} | {check_value_text(c)} | {op} {c['limit']:.4g} | {check_mark(c)} |")
    statistical = [n for n in report["checks"] if CHECKS[n].statistical]
    if statistical:
        lines += [
            "",
            f"{' and '.join(statistical)} are estimated from the forget set. ± is the sampling noise of a "
            f"perfectly forgotten set of this size (one-sided {report['confidence']:.0%}); when the limit is "
            "closer to the ideal value (0 points; AUC 0.5) than that, the check is inconclusive (?) and does "
            "not block: its verdict would be noise.",
        ]
    lines += [f"- **{n} inconclusive**: {report['checks'][n]['inconclusive']}." for n in report["inconclusive"]]
    shift = m["quantization_shift"]
    lines += [
        "",
        "| metric | int8 (onnxruntime) | before unlearning | QAT copy |",
        "|---|---|---|---|",
        f"| FA | {m['FA']:.2f} | {m['FA_before']:.2f} | {m['qat']['FA']:.2f} |",
        f"| TA | {m['TA']:.2f} | {m['TA_before']:.2f} | |",
        *([f"| TA, retained classes | {m['TA_retained']:.2f} | {m['TA_before_retained']:.2f} | |"]
          if m.get("TA_retained") is not None and m.get("TA_before_retained") is not None else []),
        f"| RA | {m['RA']:.2f} | | |",
        f"| MIA-efficacy | {m['MIA']:.2f} | | |",
        f"| loss-attack AUC | {m['loss_auc']:.3f} [{m['loss_auc_interval'][0]:.3f}, {m['loss_auc_interval'][1]:.3f}]"
        f" | | {m['qat']['loss_auc']:.3f} |",
        f"| TPR at 1% FPR | {m['tpr_at_1fpr']:.3f} | | |",
        "",
        f"Latency p50 / p95: {m['latency_ms_p50']:.3f} / {m['latency_ms_p95']:.3f} ms; peak RSS "
        f"{m['peak_memory_mb']:.1f} MB; file {m['size_bytes']} bytes.",
        "",
        "Quantization "
        + ("**moved forgetting**" if shift["moved_forgetting"] else "did not move forgetting")
        + f": int8 − QAT copy FA {shift['FA']:+.2f} points, loss-attack AUC {shift['loss_auc']:+.3f} "
        f"(thresholds {FA_SHIFT} points / {AUC_SHIFT}).",
        "",
        f"![loss attack ROC]({plots['roc']})",
        "",
        f"![per-class accuracy]({plots['per_class']})",
        "",
        f"![confidence histograms]({plots['conf']})",
        "",
    ]
    return "\n".join(lines)
