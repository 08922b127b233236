"""Every typed config, serialising them, and loading them from a TOML file plus flag overrides.

This module is the bottom of the core: it imports nothing from the package but ``edge_qmul.errors`` and
nothing heavy (no torch), so the CLI, the device side and every stage can read configs cheaply. The
names other modules check against (datasets, quantization backends) live here for the same reason.

Two kinds of config, both frozen dataclasses validated in ``__post_init__`` (types included: a bool is
not an int, a float must be finite):

* stage configs, one per ``[data]``, ``[train]``, ``[quant]`` table;
* one config class per unlearning method (``QMul``, ``Auto``, ``Finetune``, ``RandomLabel``,
  ``GradAscent``, ``Famr``, ``Retrain``) whose defaults are the method's recommended settings;
  ``edge_qmul.methods`` dispatches on the config's type. An ``[unlearn]`` table is checked against the
  class its ``method`` key (or the CLI's ``--method``) names.

``to_dict`` / ``config_from_dict`` serialise any of them to plain JSON-able dicts tagged with the class
and a version; only the classes registered here (an allow-list by name) are rebuilt. ``build`` is the one
constructor for values from a file or flags: an unknown key is an error that lists the valid ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar, overload

from edge_qmul.errors import ConfigError, UnlearningError

CONFIG_VERSION = 1  # of the to_dict() layout; config_from_dict refuses any other

# Names other modules validate against (edge_qmul.data / edge_qmul.quant import them from here).
DATASETS: tuple[str, ...] = (
    "digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic", "imagefolder", "npz",
)
BACKEND_NAMES: tuple[str, ...] = ("x86", "qnnpack")
COLORS: tuple[str, ...] = ("auto", "grayscale", "rgb")  # as edge_qmul.data.COLORS (image folders)
IMAGE_SIZE_RANGE: tuple[int, int] = (4, 1024)  # as edge_qmul.data.IMAGE_SIZE_RANGE, inclusive

SCHEDULES = ("cosine", "constant")
UPDATES = ("sequential", "mixed")
LABEL_VARIANTS = ("faithful", "paper_code", "random")  # "random": a uniformly random wrong class (ablation)
FORGET_TARGETS = ("none", "val")
# Which parameters a loop method trains: "classifier" (the head), "last-K-blocks" (the head and the K blocks
# before it, e.g. "last-1-blocks"; edge_qmul.quant.blocks says what a block is) or "all".
LAYERS = ("all", "classifier", "last-K-blocks")
NORM_POOLINGS = ("sum", "l2")  # Q-MUL's ḡ: the sum of per-tensor gradient norms (paper) or one global L2 norm

MAX_EPOCHS = 10_000
MAX_COUNT = 2**31 - 1  # batch sizes and batch / sample counts
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


# ---------------------------------------------------------------------------------------------------
# Validation helpers (raise ConfigError naming ``section.key`` and the fix)
# ---------------------------------------------------------------------------------------------------


def _bad(cfg: Config, key: str, fix: str) -> ConfigError:
    return ConfigError(f"{cfg.section}.{key}={getattr(cfg, key)!r} is invalid", fix)


def _check_types(cfg: Config) -> None:
    """Every field holds its annotated type: bool is not an int, an int is accepted (and stored) as a float."""
    for f in fields(cfg):
        value, expected = getattr(cfg, f.name), _TYPES[str(f.type)]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                object.__setattr__(cfg, f.name, float(value))
            except OverflowError as err:
                raise _bad(cfg, f.name, f"write {f.name} as a float of sensible size") from err
            continue
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise ConfigError(
                f"{cfg.section}.{f.name} = {value!r} should be of type {f.type}", f"write {f.name} as a {f.type}"
            )


def _int_in(cfg: Config, key: str, lo: int, hi: int, fix: str) -> None:
    if not lo <= getattr(cfg, key) <= hi:
        raise _bad(cfg, key, f"{fix} (allowed: {lo}..{hi})")


def _float_in(cfg: Config, key: str, fix: str, *, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False,
              hi_open: bool = True) -> None:
    """A finite float in the interval; the default is [0, inf)."""
    v = getattr(cfg, key)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        raise _bad(cfg, key, fix)


def _one_of(cfg: Config, key: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, key) not in choices:
        raise _bad(cfg, key, f"choose one of: {', '.join(choices)}")


def scope_blocks(layers: str) -> int | None:
    """Blocks before the head a ``layers`` value trains: 0 for "classifier", -1 for "all", K for
    "last-K-blocks"; None if the value is not one of those."""
    if layers == "classifier":
        return 0
    if layers == "all":
        return -1
    parts = layers.split("-")
    if len(parts) == 3 and parts[0] == "last" and parts[2] == "blocks" and parts[1].isdigit():
        k = int(parts[1])
        return k if 1 <= k <= MAX_COUNT else None
    return None


# ---------------------------------------------------------------------------------------------------
# Bases
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config(ABC):
    """Base of every config: fields of the types in ``_TYPES``, checked on construction."""

    section: ClassVar[str] = ""  # the TOML table, used in messages

    def __post_init__(self) -> None:
        _check_types(self)

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The config as plain data that ``config_from_dict`` rebuilds."""


