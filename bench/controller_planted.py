"""Which controller settings learn? A planted reward with a known optimum (search/planted.py).

R = Binomial(128, 0.6 + b + Δ·g)/128 with g = layers of the tiny space (4) that chose their planted
op and b ~ N(0, 0.05) a minibatch difficulty shared by the architectures scored on it — a supernet
reward's two noises. Each setting trains a fresh controller for the paper's 5000 scored
architectures (the real loop, `search.enas.train_controller`), 3 seeds; reported: the mean g of 200
architectures from the final policy (uniform: 0.2, optimum: 4) and the argmax architecture's g.

    python bench/controller_planted.py [--steps 5000 --seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import emit

from mnet.arch import PRESETS
from mnet.search.controller import ControllerConfig, Reinforce
from mnet.search.enas import SearchConfig, train_controller
from mnet.search.planted import PlantedEvaluator

PLANTED = (3, 11, 7, 16)
DEFAULT = ControllerConfig()
# name → (ControllerConfig overrides, architectures per update)
SETTINGS = {
    "paper (1 per update, moving average, lr 0.1)": ({"lr": 0.1, "baseline": "ema"}, 1),
    "previous default (1 per update, moving average, lr 1e-3)": ({"lr": 1e-3, "baseline": "ema"}, 1),
    "default": ({}, SearchConfig().controller_batch),
    "beta1 0 (ENAS)": ({"adam_beta1": 0.0}, SearchConfig().controller_batch),
    "lr 0.01": ({"lr": 0.01}, SearchConfig().controller_batch),
    "lr 0.1": ({"lr": 0.1}, SearchConfig().controller_batch),
    "2 per update": ({}, 2),
    "10 per update": ({}, 10),
    "moving average instead of leave-one-out": ({"baseline": "ema"}, SearchConfig().controller_batch),
}


def run(overrides: dict, batch: int, steps: int, seed: int, delta: float) -> tuple[float, float]:
    space = PRESETS["tiny"]
    agent = Reinforce(space, ControllerConfig(**{**DEFAULT.__dict__, "steps": steps, **overrides}), seed)
    ev = PlantedEvaluator(space, PLANTED, delta=delta)
    train_controller(agent, ev, steps, batch=batch)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        arch, _ = agent.controller.argmax()
        mean_g = statistics.mean(ev.g(agent.controller.sample(gen)[0]) for _ in range(200))
    return mean_g, ev.g(arch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--delta", type=float, default=0.03)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    rows = {}
    for name, (overrides, batch) in SETTINGS.items():
        runs = [run(overrides, batch, args.steps, seed, args.delta) for seed in range(args.seeds)]
        mean_g = [r[0] for r in runs]
        rows[name] = {"overrides": overrides, "per_update": batch, "mean_g": mean_g,
                      "mean_g_mean": statistics.mean(mean_g), "mean_g_std": statistics.pstdev(mean_g),
                      "argmax_g": [r[1] for r in runs]}
    emit("controller_planted", {"steps": args.steps, "seeds": args.seeds, "delta": args.delta,
                                "planted": list(PLANTED), "uniform_g": 4 / 20, "optimum_g": 4,
                                "default": {**DEFAULT.__dict__, "per_update": SearchConfig().controller_batch},
                                "settings": rows, "seconds": time.time() - t0})


if __name__ == "__main__":
    main()
