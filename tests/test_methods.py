import math
from dataclasses import dataclass, replace
from typing import ClassVar

import pytest
import torch

from edge_qmul import quant
from edge_qmul.config import (
    METHODS,
    Auto,
    Famr,
    Finetune,
    GradAscent,
    LoopConfig,
    MethodConfig,
    QMul,
    RandomLabel,
    Retrain,
    method_config,
)
from edge_qmul.errors import ConfigError, UnlearningError
from edge_qmul.methods import (
    HANDLERS,
    REGISTRY,
    AutoMethod,
    FamrMethod,
    FinetuneMethod,
    GradAscentMethod,
    LoopMethod,
    QMulMethod,
    RandomLabelMethod,
    RetrainMethod,
    Step,
    UnlearnContext,
    get_method,
    grad_norm_sum,
    similar_labels,
    unlearn,
)


def _loop_cfg(method: str, **changes: object) -> MethodConfig:
    """The settings these tests always used (the old flat config's defaults): the paper code's loop settings
    (Q-MUL's released code) with ``changes``; retrain has no loop settings and ignored them."""
    cls = METHODS[method]
    if cls is Retrain:
        return Retrain()
    base = cls.paper_code() if issubclass(cls, QMul) else cls(epochs=10, lr=0.01)
    return replace(base, **changes)


def test_similar_labels_pick_the_most_confusable_wrong_class() -> None:
    probs = torch.tensor([[0.70, 0.05, 0.25], [0.10, 0.30, 0.60], [0.40, 0.35, 0.25]])
    y = torch.tensor([0, 2, 1])
    got = similar_labels(probs.log(), y)
    assert got.tolist() == [2, 1, 0]  # |p_c - p_y| smallest over c != y
    assert (got != y).all()


def test_paper_code_variant_can_return_the_true_label() -> None:
    # True class 0; the nearest logit is class 1, which sits at index 0 once class 0 is removed.
    logits = torch.tensor([[5.0, 4.9, 0.0]])
    y = torch.tensor([0])
    assert similar_labels(logits, y, "paper_code").item() == 0
    assert similar_labels(logits, y, "faithful").item() == 1


def test_grad_norm_sum_is_a_sum_of_per_tensor_norms() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = sum(float(p.grad.norm()) for p in model.parameters())
    assert grad_norm_sum(model, x, y) == pytest.approx(expected, rel=1e-6)


def _ctx(digits, qat: torch.nn.Module | None = None) -> UnlearnContext:
    return UnlearnContext(
        qat=qat or digits.qat(), forget_x=digits.forget_x, forget_y=digits.forget_y,
        retain_x=digits.retain_x, retain_y=digits.retain_y, num_classes=10,
        model_cfg=digits.model_cfg, train_cfg=digits.train_cfg, backend="x86", calib_size=512,
    )


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_returns_an_int8_model_and_a_log(digits, method: str) -> None:
    result = unlearn(_ctx(digits), _loop_cfg(method, epochs=2, lr=0.01, retain_batches=2))
    assert result.method == method
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in result.int8.modules())
    assert result.log["seconds"] > 0
    retrained = method == "retrain" or (method == "auto" and result.log["plan"]["choice"] == "exact")
    assert len(result.log["epochs"]) == (digits.train_cfg.epochs if retrained else 2)
    with torch.no_grad():
        assert result.int8(digits.test_x[:8]).shape == (8, 10)


def test_qmul_log_has_balanced_adaptive_weights(digits) -> None:
    result = unlearn(_ctx(digits), QMul.paper_code(epochs=2, lr=0.01))
    for epoch in result.log["epochs"]:
        assert epoch["w_f"] + epoch["w_r"] == pytest.approx(1.0)
        assert epoch["w_f"] * epoch["g_f"] == pytest.approx(epoch["w_r"] * epoch["g_r"])
        assert {"loss_forget", "loss_retain", "seconds", "lr"} <= set(epoch)
        assert epoch["similar_is_true"] == 0
    assert result.log["epochs"][1]["lr"] < result.log["epochs"][0]["lr"]  # cosine


@pytest.mark.parametrize("update", ["sequential", "mixed"])
def test_qmul_raises_the_loss_on_the_forget_set_only(digits, update: str) -> None:
    def mean_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))

    cfg = QMul.paper_code(epochs=10, lr=0.1, layers="classifier", update=update)
    result = unlearn(_ctx(digits), cfg)
    forget = mean_loss(result.int8, digits.forget_x, digits.forget_y) / mean_loss(
        digits.int8, digits.forget_x, digits.forget_y
    )
    retain = mean_loss(result.int8, digits.retain_x, digits.retain_y) / mean_loss(
        digits.int8, digits.retain_x, digits.retain_y
    )
    print(f"loss ratio after/before: forget {forget:.3f}, retain {retain:.3f}")
    assert forget > 1.2  # the forget samples are no longer fit as tightly ...
    assert retain < 1.0  # ... while the retain samples are fit at least as well


def test_unknown_method_lists_the_registry(digits) -> None:
    with pytest.raises(UnlearningError) as err:
        method_config("magic")
    assert "qmul" in str(err.value) and "retrain" in str(err.value)

    @dataclass(frozen=True)
    class Magic(LoopConfig):  # a config class no method is registered for
        name: ClassVar[str] = "magic"

    with pytest.raises(UnlearningError) as err:
        unlearn(_ctx(digits), Magic())
    assert "Magic" in str(err.value) and "QMul (qmul)" in str(err.value) and "Retrain (retrain)" in str(err.value)