@dataclass(frozen=True)
class StageConfig(Config):
    """A pipeline stage's config: one TOML table each."""

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.section, "version": CONFIG_VERSION, **asdict(self)}


@dataclass(frozen=True)
class MethodConfig(Config):
    """Base of the unlearning method configs; ``edge_qmul.methods`` runs the method registered for the type."""

    name: ClassVar[str] = ""
    section: ClassVar[str] = "unlearn"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "version": CONFIG_VERSION, **asdict(self)}


# ---------------------------------------------------------------------------------------------------
# Stage configs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig(StageConfig):
    section: ClassVar[str] = "data"

    dataset: str = "digits"
    root: str = ""  # "" = the dataset's default location (or none needed)
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # single-pool datasets only (digits, synthetic)
    train_fraction: float = 1.0  # keep this share of the training list (smaller training sets; benchmarks)
    image_size: int = 0  # image folders: resize to image_size x image_size (0 = the images' own size)
    color: str = "auto"  # image folders: "auto", "grayscale" or "rgb"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}", f"choose one of: {', '.join(DATASETS)}")
        _int_in(self, "seed", 0, MAX_SEED, "use a non-negative seed")
        for key in ("val_fraction", "test_fraction"):
            _float_in(self, key, "use e.g. 0.1 (a fraction in (0, 1))", lo_open=True, hi=1.0)
        _float_in(self, "train_fraction", "use 1.0 for all (a fraction in (0, 1])", lo_open=True, hi=1.0,
                  hi_open=False)
        lo, hi = IMAGE_SIZE_RANGE
        if self.image_size != 0:
            _int_in(self, "image_size", lo, hi, "use 0 to keep the images' own size")
        _one_of(self, "color", COLORS)


@dataclass(frozen=True)
class TrainConfig(StageConfig):
    """The original training recipe (retrain reuses it unchanged)."""

    section: ClassVar[str] = "train"

    model: str = "small_cnn"
    width: int = 0  # 0 = the model's default width
    width_multiplier: float = 1.0  # mobilenetv2 only: scales every layer's channels (e.g. 0.35)
    epochs: int = 12
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    generations: int = 1  # > 1: train generation by generation with checkpoints (edge_qmul.planner)

    def __post_init__(self) -> None:
        super().__post_init__()
        _int_in(self, "epochs", 1, MAX_EPOCHS, "set epochs to 1 or more")
        _float_in(self, "lr", "use a positive learning rate, e.g. 0.05", lo_open=True)
        _int_in(self, "batch_size", 1, MAX_COUNT, "use e.g. 128")
        _int_in(self, "width", 0, MAX_COUNT, "use 0 for the default width")
        _float_in(self, "width_multiplier", "use e.g. 0.35, 0.5, 0.75 or 1.0 (mobilenetv2)", hi=4.0, lo_open=True)
        _int_in(self, "generations", 1, MAX_COUNT, "use 1 for one-shot training")
        _float_in(self, "momentum", "use e.g. 0.9 (in [0, 1))", hi=1.0)
        _float_in(self, "weight_decay", "use e.g. 5e-4 (0 or more)")
        _int_in(self, "seed", 0, MAX_SEED, "use a non-negative seed")


