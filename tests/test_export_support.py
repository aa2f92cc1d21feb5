"""Shared helpers for tests/test_export_*.py (no tests here).

Training a tiny MNet and exporting it take seconds, so each is done once per test session and cached
here (module-scoped fixtures in several files would repeat them); tests that change a bundle work on
a copy from `copy_bundle`.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from mnet.arch import PRESETS

_CACHE: dict[str, Path] = {}

# A sys.meta_path finder that leaves only what a Jetson runtime install has (numpy, OpenCV, onnxruntime,
# typer, rich): torch, mnet.search (which needs torch), the onnx package and tensorrt cannot be imported.
BLOCK_HEAVY = textwrap.dedent("""
    import importlib.abc, sys
    class _BlockHeavy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx", "tensorrt") or name.startswith("mnet.search"):
                raise ImportError("blocked for this test: " + name)
            return None
    sys.meta_path.insert(0, _BlockHeavy())
""")


def trained_checkpoint(colour_data: Path, tmp_path_factory) -> Path:
    """RUN/best.pt of a tiny MNet trained one epoch on the colour dataset (cached for the session)."""
    key = f"ckpt:{colour_data}"
    if key not in _CACHE:
        from mnet.search.train import TrainConfig, train

        out = tmp_path_factory.mktemp("export_run")
        train(colour_data, PRESETS["tiny"].sample(random.Random(0)), out, TrainConfig(epochs=1, lr=0.05, batch_size=32))
        _CACHE[key] = out / "best.pt"
    return _CACHE[key]


def exported_bundle(colour_data: Path, tmp_path_factory) -> Path:
    """A bundle exported from `trained_checkpoint` with parity on the colour train split (cached)."""
    key = f"bundle:{colour_data}"
    if key not in _CACHE:
        from mnet.export.onnx import export_onnx

        out = tmp_path_factory.mktemp("export_bundle") / "bundle"
        export_onnx(trained_checkpoint(colour_data, tmp_path_factory), out, data_root=colour_data)
        _CACHE[key] = out
    return _CACHE[key]


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (this venv), capturing text output."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def qdq_conv_model(bias: str = "float", activations: str = "int8", *, zero_point: int = 0,
                   per_channel_activation: bool = False):
    """A hand-made QDQ graph in onnxruntime's layout: input -> Q/DQ -> Conv(DQ(int8 weights), bias) -> pool
    -> logits (input 'input' N x 3 x 24 x 32, 3 classes, like the tiny bundle).

    bias: "float" (a plain initializer) or "int32" (onnxruntime's QuantizeBias default: DQ node
    'b_DequantizeLinear' of initializer 'b_quantized'); activations: zero point type "int8" or "uint8".
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    zp_type = np.int8 if activations == "int8" else np.uint8
    x_scale = np.full(3, 0.02, np.float32) if per_channel_activation else np.array(0.02, np.float32)
    x_zp = np.full(x_scale.shape, zero_point, zp_type)
    inits = [numpy_helper.from_array(x_scale, "x_scale"), numpy_helper.from_array(x_zp, "x_zero_point"),
             numpy_helper.from_array(rng.integers(-127, 128, (3, 3, 1, 1)).astype(np.int8), "w_quantized"),
             numpy_helper.from_array(np.full(3, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(3, np.int8), "w_zero_point")]
    act_axis = {"axis": 1} if per_channel_activation else {}
    nodes = [helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero_point"], ["x_q"], "x_QuantizeLinear",
                              **act_axis),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero_point"], ["x_dq"], "x_DequantizeLinear",
                              **act_axis),
             helper.make_node("DequantizeLinear", ["w_quantized", "w_scale", "w_zero_point"], ["w"],
                              "w_DequantizeLinear", axis=0)]
    if bias == "int32":
        inits += [numpy_helper.from_array(np.array([5, -3, 1], np.int32), "b_quantized"),
                  numpy_helper.from_array(np.full(3, 0.0002, np.float32), "b_scale"),
                  numpy_helper.from_array(np.zeros(3, np.int32), "b_zero_point")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_quantized", "b_scale", "b_zero_point"], ["b"],
                                      "b_DequantizeLinear", axis=0))
    else:
        inits.append(numpy_helper.from_array(np.array([0.001, -0.0006, 0.0002], np.float32), "b"))
    nodes += [helper.make_node("Conv", ["x_dq", "w", "b"], ["y"], "conv"),
              helper.make_node("GlobalAveragePool", ["y"], ["p"], "pool"),
              helper.make_node("Flatten", ["p"], ["logits"], "flatten")]
    graph = helper.make_graph(nodes, "qdq",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 24, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model
