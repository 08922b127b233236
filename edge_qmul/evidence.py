"""How much a forget-set check can say at a given size: sampling noise and conclusiveness (ARCHITECTURE.md §6).

Two validation checks are estimates from the forget set (FA − TA, the loss attack's AUC), whose sampling
error grows as the set shrinks. This module says, from the sample counts alone, how large that error is
for a perfectly forgotten set, and whether a verdict at this size means anything. Validation, bundles (which
recompute every verdict), certificates and the on-board forget check all judge by it. Standard library only,
so a board can use it.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any


def accuracy_gap_null_se(p: float, n_forget: int, n_test: int) -> float:
    """Standard error, in points, of FA − TA for a forget set the model treats exactly like unseen data.

    Both accuracies are then binomial with the same p (the test accuracy, as a proportion); normal
    approximation.
    """
    return 100.0 * math.sqrt(p * (1.0 - p) * (1.0 / n_forget + 1.0 / n_test))


def auc_null_se(n_forget: int, n_test: int) -> float:
    """Standard error of the loss-attack AUC when forget and test losses share one distribution
    (Mann–Whitney, no ties): sqrt((n_f + n_t + 1) / (12 n_f n_t))."""
    return math.sqrt((n_forget + n_test + 1) / (12.0 * n_forget * n_test))


def fa_minus_ta_power(
    n_forget: int, n_test: int, test_accuracy: float, *, limit: float, confidence: float, value: float | None = None
) -> dict[str, Any]:
    """Can ``fa_minus_ta`` tell a forgotten set from a remembered one with ``n_forget`` samples?

    See :func:`forget_set_power`; the ideal FA − TA is 0 points, its sampling error binomial at the
    measured test accuracy.
    """
    return forget_set_power(
        lambda n: accuracy_gap_null_se(test_accuracy, n, n_test), n_forget, ideal=0.0, limit=limit,
        confidence=confidence, unit=" points", value=value,
    )


def loss_auc_power(
    n_forget: int, n_test: int, *, limit: float, confidence: float, value: float | None = None
) -> dict[str, Any]:
    """Can ``loss_auc`` tell a forgotten set from a remembered one with ``n_forget`` samples? (ideal 0.5)"""
    return forget_set_power(lambda n: auc_null_se(n, n_test), n_forget, ideal=0.5, limit=limit,
                            confidence=confidence, unit="", value=value)


def forget_set_power(
    null_se: Any, n_forget: int, *, ideal: float, limit: float, confidence: float, unit: str,
    value: float | None = None,
) -> dict[str, Any]:
    """The sampling noise of a forget-set check, and whether its verdict means anything at this size.

    ``noise`` is the one-sided ``confidence`` quantile of the estimate's sampling error for a perfectly
    forgotten set (true value ``ideal``). If the limit is closer to the ideal than that, a perfectly
    forgotten set would fail the check more than 1 − ``confidence`` of the time: the check is then
    *inconclusive* (reported, not blocking), with the smallest forget set that makes it conclusive. A
    limit at or below the ideal is always judged (more samples would not make it fairer). A measured
    ``value`` that passes by more than the noise (``value + noise <= limit``: the one-sided ``confidence``
    bound of the true value is under the limit) is a conclusive pass at any size, e.g. a forgotten class
    whose FA is 87 points under TA; a failing verdict stays inconclusive below the size that protects a
    forgotten set from false alarms.
    """
    z = NormalDist().inv_cdf(confidence)
    noise = z * null_se(n_forget)
    out: dict[str, Any] = {"noise": noise, "confidence": confidence}
    margin = limit - ideal
    clear_pass = value is not None and value + noise <= limit
    if margin > 0 and noise > margin and not clear_pass:
        needed = _smallest_conclusive_n(lambda n: z * null_se(n) <= margin)
        out["inconclusive"] = (
            f"with {n_forget} forget samples a perfectly forgotten set would exceed {limit:g}{unit} more than "
            f"{1 - confidence:.0%} of the time (sampling noise {noise:.3g}{unit}); "
            + (f"{needed} or more samples make it conclusive" if needed else "no forget set can at this test-set size")
        )
    return out


def _smallest_conclusive_n(conclusive: Any, ceiling: int = 10_000_000) -> int | None:
    """The smallest n for which ``conclusive(n)`` holds (it is monotone in n), or None below ``ceiling``."""
    hi = 1
    while not conclusive(hi):
        hi *= 2
        if hi > ceiling:
            return None
    lo = hi // 2  # conclusive(lo) is false (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if conclusive(mid) else (mid, hi)
    return hi
