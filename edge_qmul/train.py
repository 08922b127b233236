"""Float training, the recipe every retrain reuses exactly, and float checkpoints.

Data lives in memory as tensors; batches are index permutations from a seeded generator, so a run
with the same seed sees the same batches in the same order.
"""

from __future__ import annotations

import io
import math
import pickle
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edge_qmul import __version__
from edge_qmul.atomic import write_bytes
from edge_qmul.config import TrainConfig
from edge_qmul.errors import CheckpointError
from edge_qmul.models import ModelConfig, build_model
from edge_qmul.progress import Progress

CHECKPOINT_FORMAT = "edge-qmul/float-checkpoint/1"


def batch_indices(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``; the last batch may be smaller."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    yield from order.split(batch_size)


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * step / max(1, total)))


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_float(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    quiet: bool = False,
    label: str = "train",
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a fresh model on (x, y) with the recipe in ``cfg``; returns the model and a log."""
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    opt = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total, step = cfg.epochs * steps_per_epoch, 0
    log: dict[str, Any] = {"epochs": []}
    start = time.perf_counter()
    model.train()
    with Progress(quiet) as progress:
        task = progress.add(f"{label} ({len(x)} samples)", total)
        for epoch in range(cfg.epochs):
            loss_sum, correct = 0.0, 0
            for idx in batch_indices(len(x), cfg.batch_size, gen):
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(cfg.lr, step, total)
                logits = model(x[idx])
                loss = F.cross_entropy(logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.item() * len(idx)
                correct += int((logits.argmax(1) == y[idx]).sum())
                progress.advance(task)
            log["epochs"].append(
                {"epoch": epoch, "loss": loss_sum / len(x), "train_acc": 100.0 * correct / len(x)}
            )
    log["seconds"] = time.perf_counter() - start
    return model.eval(), log


def save_checkpoint(
    path: str | Path, model: nn.Module, model_cfg: ModelConfig, train_cfg: TrainConfig, extra: dict[str, Any]
) -> None:
    """Weights + the configs that produced them, written atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "model_config": model_cfg.to_dict(),
        "train_config": asdict(train_cfg),
        "extra": extra,
        "state_dict": model.state_dict(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(path, buf.getvalue())


def load_tensors(path: str | Path, what: str, fix: str) -> Any:
    """torch.load with weights_only=True (no arbitrary pickle runs), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}", fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{what} {path} is corrupt or not a torch file of tensors ({err.__class__.__name__})",
                              fix) from err


def load_payload(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """An edge-qmul checkpoint (``load_tensors`` plus its ``format`` key)."""
    payload = load_tensors(path, what, fix)
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{what} {path} is not an edge-qmul checkpoint", fix)
    return payload


def load_checkpoint(path: str | Path) -> tuple[nn.Module, ModelConfig, TrainConfig, dict[str, Any]]:
    fix = "re-create it with `edge-qmul train --run DIR`"
    payload = load_payload(path, "float checkpoint", fix)
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has format {payload['format']!r}, expected {CHECKPOINT_FORMAT!r}", fix)
    model_cfg = ModelConfig.from_dict(payload["model_config"])
    model = build_model(model_cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"weights in {path} do not fit its model config", fix) from err
    return model.eval(), model_cfg, TrainConfig(**payload["train_config"]), payload["extra"]
