"""Precision chosen by measurement: `mnet bundle bench --all` → card.precision_choice → `--precision auto`."""

from __future__ import annotations

import json
import logging
import random
import shutil

import cv2
import numpy as np
import pytest

import mnet.runtime.benchmark as benchmark
from mnet.arch import PRESETS
from mnet.bundle import BundleCard, load_bundle, precision_choice_key, update_card
from mnet.cli import main
from mnet.errors import ConfigError
from mnet.io import sha256_file
from mnet.preprocess import Preprocess
from mnet.runtime.backends import device_label, open_backend
from mnet.runtime.benchmark import choose_precision
from test_export_support import copy_bundle, exported_bundle


def _entry(**kw) -> dict:
    base = dict(backend="onnxruntime", device="cpu:Test CPU", chosen="int8", measured={"fp32": 2.0, "int8": 1.0},
                accuracy_drop={"fp32": 0.0, "int8": 0.1}, tolerance_points=0.5, measured_at="2026-01-01T00:00:00+00:00")
    return {**base, **kw}


def _card(choice: dict) -> BundleCard:
    arch = PRESETS["tiny"].sample(random.Random(1))
    return BundleCard(classes=("A", "B", "C"), preprocess=Preprocess((24, 32)), params=arch.num_params(), arch=arch,
                      precision_choice=choice)


def test_card_precision_choice_round_trips_and_validates():
    choice = {"onnxruntime/cpu:Test CPU": _entry(),
              "tensorrt/cuda:Orin": _entry(backend="tensorrt", device="cuda:Orin", chosen="fp16",
                                           measured={"fp32": 3.0, "fp16": 1.2})}
    card = _card(choice)
    d = json.loads(json.dumps(card.to_json()))
    assert BundleCard.from_json(d) == card and d["precision_choice"] == choice
    assert BundleCard.from_json({k: v for k, v in d.items() if k != "precision_choice"}).precision_choice == {}
    for bad, field in [(_entry(chosen="fp16"), ".chosen"), (_entry(measured={"int8": 1.0}, chosen="int8"), ".measured"),
                       (_entry(measured={"fp32": 0, "int8": 1.0}), ".measured"), (_entry(tolerance_points=-1), ".tolerance"),
                       (_entry(device="cpu:Other"), ".device"), ("int8", "")]:
        with pytest.raises(ConfigError, match=r"field 'precision_choice\['onnxruntime/cpu:Test CPU'\]" + field):
            _card({"onnxruntime/cpu:Test CPU": bad})


@pytest.mark.parametrize("drops, tolerance, chosen", [
    ({"int8": 0.1, "fp16": 0.0}, 0.5, "int8"),
    ({"int8": 0.8, "fp16": 0.0}, 0.5, "fp16"),    # int8 is fastest but beyond the tolerance
    ({"int8": 0.8, "fp16": None}, 0.5, "fp32"),   # fp16 has no recorded accuracy
    ({"int8": 0.5, "fp16": None}, 0.5, "int8"),   # the tolerance itself is within it
    ({"int8": 0.1}, 0.0, "fp32"),
])
def test_choose_precision_fastest_within_tolerance(drops, tolerance, chosen):
    measured = {"fp32": 3.0, "fp16": 2.0, "int8": 1.0}
    got, excluded = choose_precision(measured, {"fp32": 0.0, **drops}, tolerance)
    assert got == chosen
    assert all(p in excluded for p, d in drops.items() if d is None or d > tolerance)
    assert choose_precision({"fp32": 1.0, "int8": 1.0}, {"int8": 0.0})[0] == "fp32"  # a tie goes to fp32


@pytest.fixture
def int8_bundle(colour_data, tmp_path_factory, tmp_path, monkeypatch):
    """A bundle whose "int8" model is a copy of the fp32 one, timed by a stand-in clock: int8 twice as fast."""
    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    shutil.copyfile(b / "model.onnx", b / "model.int8.onnx")
    update_card(b, metrics={"int8": {"drop_points": 0.1, "sha256": sha256_file(b / "model.int8.onnx")}})
    monkeypatch.setattr(benchmark, "_block_ms", lambda net, x, reps, s: [1.0 if net.precision == "int8" else 2.0] * 3)
    return b


def test_bench_all_records_the_fastest_within_tolerance_and_auto_uses_it(int8_bundle, caplog):
    other = _entry(backend="tensorrt", device="cuda:Orin", chosen="fp16", measured={"fp32": 3.0, "fp16": 1.2})
    update_card(int8_bundle, precision_choice={"tensorrt/cuda:Orin": other})  # measured earlier on a Jetson
    assert main(["bundle", "bench", str(int8_bundle), "--all", "--rounds", "2", "--seconds", "0.01"]) == 0
    card = load_bundle(int8_bundle).card
    key = precision_choice_key("onnxruntime", device_label("cpu"))
    e = card.precision_choice[key]
    assert card.precision_choice["tensorrt/cuda:Orin"] == other  # both devices kept
    assert (e["chosen"], e["measured"], e["tolerance_points"]) == ("int8", {"fp32": 2.0, "int8": 1.0}, 0.5)
    assert e["accuracy_drop"] == {"fp32": 0.0, "int8": 0.1} and e["rounds_ms"]["int8"] == [1.0, 1.0]
    assert "fp16" in e["unavailable"] and "fp16" not in e["measured"]  # onnxruntime CPU has no fp16
    assert {"onnxruntime/cpu/fp32/b1", "onnxruntime/cpu/int8/b1"} <= set(card.latency)
    with caplog.at_level(logging.WARNING), open_backend(int8_bundle, "onnxruntime", "auto") as net:
        assert net.precision == "int8" and net.model_path.name == "model.int8.onnx"
    assert not caplog.records


