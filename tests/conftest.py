"""Shared fixtures: a small learnable dataset on disk, written in milliseconds.

The image's dominant hue carries the class (plus noise), so a tiny MNet learns it in a few epochs —
enough for "loss decreases" and resume tests without the (slower, harder) synthetic mango set.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from mnet.arch import PRESETS

# bench/ last on the path: the tests share its fault kit (bench/_faultkit.py) and run its fast cases
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))

_COLOURS = {"A": (40, 180, 60), "B": (30, 140, 220), "C": (50, 50, 200)}  # BGR


def write_colour_dataset(root: Path, n: dict[str, int], seed: int = 0, size=(48, 64)) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in n.items():
        (root / split).mkdir(exist_ok=True)
        rows = ["image_id,label"]
        for i in range(count):
            label = "ABC"[i % 3]
            img = rng.normal(0, 25, (*size, 3)) + np.array(_COLOURS[label])
            if rng.random() < 0.15:  # some portrait images, like phone shots
                img = np.ascontiguousarray(np.swapaxes(img, 0, 1))
            name = f"{i:05d}.jpg"
            cv2.imwrite(str(root / split / name), np.clip(img, 0, 255).astype(np.uint8))
            rows.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> Path:
    return write_colour_dataset(tmp_path_factory.mktemp("colour"), {"train": 96, "dev": 30, "test": 30})


@pytest.fixture
def tiny_arch():
    return PRESETS["tiny"].sample(random.Random(0))


def train_cut_after_first_epoch(data: Path, arch, out: Path, cfg) -> None:
    """`mnet train` killed (Ctrl-C) right after its first epoch: what the resume tests pick up."""
    from mnet.search.train import train

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(data, arch, out, cfg, on_epoch=stop_after_first)


class ByBrightness:
    """A backend that grades a crop by its brightness: dark A, mid B, bright C (still shots of 0/120/240)."""

    name = "bright"

    def infer(self, x):
        out = np.full((len(x), 3), 0.1, np.float32)
        k = np.clip(((x.mean(axis=(1, 2, 3)) + 2.2) / 1.5).astype(int), 0, 2)
        out[np.arange(len(x)), k] = 0.8
        return out


class FakeCapture:
    """A cv2.VideoCapture stand-in for a live camera (30 fps, always open); tests override read()."""

    def __init__(self, target=None, api=None):
        self.target = target

    def isOpened(self):
        return True

    def set(self, *a):
        return True

    def get(self, prop):
        return 30.0

    def read(self):
        raise NotImplementedError

    def release(self):
        pass


@pytest.fixture
def fake_grade(tmp_path, monkeypatch):
    """`mnet grade` on three still images (--full-frame) with a constant backend: no training, no ONNX."""
    from types import SimpleNamespace

    import mnet.bundle
    import mnet.runtime.backends
    from mnet.cli import main
    from mnet.preprocess import Preprocess

    class Constant:
        name = "constant"

        def infer(self, x):
            return np.tile(np.array([[0.1, 0.8, 0.1]], np.float32), (len(x), 1))

        def describe(self):
            return "constant"

        def close(self):
            pass

    card = SimpleNamespace(preprocess=Preprocess((24, 32)), classes=("A", "B", "C"), display_name="fake")
    monkeypatch.setattr(mnet.bundle, "load_bundle", lambda path: SimpleNamespace(card=card, path=Path(path)))
    monkeypatch.setattr(mnet.runtime.backends, "open_backend", lambda *a, **k: Constant())
    shots = tmp_path / "shots"
    shots.mkdir()
    for i in range(3):
        cv2.imwrite(str(shots / f"{i}.jpg"), np.full((48, 64, 3), 200, np.uint8))

    def run(*args: str) -> int:
        return main(["grade", str(tmp_path / "bundle"), "--source", str(shots), "--full-frame", *args])

    return run
