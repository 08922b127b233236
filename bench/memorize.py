"""Q-MUL where the features hold the memory: the memorizing benchmark under a fair protocol (issue 14).

Setting ``memorize`` (default): the MLPerf Tiny ResNet-8 at half width (global pooling + one Linear head, 1.67%
of the weights) trained to ≥ 99.5% training accuracy on a 2,500-sample Fashion-MNIST subset (40 epochs, no
augmentation), so the forget set is memorized and the untouched model is far from retrain. Setting
``small-cnn`` re-runs the small CNN of bench/qmul_vs_retrain.py (54,000 training samples, head = its two
Linear layers, 95% of the weights) under the same protocol. Both quantize to int8 with the x86 preset and
keep a QAT copy, as the product does.

The protocol (the same for every method):
* Splits: train subset, a validation split held out of training (never trained on), the test split. Tuning
  and Auto's escalation read only train and validation; the reported figures read the test split.
* Retrain references: ``--refs`` retrains with different seeds per reported forget set. Avg Gap is measured to
  their mean; the noise floor is each reference's Avg Gap to the mean of the others (leave-one-out).
* Tuning: every (method, scope) gets the same budget, a grid of ``GRID_SIZE`` configurations, tried on tuning
  forget sets disjoint from the reported ones, scored by Avg Gap to that set's retrain with the validation
  split in place of the test split (VA for TA, validation samples as MIA non-members). Chosen: the smallest
  mean tuning Avg Gap among configurations that took ≤ 1/10 of retrain's time there, in process CPU time with
  one torch thread, and did not end farther from retrain than the untouched model (a collapse); failed runs
  never count (``tune`` says how the conditions relax when no configuration meets them).
* Reported: the chosen configuration on ``--sets`` forget sets x ``--seeds`` unlearning seeds, evaluated on
  the exported int8 ONNX model in onnxruntime. "A beats B" comes with a paired bootstrap interval of the
  mean Avg Gap difference, resampling forget sets (the seeds of one set share its references).
* Scenarios: 10% random forgetting, and forgetting one whole class (tuned on another class).

    python bench/memorize.py                         # ~90 min on 2 cores; bench/results/memorize.{md,json}
    python bench/memorize.py --setting small-cnn     # bench/results/memorize-small-cnn.{md,json}
    python bench/memorize.py --quick                 # a smoke run (minutes)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edge_qmul.export.stage import export_onnx
from edge_qmul.export.validate import ort_logits, ort_session

from edge_qmul import quant
from edge_qmul.config import Auto, MethodConfig, method_config
from edge_qmul.data import load_dataset, to_tensors
from edge_qmul.errors import UnlearningError
from edge_qmul.methods import UnlearnContext, unlearn
from edge_qmul.metrics import METRICS, EvalSets, avg_gap, evaluate_logits, logits_of
from edge_qmul.models import ModelConfig
from edge_qmul.train import TrainConfig, train_float

warnings.filterwarnings("ignore")

SETTINGS: dict[str, dict[str, Any]] = {
    # ResNet-8 at half width (19,810 weights; head 330 = 1.67%): 2,500 training samples x 40 epochs memorize
    # (>= 99.5% training accuracy) at a third of the full width's cost, so the protocol fits on 2 cores.
    "memorize": {"model": "resnet8", "width": 8, "train": 2500, "val": 1000, "test": 5000, "epochs": 40,
                 "lr": 0.05, "batch_size": 128, "weight_decay": 1e-4, "head": ""},
    # bench/qmul_vs_retrain.py's model and recipe (its 10% validation split included).
    "small-cnn": {"model": "small_cnn", "width": 16, "train": 54000, "val": 6000, "test": 10000, "epochs": 12,
                  "lr": 0.05, "batch_size": 128, "weight_decay": 5e-4, "head": "fc1"},
}
FORGET_CLASSES = {"tune": 3, "report": (0, 5, 8)}  # Dress for tuning; T-shirt/top, Sandal, Bag reported
GRID_SIZE = 4
RETAIN_RATIO = 3.0  # full-network forms: each epoch sees 3x |forget| random retain samples (cost ∝ request)

# (label, method, fixed fields, grid): every grid has GRID_SIZE points. Head forms train the classifier on the
# deployed int8 model's features; full forms train the scope on the QAT copy with a bounded retain sample.
# One learning-rate ladder per family, the same for every method of that family (no method gets a range of its
# own): retain-using methods over 1.5 decades at a fixed epoch count, ascent-style methods (forget set only)
# over their own smaller ladder.
HEAD_LR = tuple({"lr": lr, "epochs": 5} for lr in (0.03, 0.1, 0.3, 1.0))
# Full-network ladders start low: the memorized model was trained down to lr ~0 (cosine), and one epoch of plain
# fine-tuning at lr 0.01 already costs it 2.3 points of retain accuracy (random labels at 0.01: collapse).
FULL_LR = tuple({"lr": lr, "epochs": 3} for lr in (0.001, 0.003, 0.01, 0.03))
ASCENT_HEAD = tuple({"lr": lr, "epochs": 2} for lr in (0.003, 0.01, 0.03, 0.1))
ASCENT_FULL = tuple({"lr": lr, "epochs": 2} for lr in (1e-4, 3e-4, 1e-3, 3e-3))
HEAD = {"layers": "classifier"}
FULL = {"layers": "all", "retain_ratio": RETAIN_RATIO}
# Q-MUL's ḡ estimate is part of its cost (a forward + backward pass per estimated batch): beyond the head it
# reads at most 2 batches of 256 per side each epoch, about what one epoch's forget set and retain draw hold.
QMUL_WIDE = {"retain_ratio": RETAIN_RATIO, "norm_batches": 2}
CANDIDATES: list[tuple[str, str, dict[str, Any], tuple[dict[str, Any], ...]]] = [
    ("qmul classifier", "qmul", HEAD, HEAD_LR),
    ("qmul last-1-blocks", "qmul", {"layers": "last-1-blocks", **QMUL_WIDE}, FULL_LR),
    ("qmul all", "qmul", {"layers": "all", **QMUL_WIDE}, FULL_LR),
    ("finetune head", "finetune", HEAD, HEAD_LR),
    ("finetune all", "finetune", FULL, FULL_LR),
    ("random_label head", "random_label", HEAD, HEAD_LR),
    ("random_label all", "random_label", FULL, FULL_LR),
    ("salun head", "salun", HEAD, HEAD_LR),
    ("salun all", "salun", FULL, FULL_LR),
    ("scrub head", "scrub", HEAD, HEAD_LR),
    ("scrub all", "scrub", FULL, FULL_LR),
    ("l1_sparse head", "l1_sparse", HEAD, HEAD_LR),
    ("l1_sparse all", "l1_sparse", FULL, FULL_LR),
    ("grad_ascent head", "grad_ascent", HEAD, ASCENT_HEAD),
    ("grad_ascent all", "grad_ascent", {"layers": "all"}, ASCENT_FULL),
    ("famr head", "famr", HEAD, ASCENT_HEAD),
    ("famr all", "famr", {"layers": "all"}, ASCENT_FULL),
]


@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass
class Bench:
    setting: dict[str, Any]
    data: Data
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    cache: Path
    quiet: bool = True
    refs_file: Path | None = None  # the retrain references measured so far (``references``), kept with the results
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class Deployed:
    int8: torch.nn.Module
    qat: torch.nn.Module


def load_data(setting: dict[str, Any], seed: int = 2026) -> Data:
    src = load_dataset("fashion-mnist")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(src.train.labels))
    tr, va = perm[: setting["train"]], perm[setting["train"]: setting["train"] + setting["val"]]
    (tx, ty), (vx, vy) = to_tensors(src.train, tr), to_tensors(src.train, va)
    sx, sy = to_tensors(src.test, np.arange(min(setting["test"], len(src.test.labels))))
    return Data(tx, ty, vx, vy, sx, sy)


def make_bench(setting_name: str, cache: Path, quick: bool) -> Bench:
    setting = dict(SETTINGS[setting_name])
    if quick:
        setting.update(train=600, val=300, test=600, epochs=3)
    data = load_data(setting)
    mean, std = [float(data.train_x.mean())], [float(data.train_x.std())]  # of the training subset
    model_cfg = ModelConfig(setting["model"], 1, 28, 10, mean=tuple(mean), std=tuple(std), width=setting["width"],
                            head=setting["head"])
    train_cfg = TrainConfig(model=setting["model"], width=setting["width"], epochs=setting["epochs"], lr=setting["lr"],
                            batch_size=setting["batch_size"], weight_decay=setting["weight_decay"])
    return Bench(setting, data, model_cfg, train_cfg, cache)


# ---------------------------------------------------------------------------------------------------
# Models: the deployed one and retrain references (float weights cached on disk by forget set and seed)
# ---------------------------------------------------------------------------------------------------


def train_cached(b: Bench, key: str, keep: torch.Tensor, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Float model trained with the recipe at ``seed`` on the training samples ``keep`` (a bool mask)."""
    path = b.cache / f"{key}-seed{seed}.pt"
    cfg = replace(b.train_cfg, seed=seed)
    if path.exists():
        from edge_qmul.models import build_model

        saved = torch.load(path, weights_only=True)
        model = build_model(b.model_cfg)
        model.load_state_dict(saved["state"])
        return model.eval(), saved["log"]
    t0, c0 = time.perf_counter(), time.process_time()
    model, log = train_float(b.model_cfg, cfg, b.data.train_x[keep], b.data.train_y[keep], quiet=b.quiet)
    log = {"train_acc": log["epochs"][-1]["train_acc"], "seconds": time.perf_counter() - t0,
           "cpu_seconds": time.process_time() - c0}
    b.cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"state": model.state_dict(), "log": log}, tmp)
    os.replace(tmp, path)  # atomic: a second process (--prefetch) never reads half a file
    return model, log


