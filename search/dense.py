"""Exact faster depthwise convolution for small feature maps: one dense matrix per channel.

At a 6×8 map a (cropped) 11×15 depthwise kernel costs 48·165 multiply-adds per channel and image
through a conv kernel that is poorly vectorised for large kernels; written as a 48×48 matrix
(a Toeplitz-like gather of the same weights) it is 48² multiply-adds in one batched matmul — the
same sums in another order, so the result equals `F.conv2d` up to float rounding, and gradients flow
to the same weight tensor. Which implementation a layer uses is decided in one place,
`select_depthwise`, by timing both; export always uses the conv (`use_conv`).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["dense_index", "dense_depthwise", "select_depthwise", "use_conv", "MAX_DENSE_ELEMENTS"]

# Largest C·(HW)² matrix we are willing to materialise (floats): 64 M ≈ 256 MB.
MAX_DENSE_ELEMENTS = 64 * 1024 * 1024

_INDEX_CACHE: dict[tuple, torch.Tensor] = {}
_CHOICE_CACHE: dict[tuple, bool] = {}  # a process measures each layer shape once


def dense_index(kh: int, kw: int, dilation: int, h: int, w: int, device) -> torch.Tensor:
    """I[p, q] = flat kernel tap linking output p to input q, or kh·kw (a zero slot) when none."""
    key = (kh, kw, dilation, h, w, str(device))
    if key not in _INDEX_CACHE:
        py, px = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        py, px = py.reshape(-1), px.reshape(-1)
        dy = py[None, :] - py[:, None]  # input row - output row, (HW_out, HW_in)
        dx = px[None, :] - px[:, None]
        ty, tx = dy // dilation + kh // 2, dx // dilation + kw // 2
        ok = (dy % dilation == 0) & (dx % dilation == 0) & (ty >= 0) & (ty < kh) & (tx >= 0) & (tx < kw)
        _INDEX_CACHE[key] = torch.where(ok, ty * kw + tx, torch.full_like(ty, kh * kw)).to(device)
    return _INDEX_CACHE[key]


def dense_depthwise(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """Same as F.conv2d(x, weight, padding='same'-style, dilation, groups=C) for odd kernels."""
    n, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    idx = dense_index(kh, kw, dilation, h, w, x.device)
    flat = torch.cat([weight.reshape(c, kh * kw), weight.new_zeros(c, 1)], 1)
    mat = flat[:, idx]  # (C, HW_out, HW_in)
    y = torch.bmm(x.reshape(n, c, h * w).transpose(0, 1), mat.transpose(1, 2))  # (C, N, HW_out)
    return y.transpose(0, 1).reshape(n, c, h, w)


def _conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return F.conv2d(x, conv.weight, None, 1, conv.padding, conv.dilation, conv.groups)


def use_conv(model: nn.Module) -> nn.Module:
    """Reset every SepConv to the plain conv (what ONNX export and TensorRT see)."""
    from mnet.search.ops import SepConv

    for m in model.modules():
        if isinstance(m, SepConv):
            m.dense = False
    return model


def _time(fn, reps: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def select_depthwise(model: nn.Module, feature_hw: dict[nn.Module, tuple[int, int]] | None = None,
                     batch: int = 128, backward: bool = True) -> dict[str, int]:
    """Time conv vs dense forward(+backward) for each distinct (C, kernel, dilation, h, w) in `model` and
    switch each SepConv to the faster one. Returns how many layers chose each implementation."""
    from mnet.search.ops import SepConv

    choice = _CHOICE_CACHE
    counts = {"conv": 0, "dense": 0}
    device = next(model.parameters()).device
    # A capped timing batch keeps this cheap (the slow form of a 39×39 kernel at 24×32 takes seconds per
    # call at batch 128 on a CPU). Not lower: the dense form pays a per-step gather of its matrix that a
    # small batch over-weights (timing at 8 picked conv where dense is 2× faster at 32).
    batch = min(batch, 32)
    for m in model.modules():
        if not isinstance(m, SepConv):
            continue
        c = m.dw.weight.shape[0]
        h, w = m.hw
        key = (str(device), batch, backward, c, tuple(m.dw.weight.shape[-2:]), m.dilation, h, w)
        if key not in choice:
            if c * (h * w) ** 2 > MAX_DENSE_ELEMENTS:
                choice[key] = False
            else:
                x = torch.randn(batch, c, h, w, device=device, requires_grad=backward)
                wt = m.dw.weight.detach().clone().requires_grad_(backward)

                def run(dense: bool):
                    y = dense_depthwise(x, wt, m.dilation) if dense else F.conv2d(
                        x, wt, None, 1, m.dw.padding, m.dw.dilation, c)
                    if backward:
                        y.sum().backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize()

                choice[key] = _time(lambda: run(True)) < _time(lambda: run(False))
        m.dense = choice[key]
        counts["dense" if m.dense else "conv"] += 1
    return counts
