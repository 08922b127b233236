"""The on-board runtime: a real (tiny) ONNX model, a probe set, and the CLI's verdicts and exit codes.

The main test runs the module in a subprocess and checks that torch (and onnx) were never imported:
the board has only onnxruntime and numpy.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edge_qmul.devices import runtime
from onnx import TensorProto, helper, numpy_helper

N_PROBE = 24

# Runs the module as __main__ and reports, whatever happens, which heavy packages got imported.
WRAPPER = textwrap.dedent(
    """
    import runpy, sys
    try:
        runpy.run_module("edge_qmul.devices.runtime", run_name="__main__", alter_sys=True)
    finally:
        print("IMPORTED", sorted(m for m in ("torch", "onnx", "edge_qmul.errors") if m in sys.modules))
    """
)


def make_model(path: Path, input_name: str = "pixels", seed: int = 0) -> Path:
    """pixels [N,1,8,8] float32 -> Flatten -> Gemm(64 -> 10) -> logits [N,10], dynamic batch."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.normal(size=(64, 10)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.normal(size=(10,)).astype(np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [input_name], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def make_probe(path: Path, model: Path, tamper: bool = False) -> Path:
    pixels = np.random.default_rng(1).random((N_PROBE, 1, 8, 8), dtype=np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixels": pixels})
    if tamper:  # move row 0's argmax to another class
        top = int(np.argmax(logits[0]))
        logits[0, (top + 1) % 10] = logits[0, top] + 5.0
    np.savez(path, pixels=pixels, reference_logits=logits.astype(np.float32))
    return path


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    model = make_model(tmp_path / "model.int8.onnx")
    return {"model": model, "probe": make_probe(tmp_path / "probe.npz", model), "out": tmp_path / "out" / "result.json"}


def cli(files: dict[str, Path], *extra: str) -> list[str]:
    args = ["--model", str(files["model"]), "--probe", str(files["probe"]), "--out", str(files["out"])]
    return [*args, "--runs", "10", "--warmup", "2", *extra]


def run_subprocess(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, timeout=60)


def test_cli_passes_without_torch(files: dict[str, Path]) -> None:
    digest = hashlib.sha256(files["model"].read_bytes()).hexdigest()
    proc = run_subprocess(cli(files, "--sha256", digest.upper(), "--threads", "1"))
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stdout  # neither torch nor onnx nor the torch-side error module
    assert "PASS" in proc.stdout
    result = json.loads(files["out"].read_text())
    assert result["passed"] is True and result["reasons"] == []
    assert result["top1_agreement"] == 1.0
    assert result["within_atol"] is True and result["max_abs_diff"] <= 1e-4
    assert result["sha256"] == digest and result["sha256_verified"] is True
    assert result["n_probe"] == N_PROBE and result["num_classes"] == 10
    assert 0 < result["latency_ms_p50"] <= result["latency_ms_p95"]
    assert result["latency_ms_mean"] > 0 and result["latency_batch"] == 1 and result["runs"] == 10
    assert result["peak_rss_mb"] > 10
    for key in ("machine", "onnxruntime_version", "numpy_version", "python_version"):
        assert result[key]
    assert result["onnxruntime_version"] == ort.__version__
    assert not list(files["out"].parent.glob("*.tmp"))  # the atomic write left no temp file


def test_wrong_sha256_refused_before_loading(files: dict[str, Path]) -> None:
    proc = run_subprocess(cli(files, "--sha256", "0" * 64))
    assert proc.returncode == 2
    assert "sha256 mismatch" in proc.stderr and str(files["model"]) in proc.stderr
    assert "fix:" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not files["out"].exists()


def test_tampered_reference_fails_the_check(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    make_probe(files["probe"], files["model"], tamper=True)
    assert runtime.main(cli(files)) == 1
    result = json.loads(files["out"].read_text())
    assert result["passed"] is False
    assert result["top1_agreement"] == pytest.approx((N_PROBE - 1) / N_PROBE)
    assert any("agreement" in reason for reason in result["reasons"])
    assert result["within_atol"] is False and result["warnings"]
    assert "FAIL" in capsys.readouterr().out


def test_top1_agreement_counts_a_class_tied_for_the_top() -> None:
    """int8 logits sit on a grid, so exact ties at the top happen (8 of 360 digits test samples for a
    fine-tuned model here); one backend breaking a tie by one output step is agreement, a different
    winner is not."""
    step = 0.105
    reference = np.array([
        [2 * step, 2 * step, 0.0],  # tie between classes 0 and 1
        [2 * step, 2 * step, 0.0],
        [3 * step, step, 0.0],  # clear winner 0
        [3 * step, step, 0.0],
    ], dtype=np.float32)
    board = np.array([
        [step, 2 * step, 0.0],  # picks 1: one of the tied classes -> agrees
        [step, step, 2 * step],  # picks 2: not tied in the reference -> disagrees
        [3 * step, 3 * step, 0.0],  # ties 0 and 1: contains the reference's winner -> agrees
        [step, 3 * step, 0.0],  # picks 1 -> disagrees
    ], dtype=np.float32)
    assert runtime.top1_agrees(board, reference).tolist() == [True, False, True, False]
    assert runtime.top1_agrees(reference, board).tolist() == [True, False, True, False]  # symmetric
    assert (np.argmax(board, 1) == np.argmax(reference, 1)).tolist() == [False, False, True, False]
    assert runtime.top1_agrees(board[:0], reference[:0]).shape == (0,)


def test_atol_exceeded_is_reported_but_passes(files: dict[str, Path]) -> None:
    result = runtime.run_check(files["model"], files["probe"], runs=3, warmup=0, atol=0.0)
    if result["max_abs_diff"] == 0.0:  # bit-identical on this machine: nothing to exceed
        assert result["within_atol"] is True
    else:
        assert result["passed"] is True and result["within_atol"] is False


def test_non_onnx_file_is_bad_input(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    files["model"].write_bytes(b"this is not a protobuf \x00\xff" * 10)
    assert runtime.main(cli(files)) == 2
    err = capsys.readouterr().err
    assert "not a valid ONNX model" in err and str(files["model"]) in err and "fix:" in err
    assert len(err.strip().splitlines()) == 1
    assert not files["out"].exists()


def test_wrong_input_name_is_bad_input(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    make_model(files["model"], input_name="input")
    assert runtime.main(cli(files)) == 2
    err = capsys.readouterr().err
    assert "'pixels'" in err and "input" in err and str(files["model"]) in err
    assert not files["out"].exists()


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"pixels": np.zeros((2, 1, 8, 8), np.float32)}, "lacks array"),
        ({"pixels": np.zeros((2, 1, 8, 8)), "reference_logits": np.zeros((2, 10), np.float32)}, "float32"),
        ({"pixels": np.zeros((2, 1, 4, 4), np.float32), "reference_logits": np.zeros((2, 10), np.float32)}, "shape"),
        ({"pixels": np.zeros((2, 1, 8, 8), np.float32), "reference_logits": np.zeros((3, 10), np.float32)}, "rows"),
        ({"pixels": np.zeros((2, 1, 8, 8), np.float32), "reference_logits": np.zeros((2, 5), np.float32)}, "classes"),
    ],
)
def test_bad_probe_is_bad_input(files: dict[str, Path], arrays: dict, match: str) -> None:
    np.savez(files["probe"], **arrays)
    with pytest.raises(runtime.BadInputError, match=match) as info:
        runtime.run_check(files["model"], files["probe"], runs=1, warmup=0)
    assert str(files["probe"]) in info.value.message or str(files["model"]) in info.value.message


def test_missing_files_are_bad_input(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert runtime.main(cli({**files, "model": tmp_path / "gone.onnx"})) == 2
    assert "model file not found" in capsys.readouterr().err
    files["probe"].write_text("not npz")
    assert runtime.main(cli(files)) == 2
    assert "not a readable .npz" in capsys.readouterr().err
    assert runtime.main(cli(files, "--sha256", "xyz")) == 2
    assert "not a sha256 digest" in capsys.readouterr().err
    assert not files["out"].exists()


def test_write_json_atomic_replaces(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    runtime.write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
