"""Latency in the reward: a tight budget finds faster architectures; re-search reuses the supernet."""

import json
import random

import pytest

from mnet.arch import PRESETS, cropped_kernel
from mnet.calibration.blocks import _parse
from mnet.calibration.predictor import LatencyPredictor
from mnet.cli import main
from mnet.io import write_json
from mnet.latency_table import Entry, LatencyTable, space_blocks
from mnet.search.controller import ControllerConfig
from mnet.search.enas import SearchConfig, open_run, search
from mnet.search.research import research
from mnet.search.reward import accuracy_reward, latency_reward


def _cost_ms(key: str) -> float:
    """A deterministic stand-in for measured block times: proportional to the block's MACs."""
    kind, f = _parse(key)
    if kind != "op":
        return 0.001
    kh, kw = cropped_kernel(f["k"], f["d"], f["h"], f["w"])
    return f["h"] * f["w"] * f["c"] * (kh * kw + f["c"]) / 1e7


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    space = PRESETS["tiny"]
    table = LatencyTable(device={"cpu": "synthetic"}, backend="onnxruntime", precision="fp32", batch=1,
                         space=space.to_json(),
                         entries={k: Entry(_cost_ms(k), _cost_ms(k), 1) for k in space_blocks(space)}, complete=True)
    path = tmp_path_factory.mktemp("lat") / "latency.json"
    write_json(path, table.to_json())
    return path


@pytest.fixture(scope="module")
def supernet_run(colour_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "s"
    cfg = SearchConfig(preset="tiny", supernet_epochs=1, derive_samples=4, batch_size=32, lr=0.05,
                       controller=ControllerConfig(steps=4), controller_batch=2, fast_depthwise=False)
    search(colour_data, out, cfg, plots=False)
    return out


def test_tight_budget_finds_faster_archs(supernet_run, table_path, tmp_path):
    predictor = LatencyPredictor.from_file(table_path)
    opened = open_run(supernet_run, device="cpu", controller=False)
    free = research(opened, tmp_path / "free", accuracy_reward, steps=40, derive_samples=16, controller_lr=0.05)
    rng = random.Random(0)
    median = sorted(predictor.predict_ms(PRESETS["tiny"].sample(rng)) for _ in range(101))[50]
    tight = research(opened, tmp_path / "tight", latency_reward(predictor, median / 4, "hard"), steps=40,
                     derive_samples=16, controller_lr=0.05)
    assert tight.extras["latency_ms"] < predictor.predict_ms(free.arch)
    saved = json.loads((tmp_path / "tight" / "arch.json").read_text())
    assert saved["search"]["predicted_latency_ms"] == pytest.approx(tight.extras["latency_ms"])
    # every top-k entry carries its predicted latency
    assert all("latency_ms" in c for c in json.loads((tmp_path / "tight" / "topk.json").read_text()))


def test_search_and_research_cli(colour_data, supernet_run, table_path, tmp_path):
    out = tmp_path / "s2"
    assert main(["search", str(colour_data), "--preset", "tiny", "--out", str(out), "--supernet-epochs", "1",
                 "--controller-steps", "4", "--controller-batch", "2", "--derive-samples", "2", "--batch-size", "32",
                 "--no-fast-depthwise",
                 "--latency-table", str(table_path), "--latency-budget-ms", "0.05"]) == 0
    arch = json.loads((out / "arch.json").read_text())
    assert arch["search"]["latency_budget_ms"] == 0.05 and arch["search"]["predicted_latency_ms"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("latency_ms" in r for r in lines if r["stage"] == "controller")
    assert main(["train", str(colour_data), "--arch", str(out / "arch.json"), "--out", str(tmp_path / "r"),
                 "--epochs", "1", "--batch-size", "32"]) == 0
    assert main(["research", str(supernet_run), "--latency-table", str(table_path), "--budgets", "0.02,0.05",
                 "--out", str(tmp_path / "s3"), "--controller-steps", "4", "--derive-samples", "2"]) == 0
    pareto = json.loads((tmp_path / "s3" / "pareto.json").read_text())
    assert [p["budget_ms"] for p in pareto["points"]] == [0.02, 0.05]
    assert (tmp_path / "s3" / "pareto.png").stat().st_size > 0
    assert (tmp_path / "s3" / "budget-0.02ms" / "arch.json").is_file()


def test_latency_options_must_come_together(colour_data, tmp_path, capsys):
    assert main(["search", str(colour_data), "--preset", "tiny", "--out", str(tmp_path / "x"),
                 "--latency-budget-ms", "1"]) == 2
    assert "go together" in capsys.readouterr().err
