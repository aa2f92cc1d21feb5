"""INT8 calibration: QDQ model written atomically, accuracies in the card, warning under 300 images."""

from __future__ import annotations

import logging
import re
import shutil

import onnx
import pytest

from mnet.bundle import load_bundle
from mnet.calibration.int8 import MIN_CALIBRATION_IMAGES, calibrate_int8, qdq_node_counts
from mnet.errors import BackendError, ConfigError, DataError
from mnet.export.onnx import read_card_metadata
from mnet.export.qdq import tensorrt_qdq_problems
from mnet.runtime.backends import open_backend
from test_export_support import copy_bundle, exported_bundle


@pytest.fixture(scope="module")
def calibrated(colour_data, tmp_path_factory):
    """(bundle dir, report, log records) of one default calibration (96 train images: warns)."""
    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path_factory.mktemp("int8") / "b")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mnet.calibration.int8")
    logger.addHandler(handler)
    try:
        report = calibrate_int8(b, colour_data)
    finally:
        logger.removeHandler(handler)
    return b, report, records


def test_writes_qdq_model_with_card(calibrated):
    b, report, _ = calibrated
    path = b / "model.int8.onnx"
    assert report.path == str(path) and path.is_file()
    counts = qdq_node_counts(path)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert read_card_metadata(path).classes == ("A", "B", "C")
    assert sorted(p.name for p in b.iterdir()) == ["mnet.json", "model.int8.onnx", "model.onnx"]


def test_records_fp32_and_int8_accuracy_in_card(calibrated):
    b, report, _ = calibrated
    int8 = load_bundle(b).card.metrics["int8"]
    assert int8["accuracy"] == report.accuracy and int8["fp32_accuracy"] == report.fp32_accuracy
    assert int8["drop_points"] == pytest.approx(100 * (report.fp32_accuracy - report.accuracy))
    assert int8["split"] == "dev" and int8["n"] == 30 and int8["calibration_images"] == 96
    assert int8["method"] == "minmax" and int8["per_channel"] is True and int8["tensorrt_compatible"] is True
    assert int8["format"] == "QDQ" and len(int8["sha256"]) == 64
    assert "parity" in load_bundle(b).card.metrics  # merged, not replaced


def test_every_dequantize_input_is_int8_and_the_flag_is_measured(calibrated):
    """TensorRT dequantises only int8 (NVIDIA/TensorRT#4542): no int32 biases, every DequantizeLinear input an
    int8 weight or the output of an int8 QuantizeLinear, and the card's flag is the graph check's verdict."""
    b, report, _ = calibrated
    g = onnx.load(str(b / "model.int8.onnx")).graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert dq
    for n in dq:
        x = n.input[0]
        if x in inits:
            assert inits[x].data_type == onnx.TensorProto.INT8, (n.name, inits[x].data_type)
        else:
            q = producer[x]
            assert q.op_type == "QuantizeLinear" and inits[q.input[2]].data_type == onnx.TensorProto.INT8, n.name
    assert tensorrt_qdq_problems(onnx.load(str(b / "model.int8.onnx"))) == []
    int8 = load_bundle(b).card.metrics["int8"]
    assert report.tensorrt_compatible is True and int8["tensorrt_compatible"] is True
    assert int8["tensorrt_problems"] == []


def test_int32_biases_make_the_flag_false(colour_data, tmp_path_factory, tmp_path, monkeypatch):
    """The flag is computed from the written graph: onnxruntime's int32 biases (what calibration used to
    write) give tensorrt_compatible false, the offending node in the card and a warning."""
    import onnxruntime.quantization as oq

    real = oq.quantize_static

    def int32_biases(*a, **kw):
        kw["extra_options"] = {**kw.get("extra_options", {}), "QuantizeBias": True}
        return real(*a, **kw)

    monkeypatch.setattr(oq, "quantize_static", int32_biases)
    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    report = calibrate_int8(b, colour_data, samples=32)
    int8 = load_bundle(b).card.metrics["int8"]
    assert report.tensorrt_compatible is False and int8["tensorrt_compatible"] is False
    assert re.match(r"DequantizeLinear '[^']+': input '[^']+' is INT32", int8["tensorrt_problems"][0])
    assert any("not loadable by TensorRT" in w for w in report.warnings)


