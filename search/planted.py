"""A reward with a known optimum, to test that a controller setting can learn (issue 13).

R = Binomial(n, p0 + b + Δ·g(arch)) / n, where g(arch) ∈ {0, …, L} counts the layers that chose their
planted op (Δ is the effect of one decision) and b ~ N(0, σ_b) is the difficulty of the minibatch, shared by every architecture
scored on it: the two noises of a supernet reward (a minibatch's luck, and n images' binomial
spread; measured on the tiny supernet: SE ≈ 0.05 per reward against an arch-to-arch spread ≈ 0.016).
`PlantedEvaluator` stands in for `search.supernet.Evaluator` in `search.enas.train_controller`, so
the test runs the real controller loop, minibatch sharing and baselines included.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from mnet.arch import Arch, SearchSpace
from mnet.search.supernet import Score

__all__ = ["PlantedEvaluator"]


class _Batches:
    """`val_data` of the planted evaluator: a 'minibatch' is its difficulty b and a seed for its noise."""

    def __init__(self, sigma_b: float):
        self.sigma_b = sigma_b

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[float, int]:
        b = float(torch.randn((), generator=generator)) * self.sigma_b
        return b, int(torch.randint(0, 2**62, (), generator=generator))


@dataclass
class PlantedEvaluator:
    space: SearchSpace
    planted: tuple[int, ...]  # the optimum's op index per layer
    delta: float = 0.03
    p0: float = 0.6
    n: int = 128  # images per minibatch: the binomial noise
    sigma_b: float = 0.05

    def __post_init__(self) -> None:
        self.val_data = _Batches(self.sigma_b)
        self.batch_size = self.n

    def g(self, arch: Arch) -> float:
        ops = [self.space.ops.index((x.kernel, x.dilation)) for x in arch.layers]
        return float(sum(o == p for o, p in zip(ops, self.planted)))

    def __call__(self, arch: Arch, batch: tuple[float, int]) -> Score:
        b, seed = batch
        digest = hashlib.blake2b(repr((seed, arch)).encode(), digest_size=8).digest()
        p = min(max(self.p0 + b + self.delta * self.g(arch), 0.0), 1.0)
        acc = float(np.random.default_rng(int.from_bytes(digest, "little")).binomial(self.n, p)) / self.n
        return Score(acc, acc, {})
