"""Models: a small CNN for 8x8 / 28x28 inputs, CIFAR ResNets for 32x32 and MobileNetV2 for edge boards.

Every model takes pixels in [0, 1] (N, C, H, W) and applies the dataset normalisation itself (a
``Normalize`` submodule named ``normalize``, which the quantizer keeps in float), so the exported graph
needs no pre-processing on the board. All models are FX-traceable and quantizable: residual sums
written as ``out + identity`` (FX turns them into quantized adds), no data-dependent control flow.
MobileNetV2 keeps its ReLU6: ``edge_qmul.quant`` folds each ReLU6 into the int8 output range of the
conv before it, so it runs in int8 like a ReLU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from edge_qmul.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """What a checkpoint needs to rebuild its model."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...] = field(default=(0.0,))
    std: tuple[float, ...] = field(default=(1.0,))
    width: int = 32
    # The trainable head's module name ("" = the last nn.Linear); for user models, as named in their module.
    head: str = ""
    # User models (``FILE.py:FACTORY``): sha256 of FILE.py when the model was built, so a changed file is
    # refused instead of silently building another network.
    source_sha256: str = ""
    # mobilenetv2 only: scales every layer's channels (0.35, 0.5, 0.75, 1.0, 1.4); other models scale with width
    width_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in MODELS and not is_user_spec(self.name):
            raise ConfigError(
                f"unknown model {self.name!r}",
                f"choose one of: {', '.join(sorted(MODELS))}, or FILE.py:FACTORY / package.module:FACTORY",
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ConfigError(
                f"normalisation has {len(self.mean)} means / {len(self.std)} stds for "
                f"{self.in_channels} channels",
                "give one mean and one std per input channel",
            )
        if self.width < 4:
            raise ConfigError(f"model width {self.width} is too small", "use width >= 4")
        if not self.width_multiplier > 0:
            raise ConfigError(
                f"width_multiplier={self.width_multiplier} must be > 0", "use e.g. 0.35, 0.5, 0.75 or 1.0"
            )
        if self.name == "mobilenetv2" and self.width != DEFAULT_WIDTH["mobilenetv2"]:
            raise ConfigError(
                f"mobilenetv2 is scaled by width_multiplier, not by width={self.width}",
                f"leave width at {DEFAULT_WIDTH['mobilenetv2']} and set width_multiplier (e.g. 0.35)",
            )
        if self.name != "mobilenetv2" and self.width_multiplier != 1.0:
            raise ConfigError(
                f"width_multiplier={self.width_multiplier} applies only to mobilenetv2, not {self.name}",
                f"scale {self.name} with width (its default is {DEFAULT_WIDTH.get(self.name)})",
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        # dicts written before width_multiplier existed load with its default (1.0)
        # dicts written before ``head`` existed name the head their model always had
        d = {"head": DEFAULT_HEAD.get(d["name"], ""), **d}
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def is_user_spec(name: str) -> bool:
    """``FILE.py:FACTORY`` or ``package.module:FACTORY``: a model the user brings (``edge_qmul.usermodel``)."""
    return ":" in name


class Normalize(nn.Module):
    """(x - mean) / std with per-channel constants; kept in float by the quantizer."""

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=False),
    )


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers; 8x8 (digits) and 28x28 (MNIST-style) inputs."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w = cfg.width
        self.normalize = Normalize(cfg.mean, cfg.std)
        self.features = nn.Sequential(
            conv_bn_relu(cfg.in_channels, w),
            nn.MaxPool2d(2),  # H/2
            conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),  # H/4
        )
        side = cfg.image_size // 4
        self.fc1 = nn.Linear(2 * w * side * side, 4 * w)
        self.relu = nn.ReLU(inplace=False)
        self.fc2 = nn.Linear(4 * w, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))  # (N, 2w, H/4, W/4)
        x = torch.flatten(x, 1)
        return self.fc2(self.relu(self.fc1(x)))  # (N, classes)


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is a 1x1 conv + BN when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs.

    ``stage_blocks=(2, 2, 2, 2)`` with widths 64..512 is ResNet-18 (CIFAR stem: 3x3 conv, no max-pool);
    ``(1, 1, 1)`` / ``(3, 3, 3)`` with widths 16, 32, 64 are He et al.'s ResNet-8 / ResNet-20.

    ``resnet8`` at its default width 16 is the MLPerf Tiny image-classification ResNet-8. What matches:
    a 3x3 conv-16 stem with BN + ReLU; three stacks of one basic block each with 16 / 32 / 64 channels
    and strides 1 / 2 / 2; a 1x1 strided conv on the shortcut of stacks 2 and 3 (identity on stack 1);
    residual add then ReLU; global average pooling (8x8 -> 1x1); one dense layer. The conv and dense
    weights are the same tensors (77,360 weights for 10 classes). What differs: (1) our 1x1 shortcut
    convs are followed by a BatchNorm (MLPerf's have a bias and no BN); a 1x1 conv + BN folds into a
    1x1 conv with a bias, so after BN folding the int8 graphs are identical and only training dynamics
    differ; (2) our convs before a BN carry no bias (MLPerf's Keras convs do, and BN makes them
    redundant); (3) the output is logits (MLPerf ends in a softmax); (4) training recipe (He-normal
    init, L2 1e-4) is the trainer's business, not the model's.
    """

    def __init__(self, cfg: ModelConfig, stage_blocks: tuple[int, ...], widths: tuple[int, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(cfg.mean, cfg.std)
        self.stem = conv_bn_relu(cfg.in_channels, widths[0])
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, (n, cout) in enumerate(zip(stage_blocks, widths, strict=True)):
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(self.normalize(x)))  # (N, C_last, H', W')
        return self.fc(torch.flatten(self.pool(x), 1))  # (N, classes)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10% (as MobileNet does)."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=False),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear projection (no activation);
    the input is added back when the block keeps the shape."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_relu6(cin, hidden, 1))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return out + x if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with a float width multiplier.

    Inputs of 64x64 and larger (e.g. 96x96, the MLPerf Tiny visual-wake-words size) use the ImageNet
    strides: stride-2 stem and four more stride-2 stages (96 -> 3x3 before pooling). Smaller inputs
    (32x32 CIFAR, 28x28) use CIFAR strides: stride-1 stem and a stride-1 second stage (32 -> 4x4).
    Channels are ``make_divisible(c * width_multiplier, 8)``; the last 1x1 conv has 1280 channels,
    scaled only when the multiplier is above 1. The classifier is one ``nn.Linear`` named
    ``classifier`` after global average pooling (no dropout, so the int8 head sees exactly the pooled
    features).
    """

    # expansion t, channels c, repeats n, stride s of the first block (ImageNet strides)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        alpha = cfg.width_multiplier
        cifar = cfg.image_size < 64
        self.normalize = Normalize(cfg.mean, cfg.std)
        cin = make_divisible(32 * alpha)
        layers: list[nn.Module] = [conv_bn_relu6(cfg.in_channels, cin, 3, stride=1 if cifar else 2)]
        for i, (t, c, n, s) in enumerate(self.SETTINGS):
            cout = make_divisible(c * alpha)
            stride = 1 if (cifar and i == 1) else s
            for j in range(n):
                layers.append(InvertedResidual(cin, cout, stride if j == 0 else 1, t))
                cin = cout
        self.last_channels = make_divisible(1280 * max(1.0, alpha))
        layers.append(conv_bn_relu6(cin, self.last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.last_channels, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))  # (N, last_channels, H/8 or H/32, ...)
        return self.classifier(torch.flatten(self.pool(x), 1))  # (N, classes)


def _mobilenetv2(cfg: ModelConfig) -> nn.Module:
    if cfg.image_size < 8:
        raise ConfigError(
            f"mobilenetv2 needs inputs of at least 8x8, got {cfg.image_size}", "use small_cnn for 8x8 digits"
        )
    return MobileNetV2(cfg)


def _small_cnn(cfg: ModelConfig) -> nn.Module:
    if cfg.image_size % 4:
        raise ConfigError(
            f"small_cnn needs an image size divisible by 4, got {cfg.image_size}",
            "use 8x8 or 28x28 inputs, or a CIFAR ResNet for 32x32",
        )
    return SmallCNN(cfg)


def _resnet(stage_blocks: tuple[int, ...], base: tuple[int, ...]) -> Any:
    def build(cfg: ModelConfig) -> nn.Module:
        # width scales the stage widths relative to the canonical width of the first stage
        scale = cfg.width / base[0]
        return CifarResNet(cfg, stage_blocks, tuple(max(4, round(w * scale)) for w in base))

    return build


MODELS = {
    "small_cnn": _small_cnn,
    "resnet18": _resnet((2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet20": _resnet((3, 3, 3), (16, 32, 64)),
    "resnet8": _resnet((1, 1, 1), (16, 32, 64)),
    "mobilenetv2": _mobilenetv2,
}

# mobilenetv2's entry is its stem width at width_multiplier 1.0; it is scaled by width_multiplier only
DEFAULT_WIDTH = {"small_cnn": 16, "resnet18": 64, "resnet20": 16, "resnet8": 16, "mobilenetv2": 32}
# The trainable head of a built-in model when it is not the last Linear: small_cnn's classifier is its
# two-layer MLP (fc1 -> ReLU -> fc2), the head every committed small_cnn result was measured with.
DEFAULT_HEAD = {"small_cnn": "fc1"}


def build_model(cfg: ModelConfig) -> nn.Module:
    if is_user_spec(cfg.name):
        from edge_qmul.usermodel import build_user_model

        return build_user_model(cfg)
    return MODELS[cfg.name](cfg)
