"""Deriving the final architecture from a search (paper §3.1 "Deriving Architectures").

- best-of-N (paper): sample N architectures from the policy (or uniformly, for random search), score
  each on one validation minibatch. All N are scored on the *same* minibatch, so the ranking compares
  architectures rather than the luck of their batches (ties: higher log-prob first). Then the best
  `rescore` of them are scored again on the whole reward split and the best of that is kept: with one
  minibatch of 128 images (SE ≈ 0.04) a random search's 5,100 candidates pick whichever fits that
  batch (issue 13). topk.json keeps both scores (`batch_reward`/`batch_accuracy` and the split's).
- argmax: the most probable decision at every step of the controller.

Writes `RUN/arch.json` (exactly `Arch.to_json()`, what `mnet train --arch` reads), `RUN/topk.json`
(best first: arch, reward, accuracy, log_prob, params, MACs and the reward's extras) and
`RUN/derive.json` (how it was derived). Derivation draws from generators seeded from the search seed,
so `mnet derive RUN` repeats the search's own derivation exactly.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mnet.arch import Arch, SearchSpace
from mnet.errors import ConfigError
from mnet.io import write_json
from mnet.search.controller import Controller, stream
from mnet.search.distributed import SINGLE, Dist
from mnet.search.supernet import Evaluator, RewardFn

__all__ = ["Candidate", "best_of_n", "rescore", "derive", "derive_meta", "write_derived", "derive_run", "DERIVE_SEED_OFFSET"]

# Derivation's generators are seeded at seed + offset: independent of the training draws.
DERIVE_SEED_OFFSET = 7919

Propose = Callable[[], "tuple[Arch, Optional[float]]"]
OnSample = Optional[Callable[[int, int], None]]


@dataclass(frozen=True)
class Candidate:
    arch: Arch
    reward: float  # on the whole reward split once re-scored, else on the derivation minibatch
    accuracy: float
    log_prob: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    batch_reward: float | None = None  # the minibatch scores of a re-scored candidate
    batch_accuracy: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch.to_json(), "reward": self.reward, "accuracy": self.accuracy,
                "scored_on": "minibatch" if self.batch_reward is None else "reward split",
                "batch_reward": self.batch_reward if self.batch_reward is not None else self.reward,
                "batch_accuracy": self.batch_accuracy if self.batch_accuracy is not None else self.accuracy,
                "log_prob": self.log_prob, "params": self.arch.num_params(), "macs": self.arch.macs(), **self.extras}


def best_of_n(propose: Propose, evaluator: Evaluator, n: int, batch: tuple[torch.Tensor, torch.Tensor],
              on_sample: OnSample = None, dist: Dist = SINGLE) -> list[Candidate]:
    """Propose `n` architectures, score each on `batch`, return the distinct ones best first.

    Under torchrun every rank draws the same `n` proposals (cheap) and scores every N-th distinct one;
    the candidates are gathered, so every rank returns the same list N× sooner. `on_sample(i, total)`
    counts this rank's scored architectures."""
    proposals: dict[Arch, float | None] = {}  # a repeat has the same score on the same batch: score once
    for _ in range(n):
        arch, log_p = propose()
        proposals.setdefault(arch, log_p)
    mine = list(proposals.items())[dist.rank::dist.world_size]
    scored = []
    for i, (arch, log_p) in enumerate(mine, 1):
        s = evaluator(arch, batch)
        scored.append(Candidate(arch, s.reward, s.accuracy, log_p, s.extras))
        if on_sample is not None:
            on_sample(i, len(mine))
    everyone = [c for part in dist.all_gather(scored) for c in part]
    # ties: the more probable architecture first, then the order it was proposed in (stable sort)
    order = {arch: i for i, arch in enumerate(proposals)}
    everyone.sort(key=lambda c: order[c.arch])
    return sorted(everyone, key=lambda c: (-c.reward, -(c.log_prob if c.log_prob is not None else 0.0)))