def deploy(b: Bench, model: torch.nn.Module, keep: torch.Tensor) -> tuple[Deployed, float, float]:
    """int8 + QAT copy of a float model, calibrated on its own training samples; (…, wall s, cpu s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    calib = list(b.data.train_x[keep][:512].split(256))
    int8, qat = quant.int8_and_qat(model, calib, "x86")
    return Deployed(int8, qat), time.perf_counter() - t0, time.process_time() - c0


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


def eval_sets(b: Bench, forget: torch.Tensor, split: str) -> EvalSets:
    """FA / RA and TA (split="test") or VA in TA's place (split="val": tuning never reads the test split)."""
    d = b.data
    hx, hy = (d.test_x, d.test_y) if split == "test" else (d.val_x, d.val_y)
    return EvalSets(d.train_x[forget], d.train_y[forget], d.train_x[~forget], d.train_y[~forget], hx, hy)


def metrics_torch(model: torch.nn.Module, sets: EvalSets) -> dict[str, float]:
    f, r, t = (logits_of(model, x) for x in (sets.forget_x, sets.retain_x, sets.test_x))
    return evaluate_logits(f, r, t, sets)


def metrics_onnx(int8: torch.nn.Module, sets: EvalSets) -> dict[str, float]:
    """The same metrics from the exported int8 ONNX model in onnxruntime (export refuses float ops in int8)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(int8, Path(tmp) / "model.int8.onnx", (1, 28, 28))
        session = ort_session(path, threads=torch.get_num_threads())
        f, r, t = (ort_logits(session, x) for x in (sets.forget_x, sets.retain_x, sets.test_x))
    return evaluate_logits(f, r, t, sets)


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in METRICS}


# ---------------------------------------------------------------------------------------------------
# One forget set: references, then methods
# ---------------------------------------------------------------------------------------------------


@dataclass
class ForgetSet:
    name: str
    mask: torch.Tensor  # over the training subset
    refs: list[dict[str, Any]]  # per retrain reference: metrics, seconds


def references(b: Bench, name: str, mask: torch.Tensor, seeds: list[int], split: str) -> ForgetSet:
    """The retrain references of one forget set: each one's metrics (on the ONNX model for ``split="test"``),
    its training + quantization time and training accuracy. Each is recorded in ``b.refs_file`` (kept with the
    results) as soon as it is measured, so a run that stops, or the next session, never retrains it again."""
    sets = eval_sets(b, mask, split)
    refs = []
    for seed in seeds:
        key = f"{name}/seed{seed}/{split}"
        known = _read_refs(b).get(key)
        if known is None:
            model, log = train_cached(b, name, ~mask, seed)
            dep, q_wall, q_cpu = deploy(b, model, ~mask)
            m = metrics_onnx(dep.int8, sets) if split == "test" else metrics_torch(dep.int8, sets)
            known = {"seed": seed, **m, "seconds": log["seconds"] + q_wall,
                     "cpu_seconds": log["cpu_seconds"] + q_cpu, "train_acc": log["train_acc"]}
            _record_ref(b, key, known)
        refs.append(known)
    return ForgetSet(name, mask, refs)


def _read_refs(b: Bench) -> dict[str, Any]:
    if b.refs_file is None or not b.refs_file.exists():
        return {}
    return dict(json.loads(b.refs_file.read_text())["references"])


def _record_ref(b: Bench, key: str, ref: dict[str, Any]) -> None:
    """Add one reference to ``b.refs_file`` (read, merge, atomic replace, under an exclusive lock: the main run
    and ``--prefetch`` both write it)."""
    if b.refs_file is None:
        return
    import fcntl

    b.refs_file.parent.mkdir(parents=True, exist_ok=True)
    with open(b.refs_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc: dict[str, Any] = json.loads(b.refs_file.read_text()) if b.refs_file.exists() else {
            "about": "retrain references of bench/memorize.py, one per forget set x seed x split, as measured "
                     "(metrics, training + quantization seconds and CPU seconds); reused by later runs",
            "provenance": b.provenance, "references": {}}
        doc["references"][key] = ref
        tmp = b.refs_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp, b.refs_file)


def run_method(b: Bench, deployed: Deployed, fs: ForgetSet, cfg: MethodConfig, split: str) -> dict[str, Any]:
    d = b.data
    qat = copy.deepcopy(deployed.qat)
    ctx = UnlearnContext(
        qat=qat, forget_x=d.train_x[fs.mask], forget_y=d.train_y[fs.mask], retain_x=d.train_x[~fs.mask],
        retain_y=d.train_y[~fs.mask], num_classes=10, model_cfg=b.model_cfg, train_cfg=b.train_cfg, backend="x86",
        calib_size=512, val_x=d.val_x, val_y=d.val_y, head=b.model_cfg.head,
    )
    c0, t0 = time.process_time(), time.perf_counter()
    try:
        result = unlearn(ctx, cfg)
    except UnlearningError as err:  # e.g. a learning rate that collapses the model: a result, not a crash
        nan = float("nan")
        return {**{k: nan for k in METRICS}, "avg_gap": nan, "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0, "failed": err.message}
    cpu = time.process_time() - c0
    sets = eval_sets(b, fs.mask, split)
    m = metrics_onnx(result.int8, sets) if split == "test" else metrics_torch(result.int8, sets)
    ref = mean_metrics(fs.refs)
    row: dict[str, Any] = {**m, "avg_gap": avg_gap(m, ref), "seconds": float(result.log["seconds"]), "cpu_seconds": cpu}
    if "escalation" in result.log.get("qmul", {}):
        row["scope"] = result.log["qmul"]["scope"]
        row["escalation"] = result.log["qmul"]["escalation"]
    return row


def noise_floor(fs: ForgetSet) -> list[float]:
    """Each reference's Avg Gap to the mean of the other references."""
    if len(fs.refs) < 2:
        return []
    return [avg_gap(r, mean_metrics(fs.refs[:i] + fs.refs[i + 1:])) for i, r in enumerate(fs.refs)]


