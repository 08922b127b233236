"""onnxruntime int8 versus fp32: latency, file size, int8 kernels and float ops in the int8 region.

Models: the small CNN (28x28) and CIFAR ResNet-18 (32x32) at batch 1 / 1 thread and batch 32 / 2 threads;
the edge models at batch 1 / 1 thread (what a board runs per frame): ResNet-8 (MLPerf Tiny, 32x32) and
MobileNetV2 at 96x96 (width 1.0 and 0.35, ImageNet strides) and 32x32 (width 0.35, CIFAR strides). The
float model and its x86 int8 model (torch.ao FX PTQ, ReLU6 folded into the conv output ranges) are exported
with the exporter `edge-qmul export` uses; each pair of sessions is timed alternately (int8, fp32, int8,
fp32, ...) so machine noise hits both alike. Weights are random (BatchNorm statistics settled on random
images) and calibration uses random images: latency does not depend on what the model learned.

Where int8 is not faster than fp32, the row carries onnxruntime's own profile (enable_profiling), time per
op type for both models, so the table says which kernels lose.

    python bench/onnx_latency.py        # ~5 min on 2 cores; writes bench/results/onnx_latency.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from edge_qmul.export.onnx_export import (
    INT8_KERNELS,
    _export_bytes,
    check_fusion,
    float_ops_in_int8_region,
    optimized_op_counts,
)
from edge_qmul.export.validate import ort_session

from edge_qmul import quant
from edge_qmul.models import DEFAULT_WIDTH, ModelConfig, build_model

SEED = 0
# (name, channels, image size, width multiplier, settings as (batch, threads))
MODELS: list[tuple[str, int, int, float, list[tuple[int, int]]]] = [
    ("small_cnn", 1, 28, 1.0, [(1, 1), (32, 2)]),
    ("resnet18", 3, 32, 1.0, [(1, 1), (32, 2)]),
    ("resnet8", 3, 32, 1.0, [(1, 1)]),
    ("mobilenetv2", 3, 96, 1.0, [(1, 1)]),
    ("mobilenetv2", 3, 96, 0.35, [(1, 1)]),
    ("mobilenetv2", 3, 32, 0.35, [(1, 1)]),
]
ARM_NOTE = (
    "x86 onnxruntime (MLAS) runs QLinearConv's depthwise 3x3 convs and 1x1 convs with few channels through "
    "int8 kernels that gain little over its well-vectorised fp32 ones, and pays a requantize per conv; "
    "on ARM (Cortex-A72/A76 boards) MLAS has dedicated int8 depthwise kernels and uses NEON dot-product "
    "(SDOT / UDOT, and i8mm on A76+) for the pointwise convs, where int8 moves 4x less data and runs 2-4x "
    "more MACs per instruction than fp32, so the same graph is expected to be faster in int8 there."
)


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


def profile_by_op(path: Path, x: np.ndarray, runs: int, tmp: Path) -> dict[str, float]:
    """Mean ms per inference spent in each op type (onnxruntime's profiler, 1 thread, after 5 warm-up runs)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / path.stem)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs + 5):
        sess.run(None, {"pixels": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-runs:]
    total: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(
            lo <= e["ts"] <= hi for lo, hi in windows
        ):
            total[e["args"]["op_name"]] += e["dur"] / 1e3
    return {op: ms / len(windows) for op, ms in sorted(total.items(), key=lambda kv: -kv[1])}


def bench_model(name: str, channels: int, size: int, alpha: float, settings: list[tuple[int, int]], out: Path,
                rounds: int) -> dict[str, Any]:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    cfg = ModelConfig(name, channels, size, 10, (0.5,) * channels, (0.25,) * channels, DEFAULT_WIDTH[name],
                      width_multiplier=alpha)
    model = build_model(cfg).train()
    with torch.no_grad():
        for _ in range(10):  # BatchNorm statistics of a model that has seen data
            model(torch.rand(16, channels, size, size))
    model.eval()
    calib = [torch.rand(64, channels, size, size) for _ in range(4)]
    int8 = quant.quantize_ptq(model, calib, "x86")
    example = torch.rand(1, channels, size, size)
    int8_path, fp32_path = out / "model.int8.onnx", out / "model.fp32.onnx"
    int8_path.write_bytes(_export_bytes(int8.eval(), example))
    fp32_path.write_bytes(_export_bytes(model, example))
    counts = check_fusion(int8_path)  # refuses any float op inside the int8 region
    _, optimized = optimized_op_counts(int8_path)
    label = f"{name}-{alpha:g}" if name == "mobilenetv2" else name
    row: dict[str, Any] = {
        "model": label,
        "input": [channels, size, size],
        "width_multiplier": alpha,
        "params": sum(p.numel() for p in model.parameters()),
        "size_int8": int8_path.stat().st_size,
        "size_fp32": fp32_path.stat().st_size,
        "optimized_int8_ops": dict(counts),
        "int8_kernels": sum(counts[k] for k in INT8_KERNELS if k in counts),
        "float_ops_in_int8_region": len(float_ops_in_int8_region(optimized)),
        "latency": {},
    }
    row["size_ratio"] = row["size_fp32"] / row["size_int8"]
    for batch, threads in settings:
        x = np.random.rand(batch, channels, size, size).astype(np.float32)
        sessions = {"int8": ort_session(int8_path, threads), "fp32": ort_session(fp32_path, threads)}
        reps = 20 if name == "small_cnn" else (5 if batch == 1 else 1)
        ms = interleaved_ms(sessions, x, rounds, reps)
        row["latency"][f"batch{batch}_threads{threads}"] = {**ms, "speedup": ms["fp32"] / ms["int8"]}
    b1 = row["latency"]["batch1_threads1"]
    if b1["speedup"] < 1.1:  # not faster by more than timing noise: say which kernels lose
        x = np.random.rand(1, channels, size, size).astype(np.float32)
        row["profile_ms_per_run_by_op"] = {
            "int8": profile_by_op(int8_path, x, 50, out), "fp32": profile_by_op(fp32_path, x, 50, out)
        }
    return row


def provenance() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "seeds": {"torch": SEED, "numpy": SEED},
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(),
                    "vnni": any(f in flags for f in ("avx512_vnni", "avx_vnni")), "avx2": "avx2" in flags,
                    "load_avg_1min_at_start": os.getloadavg()[0]},
        "quantization": "x86 preset (uint8 activations, 7-bit range; folded ReLU6 on the full [0, 6] grid; int8 "
                        "per-channel weights)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    prov = provenance()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, c, s, alpha, settings in MODELS:
            d = Path(tmp) / f"{name}-{alpha}-{s}"
            d.mkdir()
            rows.append(bench_model(name, c, s, alpha, settings, d, args.rounds))
            print(f"{rows[-1]['model']} {s}x{s}: done", file=sys.stderr)
    lines = [
        "| model | input | setting | int8 ms | fp32 ms | fp32/int8 | size int8 / fp32 (KB) | size fp32/int8 | "
        "int8 kernels | float ops in int8 region |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for setting, lat in r["latency"].items():
            lines.append(
                f"| {r['model']} | {r['input'][1]}x{r['input'][2]} | {setting} | {lat['int8']:.3f} | "
                f"{lat['fp32']:.3f} | {lat['speedup']:.2f}x | {r['size_int8'] / 1024:.0f} / "
                f"{r['size_fp32'] / 1024:.0f} | {r['size_ratio']:.2f}x | {r['int8_kernels']} | "
                f"{r['float_ops_in_int8_region']} |"
            )
    table = "\n".join(lines)
    print(table)
    profiles = []
    for r in rows:
        prof = r.get("profile_ms_per_run_by_op")
        if not prof:
            continue
        ops = sorted(set(prof["int8"]) | set(prof["fp32"]), key=lambda op: -max(prof["int8"].get(op, 0),
                                                                                   prof["fp32"].get(op, 0)))
        profiles.append(f"\n### {r['model']} {r['input'][1]}x{r['input'][2]}: where the time goes (ms per "
                        "inference, batch 1, 1 thread, onnxruntime profiler)\n\n| op type | int8 | fp32 |\n"
                        "|---|---|---|")
        profiles += [f"| {op} | {prof['int8'].get(op, 0):.3f} | {prof['fp32'].get(op, 0):.3f} |" for op in ops]
    m = prov["machine"]
    header = (
        f"# onnxruntime {ort.__version__}: int8 vs fp32 (x86 preset, interleaved medians)\n\n"
        f"Commit {prov['commit'][:12]}, {prov['date']}; {m['cpu']}, {m['cores']} cores ({m['arch']}, AVX2 "
        f"{m['avx2']}, VNNI {m['vnni']}, load {m['load_avg_1min_at_start']:.1f} at start); torch "
        f"{torch.__version__}, onnx {onnx.__version__}, numpy {np.__version__}; seed {SEED}.\n\n"
    )
    slow = [r["model"] + f" {r['input'][1]}x{r['input'][2]}" for r in rows if "profile_ms_per_run_by_op" in r]
    why = ""
    if slow:
        why = f"\n\n## Where int8 is not faster than fp32 (< 1.1x: {', '.join(slow)})\n\n{ARM_NOTE}\n"
        why += "\n".join(profiles)
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "onnx_latency.json").write_text(
        json.dumps({"provenance": prov, "arm_note": ARM_NOTE, "rows": rows}, indent=2)
    )
    (args.out / "onnx_latency.md").write_text(
        header + table + "\n\nEvery int8 graph passed check_fusion: no float op between the input's QuantizeLinear "
        "and the output's DequantizeLinear (MobileNetV2's 35 ReLU6 are folded into their convs).\n"
        + why + "\n\nOptimised int8 op counts: "
        + "; ".join(f"{r['model']}@{r['input'][1]}: {json.dumps(r['optimized_int8_ops'], sort_keys=True)}"
                    for r in rows)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
