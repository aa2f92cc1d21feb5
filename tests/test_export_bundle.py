"""The bundle card and engine sidecar contracts, load_bundle errors, update_card, torch-free imports."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from mnet.arch import PRESETS
from mnet.bundle import (CARD_FILE, BundleCard, EngineInfo, engine_filename, load_bundle, update_card,
                         write_card)
from mnet.errors import CheckpointError, ConfigError
from mnet.preprocess import Preprocess
from test_export_support import BLOCK_HEAVY, copy_bundle, exported_bundle, run_python


@pytest.fixture(scope="module")
def bundle(colour_data, tmp_path_factory):
    return exported_bundle(colour_data, tmp_path_factory)


def _card(**kw) -> BundleCard:
    arch = PRESETS["tiny"].sample(random.Random(1))
    base = dict(classes=("A", "B", "C"), preprocess=Preprocess((24, 32)), params=arch.num_params(), arch=arch,
                macs=arch.macs(), metrics={"dev": {"accuracy": 0.9}}, tools={"opset": 17}, created="2026-01-01T00:00:00+00:00")
    return BundleCard(**{**base, **kw})


def _sidecar(**kw) -> EngineInfo:
    base = dict(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability=(8, 7), precision="fp16", min_batch=1,
                opt_batch=8, max_batch=8, input_name="input", output_name="logits", input_hw=(24, 32),
                onnx_file="model.onnx", onnx_sha256="0" * 64)
    return EngineInfo(**{**base, **kw})


def test_card_json_round_trip():
    for card in (_card(), _card(batch=4, latency={"ort/cpu/fp32/b1": {"p50_ms": 1.5}}),
                 _card(arch=None, model_name="resnet18", macs=None)):
        d = card.to_json()
        assert json.loads(json.dumps(d)) == d
        assert BundleCard.from_json(d) == card
    assert _card().to_json()["input"] == {"name": "input", "shape": ["batch", 3, 24, 32], "dtype": "float32",
                                          "layout": "NCHW"}


@pytest.mark.parametrize("kw, field", [
    ({"classes": ("A",)}, "classes"),
    ({"classes": ("A", "A", "B")}, "classes"),
    ({"params": -1}, "params"),
    ({"batch": 0}, "batch"),
    ({"output": "softmax"}, "output"),
    ({"arch": None}, "arch"),
    ({"classes": ("A", "B")}, "arch.num_classes"),
    ({"preprocess": Preprocess((48, 64))}, "preprocessing.input_hw"),
    ({"metrics": []}, "metrics"),
    ({"schema_version": 2}, "schema_version"),
    ({"opset": 99}, "opset"),
])
def test_card_validation_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        _card(**kw)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("classes"), r"missing field\(s\) \['classes'\]"),
    (lambda d: d.update(preprocessing={"mean": [0, 0, 0]}), "field 'preprocessing'"),
    (lambda d: d["arch"].update(width=-3), "field 'arch'"),
    (lambda d: d.update(input={"name": "input"}), "field 'input'"),
    (lambda d: d.update(schema_version=7), "schema_version"),
])
def test_card_from_json_names_the_field(mutate, match):
    d = _card().to_json()
    mutate(d)
    with pytest.raises(ConfigError, match=match):
        BundleCard.from_json(d)


def test_engine_sidecar_round_trip_and_validation():
    info = _sidecar()
    assert EngineInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    with pytest.raises(ConfigError, match="'precision'"):
        _sidecar(precision="int4")
    with pytest.raises(ConfigError, match="'max_batch'"):
        _sidecar(min_batch=4, opt_batch=2)
    with pytest.raises(ConfigError, match="missing"):
        EngineInfo.from_json({"precision": "fp16"})


def test_engine_filename_is_safe_and_tells_version_and_gpu():
    assert engine_filename("fp16", "10.3.0", "Orin") == "model.fp16.10.3.0.orin.engine"
    assert engine_filename("int8", "8.6.1.post1", "NVIDIA GeForce RTX 4090") == \
        "model.int8.8.6.1.post1.nvidia-geforce-rtx-4090.engine"
    with pytest.raises(ConfigError, match="precision"):
        engine_filename("fp64", "10.3.0", "Orin")


def test_load_bundle_errors_name_the_file(bundle, tmp_path):
    with pytest.raises(CheckpointError, match="bundle not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no mnet.json"):
        load_bundle(tmp_path / "empty")
    broken = copy_bundle(bundle, tmp_path / "broken")
    (broken / CARD_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"mnet.json: not valid JSON"):
        load_bundle(broken)
    (broken / CARD_FILE).write_text(json.dumps({**json.loads((bundle / CARD_FILE).read_text()), "params": "many"}))
    with pytest.raises(CheckpointError, match=r"mnet.json: bundle card field 'params'"):
        load_bundle(broken)
    no_model = copy_bundle(bundle, tmp_path / "no_model")
    (no_model / "model.onnx").unlink()
    with pytest.raises(CheckpointError, match="model.onnx is missing"):
        load_bundle(no_model)


def test_update_card_merges_metrics_and_validates(bundle, tmp_path):
    b = copy_bundle(bundle, tmp_path / "b")
    before = load_bundle(b).card
    card = update_card(b, latency={"onnxruntime/cpu/fp32/b1": {"p50_ms": 0.4}})
    card = update_card(b, metrics={"int8": {"accuracy": 0.5}}, latency={"onnxruntime/cpu/int8/b1": {"p50_ms": 0.3}})
    assert card == load_bundle(b).card
    assert set(card.metrics) == set(before.metrics) | {"int8"}  # merged, parity and dev kept
    assert set(card.latency) == {"onnxruntime/cpu/fp32/b1", "onnxruntime/cpu/int8/b1"}
    text = (b / CARD_FILE).read_text()
    with pytest.raises(ConfigError, match="field 'params'"):
        update_card(b, params=-5)
    with pytest.raises(ConfigError, match="unknown card field"):
        update_card(b, colour="red")
    assert (b / CARD_FILE).read_text() == text  # nothing written on a refused change
    assert sorted(p.name for p in b.iterdir()) == ["mnet.json", "model.onnx"]  # no temp files left
    write_card(b, dataclasses.replace(card, latency={}))
    assert load_bundle(b).card.latency == {}


def test_bundle_and_runtime_import_and_run_without_torch_or_onnx(bundle, colour_data):
    code = BLOCK_HEAVY + f"""
import sys
import mnet.bundle, mnet.runtime.backends, mnet.runtime.evaluate
from mnet.runtime.backends import open_backend
from mnet.runtime.evaluate import evaluate_bundle
m = evaluate_bundle({str(bundle)!r}, {str(colour_data)!r}, split="dev", backend="auto")
with open_backend({str(bundle)!r}) as be:
    print(be.name, round(m.accuracy, 6))
try:
    open_backend({str(bundle)!r}, backend="torch")
except Exception as e:
    print(type(e).__name__)
assert not [k for k in sys.modules if k.split(".")[0] in ("torch", "onnx")], "torch or onnx was imported"
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    name, acc, err = r.stdout.split()
    assert name == "onnxruntime" and 0 <= float(acc) <= 1 and err == "BackendError"
