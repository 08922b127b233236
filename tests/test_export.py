"""ONNX export, the fusion check, budgets and onnxruntime validation on a digits run."""

from __future__ import annotations

import json
import platform
import shutil
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


def test_features_onnx_is_the_int8_models_head_input(exported: Path) -> None:
    """features.onnx (what devices run for federated Q-MUL) computes the torch int8 model's head input within
    one quantization step, runs int8 like the model, and names the model it was cut from."""
    import hashlib

    import onnxruntime as ort
    import torch

    from edge_qmul import data, pipeline, quant

    path = exported / "features.onnx"
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["model_sha256"] == hashlib.sha256((exported / "model.int8.onnx").read_bytes()).hexdigest()
    counts = check_fusion(path)  # the final DequantizeLinear -> features is the only float output
    assert counts["QLinearConv"] == 2 and not {"Conv", "Gemm", "MatMul"} & set(counts)
    q = pipeline.load_quantized(exported)
    rd = pipeline.load_run_data(exported)
    result = pipeline.load_result_full(exported, "qmul", q, rd.split.forget)
    x, _ = data.to_tensors(rd.source.train, rd.split.train[:200])
    with torch.no_grad():
        quantized = quant.features_of_int8(result.int8, dequantize=False, head=q.model_cfg.head)(x)
    want = quantized.dequantize().flatten(1).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["features"], {"pixels": x.numpy()})
    assert got.shape == want.shape
    step = float(quantized.q_scale())
    assert np.abs(got - want).max() <= step * 1.01  # at most one int8 step apart (rounding in the kernels)
    assert np.mean(np.isclose(got, want, atol=step * 0.01)) > 0.95  # and almost all exactly equal


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
    from edge_qmul.evidence import fa_minus_ta_power, loss_auc_power

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
    # a value that passes by more than its noise is a conclusive pass at any size (a forgotten class: FA
    # 87 points under TA on 122 samples); a value within the noise, or failing, stays inconclusive
    assert fa_minus_ta_power(122, 360, 0.9, limit=3.0, confidence=0.95)["noise"] > 3.0
    assert "inconclusive" not in fa_minus_ta_power(122, 360, 0.9, limit=3.0, confidence=0.95, value=-87.0)
    assert "inconclusive" in fa_minus_ta_power(20, 10_000, 0.9167, limit=3.0, confidence=0.95, value=-2.0)
    assert "inconclusive" in fa_minus_ta_power(20, 10_000, 0.9167, limit=3.0, confidence=0.95, value=9.0)
    assert "inconclusive" not in loss_auc_power(20, 10_000, limit=0.6, confidence=0.95, value=0.2)


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
    assert "against the x86-server profile" in md and f"measured on this host ({platform.machine()})" in md
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


def test_validate_refuses_a_float_model_whatever_the_budgets(exported: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(exported, tmp_path)
    shutil.copy(run / "model.fp32.onnx", run / "model.int8.onnx")
    before = (run / "validation.json").read_bytes() if (run / "validation.json").exists() else None
    loose = tmp_path / "loose.toml"
    loose.write_text("max_logit_diff = 5.0\nparity_top1 = 0.0\n")
    assert main(["validate", "--run", str(run), "--device", "x86-server", "--budgets", str(loose)]) == 8
    assert "float" in capsys.readouterr().err
    after = (run / "validation.json").read_bytes() if (run / "validation.json").exists() else None
    assert after == before  # nothing written


def test_quantize_with_a_device_picks_its_engine(demo_run: Path, tmp_path: Path) -> None:
    run = copy_run(demo_run, tmp_path)
    assert main(["quantize", "--run", str(run), "--device", "rpi4"]) == 0
    import torch

    payload = torch.load(run / "quantized.pt", weights_only=True)
    assert payload["info"]["backend"] == "qnnpack"
    torch.backends.quantized.engine = "x86"


ZOO = [
    pytest.param("resnet8", 32, 1.0, 9, id="resnet8-32"),
    pytest.param("mobilenetv2", 32, 0.35, 52, id="mobilenetv2-0.35-32", marks=pytest.mark.slow),
    pytest.param("mobilenetv2", 96, 0.35, 52, id="mobilenetv2-0.35-96"),
    pytest.param("mobilenetv2", 32, 1.0, 52, id="mobilenetv2-1.0-32", marks=pytest.mark.slow),
    pytest.param("mobilenetv2", 96, 1.0, 52, id="mobilenetv2-1.0-96", marks=pytest.mark.slow),
]


def _zoo_model(name: str, size: int, alpha: float):
    import torch

    from edge_qmul.models import DEFAULT_WIDTH, ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(name, 3, size, 10, (0.5,) * 3, (0.25,) * 3, DEFAULT_WIDTH[name], width_multiplier=alpha)
    model = build_model(cfg).train()
    with torch.no_grad():
        for _ in range(10):  # settle BatchNorm statistics, as training would
            model(torch.rand(16, 3, size, size))
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight.mul_(20)  # decisive logits, so top-1 agreement measures the int8 arithmetic, not ties
    return model.eval()


@pytest.mark.parametrize(("name", "size", "alpha", "qlinear_convs"), ZOO)
def test_zoo_model_runs_int8_end_to_end(name: str, size: int, alpha: float, qlinear_convs: int, tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch
    from edge_qmul.export.onnx_export import _export_bytes, float_ops_in_int8_region, optimized_op_counts

    from edge_qmul import quant

    model = _zoo_model(name, size, alpha)
    torch.fx.symbolic_trace(model)
    calib, x = [torch.rand(8, 3, size, size)], torch.rand(32, 3, size, size)
    int8 = quant.quantize_ptq(model, calib, "x86")
    folded = [m for m in int8.modules() if type(m).__name__ == "ConvReLU2d" and m.scale == quant.RELU6_SCALE]
    assert len(folded) == (35 if name == "mobilenetv2" else 0)  # every ReLU6 folded into its conv
    qat = quant.prepare_qat(model, "x86", calib[0])
    quant.calibrate_qat(qat, calib)
    with torch.no_grad():
        ref, qat_int8 = int8(x), quant.convert(qat)(x)
    assert float((ref.argmax(1) == qat_int8.argmax(1)).float().mean()) >= 0.9  # QAT copy converts to the PTQ model

    path = tmp_path / "model.int8.onnx"
    path.write_bytes(_export_bytes(int8, x[:1]))
    counts = check_fusion(path)
    _, optimized = optimized_op_counts(path)
    assert float_ops_in_int8_region(optimized) == []
    assert counts["QLinearConv"] == qlinear_convs and counts["QGemm"] == 1 and "Clip" not in counts
    assert counts["QuantizeLinear"] == 1 and counts["DequantizeLinear"] == 1  # one way in, one way out
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"pixels": x.numpy()})
    assert float((out.argmax(1) == ref.numpy().argmax(1)).mean()) >= 0.9


