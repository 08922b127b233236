"""A Q-MUL-paper-style table on Fashion-MNIST, measured on the int8 ONNX models in onnxruntime.

For each seed: train the small CNN with the default recipe (seed = data split, initialisation, batches),
quantize (x86); then for each scenario — 10% random forgetting and forgetting one whole class — file the
request and run every method with its recommended settings (its config class's defaults, edge_qmul.config; none
of them was tuned on these forget sets: Q-MUL's came from bench/qmul_vs_retrain.py's tuning sets of seed 0). Each
result is exported to int8 ONNX (`edge-qmul export`) and FA / RA / TA / MIA-efficacy come from
onnxruntime's logits; Avg Gap is against retrain's ONNX figures of the same seed and scenario; seconds is
the method's wall time. The table reports mean ± std over the seeds.

Ablations (seed 0, random 10%): Q-MUL's similar labels versus random wrong labels, with versus without
adaptive reweighting, and the number of retain batches used for ḡ_r.

    python bench/table.py                       # ~30 min on 2 cores; writes bench/results/table.{md,json,png}
    python bench/table.py --seeds 0 --quick     # one seed, a smoke run
    python bench/table.py --dataset cifar10 --data-root DIR   # your CIFAR-10 python batches; CIFAR ResNet-8;
                                                # writes bench/results/table-cifar10.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edge_qmul.export.stage import export_onnx, export_run
from edge_qmul.export.validate import ort_logits, ort_session

from edge_qmul import pipeline
from edge_qmul.config import DataConfig, QuantConfig, method_config
from edge_qmul.metrics import avg_gap, evaluate_logits
from edge_qmul.train import TrainConfig

METHODS = ("retrain", "finetune", "random_label", "grad_ascent", "famr", "qmul", "auto")
RANDOM, CLASS = "random 10%", "class 0"
CLASS_NAMES = {"fashion-mnist": "T-shirt/top", "mnist": "digit 0", "cifar10": "airplane", "cifar100": "apple"}
DEFAULT_MODEL = {"cifar10": "resnet8", "cifar100": "resnet8"}  # CPU-sized CIFAR ResNet; small CNN otherwise
ABLATIONS: dict[str, dict[str, Any]] = {
    "qmul (similar labels, reweighting, ḡ_r on 16 batches)": {},
    "random wrong labels instead of similar": {"label_variant": "random"},
    "no reweighting (w_f = w_r = 1)": {"reweight": False},
    "ḡ_r on 4 retain batches": {"norm_batches": 4},
    "ḡ_r on every retain batch": {"norm_batches": 0},
}
BASE_FILES = ("split.json", "run.json", "float.pt", "quantized.pt", "features.pt", "digests.json")


def onnx_metrics(run: Path, method: str | None) -> dict[str, float]:
    """FA / RA / TA / MIA from onnxruntime: the exported result of ``method`` (None: the untouched model)."""
    rd = pipeline.load_run_data(run)
    rd.split.forget = pipeline.ledger_forget_ids(run)
    sets = rd.eval_sets()
    if method is None:
        q = pipeline.load_quantized(run)
        out = run / "none-onnx"
        cfg = q.model_cfg
        path = export_onnx(q.int8, out / "model.int8.onnx", (cfg.in_channels, cfg.image_size, cfg.image_size),
                           metadata={"method": "none"})
    else:
        path = export_run(run, method).int8_path
    session = ort_session(path, threads=2)
    f, r, t = (ort_logits(session, x) for x in (sets.forget_x, sets.retain_x, sets.test_x))
    return evaluate_logits(f, r, t, sets)


def scenario_run(base: Path, dst: Path, request: dict[str, Any], seed: int) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in BASE_FILES:
        shutil.copy2(base / name, dst / name)
    pipeline.forget(dst, seed=seed, request_id="bench", **request)
    return dst


def run_methods(run: Path, methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {"none": {**onnx_metrics(run, None), "seconds": 0.0}}
    for name, spec in methods.items():
        method = str(spec.get("method", name))
        cfg = method_config(method, {k: v for k, v in spec.items() if k != "method"})
        meta = pipeline.run_unlearn(run, cfg, quiet=True)
        rows[name] = {**onnx_metrics(run, method), "seconds": meta.seconds}
        if method == "auto":
            log = json.loads((run / "unlearn" / "auto" / "log.json").read_text())["log"]
            rows[name]["auto_choice"] = log["plan"]["choice"]  # type: ignore[assignment]
        if name != method:  # ablation variants share a method name: keep their results apart
            shutil.move(run / "unlearn" / method, run / "unlearn" / f"{method}-{len(rows)}")
    ref = rows["retrain"]
    for row in rows.values():
        row["avg_gap"] = avg_gap(row, ref)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", type=Path, help="run directories (default runs/table, or runs/table-DATASET)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="skip the ablations")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="digits for a fast smoke run; cifar10 with --data-root")
    parser.add_argument("--data-root", default="", help="dataset directory (default: the dataset's own location)")
    parser.add_argument("--model", help="default: small_cnn, or resnet8 for CIFAR")
    parser.add_argument("--train-epochs", type=int, help="override the training recipe's epochs (retrain uses it too)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    stem = "table" if args.dataset == "fashion-mnist" else f"table-{args.dataset}"
    root = args.root or Path("runs") / stem
    model = args.model or DEFAULT_MODEL.get(args.dataset, "small_cnn")
    recipe = {"model": model, **({"epochs": args.train_epochs} if args.train_epochs else {})}
    class_name = CLASS_NAMES.get(args.dataset)
    scenarios = {RANDOM: {"fraction": 0.1}, f"{CLASS} ({class_name})" if class_name else CLASS: {"klass": 0}}
    t_start = time.perf_counter()
    results: dict[str, dict[int, dict[str, dict[str, float]]]] = {s: {} for s in scenarios}
    for seed in seeds:
        base = root / f"seed{seed}"
        if not (base / "features.pt").exists():
            data_cfg = DataConfig(dataset=args.dataset, root=args.data_root, seed=seed)
            pipeline.train(base, data_cfg, TrainConfig(seed=seed, **recipe), quiet=True)
            pipeline.quantize(base, QuantConfig(), quiet=True)
        for scenario, request in scenarios.items():
            run = scenario_run(base, root / f"seed{seed}-{scenario.split()[0]}", request, seed)
            results[scenario][seed] = run_methods(run, {m: {} for m in METHODS})
            print(f"seed {seed}, {scenario}: " + ", ".join(
                f"{m} {r['avg_gap']:.2f}" for m, r in results[scenario][seed].items()), flush=True)
    ablations: dict[str, dict[str, float]] = {}
    if not args.quick:
        run = scenario_run(root / f"seed{seeds[0]}", root / "ablation", scenarios[RANDOM], seeds[0])
        variants: dict[str, dict[str, Any]] = {"retrain": {}}
        for name, overrides in ABLATIONS.items():
            variants[name] = {"method": "qmul", **overrides}
        ablations = run_methods(run, variants)
    summary = summarise(results)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"dataset": args.dataset, "model": model, "recipe": recipe, "seeds": seeds, "scenarios": results,
               "summary": summary, "ablations": ablations, "seconds": time.perf_counter() - t_start}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = markdown(summary, ablations, seeds, args.dataset, model)
    (args.out / f"{stem}.md").write_text(md)
    plot(summary, args.out / f"{stem}.png")
    print(md)
    return 0


def summarise(results: dict[str, dict[int, dict[str, dict[str, float]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario, by_seed in results.items():
        out[scenario] = {}
        for method in ("none", *METHODS):
            rows = [by_seed[s][method] for s in by_seed]
            cell: dict[str, Any] = {}
            for k in ("FA", "RA", "TA", "MIA", "avg_gap", "seconds"):
                values = np.array([r[k] for r in rows], dtype=float)
                cell[k] = (float(values.mean()), float(values.std()))
            if method == "auto":
                cell["choices"] = [r.get("auto_choice") for r in rows]
            out[scenario][method] = cell
    return out


def markdown(summary: dict[str, dict[str, dict[str, Any]]], ablations: dict[str, dict[str, float]],
             seeds: list[int], dataset: str, model: str = "small_cnn") -> str:
    lines = [f"# Unlearning methods on {dataset} ({model}, int8 ONNX in onnxruntime)", "",
             f"Mean ± std over seeds {seeds}; Avg Gap against retrain of the same seed and scenario; seconds = the "
             "method's wall time on 2 cores. `none` is the deployed int8 model before unlearning.", ""]
    for scenario, rows in summary.items():
        lines += [f"## {scenario}", "", "| method | FA | RA | TA | MIA | Avg Gap | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for method, c in rows.items():
            keys = ("FA", "RA", "TA", "MIA", "avg_gap", "seconds")
            cells = " | ".join(f"{c[k][0]:.2f} ± {c[k][1]:.2f}" for k in keys)
            note = f" (chose {', '.join(map(str, c['choices']))})" if "choices" in c else ""
            lines.append(f"| {method}{note} | {cells} |")
        lines.append("")
    if ablations:
        lines += ["## Q-MUL ablations (seed 0, random 10%)", "", "| variant | FA | RA | TA | MIA | Avg Gap | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in ablations.items():
            lines.append(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in ("FA", "RA", "TA", "MIA", "avg_gap",
                                                                            "seconds")) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 3.5), squeeze=False)
    for ax, (scenario, rows) in zip(axes[0], summary.items(), strict=True):
        names = [m for m in rows if m != "retrain"]
        ax.bar(names, [rows[m]["avg_gap"][0] for m in names], yerr=[rows[m]["avg_gap"][1] for m in names])
        ax.set_title(scenario)
        ax.set_ylabel("Avg Gap to retrain (points)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
