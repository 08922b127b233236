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
    num_clients: int = 3  # fleet size: the number of devices (SuperNodes) a round waits for
    connect_timeout: float = 60.0  # seconds to wait for num-clients SuperNodes before going ahead with fewer
    reply_timeout: float = 60.0  # seconds to wait for replies in each message round
    # Simulation engine only (its nodes' config is partition-id / num-partitions): the devices' state dirs are
    # <state-root>/device-<partition-id>. Read by the devices (client_app.device_state), never by the server.
    state_root: str = ""
    hold_after_ack: float = 0.0  # seconds the server waits between acknowledging and unlearning (crash tests)
    # Q-MUL settings for both unlearning modes (0 = the method's recommended default)
    unlearn_epochs: int = 0
    unlearn_lr: float = 0.0
    server_lr: float = 1.0  # federated mode: server step towards the devices' average (1 = plain FedAvg)
    local_epochs: int = 0  # federated mode: Q-MUL epochs each device runs per round (0 = the recommended default)
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
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not supported", f"choose one of: {', '.join(MODES)}")
        if self.num_clients < 1:
            raise ConfigError(f"num-clients={self.num_clients} must be >= 1")
        for key in ("unlearn_epochs", "local_epochs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{_field_key(key)}={getattr(self, key)} must be >= 0", "use 0 for the default")
        if self.state_root and not Path(self.state_root).is_absolute():
            raise ConfigError(f"state-root={self.state_root!r} must be an absolute path",
                              "pass -c 'state-root=\"/abs/path/to/device/states\"'")
        for key in ("connect_timeout", "reply_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{_field_key(key)}={getattr(self, key)} must be > 0 seconds")
        if not self.server_lr > 0:
            raise ConfigError(f"server-lr={self.server_lr} must be > 0", "use 1.0 (plain FedAvg)")
        for key in ("unlearn_lr", "hold_after_ack"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{_field_key(key)}={getattr(self, key)} must be >= 0", "use 0 for the default")

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


@dataclass(frozen=True)
class DeviceConfig:
    """Per-board settings (SuperNode ``--node-config``): where the device's own state is.

    A real SuperNode names its state directory (``state-dir``, made by ``edge-qmul device init --state DIR``).
    Under Flower's simulation engine every virtual node's config is only ``partition-id`` / ``num-partitions``;
    then a ``state-root`` (node config, or run config for the whole simulated fleet) gives the state
    directory ``<state-root>/device-<partition-id>``.
    """

    state_dir: str = ""
    state_root: str = ""
    partition_id: int = -1
    num_partitions: int = 0

    def __post_init__(self) -> None:
        for key in ("state_dir", "state_root"):
            value = getattr(self, key)
            if value and not Path(value).is_absolute():
                raise ConfigError(f"SuperNode --node-config {_field_key(key)}={value!r} must be an absolute path",
                                  f"pass the full path: --node-config '{_field_key(key)}=\"/abs/path\"'")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> DeviceConfig:
        return cls(**_typed(cls, node_config, "SuperNode --node-config"))

    def state_path(self, run_config: Mapping[str, Any]) -> Path:
        """The device's state directory: ``state-dir``, else ``<state-root>/device-<partition-id>`` with the
        node's or the run's ``state-root`` (simulation). Only the run config's ``state-root`` key is read."""
        if self.state_dir:
            return Path(self.state_dir)
        root = self.state_root or run_config.get("state-root", "")
        if not isinstance(root, str) or (root and not Path(root).is_absolute()):
            raise ConfigError(f"run config state-root={root!r} must be an absolute path",
                              "pass -c 'state-root=\"/abs/path/to/device/states\"'")
        if root and self.partition_id >= 0:
            return Path(root) / f"device-{self.partition_id}"
        raise ConfigError(
            "SuperNode --node-config has no state-dir: this device does not know where its state is",
            "set the device up with `edge-qmul device init --state DIR --dataset npz|imagefolder --data-root PATH "
            "--fleet-key HEX` and start the SuperNode with --node-config 'state-dir=\"DIR\"' (simulation engine: "
            "run config state-root=\"/abs/dir\" with one state per node at <state-root>/device-<partition-id>)")
