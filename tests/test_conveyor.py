"""Synthetic conveyor video: truth file, readback, layout (no overlap, full entry/exit), determinism."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from mnet import conveyor, synth
from mnet.errors import DataError, MnetError

SIZE = (320, 240)


@pytest.fixture(scope="module")
def plan():
    return conveyor.plan_conveyor(fruits=4, seed=2, size_wh=SIZE)


def _read_all(path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


@pytest.mark.parametrize("codec,suffix", [("mp4v", ".mp4"), ("MJPG", ".avi")])
def test_video_and_truth_roundtrip(tmp_path, codec, suffix):
    out = tmp_path / f"belt{suffix}"
    calls = []
    info = conveyor.make_conveyor_video(out, fruits=3, seed=1, size_wh=SIZE, codec=codec,
                                        progress=lambda d, t: calls.append((d, t)))
    truth_path = tmp_path / "belt.truth.json"
    assert info["truth_path"] == str(truth_path)
    truth = json.loads(truth_path.read_text())
    assert set(truth) == {"schema_version", "fps", "size", "frames", "fruits"}
    assert truth["schema_version"] == 1 and truth["fps"] == 30 and truth["size"] == list(SIZE)
    assert truth["frames"] == info["frames"] == calls[-1][0] == calls[-1][1]
    frames = _read_all(out)
    assert len(frames) == truth["frames"]
    assert frames[0].shape == (SIZE[1], SIZE[0], 3)
    fr = truth["fruits"]
    assert sorted(f["fruit_id"] for f in fr) == [0, 1, 2]
    assert [f["last_frame"] for f in fr] == sorted(f["last_frame"] for f in fr)
    for f in fr:
        assert set(f) == {"fruit_id", "grade", "first_frame", "last_frame"}
        assert f["grade"] in synth.GRADES
        assert 0 < f["first_frame"] < f["last_frame"] < truth["frames"] - 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # The decoded video shows the planned fruit where the plan put it: inside its box the frame is
    # much closer to the rendered frame than to the belt alone.
    plan = conveyor.plan_conveyor(fruits=3, seed=1, size_wh=SIZE)
    mid = (fr[0]["first_frame"] + fr[0]["last_frame"]) // 2
    rendered, boxes = plan.render(mid)
    x0, y0, x1, y1 = dict(boxes)[fr[0]["fruit_id"]]
    crop = frames[mid][y0:y1, x0:x1].astype(int)
    err_render = np.abs(crop - rendered[y0:y1, x0:x1]).mean()
    err_belt = np.abs(crop - plan.background(mid)[y0:y1, x0:x1]).mean()
    assert err_render * 3 < err_belt, (err_render, err_belt)


def test_layout_no_overlap_and_full_entry_exit(plan):
    w, h = SIZE
    assert plan.frames > 0
    max_visible = 0
    for i in range(plan.frames):
        _, boxes = plan.render(i)
        max_visible = max(max_visible, len(boxes))
        for fid, (x0, y0, x1, y1) in boxes:
            assert x1 > x0 and y1 > y0, (i, fid)   # truth says visible → something is painted
            assert y0 >= plan.band[0] and y1 <= plan.band[1]
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                (_, (ax0, _, ax1, _)), (_, (bx0, _, bx1, _)) = boxes[a], boxes[b]
                assert ax1 <= bx0 or bx1 <= ax0, (i, boxes)
    assert max_visible >= 2
    # Entry/exit frames are exact: painting the fruit one frame earlier/later paints nothing.
    def box_at(f, frame):
        canvas = np.zeros((h, w, 3), np.uint8)
        return synth.draw_mango(canvas, np.random.default_rng(f.seed), f.grade,
                                (f.x0 + plan.offset(frame), f.y), f.axes, f.angle, shadow=0)

    for f in plan.fruits:
        assert box_at(f, f.first_frame - 1) == (0, 0, 0, 0)
        assert box_at(f, f.first_frame)[0] == 0            # enters at the left edge
        assert box_at(f, f.last_frame)[2] == w             # leaves at the right edge
        assert box_at(f, f.last_frame + 1) == (0, 0, 0, 0)
        full = box_at(f, (f.first_frame + f.last_frame) // 2)
        assert full[2] - full[0] == f.box[2] - f.box[0]  # fully on screen mid-way


def test_belt_moves_with_fruit(plan):
    top, bot = plan.band
    a, b = plan.background(10), plan.background(11)
    d = plan.offset(11) - plan.offset(10)
    assert d > 0
    assert np.array_equal(b[top:bot, d:], a[top:bot, :-d])
    assert not np.array_equal(a[top:bot], b[top:bot])


def test_deterministic_per_seed(plan):
    again = conveyor.plan_conveyor(fruits=4, seed=2, size_wh=SIZE)
    assert again.truth() == plan.truth()
    i = plan.fruits[1].first_frame + 5
    assert np.array_equal(again.render(i)[0], plan.render(i)[0])
    other = conveyor.plan_conveyor(fruits=4, seed=3, size_wh=SIZE)
    assert other.truth() != plan.truth()


def test_default_duration_and_balance():
    p = conveyor.plan_conveyor()
    assert 10.0 <= p.frames / p.fps <= 20.0
    assert len(p.fruits) == 20
    grades = [f.grade for f in conveyor.plan_conveyor(fruits=300, seed=4).fruits]
    for g, want in zip(synth.GRADES, synth.CLASS_BALANCE):
        assert abs(grades.count(g) / len(grades) - want) < 0.08


def test_bad_codec_and_options(tmp_path):
    with pytest.raises(DataError, match="ZZZZ"):
        conveyor.make_conveyor_video(tmp_path / "x.mp4", fruits=1, size_wh=SIZE, codec="ZZZZ")
    assert not list(tmp_path.iterdir())
    with pytest.raises(MnetError, match="avi"):
        conveyor.make_conveyor_video(tmp_path / "x.mp4", fruits=1, size_wh=SIZE, codec="MJPG")
    with pytest.raises(MnetError):
        conveyor.plan_conveyor(fruits=0)
