"""Device profiles: one flat TOML file per board (ARCHITECTURE.md §7).

A profile says what a board is (architecture, CPU, cores, ISA features, RAM), how the runtime should
run on it (onnxruntime providers, threads), which quantization engine the int8 model must be built
with for it (``qnnpack`` on ARM, ``x86`` on Intel/AMD), and the latency / memory budgets the model has
to meet there. The shipped profiles live in ``devices/profiles/<name>.toml`` and are read through
``importlib.resources`` so they work from an installed wheel as well as from a checkout.

This module needs only the standard library and :mod:`edge_qmul.errors` (no torch).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, fields
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from edge_qmul.config import parse_toml
from edge_qmul.errors import ConfigError

ARCHES: dict[str, str] = {"aarch64": "qnnpack", "x86_64": "x86"}
"""Supported architectures and the quantization engine each one requires."""

ISA_FEATURES: dict[str, frozenset[str]] = {
    "aarch64": frozenset({"neon", "dotprod", "fp16", "i8mm", "bf16", "sve", "sve2"}),
    "x86_64": frozenset(
        {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"}
    ),
}
"""ISA feature names a profile may list, per architecture (a typo or an x86 flag on ARM is an error)."""

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A profile name becomes part of file names (``bundles/VERSION-NAME.tar``): no separators, no dot-dot."""

RANGES: dict[str, tuple[float, float]] = {
    "cores": (0, 4096),
    "ram_mb": (0, 16 * 2**20),  # 16 TiB
    "latency_budget_ms": (0, 3_600_000),  # an hour for one batch-1 inference
    "memory_budget_mb": (0, 16 * 2**20),
}
"""Numeric fields: (exclusive lower, inclusive upper bound); every value must also be finite. ``threads``
lies in 1..cores and ``memory_budget_mb`` at most ``ram_mb``."""


@dataclass(frozen=True)
class DeviceProfile:
    """One board. Lists from the TOML file are stored as tuples so a profile is immutable."""

    name: str
    description: str
    arch: str
    cpu: str
    cores: int
    isa: tuple[str, ...]
    ram_mb: int
    providers: tuple[str, ...]
    threads: int
    quant_engine: str
    latency_budget_ms: float
    memory_budget_mb: float

    def __post_init__(self) -> None:
        for key in ("isa", "providers"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        where = f"profile {self.name!r}"
        if not self.name.strip():
            raise ConfigError("device profile has an empty name", 'set name = "<board>", e.g. the file name')
        if not NAME_RE.match(self.name):
            raise ConfigError(f"{where}: the name must be 1-64 characters of [A-Za-z0-9._-], starting alphanumeric",
                              'set name = "<board>", e.g. the file name without .toml')
        for key, (low, high) in RANGES.items():
            value = getattr(self, key)
            if not low < value <= high:  # false for nan and inf too: the bounds are finite
                raise ConfigError(f"{where}: {key} = {value!r} must be a finite number > {low:g} and <= {high:g}",
                                  f"set the board's {key}")
        if self.arch not in ARCHES:
            raise ConfigError(f"{where}: unknown arch {self.arch!r}", f"use one of: {', '.join(ARCHES)}")
        expected_engine = ARCHES[self.arch]
        if self.quant_engine != expected_engine:
            raise ConfigError(
                f"{where}: quant_engine = {self.quant_engine!r} does not match arch = {self.arch!r}",
                f'set quant_engine = "{expected_engine}" (aarch64 needs qnnpack, x86_64 needs x86)',
            )
        if not 1 <= self.threads <= self.cores:
            raise ConfigError(
                f"{where}: threads = {self.threads} must be between 1 and cores = {self.cores}",
                f"set threads to at most {self.cores}",
            )
        unknown_isa = sorted(set(self.isa) - ISA_FEATURES[self.arch])
        if unknown_isa:
            raise ConfigError(
                f"{where}: unknown {self.arch} ISA feature(s) {', '.join(unknown_isa)}",
                f"use names from: {', '.join(sorted(ISA_FEATURES[self.arch]))}",
            )
        if not self.providers:
            raise ConfigError(f"{where}: providers is empty", 'set providers = ["CPUExecutionProvider"]')
        if "CPUExecutionProvider" not in self.providers:
            raise ConfigError(
                f"{where}: providers {list(self.providers)} lack CPUExecutionProvider",
                'add "CPUExecutionProvider": the on-board check runs the int8 model on the CPU',
            )
        if self.memory_budget_mb > self.ram_mb:
            raise ConfigError(
                f"{where}: memory_budget_mb = {self.memory_budget_mb} exceeds ram_mb = {self.ram_mb}",
                "lower memory_budget_mb below the board's RAM",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-ready values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DeviceProfile))
"""The keys every profile file must have, no more and no fewer."""

_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(DeviceProfile)}


def _shipped_dir() -> Traversable:
    return resources.files("edge_qmul.devices") / "profiles"


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in _shipped_dir().iterdir()
        if entry.is_file() and entry.name.endswith(".toml")
    )


def _check_type(key: str, value: Any, where: str) -> Any:
    """Return the value converted to the field's type, or raise a ConfigError naming file and key."""
    ftype = _TYPES[key]
    if ftype == "tuple[str, ...]":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where}: {key} = {value!r:.60} should be a list of strings",
                          f'write {key} = ["...", ...]')
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
    }[ftype]
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r:.60} should be of type {ftype}", f"write {key} as a {ftype}")
    if ftype != "float":
        return value
    try:
        return float(value)
    except OverflowError as err:  # an integer beyond any float
        raise ConfigError(f"{where}: {key} = {value!r:.60} is too large", f"write {key} as a {ftype}") from err


def profile_from_dict(values: dict[str, Any], where: str = "<dict>") -> DeviceProfile:
    """Build a profile from flat key/values, rejecting unknown, missing and mistyped keys.

    ``where`` names the source (a file path) in every error message.
    """
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        hints = [
            f"{close[0]!r} for {key!r}" for key in unknown if (close := difflib.get_close_matches(key, FIELDS, n=1))
        ]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}{hint}",
            f"valid keys are: {', '.join(FIELDS)}",
        )
    missing = [k for k in FIELDS if k not in values]
    if missing:
        raise ConfigError(
            f"{where}: missing key(s) {', '.join(missing)}",
            f"every profile needs all of: {', '.join(FIELDS)}",
        )
    typed = {k: _check_type(k, values[k], where) for k in FIELDS}
    try:
        return DeviceProfile(**typed)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err.message}", err.fix) from err


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a shipped profile by name (``"rpi4"``) or any profile file by path.

    A value containing a path separator or ending in ``.toml`` is a path; anything else is the name of
    a shipped profile.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith(".toml"):
        path = Path(text)
        where = str(path)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise ConfigError(
                f"device profile file not found: {path}",
                f"check the path, or use a shipped profile name: {', '.join(list_profiles())}",
            ) from err
        except (OSError, ValueError) as err:  # ValueError: not UTF-8, or a NUL in the path
            raise ConfigError(f"cannot read device profile {path}: {err}", "check the file") from err
    else:
        entry = _shipped_dir() / f"{text}.toml"
        where = str(entry)
        if not text or not entry.is_file():
            raise ConfigError(
                f"unknown device profile {text!r}",
                f"use one of the shipped profiles: {', '.join(list_profiles())}, or a path to a .toml file",
            )
        raw = entry.read_text(encoding="utf-8")
    return profile_from_dict(parse_toml(raw, f"device profile {where}", "key = value lines"), where)
