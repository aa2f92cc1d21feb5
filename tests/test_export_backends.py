"""Backends: one interface, probabilities that agree with PyTorch, honest provider reports, clear errors."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from mnet.errors import BackendError, ConfigError
from mnet.runtime import backends as be_mod
from mnet.runtime.backends import OnnxRuntimeBackend, TorchBackend, open_backend, ort_providers, softmax
from mnet.runtime.evaluate import evaluate_bundle
from test_export_support import copy_bundle, exported_bundle, trained_checkpoint

_CPU, _CUDA, _TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.fixture(scope="module")
def bundle(colour_data, tmp_path_factory):
    return exported_bundle(colour_data, tmp_path_factory)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(size=(7, 3, 24, 32)).astype(np.float32)


def test_onnxruntime_and_torch_agree_on_probabilities(bundle, x):
    with open_backend(bundle, "onnxruntime") as o, open_backend(bundle, "torch") as t:
        assert isinstance(o, OnnxRuntimeBackend) and isinstance(t, TorchBackend)
        po, pt = o.infer(x), t.infer(x)
        assert o.providers == (_CPU,) and t.providers == ("cpu",)
        assert "onnxruntime fp32 on CPUExecutionProvider" == o.describe()
    assert po.shape == (7, 3) and po.dtype == np.float32
    np.testing.assert_allclose(po.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(po, pt, atol=1e-5)


def test_auto_without_tensorrt_is_onnxruntime(bundle, x):
    with open_backend(bundle) as b:
        assert b.name == "onnxruntime"
        assert b.infer(x[:0]).shape == (0, 3)
        with pytest.raises(BackendError, match=r"input of shape \(2, 3, 12, 16\).*\(N, 3, 24, 32\)"):
            b.infer(np.zeros((2, 3, 12, 16), np.float32))


def test_evaluate_bundle_matches_the_checkpoint_on_dev(bundle, colour_data, tmp_path_factory):
    from mnet.search.checkpoint import load_checkpoint

    ckpt = load_checkpoint(trained_checkpoint(colour_data, tmp_path_factory))
    for backend in ("onnxruntime", "torch"):
        m = evaluate_bundle(bundle, colour_data, split="dev", backend=backend, batch_size=7)
        assert m.n == 30 and m.accuracy == pytest.approx(ckpt.metrics["dev"]["accuracy"])


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(p, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-6)


def test_provider_choice():
    all3 = [_TRT, _CUDA, _CPU]
    assert ort_providers("auto", all3) == (all3, False)
    assert ort_providers("auto", ["AzureExecutionProvider", _CPU]) == ([_CPU], False)
    assert ort_providers("cuda", all3) == ([_CUDA, _CPU], True)
    assert ort_providers([(_TRT, {"trt_fp16_enable": True}), _CPU], all3)[1] is True
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        ort_providers("cuda", [_CPU])
    with pytest.raises(ConfigError, match="providers 'gpu'"):
        ort_providers("gpu", all3)


class _FallbackSession:
    """Like onnxruntime-gpu on a machine without CUDA libraries: CUDA listed, silently dropped."""

    real = ort.InferenceSession

    def __new__(cls, path, so=None, providers=None):
        names = [p[0] if isinstance(p, tuple) else p for p in providers or []]
        return cls.real(path, so, providers=[p for p in names if p == _CPU])


def test_reports_the_providers_the_session_really_got(bundle, monkeypatch, caplog):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [_CUDA, _CPU])
    monkeypatch.setattr(ort, "InferenceSession", _FallbackSession)
    with caplog.at_level(logging.WARNING, logger="mnet.runtime.backends"):
        b = OnnxRuntimeBackend(bundle / "model.onnx", "auto")
    assert b.providers == (_CPU,)
    assert "could not start CUDAExecutionProvider" in caplog.text
    with pytest.raises(BackendError, match="could not start CUDAExecutionProvider.*runs on CPUExecutionProvider"):
        OnnxRuntimeBackend(bundle / "model.onnx", "cuda")


def test_precision_and_name_errors(bundle, tmp_path):
    with pytest.raises(ConfigError, match="--backend 'openvino'"):
        open_backend(bundle, "openvino")
    with pytest.raises(ConfigError, match="--precision 'bf16'"):
        open_backend(bundle, "onnxruntime", "bf16")
    with pytest.raises(BackendError, match="fp16 with onnxruntime needs its TensorRT provider"):
        open_backend(bundle, "onnxruntime", "fp16")
    with pytest.raises(BackendError, match="torch backend runs fp32 only"):
        open_backend(bundle, "torch", "int8")
    with pytest.raises(BackendError, match="no fp32 TensorRT engine|TensorRT's Python package"):
        open_backend(bundle, "tensorrt")


def test_torch_backend_needs_the_source_checkpoint(bundle, tmp_path):
    from mnet.bundle import update_card

    b = copy_bundle(bundle, tmp_path / "b")
    update_card(b, source={"checkpoint": str(tmp_path / "gone.pt")})
    with pytest.raises(BackendError, match="gone.pt, which is not on this machine"):
        open_backend(b, "torch")


def test_tensorrt_missing_gives_one_line_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError) as e:
        be_mod.import_tensorrt()
    assert "\n" not in str(e.value) and "JetPack" in str(e.value) and "pip install tensorrt" in str(e.value)
    assert be_mod.tensorrt_available() is False


def test_exact_batch_pads_every_chunk_and_returns_only_real_rows():
    """The contract fixed-batch ONNX models and static-profile TensorRT engines (fixed-batch bundle, DLA) rely
    on: `_run` only ever sees `exact_batch` rows, padded with the last real one, and the padding is dropped."""

    class Fixed(be_mod.Backend):
        name, num_classes, exact_batch = "fixed", 2, 4

        def __init__(self):
            self.seen = []

        def _run(self, x):
            self.seen.append(len(x))
            return np.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)

    x = np.arange(6, dtype=np.float32)[:, None, None, None] * np.ones((6, 3, 2, 2), np.float32)
    b = Fixed()
    p = b.infer(x)
    assert b.seen == [4, 4] and p.shape == (6, 2)
    np.testing.assert_allclose(p, softmax(np.stack([np.arange(6), -np.arange(6)], 1)), atol=1e-6)
    assert b.infer(x[:1]).shape == (1, 2) and b.seen[-1] == 4
