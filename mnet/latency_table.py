"""The latency table contract (latency.json) and the block decomposition of an architecture.

A table holds, for one target (device + backend + precision + batch), the measured time of every
distinct block an architecture of its preset can contain; `arch_blocks(arch)` lists the blocks one
architecture is made of, in execution order, with the same keys. Keys are readable strings:

    stem:c3-256:24x32:s1     op:k39d2:c256:6x8     pool:c256:24x32     add:c256:12x16     head:c256:6x8:n3

Pure Python: the table is read on the GPU server (search) and written on the Jetson (calibrate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mnet.arch import Arch, SearchSpace
from mnet.errors import CheckpointError, ConfigError

__all__ = ["SCHEMA_VERSION", "Entry", "Correction", "LatencyTable", "arch_blocks", "space_blocks"]

SCHEMA_VERSION = 1


def _stem(arch: Arch) -> str:
    h, w = arch.input_hw
    return f"stem:c3-{arch.width}:{h}x{w}:s{arch.stem_stride}"


def _hw(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def _pools(arch: Arch, node: int, to_level: int) -> list[str]:
    """Pool keys that bring node `node` (at its level) down to `to_level`."""
    out, h, w = [], *arch.node_hw(node)
    for _ in range(to_level - arch.level(node)):
        out.append(f"pool:c{arch.width}:{h}x{w}")
        h, w = h // 2, w // 2
    return out


def arch_blocks(arch: Arch) -> list[str]:
    """Blocks of `arch` in execution order (a block may repeat), mirroring `search.ops.forward_arch`."""
    c = arch.width
    keys = [_stem(arch)]
    for i, layer in enumerate(arch.layers, start=1):
        level = arch.level(i)
        keys += _pools(arch, i - 1, level)
        keys.append(f"op:k{layer.kernel}d{layer.dilation}:c{c}:{_hw(arch.node_hw(i))}")
        if layer.skip is not None:
            keys += _pools(arch, layer.skip, level)
            keys.append(f"add:c{c}:{_hw(arch.node_hw(i))}")
    keys.append(f"head:c{c}:{_hw(arch.node_hw(arch.num_layers))}:n{arch.num_classes}")
    return keys


def space_blocks(space: SearchSpace) -> list[str]:
    """Every distinct block any architecture of `space` can contain (sorted, no repeats)."""
    skel = space.skeleton([_first_layer(space)] * space.num_layers)
    c = space.width
    keys = {_stem(skel), f"head:c{c}:{_hw(skel.node_hw(space.num_layers))}:n{space.num_classes}"}
    for i in range(1, space.num_layers + 1):
        hw = _hw(skel.node_hw(i))
        keys.update(f"op:k{k}d{d}:c{c}:{hw}" for k, d in space.ops)
        keys.add(f"add:c{c}:{hw}")
        # any earlier node may be pooled down to this layer's level
        for j in range(i):
            keys.update(_pools(skel, j, skel.level(i)))
    return sorted(keys)


def _first_layer(space: SearchSpace):
    from mnet.arch import Layer

    return Layer(*space.ops[0])


@dataclass(frozen=True)
class Entry:
    p50_ms: float
    p90_ms: float
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "n": self.n}


@dataclass(frozen=True)
class Correction:
    """predicted = slope · Σ entries + per_block · (number of blocks) + intercept.

    Fitted on whole networks measured end to end. The per-block term absorbs the fixed cost each
    separately-timed block paid (a session call, a kernel launch) that a whole network pays once.
    """

    slope: float = 1.0
    intercept_ms: float = 0.0
    fit_archs: int = 0
    r2: float | None = None
    per_block_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"slope": self.slope, "per_block_ms": self.per_block_ms, "intercept_ms": self.intercept_ms,
                "fit_archs": self.fit_archs, "r2": self.r2}


@dataclass(frozen=True)
class LatencyTable:
    device: dict[str, Any]
    backend: str
    precision: str
    batch: int
    space: dict[str, Any]  # SearchSpace.to_json() of the space measured
    entries: dict[str, Entry] = field(default_factory=dict)
    correction: Correction = Correction()
    complete: bool = False
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(f"latency table schema_version {self.schema_version}: this mnet reads {SCHEMA_VERSION}")
        if self.backend not in ("onnxruntime", "torch", "tensorrt"):
            raise ConfigError(f"latency table field 'backend' = {self.backend!r}: expected onnxruntime, torch or tensorrt")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"latency table field 'precision' = {self.precision!r}: expected fp32, fp16 or int8")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"latency table field 'batch' = {self.batch!r}: expected a positive integer")

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_json(self.space)

    @property
    def fingerprint(self) -> str:
        """A short human-readable identity of the target this table describes."""
        d = self.device
        name = d.get("gpu") or d.get("cpu") or "unknown device"
        return f"{name} / {self.backend} {d.get('backend_version', '')} / {self.precision} / batch {self.batch}" + \
            (f" / {d['threads']} threads" if d.get("threads") else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "device": self.device,
            "backend": self.backend,
            "precision": self.precision,
            "batch": self.batch,
            "space": self.space,
            "complete": self.complete,
            "correction": self.correction.to_json(),
            "entries": {k: v.to_json() for k, v in sorted(self.entries.items())},
        }

    @classmethod
    def from_json(cls, d: Any, source: str = "latency table") -> "LatencyTable":
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: expected a JSON object")
        try:
            entries = {}
            for k, v in d["entries"].items():
                e = Entry(float(v["p50_ms"]), float(v["p90_ms"]), int(v["n"]))
                if not (e.p50_ms >= 0 and e.p90_ms >= 0):
                    raise ValueError(f"entry {k!r} has a negative time")
                entries[k] = e
            c = d.get("correction") or {}
            return cls(
                schema_version=int(d.get("schema_version", SCHEMA_VERSION)),
                device=dict(d["device"]),
                backend=d["backend"],
                precision=d["precision"],
                batch=d["batch"],
                space=dict(d["space"]),
                entries=entries,
                correction=Correction(float(c.get("slope", 1.0)), float(c.get("intercept_ms", 0.0)),
                                      int(c.get("fit_archs", 0)), c.get("r2"), float(c.get("per_block_ms", 0.0))),
                complete=bool(d.get("complete", False)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{source}: corrupt latency table ({type(e).__name__}: {e}); "
                                  "re-run `mnet calibrate latency`") from None
