import pytest
import torch

from edge_qmul import quant
from edge_qmul.errors import ConfigError
from edge_qmul.models import DEFAULT_WIDTH, MODELS, ModelConfig, build_model

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
