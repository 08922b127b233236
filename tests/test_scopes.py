"""Q-MUL beyond the head (layers = classifier | last-K-blocks | all), Auto's escalation, and the SalUn /
SCRUB / ℓ1-sparse baselines, on a small ResNet-8 whose head is a single Linear."""

import copy
import warnings

import pytest
import torch
from torch import nn

import edge_qmul as eq
from edge_qmul import methods, quant
from edge_qmul.config import Auto, L1Sparse, QMul, Salun, Scrub, scope_blocks
from edge_qmul.errors import ConfigError
from edge_qmul.methods import UnlearnContext, escalate, still_remembered
from edge_qmul.models import ModelConfig, build_model

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def resnet() -> dict:
    torch.manual_seed(0)
    model = build_model(ModelConfig("resnet8", 1, 16, 4, width=8)).eval()
    x = torch.rand(160, 1, 16, 16)
    y = torch.arange(160) % 4
    q = eq.quantize(model, x[:64])
    return {"q": q, "x": x, "y": y}


def _unlearn(r: dict, cfg) -> eq.Quantized:  # type: ignore[no-untyped-def]
    x, y = r["x"], r["y"]
    return eq.unlearn(r["q"], (x[:16], y[:16]), (x[16:128], y[16:128]), cfg, val=(x[128:], y[128:]))


def _moved(before: nn.Module, after: nn.Module) -> set[str]:
    old = dict(before.named_parameters())
    return {n for n, p in after.named_parameters() if not torch.equal(p, old[n])}


@pytest.mark.parametrize(("value", "k"), [("classifier", 0), ("all", -1), ("last-1-blocks", 1), ("last-12-blocks", 12)])
def test_scope_names(value: str, k: int) -> None:
    assert scope_blocks(value) == k
    assert QMul(layers=value).layers == value


@pytest.mark.parametrize("value", ["last-0-blocks", "last--1-blocks", "last-x-blocks", "last-1-block", "convs", ""])
def test_bad_scopes_are_refused_with_the_fix(value: str) -> None:
    with pytest.raises(ConfigError, match="last-K-blocks"):
        QMul(layers=value)


def test_blocks_follow_the_graph_and_the_head_is_separate(resnet: dict) -> None:
    qat = resnet["q"].qat
    before, head = quant.blocks(qat)
    assert [name for name, _ in before] == ["stem.0", "layers.0", "layers.1", "layers.2"]
    assert {id(p) for p in head} == {id(p) for p in qat.get_submodule("fc").parameters()}
    sizes = {s: sum(p.numel() for p in quant.scope_parameters(qat, s)) for s in
             ("classifier", "last-1-blocks", "last-2-blocks", "last-9-blocks", "all")}
    total = sum(p.numel() for p in qat.parameters())
    assert sizes["classifier"] == 4 * 32 + 4  # Linear(32, 4)
    assert sizes["classifier"] < sizes["last-1-blocks"] < sizes["last-2-blocks"] < sizes["last-9-blocks"]
    assert sizes["last-9-blocks"] == sizes["all"] == total  # K beyond the block count is everything


def test_block_key() -> None:
    assert quant.block_key("layers.2.conv1") == "layers.2"
    assert quant.block_key("features.3.conv.0.0") == "features.3"
    assert quant.block_key("fc") == "fc" and quant.block_key("stem.0") == "stem.0"
    assert quant.block_key("encoder.conv") == "encoder"


def test_last_block_scope_moves_only_that_block_and_the_head(resnet: dict) -> None:
    q = resnet["q"]
    out = _unlearn(resnet, QMul.for_scope("last-1-blocks", epochs=2, lr=0.05, update_bn=True))
    moved = _moved(q.qat, out.qat)
    assert moved and all(n.startswith(("layers.2.", "fc.")) for n in moved)
    assert any(n.startswith("layers.2.") for n in moved) and any(n.startswith("fc.") for n in moved)
    # frozen blocks keep their BatchNorm statistics even when the scope updates its own
    old = dict(q.qat.named_buffers())
    changed = {n for n, b in out.qat.named_buffers() if "running" in n and not torch.equal(b, old[n])}
    assert changed and all(n.startswith("layers.2.") for n in changed)
    assert out.log["trainable"] == sum(p.numel() for p in quant.scope_parameters(q.qat, "last-1-blocks"))
    assert all(p.requires_grad for p in q.qat.parameters())  # the caller's copy is untouched


def test_all_scope_moves_the_stem(resnet: dict) -> None:
    out = _unlearn(resnet, QMul.for_scope("all", epochs=1, lr=0.05))
    assert any(n.startswith("stem.") for n in _moved(resnet["q"].qat, out.qat))


def test_l2_pooling_balances_the_weights_too(resnet: dict) -> None:
    out = _unlearn(resnet, QMul.for_scope("all", epochs=1, lr=0.01, norm_pooling="l2"))
    ep = out.log["epochs"][0]
    assert ep["w_f"] * ep["g_f"] == pytest.approx(ep["w_r"] * ep["g_r"])
    summed = _unlearn(resnet, QMul.for_scope("all", epochs=1, lr=0.01))
    assert ep["g_f"] < summed.log["epochs"][0]["g_f"]  # one global norm <= the sum of per-tensor norms


