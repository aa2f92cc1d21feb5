"""Exact depthwise convolution through the FFT: the cost no longer grows with the kernel.

A depthwise kh×kw conv costs h·w·kh·kw multiply-adds per channel and image, and the conv kernels of
PyTorch (CPU) and cuDNN are poorly tuned for kernels this large. Through the FFT it costs a few
transforms of an H×W grid, O(H·W·log(H·W)), whatever the kernel: the same sums computed another
way, so the result equals `F.conv2d` up to float rounding (relative error ~1e-6 in float32), and
gradients (input and weight) flow through `torch.fft`'s exact adjoints to the same weight tensor.

Circular convolution on an H×W grid equals the zero-padded ('same') convolution on the h×w outputs
when the grid leaves room for the kernel's reach r = dilation·(k//2) on one side: H ≥ h + r. Proof
sketch: output i reads inputs i + o with |o| ≤ r; on the grid, the input index wraps to i + o ± H,
and for 0 ≤ i < h either i + o is a real input or it lands in the H - h ≥ r zero rows. Kernels are
normally already cropped to the map (`mnet.arch.cropped_kernel`, r ≤ h - 1); uncropped ones are
exact too (taps that would wrap onto each other are summed, and they only ever read zeros).

Which layers use this form is decided by timing, in one place (`search.depthwise.select_depthwise`);
export always uses the plain conv.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["fast_len", "fft_size", "fft_depthwise", "autocast_dtype"]

# FFT lengths whose prime factors are all ≤ 7 have fast paths in both pocketfft (CPU) and cuFFT.
_RADICES = (2, 3, 5, 7)

_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def fast_len(n: int, even: bool = False) -> int:
    """The smallest m ≥ n with no prime factor above 7 (and even, when asked)."""
    m = max(1, n)
    while True:
        if even and m % 2:
            m += 1
            continue
        r = m
        for p in _RADICES:
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


@functools.lru_cache(maxsize=None)  # called on every forward; a handful of distinct shapes per network
def fft_size(kh: int, kw: int, dilation: int, h: int, w: int) -> tuple[int, int]:
    """FFT grid (H, W) on which circular convolution is exact for an h×w map (module docstring).

    W is the half-spectrum (rfft) axis: an odd length there measured 1.5-2× slower per point on this
    CPU (pocketfft: 48×63 took 2× the time of 48×64), so it is rounded up to an even length too."""
    return fast_len(h + dilation * (kh // 2)), fast_len(w + dilation * (kw // 2), even=True)


def _tap_index(kh: int, kw: int, dilation: int, size: tuple[int, int], device) -> torch.Tensor:
    """Flat grid position of each tap of the convolution (not correlation) kernel, centred at 0.

    y[i] = Σ_a w[a]·x[i + o_a] (o_a = dilation·(a - k//2)) is the circular convolution of x with g
    where g[-o_a mod H] = w[a]: the kernel flipped and dilated, wrapped around the origin.
    """
    key = (kh, kw, dilation, size, str(device))
    if key not in _INDEX_CACHE:
        big_h, big_w = size
        iy = (-dilation * (torch.arange(kh) - kh // 2)) % big_h
        ix = (-dilation * (torch.arange(kw) - kw // 2)) % big_w
        _INDEX_CACHE[key] = (iy[:, None] * big_w + ix[None, :]).reshape(-1).to(device)
    return _INDEX_CACHE[key]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on `device_type` right now, or None when it is off."""
    if hasattr(torch, "get_autocast_dtype"):  # torch ≥ 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":  # the older per-device calls (pyproject allows torch 2.1)
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def fft_depthwise(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """Same as F.conv2d(x, weight, padding='same'-style, dilation, groups=C) for odd kernels.

    Under autocast the transforms run in float32 (cuFFT's half precision needs power-of-2 sizes and
    loses accuracy with length) and the result comes back in the autocast dtype, as the conv's would.
    """
    c, h, w = x.shape[-3:]
    kh, kw = weight.shape[-2:]
    size = fft_size(kh, kw, dilation, h, w)
    device_type = x.device.type
    if x.dtype == torch.float64:
        compute = out = torch.promote_types(x.dtype, weight.dtype)  # autocast leaves float64 alone
    else:
        compute = torch.float32
        out = autocast_dtype(device_type) or torch.promote_types(x.dtype, weight.dtype)
    idx = _tap_index(kh, kw, dilation, size, x.device)
    big_h, big_w = size
    with torch.autocast(device_type, enabled=False):
        wt = weight.to(compute).reshape(c, kh * kw)
        # index_add sums taps that share a grid cell (only uncropped kernels have such taps)
        g = wt.new_zeros(c, big_h * big_w).index_add(1, idx, wt).view(c, big_h, big_w)
        # rfft2 / irfft2 one axis at a time: the W-axis transforms then run on the h rows that hold data
        # instead of all H (the rest are zero padding on the way in, discarded on the way out); ~20%
        # less time for forward + backward than the 2-D calls on this CPU
        spec = torch.fft.fft(torch.fft.rfft(x.to(compute), n=big_w, dim=-1), n=big_h, dim=-2)
        spec = torch.fft.ifft(spec * torch.fft.rfft2(g), dim=-2)[..., :h, :]
        y = torch.fft.irfft(spec, n=big_w, dim=-1)[..., :w]
    return y.to(out)
