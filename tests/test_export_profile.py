"""ORT per-node profiles: times add up, roles come from the exporter's names, int8 really runs int8 kernels."""

from __future__ import annotations

import numpy as np
import pytest
from mnet.calibration.int8 import calibrate_int8
from mnet.export.profile import ROLES, node_role, profile_onnx
from test_export_support import copy_bundle, exported_bundle

from mnet.errors import BackendError, ConfigError


@pytest.fixture(scope="module")
def bundle(colour_data, tmp_path_factory):
    return exported_bundle(colour_data, tmp_path_factory)


def test_node_role_from_exporter_names():
    assert node_role("/cells.0/dw/Conv_output_0_nchwc", "Conv") == "depthwise"
    assert node_role("/cells.11/dw/Conv_token_87", "QLinearConv") == "depthwise"
    assert node_role("/cells.3/pw/Conv_token_34", "QLinearConv") == "pointwise"
    assert node_role("/stem/conv/Conv_token_7", "QLinearConv") == "stem"
    assert node_role("/AveragePool_3_output_0_nchwc", "AveragePool") == "pool"
    assert node_role("pool_0", "QLinearAveragePool") == "pool"
    assert node_role("Transpose_token_6", "Transpose") == "other"


def test_fp32_profile_adds_up(bundle):
    prof = profile_onnx(bundle / "model.onnx", batch=2, runs=3, warmup=1)
    assert prof.batch == 2 and prof.runs == 3 and prof.run_ms > 0
    roles, kernels = prof.by_role(), prof.by_kernel()
    assert set(roles) == set(ROLES)
    assert sum(roles.values()) == pytest.approx(prof.nodes_ms) == pytest.approx(sum(kernels.values()))
    assert roles["depthwise"] > 0 and roles["pointwise"] > 0 and roles["stem"] > 0
    assert "Conv" in kernels and list(kernels.values()) == sorted(kernels.values(), reverse=True)
    layers = prof.by_layer()
    assert {f"cells.{i}/{r}" for i in range(4) for r in ("dw", "pw")} | {"stem"} <= set(layers)
    assert sum(layers.values()) == pytest.approx(prof.nodes_ms)
    assert layers["cells.0/dw"] == pytest.approx(sum(n.ms for n in prof.nodes if "/cells.0/dw/" in n.name))
    top = prof.top(3)
    assert len(top) == 3 and top[0].ms >= top[1].ms >= top[2].ms
    j = prof.to_json(top=2)
    assert j["model"] == "model.onnx" and len(j["top_nodes"]) == 2 and j["by_role_ms"] == roles


def test_given_input_sets_the_batch(bundle):
    x = np.zeros((3, 3, 24, 32), np.float32)
    assert profile_onnx(bundle / "model.onnx", x=x, runs=1, warmup=0).batch == 3


def test_int8_model_runs_int8_convolutions(bundle, colour_data, tmp_path):
    """Every depthwise and pointwise conv of the QDQ model must run as ORT's QLinearConv: a Q/DQ pair that
    ORT leaves unfused runs the conv in fp32 plus conversions, slower than the fp32 model."""
    b = copy_bundle(bundle, tmp_path / "b")
    calibrate_int8(b, colour_data, samples=32)
    prof = profile_onnx(b / "model.int8.onnx", runs=2, warmup=1)
    # a layer's own Q/DQ conversions carry its name too; everything else there must be an int8 conv
    convs = [n for n in prof.nodes if n.role in ("depthwise", "pointwise")
             and n.kernel not in ("QuantizeLinear", "DequantizeLinear")]
    assert {n.kernel for n in convs} == {"QLinearConv"}, [(n.name, n.kernel) for n in convs]
    assert len(convs) == 2 * 4  # tiny: 4 layers, one dw and one pw each


def test_errors(bundle, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        profile_onnx(tmp_path / "missing.onnx")
    with pytest.raises(ConfigError, match="runs 0"):
        profile_onnx(bundle / "model.onnx", runs=0)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BackendError, match="cannot load"):
        profile_onnx(bad)