@dataclass(frozen=True)
class QuantConfig(StageConfig):
    section: ClassVar[str] = "quant"

    backend: str = "x86"
    calibration_size: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKEND_NAMES:
            raise ConfigError(
                f"unknown quantization backend {self.backend!r}", f"choose one of: {', '.join(BACKEND_NAMES)}"
            )
        _int_in(self, "calibration_size", 1, MAX_COUNT, "use e.g. 1024")


# ---------------------------------------------------------------------------------------------------
# Unlearning method configs (ARCHITECTURE.md §4). The loop fields' defaults are the Q-MUL paper code's; each
# method class overrides them with its recommended settings.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopConfig(MethodConfig):
    """Fields every method that runs the shared unlearning loop has (defaults: the paper code's)."""

    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    # Which parameters move: "classifier" (the head only; the features stay as deployed), "last-K-blocks"
    # (the head and the K blocks before it) or "all".
    layers: str = "all"
    # Bounded retain sampling: k > 0 draws k random retain batches per epoch, used both for ḡ_r and
    # for the retain update; 0 uses the whole retain set every epoch, as the paper's code does.
    retain_batches: int = 0
    # Retain sample proportional to the forget set: r > 0 draws ceil(r x |forget|) random retain samples
    # per epoch (at least one batch), so the cost follows the forget set, not the training set, while the
    # forget/retain balance of mixed batches stays the same whatever the request's size.
    retain_ratio: float = 0.0
    # Retain-only repair pass after the unlearning epochs (0 = none), at repair_lr.
    repair_batches: int = 0
    repair_lr: float = 0.01
    observe_activations: bool = False  # let activation ranges move (default: keep the deployed grid)
    update_bn: bool = False  # let BatchNorm running statistics move
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _int_in(self, "epochs", 0, MAX_EPOCHS, "use 0 or more epochs")
        _float_in(self, "lr", "use a positive learning rate, e.g. 0.01", lo_open=True)
        _int_in(self, "batch_size", 1, MAX_COUNT, "use e.g. 256")
        _float_in(self, "momentum", "use e.g. 0.9 (in [0, 1))", hi=1.0)
        _float_in(self, "weight_decay", "use e.g. 5e-4 (0 or more)")
        _one_of(self, "schedule", SCHEDULES)
        if scope_blocks(self.layers) is None:
            raise _bad(self, "layers", "use 'classifier', 'all' or 'last-K-blocks' with K >= 1, e.g. 'last-1-blocks'")
        _int_in(self, "retain_batches", 0, MAX_COUNT, "use 0 to disable")
        _int_in(self, "repair_batches", 0, MAX_COUNT, "use 0 to disable")
        _float_in(self, "retain_ratio", "use a non-negative ratio (0 = off)")
        if self.retain_ratio > 0 and self.retain_batches > 0:
            raise _bad(self, "retain_ratio", "use retain_ratio or retain_batches, not both")
        _float_in(self, "repair_lr", "use a positive learning rate", lo_open=True)
        _int_in(self, "seed", 0, MAX_SEED, "use a non-negative seed")


# The released code's Q-MUL settings (ARCHITECTURE.md §4.1): all layers, sequential passes, 10 epochs at lr 0.01,
# batch 256, ḡ over every batch.
QMUL_PAPER_CODE: dict[str, Any] = {
    "layers": "all", "update": "sequential", "lr": 0.01, "epochs": 10, "batch_size": 256, "norm_batches": 0,
}

