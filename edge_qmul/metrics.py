"""Accuracy, membership-inference efficacy and Avg Gap (DESIGN §5).

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
    f = logits_of(model, sets.forget_x)
    r = logits_of(model, sets.retain_x)
    t = logits_of(model, sets.test_x)
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
