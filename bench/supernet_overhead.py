"""Weight-sharing overhead: a supernet training step ÷ the standalone child's step, same architecture.

Both steps are what the loops run (`search.enas.supernet_step` on the supernet with its SGD over all
L×|ops| cells; forward + backward + SGD of `Supernet.child(arch)`, which holds copies of the same
weights and the same depthwise implementations), at mnet-24-32 geometry with a narrower width. They
are interleaved arch by arch and rep by rep, so drift of the machine hits both alike; the result is
the ratio of the summed medians over a few random architectures (target ≤ 1.10).

    python bench/supernet_overhead.py [--width 32] [--batch 32] [--archs 4] [--reps 5]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F
from _common import emit
from mnet.search.depthwise import select_depthwise
from mnet.search.enas import supernet_step
from mnet.search.supernet import Supernet

from mnet.arch import PRESETS, SearchSpace


def _child_step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _median(ts: list[float]) -> float:
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--archs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    p = PRESETS["mnet-24-32"]
    space = SearchSpace(p.name, p.num_layers, args.width, p.input_hw, p.stem_stride)
    supernet = Supernet(space)
    counts = select_depthwise(supernet, batch=args.batch)  # the children copy these choices
    sgd = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
    sopt = torch.optim.SGD(supernet.parameters(), **sgd)
    x = torch.randn(args.batch, 3, *space.input_hw)
    y = torch.randint(0, 3, (args.batch,))
    rng = random.Random(0)
    rows = []
    for i in range(args.archs):
        arch = space.sample(rng)
        child = supernet.child(arch).train()
        copt = torch.optim.SGD(child.parameters(), **sgd)
        supernet.train()
        t_super, t_child = [], []
        for rep in range(args.reps + 1):  # rep 0 warms both up
            t0 = time.perf_counter()
            supernet_step(supernet, sopt, x, y, arch)
            t1 = time.perf_counter()
            _child_step(child, copt, x, y)
            t2 = time.perf_counter()
            if rep:
                t_super.append(t1 - t0)
                t_child.append(t2 - t1)
        rows.append({"arch": i, "supernet_s": _median(t_super), "child_s": _median(t_child)})
    tot_s, tot_c = sum(r["supernet_s"] for r in rows), sum(r["child_s"] for r in rows)
    emit("supernet_overhead", {
        "geometry": f"mnet-24-32 layers/input, width {args.width}, batch {args.batch}, {args.archs} random archs",
        "threads": torch.get_num_threads(),
        "supernet_params": sum(p.numel() for p in supernet.parameters()),
        "depthwise_ops": counts,  # how many of the supernet's ops run conv / dense / fft
        "overhead": tot_s / tot_c,
        "target": 1.10,
        "per_arch": rows,
    })


if __name__ == "__main__":
    main()