# Q-MUL's recommended recipe per scope (QMul.for_scope, Auto's escalation). "classifier" is the class defaults
# (bench/qmul_vs_retrain.py). The wider scopes are the configurations bench/memorize.py chose on its two random
# tuning forget sets with the validation split (ResNet-8 memorizing Fashion-MNIST; bench/results/memorize.md):
# 3 epochs of mixed updates on a retain draw of 3 x the forget set, ḡ from at most 2 batches per side, at the
# learning rate of the ladder 0.001-0.03 with the smallest tuning Avg Gap (0.03 for the last block; 0.01 for
# the whole network, whose 3 epochs cost ~0.14 of retrain's CPU time, over the 1/10 budget). Both leave most
# of the memorized forget set remembered there (the results say how much); the next rate up collapses it.
QMUL_SCOPE_RECIPES: dict[str, dict[str, Any]] = {
    "classifier": {},
    "last-1-blocks": {"lr": 0.03, "epochs": 3, "update": "mixed", "retain_ratio": 3.0, "norm_batches": 2},
    "all": {"lr": 0.01, "epochs": 3, "update": "mixed", "retain_ratio": 3.0, "norm_batches": 2},
}


@dataclass(frozen=True)
class QMul(LoopConfig):
    """Q-MUL (ARCHITECTURE.md §4.1). Recommended settings: chosen by the smallest mean Avg Gap on two tuning forget
    sets disjoint from the reported one (bench/qmul_vs_retrain.py, results in bench/results/)."""

    name: ClassVar[str] = "qmul"

    epochs: int = 5
    lr: float = 0.3
    layers: str = "classifier"
    update: str = "mixed"
    label_variant: str = "faithful"  # "paper_code": the released code's variant; "random": ablation
    reweight: bool = True  # False: w_f = w_r = 1 (ablation)
    # Batches per side used to estimate ḡ_f and ḡ_r (0 = every forget batch and every sampled retain batch).
    norm_batches: int = 16
    # "val": skip an epoch's forget pass once forget accuracy (eval mode, at the epoch start) is at or
    # below accuracy on the held-out validation split, i.e. once the forget set already looks unseen.
    forget_target: str = "none"
    # Cap on each forget sample's similar-label loss (0 = off). Samples the model already holds far
    # from ỹ (loss above the cap) then give no gradient, so the update acts on the confusable ones.
    forget_loss_cap: float = 0.0
    # How ḡ_f and ḡ_r pool the trainable tensors' gradients: "sum" of per-tensor L2 norms (the paper) or one
    # global "l2" norm (which a many-tensor scope does not inflate by its tensor count).
    norm_pooling: str = "sum"

    @classmethod
    def paper_code(cls, **changes: Any) -> Self:
        """The released code's settings (``QMUL_PAPER_CODE``), then ``changes``."""
        return cls(**{**QMUL_PAPER_CODE, **changes})

    @classmethod
    def for_scope(cls, layers: str, **changes: Any) -> Self:
        """The recommended recipe for ``layers`` (``QMUL_SCOPE_RECIPES``; a "last-K-blocks" without its own
        entry takes last-1-blocks' recipe), then ``changes``."""
        if scope_blocks(layers) is None:
            raise ConfigError(f"unknown Q-MUL scope {layers!r}", "use 'classifier', 'last-K-blocks' or 'all'")
        recipe = QMUL_SCOPE_RECIPES.get(layers, QMUL_SCOPE_RECIPES["last-1-blocks"] if layers != "all" else {})
        return cls(**{**recipe, "layers": layers, **changes})

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of(self, "update", UPDATES)
        _one_of(self, "label_variant", LABEL_VARIANTS)
        _int_in(self, "norm_batches", 0, MAX_COUNT, "use 0 (all batches) or a positive count")
        _one_of(self, "forget_target", FORGET_TARGETS)
        _float_in(self, "forget_loss_cap", "use a non-negative cap (0 = off)")
        _one_of(self, "norm_pooling", NORM_POOLINGS)
        if self.forget_loss_cap > 0 and self.update != "sequential":
            raise _bad(self, "forget_loss_cap", "use it with update='sequential' (mixed batches ignore it)")


