"""ONNX export, the fusion check, budgets and onnxruntime validation on a digits run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import copy_run
from edge_qmul.export.budgets import CHECKS, load_budgets
from edge_qmul.export.onnx_export import FusionError, OnnxModelError, check_contract, check_fusion
from onnx import TensorProto, helper

from edge_qmul.cli import main
from edge_qmul.errors import ConfigError


@pytest.fixture(scope="module")
def exported(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = copy_run(demo_run, tmp_path_factory.mktemp("export"))
    assert main(["export", "--run", str(run)]) == 0
    return run


def test_export_writes_both_models_with_metadata(exported: Path) -> None:
    proto = onnx.load(str(exported / "model.int8.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["method"] == "qmul" and meta["dataset"] == "digits" and meta["quantization_backend"] == "x86"
    assert json.loads(meta["input_shape"]) == [None, 1, 8, 8]
    assert len(json.loads(meta["class_names"])) == 10
    assert json.loads(meta["honoured_request_ids"])
    assert {"toolkit_version", "config_hash", "validation_digest"} <= set(meta)
    assert proto.opset_import[0].version == 17
    assert (exported / "model.fp32.onnx").stat().st_size > (exported / "model.int8.onnx").stat().st_size


def test_optimised_int8_graph_runs_int8_kernels_only(exported: Path) -> None:
    counts = check_fusion(exported / "model.int8.onnx")
    assert counts["QLinearConv"] == 2 and counts["QGemm"] == 2
    assert not {"Conv", "Gemm", "MatMul"} & set(counts)


def test_dynamic_batch(exported: Path) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(exported / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        (out,) = sess.run(None, {"pixels": np.random.rand(n, 1, 8, 8).astype(np.float32)})
        assert out.shape == (n, 10)


def _float_conv_after_dequantize(path: Path) -> None:
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 3, 3], np.ones(18, dtype=np.float32))
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("z", TensorProto.UINT8, [], [0])
    nodes = [
        helper.make_node("QuantizeLinear", ["pixels", "s", "z"], ["q"], name="quant"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dequant"),
        helper.make_node("Conv", ["dq", "w"], ["logits"], name="float_conv"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [w, scale, zp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what the installed onnxruntime reads
    onnx.save(model, str(path))


def test_fusion_check_names_the_float_node(tmp_path: Path) -> None:
    path = tmp_path / "float_conv.onnx"
    _float_conv_after_dequantize(path)
    with pytest.raises(FusionError, match="float_conv"):
        check_fusion(path)


def test_contract_errors(exported: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not a protobuf" * 10)
    with pytest.raises(OnnxModelError, match="junk.onnx"):
        check_contract(junk)
    with pytest.raises(OnnxModelError, match=r"expected \[batch, 1, 28, 28\]"):
        check_contract(exported / "model.int8.onnx", (1, 28, 28))


def test_budgets_defaults_and_unknown_check(tmp_path: Path) -> None:
    budgets = load_budgets()
    assert set(budgets.limits) == set(CHECKS)
    bad = tmp_path / "b.toml"
    bad.write_text("[budgets]\nlatency_p99 = 3\n")
    with pytest.raises(ConfigError) as err:
        load_budgets(bad)
    assert "latency_p99" in str(err.value) and "latency_ms_p95" in str(err.value)
    assert budgets.confidence == 0.95
    point = tmp_path / "point.toml"
    point.write_text("[budgets]\nconfidence = 0.5\n")
    assert load_budgets(point).confidence == 0.5 and set(load_budgets(point).limits) == set(CHECKS)
    for value in ("1.5", "0.2", '"high"'):
        bad.write_text(f"[budgets]\nconfidence = {value}\n")
        with pytest.raises(ConfigError) as err:
            load_budgets(bad)
        assert "confidence" in str(err.value) and str(bad) in str(err.value)


def test_forget_set_checks_are_inconclusive_only_where_their_verdict_would_be_noise() -> None:
    from edge_qmul.export.validate import fa_minus_ta_power, loss_auc_power

    # one request of 20 samples, TA 91.67%: a perfectly forgotten set scatters by ~10 points of FA − TA,
    # so a 3-point limit cannot be judged; from ~235 samples on it can
    small = fa_minus_ta_power(20, 10_000, 0.9167, limit=3.0, confidence=0.95)
    assert small["noise"] > 3.0 and "235 or more samples" in small["inconclusive"]
    assert "inconclusive" not in fa_minus_ta_power(235, 10_000, 0.9167, limit=3.0, confidence=0.95)
    assert "inconclusive" not in fa_minus_ta_power(5400, 10_000, 0.92, limit=3.0, confidence=0.95)
    # confidence 0.5 judges every size; a limit at or below the ideal value is always judged
    assert "inconclusive" not in fa_minus_ta_power(20, 10_000, 0.9167, limit=3.0, confidence=0.5)
    assert "23 or more samples" in loss_auc_power(20, 10_000, limit=0.6, confidence=0.95)["inconclusive"]
    assert "inconclusive" not in loss_auc_power(20, 10_000, limit=0.0, confidence=0.95)


def test_validate_passes_writes_reports_and_fails_on_a_tight_budget(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loose = tmp_path / "loose.toml"
    loose.write_text("[budgets]\nmia_gap_to_retrain = 100\nfa_minus_ta = 100\nloss_auc = 1\n")
    assert main(["validate", "--run", str(exported), "--device", "x86-server", "--budgets", str(loose)]) == 0
    out = capsys.readouterr().out
    assert "✓ parity_top1" in out
    report = json.loads((exported / "validation.json").read_text())
    assert report["passed"] is True
    assert set(report["checks"]) == set(CHECKS)
    for name in ("fa_minus_ta", "loss_auc"):
        c = report["checks"][name]
        assert c["confidence"] == 0.95 and c["noise"] > 0
    m = report["metrics"]
    for key in ("FA", "RA", "TA", "MIA", "loss_auc", "tpr_at_1fpr", "parity_top1", "latency_ms_p50",
                "latency_ms_p95", "size_bytes"):
        assert key in m
    assert m["parity_top1"] >= 99.5
    assert "moved_forgetting" in m["quantization_shift"]
    md = (exported / "validation.md").read_text()
    for png in ("validation_roc.png", "validation_per_class.png", "validation_conf.png"):
        assert png in md and (exported / png).stat().st_size > 1000
    probe = np.load(exported / "probe.npz", allow_pickle=False)
    assert probe["pixels"].shape[1:] == (1, 8, 8) and probe["reference_logits"].shape[1] == 10

    tight = tmp_path / "tight.toml"
    tight.write_text("[budgets]\nloss_auc = 0.0\n")
    assert main(["validate", "--run", str(exported), "--device", "x86-server", "--budgets", str(tight)]) == 9
    captured = capsys.readouterr()
    assert "✗ loss_auc" in captured.out and "loss_auc" in captured.err
    assert json.loads((exported / "validation.json").read_text())["checks"]["loss_auc"]["passed"] is False


def test_validate_refuses_a_profile_with_a_misspelt_key(exported: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from edge_qmul.devices.profiles import load_profile

    text = Path(str(load_profile.__globals__["_shipped_dir"]() / "rpi4.toml")).read_text()
    bad = tmp_path / "board.toml"
    bad.write_text(text.replace("threads", "thread", 1))
    assert main(["validate", "--run", str(exported), "--device", str(bad)]) == 2
    assert "thread" in capsys.readouterr().err


def test_validate_refuses_a_file_that_is_not_onnx(exported: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(exported, tmp_path)
    (run / "model.int8.onnx").write_bytes(b"\x00" * 100)
    assert main(["validate", "--run", str(run), "--device", "rpi4"]) == 8
    assert "model.int8.onnx" in capsys.readouterr().err


def test_quantize_with_a_device_picks_its_engine(demo_run: Path, tmp_path: Path) -> None:
    run = copy_run(demo_run, tmp_path)
    assert main(["quantize", "--run", str(run), "--device", "rpi4"]) == 0
    import torch

    payload = torch.load(run / "quantized.pt", weights_only=True)
    assert payload["info"]["backend"] == "qnnpack"
    torch.backends.quantized.engine = "x86"