# ---------------------------------------------------------------------------------------------------
# Tuning and reporting
# ---------------------------------------------------------------------------------------------------


def config_of(method: str, fixed: dict[str, Any], point: dict[str, Any], seed: int) -> MethodConfig:
    return method_config(method, {**fixed, **point, "seed": seed})


def tune(b: Bench, deployed: Deployed, tuning: list[ForgetSet], candidates: list[Any], log: Any,
         untouched_gap: float = float("inf"), done: dict[str, Any] | None = None,
         progress: Any = None) -> dict[str, Any]:
    """Each candidate's grid on the tuning sets; the chosen point is the smallest mean tuning Avg Gap among the
    points that (1) did not fail, (2) ended no farther from retrain than the untouched model (``untouched_gap``:
    a point that does is a collapse, not a way of forgetting) and (3) fit the budget. Each condition is dropped,
    last first, when no point meets it."""
    # The budget is judged on process CPU time (one torch thread): unlike wall time it does not change with what
    # else the machine runs, so retrain (timed once, cached) and each method are measured alike.
    retrain_s = float(np.mean([r["cpu_seconds"] for fs in tuning for r in fs.refs]))
    chosen: dict[str, Any] = {}
    for label, method, fixed, grid in candidates:
        if done and label in done:  # --resume: this candidate's grid was run and chosen from before
            chosen[label] = done[label]
            continue
        trials = [tuning_trial(b, deployed, tuning, label, method, fixed, point, retrain_s, log) for point in grid]
        chosen[label] = {"method": method, "fixed": fixed, "point": select(trials, untouched_gap)["point"],
                         "trials": trials, "retrain_seconds": retrain_s}
        if progress is not None:
            progress(chosen)
    return chosen


def tuning_trial(b: Bench, deployed: Deployed, tuning: list[ForgetSet], label: str, method: str,
                 fixed: dict[str, Any], point: dict[str, Any], retrain_s: float, log: Any) -> dict[str, Any]:
    """One grid point on the tuning sets (validation split, seed 0): mean Avg Gap, seconds, CPU seconds."""
    rows = [run_method(b, deployed, fs, config_of(method, fixed, point, 0), "val") for fs in tuning]
    cpu = float(np.mean([r["cpu_seconds"] for r in rows]))
    trial: dict[str, Any] = {"point": point, "avg_gap": float(np.mean([r["avg_gap"] for r in rows])),
                             "seconds": float(np.mean([r["seconds"] for r in rows])), "cpu_seconds": cpu,
                             "per_set": [r["avg_gap"] for r in rows], "within_budget": cpu <= 0.1 * retrain_s}
    log(f"  tune {label} {point}: gap {trial['avg_gap']:.2f} in {trial['cpu_seconds']:.1f} s CPU")
    return trial


def select(trials: list[dict[str, Any]], untouched_gap: float) -> dict[str, Any]:
    """The selection rule of ``tune`` on one candidate's measured grid. Failed runs give NaN and are never
    chosen; if no configuration fits the budget, the closest one is chosen anyway and the table shows its
    time ratio."""
    finite = [t for t in trials if np.isfinite(t["avg_gap"])] or trials
    sane = [t for t in finite if t["avg_gap"] <= untouched_gap] or finite
    ok = [t for t in sane if t["within_budget"]] or sane
    return min(ok, key=lambda t: t["avg_gap"] if np.isfinite(t["avg_gap"]) else np.inf)


