"""Reference-model membership audit (LiRA-style, offline), ARCHITECTURE.md §5.

k reference models are trained with the run's own recipe on random halves of the training pool, in
complementary pairs, and quantized like the deployed model (int8 PTQ). Each training sample is thus
left out of at least k // 2 of them, every test sample out of all k. For a target model and an audited
sample (x, y) the statistic is the logit-scaled true-label confidence φ = log(p_y / (1 − p_y)). Offline
LiRA compares φ under the target with φ under the reference models that did *not* train on x:
score = (φ_target − μ_out(x)) / σ_out, with σ_out pooled over all samples (fixed-variance LiRA; k is
small). A high score says "x looks trained on".

Reported per target (original int8, retrained, unlearned): ROC AUC and TPR at 1% and 0.1% FPR of this
score for forget samples (positives) versus test samples (negatives). A model that truly forgot should
sit where the retrained model sits (near 0.5 AUC, TPR ≈ FPR).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_qmul import quant
from edge_qmul.metrics import logits_of
from edge_qmul.models import ModelConfig
from edge_qmul.train import TrainConfig, train_float


def phi(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """log(p_y / (1 - p_y)), computed stably from the logits."""
    logp = logits.double().log_softmax(1)
    lp = logp[torch.arange(len(y)), y]
    other = torch.logsumexp(logp.clone().index_put_((torch.arange(len(y)), y), torch.tensor(-torch.inf,
                                                                                        dtype=torch.float64)), 1)
    return (lp - other).numpy()


@dataclass
class References:
    """Reference models' φ on the audited samples and which of them each model trained on."""

    phis: np.ndarray  # (k, n_audit)
    trained_on: np.ndarray  # (k, n_audit) bool

    def out_stats(self) -> tuple[np.ndarray, float]:
        """Per-sample mean of φ over the references that left it out, and the pooled std of those φ."""
        out = ~self.trained_on
        counts = out.sum(0)
        if (counts == 0).any():
            raise ValueError("a sample was trained on by every reference model; use more references")
        mu = (self.phis * out).sum(0) / counts
        resid = (self.phis - mu)[out]
        return mu, float(max(resid.std(), 1e-6))


def train_references(
    model_cfg: ModelConfig, cfg: TrainConfig, train_x: torch.Tensor, train_y: torch.Tensor, audit_x: torch.Tensor,
    audit_y: torch.Tensor, audit_train_pos: np.ndarray, k: int, backend: str, calib_size: int, seed: int = 0,
) -> References:
    """k int8 reference models on random halves of the training set.

    ``audit_train_pos[j]`` is the position of audited sample j in ``train_x`` (-1 for test samples, which
    no reference trains on).
    """
    rng = np.random.default_rng(seed)
    n = len(train_x)
    masks: list[np.ndarray] = []
    while len(masks) < k:  # complementary pairs: every sample is left out by at least k // 2 references
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[: n // 2]] = True
        masks += [mask, ~mask]
    phis, trained = [], []
    for i, mask in enumerate(masks[:k]):
        half = np.flatnonzero(mask)
        idx = torch.as_tensor(half)
        model, _ = train_float(model_cfg, replace(cfg, seed=cfg.seed + 1 + i), train_x[idx], train_y[idx])
        calib = list(train_x[idx][:calib_size].split(256))
        int8 = quant.quantize_ptq(model, calib, backend)
        with torch.no_grad():
            phis.append(phi(logits_of(int8, audit_x), audit_y))
        trained.append(np.array([p >= 0 and mask[p] for p in audit_train_pos]))
    return References(np.stack(phis), np.stack(trained))


@dataclass
class AuditResult:
    target: str
    auc: float
    tpr_at_1fpr: float
    tpr_at_01fpr: float
    mean_score_forget: float
    mean_score_test: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit(target: nn.Module, name: str, refs: References, audit_x: torch.Tensor, audit_y: torch.Tensor,
          is_forget: np.ndarray) -> AuditResult:
    from sklearn.metrics import roc_auc_score, roc_curve

    with torch.no_grad():
        phi_t = phi(logits_of(target, audit_x), audit_y)
    mu, sigma = refs.out_stats()
    s = (phi_t - mu) / sigma
    y = is_forget.astype(int)
    fpr, tpr, _ = roc_curve(y, s)
    return AuditResult(name, float(roc_auc_score(y, s)), float(np.interp(0.01, fpr, tpr)),
                       float(np.interp(0.001, fpr, tpr)), float(s[is_forget].mean()), float(s[~is_forget].mean()))


def audit_run(run_dir: Any, methods: list[str], k: int = 4, seed: int = 0, max_test: int = 2000,
              quiet: bool = True) -> dict[str, Any]:
    """Audit the run's original int8 model and the given unlearning results; writes audit.json."""
    from pathlib import Path

    from edge_qmul import data, pipeline
    from edge_qmul.atomic import write_json
    from edge_qmul.errors import ConfigError

    if k < 2:
        raise ConfigError(f"--references {k} is too few", "use at least 2 reference models (default 4)")
    run_dir = Path(run_dir)
    q = pipeline.load_quantized(run_dir)
    rd = pipeline.load_run_data(run_dir)
    forget_ids = rd.live(pipeline.ledger_forget_ids(run_dir))
    if not forget_ids:
        raise ConfigError(f"the forget ledger of {run_dir} is empty", "file a request first")
    train_ids = rd.live(rd.split.train)
    train_x, train_y = data.to_tensors(rd.source.train, train_ids)
    fx, fy = data.to_tensors(rd.source.train, forget_ids)
    tx, ty = rd.tensors("test")
    tx, ty = tx[:max_test], ty[:max_test]
    position = {i: p for p, i in enumerate(train_ids)}
    audit_x, audit_y = torch.cat([fx, tx]), torch.cat([fy, ty])
    pos = np.array([position[i] for i in forget_ids] + [-1] * len(ty))
    is_forget = np.array([True] * len(fy) + [False] * len(ty))
    refs = train_references(q.model_cfg, q.train_cfg, train_x, train_y, audit_x, audit_y, pos, k, q.backend,
                            q.calibration_size, seed)
    targets: dict[str, nn.Module] = {"original": q.int8}
    for method in methods:
        targets[method], _ = pipeline.load_result(run_dir, method, q, pipeline.ledger_forget_ids(run_dir))
    results = [audit(m, name, refs, audit_x, audit_y, is_forget).to_dict() for name, m in targets.items()]
    report = {"references": k, "seed": seed, "forget": len(fy), "test": len(ty),
              "reference_out_per_forget_sample": float((~refs.trained_on[:, is_forget]).sum(0).mean()),
              "targets": results}
    write_json(pipeline.as_run(run_dir).path("audit"), report)
    return report