def _graph_with(op: onnx.NodeProto, zero_point: int, path: Path) -> None:
    """pixels -> Q -> DQ -> op -> Q -> DQ -> logits, on uint8 with the given zero point."""
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("z", TensorProto.UINT8, [], [zero_point])
    nodes = [
        helper.make_node("QuantizeLinear", ["pixels", "s", "z"], ["q"], name="quant"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dequant"),
        op,
        helper.make_node("QuantizeLinear", ["act", "s", "z"], ["q2"], name="requant"),
        helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["logits"], name="out"),
    ]
    lo = helper.make_tensor("lo", TensorProto.FLOAT, [], [-1.0])
    hi = helper.make_tensor("hi", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [scale, zp, lo, hi],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    ("op", "named", "fix"),
    [
        (helper.make_node("Clip", ["dq", "lo", "hi"], ["act"], name="block3_relu6_clip"), "'block3_relu6_clip' (Clip)",
         "ReLU6 / hardtanh"),
        # onnxruntime inlines HardSwish into HardSigmoid + Mul (nameless nodes, named by their outputs)
        (helper.make_node("HardSwish", ["dq"], ["act"], name="block3_hardswish"), "HardSwish_HS_X' (HardSigmoid)",
         "hardswish has no int8 kernel"),
        (helper.make_node("Erf", ["dq"], ["act"], name="block3_erf"), "'block3_erf' (Erf)", "no int8 kernel"),
        (helper.make_node("Relu", ["dq"], ["act"], name="block3_relu"), "'block3_relu' (Relu)", "no int8 kernel"),
    ],
)
def test_fusion_check_refuses_float_ops_inside_the_int8_region(op: onnx.NodeProto, named: str, fix: str,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _graph_with(op, zero_point=128, path=path)  # zero point 128: onnxruntime cannot drop a Relu or a Clip
    with pytest.raises(FusionError) as err:
        check_fusion(path)
    assert named in str(err.value) and fix in str(err.value)
    assert err.value.exit_code == 8


def test_float_ops_in_int8_region_skips_shape_ops_and_the_float_ends() -> None:
    from edge_qmul.export.onnx_export import FloatOp, float_ops_in_int8_region

    def graph(*nodes: onnx.NodeProto) -> onnx.ModelProto:
        return helper.make_model(helper.make_graph(list(nodes), "g", [], []))

    node = helper.make_node
    ends = [node("Sub", ["pixels", "m"], ["a"], name="norm_sub"), node("Mul", ["a", "k"], ["b"], name="norm_mul"),
            node("QuantizeLinear", ["b", "s", "z"], ["q"], name="q_in")]
    clean = graph(*ends, node("MaxPool", ["q"], ["p"], name="pool_u8"),
                  node("DequantizeLinear", ["p", "s", "z"], ["d"]), node("Reshape", ["d", "shape"], ["r"]),
                  node("QuantizeLinear", ["r", "s", "z"], ["q2"]),
                  node("DequantizeLinear", ["q2", "s", "z"], ["logits"]), node("Softmax", ["logits"], ["probs"]))
    assert float_ops_in_int8_region(clean) == []
    dirty = graph(*ends, node("DequantizeLinear", ["q", "s", "z"], ["d"]), node("Mul", ["d", "k"], ["e"], name="scale"),
                  node("Reshape", ["e", "shape"], ["r"]), node("QuantizeLinear", ["r", "s", "z"], ["q2"]),
                  node("DequantizeLinear", ["q2", "s", "z"], ["d2"]), node("Gemm", ["d2", "w"], ["logits"], name="fc"))
    assert float_ops_in_int8_region(dirty) == [FloatOp("scale", "Mul"), FloatOp("fc", "Gemm")]


def test_a_hardswish_model_is_refused_at_export(tmp_path: Path) -> None:
    import torch
    from edge_qmul.export.onnx_export import _export_bytes

    from edge_qmul import quant
    from edge_qmul.models import Normalize

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.normalize = Normalize((0.5,), (0.25,))
            self.conv, self.act = torch.nn.Conv2d(1, 4, 3), torch.nn.Hardswish()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act(self.conv(self.normalize(x)))
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    x = torch.rand(8, 1, 8, 8)
    path = tmp_path / "hs.onnx"
    path.write_bytes(_export_bytes(quant.quantize_ptq(Block().eval(), [x], "x86"), x[:1]))
    with pytest.raises(FusionError, match=r"(?s)/act/HardSwish.*hardswish has no int8 kernel") as err:
        check_fusion(path)
    assert "HardSwish" in str(err.value) or "HardSigmoid" in str(err.value)


@pytest.fixture(scope="module")
def class_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run that forgot class 3, with Q-MUL and the retrained reference, exported and validated."""
    run = tmp_path_factory.mktemp("class") / "run"
    for argv in (["train", "--epochs", "4"], ["quantize"], ["forget", "--class", "3"],
                 ["unlearn", "--method", "retrain", "--quiet"], ["unlearn", "--method", "qmul", "--quiet"],
                 ["export", "--method", "qmul"]):
        assert main([argv[0], "--run", str(run), *argv[1:]]) == 0, argv
    return run


def test_a_class_request_is_judged_on_the_retained_classes(class_run: Path) -> None:
    """Q-MUL matching retrain after `forget --class 3` passes ta_drop with the default budgets: the forgotten
    class's test accuracy is meant to fall, so only the other classes count."""
    assert main(["validate", "--run", str(class_run), "--device", "x86-server"]) == 0
    record = json.loads((class_run / "validation.json").read_text())
    m, checks = record["metrics"], record["checks"]
    assert m["forgotten_classes"] == [3]
    assert checks["ta_drop"]["passed"] and "skipped" not in checks["ta_drop"]
    assert checks["ta_drop"]["value"] == pytest.approx(m["TA_before_retained"] - m["TA_retained"])
    assert m["TA_before"] - m["TA"] > 2.0  # all-class TA drops by the forgotten class: the old rule failed it
    gap = checks["class_fa_gap_to_retrain"]
    assert gap["passed"] and gap["value"] == pytest.approx(abs(m["FA"] - m["FA_retrain"]))
    assert "TA, retained classes" in (class_run / "validation.md").read_text()


def test_a_class_request_that_broke_other_classes_fails_ta_drop(class_run: Path, tmp_path: Path) -> None:
    """The same request, but a model that also never predicts class 5: ta_drop on the retained classes fails."""
    import copy

    import torch
    from edge_qmul.devices.profiles import load_profile
    from edge_qmul.export.stage import export_onnx
    from edge_qmul.export.validate import validate

    from edge_qmul import pipeline, quant

    q = pipeline.load_quantized(class_run)
    rd = pipeline.load_run_data(class_run)
    sets = rd.eval_sets()
    broken = copy.deepcopy(q.float_model)
    last = [m for m in broken.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[5] = -1000.0  # class 5 is never predicted
    int8 = quant.quantize_ptq(broken, list(sets.retain_x[:512].split(256)), q.backend)
    path = export_onnx(int8, tmp_path / "broken.onnx", tuple(sets.test_x.shape[1:]))  # type: ignore[arg-type]
    report = validate(path, sets, profile=load_profile("x86-server"), budgets=load_budgets(), int8=int8,
                      before=q.int8, forgotten_classes={3})
    ta_drop = report.checks["ta_drop"]
    assert not ta_drop["passed"] and ta_drop["value"] > 5.0 and not report.passed
    assert report.metrics["forgotten_classes"] == [3]
    assert report.checks["class_fa_gap_to_retrain"]["skipped"] == "no retrained reference"
    plain = validate(path, sets, profile=load_profile("x86-server"), budgets=load_budgets(), int8=int8,
                     before=q.int8)  # not told it is a class request: the class gap check does not apply
    assert plain.checks["class_fa_gap_to_retrain"]["skipped"] == "the forget set is not whole classes"
