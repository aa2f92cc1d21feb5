"""fp32 → fp16 ONNX conversion with fp32 inputs and outputs (for TensorRT 11's strongly typed builds).

TensorRT 11 removed the FP16 builder flag: a network runs in half precision only if the ONNX says so.
NVIDIA points to ModelOpt AutoCast; onnxconverter-common's float16 also does it, but both are heavy
extra dependencies for what an MNet graph needs (Conv, Relu, Add, AveragePool, ReduceMean, Gemm).
This converts every float32 tensor of the graph to float16 and adds one Cast after the input and one
before the output, so callers keep feeding and reading float32. Weights are clipped to the fp16 range.
Ops whose float inputs must stay float32 by the ONNX spec (e.g. Resize scales) are refused by name.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mnet.errors import ExportError

__all__ = ["convert_to_fp16"]

_FP16_MAX = float(np.finfo(np.float16).max)
# Ops with a float input that the ONNX spec pins to float32 (converting it would make an invalid model).
_UNSUPPORTED = {"Resize", "Upsample", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                "EyeLike", "Multinomial", "Bernoulli"}


def _to_fp16(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t)
    return numpy_helper.from_array(np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16), t.name)


def _retype(vi: onnx.ValueInfoProto) -> None:
    if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A half-precision copy of `model` whose graph inputs and outputs stay float32."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    bad = sorted({n.op_type for n in g.node if n.op_type in _UNSUPPORTED})
    if bad:
        raise ExportError(f"fp16 conversion does not handle {', '.join(bad)}; build fp32 or int8 instead")

    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(_to_fp16(t))
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_to_fp16(a.t))  # Constant / ConstantOfShape values
            elif a.type == onnx.AttributeProto.GRAPH:
                raise ExportError(f"fp16 conversion does not handle subgraphs ({node.op_type} {node.name})")
    del g.value_info[:]  # stale float32 annotations; shape inference below rebuilds them

    # Keep the interface float32: input -> Cast -> (fp16 graph) -> Cast -> output.
    inits = {t.name for t in g.initializer}
    head, tail = [], []
    for vi in g.input:
        if vi.name in inits or vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{vi.name}__fp16"
        for node in g.node:
            node.input[:] = [inner if x == vi.name else x for x in node.input]
        head.append(helper.make_node("Cast", [vi.name], [inner], name=f"{vi.name}_to_fp16", to=TensorProto.FLOAT16))
    for vi in g.output:
        if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{vi.name}__fp16"
        for node in g.node:
            node.output[:] = [inner if x == vi.name else x for x in node.output]
            node.input[:] = [inner if x == vi.name else x for x in node.input]
        tail.append(helper.make_node("Cast", [inner], [vi.name], name=f"{vi.name}_to_fp32", to=TensorProto.FLOAT))
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)

    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        onnx.checker.check_model(m, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"fp16 conversion produced an invalid model: {str(e)[:400]}") from None
    return m
