"""ONNX export of a run's int8 model (what ships to a board) and of its float model (for comparison).

Contract (ARCHITECTURE.md §3): input ``pixels`` float32 NCHW in [0, 1] with the normalisation inside the graph,
output ``logits`` float32 [batch, classes], dynamic batch, opset 17, ``metadata_props`` describing
where the model came from. After export, onnxruntime's optimised graph is inspected: any op that
computes in float inside the int8 region (between the input's QuantizeLinear and the output's
DequantizeLinear), or a float layer fed by a DequantizeLinear, fails the export with the node's name,
its op type and the fix (``float_ops_in_int8_region``).
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import onnx
import torch
from google.protobuf.message import DecodeError
from torch import nn

from edge_qmul import __version__
from edge_qmul.atomic import write_bytes
from edge_qmul.errors import CheckpointError, ExportError

OPSET = 17
INPUT, OUTPUT = "pixels", "logits"
FEATURES = "features"  # the feature extractor's output: the int8 head's input, dequantized (``export_models``)
FLOAT_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"}  # refused on dequantized input anywhere
QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Pure data movement: no arithmetic, whatever the element type (on uint8 they are outside any float path anyway).
SHAPE_ONLY = {
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Concat", "Slice", "Split",
    "Gather", "Expand", "Tile", "Shape", "Size",
}
INT8_KERNELS = {
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "ConvInteger", "MatMulInteger",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearMul", "QLinearConcat", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearSoftmax",
}


class FusionError(ExportError):
    """A quantized layer still runs in float after onnxruntime's graph optimisation."""


class OnnxModelError(ExportError):
    """A file is not an ONNX model of the expected shape."""


class FloatOp(NamedTuple):
    """An op of onnxruntime's optimised graph that computes in float where the model should run int8."""

    name: str
    op_type: str


def float_ops_in_int8_region(optimized: onnx.ModelProto) -> list[FloatOp]:
    """Every node of an (optimised) int8 graph that computes in float inside its int8 region.

    A tensor is *dequantized* if it is a DequantizeLinear output or an output of a non-Q/DQ node reading a
    dequantized tensor; it *reaches a QuantizeLinear* if it feeds one directly or through non-Q/DQ nodes.
    A node is reported when it reads a dequantized tensor and either writes a tensor that reaches a
    QuantizeLinear (float between two int8 ops: Clip, HardSigmoid, Mul, Relu, Add, Sigmoid, Conv, ...) or
    is a float layer (Conv / Gemm / MatMul / Add) after the last DequantizeLinear. Shape-only ops
    (``SHAPE_ONLY``) do no arithmetic and are not reported; the normalisation before the input's first
    QuantizeLinear and the final DequantizeLinear → ``logits`` are outside the region. Empty when the model
    runs int8 end to end.
    """
    nodes = list(optimized.graph.node)
    dequantized: set[str] = set()
    for node in nodes:  # ONNX graphs are stored in topological order
        if node.op_type == "DequantizeLinear" or (
            node.op_type not in QDQ and any(i in dequantized for i in node.input)
        ):
            dequantized.update(o for o in node.output if o)
    reaches_q: set[str] = set()
    for node in reversed(nodes):
        if node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
            reaches_q.update(node.input[:1])
        elif node.op_type not in QDQ and any(o in reaches_q for o in node.output):
            reaches_q.update(i for i in node.input if i)
    return [
        FloatOp(node.name or node.output[0], node.op_type)
        for node in nodes
        if node.op_type not in QDQ | SHAPE_ONLY
        and any(i in dequantized for i in node.input)
        and (node.op_type in FLOAT_COMPUTE or any(o in reaches_q for o in node.output))
    ]


