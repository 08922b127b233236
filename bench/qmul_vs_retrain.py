"""Q-MUL against retraining on Fashion-MNIST, tuned honestly.

1. Train the small CNN with the default recipe, quantize it (x86), exactly as `edge-qmul train/quantize`.
2. Three disjoint forget sets of 10% of the training samples: two *tuning* sets and the *reported* set.
3. On the tuning sets only: retrain once per set, then run each Q-MUL candidate in GRID and keep the
   one with the smallest mean Avg Gap to those retrains among candidates whose wall time is <= 0.08
   of retrain's on every tuning set. (One tuning set alone picked a candidate that did worse on a fresh
   set: the gap of one configuration varies by ~0.4 between forget sets of the same size.)
4. On the reported set: retrain, the chosen Q-MUL, the other methods with their defaults, and the
   untouched int8 model (`none`), all measured in this one run; print the table and the time ratios.

    python bench/qmul_vs_retrain.py            # ~15 min on 2 cores; writes bench/results/
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

from edge_qmul import data, pipeline
from edge_qmul.config import DataConfig, QuantConfig, method_config
from edge_qmul.demo import format_table
from edge_qmul.ledger import Ledger
from edge_qmul.metrics import avg_gap, evaluate_model
from edge_qmul.train import TrainConfig

# Candidates: the forget/retain balance is set by the update mode (sequential: all forget batches,
# then retain batches; mixed: both shuffled into the same batches) and by how hard and how long the
# classifier is pushed (lr x epochs); everything else is the method's default (its class in edge_qmul.config).
GRID: list[dict[str, Any]] = [
    *({"update": "sequential", "lr": lr, "epochs": epochs} for lr in (0.1, 0.15) for epochs in (5, 10)),
    *({"update": "mixed", "lr": lr, "epochs": 5} for lr in (0.1, 0.2, 0.3, 0.5)),
    *({"update": "mixed", "lr": lr, "epochs": 10} for lr in (0.1, 0.2)),
]
TUNING_SEEDS = (1, 2)
# The time target (<= 1/10 of retrain) must hold on the reported run, on a noisy machine: candidates
# qualify on the tuning set only with a 20% margin.
MAX_TUNING_RATIO = 0.08
BASE = {"layers": "classifier", "norm_batches": 16}
OTHERS = ("finetune", "random_label", "grad_ascent", "famr")


def prepare(run: Path, quiet: bool) -> dict[str, Any]:
    if (run / "quantized.pt").exists():
        print(f"reusing {run} (delete it to retrain)")
        return json.loads((run / "run.json").read_text())
    t0 = time.perf_counter()
    pipeline.train(run, DataConfig(dataset="fashion-mnist"), TrainConfig(), quiet=quiet)
    info = pipeline.quantize(run, QuantConfig())
    print(f"trained + quantized in {time.perf_counter() - t0:.0f}s: {info}")
    return json.loads((run / "run.json").read_text())


def forget_sets(run: Path) -> tuple[list[int], list[list[int]]]:
    """The reported set (what `edge-qmul forget --fraction 0.1 --seed 0` selects) and disjoint tuning sets."""
    rd = pipeline.load_run_data(run)
    reported = data.select_forget(rd.split, rd.source.train.labels, fraction=0.1, seed=0)
    rest = sorted(set(rd.split.train) - set(reported))
    tuning = []
    for seed in TUNING_SEEDS:
        chosen = np.random.default_rng(seed).choice(rest, size=len(reported), replace=False)
        tuning.append(sorted(int(i) for i in chosen))
        rest = sorted(set(rest) - set(tuning[-1]))
    return reported, tuning


def fresh_copy(run: Path, dst: Path, ids: list[int], request_id: str) -> Path:
    """A run directory sharing the trained/quantized model, with its own ledger holding one request."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ("split.json", "run.json", "float.pt", "quantized.pt", "features.pt", "digests.json"):
        shutil.copy2(run / name, dst / name)
    pipeline.forget(dst, ids=ids, request_id=request_id)
    return dst


def metrics_of(run: Path, method: str) -> dict[str, float]:
    q = pipeline.load_quantized(run)
    rd = pipeline.load_run_data(run)
    with Ledger(run / "ledger.sqlite") as ledger:
        ids = ledger.forget_ids()
    model, meta = pipeline.load_result(run, method, q, ids)
    return {**evaluate_model(model, rd.eval_sets()), "seconds": float(meta["seconds"])}


