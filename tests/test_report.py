"""`mnet report` renders Table 2 from small real runs, with every column and the plots."""

import re

import pytest

from mnet.cli import main
from mnet.io import write_json
from mnet.search.controller import ControllerConfig
from mnet.search.enas import SearchConfig, search


@pytest.fixture(scope="module")
def runs(colour_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    s = root / "search"
    search(colour_data, s, SearchConfig(preset="tiny", supernet_epochs=1, derive_samples=2, batch_size=32,
                                        controller=ControllerConfig(steps=4), controller_batch=2, fast_depthwise=False), plots=False)
    assert main(["train", str(colour_data), "--arch", str(s / "arch.json"), "--out", str(root / "mnet"),
                 "--epochs", "1", "--batch-size", "32", "--lr", "0.05"]) == 0
    assert main(["evaluate", str(root / "mnet" / "best.pt"), str(colour_data), "--json",
                 str(root / "mnet" / "test_metrics.json")]) == 0
    assert main(["baseline", str(colour_data), "--model", "shufflenet_v2_x1_0", "--out", str(root / "shuffle"),
                 "--epochs", "1", "--input-size", "32", "--batch-size", "32"]) == 0
    assert main(["export", "onnx", str(root / "mnet" / "best.pt"), "--out", str(root / "bundle")]) == 0
    assert main(["calibrate", "int8", str(root / "bundle"), str(colour_data), "--samples", "16"]) == 0
    assert main(["bundle", "bench", str(root / "bundle"), "--seconds", "0.05"]) == 0
    write_json(root / "fusion" / "fusion.json", {"kind": "fusion", "mode": "feature", "runs": ["a", "b"],
                                                 "best": {"runs": ["a", "b"], "dev_acc": 0.5, "test_acc": 0.4},
                                                 "combinations": []})
    return root


def test_report_has_every_column_and_plot(runs, tmp_path):
    out = tmp_path / "rep"
    assert main(["report", str(runs / "mnet"), str(runs / "shuffle"), str(runs / "search"), str(runs / "bundle"),
                 str(runs / "fusion"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Input size"))
    for col in ("Input size", "Model", "Search method", "Search cost", "Relative", "#Params (M)", "MACs (M)",
                "Acc (%)", "onnxruntime/cpu/fp32/b1 (ms)", "INT8 drop (pts)"):
        assert col in header, col
    rows = [line for line in md.splitlines() if line.startswith("| 24 × 32") or line.startswith("| 32 × 32")]
    enas = next(r for r in rows if "ENAS (RL)" in r)
    assert "CPU-h" in enas and "1.0x" in enas
    assert "MNet-tiny (4L, C=16)" in enas and "MNet-24-32" not in md  # the tiny preset is not the paper's model
    assert re.search(r"\| -?\d+\.\d\d \|$", enas), enas  # the INT8 drop, in points
    assert any("shufflenet_v2_x1_0" in r and "manual" in r for r in rows)
    assert "Fusion baselines" in md
    html = (out / "report.html").read_text()
    assert "<table id='table2'>" in html and "Search reward curves" in html
    assert len(re.findall(r"src='data:image/png;base64,", html)) >= 3  # self-contained
    for png in ("accuracy_vs_params.png", "accuracy_vs_latency.png", "confusion_matrices.png", "search_rewards.png"):
        assert (out / png).stat().st_size > 0


def test_mnet_models_are_named_by_their_preset():
    import random

    from mnet.arch import PRESETS, build_space
    from mnet.report import _mnet_name

    def sample(space):
        return space.sample(random.Random(0))

    assert _mnet_name(sample(PRESETS["tiny"])) == "MNet-tiny (4L, C=16)"
    assert _mnet_name(sample(PRESETS["mnet-24-32"])) == "MNet-24-32 (12L, C=256)"
    assert _mnet_name(sample(PRESETS["mnet-120-160"])) == "MNet-120-160 (12L, C=256)"
    assert _mnet_name(sample(build_space("tiny", input_hw=(28, 28)))) == "MNet custom (4L, C=16)"
    assert _mnet_name(sample(build_space("mnet-24-32", layers=6, width=64))) == "MNet custom (6L, C=64)"


def test_report_needs_a_trained_model(runs, tmp_path, capsys):
    assert main(["report", str(runs / "search"), "--out", str(tmp_path / "r")]) == 2
    assert "no trained model" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2


def test_report_shows_search_vs_chance_from_the_search_bench(tmp_path):
    """Issue 13: search vs random vs baselines, with the seed spread and each pick's percentile."""
    seeds = [{"enas_test_acc": a, "random_test_acc": b} for a, b in ((0.91, 0.9), (0.92, 0.89), (0.9, 0.9))]
    bench = {"bench": "search_real", "n_archs": 30, "kendall_tau": 0.41, "kendall_tau_ci95": [0.15, 0.62],
             "search_test_acc_mean": 0.91, "search_test_acc_std": 0.0082, "random_test_acc_mean": 0.8967,
             "random_test_acc_std": 0.0047, "search_pick_percentiles": [93.3, 96.7, 80.0],
             "random_pick_percentiles": [70.0, 60.0, 70.0], "policy_test_acc_mean": 0.905,
             "uniform_test_acc_mean": 0.89, "gt_test_acc": {"mean": 0.89, "std": 0.012}, "per_seed": seeds,
             "baselines": {"two_conv@28": {"test_acc": 0.9, "params": 50186}}}
    write_json(tmp_path / "search_real.json", bench)
    assert main(["report", str(tmp_path / "search_real.json"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Search vs chance" in md and "| ENAS pick | 91.00 ± 0.82 | 91.00, 92.00, 90.00 | 93, 97, 80 |" in md
    assert "two_conv@28 | 90.00" in md and "Kendall τ 0.41 (95% CI 0.15 … 0.62)" in md
    assert "id='search-vs-chance'" in (tmp_path / "rep" / "report.html").read_text()