def test_warns_under_300_images(calibrated):
    _, report, records = calibrated
    assert report.calibration_images < MIN_CALIBRATION_IMAGES
    assert len(report.warnings) == 1 and "only 96 calibration images" in report.warnings[0]
    assert any(r.levelno == logging.WARNING and "calibration images" in r.getMessage() for r in records)


@pytest.mark.parametrize("split", ["dev", "test"])
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_cli_evaluate_prints_the_cards_accuracy(calibrated, colour_data, capsys, tmp_path, split, precision):
    """Calibration measured the dev split and the labelled test split; `mnet evaluate` on either, at either
    precision, prints the card's number and says it is the same."""
    from mnet.cli import main

    b, report, _ = calibrated
    assert set(report.by_split) == {"dev", "test"} and report.by_split["dev"]["accuracy"] == report.accuracy
    rc = main(["evaluate", str(b), str(colour_data), "--backend", "onnxruntime", "--precision", precision,
               "--split", split, "--plot", str(tmp_path / "cm.png")])
    assert rc == 0
    out = capsys.readouterr().out
    printed = float(re.search(r"accuracy \(weighted average recall\) ([0-9.]+)", out).group(1))
    row = load_bundle(b).card.metrics["int8"]["by_split"][split]
    assert printed == pytest.approx(row["accuracy" if precision == "int8" else "fp32_accuracy"], abs=5e-5)
    assert re.search(rf"card: {precision} accuracy on {split} [0-9.]+ \(onnxruntime CPU\) — the same", out)


def test_cli_calibrate_int8_prints_table_and_warning(colour_data, tmp_path_factory, tmp_path, capsys):
    from mnet.cli import main

    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    assert main(["calibrate", "int8", str(b), str(colour_data), "--samples", "40", "--method", "percentile",
                 "--no-per-channel"]) == 0
    out, err = capsys.readouterr()
    assert "int8 accuracy" in out and "only 40 calibration images" in err
    int8 = load_bundle(b).card.metrics["int8"]
    assert int8["method"] == "percentile" and int8["per_channel"] is False and int8["calibration_images"] == 40


def test_uint8_activations_are_marked_not_for_tensorrt(colour_data, tmp_path_factory, tmp_path, capfd):
    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    capfd.readouterr()
    report = calibrate_int8(b, colour_data, samples=32, activations="uint8", method="entropy")
    assert capfd.readouterr().out == ""  # onnxruntime's histogram calibrator prints; library code must not
    assert report.tensorrt_compatible is False
    with open_backend(b, "onnxruntime", "int8") as be:
        assert be.precision == "int8" and be.infer(
            __import__("numpy").zeros((2, 3, 24, 32), "float32")).shape == (2, 3)


def test_bad_options_and_missing_split(colour_data, tmp_path_factory, tmp_path):
    b = exported_bundle(colour_data, tmp_path_factory)
    with pytest.raises(ConfigError, match="--method"):
        calibrate_int8(b, colour_data, method="kl")
    with pytest.raises(ConfigError, match="activations"):
        calibrate_int8(b, colour_data, activations="int4")
    with pytest.raises(DataError, match="'valid'"):
        calibrate_int8(b, colour_data, eval_split="valid")
    assert not (b / "model.int8.onnx").exists()