@dataclass(frozen=True)
class Auto(QMul):
    """The hybrid planner (ARCHITECTURE.md §4.3): exact replay when cheaper, else Q-MUL.

    The approximate branch starts at this config's ``layers`` with its own fields and, while the validation
    split says the forget set is still remembered (``edge_qmul.methods.still_remembered``), widens the scope
    through the scopes of ``escalate`` wider than ``layers`` (comma-separated), each with its recommended
    recipe (``QMul.for_scope``). With ``escalate=""`` (or ``layers="all"``) it runs Q-MUL once.
    """

    name: ClassVar[str] = "auto"

    escalate: str = "classifier,last-1-blocks,all"

    def __post_init__(self) -> None:
        super().__post_init__()
        for scope in self._listed():
            if scope_blocks(scope) is None:
                raise _bad(self, "escalate", "list scopes cheapest first, e.g. 'classifier,last-1-blocks,all'")

    def _listed(self) -> list[str]:
        return [s.strip() for s in self.escalate.split(",") if s.strip()]

    def scopes(self) -> list[str]:
        """The scopes Q-MUL may run, in order: ``layers`` first, then every listed scope wider than it."""

        def width(scope: str) -> float:
            k = scope_blocks(scope)
            return math.inf if k is None or k < 0 else k

        return [self.layers, *sorted({s for s in self._listed() if width(s) > width(self.layers)}, key=width)]

    def qmul(self, scope: str = "") -> QMul:
        """The Q-MUL config the approximate branch runs for ``scope``: this config's own fields for its own
        ``layers`` (or no scope given), the scope's recommended recipe (``QMul.for_scope``) for the others."""
        if scope and scope != self.layers:
            return QMul.for_scope(scope, seed=self.seed, batch_size=self.batch_size)
        return QMul(**{f.name: getattr(self, f.name) for f in fields(QMul)})


@dataclass(frozen=True)
class Finetune(LoopConfig):
    """FT: a few epochs on the retain set only."""

    name: ClassVar[str] = "finetune"

    epochs: int = 2
    lr: float = 0.01


@dataclass(frozen=True)
class RandomLabel(LoopConfig):
    """RL: forget samples get uniformly random wrong labels, trained together with the retain set."""

    name: ClassVar[str] = "random_label"

    epochs: int = 2
    lr: float = 0.01


@dataclass(frozen=True)
class GradAscent(LoopConfig):
    """GA: ascend the loss on the forget set."""

    name: ClassVar[str] = "grad_ascent"

    epochs: int = 1
    lr: float = 0.001


@dataclass(frozen=True)
class Famr(LoopConfig):
    """FAMR: forget predictions to uniform plus (λ/2)‖θ − θ₀‖². It pulls every forget prediction to uniform;
    on random forgetting larger steps collapse the whole model (lr 5e-4 for one epoch: 27% accuracy on
    Fashion-MNIST), so it moves very little."""

    name: ClassVar[str] = "famr"

    epochs: int = 1
    lr: float = 5e-5
    famr_lambda: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _float_in(self, "famr_lambda", "use a non-negative anchor strength")


@dataclass(frozen=True)
class Salun(LoopConfig):
    """SalUn (Fan et al., ICLR 2024): random-label unlearning that moves only the salient weights, those with
    the largest |∂ CE(forget) / ∂θ| (the top ``mask_ratio`` fraction over every trainable tensor)."""

    name: ClassVar[str] = "salun"

    epochs: int = 2
    lr: float = 0.01
    mask_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _float_in(self, "mask_ratio", "use a fraction in (0, 1], e.g. 0.5", lo_open=True, hi=1.0, hi_open=False)


@dataclass(frozen=True)
class Scrub(LoopConfig):
    """SCRUB (Kurmanji et al., NeurIPS 2023): a student starting from the model moves away from the frozen
    original (the teacher) on the forget set — max steps, in the first ``max_epochs`` epochs — and stays
    close to it on the retain set: min steps of gamma x CE + alpha x KL(teacher ‖ student) at ``temperature``."""

    name: ClassVar[str] = "scrub"

    epochs: int = 3
    lr: float = 0.01
    max_epochs: int = 2
    alpha: float = 0.001
    gamma: float = 0.99
    temperature: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _int_in(self, "max_epochs", 0, MAX_EPOCHS, "use 0 or more max-step epochs")
        _float_in(self, "alpha", "use a non-negative weight, e.g. 0.001")
        _float_in(self, "gamma", "use a non-negative weight, e.g. 0.99")
        _float_in(self, "temperature", "use a positive temperature, e.g. 4", lo_open=True)


