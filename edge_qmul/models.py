"""Models: a small CNN for 8x8 / 28x28 inputs and CIFAR ResNets for 32x32.

Every model takes pixels in [0, 1] (N, C, H, W) and applies the dataset normalisation itself, so the
exported graph needs no pre-processing on the board. All models are FX-traceable and quantizable:
ReLU (not ReLU6), residual sums written as ``out + identity`` (FX turns them into quantized adds),
no data-dependent control flow.
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

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ConfigError(
                f"unknown model {self.name!r}", f"choose one of: {', '.join(sorted(MODELS))}"
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ConfigError(
                f"normalisation has {len(self.mean)} means / {len(self.std)} stds for "
                f"{self.in_channels} channels",
                "give one mean and one std per input channel",
            )
        if self.width < 4:
            raise ConfigError(f"model width {self.width} is too small", "use width >= 4")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


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
}

DEFAULT_WIDTH = {"small_cnn": 16, "resnet18": 64, "resnet20": 16, "resnet8": 16}


def build_model(cfg: ModelConfig) -> nn.Module:
    return MODELS[cfg.name](cfg)
