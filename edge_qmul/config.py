"""Typed stage configs and loading them from a TOML file plus flag overrides.

A TOML file has one table per stage (``[data]``, ``[train]``, ``[quant]``, ``[unlearn]``) whose keys
are the dataclass fields; an unknown table or key is an error that lists the valid ones.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edge_qmul.data import DATASETS
from edge_qmul.errors import ConfigError
from edge_qmul.quant import BACKENDS
from edge_qmul.train import TrainConfig
from edge_qmul.unlearn import UnlearnConfig


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    root: str = ""  # "" = the dataset's default location (or none needed)
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # single-pool datasets only (digits, synthetic)
    train_fraction: float = 1.0  # keep this share of the training list (smaller training sets; benchmarks)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}", f"choose one of: {', '.join(DATASETS)}")
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be in (0, 1)", "use e.g. 0.1")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"data.train_fraction={self.train_fraction} must be in (0, 1]", "use 1.0 for all")


@dataclass(frozen=True)
class QuantConfig:
    backend: str = "x86"
    calibration_size: int = 1024

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown quantization backend {self.backend!r}", f"choose one of: {', '.join(BACKENDS)}")
        if self.calibration_size < 1:
            raise ConfigError(f"quant.calibration_size={self.calibration_size} must be >= 1", "use e.g. 1024")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "train": TrainConfig,
    "quant": QuantConfig,
    "unlearn": UnlearnConfig,
}


def _coerce(cls: type, key: str, value: Any, where: str) -> Any:
    ftype = {f.name: f.type for f in fields(cls)}[key]
    types: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool}
    expected = types.get(str(ftype))
    if expected is not None and (
        not isinstance(value, expected) or (expected is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: {key} = {value!r} should be of type {ftype}", f"write {key} as a {ftype}")
    return float(value) if str(ftype) == "float" else value


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a stage config, rejecting unknown keys with the list of valid ones."""
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"{where}: unknown option(s) {', '.join(unknown)}", f"valid options are: {', '.join(valid)}"
        )
    return cls(**{k: _coerce(cls, k, v, where) for k, v in values.items()})


def load_toml(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Read a config file into {section: {key: value}}; validates section and key names."""
    if path is None:
        return {}
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}", "check the --config path") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}", "fix the syntax") from err
    out: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        if section not in SECTIONS or not isinstance(table, dict):
            raise ConfigError(
                f"{path}: unknown table [{section}]", f"valid tables are: {', '.join(f'[{s}]' for s in SECTIONS)}"
            )
        build(SECTIONS[section], table, f"{path} [{section}]")  # validate keys and types now
        out[section] = table
    return out


def resolve(section: str, toml: dict[str, dict[str, Any]], overrides: dict[str, Any]) -> Any:
    """TOML values, then flags that were given (``None`` means 'not given')."""
    values = {**toml.get(section, {}), **{k: v for k, v in overrides.items() if v is not None}}
    return build(SECTIONS[section], values, f"[{section}]")


def config_hash(*configs: Any) -> str:
    blob = json.dumps([asdict(c) for c in configs], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