def _fix_for(op: FloatOp) -> str:
    if op.op_type == "Clip" or "relu6" in op.name.lower() or "hardtanh" in op.name.lower():
        return ("ReLU6 / hardtanh(0, 6) / clamp(0, 6) run in int8 only as edge-qmul quantizes them: folded into the "
                "output range of the conv / linear right before them, or requantized to a fixed [0, 6] grid; "
                "other clamp bounds have no int8 kernel: use ReLU6 or ReLU, or keep the clamp outside the int8 "
                "region")
    if op.op_type in ("HardSwish", "HardSigmoid") or "hardswish" in op.name.lower():
        return ("hardswish has no int8 kernel in onnxruntime: use ReLU6 (folded into the conv before it) or ReLU, "
                "or keep it outside the int8 region")
    if op.op_type in FLOAT_COMPUTE:
        return ("this layer runs in float: check the quantization backend preset (x86: uint8 activations, int8 "
                "per-channel weights) and that the layer is covered by the qconfig")
    return ("this op has no int8 kernel in onnxruntime; replace it or keep it outside the int8 region (before the "
            "input's QuantizeLinear or after the output's DequantizeLinear)")


@dataclass(frozen=True)
class ExportResult:
    int8_path: Path
    fp32_path: Path
    op_counts: dict[str, int]  # op types of the optimised int8 graph
    int8_kernels: int
    features_path: Path | None = None  # the int8 feature extractor (``features.onnx``), when exported


def _export_bytes(model: nn.Module, example: torch.Tensor, output: str = OUTPUT) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(  # the TorchScript exporter also writes to file-like objects
        model,
        (example,),
        buf,  # type: ignore[arg-type]
        opset_version=OPSET,
        dynamo=False,  # the TorchScript exporter understands torch.ao's converted int8 modules
        input_names=[INPUT],
        output_names=[output],
        dynamic_axes={INPUT: {0: "batch"}, output: {0: "batch"}},
    )
    return buf.getvalue()


def _with_metadata(blob: bytes, metadata: dict[str, str]) -> bytes:
    proto = onnx.load_from_string(blob)
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def optimized_op_counts(path: Path, level: str = "extended") -> tuple[Counter[str], onnx.ModelProto]:
    """Op types of the graph onnxruntime actually runs (written via ``optimized_model_filepath``)."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except (ort_state.Fail, ort_state.InvalidGraph, ort_state.InvalidArgument, ort_state.InvalidProtobuf,
                ort_state.NoSuchFile) as err:
            raise OnnxModelError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0][:300]}",
                                 "export the model again with `edge-qmul export`") from err
        optimized = onnx.load(opts.optimized_model_filepath)
    return Counter(n.op_type for n in optimized.graph.node), optimized


def check_fusion(path: Path) -> Counter[str]:
    """Raise FusionError if onnxruntime's optimised graph computes in float inside the int8 region
    (``float_ops_in_int8_region``) or has no int8 kernel at all; return its op counts."""
    counts, optimized = optimized_op_counts(path)
    found = float_ops_in_int8_region(optimized)
    if found:
        listed = ", ".join(f"{op.name!r} ({op.op_type})" for op in found[:8])
        more = f" and {len(found) - 8} more" if len(found) > 8 else ""
        fixes: dict[str, list[str]] = {}
        for op in found:
            kinds = fixes.setdefault(_fix_for(op), [])
            if op.op_type not in kinds:
                kinds.append(op.op_type)
        raise FusionError(
            f"{path}: {len(found)} op(s) compute in float inside the int8 region: {listed}{more}",
            "; ".join(f"{', '.join(kinds)}: {fix}" for fix, kinds in fixes.items()),
        )
    if not INT8_KERNELS & set(counts):
        raise FusionError(f"{path}: the optimised graph has no int8 kernels ({dict(counts)})", "re-run quantize")
    return counts


def _static_dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """A tensor's dims as written in the file: a number, or None for a named (dynamic) or missing one."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def check_contract(
    path: Path, input_shape: tuple[int, int, int] | None = None, num_classes: int | None = None
) -> onnx.ModelProto:
    """Load an ONNX file and check the I/O contract; errors name the file and the fix.

    ``input_shape`` (C, H, W) and ``num_classes``, when known, pin the input's and the output's static dims:
    ``logits`` must be [batch, num_classes], with the class dimension written in the file (as export does).
    """
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except (OSError, ValueError, DecodeError, onnx.checker.ValidationError) as err:
        raise OnnxModelError(
            f"{path} is not a valid ONNX model ({err.__class__.__name__})",
            "pass the model.int8.onnx written by `edge-qmul export`",
        ) from err
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if [i.name for i in inputs] != [INPUT] or [o.name for o in proto.graph.output] != [OUTPUT]:
        raise OnnxModelError(
            f"{path} has inputs {[i.name for i in inputs]} / outputs {[o.name for o in proto.graph.output]}",
            f"the contract is one input {INPUT!r} and one output {OUTPUT!r}; export with `edge-qmul export`",
        )
    if input_shape is not None:
        dims = _static_dims(inputs[0])
        if len(dims) != 4 or tuple(dims[1:]) != tuple(input_shape):
            raise OnnxModelError(
                f"{path} takes input shape {dims}, expected [batch, {', '.join(map(str, input_shape))}]",
                "export the model trained on this dataset",
            )
    if num_classes is not None:
        out = _static_dims(proto.graph.output[0])
        if len(out) != 2 or out[1] != num_classes:
            raise OnnxModelError(
                f"{path} outputs {OUTPUT!r} of shape {out}, expected [batch, {num_classes}] for {num_classes} classes",
                "export the model trained on this run's classes (`edge-qmul export --run DIR`)",
            )
    return proto