def test_bench_all_never_chooses_a_precision_beyond_tolerance_or_without_accuracy(int8_bundle):
    key = precision_choice_key("onnxruntime", device_label("cpu"))
    update_card(int8_bundle, metrics={"int8": {"drop_points": 0.8, "sha256": sha256_file(int8_bundle / "model.onnx")}})
    assert main(["bundle", "bench", str(int8_bundle), "--all", "--rounds", "1", "--seconds", "0.01"]) == 0
    e = load_bundle(int8_bundle).card.precision_choice[key]
    assert e["chosen"] == "fp32" and "0.80 points > tolerance 0.5" in e["ineligible"]["int8"]
    assert main(["bundle", "bench", str(int8_bundle), "--all", "--tolerance", "1.0", "--seconds", "0.01"]) == 0
    assert load_bundle(int8_bundle).card.precision_choice[key]["chosen"] == "int8"
    update_card(int8_bundle, metrics={"int8": {"drop_points": 0.1, "sha256": "0" * 64}})  # another int8 model
    _, e = benchmark.measure_precisions(int8_bundle, rounds=1, min_seconds=0.01, record=False)
    assert e["chosen"] == "fp32" and "sha256 differs" in e["ineligible"]["int8"]
    update_card(int8_bundle, metrics={"int8": {"accuracy": 0.9}})  # no drop recorded
    _, e = benchmark.measure_precisions(int8_bundle, rounds=1, min_seconds=0.01, record=False)
    assert e["chosen"] == "fp32" and "no int8 accuracy" in e["ineligible"]["int8"]


def test_auto_falls_back_to_fp32_with_one_warning_when_unmeasured(int8_bundle, caplog):
    with caplog.at_level(logging.WARNING), open_backend(int8_bundle, "onnxruntime", "auto") as net:
        assert net.precision == "fp32" and net.model_path.name == "model.onnx"
    (rec,) = caplog.records
    assert "using fp32" in rec.getMessage() and f"mnet bundle bench {int8_bundle} --all" in rec.getMessage()


def test_bench_all_refuses_a_precision_option(int8_bundle, capsys):
    assert main(["bundle", "bench", str(int8_bundle), "--all", "--precision", "int8"]) == 2
    assert "drop --precision int8" in capsys.readouterr().err


def test_grade_cli_precision_auto_runs_and_reports_the_recorded_choice(int8_bundle, tmp_path):
    assert main(["bundle", "bench", str(int8_bundle), "--all", "--rounds", "1", "--seconds", "0.01"]) == 0
    shots = tmp_path / "shots"
    shots.mkdir()
    for i in range(2):
        cv2.imwrite(str(shots / f"{i}.jpg"), np.full((48, 64, 3), 200, np.uint8))
    events = tmp_path / "e.jsonl"
    assert main(["grade", str(int8_bundle), "--source", str(shots), "--full-frame", "--backend", "onnxruntime",
                 "--precision", "auto", "--events", str(events)]) == 0
    got = [json.loads(line) for line in events.read_text().splitlines()]
    assert len(got) == 2 and all(e["model"].endswith(":int8") for e in got)


def test_auto_on_tensorrt_takes_the_choice_recorded_for_this_gpu(int8_bundle, monkeypatch):
    import mnet.runtime.backends as backends

    monkeypatch.setattr(backends, "cuda_runtime", lambda: type("Cuda", (), {"device": lambda self: ("Orin", (8, 7))})())
    update_card(int8_bundle, precision_choice={"tensorrt/cuda:Orin": _entry(
        backend="tensorrt", device="cuda:Orin", chosen="fp16", measured={"fp32": 3.0, "fp16": 1.2})})
    b = load_bundle(int8_bundle)
    assert backends._recorded_precision(b, "tensorrt", "auto") == ("tensorrt", "fp16")
    # backend auto: TensorRT's choice only where its engine runs here, else this CPU's (none: fp32)
    monkeypatch.setattr(backends, "tensorrt_available", lambda: True)
    assert backends._recorded_precision(b, "auto", "cpu") == ("auto", "fp32")
    monkeypatch.setattr(backends, "_engine_here", lambda bundle, precision: precision == "fp16")
    assert backends._recorded_precision(b, "auto", "cpu") == ("tensorrt", "fp16")
