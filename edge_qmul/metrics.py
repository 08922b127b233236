"""Accuracy, membership-inference efficacy and Avg Gap (ARCHITECTURE.md §5).

Works on any callable that maps a batch of pixels to logits: a torch int8 model now, the onnxruntime
session later, so the numbers are computed the same way for every runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

METRICS = ("FA", "RA", "TA", "MIA")

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def logits_of(model: LogitsFn, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    if len(x) == 0:
        return torch.empty(0, 0)
    return torch.cat([model(b) for b in x.split(batch_size)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent (0 for an empty set)."""
    return 100.0 * float((logits.argmax(1) == y).float().mean()) if len(y) else 0.0


def true_label_confidence(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Softmax probability of the true label, shape (N, 1): the attacker's only feature."""
    p = logits.softmax(1)
    return p[torch.arange(len(y)), y].numpy().astype(np.float64).reshape(-1, 1)


def mia_efficacy(
    member_conf: np.ndarray, nonmember_conf: np.ndarray, forget_conf: np.ndarray
) -> float:
    """% of forget samples an RBF SVC (C=3, gamma="auto") calls non-member.

    The SVC is fit on members (label 1) versus non-members (label 0) using the true-label confidence;
    it is refit for every evaluated model. Higher means more forgotten; the retrained model's value is
    the target.
    """
    from sklearn.svm import SVC

    if len(forget_conf) == 0:
        return 0.0
    x = np.concatenate([member_conf, nonmember_conf])
    y = np.concatenate([np.ones(len(member_conf)), np.zeros(len(nonmember_conf))])
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(x, y)
    return 100.0 * float((clf.predict(forget_conf) == 0).mean())


@dataclass(frozen=True)
class EvalSets:
    """The tensors an evaluation needs; members are the first |test| retain samples (split order)."""

    forget_x: torch.Tensor
    forget_y: torch.Tensor
    retain_x: torch.Tensor
    retain_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def evaluate_model(model: LogitsFn, sets: EvalSets) -> dict[str, float]:
    """FA, RA, TA and MIA-efficacy, in percent."""
    return evaluate_logits(
        logits_of(model, sets.forget_x), logits_of(model, sets.retain_x), logits_of(model, sets.test_x), sets
    )


def evaluate_logits(f: torch.Tensor, r: torch.Tensor, t: torch.Tensor, sets: EvalSets) -> dict[str, float]:
    """The same metrics from precomputed forget / retain / test logits (any runtime)."""
    n = min(len(sets.test_y), len(sets.retain_y))
    mia = mia_efficacy(
        true_label_confidence(r[:n], sets.retain_y[:n]),
        true_label_confidence(t[:n], sets.test_y[:n]),
        true_label_confidence(f, sets.forget_y),
    )
    return {
        "FA": accuracy(f, sets.forget_y),
        "RA": accuracy(r, sets.retain_y),
        "TA": accuracy(t, sets.test_y),
        "MIA": mia,
    }


def avg_gap(metrics: dict[str, float], reference: dict[str, float]) -> float:
    """Mean over FA, RA, TA, MIA of |metric - reference metric| (percentage points)."""
    return float(np.mean([abs(metrics[k] - reference[k]) for k in METRICS]))


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy().astype(np.float64)


def auc_low_loss_is_member(forget_loss: np.ndarray, test_loss_sorted: np.ndarray) -> float:
    """ROC AUC of "low loss means member", forget (positives) vs test (negatives), ties counted half.

    The Mann–Whitney form: P(a forget loss < a test loss) + ½ P(equal), with the test losses sorted
    once. Equal to ``sklearn.metrics.roc_auc_score`` and fast enough to bootstrap.
    """
    n_t = len(test_loss_sorted)
    if len(forget_loss) == 0 or n_t == 0:
        return 0.5
    right = np.searchsorted(test_loss_sorted, forget_loss, side="right")
    left = np.searchsorted(test_loss_sorted, forget_loss, side="left")
    return float(((n_t - right) + 0.5 * (right - left)).sum() / (len(forget_loss) * n_t))


def loss_attack(
    forget_loss: np.ndarray, test_loss: np.ndarray, *, bootstrap: int = 200, seed: int = 0
) -> dict[str, float]:
    """Loss-threshold membership attack, forget (positives) vs test (negatives).

    The attacker calls a sample a member when its loss is low. Returns the ROC AUC, the TPR at 1% FPR
    and a 95% bootstrap interval of the AUC. A forgotten set should score like unseen data: AUC ≈ 0.5.
    """
    from sklearn.metrics import roc_curve

    test_sorted = np.sort(test_loss)
    auc = auc_low_loss_is_member(forget_loss, test_sorted)
    y = np.concatenate([np.ones(len(forget_loss)), np.zeros(len(test_loss))])
    fpr, tpr, _ = roc_curve(y, -np.concatenate([forget_loss, test_loss]))
    tpr_at_1 = float(np.interp(0.01, fpr, tpr))
    rng = np.random.default_rng(seed)
    aucs = [
        auc_low_loss_is_member(rng.choice(forget_loss, size=len(forget_loss)),
                               np.sort(rng.choice(test_loss, size=len(test_loss))))
        for _ in range(bootstrap)
    ]
    lo, hi = np.percentile(aucs, [2.5, 97.5]) if aucs else (auc, auc)
    return {"auc": auc, "tpr_at_1fpr": tpr_at_1, "auc_low": float(lo), "auc_high": float(hi)}


def roc_points(forget_loss: np.ndarray, test_loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    y = np.concatenate([np.ones(len(forget_loss)), np.zeros(len(test_loss))])
    fpr, tpr, _ = roc_curve(y, -np.concatenate([forget_loss, test_loss]))
    return fpr, tpr
