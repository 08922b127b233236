"""Typed settings of the Flower app: run-wide ones from ``[tool.flwr.app.config]`` (``FederatedConfig``),
per-board ones from the SuperNode's ``--node-config`` (``DeviceConfig``).

Flower hands both over as flat dicts with hyphenated keys; unknown keys are rejected with the list of
valid ones, and values are type-checked, so a typo fails the run instead of silently using a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edge_qmul.errors import ConfigError

# "intake": collect + acknowledge only; "central": then Q-MUL on the server's copy of the data;
# "federated": then Q-MUL with the devices, whose forget samples never leave them (fedqmul).
# "rollout": ship a signed bundle to the fleet in waves (rollout.py); no forget round.
MODES = ("central", "federated", "intake", "rollout")


def _field_key(name: str) -> str:
    return name.replace("_", "-")


def _ids(text: str, key: str) -> tuple[int, ...]:
    """A comma-separated list of partition ids ("" = none): Flower run config has no list type."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"{key}={text!r} must be comma-separated partition ids", f'write e.g. {key}="0,2"')
    return tuple(sorted({int(p) for p in parts}))


# Field annotation (a string under ``from __future__ import annotations``) -> accepted Python types.
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _typed(cls: type, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Map hyphenated keys onto dataclass fields, rejecting unknown keys and wrong types."""
    specs = {_field_key(f.name): f for f in fields(cls)}
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}", f"valid keys are: {', '.join(specs)}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        f = specs[key]
        want: tuple[type, ...] = _TYPES[str(f.type)]
        if not isinstance(value, want) or (bool not in want and isinstance(value, bool)):
            raise ConfigError(f"{where}: {key}={value!r} must be of type {f.type}", f"write {key} as a {f.type}")
        out[f.name] = float(value) if f.type == "float" and isinstance(value, int | float) else value
    return out


@dataclass(frozen=True)
class FederatedConfig:
    """Run-wide settings (``[tool.flwr.app.config]``); every key the app reads is a field here."""

    run_dir: str = ""  # absolute path of the edge-qmul run directory (split.json, models, ledger)
    mode: str = "central"
    num_clients: int = 3  # fleet size = number of training partitions
    connect_timeout: float = 60.0  # seconds to wait for num-clients SuperNodes before going ahead with fewer
    reply_timeout: float = 60.0  # seconds to wait for replies in each message round
    max_request_age: int = 86400  # seconds a signed request stays acceptable (replay window)
    key_file: str = ""  # JSON {partition id: public key hex} of pre-registered device keys ("" = none)
    # Deterministic request generation on the devices (tests and demos; a real device files what its user asks).
    seed: int = 0
    requests_per_client: int = 2
    samples_per_request: int = 3
    class_partitions: str = ""  # devices that also ask to forget their samples of one class
    leave_partitions: str = ""  # devices that leave the fleet (kind "client")
    hold_after_ack: float = 0.0  # seconds the server waits between acknowledging and unlearning (crash tests)
    # Q-MUL settings for both unlearning modes (0 = the method's recommended default)
    unlearn_epochs: int = 0
    unlearn_lr: float = 0.0
    server_lr: float = 1.0  # federated mode: server step towards the devices' average (1 = plain FedAvg)
    # rollout mode
    bundle: str = ""  # absolute path of the signed bundle to roll out
    waves: str = "5,25,100"  # cumulative percentages of the fleet per wave
    wave_pass_rate: float = 1.0  # fraction of a wave's devices that must pass for the next wave to start
    max_forget_auc: float = 0.75  # on-board forget check: loss-attack AUC of own forgotten vs held-out samples

    def __post_init__(self) -> None:
        if not self.run_dir or not Path(self.run_dir).is_absolute():
            # Relative paths would resolve against the SuperLink's working directory, not the user's.
            raise ConfigError(
                f"run-dir={self.run_dir!r} must be an absolute path", 'pass -c \'run-dir="/abs/path/to/run"\''
            )
        if self.mode == "rollout" and (not self.bundle or not Path(self.bundle).is_absolute()):
            raise ConfigError(f"bundle={self.bundle!r}: rollout mode needs the bundle's absolute path",
                              'pass -c \'mode="rollout" bundle="/abs/path/bundle.tar"\'')
        if not 0 < self.wave_pass_rate <= 1 or not 0 < self.max_forget_auc <= 1:
            raise ConfigError(
                f"wave-pass-rate={self.wave_pass_rate}, max-forget-auc={self.max_forget_auc} must be in (0, 1]"
            )
        if self.key_file and not Path(self.key_file).is_absolute():
            raise ConfigError(f"key-file={self.key_file!r} must be an absolute path", "pass the key file's full path")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not supported", f"choose one of: {', '.join(MODES)}")
        for key in ("num_clients", "max_request_age"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{_field_key(key)}={getattr(self, key)} must be >= 1")
        for key in ("requests_per_client", "samples_per_request", "unlearn_epochs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{_field_key(key)}={getattr(self, key)} must be >= 0")
        for key in ("connect_timeout", "reply_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{_field_key(key)}={getattr(self, key)} must be > 0 seconds")
        if not self.server_lr > 0:
            raise ConfigError(f"server-lr={self.server_lr} must be > 0", "use 1.0 (plain FedAvg)")
        for key in ("unlearn_lr", "hold_after_ack"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{_field_key(key)}={getattr(self, key)} must be >= 0", "use 0 for the default")
        for key in ("class_partitions", "leave_partitions"):
            bad = [p for p in _ids(getattr(self, key), _field_key(key)) if p >= self.num_clients]
            if bad:
                raise ConfigError(f"{_field_key(key)} names partition(s) {bad} but num-clients={self.num_clients}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederatedConfig:
        return cls(**_typed(cls, run_config, "[tool.flwr.app.config]"))

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def unlearn_overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.unlearn_epochs:
            out["epochs"] = self.unlearn_epochs
        if self.unlearn_lr:
            out["lr"] = self.unlearn_lr
        return out

    @property
    def ledger_path(self) -> Path:
        from edge_qmul.run import Run

        return Run(self.run_path).path("ledger")

    @property
    def class_ids(self) -> tuple[int, ...]:
        return _ids(self.class_partitions, "class-partitions")

    @property
    def leave_ids(self) -> tuple[int, ...]:
        return _ids(self.leave_partitions, "leave-partitions")


@dataclass(frozen=True)
class DeviceConfig:
    """Per-board settings (SuperNode ``--node-config``)."""

    partition_id: int = -1
    num_partitions: int = 0
    # Where the device keeps its key and request queue across runs and reboots ("" = in Flower's per-run
    # node state only: the key is then new every run and the server refuses it as a key mismatch).
    state_dir: str = ""
    fleet_key: str = ""  # the fleet's bundle-signing public key: 64 hex chars, or the path of public_key.hex

    def __post_init__(self) -> None:
        if self.num_partitions < 1 or not 0 <= self.partition_id < self.num_partitions:
            raise ConfigError(
                f"node config partition-id={self.partition_id}, num-partitions={self.num_partitions} is invalid",
                'start the SuperNode with --node-config "partition-id=0 num-partitions=3"',
            )
        if self.state_dir and not Path(self.state_dir).is_absolute():
            raise ConfigError(f"state-dir={self.state_dir!r} must be an absolute path")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> DeviceConfig:
        return cls(**_typed(cls, node_config, "SuperNode --node-config"))
