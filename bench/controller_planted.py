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
# name → (what it is, ControllerConfig overrides, architectures per update)
_B = SearchConfig().controller_batch
SETTINGS = {
    "paper": ("1 per update, moving-average baseline, lr 0.1 (Table 1)", {"lr": 0.1, "baseline": "ema"}, 1),
    "previous_default": ("1 per update, moving-average baseline, lr 1e-3", {"lr": 1e-3, "baseline": "ema"}, 1),
    "default": (f"{_B} per update on one minibatch, leave-one-out, the ControllerConfig defaults", {}, _B),
    "beta1_0": ("the default with ENAS's Adam beta1 = 0", {"adam_beta1": 0.0}, _B),
    "lr_1e-2": ("the default at lr 0.01", {"lr": 0.01}, _B),
    "lr_1e-1": ("the default at lr 0.1", {"lr": 0.1}, _B),
    "batch_2": ("the default with 2 per update", {}, 2),
    "batch_10": ("the default with 10 per update", {}, 10),
    "moving_average": ("the default with the moving-average baseline instead of leave-one-out",
                       {"baseline": "ema"}, _B),
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
    for name, (what, overrides, batch) in SETTINGS.items():
        runs = [run(overrides, batch, args.steps, seed, args.delta) for seed in range(args.seeds)]
        mean_g = [r[0] for r in runs]
        rows[name] = {"what": what, "overrides": overrides, "per_update": batch, "mean_g": mean_g,
                      "mean_g_mean": statistics.mean(mean_g), "mean_g_std": statistics.pstdev(mean_g),
                      "argmax_g": [r[1] for r in runs]}
    emit("controller_planted", {"steps": args.steps, "seeds": args.seeds, "delta": args.delta,
                                "planted": list(PLANTED), "uniform_g": 4 / 20, "optimum_g": 4,
                                "default": {**DEFAULT.__dict__, "per_update": _B},
                                "settings": rows, "seconds": time.time() - t0})


if __name__ == "__main__":
    main()
