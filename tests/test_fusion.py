import json
import random

import numpy as np
import pytest

from mnet.arch import PRESETS
from mnet.errors import ConfigError
from mnet.search.fusion import extract_features, fuse
from mnet.search.train import TrainConfig, train


@pytest.fixture(scope="module")
def two_runs(colour_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    runs = []
    for seed in (0, 1):
        arch = PRESETS["tiny"].sample(random.Random(seed))
        train(colour_data, arch, root / f"r{seed}", TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=seed))
        runs.append(str(root / f"r{seed}"))
    return runs


def test_features_are_the_classifier_inputs(two_runs, colour_data):
    f = extract_features(two_runs[0] + "/best.pt", colour_data)
    assert set(f) == {"train", "dev", "test"}
    x, y = f["train"]
    assert x.shape == (96, 16) and y.shape == (96,) and np.isfinite(x).all()


@pytest.mark.parametrize("mode", ["feature", "decision"])
def test_fusion_fits_and_reports_best(two_runs, colour_data, tmp_path, mode):
    r = fuse(two_runs, colour_data, mode, tmp_path)
    assert len(r.combos) == 1 and r.best["runs"] == two_runs
    assert 0.5 < r.best["test_acc"] <= 1.0  # colours are linearly separable from any trained features
    saved = json.loads((tmp_path / "fusion.json").read_text())
    assert saved["mode"] == mode and saved["best"] == r.best


def test_fusion_needs_two_runs_and_a_mode(two_runs, colour_data, tmp_path):
    with pytest.raises(ConfigError, match="at least two"):
        fuse(two_runs[:1], colour_data, "feature", tmp_path)
    with pytest.raises(ConfigError, match="--mode"):
        fuse(two_runs, colour_data, "vote", tmp_path)