def onnx_bytes(
    model: nn.Module, input_shape: tuple[int, int, int], metadata: dict[str, Any], output: str = OUTPUT
) -> bytes:
    """``model`` as ONNX bytes under the I/O contract (output ``output``: ``logits``, or ``features`` for the
    feature extractor), with ``metadata`` (JSON-encoded values) attached."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta.setdefault("toolkit_version", __version__)
    meta.setdefault("input_shape", json.dumps([None, *input_shape]))
    return _with_metadata(_export_bytes(model.eval(), torch.rand(1, *input_shape), output), meta)


def export_models(
    int8: nn.Module,
    float_model: nn.Module,
    int8_path: Path,
    fp32_path: Path,
    input_shape: tuple[int, int, int],
    metadata: dict[str, Any],
    *,
    features: nn.Module | None = None,
    features_path: Path | None = None,
) -> ExportResult:
    """Write the int8 and the float model's ONNX atomically, the int8 one only once its graph checks out.

    With ``features`` (the int8 model up to its head's input, dequantized: ``quant.features_of_int8``) and
    ``features_path``, that feature extractor is exported too (output ``features``, float32 [batch, F]) and
    checked like the model: no float op inside its int8 region, only the final DequantizeLinear to the output.
    Its metadata names the int8 model it was cut from (``model_sha256``), so a bundle can refuse a stale one.
    Devices run it to compute their own samples' head inputs for federated Q-MUL (``federated/fedqmul.py``).
    """
    int8_blob = onnx_bytes(int8, input_shape, metadata)
    fp32_blob = onnx_bytes(float_model, input_shape, {**metadata, "precision": "fp32"})
    features_blob = None
    if (features is None) != (features_path is None):
        raise ExportError("export_models needs both features and features_path, or neither",
                          "pass the feature extractor together with where it goes")
    if features is not None:
        features_blob = onnx_bytes(features, input_shape, {
            "part": "features: the int8 model up to its head's input, dequantized",
            "model_sha256": hashlib.sha256(int8_blob).hexdigest(),
            **{k: v for k, v in metadata.items() if k in ("dataset", "input_scale", "quantization_backend", "method")},
        }, output=FEATURES)
    with tempfile.TemporaryDirectory() as tmp:  # check before anything lands in the run directory
        probe = Path(tmp) / int8_path.name
        probe.write_bytes(int8_blob)
        counts = check_fusion(probe)
        if features_blob is not None:
            probe = Path(tmp) / "features.probe.onnx"
            probe.write_bytes(features_blob)
            check_fusion(probe)
    write_bytes(int8_path, int8_blob)
    write_bytes(fp32_path, fp32_blob)
    if features_blob is not None and features_path is not None:
        write_bytes(features_path, features_blob)
    return ExportResult(int8_path, fp32_path, dict(counts), sum(counts[k] for k in INT8_KERNELS if k in counts),
                        features_path)


def require_file(path: Path, fix: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist", fix)
    return path
