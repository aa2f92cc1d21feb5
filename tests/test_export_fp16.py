"""fp16 accuracy: `mnet export fp16 BUNDLE DATA` writes model.fp16.onnx and records its accuracy drop vs fp32
(metrics.fp16), which makes fp16 eligible for `--precision auto` on the model files it measured, and only those."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import mnet.runtime.backends as backends
import mnet.runtime.benchmark as benchmark
from mnet.bundle import load_bundle
from mnet.cli import main
from mnet.export.fp16 import convert_to_fp16, cpu_reference, export_fp16
from mnet.io import sha256_file
from mnet.runtime.backends import OnnxRuntimeBackend
from mnet.runtime.benchmark import accuracy_drop
from mnet.runtime.evaluate import evaluate_bundle
from test_export_support import copy_bundle, exported_bundle


@pytest.fixture
def bundle(colour_data, tmp_path_factory, tmp_path):
    return copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")


@pytest.fixture
def measured(bundle, colour_data):
    return bundle, export_fp16(bundle, colour_data)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _as_fp16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def test_cpu_reference_keeps_fp16_activations_that_onnxruntime_cpu_drops(bundle):
    half = convert_to_fp16(onnx.load(str(bundle / "model.onnx")))
    x = np.random.default_rng(0).normal(size=(16, 3, 24, 32)).astype(np.float32)
    fp32, plain, ref = (_run(m, x) for m in (onnx.load(str(bundle / "model.onnx")), half, cpu_reference(half)))
    # onnxruntime's CPU provider runs the half graph in float32 throughout: its logits are no fp16 values
    assert not np.array_equal(_as_fp16(plain), plain)
    # the reference rounds every op's output, the last one included, to fp16 — and stays close to fp32
    assert np.array_equal(_as_fp16(ref), ref) and not np.array_equal(ref, fp32)
    np.testing.assert_allclose(ref, fp32, atol=2e-2)


def test_export_fp16_records_the_measured_drop(measured, colour_data):
    b, report = measured
    card = load_bundle(b).card
    rec = card.metrics["fp16"]
    assert rec["file"] == "model.fp16.onnx" and rec["sha256"] == sha256_file(b / "model.fp16.onnx") == report.sha256
    assert rec["source_sha256"] == sha256_file(b / "model.onnx")
    assert (rec["split"], rec["n"], set(rec["by_split"])) == ("dev", 30, {"dev", "test"})
    assert rec["drop_points"] == pytest.approx(100 * (rec["fp32_accuracy"] - rec["accuracy"]))
    assert 0 <= rec["top1_agreement"] <= 1 and "fp16 weights and activations" in rec["measured_with"]
    # the fp32 side is the bundle's own number, as `mnet evaluate` computes it
    assert rec["fp32_accuracy"] == pytest.approx(evaluate_bundle(b, colour_data, "dev").accuracy, abs=1e-9)
    assert rec["by_split"]["test"]["fp32_accuracy"] == pytest.approx(
        evaluate_bundle(b, colour_data, "test").accuracy, abs=1e-9)
    # the fp16 file is a half-precision graph with float32 I/O
    half = onnx.load(str(b / "model.fp16.onnx"))
    assert {t.data_type for t in half.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert accuracy_drop(card, "fp16", rec["sha256"]) == (rec["drop_points"], "")


def _fp16_device(monkeypatch, model: str) -> None:
    """A stand-in device that runs fp16: a TensorRT 11 engine is built from model.fp16.onnx, an engine with
    TensorRT's FP16 flag (or onnxruntime's TensorRT provider) from model.onnx. fp16 is timed fastest."""
    real = backends.open_backend

    def open_backend(b, backend="auto", precision="fp32", **kw):
        if precision != "fp16":
            return real(b, backend, precision, **kw)
        net = OnnxRuntimeBackend(b.path / model, "cpu")  # measure_precisions passes the loaded Bundle
        net.precision = "fp16"
        return net

    monkeypatch.setattr(backends, "open_backend", open_backend)
    monkeypatch.setattr(benchmark, "_block_ms", lambda net, x, reps, s: [1.0 if net.precision == "fp16" else 2.0] * 3)


def _bench(b, drop: float) -> dict:
    # the tolerance covers the measured drop (on 30 dev images one flipped image is 3.3 points)
    _, e = benchmark.measure_precisions(b, rounds=1, min_seconds=0.01, record=False,
                                        tolerance=max(benchmark.ACCURACY_TOLERANCE_POINTS, drop))
    return e


@pytest.mark.parametrize("model", ["model.fp16.onnx", "model.onnx"])
def test_measured_fp16_becomes_eligible_and_is_chosen_when_fastest(measured, monkeypatch, model):
    b, report = measured
    _fp16_device(monkeypatch, model)
    assert main(["bundle", "bench", str(b), "--all", "--rounds", "1", "--seconds", "0.01",
                 "--tolerance", str(max(0.5, report.drop_points))]) == 0
    e = next(iter(load_bundle(b).card.precision_choice.values()))
    assert e["chosen"] == "fp16" and e["accuracy_drop"]["fp16"] == pytest.approx(report.drop_points)
    assert "fp16" not in e["ineligible"]


def test_unmeasured_fp16_is_ineligible_and_says_how_to_measure_it(bundle, monkeypatch):
    assert main(["export", "fp16", str(bundle)]) == 0  # the file only: nothing measured
    assert (bundle / "model.fp16.onnx").is_file() and "fp16" not in load_bundle(bundle).card.metrics
    _fp16_device(monkeypatch, "model.fp16.onnx")
    e = _bench(bundle, 0.0)
    assert e["chosen"] == "fp32" and "mnet export fp16 BUNDLE DATA" in e["ineligible"]["fp16"]


def _perturbed(path) -> onnx.ModelProto:
    m = onnx.load(str(path))
    t = m.graph.initializer[0]
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
    return m


def test_stale_fp16_measurement_is_ineligible_with_the_reason(measured, colour_data, monkeypatch):
    b, report = measured
    # model.fp16.onnx remade from another fp32 model after the measurement: the engine built from it is not
    # the model metrics.fp16 measured
    onnx.save(_perturbed(b / "model.fp16.onnx"), str(b / "model.fp16.onnx"))
    _fp16_device(monkeypatch, "model.fp16.onnx")
    e = _bench(b, report.drop_points)
    assert e["chosen"] == "fp32" and e["accuracy_drop"]["fp16"] is None
    why = e["ineligible"]["fp16"]
    assert "sha256 differs" in why and "mnet export fp16 BUNDLE DATA" in why
    # measured again: eligible again
    again = export_fp16(b, colour_data)
    assert _bench(b, again.drop_points)["chosen"] == "fp16"


def test_fp16_flag_build_from_a_changed_model_onnx_is_ineligible(measured, monkeypatch):
    b, report = measured
    onnx.save(_perturbed(b / "model.onnx"), str(b / "model.onnx"))  # not the model.onnx model.fp16.onnx came from
    _fp16_device(monkeypatch, "model.onnx")
    e = _bench(b, report.drop_points)
    assert e["chosen"] == "fp32" and "sha256 differs" in e["ineligible"]["fp16"]


def test_cli_export_fp16_prints_the_drop_and_refuses_a_bad_split(bundle, colour_data, capsys):
    assert main(["export", "fp16", str(bundle), str(colour_data), "--split", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and len(err.strip().splitlines()) == 1
    assert not (bundle / "model.fp16.onnx").exists()  # the data is checked before anything is written
    assert main(["export", "fp16", str(bundle), str(colour_data)]) == 0
    out = capsys.readouterr().out
    rec = load_bundle(bundle).card.metrics["fp16"]
    assert "model.fp16.onnx" in out and f"{rec['drop_points']:+.2f}" in out and "dev (n=30)" in out