@dataclass(frozen=True)
class L1Sparse(LoopConfig):
    """ℓ1-sparse unlearning (Jia et al., NeurIPS 2023): fine-tune on the retain set with an ℓ1 penalty
    l1_alpha x (1 - t/T) x ‖θ‖₁ that decays linearly over the T epochs."""

    name: ClassVar[str] = "l1_sparse"

    epochs: int = 2
    lr: float = 0.01
    l1_alpha: float = 5e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        _float_in(self, "l1_alpha", "use a non-negative strength, e.g. 5e-4")


@dataclass(frozen=True)
class Retrain(MethodConfig):
    """The gold standard: the original training recipe ([train], recorded in the float checkpoint) from
    scratch on the retain set, then the deployed model's quantization. No options of its own."""

    name: ClassVar[str] = "retrain"


# ---------------------------------------------------------------------------------------------------
# Registries (the allow-list config_from_dict rebuilds from)
# ---------------------------------------------------------------------------------------------------

STAGES: dict[str, type[StageConfig]] = {"data": DataConfig, "train": TrainConfig, "quant": QuantConfig}
METHODS: dict[str, type[MethodConfig]] = {
    cls.name: cls for cls in (QMul, Auto, Finetune, RandomLabel, GradAscent, Famr, Salun, Scrub, L1Sparse, Retrain)
}
SECTIONS: tuple[str, ...] = (*STAGES, "unlearn")


def register_method_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Allow a new method's config class (``edge_qmul.methods.register`` calls this)."""
    if not cls.name:
        raise ConfigError(f"{cls.__name__} has no method name", "set name: ClassVar[str] on the class")
    if METHODS.get(cls.name, cls) is not cls:
        raise ConfigError(f"method name {cls.name!r} is taken by {METHODS[cls.name].__name__}", "pick another name")
    METHODS[cls.name] = cls
    return cls


def method_class(name: object) -> type[MethodConfig]:
    """The config class registered as ``name``; a miss lists the registered names."""
    if not isinstance(name, str) or name not in METHODS:
        raise UnlearningError(f"unknown unlearning method {name!r}", f"choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


C = TypeVar("C", bound=Config)


def build(cls: type[C], values: Mapping[str, Any], where: str) -> C:
    """Instantiate any config, rejecting unknown keys with the list of valid ones; errors name ``where``."""
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        fix = f"valid options are: {', '.join(valid)}" if valid else f"{_label(cls)} takes no options"
        if cls is Retrain:
            fix += " (it reuses the training recipe: set those in [train] before training)"
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)} for {_label(cls)}", fix)
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err.message}", err.fix) from err


def _label(cls: type[Config]) -> str:
    return f"method {cls.name!r}" if issubclass(cls, MethodConfig) else f"[{cls.section}]"


def method_config(name: str, overrides: Mapping[str, Any] | None = None, where: str = "[unlearn]") -> MethodConfig:
    """Method ``name``'s recommended settings (its class defaults), then ``overrides``."""
    return build(method_class(name), overrides or {}, where)


