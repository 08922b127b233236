"""Q-MUL with a bounded retain sample: is its cost-proportional-to-the-forget-set variant accurate enough?

Recommended Q-MUL passes over every retain sample each epoch, so its cost grows with the training set
(bench/results/cost_train_size.md). Two ways to bound the retain side, each a fresh random draw per epoch:
``retain_batches=B`` (a fixed count, whatever the request's size) and ``retain_ratio=r`` (r x the forget
set, at least one batch), whose cost follows the forget set. Protocol of bench/qmul_vs_retrain.py: on its
two tuning forget sets, r is chosen as the *smallest* candidate whose mean Avg Gap to retrain is at most
1.0 (the core slice's target; the cheapest one that is accurate enough), then reported once on the
reported set beside recommended Q-MUL. All other settings are the recommended ones.

    python bench/bounded_retain.py    # ~2 min; needs the runs of bench/qmul_vs_retrain.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from qmul_vs_retrain import metrics_of

from edge_qmul import pipeline
from edge_qmul.config import method_config
from edge_qmul.metrics import avg_gap

FIXED = (16, 64)  # retain_batches, for comparison
RATIOS = (1.0, 1.5, 2.0, 3.0, 4.0)
TARGET_GAP = 1.0


def scratch_copy(run: Path, dst: Path) -> Path:
    """The run with its ledger and retrain reference, so Q-MUL results do not overwrite the committed ones."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ("split.json", "run.json", "float.pt", "quantized.pt", "features.pt", "ledger.sqlite", "digests.json"):
        if (run / name).exists():
            shutil.copy2(run / name, dst / name)
    shutil.copytree(run / "unlearn" / "retrain", dst / "unlearn" / "retrain")
    return dst


def measure(run: Path, overrides: dict[str, int]) -> dict[str, float]:
    ref = metrics_of(run, "retrain")
    pipeline.run_unlearn(run, method_config("qmul", overrides), quiet=True)
    m = metrics_of(run, "qmul")
    return {**m, "avg_gap": avg_gap(m, ref), "ratio": m["seconds"] / ref["seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    sources = [args.runs / f"bench-fmnist-tuning{k}" for k in (0, 1)] + [args.runs / "bench-fmnist-reported"]
    missing = [str(s) for s in sources if not (s / "unlearn" / "retrain" / "result.pt").exists()]
    if missing:
        print(f"{', '.join(missing)}: no retrain reference; run bench/qmul_vs_retrain.py first", file=sys.stderr)
        return 2
    tuning = [scratch_copy(s, args.runs / f"bench-bounded-{s.name}") for s in sources[:2]]
    reported = scratch_copy(sources[2], args.runs / "bench-bounded-reported")

    rows = []
    variants = [("all", {}), *((f"retain_batches={b}", {"retain_batches": b}) for b in FIXED),
                *((f"retain_ratio={r:g}", {"retain_ratio": r}) for r in RATIOS)]
    for label, overrides in variants:
        per_set = [measure(t, overrides) for t in tuning]
        row = {"variant": label, **overrides, "gaps": [p["avg_gap"] for p in per_set],
               "avg_gap": float(np.mean([p["avg_gap"] for p in per_set])),
               "seconds": float(np.mean([p["seconds"] for p in per_set])),
               "ratio": max(p["ratio"] for p in per_set)}
        rows.append(row)
        print(f"tuning, {label}: gap {row['avg_gap']:.2f} ({' / '.join(f'{g:.2f}' for g in row['gaps'])}), "
              f"{row['seconds']:.2f}s, ratio {row['ratio']:.4f}", flush=True)
    accurate = [r for r in rows if "retain_ratio" in r and r["avg_gap"] <= TARGET_GAP]
    if not accurate:
        print(f"no retain_ratio candidate reached a mean tuning gap <= {TARGET_GAP}", file=sys.stderr)
        return 1
    chosen = min(r["retain_ratio"] for r in accurate)
    report = {"recommended": measure(reported, {}), "bounded": measure(reported, {"retain_ratio": chosen})}
    for name, m in report.items():
        print(f"reported set, {name}: FA {m['FA']:.2f} RA {m['RA']:.2f} TA {m['TA']:.2f} MIA {m['MIA']:.2f} "
              f"gap {m['avg_gap']:.2f} {m['seconds']:.2f}s ratio {m['ratio']:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"tuning": rows, "target_gap": TARGET_GAP, "chosen_retain_ratio": chosen, "reported": report}
    (args.out / "bounded_retain.json").write_text(json.dumps(result, indent=2) + "\n")
    tuning_rows = "\n".join(
        f"| {r['variant']} | {r['avg_gap']:.2f} ({' / '.join(f'{g:.2f}' for g in r['gaps'])}) | "
        f"{r['seconds']:.2f} | {r['ratio']:.4f} |" for r in rows
    )
    reported_rows = "\n".join(
        f"| {name} | {m['FA']:.2f} | {m['RA']:.2f} | {m['TA']:.2f} | {m['MIA']:.2f} | {m['avg_gap']:.2f} | "
        f"{m['seconds']:.2f} | {m['ratio']:.4f} |" for name, m in
        (("Q-MUL, every retain batch", report["recommended"]), (f"Q-MUL, retain_ratio={chosen:g}", report["bounded"]))
    )
    (args.out / "bounded_retain.md").write_text(
        "# Q-MUL with a bounded retain sample, Fashion-MNIST 10% random forgetting (2 cores)\n\n"
        "Tuning sets (mean Avg Gap to each set's retrain, per set in brackets; seconds; worst ratio to retrain):\n\n"
        f"| retain side per epoch | Avg Gap | seconds | time / retrain |\n|---|---|---|---|\n{tuning_rows}\n\n"
        f"Chosen on the tuning sets (smallest ratio with mean Avg Gap ≤ {TARGET_GAP}): retain_ratio = {chosen:g}. "
        "Reported set (torch int8 models):\n\n"
        "| variant | FA | RA | TA | MIA | Avg Gap | seconds | time / retrain |\n|---|---|---|---|---|---|---|---|\n"
        f"{reported_rows}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
