"""Unlearning methods: one training loop; each method registers against its config class.

Every method works on the QAT (fake-quant) copy, so the optimiser sees the rounding that the int8
model will have, and returns a re-converted int8 model plus a log. ``retrain`` is the exception that
proves the rule: it trains a float model from scratch on the retain set with the original recipe and
quantizes it exactly like the deployed model; it is the reference every gap is measured against.

Q-MUL (ARCHITECTURE.md §4.1) = random-label unlearning with two changes, both computed at the start of each
epoch in eval mode: *similar labels* (the wrong class closest in probability to the true one) and
*adaptive gradient reweighting* (w_f = ḡ_r / (ḡ_f + ḡ_r), w_r = ḡ_f / (ḡ_f + ḡ_r), where ḡ is the mean
over batches of the sum of per-tensor gradient L2 norms).

The configs live in ``edge_qmul.config`` (``QMul``, ``Finetune``, ..., ``Retrain``): one class per method
with its recommended defaults. ``unlearn(ctx, cfg)`` runs the method registered for ``type(cfg)``.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from edge_qmul import planner, quant
from edge_qmul.config import (
    Auto,
    Famr,
    Finetune,
    GradAscent,
    L1Sparse,
    LoopConfig,
    MethodConfig,
    QMul,
    RandomLabel,
    Retrain,
    Salun,
    Scrub,
    register_method_config,
)
from edge_qmul.errors import UnlearningError
from edge_qmul.models import ModelConfig, build_model
from edge_qmul.progress import Progress
from edge_qmul.train import TrainConfig, batch_indices, cosine_lr, sgd, train_float

M = TypeVar("M", bound="Method")


@dataclass
class UnlearnContext:
    """Everything a method may use. Tensors are float32 images in [0, 1] and int64 labels.

    With a feature cache, a head-only method (``layers="classifier"``, the shared ``LoopMethod.run``) reads
    the retain / val features instead of pixels, and ``pipeline.run_unlearn`` passes empty placeholders
    for retain_x / val_x.
    """

    qat: nn.Module  # trained in place
    forget_x: torch.Tensor
    forget_y: torch.Tensor
    retain_x: torch.Tensor
    retain_y: torch.Tensor
    num_classes: int
    model_cfg: ModelConfig | None  # the original model and recipe (retrain, replay); None for in-memory models
    train_cfg: TrainConfig | None
    backend: str
    calib_size: int  # calibration samples for PTQ; retrain takes them from the retain set
    val_x: torch.Tensor | None = None  # held-out split of the training file (forget_target="val")
    val_y: torch.Tensor | None = None
    quiet: bool = True
    # Classifier mode only: the deployed int8 model's features of forget / retain / val samples,
    # precomputed once per deployed model (see pipeline.quantize). Computed on the fly when absent.
    features: FeatureCache | None = None
    history: TrainingHistory | None = None  # auto and generational retrain
    head: str = ""  # the trainable head's module name in the QAT graph ("" = its last Linear)

    def recipe(self) -> tuple[ModelConfig, TrainConfig]:
        """The model config and training recipe that retrain and exact replay need."""
        if self.model_cfg is None or self.train_cfg is None:
            raise UnlearningError("retrain and exact replay need the model's training recipe",
                                  "unlearn through a run directory (eq.Run / `edge-qmul unlearn`)")
        return self.model_cfg, self.train_cfg


@dataclass
class TrainingHistory:
    """How the deployed float model was trained, for exact replay (``auto``) and generational retrain."""

    generations: list[list[int]]  # sample ids per generation (one generation: the whole train list)
    phase_logs: list[dict[str, Any]]  # per phase: samples, epochs, seconds (measured throughput)
    checkpoint_dir: Path | None  # weights after each phase (None for a single-phase run)
    pool_x: torch.Tensor  # the training pool by sample id
    pool_y: torch.Tensor
    forget_ids: list[int]
    quantize_seconds: float  # measured PTQ + QAT calibration time of this run


@dataclass
class FeatureCache:
    forget: torch.Tensor
    retain: torch.Tensor
    val: torch.Tensor | None = None


@dataclass
class UnlearnResult:
    method: str
    qat: nn.Module
    int8: nn.Module
    log: dict[str, Any]
    float_model: nn.Module | None = None  # retrain only


@dataclass
class Step:
    x: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor | float  # per-sample weights (mixed) or one weight for the batch
    kind: str  # "forget" | "retain" | "mixed"


class Method(ABC):
    """Base class: ``run`` a method with its config. ``register(ConfigClass)`` sets ``name`` and ``config_class``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def run(self, ctx: UnlearnContext) -> UnlearnResult:
        """Unlearn ``ctx``'s forget set from ``ctx.qat`` (in place) and return the re-converted result."""