def test_an_unreadable_test_split_is_reported_not_fatal(colour_data, tmp_path_factory, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(colour_data, data)
    (data / "test.csv").write_text("image_id,label\n")  # a test list with no rows
    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    report = calibrate_int8(b, data, samples=32)
    assert set(report.by_split) == {"dev"}
    assert any(w.startswith("test split not measured:") and "empty" in w for w in report.warnings)
    assert load_bundle(b).card.metrics["int8"]["split"] == "dev"


def test_int8_backend_needs_calibration_first(colour_data, tmp_path_factory):
    with pytest.raises(BackendError, match="mnet calibrate int8"):
        open_backend(exported_bundle(colour_data, tmp_path_factory), "onnxruntime", "int8")


def _fp32_weight(graph, node_name: str) -> bool:
    """Whether the Conv `node_name` reads its weight as a float initializer (not through DequantizeLinear)."""
    inits = {t.name: t for t in graph.initializer}
    node = next(n for n in graph.node if n.name == node_name)
    return node.input[1] in inits and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT


def test_keep_fp32_list_leaves_named_op_types_and_nodes_unquantised(colour_data, tmp_path_factory, tmp_path):
    """An explicit --keep-fp32 list: the named Conv keeps float weights, the named op type gets no Q/DQ of its
    own, the card says what was kept, and TensorRT can still build the graph."""
    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    convs = [n.name for n in onnx.load(str(b / "model.onnx")).graph.node if n.op_type == "Conv"]
    full = copy_bundle(b, tmp_path / "full")
    calibrate_int8(full, colour_data, samples=32)
    report = calibrate_int8(b, colour_data, samples=32, keep_fp32=f"ReduceMean,{convs[0]}")
    g = onnx.load(str(b / "model.int8.onnx")).graph
    assert _fp32_weight(g, convs[0]) and not _fp32_weight(g, convs[1])
    assert not _fp32_weight(onnx.load(str(full / "model.int8.onnx")).graph, convs[0])
    assert qdq_node_counts(b / "model.int8.onnx")["QuantizeLinear"] < qdq_node_counts(
        full / "model.int8.onnx")["QuantizeLinear"]
    kept = load_bundle(b).card.metrics["int8"]["keep_fp32"]
    assert kept == {"mode": "list", "op_types": ["ReduceMean"], "nodes": [convs[0]]} == report.keep_fp32
    assert report.tensorrt_compatible and tensorrt_qdq_problems(onnx.load(str(b / "model.int8.onnx"))) == []
    assert load_bundle(full).card.metrics["int8"]["keep_fp32"] == {"mode": "none", "op_types": [], "nodes": []}


def test_keep_fp32_unknown_name_says_what_the_model_has(colour_data, tmp_path_factory, tmp_path):
    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    with pytest.raises(ConfigError, match=r"--keep-fp32 Softmaxx: not an op type or node name.*Conv"):
        calibrate_int8(b, colour_data, samples=32, keep_fp32="Softmaxx")
    with pytest.raises(ConfigError, match="'auto' stands alone"):
        calibrate_int8(b, colour_data, samples=32, keep_fp32="auto,Conv")
    assert not (b / "model.int8.onnx").exists()


def test_keep_fp32_auto_keeps_what_measures_faster(colour_data, tmp_path_factory, tmp_path, monkeypatch):
    """auto tries every quantisable op type but Conv, then every Conv node, keeps a candidate when the timing
    says it is faster by the margin and checks it again (a stand-in timing here: only the first candidate is
    faster, and quantising it again is slower)."""
    import mnet.calibration.int8 as q

    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    tried = []

    def fake_speedup(best, cand, input_name, x, threads):
        tried.append(cand.name)
        return 0.5 if cand.name.startswith("check_") else 1.5 if len(tried) == 1 else 1.0

    monkeypatch.setattr(q, "_paired_speedup", fake_speedup)
    monkeypatch.setattr(q, "_ROUNDS", 2)
    monkeypatch.setattr(q, "_REPS", 2)
    report = calibrate_int8(b, colour_data, samples=32, keep_fp32="auto")
    kept = report.keep_fp32
    names = [t["name"] for t in kept["trials"]]
    convs = [n.name for n in onnx.load(str(b / "model.onnx")).graph.node if n.op_type == "Conv"]
    assert "Conv" not in names and set(convs) <= set(names) and len(tried) == len(names) + 1
    assert [t["name"] for t in kept["trials"] if t["kept_fp32"]] == kept["op_types"] + kept["nodes"] == names[:1]
    assert kept["checks"] == [{"kind": kept["trials"][0]["kind"], "name": names[0], "requantised_speedup": 0.5,
                               "kept_fp32": True}]
    assert kept["mode"] == "auto" and kept["threads"] == 1 and kept["min_gain"] == q._MIN_GAIN
    assert all(kept[k] > 0 for k in ("fp32_ms", "all_int8_ms", "int8_ms"))
    assert load_bundle(b).card.metrics["int8"]["keep_fp32"]["trials"] == kept["trials"]
    assert report.tensorrt_compatible


def test_keep_fp32_auto_drops_a_win_the_check_does_not_repeat_and_keeps_something_int8(
        colour_data, tmp_path_factory, tmp_path, monkeypatch):
    """Every candidate 'faster' but the last (it would leave nothing quantised: skipped); the check then finds
    re-quantising each kept one no slower, so all go back to int8."""
    import mnet.calibration.int8 as q

    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    monkeypatch.setattr(q, "_paired_speedup", lambda best, cand, *a: 1.0 if cand.name.startswith("check_") else 1.5)
    monkeypatch.setattr(q, "_ROUNDS", 1)
    monkeypatch.setattr(q, "_REPS", 1)
    kept = calibrate_int8(b, colour_data, samples=32, keep_fp32="auto").keep_fp32
    assert kept["trials"][-1]["speedup"] is None and not kept["trials"][-1]["kept_fp32"]
    assert all(t["kept_fp32"] for t in kept["trials"][:-1]) and len(kept["checks"]) == len(kept["trials"]) - 1
    assert not any(c["kept_fp32"] for c in kept["checks"]) and kept["op_types"] == kept["nodes"] == []
    assert qdq_node_counts(b / "model.int8.onnx")["QuantizeLinear"] > 0


def test_cli_keep_fp32_auto_prints_what_it_kept(colour_data, tmp_path_factory, tmp_path, capsys, monkeypatch):
    """Real timing, few rounds: whatever it keeps, the CLI says so with the measured latencies."""
    import mnet.calibration.int8 as q
    from mnet.cli import main

    monkeypatch.setattr(q, "_ROUNDS", 2)
    monkeypatch.setattr(q, "_REPS", 3)
    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    assert main(["calibrate", "int8", str(b), str(colour_data), "--samples", "32", "--keep-fp32", "auto"]) == 0
    out = capsys.readouterr().out
    kept = load_bundle(b).card.metrics["int8"]["keep_fp32"]
    assert kept["mode"] == "auto" and qdq_node_counts(b / "model.int8.onnx")["QuantizeLinear"] > 0
    if kept["op_types"] or kept["nodes"]:
        assert re.search(r"kept fp32 \(auto\): .*; [0-9.]+ ms vs all-int8 [0-9.]+ ms, fp32 [0-9.]+ ms \(1 thread",
                         out)
    else:
        assert re.search(r"kept fp32 \(auto\): nothing measured faster in fp32; int8 [0-9.]+ ms, fp32 [0-9.]+ ms",
                         out)


def test_paired_drop_standard_error():
    import numpy as np

    from mnet.calibration.int8 import _paired_drop_se

    labels = np.zeros(4, int)
    # one image only fp32 gets right, one only int8: drop 0, se = sqrt(2) / 4
    assert _paired_drop_se(labels, np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(100 * 2**0.5 / 4)
    assert _paired_drop_se(labels, np.zeros(4, int), np.zeros(4, int)) == 0.0
