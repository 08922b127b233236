"""Unlearning cost against the training-set size, Fashion-MNIST small CNN (2 cores).

Models are trained with the default recipe on the first 10%, 25%, 50% and 100% of the (shuffled)
training list. For each, one request of 1,000 samples is unlearned with Q-MUL (recommended settings: every
retain sample each epoch; and with a retain sample of 3 x the forget set per epoch, ``retain_ratio=3``, the
ratio chosen by bench/bounded_retain.py) and with retrain.

    python bench/cost_vs_train_size.py      # ~8 min; writes bench/results/cost_train_size.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from edge_qmul import pipeline
from edge_qmul.config import DataConfig, QuantConfig, method_config
from edge_qmul.train import TrainConfig

FRACTIONS = (0.1, 0.25, 0.5, 1.0)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "qmul (recommended)": ("qmul", {}),
    "qmul (retain_ratio=3)": ("qmul", {"retain_ratio": 3.0}),
    "retrain": ("retrain", {}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("runs/cost-train-size"))
    parser.add_argument("--forget", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows: list[dict[str, Any]] = []
    for fraction in FRACTIONS:
        run = args.root / f"f{fraction}"
        if not (run / "features.pt").exists():
            pipeline.train(run, DataConfig(dataset="fashion-mnist", train_fraction=fraction), TrainConfig(), quiet=True)
            pipeline.quantize(run, QuantConfig(), quiet=True)
        pipeline.forget(run, count=args.forget, seed=0, request_id="bench")
        n_train = len(pipeline.load_run_data(run).split.train)
        for label, (method, overrides) in VARIANTS.items():
            meta = pipeline.run_unlearn(run, method_config(method, overrides), quiet=True)
            rows.append({"train_samples": n_train, "variant": label, "seconds": meta.seconds})
            print(f"train {n_train:>6}: {label:<26} {meta.seconds:.2f}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cost_train_size.json").write_text(json.dumps({"forget": args.forget, "rows": rows}, indent=2) + "\n")
    table = "\n".join(f"| {r['train_samples']} | {r['variant']} | {r['seconds']:.2f} |" for r in rows)
    (args.out / "cost_train_size.md").write_text(
        f"# Unlearning cost against the training-set size (forget {args.forget} samples), Fashion-MNIST\n\n"
        f"| training samples | method | seconds |\n|---|---|---|\n{table}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label in VARIANTS:
        pts = [r for r in rows if r["variant"] == label]
        ax.plot([r["train_samples"] for r in pts], [r["seconds"] for r in pts], marker="o", label=label)
    ax.set_xlabel("training-set size (samples)")
    ax.set_ylabel("unlearning wall time (s)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "cost_train_size.png", dpi=120)
    plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