def bootstrap_diff(
    a: dict[str, list[float]], b: dict[str, list[float]], draws: int = 5000, seed: int = 0
) -> dict[str, float]:
    """Paired bootstrap of mean(A) - mean(B) over forget sets (each set: the mean over its seeds)."""
    keys = sorted(a)
    da = np.array([np.nanmean(a[k]) - np.nanmean(b[k]) for k in keys])
    da = da[np.isfinite(da)]  # a set where every run of one method failed has no paired difference
    rng = np.random.default_rng(seed)
    boots = da[rng.integers(0, len(da), (draws, len(da)))].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"diff": float(da.mean()), "low": float(lo), "high": float(hi)}


Masks = list[tuple[str, torch.Tensor]]


def forget_masks(b: Bench, kind: str, args: argparse.Namespace) -> tuple[Masks, Masks]:
    """(tuning, reported) forget sets: disjoint random 10% sets, or whole classes."""
    n = len(b.data.train_y)
    y = b.data.train_y
    if kind == "random":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
        size = n // 10
        masks = []
        for i in range(args.tune_sets + args.sets):  # disjoint 10% sets
            m = torch.zeros(n, dtype=torch.bool)
            m[perm[i * size:(i + 1) * size]] = True
            masks.append(m)
        return ([(f"random-t{i}", m) for i, m in enumerate(masks[: args.tune_sets])],
                [(f"random-r{i}", m) for i, m in enumerate(masks[args.tune_sets:])])
    tune = FORGET_CLASSES["tune"]
    return ([(f"class{tune}", y == tune)],
            [(f"class{c}", y == c) for c in FORGET_CLASSES["report"][: args.class_sets]])


def untouched_gap(b: Bench, deployed: Deployed, tuning: list[ForgetSet]) -> float:
    """The deployed model's mean Avg Gap on the tuning sets (validation split): past it, a point collapsed."""
    return float(np.mean([avg_gap(metrics_torch(deployed.int8, eval_sets(b, fs.mask, "val")),
                                  mean_metrics(fs.refs)) for fs in tuning]))


def stored_tuning(b: Bench, kind: str, sc: dict[str, Any], args: argparse.Namespace) -> list[ForgetSet]:
    """The tuning sets of a results file's scenario, with the references it measured on them."""
    tune_masks, _ = forget_masks(b, kind, args)
    return [ForgetSet(n, m, refs) for (n, m), refs in zip(tune_masks, sc["tuning_retrain"], strict=True)]


def wanted(args: argparse.Namespace, name: str) -> bool:
    """Is reported set ``name`` to be measured here (``--only-sets``: set names, or a whole scenario)?"""
    return not args.only_sets or any(name == s or s in ("random", "class") and name.startswith(s)
                                     for s in args.only_sets)


def prefetch(b: Bench, args: argparse.Namespace, log: Any) -> int:
    """Train (and cache) every retrain reference the scenarios need, in their order: a second process can do
    this while the first one tunes; each reference is timed in its own process either way (CPU time)."""
    for kind in args.scenarios.split(","):
        tune_masks, report_masks = forget_masks(b, kind, args)
        report_masks = [(n, m) for n, m in report_masks if wanted(args, n)]
        if not report_masks:  # --only-sets names none of this scenario's sets
            continue
        # the reported sets' first: the main run beside it trains the tuning references it needs first itself
        todo = [(n, m, s, "test") for n, m in report_masks for s in range(args.refs)]
        todo += [(n, m, s, "val") for n, m in tune_masks for s in range(args.tune_refs)]
        for name, mask, seed, split in todo:
            ref = references(b, name, mask, [seed], split).refs[0]
            log(f"  {name} seed {seed}: {ref['cpu_seconds']:.0f} s CPU")
    return 0


def scenario(
    b: Bench, deployed: Deployed, kind: str, args: argparse.Namespace, log: Any, save: Any = None
) -> dict[str, Any]:
    """Tune on the tuning sets, then per reported set: its references, every chosen method, a partial save."""
    tune_masks, report_masks = forget_masks(b, kind, args)
    prior = (getattr(args, "prior", None) or {}).get(kind) or {}  # --resume: what an earlier run finished
    candidates = [c for c in CANDIDATES if not args.methods or c[0] in args.methods]
    labels = [c[0] for c in candidates] + (["auto (escalating)"] if args.auto else [])
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    reported: list[ForgetSet] = []
    for name, mask in report_masks:  # reported sets the earlier run finished for every method are kept as measured
        if prior and all(len(prior["rows"].get(k, {}).get(name, [])) == n for k, n in
                         [("retrain", args.refs), ("none", 1), *[(k, args.seeds) for k in labels]]):
            for k in ("retrain", "none", *labels):
                rows.setdefault(k, {})[name] = prior["rows"][k][name]
            reported.append(ForgetSet(name, mask, prior["rows"]["retrain"][name]))
    log(f"[{kind}] retrain references for {len(tune_masks)} tuning + {len(report_masks)} reported sets"
        + (f" (resumed: {len(prior.get('chosen', {}))} candidates tuned, {len(reported)} sets done)" if prior else ""))
    tuning = [references(b, name, m, list(range(args.tune_refs)), "val") for name, m in tune_masks]
    untouched = untouched_gap(b, deployed, tuning)
    log(f"  untouched model on the tuning sets: gap {untouched:.2f}")

    def progress(chosen: dict[str, Any]) -> None:  # a partial save after every tuned candidate
        if save is not None and not reported:
            save({"chosen": chosen, "tuned": False, "rows": {}, "summary": {}, "sets": [],
                  "tuning_sets": [fs.name for fs in tuning], "tuning_retrain": [fs.refs for fs in tuning],
                  "candidates": len(candidates), "complete": False})

    chosen = tune(b, deployed, tuning, candidates, log, untouched_gap=untouched, done=prior.get("chosen"),
                  progress=progress)
    out = {"chosen": chosen, "tuned": True, "rows": rows, "summary": summarise(rows) if reported else {},
           "sets": [fs.name for fs in reported],
           "tuning_sets": [fs.name for fs in tuning], "tuning_retrain": [fs.refs for fs in tuning],
           "complete": len(reported) == len(report_masks)}  # what is returned when nothing is left to run here
    ran = False
    for name, mask in report_masks:
        if any(fs.name == name for fs in reported) or not wanted(args, name):
            continue
        ran = True
        fs = references(b, name, mask, list(range(args.refs)), "test")
        reported.append(fs)
        log(f"  {fs.name}: {len(fs.refs)} references, retrain {np.mean([r['seconds'] for r in fs.refs]):.0f} s")
        none = {**metrics_onnx(deployed.int8, eval_sets(b, fs.mask, "test")), "seconds": 0.0, "cpu_seconds": 0.0}
        none["avg_gap"] = avg_gap(none, mean_metrics(fs.refs))
        rows.setdefault("none", {})[fs.name] = [none]
        ref_mean = mean_metrics(fs.refs)
        rows.setdefault("retrain", {})[fs.name] = [
            {**r, "avg_gap": g, "avg_gap_to_mean_of_all": avg_gap(r, ref_mean)}
            for r, g in zip(fs.refs, noise_floor(fs), strict=True)
        ]
        for label, c in chosen.items():
            for seed in range(args.seeds):
                row = run_method(b, deployed, fs, config_of(c["method"], c["fixed"], c["point"], seed), "test")
                rows.setdefault(label, {}).setdefault(fs.name, []).append(row)
            g = np.mean([r["avg_gap"] for r in rows[label][fs.name]])
            log(f"  {fs.name} {label}: gap {g:.2f}")
        if args.auto:
            for seed in range(args.seeds):
                row = run_method(b, deployed, fs, Auto(seed=seed), "test")
                rows.setdefault("auto (escalating)", {}).setdefault(fs.name, []).append(row)
            log(f"  {fs.name} auto: scopes {[r.get('scope') for r in rows['auto (escalating)'][fs.name]]}")
        out = {"chosen": chosen, "tuned": True, "rows": rows, "summary": summarise(rows),
               "sets": [fs.name for fs in reported],
               "tuning_sets": [fs.name for fs in tuning], "tuning_retrain": [fs.refs for fs in tuning],
               "complete": len(reported) == len(report_masks)}
        if save is not None:
            save(out)
    if save is not None and not ran:
        save(out)  # nothing left to run (a merge of --only-sets runs): the merged result is written as it is
    return out


