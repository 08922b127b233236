"""Rank quantizer settings by membership-inference security on Fashion-MNIST (edge_qmul.privacy).

The float small CNN of bench/qmul_vs_retrain.py (``--run``, trained if absent) is quantized four ways
(fp32, int8 per-tensor, int8 per-channel, 4-bit per-channel) with the same calibration batches. Members:
the first ``--n`` training samples; non-members: the first ``--n`` test samples. Security = 1 − loss-
threshold attack advantage, with a 95% bootstrap interval; test accuracy beside it.

    python bench/privacy_ranking.py          # ~2 min; writes bench/results/privacy_ranking.{md,json}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from edge_qmul import pipeline, privacy
from edge_qmul.config import DataConfig, QuantConfig
from edge_qmul.train import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/bench-fmnist"))
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if not (args.run / "quantized.pt").exists():
        pipeline.train(args.run, DataConfig(dataset="fashion-mnist"), TrainConfig(), quiet=True)
        pipeline.quantize(args.run, QuantConfig(), quiet=True)
    q = pipeline.load_quantized(args.run)
    rd = pipeline.load_run_data(args.run)
    x, y = rd.tensors("train")
    tx, ty = rd.tensors("test")
    calib = list(x[: q.calibration_size].split(256))
    scores = privacy.rank(q.float_model, calib, (x[: args.n], y[: args.n]), (tx[: args.n], ty[: args.n]))
    rows = "\n".join(
        f"| {i + 1} | {s.setting} | {s.security:.4f} [{s.security_low:.4f}, {s.security_high:.4f}] | "
        f"{s.advantage:.4f} | {s.test_accuracy:.2f} | {s.member_loss_mean:.4f} / {s.nonmember_loss_mean:.4f} |"
        for i, s in enumerate(scores)
    )
    md = ("# Quantizer privacy ranking, Fashion-MNIST small CNN\n\n"
          f"Members: {args.n} training samples; non-members: {args.n} test samples. Security = 1 − advantage of the "
          "best loss-threshold attack (KS distance of the two loss distributions), 95% bootstrap interval.\n\n"
          "| rank | setting | security [95% CI] | advantage | test acc | mean loss member / non-member |\n"
          f"|---|---|---|---|---|---|\n{rows}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "privacy_ranking.md").write_text(md)
    (args.out / "privacy_ranking.json").write_text(json.dumps([s.to_dict() for s in scores], indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
