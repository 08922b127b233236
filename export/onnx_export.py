"""ONNX export of a run's int8 model (what ships to a board) and of its float model (for comparison).

Contract (DESIGN §3): input ``pixels`` float32 NCHW in [0, 1] with the normalisation inside the graph,
output ``logits`` float32 [batch, classes], dynamic batch, opset 17, ``metadata_props`` describing
where the model came from. After export, onnxruntime's optimised graph is inspected: a
DequantizeLinear that still feeds a float Conv / Gemm / MatMul / Add means a layer runs in float, and
export fails with the node's name.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from google.protobuf.message import DecodeError
from torch import nn

from edge_qmul import __version__
from edge_qmul.atomic import write_bytes
from edge_qmul.errors import CheckpointError, ExportError

OPSET = 17
INPUT, OUTPUT = "pixels", "logits"
FLOAT_COMPUTE = {"Conv", "Gemm", "MatMul", "Add"}
INT8_KERNELS = {
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "ConvInteger", "MatMulInteger",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearMul", "QLinearConcat",
}


class FusionError(ExportError):
    """A quantized layer still runs in float after onnxruntime's graph optimisation."""


class OnnxModelError(ExportError):
    """A file is not an ONNX model of the expected shape."""


@dataclass(frozen=True)
class ExportResult:
    int8_path: Path
    fp32_path: Path
    op_counts: dict[str, int]  # op types of the optimised int8 graph
    int8_kernels: int


def _export_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(  # the TorchScript exporter also writes to file-like objects
        model,
        (example,),
        buf,  # type: ignore[arg-type]
        opset_version=OPSET,
        dynamo=False,  # the TorchScript exporter understands torch.ao's converted int8 modules
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
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
    """Raise FusionError if a DequantizeLinear feeds a float Conv/Gemm/MatMul/Add; return op counts."""
    counts, optimized = optimized_op_counts(path)
    producers = {out: node for node in optimized.graph.node for out in node.output}
    for node in optimized.graph.node:
        if node.op_type not in FLOAT_COMPUTE:
            continue
        for name in node.input:
            src = producers.get(name)
            if src is not None and src.op_type == "DequantizeLinear":
                raise FusionError(
                    f"{path}: node {node.name or node.op_type!r} ({node.op_type}) runs in float on the output "
                    f"of DequantizeLinear {src.name!r}",
                    "check the quantization backend preset (x86: uint8 activations, int8 per-channel weights) "
                    "and that the layer is covered by the qconfig",
                )
    if not INT8_KERNELS & set(counts):
        raise FusionError(f"{path}: the optimised graph has no int8 kernels ({dict(counts)})", "re-run quantize")
    return counts


def check_contract(path: Path, input_shape: tuple[int, int, int] | None = None) -> onnx.ModelProto:
    """Load an ONNX file and check the I/O contract; errors name the file and the fix."""
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
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or tuple(dims[1:]) != tuple(input_shape):
            raise OnnxModelError(
                f"{path} takes input shape {dims}, expected [batch, {', '.join(map(str, input_shape))}]",
                "export the model trained on this dataset",
            )
    return proto


def export_models(
    int8: nn.Module,
    float_model: nn.Module,
    out_dir: Path,
    input_shape: tuple[int, int, int],
    metadata: dict[str, Any],
) -> ExportResult:
    """Write model.int8.onnx and model.fp32.onnx atomically into ``out_dir`` and check fusion."""
    example = torch.rand(1, *input_shape)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta.setdefault("toolkit_version", __version__)
    meta.setdefault("input_shape", json.dumps([None, *input_shape]))
    int8_path, fp32_path = out_dir / "model.int8.onnx", out_dir / "model.fp32.onnx"
    int8_blob = _with_metadata(_export_bytes(int8.eval(), example), meta)
    fp32_blob = _with_metadata(_export_bytes(float_model.eval(), example), {**meta, "precision": "fp32"})
    with tempfile.TemporaryDirectory() as tmp:  # check before anything lands in the run directory
        probe = Path(tmp) / "model.int8.onnx"
        probe.write_bytes(int8_blob)
        counts = check_fusion(probe)
    write_bytes(int8_path, int8_blob)
    write_bytes(fp32_path, fp32_blob)
    return ExportResult(int8_path, fp32_path, dict(counts), sum(counts[k] for k in INT8_KERNELS if k in counts))


def require_file(path: Path, fix: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist", fix)
    return path