def summarise(rows: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    retrain_s = float(np.mean([r["seconds"] for rs in rows["retrain"].values() for r in rs]))
    retrain_cpu = float(np.mean([r["cpu_seconds"] for rs in rows["retrain"].values() for r in rs]))
    out: dict[str, Any] = {}
    for label, by_set in rows.items():
        flat = [r for rs in by_set.values() for r in rs]
        per_set = {k: [r["avg_gap"] for r in rs] for k, rs in by_set.items()}
        s: dict[str, Any] = {k: float(np.nanmean([r[k] for r in flat])) for k in (*METRICS, "avg_gap", "seconds")}
        s["failed"] = sum(1 for r in flat if r.get("failed"))
        set_means = [np.nanmean(v) for v in per_set.values()]
        s["avg_gap_sd"] = float(np.nanstd(set_means, ddof=1)) if len(per_set) > 1 else 0.0
        s["time_ratio"] = s["seconds"] / retrain_s
        s["cpu_ratio"] = float(np.mean([r["cpu_seconds"] for r in flat])) / retrain_cpu
        s["n"] = len(flat)
        out[label] = s
    best_qmul = min((k for k in out if k.startswith("qmul")), key=lambda k: out[k]["avg_gap"], default=None)
    gaps = {k: {s: [r["avg_gap"] for r in rs] for s, rs in v.items()} for k, v in rows.items()}
    if best_qmul:
        out["_best_qmul"] = best_qmul
        out["_paired"] = {k: bootstrap_diff(gaps[best_qmul], gaps[k]) for k in gaps
                          if k not in (best_qmul, "retrain")}
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def provenance(args: argparse.Namespace, b: Bench) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "edge_qmul", "export", "bench/memorize.py"],
                           capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    return {
        "commit": commit, "uncommitted_changes": bool(dirty),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "seeds": {"subset": 2026, "forget_sets": 7, "original_model": 0, "retrain_refs": list(range(args.refs)),
                  "unlearning": list(range(args.seeds))},
        "threads": torch.get_num_threads(), "cores": os.cpu_count(), "load_avg_1min_at_start": os.getloadavg()[0],
        "setting": b.setting, "argv": sys.argv[1:],
    }


def fmt_row(label: str, s: dict[str, Any]) -> str:
    failed = f" ({s['failed']} of {s['n']} runs failed)" if s.get("failed") else ""
    return (f"| {label}{failed} | {s['FA']:.2f} | {s['RA']:.2f} | {s['TA']:.2f} | {s['MIA']:.2f} | "
            f"**{s['avg_gap']:.2f}** ± {s['avg_gap_sd']:.2f} | {s['seconds']:.2f} | {s['time_ratio']:.3f} | "
            f"{s['cpu_ratio']:.3f} |")


