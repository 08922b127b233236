"""Validation budgets: what a model must meet before it may ship (ARCHITECTURE.md §6).

A budgets file is a TOML table of ``check = limit``. Each check has a fixed direction (a floor or a
ceiling) and reads one measured value; a limit of ``"profile"`` takes the device profile's budget.
Unknown check names are errors that list the known ones.

Two checks are estimates from the forget set, whose sampling error grows as the set shrinks: one
sample of a 20-sample request moves FA by 5 points. Those *statistical* checks are judged like every
other check (value against limit) when the forget set is large enough that a perfectly forgotten set
would pass with probability ``confidence`` (one-sided; default 0.95). Below that size the check is
reported as inconclusive, with the number of samples that would make it conclusive, and does not block:
its verdict would be noise. ``confidence = 0.5`` judges every size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edge_qmul.config import parse_toml
from edge_qmul.errors import ConfigError


@dataclass(frozen=True)
class Check:
    name: str
    direction: str  # "min": value must be >= limit; "max": value must be <= limit
    description: str
    valid: tuple[float, float]  # the measured value's range (inclusive; inf: unbounded): a limit must be finite in it
    statistical: bool = False  # estimated from the forget set: inconclusive when the set is too small
    profile: bool = False  # the limit may be "profile": the device profile's budget of the same name

    def range_text(self) -> str:
        low, high = self.valid
        return f"[{low:g}, {high:g}{')' if high == math.inf else ']'}"


PERCENT = (0.0, 100.0)  # a percentage, or a gap between two
POINTS = (-100.0, 100.0)  # a difference of two percentages
POSITIVE = (0.0, math.inf)  # a size, a duration, a distance

CHECKS: dict[str, Check] = {
    c.name: c
    for c in (
        Check("parity_top1", "min",
              "% top-1 agreement of onnxruntime with the torch int8 model (test set; a class tied for the top counts)",
              valid=PERCENT),
        Check("max_logit_diff", "max", "largest |logit difference| onnxruntime vs torch int8 (test set)",
              valid=POSITIVE),
        Check("ta_drop", "max", "test-accuracy points lost against the deployed model before unlearning "
              "(class requests: on the retained classes' test samples)", valid=POINTS),
        Check("fa_minus_ta", "max", "forget accuracy minus test accuracy: a forgotten set should look unseen",
              valid=POINTS, statistical=True),
        Check("loss_auc", "max", "ROC AUC of a loss-threshold attack, forget vs test (0.5 = indistinguishable)",
              valid=(0.0, 1.0), statistical=True),
        Check("mia_gap_to_retrain", "max", "|MIA-efficacy - retrained model's| (only when a retrain exists)",
              valid=PERCENT),
        Check("class_fa_gap_to_retrain", "max",
              "class requests: |FA of the forgotten classes - retrained model's| (only when a retrain exists)",
              valid=PERCENT),
        Check("latency_ms_p95", "max", "batch-1 p95 latency with the profile's threads", valid=POSITIVE,
              profile=True),
        Check("peak_memory_mb", "max", "peak RSS of the on-board runtime process", valid=POSITIVE, profile=True),
        Check("size_bytes", "max", "model file size", valid=POSITIVE),
    )
}

DEFAULT_BUDGETS = "budgets.toml"
CONFIDENCE = "confidence"  # the one key of a budgets table that is not a check


@dataclass(frozen=True)
class Budgets:
    limits: dict[str, float | str]  # check name -> number, or "profile"
    source: str
    confidence: float = 0.95  # a perfectly forgotten set must pass a conclusive statistical check this often

    def limit(self, name: str, profile_limits: dict[str, float]) -> float:
        value = self.limits[name]
        if value == "profile":
            if name not in profile_limits:
                raise ConfigError(f"{self.source}: {name} = 'profile' but the device profile has no such budget",
                                  "give a number")
            return float(profile_limits[name])
        return float(value)


def load_budgets(path: str | Path | None = None) -> Budgets:
    """The shipped defaults, overridden key by key by ``path`` if given."""
    text = resources.files("edge_qmul.export").joinpath(DEFAULT_BUDGETS).read_text(encoding="utf-8")
    limits, confidence = _parse(text, "default budgets")
    source = "default budgets"
    if path is not None:
        path = Path(path)
        try:
            override = path.read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise ConfigError(f"budgets file not found: {path}", "check the --budgets path") from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read budgets file {path} ({err.__class__.__name__})",
                              "pass a UTF-8 TOML file of check = limit lines") from err
        more, own_confidence = _parse(override, str(path))
        limits = {**limits, **more}
        confidence = own_confidence if own_confidence is not None else confidence
        source = str(path)
    return Budgets(limits, source, 0.95 if confidence is None else confidence)


def _parse(text: str, source: str) -> tuple[dict[str, float | str], float | None]:
    raw = parse_toml(text, str(source), "check = limit lines under [budgets]")
    table = raw.get("budgets", raw)
    if not isinstance(table, dict) or ("budgets" in raw and len(raw) > 1):
        raise ConfigError(f"{source}: the checks must form one [budgets] table (or be top-level keys)",
                          "write [budgets] followed by check = limit lines, and nothing outside it")
    table = dict(table)
    confidence = table.pop(CONFIDENCE, None)
    if confidence is not None and (
        isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0.5 <= confidence < 1.0
    ):
        raise ConfigError(f"{source}: confidence = {confidence!r:.60} is not a probability in [0.5, 1)",
                          "give e.g. confidence = 0.95 (0.5 judges the point estimates)")
    unknown = sorted(set(table) - set(CHECKS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown check(s) {', '.join(unknown)}",
            f"known checks are: {', '.join(CHECKS)} (and the option {CONFIDENCE})",
        )
    return {name: _limit(CHECKS[name], value, source) for name, value in table.items()}, (
        None if confidence is None else float(confidence))


def _limit(check: Check, value: object, source: str) -> float | str:
    """A check's limit from a file: "profile" where the device profile has that budget, else a finite number
    inside the range of the value it limits (a limit outside it would pass or fail everything silently)."""
    allowed = f'a number in {check.range_text()}' + (' or "profile"' if check.profile else "")
    if value == "profile":
        if check.profile:
            return "profile"
        raise ConfigError(f'{source}: {check.name} = "profile", but device profiles have no {check.name} budget',
                          f"give {allowed}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{source}: {check.name} = {value!r:.60} is not a number", f"give {allowed}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    low, high = check.valid
    if not (math.isfinite(number) and low <= number <= high):
        raise ConfigError(f"{source}: {check.name} = {value!r:.60} is outside its range: a finite number in "
                          f"{check.range_text()}", f"give {allowed}")
    return number