def config_from_dict(d: Mapping[str, Any], where: str = "config") -> Config:
    """Rebuild a config written by ``to_dict``; only registered classes (STAGES, METHODS) are accepted."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: a config must be a table, not {type(d).__name__}", "pass the dict to_dict() made")
    values = dict(d)
    version = values.pop("version", None)
    if version != CONFIG_VERSION:
        raise ConfigError(f"{where}: config version {version!r}, expected {CONFIG_VERSION}",
                          "write it with this edge-qmul version (to_dict())")
    if ("method" in values) == ("config" in values):
        raise ConfigError(f"{where}: a config names exactly one of 'method' or 'config'",
                          f"methods: {', '.join(sorted(METHODS))}; stages: {', '.join(STAGES)}")
    if "method" in values:
        return build(method_class(values.pop("method")), values, where)
    stage = values.pop("config")
    if not isinstance(stage, str) or stage not in STAGES:
        raise ConfigError(f"{where}: unknown config {stage!r}", f"choose one of: {', '.join(STAGES)}")
    return build(STAGES[stage], values, where)


# ---------------------------------------------------------------------------------------------------
# TOML
# ---------------------------------------------------------------------------------------------------


def _check_unlearn_table(table: Mapping[str, Any], where: str) -> None:
    """With a ``method`` key: build that class. Without one, the method comes later (``--method``): the keys
    must all belong to one method class, and build with at least one of those."""
    values = dict(table)
    if "method" in values:
        method_config(values.pop("method"), values, where)
        return
    candidates = [cls for cls in METHODS.values() if set(values) <= {f.name for f in fields(cls)}]
    if not candidates:
        known = sorted({f.name for cls in METHODS.values() for f in fields(cls)} | {"method"})
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}",
                              f"valid options are: {', '.join(known)}")
        raise ConfigError(f"{where}: options {', '.join(sorted(values))} belong to different methods",
                          'name the method: method = "qmul" (or another) and use its options only')
    errors: list[ConfigError] = []
    for cls in candidates:
        try:
            build(cls, values, where)
            return
        except ConfigError as err:
            errors.append(err)
    raise errors[0]


def parse_toml(text: str, what: str, layout: str) -> dict[str, Any]:
    """TOML text as a dict; every way it can fail is one ConfigError naming ``what`` (the file) and the
    ``layout`` it should have. The one TOML reader of config files, budgets and device profiles."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} is not valid TOML: {err}", f"fix the syntax ({layout})") from err
    except RecursionError as err:  # tomllib recurses once per level of nesting
        raise ConfigError(f"{what} nests arrays or tables too deeply to read", f"write flat {layout}") from err
    except ValueError as err:  # an integer of more digits than Python converts
        raise ConfigError(f"{what} holds a number too long to read", "write ordinary numbers") from err


def load_toml(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Read a config file into {section: {key: value}}; validates section and key names and values."""
    if path is None:
        return {}
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}", "check the --config path") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path} ({err.__class__.__name__})",
                          "pass a TOML file to --config") from err
    raw = parse_toml(text, f"config file {path}", "key = value lines under [data] [train] [quant] [unlearn]")
    out: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        if section not in SECTIONS or not isinstance(table, dict):
            raise ConfigError(
                f"{path}: unknown table [{section}]", f"valid tables are: {', '.join(f'[{s}]' for s in SECTIONS)}"
            )
        where = f"{path} [{section}]"
        if section == "unlearn":
            _check_unlearn_table(table, where)
        else:
            build(STAGES[section], table, where)  # validate keys and values now
        out[section] = table
    return out


Toml = Mapping[str, Mapping[str, Any]]


@overload
def resolve(section: Literal["data"], toml: Toml, overrides: Mapping[str, Any]) -> DataConfig: ...
@overload
def resolve(section: Literal["train"], toml: Toml, overrides: Mapping[str, Any]) -> TrainConfig: ...
@overload
def resolve(section: Literal["quant"], toml: Toml, overrides: Mapping[str, Any]) -> QuantConfig: ...
@overload
def resolve(section: Literal["unlearn"], toml: Toml, overrides: Mapping[str, Any]) -> MethodConfig: ...
def resolve(section: str, toml: Toml, overrides: Mapping[str, Any]) -> Config:
    """TOML values, then flags that were given (``None`` means 'not given'). For ``unlearn`` the ``method``
    key (the table's, or ``overrides["method"]`` from ``--method``, which wins) picks the config class."""
    values = {**toml.get(section, {}), **{k: v for k, v in overrides.items() if v is not None}}
    if section == "unlearn":
        if "method" not in values:
            raise ConfigError("[unlearn]: no method named",
                              f'pass --method or add method = "..." ({", ".join(sorted(METHODS))})')
        return method_config(values.pop("method"), values)
    if section not in STAGES:
        raise ConfigError(f"unknown table [{section}]", f"valid tables are: {', '.join(f'[{s}]' for s in SECTIONS)}")
    return build(STAGES[section], values, f"[{section}]")


def config_hash(*configs: Any) -> str:
    blob = json.dumps([asdict(c) for c in configs], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