def rescore(candidates: list[Candidate], evaluator: Evaluator, k: int) -> list[Candidate]:
    """The best `k` re-scored on the whole reward split and sorted by it, then the rest as they were."""
    top = []
    for c in candidates[:k]:
        s = evaluator.split_score(c.arch)
        top.append(Candidate(c.arch, s.reward, s.accuracy, c.log_prob, {**c.extras, **s.extras},
                             batch_reward=c.reward, batch_accuracy=c.accuracy))
    top.sort(key=lambda c: (-c.reward, -c.batch_reward))  # stable: ties keep the minibatch order
    return top + candidates[k:]


def derive(space: SearchSpace, evaluator: Evaluator, controller: Controller | None, *, samples: int,
           argmax: bool = False, seed: int = 0, on_sample: OnSample = None, dist: Dist = SINGLE,
           rescore_top: int = 0) -> list[Candidate]:
    """Candidates best first: from `controller`'s policy, or uniformly from `space` when it is None,
    the best `rescore_top` of them re-scored on the whole reward split (`rescore`). Under torchrun
    (`dist`) the ranks share the minibatch scoring (best_of_n); every rank re-scores the same few."""
    if argmax:
        if controller is None:
            raise ConfigError("--argmax needs a controller, and a random search has none; use --samples N")
        with torch.no_grad():
            arch, log_p = controller.argmax()
        s = evaluator.split_score(arch)
        if on_sample is not None:
            on_sample(1, 1)
        return [Candidate(arch, s.reward, s.accuracy, float(log_p), s.extras)]
    if samples < 1:
        raise ConfigError(f"--samples {samples}: expected at least 1 architecture to score")
    # the minibatch and the proposals draw from separate streams (one seed for both correlated them)
    batch = evaluator.val_data.sample_batch(evaluator.batch_size, stream(seed, "derive-batch", 0))
    if controller is not None:
        gen = torch.Generator().manual_seed(seed + DERIVE_SEED_OFFSET)

        def propose() -> tuple[Arch, float | None]:
            with torch.no_grad():
                arch, log_p, _ = controller.sample(gen)
            return arch, float(log_p)
    else:
        rng = random.Random(seed + DERIVE_SEED_OFFSET)

        def propose() -> tuple[Arch, float | None]:
            return space.sample(rng), None
    return rescore(best_of_n(propose, evaluator, samples, batch, on_sample, dist), evaluator, rescore_top)


def write_derived(out: str | os.PathLike, candidates: list[Candidate], meta: dict[str, Any], topk: int = 10
                  ) -> Candidate:
    """arch.json (pure Arch), topk.json and derive.json; returns the best candidate."""
    out = Path(out)
    best = candidates[0]
    write_json(out / "arch.json", best.arch.to_json())
    write_json(out / "topk.json", [c.to_json() for c in candidates[:topk]])
    write_json(out / "derive.json", {**meta, "candidates": len(candidates), "best": best.to_json()})
    return best


def derive_run(run: str | os.PathLike, *, samples: int | None = None, argmax: bool = False,
               reward: RewardFn | None = None, device: str = "auto", splits=None, opened=None,
               on_sample: OnSample = None) -> Candidate:
    """Re-derive from a search directory's saved supernet (and controller), rewriting its outputs.

    `opened` is `mnet.search.enas.open_run(run, ...)` when the caller has it already (then `reward`,
    `device` and `splits` were given to that call).
    """
    if opened is None:
        from mnet.search.enas import open_run  # enas imports this module for its own final derivation

        opened = open_run(run, reward=reward, device=device, splits=splits)
    cfg = opened.config
    controller = opened.agent.controller if opened.agent is not None else None
    n = samples if samples is not None else cfg.derive_budget
    candidates = derive(opened.space, opened.evaluator, controller, samples=n, argmax=argmax, seed=cfg.seed,
                        on_sample=on_sample, rescore_top=cfg.rescore_top)
    return write_derived(run, candidates, derive_meta(cfg.strategy, n, argmax, cfg), cfg.topk)


def derive_meta(strategy: str, samples: int, argmax: bool, cfg) -> dict[str, Any]:
    """derive.json's description of how the candidates were drawn (`cfg` is the SearchConfig)."""
    return {"strategy": strategy, "method": "argmax" if argmax else "best-of-n",
            "samples": 1 if argmax else samples, "minibatch": cfg.batch_size, "bn": cfg.bn, "seed": cfg.seed,
            "rescored_on_reward_split": 1 if argmax else min(cfg.rescore_top, samples)}
