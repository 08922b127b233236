import torch
from torch.ao.quantization import FakeQuantize, disable_observer

from edge_qmul import quant


def _agreement(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


def test_int8_is_real_and_accurate(digits) -> None:
    kinds = {type(m).__module__ for m in digits.int8.modules()}
    assert any(k.startswith("torch.ao.nn.quantized") for k in kinds)
    with torch.no_grad():
        float_acc = float((digits.model(digits.test_x).argmax(1) == digits.test_y).float().mean())
        int8_acc = float((digits.int8(digits.test_x).argmax(1) == digits.test_y).float().mean())
    assert float_acc > 0.9
    assert abs(float_acc - int8_acc) < 0.02


def test_qat_copy_converts_to_the_ptq_model(digits) -> None:
    qat_int8 = quant.convert(digits.qat())
    assert _agreement(digits.int8, qat_int8, digits.test_x) >= 0.99


def test_qat_state_round_trip_is_exact(digits) -> None:
    qat = digits.qat()
    state = quant.save_qat_state(qat)
    restored = quant.restore_qat(digits.model, "x86", digits.calib[0], state)
    for key, value in state.items():
        assert torch.equal(restored.state_dict()[key], value), key
    with torch.no_grad():
        diff = (restored.eval()(digits.test_x) - qat.eval()(digits.test_x)).abs().max()
    assert float(diff) == 0.0


def test_convert_leaves_the_qat_copy_trainable(digits) -> None:
    qat = digits.qat()
    quant.set_trainable(qat)
    before = {k: v.clone() for k, v in qat.state_dict().items()}
    quant.convert(qat)
    assert qat.training
    assert any(isinstance(m, FakeQuantize) for m in qat.modules())
    assert all(torch.equal(before[k], v) for k, v in qat.state_dict().items())
    loss = torch.nn.functional.cross_entropy(qat(digits.train_x[:32]), digits.train_y[:32])
    loss.backward()
    assert all(p.grad is not None for p in qat.parameters())


def test_set_trainable_freezes_activation_ranges_but_not_weights(digits) -> None:
    qat = digits.qat()
    quant.set_trainable(qat)
    for name, mod in qat.named_modules():
        if isinstance(mod, FakeQuantize):
            assert bool(mod.observer_enabled) == name.endswith("weight_fake_quant"), name


def test_qnnpack_backend(digits) -> None:
    int8 = quant.quantize_ptq(digits.model, digits.calib, "qnnpack")
    assert _agreement(int8, digits.int8, digits.test_x) > 0.95
    torch.backends.quantized.engine = "x86"


def test_split_at_classifier_composes_to_the_model_and_shares_parameters(digits) -> None:
    qat = digits.qat().eval()
    qat.apply(disable_observer)  # weight observers would otherwise move the grid between the two calls
    features, head = quant.split_at_classifier(qat)
    x = digits.test_x[:64]
    with torch.no_grad():
        assert torch.equal(head(features(x)), qat(x))
    # the head is the last Linear (fc2); fc1 belongs to the features
    assert {n for n, _ in head.named_parameters()} == {n for n, _ in qat.named_parameters() if n.startswith("fc2")}
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.01)
        assert torch.equal(head(features(x)), qat(x))  # the head's parameters are the QAT copy's


def test_int8_features_feed_the_int8_classifier(digits) -> None:
    qat = digits.qat().eval()
    _, head = quant.split_at_classifier(qat)
    feats = quant.int8_features(qat)
    x = digits.test_x
    with torch.no_grad():
        f = feats(x)
        assert not f.is_quantized and f.shape == (len(x), 64)  # fc1's outputs (4w), the last Linear's inputs
        agree = (head(f).argmax(1) == quant.convert(qat)(x).argmax(1)).float().mean()
    assert float(agree) >= 0.99


def test_only_quant_module_imports_torch_ao() -> None:
    import re
    from pathlib import Path

    imports_ao = re.compile(r"^\s*(from|import)\s+torch\.ao\b", re.MULTILINE)
    root = Path(__file__).resolve().parents[1]
    offenders = [
        str(path.relative_to(root))
        for folder in ("edge_qmul", "export", "federated", "devices")
        for path in (root / folder).rglob("*.py")
        if path.name != "quant.py" and imports_ao.search(path.read_text())
    ]
    assert offenders == []
