"""The Python API's core (``import edge_qmul as eq``): in-memory functions first, the run directory on top.

* ``eq.quantize(model, calibration, backend=...) -> Quantized``: real int8 (torch.ao FX PTQ) and the QAT
  copy that unlearning trains; any ``nn.Module`` torch.fx can trace.
* ``eq.unlearn(quantized, forget, retain, eq.QMul(...)) -> Quantized``: a method (one config class each:
  ``eq.QMul``, ``eq.Finetune``, ``eq.RandomLabel``, ``eq.GradAscent``, ``eq.Famr``) on a copy of the QAT copy,
  re-converted to int8. ``eq.Retrain`` / ``eq.Auto`` need the training recipe and data: use ``eq.Run``.
* ``eq.Run(dir)``: the run-directory workflow (train or import weights, quantize, forget, unlearn, evaluate)
  whose artifacts the CLI shares.

Data are ``(x, y)`` pairs: float pixels in [0, 1] of shape (N, C, H, W) and int64 labels, as tensors or
numpy arrays, or a ``torch.utils.data.Dataset`` of such pairs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_qmul import pipeline, quant, usermodel
from edge_qmul.config import Auto, DataConfig, MethodConfig, QMul, QuantConfig, Retrain, TrainConfig
from edge_qmul.errors import ConfigError
from edge_qmul.methods import UnlearnContext
from edge_qmul.methods import unlearn as run_method
from edge_qmul.run import Run as RunDirectory


@dataclass
class Quantized:
    """An int8 model and its QAT (fake-quant) copy, which ``unlearn`` trains and re-converts."""

    int8: nn.Module  # converted torch.ao int8 model: export it with eq.export_onnx
    qat: nn.Module  # the QAT copy (BatchNorm folded, fake-quant active)
    backend: str
    head: str  # qualified name of the trainable head in the model's graph ("" = its last Linear)
    num_classes: int
    log: dict[str, Any] | None = None  # the unlearning method's log (None for a freshly quantized model)


def as_tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` (tensors or arrays) or a Dataset of pairs → float32 (N, C, H, W) and int64 (N,) tensors."""
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
    elif isinstance(data, torch.utils.data.Dataset):
        pairs = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        if not pairs:
            raise ConfigError(f"{what} is an empty dataset", f"pass at least one {what} sample")
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.as_tensor([int(p[1]) for p in pairs])
    else:
        raise ConfigError(f"{what} must be an (x, y) pair or a Dataset of pairs, got {type(data).__name__}",
                          "pass (pixels N x C x H x W in [0, 1], labels N)")
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y, dtype=torch.int64)
    if x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
        raise ConfigError(f"{what}: pixels {list(x.shape)} and labels {list(y.shape)} do not pair up",
                          "pixels are N x C x H x W, labels N")
    return x, y


def _calibration(calibration: Any) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor | np.ndarray):
        x = torch.as_tensor(calibration, dtype=torch.float32)
        if x.dim() != 4 or len(x) == 0:
            raise ConfigError(f"calibration pixels have shape {list(x.shape)}", "pass N x C x H x W, N >= 1")
        return x
    return as_tensors(calibration, "calibration")[0]


def quantize(model: nn.Module, calibration: Any, backend: str = "x86", *, head: str = "") -> Quantized:
    """Real int8 for ``model`` (post-training quantization on ``calibration``) and its QAT copy.

    The model takes pixels in [0, 1]; a submodule named ``normalize`` stays in float (the int8 region starts
    after it). ``head`` names the trainable head (default: the last nn.Linear). A model torch.fx cannot
    trace, or with a layer that has no int8 kernel in ``backend``, is refused with the module named.
    """
    QuantConfig(backend=backend)  # validates the name
    x = _calibration(calibration)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        out = model(x[:2])
    usermodel.check_traceable(model, type(model).__name__)
    head_name = usermodel.head_name(model, head)
    batches = list(x.split(256))
    int8, qat = quant.int8_and_qat(model, batches, backend, f"model {type(model).__name__}")
    return Quantized(int8, qat, backend, head_name, int(out.shape[1]))


