"""Latency prediction from a table: Σ block entries, then the fitted linear correction.

Summing per-block times misses what a whole network gains (operator fusion, one session call instead
of many) and loses (memory traffic between blocks); a line fitted on a few whole networks measured
end to end on the same target absorbs both.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from mnet.arch import Arch
from mnet.errors import ConfigError
from mnet.io import read_json
from mnet.latency_table import Correction, LatencyTable, arch_blocks

__all__ = ["LatencyPredictor", "load_table", "fit_correction", "kendall_tau", "error_stats"]


def load_table(path: str | os.PathLike) -> LatencyTable:
    return LatencyTable.from_json(read_json(path, "latency table"), source=str(path))


class LatencyPredictor:
    def __init__(self, table: LatencyTable, source: str = "latency table"):
        self.table = table
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "LatencyPredictor":
        table = load_table(path)
        if not table.complete:
            raise ConfigError(f"{path}: the latency table is incomplete; re-run the same `mnet calibrate latency` "
                              "command to finish it")
        return cls(table, str(path))

    def check_arch(self, arch: Arch) -> None:
        s = self.table.space
        mine = {"width": arch.width, "input_hw": list(arch.input_hw), "stem_stride": arch.stem_stride,
                "reductions": list(arch.reductions), "num_layers": arch.num_layers, "num_classes": arch.num_classes}
        diff = {k: (s.get(k), v) for k, v in mine.items() if s.get(k) != v}
        if diff:
            raise ConfigError(f"{self.source} was measured for preset '{s.get('name')}' but the architecture "
                              f"differs in {', '.join(diff)} (table, arch) = {diff}; measure a table for this preset "
                              "with `mnet calibrate latency --preset ...`")

    def raw_ms(self, arch: Arch) -> float:
        """Σ of the table entries of the arch's blocks (no correction)."""
        total = 0.0
        for key in arch_blocks(arch):
            entry = self.table.entries.get(key)
            if entry is None:
                self.check_arch(arch)
                raise ConfigError(f"{self.source}: no entry for block '{key}'; the table is incomplete or from "
                                  "another preset — re-run `mnet calibrate latency`")
            total += entry.p50_ms
        return total

    def predict_ms(self, arch: Arch) -> float:
        c = self.table.correction
        return max(0.0, c.slope * self.raw_ms(arch) + c.per_block_ms * len(arch_blocks(arch)) + c.intercept_ms)

    __call__ = predict_ms


def fit_correction(raw_ms: Sequence[float], n_blocks: Sequence[int], measured_ms: Sequence[float]) -> Correction:
    """Least squares measured ≈ slope·raw + per_block·blocks + intercept.

    With few networks the model shrinks: under 6 points no per-block term, under 3 an offset only.
    """
    x, n, y = np.asarray(raw_ms, float), np.asarray(n_blocks, float), np.asarray(measured_ms, float)
    if len(x) == 0:
        return Correction()
    slope, per_block, intercept = 1.0, 0.0, float(np.mean(y - x))
    if len(x) >= 6 and np.ptp(n) > 0 and np.ptp(x) > 0:
        slope, per_block, intercept = (float(v) for v in np.linalg.lstsq(
            np.stack([x, n, np.ones_like(x)], 1), y, rcond=None)[0])
    elif len(x) >= 3 and np.ptp(x) > 0:
        slope, intercept = (float(v) for v in np.polyfit(x, y, 1))
    pred = slope * x + per_block * n + intercept
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else None
    return Correction(slope, intercept, len(x), r2, per_block)


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's τ-b (ties handled), O(n²) — n is tens here."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) != len(b):
        raise ValueError("kendall_tau: sequences differ in length")
    if len(a) < 2:
        return float("nan")
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    da, db = da[iu], db[iu]
    concord = float((da * db).sum())
    denom = np.sqrt(float((da != 0).sum()) * float((db != 0).sum()))
    return concord / denom if denom else float("nan")


def error_stats(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    rel = np.abs(p - m) / np.maximum(m, 1e-9)
    return {
        "kendall_tau": float(kendall_tau(p, m)),
        "mape": float(rel.mean()),
        "max_abs_error_ms": float(np.abs(p - m).max()) if len(p) else 0.0,
        "max_rel_error": float(rel.max()) if len(p) else 0.0,
        "n": int(len(p)),
    }
