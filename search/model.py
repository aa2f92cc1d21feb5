"""The standalone MNet: one builder from an `Arch` (DESIGN "Search space")."""

from __future__ import annotations

import torch
from torch import nn

from mnet.arch import Arch
from mnet.search.ops import Head, SepConv, Stem, forward_arch

__all__ = ["MNet"]


class MNet(nn.Module):
    """stem → L depthwise-separable layers with skips and reductions → GAP → dropout → linear."""

    def __init__(self, arch: Arch, dropout: float = 0.0):
        super().__init__()
        self.arch = arch
        self.stem = Stem(arch.width, arch.stem_stride)
        self.cells = nn.ModuleList(
            SepConv(arch.width, layer.kernel, layer.dilation, arch.node_hw(i))
            for i, layer in enumerate(arch.layers, start=1)
        )
        self.head = Head(arch.width, arch.num_classes, dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (pooled), used by the fusion baselines."""
        return self.head.features(forward_arch(x, self.arch, self.stem, self.cells))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(forward_arch(x, self.arch, self.stem, self.cells))
