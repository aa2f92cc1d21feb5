"""The MNet building blocks and the one forward pass shared by the standalone model and the supernet.

Op = ReLU → depthwise k×k (dilation d, 'same' padding) → BN → pointwise 1×1 → BN  (DESIGN).
The depthwise kernel is built already cropped to the taps that can see the layer's feature map
(`mnet.arch.cropped_kernel`): the output is identical and a 39×39 kernel at 6×8 costs 11×15.
How the depthwise conv is computed (`SepConv.impl`: conv, dense or fft — the same function) is
chosen by timing in `search.depthwise`; export always runs the conv.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mnet.arch import Arch, cropped_kernel
from mnet.search.depthwise import depthwise

__all__ = ["SepConv", "Stem", "Head", "pool_to", "forward_arch"]


class SepConv(nn.Module):
    def __init__(self, channels: int, kernel: int, dilation: int, hw: tuple[int, int]):
        super().__init__()
        kh, kw = cropped_kernel(kernel, dilation, *hw)
        self.kernel, self.dilation, self.hw = kernel, dilation, tuple(hw)
        self.impl = "conv"  # or "dense" / "fft": exact faster forms (search.depthwise), never exported
        self.dw = nn.Conv2d(channels, channels, (kh, kw), padding=(dilation * (kh // 2), dilation * (kw // 2)),
                            dilation=dilation, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pw = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor, kernel_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """`kernel_hw`: run with the centre (kh, kw) of this op's kernel (the supernet's entangled ops)."""
        x = depthwise(F.relu(x), self.dw, self.impl, None if kernel_hw is None else self.centre(kernel_hw))
        return self.bn2(self.pw(self.bn1(x)))

    def centre(self, kernel_hw: tuple[int, int]) -> torch.Tensor:
        """The centre kh×kw taps of the depthwise kernel (a smaller kernel nested in this one)."""
        kh, kw = kernel_hw
        h0, w0 = (self.dw.weight.shape[2] - kh) // 2, (self.dw.weight.shape[3] - kw) // 2
        return self.dw.weight[:, :, h0:h0 + kh, w0:w0 + kw]


class Stem(nn.Module):
    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Head(nn.Module):
    def __init__(self, channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))


def pool_to(x: torch.Tensor, times: int) -> torch.Tensor:
    """Apply the reduction (2×2 average pool) `times` times, exactly as the running tensor gets it."""
    for _ in range(times):
        x = F.avg_pool2d(x, 2)
    return x


def forward_arch(x: torch.Tensor, arch: Arch, stem: nn.Module, cells: Sequence[nn.Module]) -> torch.Tensor:
    """Run stem + layers of `arch`; `cells[i]` is the op module of layer i+1. Returns the last node."""
    nodes = [stem(x)]
    for i, (cell, layer) in enumerate(zip(cells, arch.layers), start=1):
        level = arch.level(i)
        y = cell(pool_to(nodes[-1], level - arch.level(i - 1)))
        if layer.skip is not None:
            y = y + pool_to(nodes[layer.skip], level - arch.level(layer.skip))
        nodes.append(y)
    return nodes[-1]
