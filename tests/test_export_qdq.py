"""TensorRT's Q/DQ rules (`mnet.export.qdq`) on hand-made graphs: each broken rule names its node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mnet.export.qdq import tensorrt_qdq_problems
from test_export_support import qdq_conv_model


def test_symmetric_int8_with_float_bias_passes():
    assert tensorrt_qdq_problems(qdq_conv_model(bias="float")) == []


def test_int32_dequantize_initializer_is_named():
    problems = tensorrt_qdq_problems(qdq_conv_model(bias="int32"))
    assert len(problems) == 1
    assert problems[0].startswith("DequantizeLinear 'b_DequantizeLinear': input 'b_quantized' is INT32; "
                                  "TensorRT dequantises only int8")
    assert "QuantizeBias=False" in problems[0]


@pytest.mark.parametrize("kw, expected", [
    ({"activations": "uint8", "zero_point": 128},
     "QuantizeLinear 'x_QuantizeLinear': zero point 'x_zero_point' is UINT8"),
    ({"zero_point": 3}, "QuantizeLinear 'x_QuantizeLinear': zero point 'x_zero_point' is not 0"),
    ({"per_channel_activation": True}, "QuantizeLinear 'x_QuantizeLinear': per-channel scale 'x_scale' on activation"),
])
def test_asymmetric_or_per_channel_activations_are_named(kw, expected):
    problems = tensorrt_qdq_problems(qdq_conv_model(**kw))
    assert problems and problems[0].startswith(expected)
    assert all(p.split(":")[0].endswith(("'x_QuantizeLinear'", "'x_DequantizeLinear'")) for p in problems)


def test_weight_scale_axis_and_sign_and_contrib_ops():
    m = qdq_conv_model()
    w_dq = next(n for n in m.graph.node if n.name == "w_DequantizeLinear")
    w_dq.attribute[0].i = 1  # per-channel along the input channels
    scale = next(t for t in m.graph.initializer if t.name == "w_scale")
    scale.CopyFrom(numpy_helper.from_array(np.array([0.01, -0.01, 0.01], np.float32), "w_scale"))
    problems = tensorrt_qdq_problems(m)
    assert any("'w_DequantizeLinear': per-channel axis 1 for Conv 'conv'" in p for p in problems)
    assert any("'w_DequantizeLinear': scale 'w_scale' has values <= 0" in p for p in problems)
    m = qdq_conv_model()
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            n.domain = "com.microsoft"
    m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    assert len(tensorrt_qdq_problems(m)) == 3
    assert "is a com.microsoft op" in tensorrt_qdq_problems(m)[0]
