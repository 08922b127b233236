"""The export stage: ``eq.export_onnx`` for any converted int8 model, ``export_run`` for a run's result."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from edge_qmul.export.onnx_export import ExportResult, check_fusion, export_models, onnx_bytes

from edge_qmul import pipeline, quant
from edge_qmul.atomic import write_bytes
from edge_qmul.errors import ConfigError
from edge_qmul.run import Run
from edge_qmul.train import load_checkpoint

log = logging.getLogger(__name__)


def export_onnx(
    int8_model: Any, path: str | Path, input_shape: tuple[int, int, int], *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write a converted int8 model as ONNX (opset 17, dynamic batch, ``pixels`` → ``logits``) to ``path``.

    The file lands only if onnxruntime's optimised graph runs it in int8 with no float op inside the int8
    region (``ExportError`` otherwise, naming the node)."""
    path = Path(path)
    blob = onnx_bytes(int8_model, input_shape, metadata or {})
    with tempfile.TemporaryDirectory() as tmp:  # check before anything lands at ``path``
        probe = Path(tmp) / "model.onnx"
        probe.write_bytes(blob)
        check_fusion(probe)
    write_bytes(path, blob)
    return path


def export_run(run_dir: Run | Path, method: str | None = None) -> ExportResult:
    """Export the run's unlearned int8 model (default: the latest result; in a demo run, qmul's)."""
    run = pipeline.as_run(run_dir)
    method = method or pipeline.latest_method(run)
    q = pipeline.load_quantized(run)
    rd = pipeline.load_run_data(run)
    result = pipeline.load_result_full(run, method, q, rd.split.forget)
    run_info = json.loads(run.verified("run_info").read_text())
    cfg = q.model_cfg
    metadata: dict[str, Any] = {
        "dataset": rd.split.dataset,
        "class_names": list(rd.source.classes),
        "input_shape": [None, cfg.in_channels, cfg.image_size, cfg.image_size],
        "input_scale": "pixels in [0, 1]: 8-bit images / 255, scikit-learn digits / 16",
        "quantization_backend": q.backend,
        "config_hash": run_info.get("config_hash", ""),
        "method": method,
        "honoured_request_ids": result.meta["request_ids"],
        "forget_hash": result.meta["forget_hash"],
        "validation_digest": "pending: written into the bundle manifest after `edge-qmul validate`",
    }
    float_model = q.float_model
    if run.exists("result_float", method=method):
        float_model = load_checkpoint(run.verified("result_float", method=method))[0]
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    try:  # what devices run to unlearn the head with the server (federated mode); a model without a cut has none
        features = quant.features_of_int8(result.int8, dequantize=True, head=cfg.head)
    except ConfigError as err:
        log.warning("no features.onnx for this model (%s): federated Q-MUL cannot run on it", err.message)
        features = None
    if features is None and run.path("features_onnx").exists():
        run.path("features_onnx").unlink()  # a stale extractor of an earlier model must not ship beside this one
        run.forget_digest("features_onnx")
    exported = export_models(result.int8, float_model, run.path("int8_onnx"), run.path("fp32_onnx"), shape, metadata,
                             features=features, features_path=run.path("features_onnx") if features else None)
    run.record("int8_onnx")
    run.record("fp32_onnx")
    if features is not None:
        run.record("features_onnx")
    return exported
