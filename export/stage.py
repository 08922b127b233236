"""Run-directory stages of this package: ``export`` (int8 + fp32 ONNX) and ``validate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge_qmul.export.onnx_export import ExportResult, export_models

from edge_qmul import pipeline


def export_run(run_dir: Path, method: str | None = None) -> ExportResult:
    """Export the run's unlearned int8 model (default: the latest result; in a demo run, qmul's)."""
    method = method or pipeline.latest_method(run_dir)
    q = pipeline.load_quantized(run_dir)
    rd = pipeline.load_run_data(run_dir)
    forget_ids = pipeline.ledger_forget_ids(run_dir)
    result = pipeline.load_result_full(run_dir, method, q, forget_ids)
    run_info = json.loads((run_dir / "run.json").read_text())
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
    if method == pipeline.REFERENCE and (run_dir / "unlearn" / method / "float.pt").exists():
        from edge_qmul.train import load_checkpoint

        float_model = load_checkpoint(run_dir / "unlearn" / method / "float.pt")[0]
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    return export_models(result.int8, float_model, run_dir, shape, metadata)
