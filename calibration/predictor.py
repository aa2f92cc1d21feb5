"""Latency prediction from a table: Σ block entries, then the fitted linear correction.

Summing per-block times misses what a whole network gains (operator fusion, one session call instead
of many) and loses (memory traffic between blocks); a line fitted on a few whole networks measured
end to end on the same target absorbs both.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from mnet.arch import PRESETS, Arch, SearchSpace, build_space
from mnet.errors import ConfigError
from mnet.io import read_json
from mnet.latency_table import Correction, LatencyTable, arch_blocks

__all__ = ["LatencyPredictor", "load_table", "calibrate_command", "describe_space", "fit_correction", "kendall_tau",
           "error_stats"]


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

    def check_space(self, space: SearchSpace) -> None:
        """Refuse a search space whose architectures the table cannot price (other skeleton, classes or ops)."""
        mine = self.table.search_space()
        if not (_same_skeleton(mine, space) and set(space.ops) <= set(mine.ops)):
            self._refuse(f"the search space is {describe_space(space)}", space)

    def check_arch(self, arch: Arch) -> None:
        mine = self.table.search_space()
        if mine.num_classes == arch.num_classes and mine.contains(arch):
            return
        # the arch does not say which space it came from: suggest the table's ops plus its own, on its skeleton
        ks = sorted({k for k, _ in mine.ops} | {x.kernel for x in arch.layers})
        ds = sorted({d for _, d in mine.ops} | {x.dilation for x in arch.layers})
        wanted = build_space(_preset_of(mine), input_hw=arch.input_hw, layers=arch.num_layers, width=arch.width,
                             stem_stride=arch.stem_stride, kernels=ks, dilations=ds).with_classes(arch.num_classes)
        ops = sorted({(x.kernel, x.dilation) for x in arch.layers})
        self._refuse(f"the architecture has {arch.num_layers} layers, width {arch.width}, input {arch.input_hw[0]}x"
                     f"{arch.input_hw[1]}, stem stride {arch.stem_stride}, reductions after {list(arch.reductions)}, "
                     f"{arch.num_classes} classes and ops (kernel, dilation) {ops}", wanted)

    def _refuse(self, what: str, wanted: SearchSpace) -> None:
        raise ConfigError(f"{self.source} was measured for search space {describe_space(self.table.search_space())} "
                          f"but {what}; measure a table for it: `{calibrate_command(wanted)} --out ...` with your "
                          "target's --backend and --precision")

    def raw_ms(self, arch: Arch) -> float:
        """Σ of the table entries of the arch's blocks (no correction)."""
        total = 0.0
        for key in arch_blocks(arch):
            entry = self.table.entries.get(key)
            if entry is None:
                self.check_arch(arch)
                raise ConfigError(f"{self.source}: no entry for block '{key}'; the table is incomplete — re-run "
                                  "the `mnet calibrate latency` command that wrote it")
            total += entry.p50_ms
        return total

    def predict_ms(self, arch: Arch) -> float:
        c = self.table.correction
        return max(0.0, c.slope * self.raw_ms(arch) + c.per_block_ms * len(arch_blocks(arch)) + c.intercept_ms)

    __call__ = predict_ms


def _same_skeleton(a: SearchSpace, b: SearchSpace) -> bool:
    return all(getattr(a, k) == getattr(b, k)
               for k in ("num_layers", "width", "input_hw", "stem_stride", "reductions", "num_classes"))


def describe_space(space: SearchSpace) -> str:
    """`SearchSpace.describe()` plus the classes, which a table's head block depends on."""
    return f"{space.describe()} with {space.num_classes} classes"


def _preset_of(space: SearchSpace) -> str:
    base = space.name.split("+")[0]
    return base if base in PRESETS else "tiny"


def calibrate_command(space: SearchSpace) -> str:
    """The `mnet calibrate latency` options that measure `space` (for error messages)."""
    h, w = space.input_hw
    ks = ",".join(str(k) for k in sorted({k for k, _ in space.ops}))
    ds = ",".join(str(d) for d in sorted({d for _, d in space.ops}))
    return (f"mnet calibrate latency --preset {_preset_of(space)} --input-size {h}x{w} --layers {space.num_layers} "
            f"--width {space.width} --stem-stride {space.stem_stride} --kernels {ks} --dilations {ds} "
            f"--num-classes {space.num_classes}")


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