@pytest.mark.parametrize(
    ("cfg", "method"),
    [
        (QMul(), QMulMethod), (Auto(), AutoMethod), (Finetune(), FinetuneMethod), (RandomLabel(), RandomLabelMethod),
        (GradAscent(), GradAscentMethod), (Famr(), FamrMethod), (Retrain(), RetrainMethod),
    ],
)
def test_dispatch_by_the_config_type(cfg: MethodConfig, method: type) -> None:
    got = get_method(cfg)
    assert type(got) is method and got.cfg is cfg  # Auto subclasses QMul but runs the planner
    assert got.name == cfg.name and REGISTRY[cfg.name] is method and HANDLERS[type(cfg)] is method
    assert set(REGISTRY) == set(METHODS)


def test_auto_runs_qmul_with_its_own_fields() -> None:
    auto = Auto(epochs=3, lr=0.2, retain_ratio=2.0, escalate="")
    qmul = auto.qmul()
    own = {k: v for k, v in auto.to_dict().items() if k != "escalate"}
    assert type(qmul) is QMul and qmul.to_dict() == {**own, "method": "qmul"}
    assert auto.qmul("all") == QMul.for_scope("all")  # another scope: that scope's recipe
    assert auto.qmul("classifier") == qmul  # its own scope: its own fields


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.0), dict(update="random"), dict(schedule="step"), dict(label_variant="x"), dict(epochs=-1),
        dict(layers="convs"), dict(forget_target="test"), dict(forget_loss_cap=1.0, update="mixed"),
    ],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        QMul.paper_code(**kwargs)


def test_non_finite_loss_is_an_error(digits) -> None:
    class Diverges(LoopMethod):
        name = "diverges"

        def steps(self, ctx, epoch):  # type: ignore[no-untyped-def]
            yield Step(ctx.forget_x, ctx.forget_y, 1.0, "forget")

        def loss(self, ctx, logits, step):  # type: ignore[no-untyped-def]
            return logits.sum() * float("nan")

    with pytest.raises(UnlearningError, match="loss became nan"):
        Diverges(QMul.paper_code(epochs=1)).run(_ctx(digits))


def test_retrain_never_sees_the_forget_set(digits) -> None:
    result = unlearn(_ctx(digits), Retrain())
    assert result.float_model is not None
    assert math.isfinite(result.log["seconds"])
    assert quant.convert(result.qat) is not None


def test_classifier_mode_moves_only_the_classifier(digits) -> None:
    qat = digits.qat()
    before = {n: p.detach().clone() for n, p in qat.named_parameters()}
    result = unlearn(_ctx(digits, qat), QMul.paper_code(epochs=3, lr=0.1, layers="classifier"))
    moved = {n for n, p in result.qat.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("fc") for n in moved)
    assert result.qat is qat  # the full QAT copy was trained in place through its head
    for epoch in result.log["epochs"]:
        assert epoch["w_f"] * epoch["g_f"] == pytest.approx(epoch["w_r"] * epoch["g_r"])


def test_forget_target_val_skips_the_forget_pass_once_forgotten(digits) -> None:
    ctx = _ctx(digits)
    ctx.val_x, ctx.val_y = digits.test_x, digits.test_y
    result = unlearn(ctx, QMul.paper_code(epochs=3, lr=0.1, forget_target="val"))
    for epoch in result.log["epochs"]:
        assert epoch["forget_pass"] == float(epoch["forget_acc"] > epoch["val_acc"])
        assert ("loss_forget" in epoch) == bool(epoch["forget_pass"])


def test_random_label_ablation_never_returns_the_true_label() -> None:
    from edge_qmul.methods import similar_labels

    y = torch.randint(0, 10, (500,))
    logits = torch.randn(500, 10)
    a = similar_labels(logits, y, "random", torch.Generator().manual_seed(3))
    b = similar_labels(logits, y, "random", torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not (a == y).any()
    assert len(set(a.tolist())) == 10  # spread over the classes, unlike the similar label


def test_retain_ratio_draws_a_sample_proportional_to_the_forget_set() -> None:
    from edge_qmul.errors import ConfigError
    from edge_qmul.methods import retain_sample_size

    cfg = QMul.paper_code(retain_ratio=3.0, batch_size=256)
    assert retain_sample_size(cfg, 5400, 48_600) == 16_200  # 3 x the forget set
    assert retain_sample_size(cfg, 1, 48_600) == 256  # at least one batch
    assert retain_sample_size(cfg, 20_000, 30_000) == 0  # more than the retain set: every sample
    assert retain_sample_size(QMul.paper_code(retain_batches=4, batch_size=256), 5400, 48_600) == 1024
    assert retain_sample_size(QMul.paper_code(), 5400, 48_600) == 0
    with pytest.raises(ConfigError, match="retain_ratio"):
        QMul.paper_code(retain_ratio=2.0, retain_batches=4)
    with pytest.raises(ConfigError, match="retain_ratio"):
        QMul.paper_code(retain_ratio=-1.0)


def test_qmul_with_a_retain_ratio_sees_that_many_retain_samples_per_epoch(digits) -> None:
    ctx = _ctx(digits)
    method = QMulMethod(QMul.paper_code(epochs=1, lr=0.01, retain_ratio=2.0, batch_size=16))
    idx = method.retain_sample(ctx)
    assert len(idx) == max(16, 2 * len(ctx.forget_x)) and len(set(idx.tolist())) == len(idx)
    result = unlearn(ctx, QMul.paper_code(epochs=2, lr=0.01, retain_ratio=2.0))
    assert len(result.log["epochs"]) == 2
