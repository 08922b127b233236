"""How often the forget-set checks of `validate` raise a false alarm, and how often they catch a model
that still remembers, as the request shrinks (Fashion-MNIST, 10% random forgetting).

Three int8 models of the reported run of bench/qmul_vs_retrain.py are judged on random subsets of its
forget set against the whole test set, the way `validate` judges one request:
- ``retrain`` never saw the forget set: every check that fails on it is a false alarm;
- ``none`` (the untouched model) still remembers it: a check that passes on it missed;
- ``qmul`` is what the toolkit ships.
For each subset size, ``fa_minus_ta`` (limit 3 points) and ``loss_auc`` (limit 0.60) are judged by the
point estimate at every size (``confidence = 0.5``) and by the default rule (``confidence = 0.95``: the
point estimate, but "inconclusive", not blocking, when the set is so small that a perfectly forgotten set
would fail more than 5% of the time); the rate of inconclusive verdicts is counted. Logits come from the torch int8
models (they agree with onnxruntime on 99.9% of test samples); the attack uses `validate`'s 200 bootstraps.

    python bench/budget_power.py     # ~6 min; writes bench/results/budget_power.{md,json}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edge_qmul.export.budgets import load_budgets

from edge_qmul import pipeline
from edge_qmul.evidence import fa_minus_ta_power, loss_auc_power
from edge_qmul.metrics import logits_of, loss_attack, per_sample_loss

SIZES = (20, 50, 200, 1000, 5400)
MODELS = ("retrain", "none", "qmul")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/bench-fmnist-reported"))
    parser.add_argument("--subsets", type=int, default=100, help="random forget subsets per size")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if not (args.run / "unlearn" / "retrain" / "result.pt").exists():
        print(f"{args.run} has no retrain result: run bench/qmul_vs_retrain.py first", file=sys.stderr)
        return 2
    budgets = load_budgets(None)
    fa_limit, auc_limit = (budgets.limit(n, {}) for n in ("fa_minus_ta", "loss_auc"))
    q = pipeline.load_quantized(args.run)
    rd = pipeline.load_run_data(args.run)
    rd.split.forget = pipeline.ledger_forget_ids(args.run)
    sets = rd.eval_sets()

    per_model: dict[str, dict[str, np.ndarray]] = {}
    with torch.no_grad():
        for name in MODELS:
            model = q.int8 if name == "none" else pipeline.load_result_full(args.run, name, q, rd.split.forget).int8
            f, t = logits_of(model, sets.forget_x), logits_of(model, sets.test_x)
            per_model[name] = {
                "forget_correct": (f.argmax(1) == sets.forget_y).numpy(),
                "test_correct": (t.argmax(1) == sets.test_y).numpy(),
                "forget_loss": per_sample_loss(f, sets.forget_y),
                "test_loss": per_sample_loss(t, sets.test_y),
            }

    rng = np.random.default_rng(0)
    n_forget = len(sets.forget_y)
    rows: list[dict[str, Any]] = []
    for size in SIZES:
        draws = [rng.choice(n_forget, size=size, replace=False) for _ in range(1 if size >= n_forget else args.subsets)]
        for name in MODELS:
            m = per_model[name]
            k_t, n_t = int(m["test_correct"].sum()), len(m["test_correct"])
            conf = budgets.confidence
            fa_open = "inconclusive" in fa_minus_ta_power(size, n_t, k_t / n_t, limit=fa_limit, confidence=conf)
            auc_open = "inconclusive" in loss_auc_power(size, n_t, limit=auc_limit, confidence=conf)
            counts = {key: 0 for key in ("fa_point", "fa_rule", "auc_point", "auc_rule")}
            for idx in draws:
                fa_fail = 100.0 * (int(m["forget_correct"][idx].sum()) / size - k_t / n_t) > fa_limit
                auc_fail = loss_attack(m["forget_loss"][idx], m["test_loss"])["auc"] > auc_limit
                counts["fa_point"] += fa_fail
                counts["fa_rule"] += fa_fail and not fa_open
                counts["auc_point"] += auc_fail
                counts["auc_rule"] += auc_fail and not auc_open
            row = {"size": size, "model": name, "subsets": len(draws), "fa_inconclusive": fa_open,
                   "auc_inconclusive": auc_open, **{key: 100.0 * c / len(draws) for key, c in counts.items()}}
            rows.append(row)
            print(f"n={size:>5} {name:<8} fail% fa point {row['fa_point']:5.1f} rule {row['fa_rule']:5.1f} "
                  f"{'(inconclusive)' if fa_open else ''} | auc point {row['auc_point']:5.1f} "
                  f"rule {row['auc_rule']:5.1f} {'(inconclusive)' if auc_open else ''}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"run": str(args.run), "limits": {"fa_minus_ta": fa_limit, "loss_auc": auc_limit},
              "confidence": budgets.confidence, "test_samples": len(sets.test_y), "rows": rows}
    (args.out / "budget_power.json").write_text(json.dumps(result, indent=2) + "\n")
    def rule(r: dict[str, Any], key: str) -> str:
        return "inconclusive" if r[f"{key}_inconclusive"] else f"{r[f'{key}_rule']:.0f}"

    table = "\n".join(
        f"| {r['size']} | {r['model']} | {r['fa_point']:.0f} | {rule(r, 'fa')} | {r['auc_point']:.0f} | "
        f"{rule(r, 'auc')} |" for r in rows
    )
    (args.out / "budget_power.md").write_text(
        "# Forget-set checks: false alarms and misses against the request size\n\n"
        f"Fashion-MNIST, reported run of `qmul_vs_retrain.py`; random subsets of its {n_forget}-sample forget set "
        f"({args.subsets} per size, the whole set once) against the {len(sets.test_y)}-sample test set. "
        "Cells: % of subsets on which the check **fails**. For `retrain` (never saw the data) every failure "
        "is a false alarm; for `none` (untouched, still remembers) every pass is a miss. "
        "Point = the point estimate against the limit at every size (`confidence = 0.5`); default = the same "
        f"verdict, but inconclusive (not blocking) below the size at which a perfectly forgotten set would fail "
        f"more than {1 - budgets.confidence:.0%} of the time (`confidence = {budgets.confidence}`).\n\n"
        f"| forget samples | model | fa_minus_ta > {fa_limit:g}: point | default | "
        f"loss_auc > {auc_limit:g}: point | default |\n|---|---|---|---|---|---|\n{table}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
