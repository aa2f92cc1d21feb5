"""Synthetic mango dataset: labels, layout, determinism, rendering properties."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from mnet import synth
from mnet.errors import DataError

SMALL = (48, 64)  # tiny images keep the rendering tests fast


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# --- labels -----------------------------------------------------------------------------------
def test_class_balance_matches_real_train_split():
    labels = synth.draw_labels(800, seed=0, split="train", label_noise=0.0)
    grades = [g for g, _ in labels]
    for g, want in zip(synth.GRADES, synth.CLASS_BALANCE):
        assert abs(grades.count(g) / len(grades) - want) < 0.06, (g, grades.count(g))


def test_label_noise_rate_and_neighbours_only():
    labels = synth.draw_labels(4000, seed=1, split="train", label_noise=0.05)
    flipped = [(g, lab) for g, lab in labels if g != lab]
    assert 0.035 < len(flipped) / len(labels) < 0.065
    # Graders confuse neighbouring grades: A never becomes C and vice versa.
    assert all({g, lab} != {"A", "C"} for g, lab in flipped)
    assert all(g == lab for g, lab in synth.draw_labels(500, seed=1, label_noise=0.0))
    heavy = synth.draw_labels(1000, seed=1, label_noise=0.3)
    assert 0.25 < sum(g != lab for g, lab in heavy) / 1000 < 0.35


def test_labels_deterministic_and_splits_independent():
    a = synth.draw_labels(200, seed=7, split="train")
    assert a == synth.draw_labels(200, seed=7, split="train")
    assert a != synth.draw_labels(200, seed=8, split="train")
    assert a != synth.draw_labels(200, seed=7, split="dev")
    # A prefix does not depend on how many labels are drawn (per-image streams).
    assert synth.draw_labels(50, seed=7, split="train") == a[:50]
    with pytest.raises(ValueError):
        synth.draw_labels(3, split="val")


# --- dataset on disk --------------------------------------------------------------------------
def test_synthesize_layout_csv_and_summary(tmp_path):
    out = tmp_path / "ds"
    calls = []
    s = synth.synthesize(out, n_train=10, n_dev=4, n_test=6, seed=3, image_size=SMALL,
                         progress=lambda d, t: calls.append((d, t)), workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["dev", "dev.csv", "synth.json", "test", "test.csv",
                                                     "train", "train.csv"]
    assert not list(tmp_path.glob("ds.tmp-*"))
    seen_ids = set()
    for split, n in (("train", 10), ("dev", 4), ("test", 6)):
        rows = _read_csv(out / f"{split}.csv")
        assert rows[0] == ["image_id", "label"]
        assert len(rows) == n + 1
        want = synth.draw_labels(n, seed=3, split=split, label_noise=0.05)
        assert [r[1] for r in rows[1:]] == [lab for _, lab in want]
        for name, _ in rows[1:]:
            assert re.fullmatch(r"\d{5}\.jpg", name)
            img = cv2.imread(str(out / split / name))
            assert img is not None and sorted(img.shape[:2]) == sorted(SMALL)
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(r[0] for r in rows[1:])
        seen_ids |= {r[0] for r in rows[1:]}
        assert s["counts"][split] == {g: [r[1] for r in rows[1:]].count(g) for g in synth.GRADES}
    assert len(seen_ids) == 20  # ids unique across splits
    assert s["images"] == 20 and s["seconds"] > 0
    assert calls[-1] == (20, 20)
    meta = json.loads((out / "synth.json").read_text())
    assert meta["drawn_grades"]["train"] == "".join(
        g for g, _ in synth.draw_labels(10, seed=3, split="train"))


def test_synthesize_is_byte_deterministic_across_workers(tmp_path):
    kw = {"n_train": 8, "n_dev": 2, "n_test": 3, "image_size": SMALL}
    synth.synthesize(tmp_path / "a", seed=5, workers=1, **kw)
    assert synth.synthesize(tmp_path / "b", seed=5, workers=2, **kw)["workers"] == 2
    synth.synthesize(tmp_path / "c", seed=6, workers=1, **kw)
    a, b, c = (_tree_digest(tmp_path / x) for x in "abc")
    assert a == b
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert jpgs and all(a[k] != c.get(k) for k in jpgs)


def test_existing_non_empty_dir_is_refused(tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError, match=r"full.*empty or new directory"):
        synth.synthesize(out, 2, 1, 1, image_size=SMALL)
    assert (out / "keep.txt").read_text() == "x"
    assert not list(tmp_path.glob("full.tmp-*"))
    # An existing empty directory is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    synth.synthesize(empty, 2, 1, 1, image_size=SMALL, workers=1)
    assert (empty / "train.csv").is_file()


def test_portrait_fraction_and_aspect(tmp_path):
    synth.synthesize(tmp_path / "ds", n_train=240, n_dev=0, n_test=0, seed=11, image_size=SMALL)
    shapes = [cv2.imread(str(p)).shape[:2] for p in (tmp_path / "ds" / "train").iterdir()]
    portrait = sum(h > w for h, w in shapes) / len(shapes)
    assert 0.08 < portrait < 0.23
    assert {tuple(sorted(s)) for s in shapes} == {tuple(sorted(SMALL))}


# --- rendering --------------------------------------------------------------------------------
def test_render_mango_deterministic_and_shaped():
    for scene in synth.SCENES:
        a = synth.render_mango(np.random.default_rng(4), "B", scene=scene, size_hw=(120, 160))
        b = synth.render_mango(np.random.default_rng(4), "B", scene=scene, size_hw=(120, 160))
        c = synth.render_mango(np.random.default_rng(5), "B", scene=scene, size_hw=(120, 160))
        assert a.shape == (120, 160, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert synth.render_mango(np.random.default_rng(0), "A", size_hw=(160, 120)).shape == (160, 120, 3)
    with pytest.raises(ValueError):
        synth.render_mango(np.random.default_rng(0), "D")


def test_draw_mango_box_and_translation():
    canvas = np.full((200, 260, 3), 128, np.uint8)
    box = synth.draw_mango(canvas, np.random.default_rng(9), "C", (100, 90), (60, 40), 20, shadow=0)
    x0, y0, x1, y1 = box
    changed = np.argwhere(np.any(canvas != 128, axis=2))
    assert changed[:, 1].min() >= x0 - 1 and changed[:, 1].max() <= x1
    assert changed[:, 0].min() >= y0 - 1 and changed[:, 0].max() <= y1
    assert 100 < x1 - x0 < 125 and 60 < y1 - y0 < 110
    # The same generator state paints the same fruit anywhere (the conveyor relies on it).
    other = np.full((200, 260, 3), 128, np.uint8)
    box2 = synth.draw_mango(other, np.random.default_rng(9), "C", (140, 100), (60, 40), 20, shadow=0)
    assert box2 == (x0 + 40, y0 + 10, x1 + 40, y1 + 10)
    assert np.array_equal(canvas[y0:y1, x0:x1], other[y0 + 10:y1 + 10, x0 + 40:x1 + 40])
    # Off-canvas fruit: nothing painted, empty box.
    blank = np.full((50, 50, 3), 128, np.uint8)
    assert synth.draw_mango(blank, np.random.default_rng(1), "A", (-200, 20), (30, 20), 0) == (0, 0, 0, 0)
    assert (blank == 128).all()


def test_grade_c_shows_more_dark_blemish_than_a():
    # Not a tautology: C defects must be dark enough to survive a 24x32 resize.
    def dark_fraction(grade: str, seed: int) -> float:
        canvas = np.full((120, 160, 3), 200, np.uint8)
        x0, y0, x1, y1 = synth.draw_mango(canvas, np.random.default_rng(seed), grade, (80, 60), (70, 45), 0, shadow=0)
        small = cv2.resize(canvas[y0:y1, x0:x1], (32, 24), interpolation=cv2.INTER_AREA)
        return float((small.max(axis=2) < 70).mean())

    a = np.mean([dark_fraction("A", s) for s in range(16)])
    c = np.mean([dark_fraction("C", s) for s in range(16)])
    assert c > a + 0.01, (a, c)
