"""Exact CPU speed-ups of the search/train step, measured side by side in one run.

A training step (forward + backward + SGD) of the same architecture at mnet-24-32 geometry (narrower
width, so it fits this CPU) built three ways: naive (full k×k depthwise kernels, as nn.Conv2d would be
written without thinking), cropped (taps that only see padding removed), cropped + dense per-channel
operator where timing picks it. All three compute the same function; ratios are the speed-ups.

    python bench/cpu_speedups.py [--width 32] [--batch 32] [--archs 3]
"""

from __future__ import annotations

import argparse
import random
from unittest import mock

import torch
import torch.nn.functional as F

from _common import emit, timeit

from mnet.arch import PRESETS, SearchSpace
from mnet.search import ops
from mnet.search.dense import select_depthwise
from mnet.search.model import MNet


def step_fn(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


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
    rows = []
    for i in range(args.archs):
        arch = space.sample(rng)
        with mock.patch.object(ops, "cropped_kernel", lambda k, d, h, w: (k, k)):
            naive = MNet(arch)
        cropped = MNet(arch)
        dense = MNet(arch)
        counts = select_depthwise(dense, batch=args.batch)
        t_naive = timeit(step_fn(naive, x, y), reps=args.reps)
        t_crop = timeit(step_fn(cropped, x, y), reps=args.reps)
        t_dense = timeit(step_fn(dense, x, y), reps=args.reps)
        rows.append({"arch": i, "naive_s": t_naive, "cropped_s": t_crop, "cropped_dense_s": t_dense,
                     "dense_layers": counts["dense"]})
    tot = {k: sum(r[k] for r in rows) for k in ("naive_s", "cropped_s", "cropped_dense_s")}
    emit("cpu_speedups", {
        "geometry": f"mnet-24-32 layers/input, width {args.width}, batch {args.batch}, {args.archs} random archs",
        "threads": torch.get_num_threads(),
        "crop_speedup": tot["naive_s"] / tot["cropped_s"],
        "crop_dense_speedup": tot["naive_s"] / tot["cropped_dense_s"],
        "dense_over_crop": tot["cropped_s"] / tot["cropped_dense_s"],
        "target_speedup": 3.0,
        "per_arch": rows,
    })


if __name__ == "__main__":
    main()
