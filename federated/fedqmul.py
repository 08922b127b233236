"""Federated Q-MUL: the devices unlearn together and forget samples never leave them.

The server holds the QAT copy; each device holds its partition of the training data. Only the classifier
head moves (central Q-MUL's default, ``layers="classifier"``), so a device computes the deployed int8
model's features of its own samples once and every step after that costs only the head. One epoch of
central Q-MUL becomes one federated round:

1. ``evaluate``: the server sends the head's QAT state and, to each device, the ids of its samples that
   the ledger says to forget (ids, never contents, and only ids the device itself contributed). At these
   weights the device computes its forget samples' similar labels and the gradient-norm sums g(B) over up
   to ``norm_batches`` forget batches (similar labels) and retain batches, and replies the sums weighted by
   batch size, the sample counts and its forget / retain accuracy (``local_stats``).
2. The server pools the sums into fleet-wide means ḡ_f, ḡ_r and forms w_f = ḡ_r / (ḡ_f + ḡ_r),
   w_r = ḡ_f / (ḡ_f + ḡ_r) (``adaptive_weights``): the weights central Q-MUL computes, from batches spread
   over the fleet. Each batch counts by its size: a device holding 10 forget samples has one 10-sample
   batch, whose gradient norm is inflated by noise; counted as one batch like a full 256-sample one, it
   doubled ḡ_f on digits (8.2 vs central's 4.5 at the same weights; 4.8 when counted by size).
3. ``train``: the same state plus (w_f, w_r, lr); each device runs one local epoch of Q-MUL steps over its
   forget (similar labels) and retain samples (``local_update``: central Q-MUL's own step code) and
   replies its new head state and sample count.
4. The server averages the states weighted by sample count and steps towards the average with a server
   step size (``average_states``; default 1 = plain FedAvg), then sets each weight fake-quant's range and
   scale from the new weights.

The learning rate follows central Q-MUL's cosine schedule over the rounds. Differences from central
Q-MUL, by construction: the optimizer's momentum restarts every round on every device, and a device's
local epoch sees only its own samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from edge_qmul.federated import partition
from edge_qmul.federated.config import DeviceConfig
from torch import nn

from edge_qmul import data, quant
from edge_qmul.config import QMul, config_from_dict
from edge_qmul.errors import ConfigError, UnlearningError
from edge_qmul.methods import QMulMethod, UnlearnContext, grad_norm_sum, predict_logits, similar_labels
from edge_qmul.pipeline import Quantized, load_payload, load_quantized
from edge_qmul.run import Run
from edge_qmul.train import sgd

FEATURES_FORMAT = "edge-qmul/device-features/1"
STAT_KEYS = ("g-f-sum", "f-samples", "g-r-sum", "r-samples", "forget-correct", "n-forget", "retain-correct",
             "n-retain")


@dataclass
class LocalData:
    """A device's own samples as the deployed int8 model's classifier inputs, split by the forget list."""

    forget_x: torch.Tensor
    forget_y: torch.Tensor
    retain_x: torch.Tensor
    retain_y: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.forget_y) + len(self.retain_y)


# ---------------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------------


def head_of(q: Quantized) -> nn.Module:
    """The QAT copy's classifier head (shares its modules with ``q.qat``)."""
    return quant.split_at_classifier(q.qat, q.model_cfg.head)[1]


def _own_features(q: Quantized, run_path: Path, device: DeviceConfig, own: list[int]) -> torch.Tensor:
    """int8 features of the device's samples; cached in its state dir, keyed to the deployed model."""
    cache = Path(device.state_dir) / f"features-{q.sha256[:16]}.pt" if device.state_dir else None
    if cache is not None and cache.exists():
        payload = load_payload(cache, "device feature cache", f"delete {cache}")
        if payload.get("format") == FEATURES_FORMAT and payload["indices"].tolist() == own:
            return (payload["values"].float() - payload["zero_point"]) * payload["scale"]
    split = data.Split.load(Run(run_path).require("split"))
    source = data.load_dataset(split.dataset, split.root, seed=split.seed)
    x, _ = data.to_tensors(source.train, own)
    extractor = quant.int8_features(q.qat, dequantize=False, head=q.model_cfg.head)
    with torch.no_grad():
        chunks = [extractor(b) for b in x.split(1024)]
    values = torch.cat([c.int_repr() for c in chunks]).flatten(1)
    scale, zp = float(chunks[0].q_scale()), int(chunks[0].q_zero_point())
    if cache is not None:
        from edge_qmul.pipeline import _save_torch  # atomic torch.save

        _save_torch(cache, {"format": FEATURES_FORMAT, "indices": torch.tensor(own), "values": values,
                            "scale": scale, "zero_point": zp})
    return (values.float() - zp) * scale


