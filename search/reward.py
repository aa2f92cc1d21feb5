"""Rewards for the controller: accuracy, optionally times the MnasNet latency term.

R = acc × (LAT/T)^w with w = α if LAT ≤ T else β  (soft: α = β = −0.07; hard: α = 0, β = −1).
LAT comes from a latency predictor of the *target* device, passed in as a plain function, so search/
does not depend on calibration/ (DESIGN layering); the CLI wires the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mnet.arch import Arch
from mnet.errors import ConfigError

__all__ = ["LATENCY_MODES", "LatencyReward", "latency_reward", "accuracy_reward"]

LATENCY_MODES = {"soft": (-0.07, -0.07), "hard": (0.0, -1.0)}


def accuracy_reward(arch: Arch, acc: float) -> tuple[float, dict]:
    """The paper's reward: validation-minibatch accuracy."""
    return acc, {}


@dataclass(frozen=True)
class LatencyReward:
    latency_ms: Callable[[Arch], float]
    budget_ms: float
    alpha: float
    beta: float

    def __call__(self, arch: Arch, acc: float) -> tuple[float, dict]:
        lat = float(self.latency_ms(arch))
        w = self.alpha if lat <= self.budget_ms else self.beta
        return acc * (max(lat, 1e-9) / self.budget_ms) ** w, {"latency_ms": lat}


def latency_reward(latency_ms: Callable[[Arch], float], budget_ms: float, mode: str = "soft",
                   alpha: float | None = None, beta: float | None = None) -> LatencyReward:
    if mode not in LATENCY_MODES:
        raise ConfigError(f"--latency-mode {mode!r}: choose soft or hard")
    if not budget_ms > 0:
        raise ConfigError(f"--latency-budget-ms {budget_ms}: expected a positive number of milliseconds")
    a, b = LATENCY_MODES[mode]
    return LatencyReward(latency_ms, float(budget_ms), a if alpha is None else float(alpha),
                         b if beta is None else float(beta))
