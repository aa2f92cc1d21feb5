"""Exact faster depthwise convolution for small feature maps: one dense matrix per channel.

At a 6×8 map a (cropped) 11×15 depthwise kernel costs 48·165 multiply-adds per channel and image
through a conv kernel that is poorly vectorised for large kernels; written as a 48×48 matrix
(a Toeplitz-like gather of the same weights) it is 48² multiply-adds in one batched matmul — the
same sums in another order, so the result equals `F.conv2d` up to float rounding, and gradients flow
to the same weight tensor. Which implementation a layer uses (conv, this, or the FFT form of
`search.fft`) is decided in one place, `search.depthwise.select_depthwise`, by timing them; export
always uses the conv (`search.depthwise.use_conv`).
"""

from __future__ import annotations

import torch

__all__ = ["dense_index", "dense_depthwise", "MAX_DENSE_ELEMENTS"]

# Largest C·(HW)² matrix we are willing to materialise (floats): 64 M ≈ 256 MB.
MAX_DENSE_ELEMENTS = 64 * 1024 * 1024

_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


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

