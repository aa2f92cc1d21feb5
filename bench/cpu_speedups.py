"""Exact CPU speed-ups of the search/train step, measured side by side in one run.

A training step (forward + backward + SGD) of the same architecture at mnet-24-32 geometry (narrower
width, so it fits this CPU) built three ways: naive (full k×k depthwise kernels through nn.Conv2d, as
it would be written without thinking), cropped (taps that only see padding removed), cropped + fast
depthwise (`search.depthwise.select_depthwise`: per layer shape, the fastest of conv / dense / FFT,
timed forward + backward). All three compute the same function; ratios are the speed-ups. The steps
are interleaved rep by rep, so drift of a shared machine hits all three alike.

Also reported: which implementation each layer got, and the per-shape timings the choice was made on
(forward + backward of the depthwise conv alone, at the timing batch).

    python bench/cpu_speedups.py [--width 32] [--batch 32] [--archs 3] [--reps 3]
"""

from __future__ import annotations

import argparse
import random
import time
from unittest import mock

import torch
import torch.nn.functional as F
from _common import emit
from mnet.search import ops
from mnet.search.depthwise import depthwise_impls, select_depthwise
from mnet.search.model import MNet

from mnet.arch import PRESETS, SearchSpace


def step_fn(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _interleaved(steps: dict, reps: int) -> dict[str, float]:
    """Median seconds per step of each callable, after one warm-up, timed in alternation."""
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--archs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    p = PRESETS["mnet-24-32"]
    space = SearchSpace(p.name, p.num_layers, args.width, p.input_hw, p.stem_stride)
    rng = random.Random(0)
    x = torch.randn(args.batch, 3, *space.input_hw)
    y = torch.randint(0, 3, (args.batch,))
    rows, shapes = [], {}
    for i in range(args.archs):
        arch = space.sample(rng)
        with mock.patch.object(ops, "cropped_kernel", lambda k, d, h, w: (k, k)):
            naive = MNet(arch)
        cropped = MNet(arch)
        fast = MNet(arch)
        counts = select_depthwise(fast, batch=args.batch, timings=shapes)
        t = _interleaved({"naive": step_fn(naive, x, y), "cropped": step_fn(cropped, x, y),
                          "fast": step_fn(fast, x, y)}, args.reps)
        layers = [{"kernel": layer.kernel, "dilation": layer.dilation, "hw": list(cell.hw),
                   "cropped": list(cell.dw.kernel_size), "impl": impl}
                  for layer, cell, impl in zip(arch.layers, fast.cells, depthwise_impls(fast))]
        rows.append({"arch": i, "naive_s": t["naive"], "cropped_s": t["cropped"], "cropped_fast_s": t["fast"],
                     "impl_counts": counts, "layers": layers})
    tot = {k: sum(r[k] for r in rows) for k in ("naive_s", "cropped_s", "cropped_fast_s")}
    per_shape = []
    for (c, (kh, kw), d, h, w), seconds in sorted(shapes.items(), key=lambda kv: (-kv[0][3], kv[0][1], kv[0][2])):
        best = min(seconds, key=seconds.get)
        per_shape.append({"hw": [h, w], "cropped": [kh, kw], "dilation": d, "channels": c, "chosen": best,
                          **{f"{impl}_ms": s * 1e3 for impl, s in seconds.items()},
                          "conv_over_chosen": seconds["conv"] / seconds[best]})
    emit("cpu_speedups", {
        "geometry": f"mnet-24-32 layers/input, width {args.width}, batch {args.batch}, {args.archs} random archs",
        "threads": torch.get_num_threads(),
        "crop_speedup": tot["naive_s"] / tot["cropped_s"],
        "crop_fast_speedup": tot["naive_s"] / tot["cropped_fast_s"],
        "fast_over_crop": tot["cropped_s"] / tot["cropped_fast_s"],
        "target_speedup": 3.0,
        "per_arch": rows,
        "depthwise_timing": {"pass": f"forward+backward, batch {min(args.batch, 32)}, best of 3",
                             "shapes": per_shape},
    })


if __name__ == "__main__":
    main()
