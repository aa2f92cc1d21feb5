"""Where an ONNX model's time goes in ONNX Runtime on CPU: per-node kernel times from ORT's profiler.

    prof = profile_onnx("bundle/model.int8.onnx", batch=1)
    prof.by_role()      # {"depthwise": ms, "pointwise": ms, "stem": ms, "pool": ms, "other": ms}
    prof.by_kernel()    # {"QLinearConv": ms, "Conv": ms, ...}: which kernels ORT really picked

ORT rewrites the graph before it runs it (NCHWc convolutions for fp32, QLinearConv / QLinearAveragePool
fused from Q/DQ for int8, layout transposes and reorders), so the kernels reported here are the ones
that ran, not the ops in the file. Each node's time is the median over `runs` calls of its
`*_kernel_time` event; the model's own time is the median `model_run` event (it includes the
framework's overhead between nodes, so it is a little more than the sum of the nodes).

Roles come from the node names our exporter writes (`/cells.3/dw/Conv`, `/cells.3/pw/Conv`, `/stem/...`)
and survive ORT's renaming (`/cells.3/dw/Conv_token_31`, `..._nchwc`); a model exported by something
else just lands in "other". Only numpy and onnxruntime: profiling needs no torch.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mnet.errors import BackendError, ConfigError

__all__ = ["ROLES", "NodeTime", "OrtProfile", "node_role", "profile_onnx"]

ROLES = ("depthwise", "pointwise", "stem", "pool", "other")
_ROLE_PATTERNS = (("depthwise", re.compile(r"/dw/")), ("pointwise", re.compile(r"/pw/")),
                  ("stem", re.compile(r"^/?stem/")), ("pool", re.compile(r"AveragePool")))
_KERNEL_SUFFIX = "_kernel_time"
_LAYER = re.compile(r"/(cells\.\d+/(?:dw|pw)|stem)/")


def node_role(name: str, op: str) -> str:
    """depthwise / pointwise / stem / pool / other, from the exporter's module path in the node name."""
    for role, pattern in _ROLE_PATTERNS:
        if pattern.search(name) or (role == "pool" and "AveragePool" in op):
            return role
    return "other"


@dataclass(frozen=True)
class NodeTime:
    name: str  # the node as ORT ran it (after its graph rewrites)
    kernel: str  # the op ORT executed: Conv (NCHWc for fp32), QLinearConv, QLinearAveragePool, ...
    ms: float  # median over the profiled runs
    role: str


@dataclass(frozen=True)
class OrtProfile:
    """Per-node medians of one model at one batch size and thread count."""

    model: str
    batch: int
    threads: int
    runs: int
    run_ms: float  # median `model_run`: what a caller of session.run waits, less Python
    nodes: tuple[NodeTime, ...]

    @property
    def nodes_ms(self) -> float:
        return float(sum(n.ms for n in self.nodes))

    def by_role(self) -> dict[str, float]:
        out = dict.fromkeys(ROLES, 0.0)
        for n in self.nodes:
            out[n.role] += n.ms
        return out

    def by_kernel(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for n in self.nodes:
            out[n.kernel] += n.ms
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def by_layer(self) -> dict[str, float]:
        """Milliseconds per exporter module ("cells.0/dw", "cells.0/pw", "stem"), conversions included;
        nodes outside them (pools, adds, layout changes) under their role."""
        out: dict[str, float] = defaultdict(float)
        for n in self.nodes:
            m = _LAYER.search(n.name)
            out[m.group(1) if m else n.role] += n.ms
        return dict(out)

    def top(self, k: int = 10) -> list[NodeTime]:
        return sorted(self.nodes, key=lambda n: -n.ms)[:k]

    def to_json(self, top: int = 10) -> dict[str, Any]:
        return {"model": Path(self.model).name, "batch": self.batch, "threads": self.threads, "runs": self.runs,
                "run_ms": self.run_ms, "nodes_ms": self.nodes_ms, "by_role_ms": self.by_role(),
                "by_kernel_ms": self.by_kernel(),
                "by_layer_ms": self.by_layer(),
                "top_nodes": [{"name": n.name, "kernel": n.kernel, "ms": n.ms} for n in self.top(top)]}


def profile_onnx(model: str | os.PathLike, batch: int = 1, *, threads: int = 1, runs: int = 20, warmup: int = 5,
                 x: np.ndarray | None = None, session_config: dict[str, str] | None = None) -> OrtProfile:
    """Profile `model` on ONNX Runtime's CPU provider with random (or the given NCHW float32) input."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError(f"profiling needs onnxruntime ({e}); pip install onnxruntime") from None

    if batch < 1 or runs < 1 or warmup < 0 or threads < 1:
        raise ConfigError(f"profile_onnx: batch {batch}, runs {runs}, warmup {warmup}, threads {threads}: "
                          "expected batch, runs, threads >= 1 and warmup >= 0")
    model = Path(model)
    if not model.is_file():
        raise ConfigError(f"ONNX model not found: {model}")
    with tempfile.TemporaryDirectory(prefix="mnet-ort-profile-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        for k, v in (session_config or {}).items():
            so.add_session_config_entry(k, v)
        try:
            sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own exception types
            raise BackendError(f"{model}: onnxruntime cannot load it ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]})") from None
        inp = sess.get_inputs()[0]
        if x is None:
            shape = [batch, *[d if isinstance(d, int) else 1 for d in inp.shape[1:]]]
            x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        # the profiler records the warm-up calls too; only the last `runs` events of each node count below
        for _ in range(warmup + runs):
            sess.run(None, {inp.name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per: dict[str, list[float]] = defaultdict(list)
    kernels: dict[str, str] = {}
    run_us: list[float] = []
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith(_KERNEL_SUFFIX):
            name = e["name"][:-len(_KERNEL_SUFFIX)]
            per[name].append(float(e["dur"]))
            kernels[name] = e.get("args", {}).get("op_name", "?")
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            run_us.append(float(e["dur"]))
    if not run_us:
        raise BackendError(f"{model}: onnxruntime's profile has no model_run events; cannot attribute time")
    nodes = tuple(NodeTime(name, kernels[name], float(np.median(v[-runs:])) / 1e3, node_role(name, kernels[name]))
                  for name, v in per.items())
    return OrtProfile(model=str(model), batch=len(x), threads=threads, runs=runs,
                      run_ms=float(np.median(run_us[-runs:])) / 1e3, nodes=nodes)
