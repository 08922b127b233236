import pytest
import torch
from torch.ao.quantization import FixedQParamsFakeQuantize

from edge_qmul import quant
from edge_qmul.errors import ConfigError
from edge_qmul.models import DEFAULT_WIDTH, MODELS, ModelConfig, Normalize, build_model, make_divisible

CASES = [("small_cnn", 1, 8), ("small_cnn", 1, 28), ("resnet8", 3, 32), ("resnet20", 3, 32), ("resnet18", 3, 32)]


@pytest.mark.parametrize(("name", "channels", "size"), CASES)
def test_forward_trace_and_quantize(name: str, channels: int, size: int) -> None:
    cfg = ModelConfig(name, channels, size, 10, (0.5,) * channels, (0.25,) * channels, DEFAULT_WIDTH[name])
    model = build_model(cfg).eval()
    x = torch.rand(4, channels, size, size)
    assert model(x).shape == (4, 10)
    torch.fx.symbolic_trace(model)  # FX-traceable
    int8 = quant.quantize_ptq(model, [x], "x86")
    assert int8(x).shape == (4, 10)
    kinds = {type(m).__name__ for m in int8.modules()}
    assert "ConvReLU2d" in kinds  # conv + BN + ReLU fused into one int8 kernel
    assert not any(isinstance(m, torch.nn.ReLU6) for m in model.modules())


def test_normalisation_is_inside_the_model() -> None:
    cfg = ModelConfig("small_cnn", 1, 8, 10, (0.5,), (0.25,), 8)
    model = build_model(cfg)
    x = torch.full((1, 1, 8, 8), 0.5)
    assert torch.equal(model.normalize(x), torch.zeros_like(x))


@pytest.mark.parametrize(
    "kwargs",
    [dict(name="vgg"), dict(mean=(0.1, 0.2)), dict(width=2)],
)
def test_config_errors(kwargs: dict) -> None:
    base = dict(name="small_cnn", in_channels=1, image_size=8, num_classes=10, mean=(0.5,), std=(0.2,), width=8)
    with pytest.raises(ConfigError):
        ModelConfig(**{**base, **kwargs})


def test_registry_covers_defaults() -> None:
    assert set(MODELS) == set(DEFAULT_WIDTH)


def test_config_round_trip() -> None:
    cfg = ModelConfig("resnet20", 3, 32, 100, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 16)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def _mbv2(size: int, alpha: float) -> torch.nn.Module:
    cfg = ModelConfig("mobilenetv2", 3, size, 10, (0.5,) * 3, (0.25,) * 3, width_multiplier=alpha)
    return build_model(cfg).eval()


@pytest.mark.parametrize(("size", "alpha", "pooled_side"), [(32, 0.35, 4), (32, 1.0, 4), (96, 0.35, 3), (96, 1.0, 3)])
def test_mobilenetv2_strides_head_and_relu6(size: int, alpha: float, pooled_side: int) -> None:
    model = _mbv2(size, alpha)
    seen: list[tuple[int, ...]] = []
    model.pool.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad():
        assert model(torch.rand(2, 3, size, size)).shape == (2, 10)
    # CIFAR strides for 32x32 (stride-1 stem, 32 -> 4), ImageNet strides for 96x96 (96 -> 3)
    assert seen == [(2, 1280, pooled_side, pooled_side)]
    assert model.features[0][0].stride == ((1, 1) if size == 32 else (2, 2))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears == ["classifier"] and isinstance(model.normalize, Normalize)
    # stem + first block's depthwise + 16 blocks x (expand, depthwise) + last 1x1 conv
    assert sum(isinstance(m, torch.nn.ReLU6) for m in model.modules()) == 35
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    torch.fx.symbolic_trace(model)


def test_mobilenetv2_widths_match_the_reference_network() -> None:
    # torchvision's MobileNetV2 (width 1.0) with a 10-class head: 3,504,872 - 1000 * 1281 + 10 * 1281
    assert sum(p.numel() for p in _mbv2(32, 1.0).parameters()) == 2_236_682
    narrow = _mbv2(96, 0.35)
    assert narrow.features[0][0].out_channels == 16 and narrow.classifier.in_features == 1280
    assert [make_divisible(c * 0.35) for c in (16, 24, 32, 64, 96, 160, 320)] == [8, 8, 16, 24, 32, 56, 112]


def test_resnet8_is_the_mlperf_tiny_resnet8() -> None:
    model = build_model(ModelConfig("resnet8", 3, 32, 10, (0.5,) * 3, (0.25,) * 3, DEFAULT_WIDTH["resnet8"]))
    convs = [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0])
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [
        (3, 16, 3, 1),  # stem
        (16, 16, 3, 1), (16, 16, 3, 1),  # stack 1, identity shortcut
        (16, 32, 3, 2), (32, 32, 3, 1), (16, 32, 1, 2),  # stack 2, 1x1 conv shortcut
        (32, 64, 3, 2), (64, 64, 3, 1), (32, 64, 1, 2),  # stack 3, 1x1 conv shortcut
    ]
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert weights == 77_360  # MLPerf Tiny's ResNet-8 conv + dense kernels
    assert [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)] == ["fc"]
    assert model.fc.in_features == 64 and isinstance(model.pool, torch.nn.AdaptiveAvgPool2d)


