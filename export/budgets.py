"""Validation budgets: what a model must meet before it may ship (DESIGN §6).

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

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edge_qmul.errors import ConfigError


@dataclass(frozen=True)
class Check:
    name: str
    direction: str  # "min": value must be >= limit; "max": value must be <= limit
    description: str
    statistical: bool = False  # estimated from the forget set: inconclusive when the set is too small


CHECKS: dict[str, Check] = {
    c.name: c
    for c in (
        Check("parity_top1", "min",
              "% top-1 agreement of onnxruntime with the torch int8 model (test set; a class tied for the top counts)"),
        Check("max_logit_diff", "max", "largest |logit difference| onnxruntime vs torch int8 (test set)"),
        Check("ta_drop", "max", "test-accuracy points lost against the deployed model before unlearning "
              "(class requests: on the retained classes' test samples)"),
        Check("fa_minus_ta", "max", "forget accuracy minus test accuracy: a forgotten set should look unseen",
              statistical=True),
        Check("loss_auc", "max", "ROC AUC of a loss-threshold attack, forget vs test (0.5 = indistinguishable)",
              statistical=True),
        Check("mia_gap_to_retrain", "max", "|MIA-efficacy - retrained model's| (only when a retrain exists)"),
        Check("class_fa_gap_to_retrain", "max",
              "class requests: |FA of the forgotten classes - retrained model's| (only when a retrain exists)"),
        Check("latency_ms_p95", "max", "batch-1 p95 latency with the profile's threads"),
        Check("peak_memory_mb", "max", "peak RSS of the on-board runtime process"),
        Check("size_bytes", "max", "model file size"),
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
        more, own_confidence = _parse(override, str(path))
        limits = {**limits, **more}
        confidence = own_confidence if own_confidence is not None else confidence
        source = str(path)
    return Budgets(limits, source, 0.95 if confidence is None else confidence)


def _parse(text: str, source: str) -> tuple[dict[str, float | str], float | None]:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source} is not valid TOML: {err}", "fix the syntax") from err
    table = dict(raw.get("budgets", raw))
    confidence = table.pop(CONFIDENCE, None)
    if confidence is not None and (
        isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0.5 <= confidence < 1.0
    ):
        raise ConfigError(f"{source}: confidence = {confidence!r} is not a probability in [0.5, 1)",
                          "give e.g. confidence = 0.95 (0.5 judges the point estimates)")
    unknown = sorted(set(table) - set(CHECKS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown check(s) {', '.join(unknown)}",
            f"known checks are: {', '.join(CHECKS)} (and the option {CONFIDENCE})",
        )
    out: dict[str, float | str] = {}
    for name, value in table.items():
        if value == "profile" or (isinstance(value, int | float) and not isinstance(value, bool)):
            out[name] = value if value == "profile" else float(value)
        else:
            raise ConfigError(f"{source}: {name} = {value!r} is not a number", 'give a number or "profile"')
    return out, None if confidence is None else float(confidence)
