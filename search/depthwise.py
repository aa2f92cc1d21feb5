"""Which exact depthwise implementation each SepConv runs: one name per op, chosen by timing.

Three implementations compute the same function (equal up to float rounding, gradients included):

- ``conv``  — `F.conv2d` through the layer's `nn.Conv2d` (PyTorch CPU kernels, cuDNN). What ONNX
  export and TensorRT see (`use_conv`), and the only one that is ever exported.
- ``dense`` — one dense matrix per channel (`search.dense`): best on small maps (6×8, 12×16).
- ``fft``   — FFT convolution (`search.fft`): cost independent of the kernel, best for large kernels
  on larger maps.

Which is fastest depends on the layer's shape, the device and the dtype, so `select_depthwise` times
forward + backward of each for every distinct (channels, kernel, dilation, h, w, device, dtype) of a
model and sets `SepConv.impl` to the fastest. The choice is state, not a setting: it changes the
float rounding, so a resumed run must compute with the choices it started with. It is saved in
checkpoints (`depthwise_impls` → ``"depthwise"``, restored by `restore_depthwise`, which also reads
the bool ``"dense"`` lists older checkpoints hold), broadcast from rank 0 under torchrun, and
copied to the standalone child of a supernet path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from mnet.search.dense import MAX_DENSE_ELEMENTS, dense_depthwise
from mnet.search.fft import autocast_dtype, fft_depthwise
from torch import nn

from mnet.errors import CheckpointError, ConfigError

__all__ = ["IMPLS", "depthwise", "use_conv", "depthwise_impls", "set_depthwise_impls", "restore_depthwise",
           "select_depthwise"]

IMPLS = ("conv", "dense", "fft")

# a process measures each layer shape once: key → (chosen name, {name: seconds})
_CHOICE_CACHE: dict[tuple, tuple[str, dict[str, float]]] = {}


def depthwise(x: torch.Tensor, conv: nn.Conv2d, impl: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """`conv(x)` (a depthwise, 'same'-padded nn.Conv2d) computed by implementation `impl`; with `weight`
    (e.g. the centre of a larger kernel, search.supernet's entangled ops) that kernel replaces conv's."""
    if weight is not None and impl == "conv":
        kh, kw = weight.shape[-2:]
        d = conv.dilation[0]
        return F.conv2d(x, weight, padding=(d * (kh // 2), d * (kw // 2)), dilation=d, groups=weight.shape[0])
    weight = conv.weight if weight is None else weight
    if impl == "conv":
        return conv(x)
    if impl == "dense":
        return dense_depthwise(x, weight, conv.dilation[0])
    if impl == "fft":
        return fft_depthwise(x, weight, conv.dilation[0])
    raise ConfigError(f"depthwise implementation {impl!r}: expected one of {', '.join(IMPLS)}")


def _sepconvs(model: nn.Module) -> list[nn.Module]:
    from mnet.search.ops import SepConv  # ops imports this module

    return [m for m in model.modules() if isinstance(m, SepConv)]


def use_conv(model: nn.Module) -> nn.Module:
    """Reset every SepConv to the plain conv (what ONNX export and TensorRT see)."""
    for m in _sepconvs(model):
        m.impl = "conv"
    return model


def depthwise_impls(model: nn.Module) -> list[str]:
    """The implementation of each SepConv of `model`, in `model.modules()` order (checkpointed)."""
    return [m.impl for m in _sepconvs(model)]


def set_depthwise_impls(model: nn.Module, impls: Sequence[str | bool]) -> None:
    """Put back `depthwise_impls`. Bools are the older form (True = dense, False = conv)."""
    cells = _sepconvs(model)
    if len(cells) != len(impls):
        raise CheckpointError(f"{len(impls)} saved depthwise choices for {len(cells)} ops: not this network")
    names = [("dense" if v else "conv") if isinstance(v, bool) else v for v in impls]
    bad = sorted({str(v) for v in names if v not in IMPLS})
    if bad:
        raise CheckpointError(f"unknown depthwise implementation(s) {', '.join(bad)} in the checkpoint "
                              f"(this mnet knows {', '.join(IMPLS)}); upgrade mnet to load it")
    for m, name in zip(cells, names):
        m.impl = name


def restore_depthwise(model: nn.Module, raw: dict[str, Any]) -> None:
    """Set the implementations a checkpoint dict saved, in any form mnet has written.

    ``"depthwise"``: names, one per SepConv. Older checkpoints have ``"dense"``: bools, one per SepConv
    (supernet) or one per module of `model.modules()` (training; False for everything but SepConvs).
    Without either the ops keep their current implementation.
    """
    if raw.get("depthwise") is not None:
        set_depthwise_impls(model, raw["depthwise"])
        return
    flags = raw.get("dense")
    if not flags:
        return
    modules = list(model.modules())
    if len(flags) == len(modules) != len(_sepconvs(model)):
        from mnet.search.ops import SepConv

        flags = [bool(f) for m, f in zip(modules, flags) if isinstance(m, SepConv)]
    set_depthwise_impls(model, [bool(f) for f in flags])


def _candidates(c: int, h: int, w: int) -> tuple[str, ...]:
    # the dense form materialises a C·(hw)² matrix: past the cap it is out of the question
    return IMPLS if c * (h * w) ** 2 <= MAX_DENSE_ELEMENTS else ("conv", "fft")


def _time_impls(runs: dict[str, Any], reps: int = 3) -> dict[str, float]:
    """Best-of-`reps` seconds of each callable, interleaved so that drift of a busy machine hits all
    alike; the minimum because interference only ever adds time."""
    for fn in runs.values():  # warm-up: allocations, cuDNN algorithm choice, FFT plans
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def select_depthwise(model: nn.Module, batch: int = 128, backward: bool = True, amp: bool = False,
                     timings: dict[tuple, dict[str, float]] | None = None) -> dict[str, int]:
    """Time each implementation for every distinct layer shape of `model` and switch each SepConv to
    the fastest. `amp`: time under the autocast the run trains with (`search.train.autocast`).
    Returns how many SepConvs chose each implementation; `timings`, when given, receives
    {(channels, (kh, kw), dilation, h, w): {impl: seconds}} for the shapes of `model`."""
    from mnet.search.train import autocast  # train imports this module

    counts = dict.fromkeys(IMPLS, 0)
    device = next(model.parameters()).device
    # A capped timing batch keeps this cheap (the slow form of a 39×39 kernel at 24×32 takes seconds per
    # call at batch 128 on a CPU). Not lower: the dense form pays a per-step gather of its matrix that a
    # small batch over-weights (timing at 8 picked conv where dense is 2× faster at 32).
    batch = min(batch, 32)
    with autocast(device, amp):  # the dtype the convs will compute in
        amp_dtype = autocast_dtype(device.type)
    # the layout the run computes in: `search.batches.fast_path` puts every CUDA run in channels_last,
    # and cuDNN's depthwise kernels are not equally fast in both layouts
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for m in _sepconvs(model):
        weight = m.dw.weight
        c, (kh, kw), (h, w) = weight.shape[0], weight.shape[-2:], m.hw
        shape = (c, (kh, kw), m.dilation, h, w)
        key = (str(device), str(amp_dtype or weight.dtype), batch, backward, *shape)
        if key not in _CHOICE_CACHE:
            x = torch.randn(batch, c, h, w, device=device, dtype=weight.dtype).to(memory_format=layout)
            x.requires_grad_(backward)
            conv = nn.Conv2d(c, c, (kh, kw), padding=m.dw.padding, dilation=m.dilation, groups=c,
                             bias=False, device=device, dtype=weight.dtype).to(memory_format=layout)
            with torch.no_grad():
                conv.weight.copy_(weight)

            def run(impl: str, x=x, conv=conv) -> None:
                with autocast(device, amp):
                    y = depthwise(x, conv, impl)
                if backward:
                    y.float().sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            seconds = _time_impls({impl: (lambda impl=impl: run(impl)) for impl in _candidates(c, h, w)})
            _CHOICE_CACHE[key] = (min(seconds, key=seconds.get), seconds)
        m.impl, seconds = _CHOICE_CACHE[key]
        counts[m.impl] += 1
        if timings is not None:
            timings[shape] = seconds
    return counts