@pytest.mark.parametrize(
    "kwargs",
    [dict(width_multiplier=0.0), dict(width_multiplier=-0.5), dict(width=16),
     dict(name="resnet8", width_multiplier=0.5)],
)
def test_width_multiplier_errors(kwargs: dict) -> None:
    base = dict(name="mobilenetv2", in_channels=3, image_size=32, num_classes=10, mean=(0.5,) * 3, std=(0.2,) * 3)
    with pytest.raises(ConfigError):
        ModelConfig(**{**base, **kwargs})


def test_width_multiplier_round_trips_and_old_dicts_load() -> None:
    cfg = ModelConfig("mobilenetv2", 3, 96, 2, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), width_multiplier=0.35)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["width_multiplier"] == 0.35
    old = ModelConfig("resnet20", 3, 32, 100, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 16).to_dict()
    del old["width_multiplier"]  # written before the field existed
    assert ModelConfig.from_dict(old).width_multiplier == 1.0


class _Relu6Toy(torch.nn.Module):
    """conv (+BN) / linear / add followed by one of the ways to write ReLU6; returns the activation."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.normalize = Normalize((0.5,), (0.25,))
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(16, 8)
        self.relu6 = torch.nn.ReLU6()
        self.hardtanh = torch.nn.Hardtanh(0.0, 6.0)
        with torch.no_grad():  # pre-activations well beyond [0, 6], so the clamp matters
            for layer in (self.conv, self.conv2, self.fc):
                layer.weight.mul_(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.form == "ReLU6 after conv+bn":
            return self.relu6(self.bn(self.conv(x)))
        if self.form == "F.hardtanh after conv":
            return torch.nn.functional.hardtanh(self.conv(x), 0.0, 6.0)
        if self.form == "clamp after linear":
            return self.fc(torch.flatten(x, 1)).clamp(min=0.0, max=6.0)
        if self.form == "F.relu6 after add":
            return torch.nn.functional.relu6(self.conv(x) + self.conv2(x))
        return self.hardtanh(self.conv(x) + self.conv2(x))  # "Hardtanh(0, 6) after add"


RELU6_FORMS = [
    ("ReLU6 after conv+bn", "ConvReLU2d"),
    ("F.hardtanh after conv", "ConvReLU2d"),
    ("clamp after linear", "LinearReLU"),
    ("F.relu6 after add", None),
    ("Hardtanh(0, 6) after add", None),
]


@pytest.mark.parametrize(("form", "fused"), RELU6_FORMS)
def test_relu6_runs_in_int8_with_exact_clamp(form: str, fused: str | None) -> None:
    torch.manual_seed(0)
    model = _Relu6Toy(form).train()
    with torch.no_grad():
        model(torch.rand(16, 1, 4, 4))  # BN statistics
    model.eval()
    x = torch.rand(64, 1, 4, 4)
    int8 = quant.quantize_ptq(model, [x], "x86")
    clamps = {"relu6", "hardtanh", "clamp", "ReLU6", "Hardtanh"}
    assert not [n for n in int8.graph.nodes if any(c in str(n.target) for c in clamps)]  # no float clamp left
    layers = {type(m).__name__: m for m in int8.modules()}
    if fused:  # folded into the layer: its int8 output grid is [0, 6]
        assert layers[fused].scale == quant.RELU6_SCALE and layers[fused].zero_point == 0
    else:  # requantized to the fixed grid: dequantize -> quantize_per_tensor(6/255, 0)
        q = [n for n in int8.graph.nodes if n.target is torch.quantize_per_tensor and n.args[0].target == "dequantize"]
        assert len(q) == 1 and float(getattr(int8, q[0].args[1].target)) == quant.RELU6_SCALE
    with torch.no_grad():
        out, ref = int8(x), model(x)
    steps = out / quant.RELU6_SCALE
    assert torch.allclose(steps, steps.round(), atol=1e-4)  # on the [0, 6] grid, saturated at 6
    assert out.min() == 0.0 and float(out.max()) == pytest.approx(6.0, abs=1e-6)
    assert torch.all(out[ref >= 6.5] == out.max()) and torch.all(out[ref <= -0.5] == 0.0)  # clamps where ReLU6 does
    assert float((out - ref).abs().mean()) < 0.1

    # the QAT copy has the same fixed grids, round-trips exactly and converts to the PTQ model
    qat = quant.prepare_qat(model, "x86", x)
    quant.calibrate_qat(qat, [x])
    restored = quant.restore_qat(model, "x86", x, quant.save_qat_state(qat))
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in qat.state_dict().items())
    converted = quant.convert(qat)
    with torch.no_grad():
        qat_int8 = converted(x)
        assert torch.equal(restored.eval()(x), qat.eval()(x))
    if fused:
        assert {type(m).__name__: m for m in converted.modules()}[fused].scale == quant.RELU6_SCALE
    # not bit-equal: QAT folds BN into fake-quantized weights and observes slightly different sums, as before
    assert float((qat_int8 - out).abs().mean()) < 0.05


def test_models_without_relu6_prepare_as_before() -> None:
    model = build_model(ModelConfig("resnet8", 3, 32, 10, (0.5,) * 3, (0.25,) * 3, 16)).eval()
    qat = quant.prepare_qat(model, "x86", torch.rand(1, 3, 32, 32))
    assert not any(isinstance(m, FixedQParamsFakeQuantize) for m in qat.modules())