class LoopMethod(Method):
    """A method on the shared training loop: implements ``steps`` (and optionally ``begin_epoch`` / ``loss``)."""

    cfg: LoopConfig

    def __init__(self, cfg: LoopConfig) -> None:
        super().__init__(cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def with_val(self) -> bool:
        """Whether the epochs read the validation split (classifier mode then needs its features too)."""
        return False

    # -- hooks -----------------------------------------------------------------------------------
    def begin_epoch(self, ctx: UnlearnContext, epoch: int) -> dict[str, float]:
        return {}

    @abstractmethod
    def steps(self, ctx: UnlearnContext, epoch: int) -> Iterator[Step]:
        """This epoch's batches, each with its labels and loss weights."""

    def loss(self, ctx: UnlearnContext, logits: torch.Tensor, step: Step) -> torch.Tensor:
        ce = F.cross_entropy(logits, step.y, reduction="none")
        return (ce * step.weight).mean()

    def after_step(self, ctx: UnlearnContext) -> None:
        """Called after each optimizer step (SalUn puts back the weights outside its mask)."""

    # -- shared helpers --------------------------------------------------------------------------
    def retain_sample(self, ctx: UnlearnContext) -> torch.Tensor:
        """This epoch's retain indices: all of them, or a random ``retain_sample_size`` of them."""
        n = len(ctx.retain_x)
        k = retain_sample_size(self.cfg, len(ctx.forget_x), n)
        perm = torch.randperm(n, generator=self.gen)
        return perm if k == 0 or k >= n else perm[:k]

    def batches(self, n: int) -> Iterator[torch.Tensor]:
        return batch_indices(n, self.cfg.batch_size, self.gen)

    # -- the one training loop -------------------------------------------------------------------
    def run(self, ctx: UnlearnContext) -> UnlearnResult:
        cfg, full_qat = self.cfg, ctx.qat
        start = time.perf_counter()
        if cfg.layers == "classifier":
            # train the head on cached features; the convs stay as deployed
            ctx = classifier_context(ctx, with_val=self.with_val())
            params = list(ctx.qat.parameters())
        else:
            params = quant.scope_parameters(ctx.qat, cfg.layers, ctx.head)
        with only_trainable(ctx.qat, params):
            return self._run(ctx, full_qat, params, start)

    def _run(self, ctx: UnlearnContext, full_qat: nn.Module, params: list[nn.Parameter], start: float) -> UnlearnResult:
        cfg = self.cfg
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        log: dict[str, Any] = {"method": self.name, "config": cfg.to_dict(), "epochs": [],
                               "trainable": sum(p.numel() for p in params)}
        with Progress(ctx.quiet) as progress:
            task = progress.add(f"unlearn {self.name}", cfg.epochs)
            for epoch in range(cfg.epochs):
                t0 = time.perf_counter()
                lr = cosine_lr(cfg.lr, epoch, cfg.epochs) if cfg.schedule == "cosine" else cfg.lr
                for group in opt.param_groups:
                    group["lr"] = lr
                info = self.begin_epoch(ctx, epoch)
                losses = self.train_steps(ctx, opt, self.steps(ctx, epoch))
                log["epochs"].append(
                    {"epoch": epoch, "lr": lr, **info, **losses, "seconds": time.perf_counter() - t0}
                )
                progress.advance(task)
        if cfg.repair_batches:
            log["repair"] = self._repair(ctx, opt)
        int8 = quant.convert(full_qat)
        log["seconds"] = time.perf_counter() - start
        return UnlearnResult(self.name, full_qat, int8, log)

    def train_steps(
        self, ctx: UnlearnContext, opt: torch.optim.Optimizer, steps: Iterator[Step]
    ) -> dict[str, float]:
        quant.set_trainable(
            ctx.qat, observe_activations=self.cfg.observe_activations, update_bn=self.cfg.update_bn
        )
        freeze_frozen_bn(ctx.qat)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for step in steps:
            if len(step.x) == 0:  # e.g. a device leaving the fleet has no retain samples
                continue
            loss = self.loss(ctx, ctx.qat(step.x), step)
            if not torch.isfinite(loss):
                raise UnlearningError(
                    f"{self.name}: loss became {loss.item()} ({step.kind} step)",
                    "lower unlearn.lr or the number of epochs",
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.after_step(ctx)
            sums[step.kind] = sums.get(step.kind, 0.0) + loss.item() * len(step.x)
            counts[step.kind] = counts.get(step.kind, 0) + len(step.x)
        return {f"loss_{k}": sums[k] / counts[k] for k in sums}

    def _repair(self, ctx: UnlearnContext, opt: torch.optim.Optimizer) -> dict[str, float]:
        """A short retain-only pass that restores utility after forgetting (cosine to zero)."""
        t0 = time.perf_counter()
        n, nb = self.cfg.repair_batches, 0
        idx = torch.randperm(len(ctx.retain_x), generator=self.gen)[: n * self.cfg.batch_size]

        def steps() -> Iterator[Step]:
            nonlocal nb
            for b in idx.split(self.cfg.batch_size):
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(self.cfg.repair_lr, nb, n)
                nb += 1
                yield Step(ctx.retain_x[b], ctx.retain_y[b], 1.0, "retain")

        losses = self.train_steps(ctx, opt, steps())
        return {"batches": n, "lr": self.cfg.repair_lr, **losses, "seconds": time.perf_counter() - t0}


@contextmanager
def only_trainable(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Within the block, only ``params`` of ``model`` require gradients (then every flag is restored)."""
    keep = {id(p) for p in params}
    before = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in before:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def freeze_frozen_bn(model: nn.Module) -> None:
    """A fused conv + BatchNorm whose parameters are all frozen keeps its running statistics too: a scope that
    trains the last blocks must not shift the features of the blocks before them."""
    for mod in model.modules():
        freeze = getattr(mod, "freeze_bn_stats", None)
        if callable(freeze):
            ps = list(mod.parameters())
            if ps and not any(p.requires_grad for p in ps):
                freeze()


def classifier_context(ctx: UnlearnContext, with_val: bool) -> UnlearnContext:
    """The same context with ``qat`` = the classifier head and inputs = the frozen features.

    With the conv layers, their BatchNorm statistics and activation ranges frozen, the features of
    every sample are fixed: they are computed once, by the int8 model itself (the values the deployed
    classifier reads), and each unlearning step costs only the classifier, so whole retain passes
    become affordable.
    """
    _, head = quant.split_at_classifier(ctx.qat, ctx.head)
    val_y = ctx.val_y if with_val and ctx.val_x is not None else None
    if ctx.features is not None:
        cache = ctx.features
        if with_val and cache.val is None:
            raise UnlearningError("the feature cache has no validation features", "re-run `edge-qmul quantize`")
        return replace(ctx, qat=head, forget_x=cache.forget, retain_x=cache.retain,
                       val_x=cache.val if val_y is not None else None, val_y=val_y)
    features = quant.int8_features(ctx.qat, head=ctx.head)
    val_x = predict_logits(features, ctx.val_x) if val_y is not None and ctx.val_x is not None else None
    return replace(
        ctx, qat=head, forget_x=predict_logits(features, ctx.forget_x),
        retain_x=predict_logits(features, ctx.retain_x), val_x=val_x, val_y=val_y,
    )


REGISTRY: dict[str, type[Method]] = {}  # method name -> method class (for listing)
HANDLERS: dict[type[MethodConfig], type[Method]] = {}  # config class -> method class (for dispatch)


def register(config_class: type[MethodConfig]) -> Callable[[type[M]], type[M]]:
    """Class decorator: the method runs configs of exactly ``config_class`` and takes its name."""

    def decorate(cls: type[M]) -> type[M]:
        register_method_config(config_class)  # the allow-list config_from_dict rebuilds from
        cls.name, cls.config_class = config_class.name, config_class
        REGISTRY[config_class.name] = cls
        HANDLERS[config_class] = cls
        return cls

    return decorate


def get_method(cfg: MethodConfig) -> Method:
    """The method registered for ``type(cfg)`` (exactly: a subclass of a config is another method)."""
    cls = HANDLERS.get(type(cfg))
    if cls is None:
        registered = ", ".join(f"{c.__name__} ({c.name})" for c in HANDLERS)
        raise UnlearningError(f"no unlearning method is registered for {type(cfg).__name__}",
                              f"pass one of: {registered}")
    return cls(cfg)


def unlearn(ctx: UnlearnContext, cfg: MethodConfig) -> UnlearnResult:
    """Run the method of ``type(cfg)`` on ``ctx`` (the QAT copy in ``ctx.qat`` is changed in place)."""
    if len(ctx.forget_x) == 0:
        raise UnlearningError("the forget set is empty", "file a request first: `edge-qmul forget --run DIR ...`")
    # Labels, not pixels: a head-only method on cached features gets empty placeholder pixels for the retain set.
    if len(ctx.retain_y) == 0:
        raise UnlearningError(
            f"{cfg.name}: the retain set is empty (the forget set covers all {len(ctx.forget_y)} training samples), "
            "so no model can be trained or kept useful",
            "nothing is left to learn from: requests must leave at least one training sample (start a new run "
            "on the data that remains)",
        )
    return get_method(cfg).run(ctx)


# ---------------------------------------------------------------------------------------------------
# Q-MUL
# ---------------------------------------------------------------------------------------------------


def similar_labels(
    logits: torch.Tensor, y: torch.Tensor, variant: str = "faithful", generator: torch.Generator | None = None
) -> torch.Tensor:
    """ỹ = argmin_{c != y} |p_c - p_y|: the wrong class the model confuses most with the true one.

    ``paper_code`` reproduces the released code: distances on logits, argmin over the vector with the
    true class removed, but the index is used as a class id without shifting back, so it can return
    the true label (when the nearest class sits just above it).
    """
    rows = torch.arange(len(y))
    if variant == "random":  # ablation: a uniformly random wrong class instead of the most similar one
        shift = torch.randint(1, logits.shape[1], (len(y),), generator=generator)
        return (y + shift) % logits.shape[1]
    if variant == "faithful":
        p = logits.softmax(1)  # (N, C)
        dist = (p - p[rows, y].unsqueeze(1)).abs()
        dist[rows, y] = math.inf
        return dist.argmin(1)
    dist = (logits - logits[rows, y].unsqueeze(1)).abs()  # (N, C)
    keep = torch.ones_like(dist, dtype=torch.bool)
    keep[rows, y] = False
    shortened = dist[keep].view(len(y), -1)  # (N, C - 1): true class removed, others shift left
    return shortened.argmin(1)


def capped_ce(logits: torch.Tensor, y: torch.Tensor, cap: float = 0.0) -> torch.Tensor:
    """Per-sample cross-entropy; with cap > 0, losses above it are clamped (and give no gradient)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    return ce.clamp(max=cap) if cap > 0 else ce


def grad_norm_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cap: float = 0.0, pooling: str = "sum") -> float:
    """g(B) = Σ over trainable parameter tensors of ‖∇ CE_mean(B)‖₂ (``pooling="sum"``, the paper's), or the
    L2 norm of all of them as one vector (``"l2"``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(capped_ce(model(x), y, cap).mean(), params)
    if pooling == "l2":
        return float(torch.cat([g.flatten() for g in grads]).norm())
    return float(sum(g.norm() for g in grads))


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([model(b) for b in x.split(batch_size)]) if len(x) else torch.empty(0)


@register(QMul)
class QMulMethod(LoopMethod):
    cfg: QMul

    def __init__(self, cfg: QMul) -> None:
        super().__init__(cfg)
        self.forget_labels = torch.empty(0, dtype=torch.long)
        self.retain_idx = torch.empty(0, dtype=torch.long)
        self.w_f = self.w_r = 1.0
        self.skip_forget = False

    def with_val(self) -> bool:
        return self.cfg.forget_target == "val"

    def begin_epoch(self, ctx: UnlearnContext, epoch: int) -> dict[str, float]:
        model = ctx.qat.eval()  # no BatchNorm statistics update while labels and norms are measured
        logits = predict_logits(model, ctx.forget_x)
        self.forget_labels = similar_labels(logits, ctx.forget_y, self.cfg.label_variant, self.gen)
        self.retain_idx = self.retain_sample(ctx)
        info = {
            "forget_acc": 100.0 * float((logits.argmax(1) == ctx.forget_y).float().mean()),
            "similar_is_true": float((self.forget_labels == ctx.forget_y).sum()),
        }
        if self.cfg.forget_target == "val":
            if ctx.val_x is None or ctx.val_y is None or len(ctx.val_y) == 0:
                raise UnlearningError("forget_target='val' needs a validation split", "use forget_target='none'")
            val_logits = predict_logits(model, ctx.val_x)
            info["val_acc"] = 100.0 * float((val_logits.argmax(1) == ctx.val_y).float().mean())
            self.skip_forget = info["forget_acc"] <= info["val_acc"]
            info["forget_pass"] = float(not self.skip_forget)
            if self.skip_forget:  # the forget set already looks unseen: this epoch only repairs
                self.w_f, self.w_r = 0.0, 1.0
                return {**info, "w_f": 0.0, "w_r": 1.0}
        if not self.cfg.reweight:
            self.w_f = self.w_r = 1.0
            return {**info, "w_f": 1.0, "w_r": 1.0}
        bs, k = self.cfg.batch_size, self.cfg.norm_batches or None
        f_batches = torch.randperm(len(ctx.forget_x), generator=self.gen).split(bs)[:k]
        cap = self.cfg.forget_loss_cap
        pool = self.cfg.norm_pooling
        g_f = [grad_norm_sum(model, ctx.forget_x[b], self.forget_labels[b], cap, pool) for b in f_batches]
        g_r = [grad_norm_sum(model, ctx.retain_x[b], ctx.retain_y[b], 0.0, pool) for b in self.retain_idx.split(bs)[:k]]
        gf, gr = sum(g_f) / len(g_f), sum(g_r) / len(g_r)
        if not gf + gr > 0:
            raise UnlearningError(
                f"{self.name}: every gradient vanished at epoch {epoch} (g_f = g_r = 0: the model collapsed)",
                "lower unlearn.lr (the recommended lr is for layers='classifier'; all layers need ~0.01)",
            )
        self.w_f, self.w_r = gr / (gf + gr), gf / (gf + gr)
        return {**info, "g_f": gf, "g_r": gr, "w_f": self.w_f, "w_r": self.w_r}

    def loss(self, ctx: UnlearnContext, logits: torch.Tensor, step: Step) -> torch.Tensor:
        cap = self.cfg.forget_loss_cap if step.kind == "forget" else 0.0
        return (capped_ce(logits, step.y, cap) * step.weight).mean()

    def steps(self, ctx: UnlearnContext, epoch: int) -> Iterator[Step]:
        if self.cfg.update == "sequential":
            for b in self.batches(0 if self.skip_forget else len(ctx.forget_x)):
                yield Step(ctx.forget_x[b], self.forget_labels[b], self.w_f, "forget")
            for b in self.retain_idx[torch.randperm(len(self.retain_idx), generator=self.gen)].split(
                self.cfg.batch_size
            ):
                yield Step(ctx.retain_x[b], ctx.retain_y[b], self.w_r, "retain")
            return
        # mixed: forget (similar labels) and retain samples shuffled together, per-sample weights.
        # Batches index the virtual concatenation [forget, retain sample]; only the batch is gathered.
        nf = 0 if self.skip_forget else len(ctx.forget_x)
        for b in self.batches(nf + len(self.retain_idx)):
            fb, rb = b[b < nf], self.retain_idx[b[b >= nf] - nf]
            yield Step(
                torch.cat([ctx.forget_x[fb], ctx.retain_x[rb]]),
                torch.cat([self.forget_labels[fb], ctx.retain_y[rb]]),
                torch.cat([torch.full((len(fb),), self.w_f), torch.full((len(rb),), self.w_r)]),
                "mixed",
            )


# ---------------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------------


@register(Finetune)
class FinetuneMethod(LoopMethod):
    """FT: continue training on the retain set only."""

    def steps(self, ctx: UnlearnContext, epoch: int) -> Iterator[Step]:
        idx = self.retain_sample(ctx)
        for b in idx.split(self.cfg.batch_size):
            yield Step(ctx.retain_x[b], ctx.retain_y[b], 1.0, "retain")


@register(RandomLabel)
class RandomLabelMethod(LoopMethod):
    """RL: forget samples get a uniformly random wrong label each epoch, mixed with the retain set."""

    def steps(self, ctx: UnlearnContext, epoch: int) -> Iterator[Step]:
        n_f = len(ctx.forget_y)
        shift = torch.randint(1, ctx.num_classes, (n_f,), generator=self.gen)
        noisy = (ctx.forget_y + shift) % ctx.num_classes  # uniform over the C - 1 wrong classes
        r = self.retain_sample(ctx)
        x = torch.cat([ctx.forget_x, ctx.retain_x[r]])
        y = torch.cat([noisy, ctx.retain_y[r]])
        for b in self.batches(len(x)):
            yield Step(x[b], y[b], 1.0, "mixed")


@register(GradAscent)
class GradAscentMethod(LoopMethod):
    """GA: ascend the cross-entropy on the forget set."""

    def steps(self, ctx: UnlearnContext, epoch: int) -> Iterator[Step]:
        for b in self.batches(len(ctx.forget_x)):
            yield Step(ctx.forget_x[b], ctx.forget_y[b], -1.0, "forget")


@register(Famr)
class FamrMethod(LoopMethod):
    """FAMR: push forget predictions to uniform, anchored to the parameters before unlearning.

    loss = CE(uniform, p_θ(x)) on forget batches + (λ/2)‖θ − θ₀‖².
    """

    cfg: Famr

    def __init__(self, cfg: Famr) -> None:
        super().__init__(cfg)
        self.anchor: list[torch.Tensor] = []

    def begin_epoch(self, ctx: UnlearnContext, epoch: int) -> dict[str, float]:
        if epoch == 0:
            self.anchor = [p.detach().clone() for p in ctx.qat.parameters()]
        return {}

    def steps(self, ctx: UnlearnContext, epoch: int) -> Iterator[Step]:
        for b in self.batches(len(ctx.forget_x)):
            yield Step(ctx.forget_x[b], ctx.forget_y[b], 1.0, "forget")

    def loss(self, ctx: UnlearnContext, logits: torch.Tensor, step: Step) -> torch.Tensor:
        to_uniform = -logits.log_softmax(1).mean(1).mean()  # CE(uniform, p), averaged over the batch
        drift = sum(((p - a) ** 2).sum() for p, a in zip(ctx.qat.parameters(), self.anchor, strict=True))
        return to_uniform + 0.5 * self.cfg.famr_lambda * drift


@register(Salun)
class SalunMethod(RandomLabelMethod):
    """SalUn: random labels (as RL) on the salient weights only.

    At the start, the gradient of the forget set's cross-entropy (true labels) is accumulated over every
    forget batch; the top ``mask_ratio`` fraction of trainable weights by |gradient| (one threshold over all
    tensors) form the mask. After every step the weights outside it are put back, so only salient weights
    move (momentum and weight decay included).
    """

    cfg: Salun

    def __init__(self, cfg: Salun) -> None:
        super().__init__(cfg)
        self.masks: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (param, mask, original)

    def begin_epoch(self, ctx: UnlearnContext, epoch: int) -> dict[str, float]:
        if epoch:
            return {}
        params = [p for p in ctx.qat.parameters() if p.requires_grad]
        sal = [torch.zeros_like(p) for p in params]
        model = ctx.qat.eval()
        for b in torch.arange(len(ctx.forget_x)).split(self.cfg.batch_size):
            loss = F.cross_entropy(model(ctx.forget_x[b]), ctx.forget_y[b], reduction="sum")
            for acc, g in zip(sal, torch.autograd.grad(loss, params), strict=True):
                acc += g.detach()
        flat = torch.cat([s.abs().flatten() for s in sal])
        keep = max(1, round(self.cfg.mask_ratio * len(flat)))
        threshold = flat.kthvalue(len(flat) - keep + 1).values  # the keep-th largest |gradient|
        self.masks = [(p, s.abs() >= threshold, p.detach().clone()) for p, s in zip(params, sal, strict=True)]
        kept = sum(int(m.sum()) for _, m, _ in self.masks)
        return {"salient_fraction": kept / len(flat)}

    @torch.no_grad()
    def after_step(self, ctx: UnlearnContext) -> None:
        for p, mask, original in self.masks:
            p.copy_(torch.where(mask, p, original))


@register(Scrub)
class ScrubMethod(LoopMethod):
    """SCRUB: a student (the model being unlearned) and the frozen original as teacher.

    In each of the first ``max_epochs`` epochs a max pass over the forget set raises KL(teacher ‖ student);
    every epoch then runs a min pass over the retain set on gamma x CE + alpha x KL(teacher ‖ student), with
    both distributions softened at ``temperature``.
    """

    cfg: Scrub

    def __init__(self, cfg: Scrub) -> None:
        super().__init__(cfg)
        self.teacher: nn.Module | None = None

    def begin_epoch(self, ctx: UnlearnContext, epoch: int) -> dict[str, float]:
        if epoch == 0:
            self.teacher = copy.deepcopy(ctx.qat).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        return {}

    def steps(self, ctx: UnlearnContext, epoch: int) -> Iterator[Step]:
        if epoch < self.cfg.max_epochs:
            for b in self.batches(len(ctx.forget_x)):
                yield Step(ctx.forget_x[b], ctx.forget_y[b], -1.0, "forget")
        for b in self.retain_sample(ctx).split(self.cfg.batch_size):
            yield Step(ctx.retain_x[b], ctx.retain_y[b], 1.0, "retain")

    def kl_to_teacher(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None
        t = self.cfg.temperature
        with torch.no_grad():
            teacher = (self.teacher(x) / t).log_softmax(1)
        return F.kl_div((logits / t).log_softmax(1), teacher, log_target=True, reduction="batchmean") * t * t

    def loss(self, ctx: UnlearnContext, logits: torch.Tensor, step: Step) -> torch.Tensor:
        kl = self.kl_to_teacher(step.x, logits)
        if step.kind == "forget":
            return -kl
        return self.cfg.gamma * F.cross_entropy(logits, step.y) + self.cfg.alpha * kl


@register(L1Sparse)
class L1SparseMethod(FinetuneMethod):
    """ℓ1-sparse: fine-tuning on the retain set plus l1_alpha x (1 - t/T) x ‖θ‖₁ (t = epoch, T = epochs)."""

    cfg: L1Sparse

    def __init__(self, cfg: L1Sparse) -> None:
        super().__init__(cfg)
        self.strength = 0.0

    def begin_epoch(self, ctx: UnlearnContext, epoch: int) -> dict[str, float]:
        self.strength = self.cfg.l1_alpha * (1.0 - epoch / max(1, self.cfg.epochs))
        return {"l1": self.strength}

    def loss(self, ctx: UnlearnContext, logits: torch.Tensor, step: Step) -> torch.Tensor:
        l1 = sum(p.abs().sum() for p in ctx.qat.parameters() if p.requires_grad)
        return F.cross_entropy(logits, step.y) + self.strength * l1


def quantize_float(ctx: UnlearnContext, float_model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(QAT copy, int8 model) of a retrained float model, quantized the way the deployed one was."""
    int8, qat = quant.int8_and_qat(float_model, list(ctx.retain_x[: ctx.calib_size].split(256)), ctx.backend)
    return qat, int8


def retrain_float(ctx: UnlearnContext, label: str = "retrain") -> tuple[nn.Module, list[dict[str, Any]]]:
    """The original recipe from scratch without the forget set (generation by generation if it had them)."""
    h = ctx.history
    model_cfg, train_cfg = ctx.recipe()
    if h is not None and len(h.generations) > 1:
        model, logs = planner.train_phases(model_cfg, train_cfg, h.pool_x, h.pool_y, h.generations,
                                           exclude=frozenset(h.forget_ids), quiet=ctx.quiet)
        return model, [asdict(p) for p in logs]
    model, log = train_float(model_cfg, train_cfg, ctx.retain_x, ctx.retain_y, quiet=ctx.quiet, label=label)
    return model, log["epochs"]


@register(Retrain)
class RetrainMethod(Method):
    """The gold standard: float training from scratch on the retain set, then the same quantization."""

    def run(self, ctx: UnlearnContext) -> UnlearnResult:
        start = time.perf_counter()
        float_model, epochs = retrain_float(ctx)
        qat, int8 = quantize_float(ctx, float_model)
        log = {
            "method": self.name,
            "config": {"train": asdict(ctx.recipe()[1])},  # the recipe it reused
            "epochs": epochs,
            "seconds": time.perf_counter() - start,
        }
        return UnlearnResult(self.name, qat, int8, log, float_model=float_model)


@register(Auto)
class AutoMethod(Method):
    """The hybrid planner (ARCHITECTURE.md §4.3): exact replay from a generation checkpoint when that is estimated
    to be cheaper than Q-MUL, Q-MUL (with this config's fields) otherwise. See ``edge_qmul.planner``."""

    cfg: Auto

    def run(self, ctx: UnlearnContext) -> UnlearnResult:
        start = time.perf_counter()
        h = ctx.history
        model_cfg, train_cfg = ctx.recipe()
        scopes = self.cfg.scopes()
        approx_cfg = self.cfg.qmul()  # the first scope: its own fields
        approx = estimate_qmul_seconds(ctx, approx_cfg)
        step = probe_train_step(ctx)
        if h is None:  # no training record (a context built by hand): one generation, quantization not timed
            n_f = len(ctx.forget_y)
            everything = list(range(n_f + len(ctx.retain_y)))
            p = planner.plan([everything], set(everything[:n_f]), train_cfg, step, 0.0, approx)
        else:
            p = planner.plan(h.generations, set(h.forget_ids), train_cfg, step, h.quantize_seconds, approx)
        if p.choice == "approximate":
            result = escalate(ctx, self.cfg) if len(scopes) > 1 else QMulMethod(approx_cfg).run(ctx)
            extra: dict[str, Any] = {"epochs": result.log["epochs"], "qmul": result.log}
            float_model = None
            qat, int8 = result.qat, result.int8
        elif h is None or len(h.generations) == 1 or p.first_affected == 0:
            float_model, epochs = retrain_float(ctx, label="exact replay")
            qat, int8 = quantize_float(ctx, float_model)
            extra = {"epochs": epochs, "replay": "from scratch"}
        else:
            if h.checkpoint_dir is None:
                raise UnlearningError("the run has generations but no checkpoints", "re-train it")
            state = planner.load_phase(h.checkpoint_dir, p.first_affected - 1)
            float_model, logs = planner.train_phases(
                model_cfg, train_cfg, h.pool_x, h.pool_y, h.generations, exclude=frozenset(h.forget_ids),
                start_phase=p.first_affected, start_state=state, quiet=ctx.quiet,
            )
            qat, int8 = quantize_float(ctx, float_model)
            extra = {"epochs": [asdict(x) for x in logs], "replay": f"from phase {p.first_affected}"}
        seconds = time.perf_counter() - start
        log = {"method": self.name, "config": self.cfg.to_dict(), "plan": p.to_dict(), "seconds": seconds, **extra}
        return UnlearnResult(self.name, qat, int8, log, float_model=float_model)


def still_remembered(model: nn.Module, ctx: UnlearnContext, z: float = 1.645) -> dict[str, Any]:
    """Does ``model`` (a QAT copy, eval mode) still remember the forget set, judged on the validation split?

    Samples of a class the forget set removes entirely must not be recognised: remembered if accuracy on the
    forget samples of such classes is above 0 by more than z binomial standard errors of the validation
    samples' accuracy on them. For the other forget samples the model should do no better than on unseen
    samples of the same classes: remembered if forget accuracy exceeds validation accuracy by more than z
    standard errors of the difference (one-sided, 5% at z = 1.645). Only the validation split is read.
    ``excess`` (percentage points: forgotten-class accuracy plus forget-minus-validation accuracy) says how
    much is remembered, so that scopes tried on the same request can be compared.
    """
    if ctx.val_x is None or ctx.val_y is None or len(ctx.val_y) == 0:
        raise UnlearningError("escalation needs a validation split to judge forgetting",
                              "train with a validation fraction (data.val_fraction > 0) or set escalate=''")
    model = model.eval()
    with torch.no_grad():
        f_ok = (predict_logits(model, ctx.forget_x).argmax(1) == ctx.forget_y).float()
        v_ok = (predict_logits(model, ctx.val_x).argmax(1) == ctx.val_y).float()
    f_gone = ~torch.isin(ctx.forget_y, ctx.retain_y)  # forget samples of classes with no retain sample left
    f_kept = ~f_gone
    out: dict[str, Any] = {"remembered": False, "excess": 0.0}
    if bool(f_gone.any()):
        acc = float(f_ok[f_gone].mean())
        se = math.sqrt(max(acc * (1 - acc), 1.0 / len(f_ok[f_gone])) / len(f_ok[f_gone]))
        out["forgotten_class_acc"] = 100.0 * acc
        out["excess"] += 100.0 * acc
        out["remembered"] |= acc > z * se
    v_same = torch.isin(ctx.val_y, ctx.forget_y[f_kept].unique())
    if bool(f_kept.any()) and bool(v_same.any()):
        fa, va = float(f_ok[f_kept].mean()), float(v_ok[v_same].mean())
        se = math.sqrt(fa * (1 - fa) / int(f_kept.sum()) + va * (1 - va) / int(v_same.sum()))
        out.update(forget_acc=100.0 * fa, val_acc=100.0 * va)
        out["excess"] += 100.0 * (fa - va)
        out["remembered"] |= fa - va > z * max(se, 1e-9)
    return out


def escalate(ctx: UnlearnContext, cfg: Auto) -> UnlearnResult:
    """Q-MUL from the cheapest scope up: each scope starts from the deployed QAT copy with its recommended
    recipe, and the next one is tried only while ``still_remembered`` says the forget set is remembered and
    the last widening helped. A wider scope that leaves more remembered than a narrower one (its ``excess``)
    ends the escalation, and the narrower scope's result is kept: on a model whose head holds most of the
    weights, retraining the features as well can make the forget set better known, not less
    (bench/results/memorize-small-cnn.md)."""
    scopes = cfg.scopes()
    if ctx.val_y is None or len(ctx.val_y) == 0:  # nothing to judge forgetting on: the cheapest scope only
        result = QMulMethod(cfg.qmul(scopes[0])).run(ctx)
        result.log["escalation"] = [{"scope": scopes[0], "seconds": result.log["seconds"],
                                     "note": "no validation split: escalation needs one, so only this scope ran"}]
        result.log["scope"] = scopes[0]
        return result
    original = copy.deepcopy(ctx.qat.state_dict())
    tried: list[dict[str, Any]] = []
    best: tuple[UnlearnResult, dict[str, Any]] | None = None
    for i, scope in enumerate(scopes):
        if i:
            ctx.qat.load_state_dict(original)
        result = QMulMethod(cfg.qmul(scope)).run(ctx)
        verdict = still_remembered(result.qat, ctx)
        tried.append({"scope": scope, "seconds": result.log["seconds"], **verdict})
        excess = verdict.get("excess")  # how much is remembered (None: no measure, the wider scope is taken)
        if best is not None and excess is not None and best[1]["excess"] is not None \
                and excess >= best[1]["excess"]:
            tried[-1]["note"] = f"remembers no less than {best[1]['scope']}: the escalation stops there"
            break
        best = (result, {"scope": scope, "excess": excess})
        if not verdict["remembered"]:
            break
    assert best is not None  # scopes() is never empty
    result = best[0]
    result.log["escalation"] = tried
    result.log["scope"] = best[1]["scope"]
    return result


def probe_train_step(ctx: UnlearnContext, probes: int = 8) -> float:
    """Seconds per step of the original recipe (forward + backward + SGD step on a fresh model)."""
    torch.manual_seed(0)
    model_cfg, recipe = ctx.recipe()
    model = build_model(model_cfg).train()
    opt = sgd(model, recipe.lr, recipe.momentum, recipe.weight_decay)
    x, y = ctx.retain_x[: recipe.batch_size], ctx.retain_y[: recipe.batch_size]
    t0 = time.perf_counter()
    for _ in range(probes):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / probes


def retain_sample_size(cfg: LoopConfig, n_forget: int, n_retain: int) -> int:
    """Retain samples drawn per epoch (0 = every one): ``retain_batches`` batches, or ``retain_ratio`` x
    the forget set (at least one batch), capped at the retain set."""
    if cfg.retain_batches:
        k = cfg.retain_batches * cfg.batch_size
    elif cfg.retain_ratio:
        k = max(cfg.batch_size, math.ceil(cfg.retain_ratio * n_forget))
    else:
        return 0
    return 0 if k >= n_retain else k


def estimate_qmul_seconds(ctx: UnlearnContext, cfg: QMul, probes: int = 8) -> float:
    """Q-MUL's cost on this context: its step count x a step time measured on the model, plus conversion.

    The probe steps run forward and backward on real batches without an optimizer step, so the model is
    unchanged. Classifier mode measures the head on the cached features.
    """
    work = classifier_context(ctx, with_val=False) if cfg.layers == "classifier" else ctx
    model = work.qat
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(work.forget_x) + (retain_sample_size(cfg, len(work.forget_x), len(work.retain_x)) or len(work.retain_x))
    x = torch.cat([work.forget_x[: cfg.batch_size], work.retain_x[: cfg.batch_size]])[: cfg.batch_size]
    y = torch.cat([ctx.forget_y[: cfg.batch_size], ctx.retain_y[: cfg.batch_size]])[: cfg.batch_size]
    was_training = model.training
    t0 = time.perf_counter()
    for _ in range(probes):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        del grads
    step = (time.perf_counter() - t0) / probes
    model.train(was_training)
    t1 = time.perf_counter()
    quant.convert(ctx.qat)
    convert = time.perf_counter() - t1
    batches = math.ceil(len(work.forget_x) / cfg.batch_size), math.ceil((n - len(work.forget_x)) / cfg.batch_size)
    norm = sum(min(cfg.norm_batches, b) if cfg.norm_batches else b for b in batches)
    steps = cfg.epochs * (math.ceil(n / cfg.batch_size) + norm)
    return steps * step + convert
