"""The int8 model on an emulated ARM board: aarch64 onnxruntime under qemu-user vs x86 onnxruntime.

ARCHITECTURE.md §7: the on-board runtime (devices/runtime.py) runs with the aarch64 python3.11, onnxruntime and
numpy under ``qemu-aarch64-static -cpu cortex-a72`` (devices/arm/run_emulated.sh, cache built by
devices/arm/build_sysroot.sh outside the repository). A small CNN trained on digits is quantized with
PTQ for each backend (qnnpack: what ARM boards use; x86), exported to ONNX, and its logits from x86
onnxruntime on this host are the probe's reference; the emulated board must agree on the top-1 class.

Opt-in (``pytest -m arm``): the first run installs qemu-user-static and downloads ~50 MB of arm64
packages and wheels (about a minute); later runs take about 20 s (training, then ~5 s of emulation per
backend).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from edge_qmul.devices import runtime
from edge_qmul.export.onnx_export import export_models

from edge_qmul import data, quant
from edge_qmul.models import ModelConfig
from edge_qmul.train import TrainConfig, train_float

pytestmark = pytest.mark.arm

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "devices" / "arm" / "build_sysroot.sh"
RUN = REPO / "devices" / "arm" / "run_emulated.sh"
EX_NONET = 75  # build_sysroot.sh: a download failed for lack of network
N_PROBE = 256
MIN_TOP1 = 0.999


def _report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Print past pytest's capture, so the numbers are in the log of a passing run too."""
    with capsys.disabled():
        print(f"\n[arm] {line}", flush=True)


@dataclass
class ArmCache:
    path: Path
    build_seconds: float  # this session's build_sysroot.sh run (well under a second when complete)


@pytest.fixture(scope="module")
def arm_cache() -> ArmCache:
    """The aarch64 sysroot + wheel cache, built (or found complete) by build_sysroot.sh."""
    cache = Path(os.environ.get("EDGE_QMUL_ARM_CACHE", Path.home() / ".cache" / "edge-qmul" / "arm64"))
    start = time.monotonic()
    proc = subprocess.run(["bash", str(BUILD), str(cache)], capture_output=True, text=True, timeout=1800, check=False)
    took = time.monotonic() - start
    if proc.returncode == EX_NONET:
        reason = f"no network to build the ARM emulation cache at {cache}: {proc.stderr.strip().splitlines()[-1]}"
        print(reason)
        pytest.skip(reason)
    assert proc.returncode == 0, f"build_sysroot.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    print(f"ARM cache ready in {took:.1f} s: {cache}\n{(cache / 'READY').read_text()}")
    return ArmCache(cache, took)


@dataclass
class Trained:
    model: torch.nn.Module
    calib: list[torch.Tensor]
    probe_pixels: np.ndarray  # float32 (N, 1, 8, 8) in [0, 1]


@pytest.fixture(scope="module")
def trained() -> Trained:
    """A small CNN on sklearn digits (a few seconds on 2 cores)."""
    source = data.load_dataset("digits")
    split = data.make_split(source, seed=0)
    mean, std = data.channel_stats(source.train, split.train)
    cfg = ModelConfig("small_cnn", 1, 8, 10, tuple(mean), tuple(std), width=16)
    train_x, train_y = data.to_tensors(source.train, split.train)
    test_x, _ = data.to_tensors(source.train, split.test)
    model, _ = train_float(cfg, TrainConfig(epochs=6, lr=0.05, batch_size=64), train_x, train_y, quiet=True)
    assert len(test_x) >= N_PROBE
    return Trained(model.eval(), list(train_x[:512].split(256)), test_x[:N_PROBE].numpy().astype(np.float32))


@pytest.fixture()
def restore_engine() -> Iterator[None]:
    """quantize_ptq sets torch's global quantized engine: give other tests back the one they had."""
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


@pytest.mark.parametrize("backend", ["qnnpack", "x86"])
def test_int8_model_on_emulated_cortex_a72_matches_x86(
    backend: str,
    arm_cache: ArmCache,
    trained: Trained,
    restore_engine: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    int8 = quant.quantize_ptq(trained.model, trained.calib, backend)
    exported = export_models(int8, trained.model, tmp_path / "model.int8.onnx", tmp_path / "model.fp32.onnx",
                             input_shape=(1, 8, 8), metadata={"dataset": "digits"})
    model_path = exported.int8_path

    # The x86 reference: this host's onnxruntime with the session settings the runtime itself uses.
    blob, digest = runtime.read_model(model_path, None)
    session = runtime.create_session(blob, model_path, threads=1)
    reference = runtime.infer_all(session, model_path, trained.probe_pixels, batch=0).astype(np.float32)
    probe = tmp_path / "probe.npz"
    np.savez(probe, pixels=trained.probe_pixels, reference_logits=reference)

    out = tmp_path / "result.json"
    runtime_args = ["--model", str(model_path), "--probe", str(probe), "--sha256", digest]
    runtime_args += ["--threads", "1", "--runs", "20", "--warmup", "2", "--min-top1", str(MIN_TOP1), "--out", str(out)]
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(RUN), str(arm_cache.path), "--", *runtime_args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    took = time.monotonic() - start
    print(proc.stdout, proc.stderr, sep="\n")
    assert proc.returncode == 0, f"emulated runtime exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"

    result = json.loads(out.read_text())
    assert result["machine"] == "aarch64"
    assert result["sha256_verified"] and result["sha256"] == digest
    assert result["n_probe"] == N_PROBE
    assert result["top1_agreement"] >= MIN_TOP1
    assert result["max_abs_diff"] is not None  # finite logits
    _report(
        capsys,
        f"{backend}: aarch64 (qemu cortex-a72, onnxruntime {result['onnxruntime_version']}, "
        f"numpy {result['numpy_version']}) vs x86: top-1 agreement {result['top1_agreement']:.4f} on "
        f"{result['n_probe']} images, max |dlogit| {result['max_abs_diff']:.3g}, "
        f"emulated latency p50 {result['latency_ms_p50']:.2f} ms; emulated run {took:.1f} s "
        f"(cache build/check {arm_cache.build_seconds:.1f} s)",
    )
