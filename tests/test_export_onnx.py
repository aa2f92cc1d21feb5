"""ONNX export: checker, parity recorded, single file, dynamic/fixed batch, atomic bundle writing."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mnet.bundle import CARD_FILE, METADATA_KEY, ONNX_FILE, load_bundle
from mnet.errors import ConfigError, ExportError
from mnet.export import onnx as export_mod
from mnet.export.onnx import export_onnx, has_external_data, read_card_metadata
from mnet.search.checkpoint import build_model, load_checkpoint
from test_export_support import exported_bundle, trained_checkpoint


@pytest.fixture(scope="module")
def ckpt(colour_data, tmp_path_factory):
    return trained_checkpoint(colour_data, tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(colour_data, tmp_path_factory):
    return exported_bundle(colour_data, tmp_path_factory)


def _torch_logits(ckpt_path, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return build_model(load_checkpoint(ckpt_path))(torch.from_numpy(x)).numpy()


def test_bundle_is_one_checked_onnx_file_plus_card(bundle, colour_data):
    assert sorted(p.name for p in bundle.iterdir()) == [CARD_FILE, ONNX_FILE]
    proto = onnx.load(str(bundle / ONNX_FILE))
    onnx.checker.check_model(proto, full_check=True)
    assert not has_external_data(proto)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 24, 32]


def test_card_records_parity_and_metadata_matches(bundle, colour_data, ckpt):
    b = load_bundle(bundle)
    parity = b.card.metrics["parity"]
    assert parity["images"] == 32 and parity["top1_agreement"] == 1.0 and parity["top1_disagreements"] == 0
    assert 0 <= parity["max_abs_logit_diff"] <= 1e-4
    assert str(colour_data.resolve()) in parity["source"]
    assert b.card.metrics["dev"]["accuracy"] == load_checkpoint(ckpt).metrics["dev"]["accuracy"]
    assert b.card.tools["opset"] == 17 and b.card.tools["exporter"] == "torchscript"
    assert b.card.arch is not None and b.card.macs == b.card.arch.macs() and b.card.params == b.card.arch.num_params()
    assert len(b.card.source["sha256"]) == 64
    # model.onnx carries the same card (the export-time copy)
    assert read_card_metadata(bundle / ONNX_FILE) == b.card
    keys = [p.key for p in onnx.load(str(bundle / ONNX_FILE)).metadata_props]
    assert keys.count(METADATA_KEY) == 1


def test_dynamic_batch_runs_at_1_and_5(bundle, ckpt):
    sess = ort.InferenceSession(str(bundle / ONNX_FILE), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for n in (1, 5):
        x = rng.normal(size=(n, 3, 24, 32)).astype(np.float32)
        got = sess.run(["logits"], {"input": x})[0]
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got, _torch_logits(ckpt, x), atol=1e-4)


def test_fixed_batch_and_synthetic_parity(ckpt, tmp_path):
    b = export_onnx(ckpt, tmp_path / "b4", batch=4, parity_images=10)
    assert b.card.batch == 4 and b.card.input_shape == [4, 3, 24, 32]
    assert b.card.metrics["parity"]["source"].startswith("synthetic")
    assert b.card.metrics["parity"]["images"] == 10  # 3 batches of 4, the last padded
    dim0 = onnx.load(str(b.onnx_path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 4


def test_parity_failure_raises_and_leaves_no_bundle(ckpt, tmp_path, monkeypatch):
    real = export_mod._reference_logits
    monkeypatch.setattr(export_mod, "_reference_logits", lambda model, x: real(model, x) + 1e-3)
    with pytest.raises(ExportError, match=r"parity check failed.*max \|Δlogit\|.*no bundle written"):
        export_onnx(ckpt, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor a temp directory


def test_top1_disagreement_is_named_in_the_error(ckpt, tmp_path, monkeypatch):
    real = export_mod._reference_logits
    monkeypatch.setattr(export_mod, "_reference_logits", lambda model, x: -real(model, x))  # best ↔ worst
    with pytest.raises(ExportError, match=r"top-1 agreement 0\.0.*\d+ disagreement\(s\)"):
        export_onnx(ckpt, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_top1_flip_within_tolerance_is_a_tie_not_a_failure(ckpt, tmp_path, monkeypatch):
    from mnet.search.checkpoint import save_checkpoint

    # A head that outputs exactly [0, 0, -1]: classes A and B tie on every image.
    raw = dict(load_checkpoint(ckpt).raw)
    raw["model"] = {**raw["model"], "head.fc.weight": torch.zeros_like(raw["model"]["head.fc.weight"]),
                    "head.fc.bias": torch.tensor([0.0, 0.0, -1.0])}
    save_checkpoint(tmp_path / "tied.pt", raw)
    real = export_mod._reference_logits

    def nudged(model, x):  # PyTorch rounding B up by 1e-6 on every other image: a flip inside the tolerance
        y = real(model, x)
        y[1::2, 1] += 1e-6
        return y

    monkeypatch.setattr(export_mod, "_reference_logits", nudged)
    parity = export_onnx(tmp_path / "tied.pt", tmp_path / "b").card.metrics["parity"]
    assert parity["top1_agreement"] == 0.5 and parity["top1_disagreements"] == 0


def test_existing_bundle_replaced_only_with_overwrite(ckpt, tmp_path):
    target = tmp_path / "b"
    first = export_onnx(ckpt, target)
    (target / "model.int8.onnx").write_bytes(b"stale")  # a leftover from the old bundle
    with pytest.raises(ExportError, match="--force"):
        export_onnx(ckpt, target)
    assert (target / "model.int8.onnx").exists()
    second = export_onnx(ckpt, target, overwrite=True)
    assert second.card.source == first.card.source
    assert sorted(p.name for p in target.iterdir()) == [CARD_FILE, ONNX_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_non_bundle_directory_is_never_replaced(ckpt, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="not a bundle"):
        export_onnx(ckpt, tmp_path / "home", overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("kw, match", [
    ({"opset": 9}, "--opset"), ({"batch": "abc"}, "--batch"), ({"batch": 0}, "--batch"),
    ({"exporter": "magic"}, "exporter"), ({"parity_images": 0}, "parity_images"),
])
def test_bad_options_name_the_option(ckpt, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        export_onnx(ckpt, tmp_path / "b", **kw)
    assert not (tmp_path / "b").exists()


def test_dynamo_exporter_downconverts_to_opset_17(ckpt, tmp_path):
    b = export_onnx(ckpt, tmp_path / "d", exporter="dynamo")
    proto = onnx.load(str(b.onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    assert b.card.tools["exporter"] == "dynamo" and proto.opset_import[0].version == 17
    assert not any(n.metadata_props for n in proto.graph.node)  # no stack traces with local paths
    assert b.card.metrics["parity"]["max_abs_logit_diff"] <= 1e-4


def test_simplify_with_onnxslim(ckpt, tmp_path):
    pytest.importorskip("onnxslim")
    b = export_onnx(ckpt, tmp_path / "s", simplify=True)
    assert b.card.tools["simplified"] is True
    assert not any(n.op_type == "Identity" for n in onnx.load(str(b.onnx_path)).graph.node)


def test_simplify_without_onnxslim_says_how_to_get_it(ckpt, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxslim", None)  # makes `import onnxslim` raise ImportError
    with pytest.raises(ExportError, match="pip install onnxslim"):
        export_onnx(ckpt, tmp_path / "s", simplify=True)


def test_cli_export_onnx_and_bundle_show(ckpt, colour_data, tmp_path, capsys):
    from mnet.cli import main

    out = tmp_path / "cli"
    assert main(["export", "onnx", str(ckpt), "--out", str(out), "--data", str(colour_data)]) == 0
    assert "parity on 32 images" in capsys.readouterr().out
    assert main(["export", "onnx", str(ckpt), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["bundle", "show", str(out), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["classes"] == ["A", "B", "C"] and card["input"]["name"] == "input"
    assert main(["bundle", "show", str(out)]) == 0
    assert "metrics.parity" in capsys.readouterr().out
