"""The main job (`make demo`): train → int8 → forget → unlearn with every method → one table.

A composition of the stages in ``edge_qmul.pipeline``; it prints as it goes and returns the report.
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from edge_qmul.config import DataConfig, QuantConfig, TrainConfig, method_config
from edge_qmul.pipeline import REFERENCE, EvalReport, evaluate, forget, quantize, run_unlearn, set_latest, train
from edge_qmul.run import Run


def new_run_dir(base: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(base) / f"{stamp}-{secrets.token_hex(2)}"


def format_table(report: EvalReport) -> str:
    header = f"{'method':<14}{'FA':>8}{'RA':>8}{'TA':>8}{'MIA':>8}{'AvgGap':>9}{'seconds':>10}"
    lines = [header, "-" * len(header)]
    for name, r in report.methods.items():
        gap = "-" if r["avg_gap"] is None else f"{r['avg_gap']:.2f}"
        lines.append(
            f"{name:<14}{r['FA']:8.2f}{r['RA']:8.2f}{r['TA']:8.2f}{r['MIA']:8.2f}{gap:>9}{r['seconds']:10.2f}"
        )
    return "\n".join(lines)


DEMO_METHODS = ("retrain", "qmul", "finetune", "random_label", "grad_ascent", "famr")


def demo(
    run_dir: Run | Path,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    quant_cfg: QuantConfig,
    *,
    forget_fraction: float = 0.1,
    forget_class: int | None = None,
    methods: tuple[str, ...] = DEMO_METHODS,
    unlearn_overrides: dict[str, Any] | None = None,
    quiet: bool = False,
    echo: Any = print,
) -> EvalReport:
    """The whole slice: train → quantize → forget → unlearn with each method → evaluate."""
    for m in methods:
        method_config(m, unlearn_overrides if m == "qmul" else None)  # fail on a bad config before any work
    t0 = time.perf_counter()
    train(run_dir, data_cfg, train_cfg, quiet=quiet)
    echo(f"trained {train_cfg.model} on {data_cfg.dataset} ({time.perf_counter() - t0:.1f}s)")
    info = quantize(run_dir, quant_cfg, quiet=quiet)
    echo(
        f"quantized ({info.backend}): float TA {info.float_test_acc:.2f}, int8 TA {info.int8_test_acc:.2f}, "
        f"PTQ/QAT agreement {info.ptq_qat_agreement:.2f}%"
    )
    if forget_class is None:
        req = forget(run_dir, fraction=forget_fraction, seed=data_cfg.seed)
    else:  # a whole class: where the untouched model is far from retrain and the methods separate
        req = forget(run_dir, klass=forget_class)
    echo(f"forget request {req.request_id}: {req.samples} samples")
    for m in methods:
        meta = run_unlearn(run_dir, method_config(m, unlearn_overrides if m == "qmul" else None), quiet=quiet)
        echo(f"unlearned with {m} ({meta.seconds:.1f}s)")
    if "qmul" in methods:
        set_latest(run_dir, "qmul")  # a demo run exports Q-MUL's model by default
    report = evaluate(run_dir, list(methods))
    echo(format_table(report))
    for m, ratio in (report.time_ratio_to_retrain or {}).items():
        if m != REFERENCE:
            echo(f"{m} / retrain wall time: {ratio:.3f}")
    return report