def local_data(q: Quantized, run_path: Path, device: DeviceConfig, forget_ids: list[int]) -> LocalData:
    """The device's samples, with ``forget_ids`` (which must all be its own) on the forget side."""
    split = data.Split.load(Run(run_path).require("split"))
    own = partition.partition(split.train, device.num_partitions, device.partition_id)
    foreign = sorted(set(forget_ids) - set(own))
    if foreign:
        raise UnlearningError(
            f"device {device.partition_id} was asked to forget {len(foreign)} sample(s) it does not hold "
            f"(first: {foreign[:3]})",
            "the server and the device disagree on the partition: check num-clients and split.json",
        )
    labels = torch.as_tensor(data.load_dataset(split.dataset, split.root, seed=split.seed).train.labels)[own].long()
    x = _own_features(q, run_path, device, own)
    forget = torch.tensor([i in set(forget_ids) for i in own], dtype=torch.bool)
    return LocalData(x[forget], labels[forget], x[~forget], labels[~forget])


def _context(q: Quantized, head: nn.Module, local: LocalData) -> UnlearnContext:
    return UnlearnContext(
        qat=head, forget_x=local.forget_x, forget_y=local.forget_y, retain_x=local.retain_x,
        retain_y=local.retain_y, num_classes=q.model_cfg.num_classes, model_cfg=q.model_cfg,
        train_cfg=q.train_cfg, backend=q.backend, calib_size=q.calibration_size,
    )


def local_stats(head: nn.Module, local: LocalData, cfg: QMul, seed: int) -> dict[str, float]:
    """Similar labels and gradient-norm sums at the broadcast weights (step 1 of a round)."""
    model = head.eval()
    gen = torch.Generator().manual_seed(seed)
    bs, k = cfg.batch_size, cfg.norm_batches or None
    out = dict.fromkeys(STAT_KEYS, 0.0)
    out["n-forget"], out["n-retain"] = float(len(local.forget_y)), float(len(local.retain_y))
    if len(local.forget_y):
        logits = predict_logits(model, local.forget_x)
        sim = similar_labels(logits, local.forget_y, cfg.label_variant)
        out["forget-correct"] = float((logits.argmax(1) == local.forget_y).sum())
        batches = torch.randperm(len(sim), generator=gen).split(bs)[:k]
        out["g-f-sum"] = sum(len(b) * grad_norm_sum(model, local.forget_x[b], sim[b]) for b in batches)
        out["f-samples"] = float(sum(len(b) for b in batches))
    if len(local.retain_y):
        out["retain-correct"] = float((predict_logits(model, local.retain_x).argmax(1) == local.retain_y).sum())
        batches = torch.randperm(len(local.retain_y), generator=gen).split(bs)[:k]
        out["g-r-sum"] = sum(len(b) * grad_norm_sum(model, local.retain_x[b], local.retain_y[b]) for b in batches)
        out["r-samples"] = float(sum(len(b) for b in batches))
    return out


class _RoundQMul(QMulMethod):
    """Central Q-MUL's epoch with the fleet's weights instead of locally measured ones."""

    def __init__(self, cfg: QMul, w_f: float, w_r: float) -> None:
        super().__init__(cfg)
        self.fleet_weights = (w_f, w_r)

    def begin_epoch(self, ctx: UnlearnContext, epoch: int) -> dict[str, float]:
        self.forget_labels = similar_labels(predict_logits(ctx.qat.eval(), ctx.forget_x), ctx.forget_y,
                                            self.cfg.label_variant)
        self.retain_idx = self.retain_sample(ctx)
        self.w_f, self.w_r = self.fleet_weights
        return {}


