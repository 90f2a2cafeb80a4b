"""A tiny 3D residual CNN with BatchNorm, and the leaps adapter that exposes it.

The network is this plugin's own (no model library needed), small enough to invert on a CPU:
a strided stem, then ``depth`` residual blocks that double the width and halve the spatial
size after the first, global average pooling and a linear classifier.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from leaps.adapter import Adapter, InputSpec, Tap


def _conv_bn(c_in: int, c_out: int, stride: tuple[int, int, int]) -> list[nn.Module]:
    return [nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm3d(c_out)]


class ResBlock3d(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected, when the shape changes) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, c_out, stride), nn.ReLU(),
                                  *_conv_bn(c_out, c_out, (1, 1, 1)))
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out or stride != (1, 1, 1):
            self.shortcut = nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm3d(c_out))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class Tiny3D(nn.Module):
    """``[B, 3, T, H, W]`` (normalised) -> logits ``[B, num_classes]``."""

    def __init__(self, num_classes: int, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, width, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2), bias=False),
            nn.BatchNorm3d(width), nn.ReLU())
        blocks = []
        channels = width
        for i in range(depth):
            out = width * 2 ** i
            blocks.append(ResBlock3d(channels, out, (1, 1, 1) if i == 0 else (1, 2, 2)))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


class Tiny3DAdapter(Adapter):
    """``example.tiny3d``: the stem and every residual block are taps; everything else (forward,
    BatchNorm layers, Grad-CAM layer, checkpoints as plain state dicts) is the default."""

    name = "example.tiny3d"

    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        return Tiny3D(num_classes, **arch)

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        return [Tap("stem", net.stem)] + [Tap(f"blocks.{i}", block)
                                          for i, block in enumerate(net.blocks)]