def tune(run: Path, sets: list[list[int]], quiet: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    refs, dirs = [], []
    for k, ids in enumerate(sets):
        tdir = fresh_copy(run, run.parent / f"{run.name}-tuning{k}", ids, f"tuning-set-{k}")
        pipeline.run_unlearn(tdir, method_config("retrain"), quiet=quiet)
        refs.append(metrics_of(tdir, "retrain"))
        dirs.append(tdir)
        print(f"tuning set {k}: retrain {fmt(refs[-1])}")
    rows = []
    for cand in GRID:
        cfg = method_config("qmul", {**BASE, **cand})
        per_set = []
        for tdir, ref in zip(dirs, refs, strict=True):
            pipeline.run_unlearn(tdir, cfg, quiet=quiet)
            m = metrics_of(tdir, "qmul")
            if m["seconds"] / ref["seconds"] > MAX_TUNING_RATIO:
                # Over the time cap: time it once more (the run is deterministic, only the clock is
                # noisy) and keep the faster wall time, so one noisy moment does not disqualify it.
                pipeline.run_unlearn(tdir, cfg, quiet=quiet)
                again = metrics_of(tdir, "qmul")
                if any(again[k] != m[k] for k in ("FA", "RA", "TA", "MIA")):
                    raise RuntimeError(f"candidate {cand} is not deterministic: {m} vs {again}")
                m["seconds"] = min(m["seconds"], again["seconds"])
            per_set.append({**m, "avg_gap": avg_gap(m, ref), "ratio": m["seconds"] / ref["seconds"]})
        row = {
            "candidate": {**BASE, **cand},
            **{k: float(np.mean([p[k] for p in per_set])) for k in ("FA", "RA", "TA", "MIA", "avg_gap")},
            "gaps": [p["avg_gap"] for p in per_set],
            "ratio": max(p["ratio"] for p in per_set),
        }
        rows.append(row)
        gaps = " / ".join(f"{g:.2f}" for g in row["gaps"])
        print(f"  {json.dumps(cand)}: gap {row['avg_gap']:.2f} ({gaps}) time ratio {row['ratio']:.3f}")
    within = [r for r in rows if r["ratio"] <= MAX_TUNING_RATIO] or rows
    best = min(within, key=lambda r: r["avg_gap"])
    print(f"chosen on the tuning sets: {json.dumps(best['candidate'])} (mean gap {best['avg_gap']:.2f})")
    return {"retrain": refs, "chosen": best["candidate"]}, rows


def fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k} {m[k]:.2f}" for k in ("FA", "RA", "TA", "MIA", "seconds"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/bench-fmnist"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    run_info = prepare(args.run, args.quiet)
    reported, tuning = forget_sets(args.run)
    assert not any(set(reported) & set(t) for t in tuning) and not set(tuning[0]) & set(tuning[1])
    tuned, grid_rows = tune(args.run, tuning, args.quiet)

    rdir = fresh_copy(args.run, args.run.parent / f"{args.run.name}-reported", reported, "reported-set")
    pipeline.run_unlearn(rdir, method_config("retrain"), quiet=args.quiet)
    pipeline.run_unlearn(rdir, method_config("qmul", tuned["chosen"]), quiet=args.quiet)
    for method in OTHERS:
        pipeline.run_unlearn(rdir, method_config(method), quiet=args.quiet)
    report = pipeline.evaluate(rdir, ["retrain", "qmul", *OTHERS])
    table = format_table(report)
    rows = report.methods
    ratio = rows["qmul"]["seconds"] / rows["retrain"]["seconds"]
    summary = {
        "qmul_avg_gap": rows["qmul"]["avg_gap"],
        "none_avg_gap": rows["none"]["avg_gap"],
        "qmul_time_ratio_to_retrain": ratio,
        "targets": {
            "qmul_gap_le_1": rows["qmul"]["avg_gap"] <= 1.0,
            "qmul_gap_le_half_none": rows["qmul"]["avg_gap"] <= rows["none"]["avg_gap"] / 2,
            "qmul_time_le_tenth_retrain": ratio <= 0.1,
        },
    }
    print(table)
    print(f"qmul / retrain wall time: {rows['qmul']['seconds']:.1f}s / {rows['retrain']['seconds']:.1f}s = {ratio:.3f}")
    print(json.dumps(summary["targets"]))

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "dataset": "fashion-mnist",
        "recipe": run_info["train"],
        "model": run_info["model"]["name"],
        "tuning": {"grid": grid_rows, **tuned},
        "reported": report,
        "summary": summary,
        "qmul_config": method_config("qmul", tuned["chosen"]).to_dict(),
    }
    (args.out / "qmul_vs_retrain.json").write_text(json.dumps(result, indent=2) + "\n")
    grid_md = "\n".join(
        f"| {json.dumps(r['candidate'])} | {r['FA']:.2f} | {r['RA']:.2f} | {r['TA']:.2f} | {r['MIA']:.2f} | "
        f"{r['avg_gap']:.2f} ({' / '.join(f'{g:.2f}' for g in r['gaps'])}) | {r['ratio']:.3f} |"
        for r in grid_rows
    )
    (args.out / "qmul_vs_retrain.md").write_text(
        "# Q-MUL vs retrain, Fashion-MNIST, 10% random forgetting, small CNN, int8 (x86)\n\n"
        f"Reported forget set ({report.forget_count} samples), measured in one run:\n\n"
        f"```\n{table}\n```\n\n"
        f"qmul / retrain wall time: {ratio:.3f}. Targets: `{json.dumps(summary['targets'])}`\n\n"
        f"Tuning grid: {len(TUNING_SEEDS)} disjoint forget sets of the same size, each with its own retrain; "
        "metrics are means over the sets, time is the worst set's. The reported set was never used to choose.\n\n"
        "| candidate | FA | RA | TA | MIA | Avg Gap (per set) | time / retrain |\n|---|---|---|---|---|---|---|\n"
        f"{grid_md}\n\nChosen: `{json.dumps(tuned['chosen'])}`\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