def local_update(
    q: Quantized, head: nn.Module, local: LocalData, cfg: QMul, w_f: float, w_r: float, lr: float, seed: int
) -> dict[str, float]:
    """One local epoch of Q-MUL steps on the device's samples (step 3 of a round); trains ``head`` in place."""
    method = _RoundQMul(replace(cfg, seed=seed), w_f, w_r)
    ctx = _context(q, head, local)
    method.begin_epoch(ctx, 0)
    opt = sgd(head, lr, cfg.momentum, cfg.weight_decay)
    losses = method.train_steps(ctx, opt, method.steps(ctx, 0))
    return {"num-examples": float(local.size), **{k.replace("_", "-"): v for k, v in losses.items()}}


# ---------------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------------


def adaptive_weights(stats: list[dict[str, float]]) -> tuple[float, float, float, float]:
    """(w_f, w_r, ḡ_f, ḡ_r) from the devices' size-weighted gradient-norm sums, pooled over the fleet."""
    f_samples = sum(s["f-samples"] for s in stats)
    r_samples = sum(s["r-samples"] for s in stats)
    if f_samples == 0:
        raise UnlearningError("no device reported forget batches", "the devices holding forget samples must take part")
    if r_samples == 0:  # every participant is leaving the fleet: nothing to retain
        return 1.0, 0.0, sum(s["g-f-sum"] for s in stats) / f_samples, 0.0
    gf = sum(s["g-f-sum"] for s in stats) / f_samples
    gr = sum(s["g-r-sum"] for s in stats) / r_samples
    return gr / (gf + gr), gf / (gf + gr), gf, gr


def average_states(
    head: nn.Module, states: list[tuple[dict[str, torch.Tensor], float]], server_lr: float = 1.0
) -> None:
    """FedAvg into ``head`` with a server step size: W <- W + server_lr * (Σ_k n_k/n W_k - W).

    Every floating tensor moves this way (the frozen activation ranges are equal everywhere and stay
    put); integer buffers are taken from the first state. Then every weight fake-quant's range, scale and
    zero point are set from the new weights (``quant.refresh_weight_ranges``).

    Each of K devices runs 1/K of an epoch's steps from the same weights, so plain averaging (server_lr
    1) moves the model less per round than central Q-MUL's epoch. Summing the displacements instead
    (server_lr = K) matches a central epoch only to first order: on Fashion-MNIST with 3 devices and
    Q-MUL's lr 0.3 it overshot and collapsed the model (Avg Gap 65.8 vs 1.16 with server_lr 1;
    bench/federated_modes.py), because a central epoch's later steps see the forget loss already falling.
    """
    if not states:
        raise UnlearningError("no device returned an update", "check the SuperNodes' logs")
    total = sum(w for _, w in states)
    if not total > 0:
        raise UnlearningError("the devices' updates carry no samples", "check the devices' partitions")
    old = state_of(head)
    new: dict[str, torch.Tensor] = {}
    for k, v in old.items():
        if v.is_floating_point():
            avg = sum(s[k] * (w / total) for s, w in states)
            new[k] = v + server_lr * (avg - v)
        else:
            new[k] = states[0][0][k].clone()
    head.load_state_dict(new, strict=True)
    quant.refresh_weight_ranges(head)


def cosine(base: float, epoch: int, epochs: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


def config_json(cfg: QMul) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def config_from_json(text: str) -> QMul:
    """The server's Q-MUL config (``config_json``), rebuilt only from the allow-listed config classes."""
    fix = "update the device software"
    try:
        cfg = config_from_dict(json.loads(text), "unlearning config from the server")
    except json.JSONDecodeError as err:
        raise ConfigError(f"unlearning config from the server is invalid: {err}", fix) from err
    except ConfigError as err:
        raise ConfigError(err.message, f"{err.fix}; or {fix}" if err.fix else fix) from err
    if type(cfg) is not QMul:
        raise ConfigError(f"the server sent a {type(cfg).__name__} config; federated rounds run qmul", fix)
    return cfg


def state_of(head: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def load_for_device(run_path: Path) -> tuple[Quantized, nn.Module]:
    q = load_quantized(run_path)
    return q, head_of(q)


def summary_of(stats: dict[int, dict[str, float]]) -> dict[str, Any]:
    n_f = sum(s["n-forget"] for s in stats.values())
    n_r = sum(s["n-retain"] for s in stats.values())
    return {
        "forget_acc": 100.0 * sum(s["forget-correct"] for s in stats.values()) / n_f if n_f else None,
        "retain_acc": 100.0 * sum(s["retain-correct"] for s in stats.values()) / n_r if n_r else None,
        "n_forget": int(n_f),
        "n_retain": int(n_r),
    }