def unlearn(
    quantized: Quantized, forget: Any, retain: Any, method: MethodConfig | None = None, *, val: Any = None,
    quiet: bool = True,
) -> Quantized:
    """Unlearn ``forget`` from a copy of the QAT model with ``method`` (default ``eq.QMul()``, its recommended
    settings), keeping ``retain``; returns the new QAT copy and its int8 conversion (``quantized`` is kept)."""
    cfg = QMul() if method is None else method
    if not isinstance(cfg, MethodConfig):
        raise ConfigError(f"method must be a method config such as eq.QMul(), got {type(cfg).__name__}",
                          "pass eq.QMul(), eq.Finetune(), eq.RandomLabel(), eq.GradAscent() or eq.Famr()")
    if isinstance(cfg, Retrain | Auto):
        raise ConfigError(f"{cfg.name} trains from scratch and needs the training recipe and data",
                          "use eq.Run(DIR).unlearn(...) for retrain / auto")
    fx, fy = as_tensors(forget, "forget")
    rx, ry = as_tensors(retain, "retain")
    vx, vy = as_tensors(val, "val") if val is not None else (None, None)
    qat = copy.deepcopy(quantized.qat)
    ctx = UnlearnContext(
        qat=qat, forget_x=fx, forget_y=fy, retain_x=rx, retain_y=ry, num_classes=quantized.num_classes,
        model_cfg=None, train_cfg=None, backend=quantized.backend, calib_size=0, val_x=vx, val_y=vy,
        quiet=quiet, head=quantized.head,
    )
    result = run_method(ctx, cfg)
    return Quantized(result.int8, result.qat, quantized.backend, quantized.head, quantized.num_classes, result.log)


class Run(RunDirectory):
    """A run directory with its stages as methods; each returns the stage's result dataclass.

    ``Run(dir).train(DataConfig(...), TrainConfig(model="net.py:build"), weights="w.pt")`` imports a trained
    model; then ``quantize``, ``forget``, ``unlearn``, ``evaluate``. Export, validation and bundles take the
    run too: ``eq.export_run(run)``, ``eq.validate_run(run, profile, budgets)``, ``eq.build_bundle(run, ...)``.
    """

    def train(self, data: DataConfig | None = None, train: TrainConfig | None = None, *,
              weights: str | Path | None = None, head: str = "", mean: tuple[float, ...] | None = None,
              std: tuple[float, ...] | None = None, provenance: str | Path | None = None,
              quiet: bool = True) -> pipeline.TrainResult:
        """``provenance``: a CSV of ``device_id,sha256`` naming which device contributed which training sample."""
        return pipeline.train(self, data or DataConfig(), train or TrainConfig(),
                              weights=Path(weights) if weights is not None else None, head=head, mean=mean, std=std,
                              provenance=Path(provenance) if provenance is not None else None, quiet=quiet)

    def quantize(self, cfg: QuantConfig | None = None, *, quiet: bool = True) -> pipeline.QuantizeResult:
        return pipeline.quantize(self, cfg or QuantConfig(), quiet=quiet)

    def forget(self, *, source: str = "api", **selection: Any) -> pipeline.ForgetReceipt:
        """One of ``ids=[...]``, ``hashes=[...]``, ``klass=K``, ``count=N``, ``fraction=F``; ``request_id``;
        ``source`` says in the ledger who filed it. A device's request: ``device=ID`` with ``hashes=[...]``,
        ``klass=K`` or ``leave=True``, checked against the training provenance by content id."""
        return pipeline.forget(self, source=source, **selection)

    def unlearn(self, method: MethodConfig | None = None, *, quiet: bool = True) -> pipeline.UnlearnRecord:
        return pipeline.run_unlearn(self, QMul() if method is None else method, quiet=quiet)

    def evaluate(self, methods: list[str] | None = None) -> pipeline.EvalReport:
        return pipeline.evaluate(self, methods)

    def quantized(self) -> Quantized:
        """The run's deployed int8 model and QAT copy, for the in-memory functions."""
        q = pipeline.load_quantized(self)
        return Quantized(q.int8, q.qat, q.backend, q.model_cfg.head, q.model_cfg.num_classes)
