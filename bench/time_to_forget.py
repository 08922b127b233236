"""Time to forget and the cost curve of Q-MUL on Fashion-MNIST (2 cores).

1. Time to forget: one filed request (``--samples`` ids; by default one of 20 and one of 1,000 samples,
   each on its own fresh copy) → Q-MUL → export → validated int8 ONNX for rpi4 with the default budgets,
   each stage timed, on a copy of the trained + quantized run of bench/qmul_vs_retrain.py. The verdict of
   every check is recorded, including the forget-set checks that are inconclusive at that size.
2. Cost curve: Q-MUL wall time against the forget-set size (1 … 6,000 samples), with the recommended
   settings (every retain sample each epoch) and with a retain sample of 3 x the forget set per epoch
   (``retain_ratio=3``, chosen by bench/bounded_retain.py), against retrain's time. Plotted to
   bench/results/cost_curve.png.

    python bench/time_to_forget.py         # ~7 min; writes bench/results/time_to_forget.{md,json}, cost_curve.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from edge_qmul.devices.profiles import load_profile
from edge_qmul.export.budgets import load_budgets
from edge_qmul.export.stage import export_run
from edge_qmul.export.validate import validate_run

from edge_qmul import data, pipeline
from edge_qmul.config import method_config

BASE_FILES = ("split.json", "run.json", "float.pt", "quantized.pt", "features.pt", "digests.json")
SIZES = (1, 10, 100, 1000, 6000)


def fresh(base: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in BASE_FILES:
        shutil.copy2(base / name, dst / name)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/bench-fmnist"))
    parser.add_argument("--samples", type=int, nargs="+", default=[20, 1000], help="samples in the one request")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if not (args.run / "features.pt").exists():
        print(f"{args.run} has no trained + quantized model: run bench/qmul_vs_retrain.py first", file=sys.stderr)
        return 2
    rd = pipeline.load_run_data(args.run)

    # 1. one request -> validated int8 ONNX
    requests = [time_to_forget(args.run, n) for n in args.samples]

    # 2. cost against the forget-set size
    curve: list[dict[str, Any]] = []
    train = rd.split.train
    for size in SIZES:
        for label, overrides in (("recommended", {}), ("retain_ratio=3", {"retain_ratio": 3.0})):
            r = fresh(args.run, args.run.parent / "bench-curve")
            pipeline.forget(r, ids=data.select_forget(rd.split, rd.source.train.labels, count=size, seed=size),
                            request_id=f"n{size}")
            m = pipeline.run_unlearn(r, method_config("qmul", overrides), quiet=True)
            curve.append({"forget": size, "variant": label, "seconds": m.seconds})
            print(f"forget {size:>5}: qmul {label:<18} {m.seconds:.2f}s", flush=True)
    retrain_seconds = json.loads((args.run / "run.json").read_text())["train_seconds"]

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"time_to_forget": requests, "cost_curve": curve, "train_samples": len(train),
              "original_training_seconds": retrain_seconds}
    (args.out / "time_to_forget.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {c['forget']} | {c['variant']} | {c['seconds']:.2f} |" for c in curve)
    (args.out / "time_to_forget.md").write_text(
        "# Time to forget and unlearning cost, Fashion-MNIST small CNN (2 cores)\n\n"
        + "".join(_request_text(r) for r in requests) + "\n"
        f"Q-MUL wall time against the forget-set size ({len(train)} training samples; the original training "
        f"took {retrain_seconds:.0f} s):\n\n| forget samples | variant | seconds |\n|---|---|---|\n{rows}\n"
    )
    plot(curve, args.out / "cost_curve.png")
    return 0


def time_to_forget(base: Path, samples: int) -> dict[str, Any]:
    run = fresh(base, base.parent / f"bench-ttf-{samples}")
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    pipeline.forget(run, count=samples, seed=7, request_id="user-1")
    stages["forget"] = time.perf_counter() - t0
    t = time.perf_counter()
    meta = pipeline.run_unlearn(run, method_config("qmul"), quiet=True)
    stages["unlearn"] = time.perf_counter() - t
    t = time.perf_counter()
    export_run(run, "qmul")
    stages["export"] = time.perf_counter() - t
    t = time.perf_counter()
    v = validate_run(run, load_profile("rpi4"), load_budgets(None), method="qmul")
    stages["validate"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    checks = {name: {k: c[k] for k in ("value", "noise", "limit", "passed", "inconclusive") if k in c}
              for name, c in v.checks.items() if name in ("fa_minus_ta", "loss_auc", "ta_drop")}
    print(f"time to forget ({samples} samples): {total:.1f}s {json.dumps({k: round(x, 1) for k, x in stages.items()})}"
          f"; validation passed: {v.passed}; {json.dumps(checks)}", flush=True)
    return {"samples": samples, "seconds": total, "stages": stages, "unlearn_seconds": meta.seconds,
            "validation_passed": v.passed, "checks": checks,
            "metrics": {k: v.metrics[k] for k in ("FA", "FA_before", "TA", "TA_before", "loss_auc")}}


def _request_text(r: dict[str, Any]) -> str:
    def check(name: str) -> str:
        c = r["checks"][name]
        verdict = "inconclusive" if "inconclusive" in c else "pass" if c["passed"] else "FAIL"
        return f"{name} {c['value']:.3g} (sampling noise {c['noise']:.2g}, limit {c['limit']:.3g}): {verdict}"

    m = r["metrics"]
    return (
        f"- One request of {r['samples']} samples → Q-MUL → export → validated int8 ONNX (rpi4, default budgets): "
        f"**{r['seconds']:.1f} s** ({', '.join(f'{k} {x:.1f} s' for k, x in r['stages'].items())}); "
        f"validation passed: {r['validation_passed']}. FA {m['FA']:.2f} (before {m['FA_before']:.2f}), "
        f"TA {m['TA']:.2f} (before {m['TA_before']:.2f}); {check('fa_minus_ta')}; {check('loss_auc')}.\n"
    )


def plot(curve: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for variant in sorted({c["variant"] for c in curve}):
        pts = [c for c in curve if c["variant"] == variant]
        ax.plot([c["forget"] for c in pts], [c["seconds"] for c in pts], marker="o", label=f"qmul ({variant})")
    ax.set_xscale("log")
    ax.set_xlabel("forget-set size (samples)")
    ax.set_ylabel("unlearning wall time (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
