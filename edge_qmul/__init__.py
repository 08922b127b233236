"""edge-qmul: machine unlearning for int8 models deployed on edge devices.

``import edge_qmul as eq`` gives the Python API (see the README)::

    q = eq.quantize(model, calibration_pixels, backend="x86")      # real int8 + QAT copy
    q2 = eq.unlearn(q, (forget_x, forget_y), (retain_x, retain_y), eq.QMul())
    eq.export_onnx(q2.int8, onnx_path, input_shape=(1, 28, 28))
    report = eq.validate(onnx_path, eq.EvalSets(...), profile=eq.load_profile("rpi4"), budgets=eq.load_budgets())

Names resolve lazily (PEP 562), so ``import edge_qmul`` stays instant and the on-board runtime
(``edge_qmul.devices.runtime``) never pulls torch in. This package root is the facade over every layer;
the layers themselves import only downwards (``make lint`` checks it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # in-memory core
    "quantize": "edge_qmul.api",
    "unlearn": "edge_qmul.api",
    "Quantized": "edge_qmul.api",
    "Run": "edge_qmul.api",
    "EvalSets": "edge_qmul.metrics",
    # configs: one class per stage and per method, one loader
    "DataConfig": "edge_qmul.config",
    "TrainConfig": "edge_qmul.config",
    "QuantConfig": "edge_qmul.config",
    "QMul": "edge_qmul.config",
    "Auto": "edge_qmul.config",
    "Retrain": "edge_qmul.config",
    "Finetune": "edge_qmul.config",
    "RandomLabel": "edge_qmul.config",
    "GradAscent": "edge_qmul.config",
    "Famr": "edge_qmul.config",
    "Salun": "edge_qmul.config",
    "Scrub": "edge_qmul.config",
    "L1Sparse": "edge_qmul.config",
    "load_toml": "edge_qmul.config",
    "method_config": "edge_qmul.config",
    "config_from_dict": "edge_qmul.config",
    # export layer
    "export_onnx": "edge_qmul.export.stage",
    "export_run": "edge_qmul.export.stage",
    "validate": "edge_qmul.export.validate",
    "validate_run": "edge_qmul.export.validate",
    "Report": "edge_qmul.export.validate",
    "load_budgets": "edge_qmul.export.budgets",
    "build_bundle": "edge_qmul.export.bundle",
    "keygen": "edge_qmul.export.bundle",
    # devices layer
    "load_profile": "edge_qmul.devices.profiles",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_qmul' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
