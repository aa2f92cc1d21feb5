"""TensorRT's rules for explicitly quantised (Q/DQ) ONNX graphs, checked before a build is attempted.

TensorRT 8.6, the oldest line mnet builds for, takes only this form of Q/DQ (its "Explicit Quantization"
guide; later lines add fp8/int4, which `mnet calibrate int8` never writes):
- every DequantizeLinear input is int8: a weight initializer, or a QuantizeLinear output. Int32 biases
  (onnxruntime's default, `QuantizeBias`) are refused by the ONNX parser (NVIDIA/TensorRT#4542,
  onnx/onnx-tensorrt#850);
- quantisation is symmetric: zero points int8 and 0 (uint8 activations cannot be built);
- scales are constants, all positive;
- activations are quantised per tensor; per-channel scales only on weights, along the output channels
  (axis 0 for Conv, 1 for ConvTranspose);
- Q/DQ nodes are the standard ONNX ones (not onnxruntime's com.microsoft contrib ops).

`tensorrt_qdq_problems` names each node that breaks a rule; an empty list means TensorRT can take the graph.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, numpy_helper

__all__ = ["tensorrt_qdq_problems"]

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}
_HINTS = {TensorProto.INT32: " (a quantised bias: keep biases float, onnxruntime's QuantizeBias=False)",
          TensorProto.UINT8: " (asymmetric uint8 activations: calibrate with int8 activations)"}


def _type_name(data_type: int) -> str:
    return TensorProto.DataType.Name(data_type)


def tensorrt_qdq_problems(model: onnx.ModelProto) -> list[str]:
    """One line per Q/DQ node TensorRT cannot build, naming the node and the offending tensor."""
    g = model.graph
    consts = {t.name: t for t in g.initializer}
    for n in g.node:  # Constant nodes are constants too (an exporter may use them instead of initializers)
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    declared = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}

    def dtype(name: str) -> int | None:
        if name in consts:
            return consts[name].data_type
        p = producer.get(name)
        if p is not None and p.op_type == "QuantizeLinear":
            # the output takes the zero point's type; TensorRT treats a Q without one as int8
            zp = p.input[2] if len(p.input) > 2 and p.input[2] else None
            return consts[zp].data_type if zp in consts else (TensorProto.INT8 if zp is None else None)
        return declared.get(name) or None

    problems: list[str] = []
    for n in g.node:
        if n.op_type not in _QDQ:
            continue
        where = f"{n.op_type} {n.name or n.output[0]!r}"
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{where} is a {n.domain} op; TensorRT parses only the standard ONNX {n.op_type}")
            continue
        scale = consts.get(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            problems.append(f"{where}: scale {n.input[1] if len(n.input) > 1 else ''!r} is not a constant; "
                            "TensorRT needs constant scales")
        elif not (numpy_helper.to_array(scale) > 0).all():
            problems.append(f"{where}: scale {scale.name!r} has values <= 0; TensorRT needs positive scales")
        zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if zp_name is not None:
            zp = consts.get(zp_name)
            if zp is None:
                problems.append(f"{where}: zero point {zp_name!r} is not a constant; TensorRT needs zero points of 0")
            elif zp.data_type != TensorProto.INT8:
                # a DequantizeLinear's zero point has its input's type, reported below
                if n.op_type == "QuantizeLinear":
                    problems.append(f"{where}: zero point {zp_name!r} is {_type_name(zp.data_type)}; TensorRT "
                                    f"quantises to int8 only{_HINTS.get(zp.data_type, '')}")
            elif (numpy_helper.to_array(zp) != 0).any():
                problems.append(f"{where}: zero point {zp_name!r} is not 0; TensorRT supports only symmetric "
                                "quantisation")
        x = n.input[0]
        if n.op_type == "DequantizeLinear":
            t = dtype(x)
            if t != TensorProto.INT8:
                problems.append(f"{where}: input {x!r} is {_type_name(t) if t else 'of unknown type'}; TensorRT "
                                f"dequantises only int8{_HINTS.get(t, '')}")
        if scale is not None and numpy_helper.to_array(scale).size > 1:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if x not in consts:
                problems.append(f"{where}: per-channel scale {scale.name!r} on activation {x!r}; TensorRT "
                                "quantises activations per tensor")
            else:
                for c in consumers.get(n.output[0], []):
                    want = _WEIGHT_AXIS.get(c.op_type)
                    if want is not None and axis != want:
                        problems.append(f"{where}: per-channel axis {axis} for {c.op_type} {c.name!r}; "
                                        f"TensorRT needs the output-channel axis {want}")
    return problems
