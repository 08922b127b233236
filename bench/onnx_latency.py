"""onnxruntime int8 versus fp32: latency, file size and fused-op counts, side by side in one run.

For each model (small CNN on 28x28, CIFAR ResNet-18 on 32x32) the float model and its x86 int8 model
(torch.ao FX PTQ) are exported through the same path as `edge-qmul export`; each configuration is timed
alternately (int8, fp32, int8, fp32, ...) so machine noise hits both alike. Weights are random and
calibration uses random images: latency does not depend on what the model learned.

    python bench/onnx_latency.py        # ~2 min on 2 cores; writes bench/results/onnx_latency.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from edge_qmul.export.onnx_export import INT8_KERNELS, export_models, optimized_op_counts
from edge_qmul.export.validate import ort_session

from edge_qmul import quant
from edge_qmul.models import DEFAULT_WIDTH, ModelConfig, build_model

MODELS = [("small_cnn", 1, 28), ("resnet18", 3, 32)]
SETTINGS = [(1, 1), (32, 2)]  # (batch, threads)


def interleaved_ms(
    sessions: dict[str, ort.InferenceSession], x: np.ndarray, rounds: int, reps: int
) -> dict[str, float]:
    """Median per-call latency; each round runs every session ``reps`` times, alternating."""
    for s in sessions.values():
        for _ in range(5):
            s.run(None, {"pixels": x})
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                s.run(None, {"pixels": x})
            samples[name].append((time.perf_counter() - t0) * 1e3 / reps)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_model(name: str, channels: int, size: int, out: Path, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = ModelConfig(name, channels, size, 10, (0.5,) * channels, (0.25,) * channels, DEFAULT_WIDTH[name])
    model = build_model(cfg).eval()
    calib = [torch.rand(64, channels, size, size) for _ in range(4)]
    int8 = quant.quantize_ptq(model, calib, "x86")
    res = export_models(int8, model, out / "model.int8.onnx", out / "model.fp32.onnx", (channels, size, size),
                        {"dataset": "random", "bench": name})
    counts, _ = optimized_op_counts(res.int8_path)
    row: dict[str, Any] = {
        "model": name,
        "size_int8": res.int8_path.stat().st_size,
        "size_fp32": res.fp32_path.stat().st_size,
        "optimized_int8_ops": dict(counts),
        "int8_kernels": sum(counts[k] for k in INT8_KERNELS if k in counts),
        "float_conv_gemm_left": sum(counts[k] for k in ("Conv", "Gemm", "MatMul") if k in counts),
        "latency": {},
    }
    row["size_ratio"] = row["size_fp32"] / row["size_int8"]
    for batch, threads in SETTINGS:
        x = np.random.rand(batch, channels, size, size).astype(np.float32)
        sessions = {"int8": ort_session(res.int8_path, threads), "fp32": ort_session(res.fp32_path, threads)}
        reps = 20 if name == "small_cnn" else (5 if batch == 1 else 1)
        ms = interleaved_ms(sessions, x, rounds, reps)
        row["latency"][f"batch{batch}_threads{threads}"] = {**ms, "speedup": ms["fp32"] / ms["int8"]}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, c, s in MODELS:
            d = Path(tmp) / name
            d.mkdir()
            rows.append(bench_model(name, c, s, d, args.rounds))
    lines = [
        "| model | setting | int8 ms | fp32 ms | fp32/int8 | size fp32/int8 | int8 kernels | float Conv/Gemm left |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for setting, lat in r["latency"].items():
            lines.append(
                f"| {r['model']} | {setting} | {lat['int8']:.3f} | {lat['fp32']:.3f} | {lat['speedup']:.2f}x | "
                f"{r['size_ratio']:.2f}x | {r['int8_kernels']} | {r['float_conv_gemm_left']} |"
            )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx_latency.json").write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=2))
    (args.out / "onnx_latency.md").write_text(
        f"# onnxruntime {ort.__version__}: int8 vs fp32 (x86 preset, this machine, interleaved medians)\n\n"
        f"{table}\n\nOptimised int8 op counts: "
        + "; ".join(f"{r['model']}: {json.dumps(r['optimized_int8_ops'], sort_keys=True)}" for r in rows)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
