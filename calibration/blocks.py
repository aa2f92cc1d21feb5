"""ONNX graphs of single blocks and of whole architectures, built from geometry alone.

Latency tables are measured on the target (a Jetson, say) from the preset only — no model, no torch:
these graphs carry random weights and the same node pattern the torch export of `MNet` produces
(Conv/BatchNormalization/Relu/AveragePool/Add/ReduceMean/Gemm), so onnxruntime and TensorRT fuse and
time them the same way.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mnet.arch import Arch

__all__ = ["OPSET", "block_model", "arch_model", "block_inputs"]

OPSET = 17


class _Graph:
    def __init__(self, seed: int = 0):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, prefix: str, value: np.ndarray) -> str:
        n = self.name(prefix)
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), n))
        return n

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    # --- layers ----------------------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, kh: int, kw: int, *, stride=1, dilation=1, group=1) -> str:
        w = self.rng.normal(0, (2.0 / (kh * kw * cin / group)) ** 0.5, (cout, cin // group, kh, kw))
        pads = [dilation * (kh // 2), dilation * (kw // 2)] * 2
        return self.node("Conv", [x, self.const("w", w)], kernel_shape=[kh, kw], strides=[stride, stride],
                         dilations=[dilation, dilation], pads=pads, group=group)

    def bn(self, x: str, c: int) -> str:
        return self.node("BatchNormalization", [x, self.const("g", 1 + 0.1 * self.rng.normal(size=c)),
                                                self.const("b", 0.1 * self.rng.normal(size=c)),
                                                self.const("m", 0.1 * self.rng.normal(size=c)),
                                                self.const("v", 1 + 0.1 * self.rng.random(c))], epsilon=1e-5)

    def stem(self, x: str, c: int, stride: int) -> str:
        return self.node("Relu", [self.bn(self.conv(x, 3, c, 3, 3, stride=stride), c)])

    def sepconv(self, x: str, c: int, kh: int, kw: int, dilation: int) -> str:
        y = self.conv(self.node("Relu", [x]), c, c, kh, kw, dilation=dilation, group=c)
        return self.bn(self.conv(self.bn(y, c), c, c, 1, 1), c)

    def pool(self, x: str) -> str:
        return self.node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b])

    def head(self, x: str, c: int, n: int) -> str:
        pooled = self.node("ReduceMean", [self.node("Relu", [x])], axes=[2, 3], keepdims=0)  # opset < 18
        w = self.const("fc_w", self.rng.normal(0, c ** -0.5, (n, c)))
        return self.node("Gemm", [pooled, w, self.const("fc_b", np.zeros(n))], transB=1)

    def model(self, inputs: list[tuple[str, list]], output: str, out_shape: list) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes, "mnet_block",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mnet-calibrate")
        m.ir_version = min(m.ir_version, 8)  # readable by older onnxruntime / TensorRT parsers
        return m


def _parse(key: str) -> tuple[str, dict]:
    kind, *parts = key.split(":")
    f: dict = {}
    for p in parts:
        if p.startswith("c") and "-" in p:
            f["cin"], f["c"] = (int(v) for v in p[1:].split("-"))
        elif p.startswith("c"):
            f["c"] = int(p[1:])
        elif p.startswith("k"):
            k, d = p[1:].split("d")
            f["k"], f["d"] = int(k), int(d)
        elif p.startswith("s"):
            f["s"] = int(p[1:])
        elif p.startswith("n"):
            f["n"] = int(p[1:])
        else:
            f["h"], f["w"] = (int(v) for v in p.split("x"))
    return kind, f


def block_inputs(key: str, batch: int) -> dict[str, tuple]:
    """Input names and shapes of a block graph."""
    kind, f = _parse(key)
    if kind == "stem":
        return {"x": (batch, 3, f["h"], f["w"])}
    shape = (batch, f["c"], f["h"], f["w"])
    return {"x": shape, "y": shape} if kind == "add" else {"x": shape}


def block_model(key: str, batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """The ONNX graph of one table block (see `mnet.latency_table` for the key format)."""
    from mnet.arch import cropped_kernel

    kind, f = _parse(key)
    g = _Graph(seed)
    ins = block_inputs(key, batch)
    if kind == "stem":
        y = g.stem("x", f["c"], f["s"])
        h, w = -(-f["h"] // f["s"]), -(-f["w"] // f["s"])
        out = [batch, f["c"], h, w]
    elif kind == "op":
        kh, kw = cropped_kernel(f["k"], f["d"], f["h"], f["w"])
        y = g.sepconv("x", f["c"], kh, kw, f["d"])
        out = [batch, f["c"], f["h"], f["w"]]
    elif kind == "pool":
        y = g.pool("x")
        out = [batch, f["c"], f["h"] // 2, f["w"] // 2]
    elif kind == "add":
        y = g.add("x", "y")
        out = [batch, f["c"], f["h"], f["w"]]
    elif kind == "head":
        y = g.head("x", f["c"], f["n"])
        out = [batch, f["n"]]
    else:
        raise ValueError(f"unknown block key {key!r}")
    return g.model([(n, list(s)) for n, s in ins.items()], y, out)


def arch_model(arch: Arch, batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """The whole network of `arch` with random weights, node for node like the torch export."""
    g = _Graph(seed)
    c = arch.width
    nodes = [g.stem("input", c, arch.stem_stride)]

    def pooled(node: int, level: int) -> str:
        x = nodes[node]
        for _ in range(level - arch.level(node)):
            x = g.pool(x)
        return x

    for i, layer in enumerate(arch.layers, start=1):
        level = arch.level(i)
        kh, kw = arch.layer_kernel_hw(i)
        y = g.sepconv(pooled(i - 1, level), c, kh, kw, layer.dilation)
        if layer.skip is not None:
            y = g.add(y, pooled(layer.skip, level))
        nodes.append(y)
    out = g.head(nodes[-1], c, arch.num_classes)
    return g.model([("input", [batch, 3, *arch.input_hw])], out, [batch, arch.num_classes])