def test_scope_recipes() -> None:
    assert QMul.for_scope("classifier") == QMul()
    assert QMul.for_scope("last-3-blocks").lr == QMul.for_scope("last-1-blocks").lr
    assert QMul.for_scope("all", lr=0.5).lr == 0.5
    with pytest.raises(ConfigError):
        QMul.for_scope("heads")


def test_salun_moves_only_the_salient_weights(resnet: dict) -> None:
    cfg = Salun(layers="all", epochs=2, lr=0.05, mask_ratio=0.2)
    out = _unlearn(resnet, cfg)
    before = dict(resnet["q"].qat.named_parameters())
    changed = sum(int((p != before[n]).sum()) for n, p in out.qat.named_parameters())
    total = sum(p.numel() for p in out.qat.parameters())
    assert 0 < changed <= round(0.2 * total) + 1
    assert out.log["epochs"][0]["salient_fraction"] == pytest.approx(0.2, abs=0.01)


def test_scrub_moves_away_from_the_teacher_on_the_forget_set(digits) -> None:  # type: ignore[no-untyped-def]
    teacher = digits.qat()

    def scrub(max_epochs: int) -> methods.UnlearnResult:
        ctx = UnlearnContext(qat=copy.deepcopy(teacher), forget_x=digits.forget_x, forget_y=digits.forget_y,
                             retain_x=digits.retain_x, retain_y=digits.retain_y, num_classes=10, model_cfg=None,
                             train_cfg=None, backend="x86", calib_size=256)
        return methods.unlearn(ctx, Scrub(layers="all", epochs=3, max_epochs=max_epochs, lr=0.05))

    def divergence(student: nn.Module, x: torch.Tensor) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.kl_div(student.eval()(x).log_softmax(1), teacher.eval()(x).log_softmax(1),
                                                    log_target=True, reduction="batchmean"))

    with_max, min_only = scrub(3), scrub(0)
    assert {"loss_forget", "loss_retain"} <= set(with_max.log["epochs"][0])
    assert "loss_forget" not in min_only.log["epochs"][0]
    # the max steps push the student away from the teacher on the forget set, more than on unseen samples
    assert divergence(with_max.qat, digits.forget_x) > 2 * divergence(min_only.qat, digits.forget_x)
    assert divergence(with_max.qat, digits.forget_x) > divergence(with_max.qat, digits.test_x)


def test_l1_sparse_decays_and_shrinks_weights(resnet: dict) -> None:
    common = dict(layers="all", epochs=3, lr=0.05, weight_decay=0.0)
    sparse = _unlearn(resnet, L1Sparse(l1_alpha=0.05, **common))
    plain = _unlearn(resnet, L1Sparse(l1_alpha=0.0, **common))
    strengths = [e["l1"] for e in sparse.log["epochs"]]
    assert strengths == pytest.approx([0.05, 0.05 * 2 / 3, 0.05 / 3])
    l1 = lambda m: sum(float(p.abs().sum()) for p in m.parameters())  # noqa: E731
    assert l1(sparse.qat) < l1(plain.qat)