def markdown(result: dict[str, Any]) -> str:
    prov, orig = result["provenance"], result["original"]
    lines = [
        f"# {result['title']}",
        "",
        f"Commit {prov['commit'][:12]}{' (+ uncommitted changes)' if prov['uncommitted_changes'] else ''}, "
        f"{prov['date']}; torch {prov['versions']['torch']}, onnxruntime {prov['versions']['onnxruntime']}, "
        f"{prov['threads']} torch threads on {prov['cores']} cores. Command: `python bench/memorize.py "
        f"{' '.join(prov['argv'])}`. Protocol: the module docstring of bench/memorize.py.",
        *([f"Resumed (`--resume`) from a run at commit {prov['resumed_from']['commit'][:12]}, "
           f"{prov['resumed_from']['date']}: its tuning and finished reported sets are kept as measured."]
          if prov.get("resumed_from") else []),
        *[refreshed_line(r) for r in prov.get("refreshed", [])],
        *([f"Merged from {len(prov['merged_from'])} runs measured side by side ("
           + "; ".join(f"{p['commit'][:12]} {p['date']} `{' '.join(p['argv'])}`" for p in prov["merged_from"])
           + ")."] if prov.get("merged_from") else []),
        "",
        f"Deployed model: {orig['model']} ({orig['params']:,} weights; head {orig['head_params']:,} = "
        f"{orig['head_share']:.2f}%), float training accuracy {orig['train_acc']:.2f}%, int8 test accuracy "
        f"{orig['int8_test_acc']:.2f}%. Training subset {orig['train']}, validation {orig['val']}, "
        f"test {orig['test']}.",
        "",
    ]
    for kind, sc in result["scenarios"].items():
        if not sc["sets"]:  # stopped while tuning: only the chosen configurations so far
            lines += [f"## {kind} (partial: tuning, {len(sc['chosen'])} of {sc.get('candidates', '?')} candidates "
                      "done; no reported set yet; `--resume` continues it)", ""]
            lines += tuning_table(sc) + [""]
            continue
        s = sc["summary"]
        floor = s["retrain"]["avg_gap"]
        lines += [
            f"## {kind}{'' if sc.get('complete', True) else ' (partial: the run is still going)'}: "
            f"{len(sc['sets'])} forget sets x {result['provenance']['seeds']['unlearning'][-1] + 1} seeds, "
            f"{len(sc['rows']['retrain'][sc['sets'][0]])} retrain references each",
            "",
            "Metrics on the int8 ONNX model in onnxruntime, means over sets and seeds; Avg Gap to the mean of the "
            "references (± sd over forget sets); `retrain` row = the noise floor (each reference to the mean of the "
            "others). Time ratios against retrain (float training + quantization): wall and process CPU time.",
            "",
            "| method | FA | RA | TA | MIA | Avg Gap | seconds | time / retrain | CPU / retrain |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label in sorted((k for k in s if not k.startswith("_")), key=lambda k: s[k]["avg_gap"]):
            lines.append(fmt_row(label, s[label]))
        best = s.get("_best_qmul")
        lines += ["", f"Noise floor (retrain vs retrain): {floor:.2f}; 1.5 x floor = {1.5 * floor:.2f}."]
        if best:
            b = s[best]
            lines.append(f"Best Q-MUL scope: **{best}**, Avg Gap {b['avg_gap']:.2f} "
                         f"({b['avg_gap'] / floor:.2f} x the floor) at {b['time_ratio']:.3f} of retrain's wall time.")
            lines += ["", f"Paired bootstrap (resampling forget sets) of Avg Gap({best}) − Avg Gap(other): "
                      "negative = Q-MUL closer to retrain.", "", "| other | difference | 95% interval | verdict |",
                      "|---|---|---|---|"]
            for other, d in sorted(s["_paired"].items(), key=lambda kv: kv[1]["diff"]):
                verdict = ("Q-MUL better" if d["high"] < 0 else "Q-MUL worse" if d["low"] > 0 else "not separated")
                lines.append(f"| {other} | {d['diff']:+.2f} | [{d['low']:+.2f}, {d['high']:+.2f}] | {verdict} |")
        lines += [""] + tuning_table(sc)
        for extra in sc.get("supplements", []):
            lines.append(f"Supplementary row (not chosen by the rule, same sets, seeds and references): `{extra}`.")
        if sc.get("supplement_tuning"):
            lines += ["", "Supplementary ladders (extra tuning budget beyond the equal one, chosen by the same rule "
                      "on the same tuning sets; not part of the comparison above):", ""]
            lines += tuning_table({**sc, "chosen": sc["supplement_tuning"]})[2:]
        auto = sc["rows"].get("auto (escalating)")
        if auto:
            scopes = [r.get("scope") for rs in auto.values() for r in rs]
            widest = [str(r["escalation"][-1]["scope"]) for rs in auto.values() for r in rs if r.get("escalation")]
            lines += ["", "Auto's escalation, scope whose result it kept: "
                      + ", ".join(f"{k}: {scopes.count(k)}" for k in sorted(set(map(str, scopes))))
                      + "; widest scope it tried: " + ", ".join(f"{k}: {widest.count(k)}" for k in sorted(set(widest)))]
        lines.append("")
    return "\n".join(lines)


def refreshed_line(r: dict[str, Any]) -> str:
    what = "; ".join(f"{d['scenario']}: {', '.join(d['rows']) or 'nothing'} measured again" for d in r["refreshed"])
    dirty = " (+ uncommitted changes)" if r["uncommitted_changes"] else ""
    return f"Refreshed (`--refresh`) at {r['commit'][:12]}{dirty}, {r['date']}: {what}; the rest as first measured."


def tuning_table(sc: dict[str, Any]) -> list[str]:
    """The chosen configuration of every tuned candidate, with its whole grid, and the budget."""
    lines = ["Chosen configurations (tuning: validation split, tuning sets "
             f"{', '.join(sc['tuning_sets'])}; {GRID_SIZE} configurations each):", "",
             "| method | chosen | tuning Avg Gap | tuning CPU s | grid (Avg Gap / CPU s; * = over budget) |",
             "|---|---|---|---|---|"]

    def cpu(t: dict[str, Any]) -> float:
        return float(t.get("cpu_seconds", t["seconds"]))

    for label, c in sc["chosen"].items():
        t = next(t for t in c["trials"] if t["point"] == c["point"])
        budget = 0.1 * c["retrain_seconds"]
        grid = "; ".join(f"{t['point']}: {t['avg_gap']:.2f} / {cpu(t):.1f}{'*' if cpu(t) > budget else ''}"
                         for t in c["trials"])
        before = (f" (re-selected by `--refresh`; first run: {c['point_before_refresh']})"
                  if "point_before_refresh" in c else "")
        lines.append(f"| {label} | {c['fixed'] | c['point']}{before} | {t['avg_gap']:.2f} | {cpu(t):.1f} | {grid} |")
    if sc["chosen"]:
        budget = 0.1 * next(iter(sc["chosen"].values()))["retrain_seconds"]
        lines += ["", f"Budget: 1/10 of retrain's CPU time on the tuning sets = {budget:.1f} s."]
    return lines


STUDY_VARIANTS: tuple[dict[str, Any], ...] = tuple(
    {"forget_target": ft, "norm_pooling": pool, "update_bn": bn}
    for ft in ("none", "val") for pool in ("sum", "l2") for bn in (False, True)
)


def recipe_study(b: Bench, deployed: Deployed, args: argparse.Namespace, result: dict[str, Any], stem: str,
                 log: Any) -> int:
    """Q-MUL's own recipe beyond lr: BatchNorm handling, gradient-norm pooling and stopping the forget pass
    once the forget set looks unseen on the validation split (``forget_target="val"``), for the scopes beyond
    the head, on the random tuning sets only (validation split in place of the test split). This is budget the
    baselines do not get, so the main table does not use it; it is reported separately."""
    n = len(b.data.train_y)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))  # the main run's tuning sets
    size = n // 10
    tuning = []
    for i in range(args.tune_sets):
        m = torch.zeros(n, dtype=torch.bool)
        m[perm[i * size:(i + 1) * size]] = True
        tuning.append(references(b, f"random-t{i}", m, list(range(args.tune_refs)), "val"))
    retrain_s = float(np.mean([r["seconds"] for fs in tuning for r in fs.refs]))
    rows = []
    for layers in ("last-1-blocks", "all"):
        for lr in (0.03, 0.1):
            for variant in STUDY_VARIANTS:
                cfg = method_config("qmul", {"layers": layers, "retain_ratio": RETAIN_RATIO, "epochs": 3, "lr": lr,
                                             **variant})
                runs = [run_method(b, deployed, fs, cfg, "val") for fs in tuning]
                row = {"layers": layers, "lr": lr, **variant, "avg_gap": float(np.mean([r["avg_gap"] for r in runs])),
                       "seconds": float(np.mean([r["seconds"] for r in runs])),
                       **{k: float(np.mean([r[k] for r in runs])) for k in METRICS}}
                rows.append(row)
                log(f"  study {layers} lr {lr} {variant}: gap {row['avg_gap']:.2f} in {row['seconds']:.1f} s")
    result["study"] = {"rows": rows, "retrain_seconds": retrain_s, "tuning_sets": [fs.name for fs in tuning]}
    lines = [f"# Q-MUL recipe study on the memorizing benchmark ({b.setting['model']}, tuning sets only)", "",
             f"Commit {result['provenance']['commit'][:12]}, {result['provenance']['date']}. Random 10% tuning sets "
             f"{', '.join(fs.name for fs in tuning)}; VA in TA's place, validation samples as MIA non-members. "
             f"Retrain {retrain_s:.0f} s. Extra budget that the baselines do not get: not used by the main table.",
             "", "| layers | lr | forget_target | norm_pooling | update_bn | FA | RA | VA | MIA | Avg Gap | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["avg_gap"]):
        lines.append(f"| {r['layers']} | {r['lr']} | {r['forget_target']} | {r['norm_pooling']} | {r['update_bn']} | "
                     f"{r['FA']:.2f} | {r['RA']:.2f} | {r['TA']:.2f} | {r['MIA']:.2f} | **{r['avg_gap']:.2f}** | "
                     f"{r['seconds']:.1f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}-study.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / f"{stem}-study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def refresh(b: Bench, deployed: Deployed, args: argparse.Namespace, stem: str, log: Any) -> int:
    """Bring a finished results file up to the current code without measuring anything else again: each
    candidate is re-selected from its stored tuning grid with the current rule (``select``; the untouched
    model's tuning gap is measured again on the stored tuning references), a candidate whose choice changes
    is run again on every reported set x seed, and so is ``auto (escalating)``. References, tuning and the
    other rows are kept as measured; the file records what was refreshed, at which commit."""
    path = args.out / f"{stem}.json"
    result = json.loads(path.read_text())
    check_same_deployed(path, result, args.original)
    done = []
    for label, sc in result["scenarios"].items():
        kind = "random" if label == "random 10%" else "class"
        untouched = untouched_gap(b, deployed, stored_tuning(b, kind, sc, args))
        redo: list[str] = []
        for cand, c in sc["chosen"].items():
            point = select(c["trials"], untouched)["point"]
            if point != c["point"]:
                log(f"  [{kind}] {cand}: re-selected {c['point']} -> {point}")
                c["point_before_refresh"], c["point"] = c["point"], point
                redo.append(cand)
        if "auto (escalating)" in sc["rows"]:
            redo.append("auto (escalating)")
        masks = dict(forget_masks(b, kind, args)[1])
        for name in sc["sets"]:
            fs = ForgetSet(name, masks[name], list(sc["rows"]["retrain"][name]))
            for cand in redo:
                rows = []
                for seed in range(args.seeds):
                    cfg = Auto(seed=seed) if cand == "auto (escalating)" else config_of(
                        sc["chosen"][cand]["method"], sc["chosen"][cand]["fixed"], sc["chosen"][cand]["point"], seed)
                    rows.append(run_method(b, deployed, fs, cfg, "test"))
                sc["rows"][cand][name] = rows
                log(f"  [{kind}] {name} {cand}: gap {np.nanmean([r['avg_gap'] for r in rows]):.2f}")
        sc["summary"] = summarise(sc["rows"])
        done.append({"scenario": label, "rows": sorted(redo), "untouched_tuning_gap": untouched})
    result["provenance"].setdefault("refreshed", []).append({**b.provenance, "refreshed": done})
    path.write_text(json.dumps(result, indent=1, default=str))
    (args.out / f"{stem}.md").write_text(markdown(result))
    log(f"refreshed {path}: {done}")
    return 0


def check_same_deployed(path: Path, prior: dict[str, Any], original: dict[str, Any]) -> None:
    same = {k: prior["original"][k] for k in ("model", "params", "train_acc", "int8_test_acc")}
    if same != {k: original[k] for k in same}:
        raise SystemExit(f"{path} was measured on another deployed model ({same}); it cannot be continued here: "
                         "run without --resume / --refresh")


def merge_prior(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Fold one resumed scenario into ``into``: the tuning of the first file that finished it, and each
    reported set's rows from the first file that has them (runs of --only-sets hold disjoint sets)."""
    if len(part.get("chosen", {})) > len(into.get("chosen", {})):
        into["chosen"] = part["chosen"]
    rows = into.setdefault("rows", {})
    for label, by_set in part.get("rows", {}).items():
        for name, rs in by_set.items():
            rows.setdefault(label, {}).setdefault(name, rs)


def supplement(b: Bench, deployed: Deployed, args: argparse.Namespace, stem: str, log: Any) -> int:
    """Add rows to a finished random-scenario result: ``--supplement 'LABEL=METHOD:JSON'`` runs that fixed
    configuration on the same reported sets, seeds and references (for a configuration the selection rule
    passed over, reported apart and labelled as such); with a JSON list of configurations it is a ladder of
    its own (extra tuning budget, said so in the table): each point is run on the tuning sets and chosen by
    the same rule (``select``) before the reported sets. The summary and the markdown are rebuilt."""
    path = args.out / f"{stem}.json"
    result = json.loads(path.read_text())
    check_same_deployed(path, result, args.original)
    sc = result["scenarios"]["random 10%"]
    _, report_masks = forget_masks(b, "random", args)
    for spec in args.supplement:
        label, rest = spec.split("=", 1)
        method, point = rest.split(":", 1)
        cfg_values = json.loads(point)
        if isinstance(cfg_values, list):  # a ladder: chosen on the tuning sets like every candidate
            tuning = stored_tuning(b, "random", sc, args)
            retrain_s = float(np.mean([r["cpu_seconds"] for fs in tuning for r in fs.refs]))
            trials = [tuning_trial(b, deployed, tuning, label, method, {}, p, retrain_s, log) for p in cfg_values]
            cfg_values = select(trials, untouched_gap(b, deployed, tuning))["point"]
            sc.setdefault("supplement_tuning", {})[label] = {"method": method, "fixed": {}, "point": cfg_values,
                                                             "trials": trials, "retrain_seconds": retrain_s}
            log(f"  {label}: chose {cfg_values} on the tuning sets")
        for name, mask in report_masks:
            fs = references(b, name, mask, list(range(args.refs)), "test")
            rows = [run_method(b, deployed, fs, method_config(method, {**cfg_values, "seed": seed}), "test")
                    for seed in range(args.seeds)]
            sc["rows"].setdefault(label, {})[name] = rows
            log(f"  {name} {label}: gap {np.nanmean([r['avg_gap'] for r in rows]):.2f}")
    sc["summary"] = summarise(sc["rows"])
    sc.setdefault("supplements", []).extend(args.supplement)
    path.write_text(json.dumps(result, indent=1, default=str))
    (args.out / f"{stem}.md").write_text(markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="memorize")
    parser.add_argument("--scenarios", default="random,class")
    parser.add_argument("--sets", type=int, default=5)
    parser.add_argument("--class-sets", type=int, default=3)
    parser.add_argument("--tune-sets", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--refs", type=int, default=3)
    parser.add_argument("--tune-refs", type=int, default=1)
    parser.add_argument("--methods", nargs="*", default=[], help="labels from CANDIDATES (default: all)")
    parser.add_argument("--no-auto", dest="auto", action="store_false")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-memorize"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--supplement", nargs="*", default=[], metavar="LABEL=METHOD:JSON",
                        help="add fixed-configuration rows to a finished random-scenario result")
    parser.add_argument("--prefetch", action="store_true",
                        help="only train and cache the retrain references (run it beside the main run)")
    parser.add_argument("--study", action="store_true",
                        help="Q-MUL's recipe study instead (extra budget, tuning sets only; see recipe_study)")
    parser.add_argument("--resume", type=Path, nargs="+", default=None, metavar="JSON",
                        help="continue a run that stopped: take its tuning and finished reported sets from its "
                        "results JSON (same setting and deployed model), run the rest; several files (runs of "
                        "--only-sets side by side) are merged, each set taken from the first file that finished it")
    parser.add_argument("--refresh", action="store_true",
                        help="bring the finished results file up to the current code: re-select every candidate "
                        "from its stored tuning grid with the current rule, run again the rows whose choice "
                        "changes and the auto row; everything else is kept as measured")
    parser.add_argument("--only-sets", nargs="+", default=[], metavar="SET",
                        help="measure only these reported sets (names as in the results, e.g. random-r1, or a "
                        "whole scenario: random, class) and skip "
                        "the scenarios that have none of them: two processes with disjoint sets and their own "
                        "--out use both cores; a last --resume of both files merges them")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: retrain and the methods are timed alike, and a busy 2-core machine "
                        "is not oversubscribed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.sets, args.class_sets, args.seeds, args.refs = 2, 1, 1, 2
    cache = args.cache / (args.setting + ("-quick" if args.quick else ""))
    b = make_bench(args.setting, cache, args.quick)
    b.quiet = not args.verbose
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.0f} s] {msg}", flush=True)

    everything = torch.ones(len(b.data.train_y), dtype=torch.bool)
    model, tlog = train_cached(b, "original", everything, 0)
    deployed, _, _ = deploy(b, model, everything)
    params = sum(p.numel() for p in model.parameters())
    _, head = quant.split_at_classifier(deployed.qat, b.model_cfg.head)
    head_params = sum(p.numel() for p in head.parameters())
    test_acc = float((logits_of(deployed.int8, b.data.test_x).argmax(1) == b.data.test_y).float().mean()) * 100
    original = {"model": f"{b.setting['model']} width {b.setting['width']}", "params": params,
                "head_params": head_params, "head_share": 100.0 * head_params / params, "train_acc": tlog["train_acc"],
                "int8_test_acc": test_acc, "train": len(b.data.train_y), "val": len(b.data.val_y),
                "test": len(b.data.test_y), "seconds": tlog["seconds"]}
    log(f"deployed: {original}")
    result: dict[str, Any] = {
        "title": ("Memorizing benchmark: ResNet-8 on a Fashion-MNIST subset" if args.setting == "memorize"
                  else "Fashion-MNIST small CNN under the memorizing benchmark's protocol"),
        "provenance": provenance(args, b), "original": original, "scenarios": {},
    }
    stem = "memorize" if args.setting == "memorize" else f"memorize-{args.setting}"
    stem += "" if args.scenarios == "random,class" else "-" + args.scenarios.replace(",", "-")
    stem += "-quick" if args.quick else ""
    b.refs_file, b.provenance = args.out / f"{stem}-refs.json", result["provenance"]
    if args.study:
        return recipe_study(b, deployed, args, result, stem, log)
    if args.prefetch:
        return prefetch(b, args, log)
    args.original = original
    if args.supplement:
        return supplement(b, deployed, args, stem, log)
    if args.refresh:
        return refresh(b, deployed, args, stem, log)
    if args.resume:
        args.prior = {}
        for path in args.resume:
            prior = json.loads(path.read_text())
            check_same_deployed(path, prior, original)
            result["provenance"].setdefault("resumed_from", prior["provenance"])
            if len(args.resume) > 1:
                result["provenance"].setdefault("merged_from", []).append(prior["provenance"])
            for label, part in prior["scenarios"].items():
                merge_prior(args.prior.setdefault("random" if label == "random 10%" else "class", {}), part)
    for kind in args.scenarios.split(","):
        if args.only_sets and not any(wanted(args, name) for name, _ in forget_masks(b, kind, args)[1]):
            continue
        label = "random 10%" if kind == "random" else "one class"

        def save(partial: dict[str, Any], label: str = label) -> None:
            result["scenarios"][label] = partial
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
            (args.out / f"{stem}.md").write_text(markdown(result))
            log(f"wrote {args.out / stem}.md ({len(partial['sets'])} reported sets of {label})")

        scenario(b, deployed, kind, args, log, save)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
