"""Membership-inference security of quantizer settings (issue: quantizer privacy ranking).

For one trained float model, each setting — fp32, int8 per-tensor weights, int8 per-channel weights,
4-bit per-channel weights (emulated with a reduced range) — is scored by how well a loss threshold tells
members (training samples) from non-members (test samples): the attack advantage is
max over thresholds of (TPR − FPR), i.e. the Kolmogorov–Smirnov distance between the two loss
distributions, and the security is 1 − advantage (1 = indistinguishable). A bootstrap over members and
non-members gives a 95% interval. Settings are ranked by security; test accuracy is reported beside it,
since a setting that destroys accuracy also "protects" privacy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from edge_qmul import quant
from edge_qmul.metrics import logits_of, per_sample_loss

SETTINGS: dict[str, Callable[[nn.Module, list[torch.Tensor]], nn.Module]] = {
    "fp32": lambda m, calib: m,
    "int8 per-tensor": lambda m, calib: quant.quantize_ptq_weights(m, calib, 8, per_channel=False),
    "int8 per-channel": lambda m, calib: quant.quantize_ptq_weights(m, calib, 8, per_channel=True),
    "int4 per-channel": lambda m, calib: quant.quantize_ptq_weights(m, calib, 4, per_channel=True),
}


def attack_advantage(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> float:
    """max_t TPR(t) − FPR(t) for "member if loss <= t" (0: no signal, 1: perfectly separable)."""
    thresholds = np.unique(np.concatenate([member_loss, nonmember_loss]))
    tpr = np.searchsorted(np.sort(member_loss), thresholds, side="right") / len(member_loss)
    fpr = np.searchsorted(np.sort(nonmember_loss), thresholds, side="right") / len(nonmember_loss)
    return float(max(0.0, (tpr - fpr).max()))


@dataclass
class SettingScore:
    setting: str
    security: float  # 1 - advantage
    security_low: float  # 95% bootstrap interval
    security_high: float
    advantage: float
    test_accuracy: float
    member_loss_mean: float
    nonmember_loss_mean: float

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def score(model: nn.Module, members: tuple[torch.Tensor, torch.Tensor], nonmembers: tuple[torch.Tensor, torch.Tensor],
          setting: str, bootstrap: int = 200, seed: int = 0) -> SettingScore:
    with torch.no_grad():
        lm_logits, ln_logits = logits_of(model, members[0]), logits_of(model, nonmembers[0])
    lm, ln = per_sample_loss(lm_logits, members[1]), per_sample_loss(ln_logits, nonmembers[1])
    adv = attack_advantage(lm, ln)
    rng = np.random.default_rng(seed)
    boot = [attack_advantage(rng.choice(lm, len(lm)), rng.choice(ln, len(ln))) for _ in range(bootstrap)]
    low, high = np.percentile(boot, [2.5, 97.5]) if bootstrap else (adv, adv)
    acc = 100.0 * float((ln_logits.argmax(1) == nonmembers[1]).float().mean())
    return SettingScore(setting, 1.0 - adv, 1.0 - float(high), 1.0 - float(low), adv, acc, float(lm.mean()),
                        float(ln.mean()))


def rank(float_model: nn.Module, calib: list[torch.Tensor], members: tuple[torch.Tensor, torch.Tensor],
         nonmembers: tuple[torch.Tensor, torch.Tensor], bootstrap: int = 200) -> list[SettingScore]:
    """Every setting in SETTINGS, most secure first."""
    scores = [score(build(float_model, calib), members, nonmembers, name, bootstrap)
              for name, build in SETTINGS.items()]
    return sorted(scores, key=lambda s: -s.security)