class Lookup(nn.Module):
    """A 'model' that returns fixed logits per sample (the sample's first pixel is its row)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].long()]


def _lookup_ctx(forget_y: torch.Tensor, forget_ok: torch.Tensor, val_y: torch.Tensor, val_ok: torch.Tensor,
                retain_y: torch.Tensor) -> tuple[nn.Module, UnlearnContext]:
    ys = torch.cat([forget_y, val_y])
    ok = torch.cat([forget_ok, val_ok])
    pred = torch.where(ok, ys, (ys + 1) % 4)
    logits = nn.functional.one_hot(pred, 4).float()
    rows = torch.arange(len(ys)).float().view(-1, 1, 1, 1)
    nf = len(forget_y)
    ctx = UnlearnContext(qat=nn.Identity(), forget_x=rows[:nf], forget_y=forget_y, retain_x=torch.empty(0),
                         retain_y=retain_y, num_classes=4, model_cfg=None, train_cfg=None, backend="x86",
                         calib_size=0, val_x=rows[nf:], val_y=val_y)
    return Lookup(logits), ctx


def test_still_remembered_random_forgetting() -> None:
    fy, vy, ry = torch.arange(200) % 4, torch.arange(400) % 4, torch.arange(100) % 4
    vok = torch.rand(400, generator=torch.Generator().manual_seed(0)) < 0.8
    model, ctx = _lookup_ctx(fy, torch.ones(200, dtype=torch.bool), vy, vok, ry)  # 100% vs ~80%
    verdict = still_remembered(model, ctx)
    assert verdict["remembered"] and verdict["forget_acc"] == 100.0
    assert verdict["excess"] == pytest.approx(100.0 - verdict["val_acc"])  # points above unseen samples
    fok = torch.rand(200, generator=torch.Generator().manual_seed(1)) < 0.8  # like unseen data
    model, ctx = _lookup_ctx(fy, fok, vy, vok, ry)
    assert not still_remembered(model, ctx)["remembered"]


def test_still_remembered_class_forgetting() -> None:
    fy = torch.zeros(100, dtype=torch.long)  # all of class 0; the retain set has none
    vy, ry = torch.arange(400) % 4, 1 + torch.arange(90) % 3
    vok = torch.ones(400, dtype=torch.bool)
    model, ctx = _lookup_ctx(fy, torch.arange(100) < 30, vy, vok, ry)
    verdict = still_remembered(model, ctx)
    assert verdict["remembered"] and verdict["forgotten_class_acc"] == pytest.approx(30.0)
    assert verdict["excess"] == pytest.approx(30.0)
    model, ctx = _lookup_ctx(fy, torch.zeros(100, dtype=torch.bool), vy, vok, ry)
    assert not still_remembered(model, ctx)["remembered"]


def _ctx(r: dict) -> UnlearnContext:
    x, y = r["x"], r["y"]
    return UnlearnContext(qat=copy.deepcopy(r["q"].qat), forget_x=x[:16], forget_y=y[:16], retain_x=x[16:128],
                          retain_y=y[16:128], num_classes=4, model_cfg=None, train_cfg=None, backend="x86",
                          calib_size=64, val_x=x[128:], val_y=y[128:])


def test_escalation_widens_the_scope_while_remembered(resnet: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    verdicts = iter([True, False])
    monkeypatch.setattr(methods, "still_remembered", lambda m, c: {"remembered": next(verdicts)})
    result = escalate(_ctx(resnet), Auto(epochs=1))
    assert [t["scope"] for t in result.log["escalation"]] == ["classifier", "last-1-blocks"]
    assert result.log["scope"] == "last-1-blocks"


def test_escalation_stops_when_widening_leaves_more_remembered(resnet: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # still remembered after the head (excess 2 points), more so after the last block (5): the wider scopes
    # do not help, so the escalation stops and keeps the head's result, not the last tried
    verdicts = iter([{"remembered": True, "excess": 2.0}, {"remembered": True, "excess": 5.0}])
    results: list[methods.UnlearnResult] = []
    real = methods.QMulMethod.run

    def keep(self, ctx):  # type: ignore[no-untyped-def]
        results.append(real(self, ctx))
        return results[-1]

    monkeypatch.setattr(methods.QMulMethod, "run", keep)
    monkeypatch.setattr(methods, "still_remembered", lambda m, c: next(verdicts))
    result = escalate(_ctx(resnet), Auto(epochs=1))
    tried = result.log["escalation"]
    assert [t["scope"] for t in tried] == ["classifier", "last-1-blocks"]  # "all" is never tried
    assert result.log["scope"] == "classifier" and result is results[0]
    assert "remembers no less than classifier" in tried[1]["note"]


def test_escalation_keeps_a_wider_scope_that_helps(resnet: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    verdicts = iter([{"remembered": True, "excess": 5.0}, {"remembered": True, "excess": 3.0},
                     {"remembered": True, "excess": 1.5}])
    monkeypatch.setattr(methods, "still_remembered", lambda m, c: next(verdicts))
    result = escalate(_ctx(resnet), Auto(epochs=1))
    assert [t["scope"] for t in result.log["escalation"]] == ["classifier", "last-1-blocks", "all"]
    assert result.log["scope"] == "all"  # still remembered, but the least: the widest scope is kept


def test_escalation_restarts_each_scope_from_the_deployed_model(resnet: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    real = methods.QMulMethod.run

    def spy(self, ctx):  # type: ignore[no-untyped-def]
        seen.append(ctx.qat.get_submodule("fc").weight.detach().clone())
        return real(self, ctx)

    monkeypatch.setattr(methods.QMulMethod, "run", spy)
    monkeypatch.setattr(methods, "still_remembered", lambda m, c: {"remembered": True})
    result = escalate(_ctx(resnet), Auto(escalate="classifier,all"))
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert [t["scope"] for t in result.log["escalation"]] == ["classifier", "all"]


def test_escalation_without_a_validation_split_runs_the_cheapest_scope(resnet: dict) -> None:
    ctx = _ctx(resnet)
    ctx.val_x = ctx.val_y = None
    result = escalate(ctx, Auto())
    assert result.log["scope"] == "classifier" and "no validation split" in result.log["escalation"][0]["note"]


def test_auto_escalates_from_its_own_layers_to_wider_scopes() -> None:
    assert Auto().scopes() == ["classifier", "last-1-blocks", "all"]
    assert Auto(layers="last-1-blocks").scopes() == ["last-1-blocks", "all"]
    assert Auto(layers="all").scopes() == ["all"] and Auto(escalate="").scopes() == ["classifier"]
    assert Auto(escalate="all,last-2-blocks").scopes() == ["classifier", "last-2-blocks", "all"]
    assert Auto(epochs=2).qmul("classifier").epochs == 2 and Auto(epochs=2).qmul("all") == QMul.for_scope("all")
    with pytest.raises(ConfigError, match="escalate"):
        Auto(escalate="classifier,everything")
