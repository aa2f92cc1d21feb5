"""Localisation on drawn belt frames: every mango found, hands and specks ignored, edges flagged."""

from __future__ import annotations

import numpy as np
import pytest
from mnet.runtime.localize import Box, LocalizeConfig, Localizer, crop, parse_roi

from mnet.errors import ConfigError
from mnet.synth import _HAND_TONES, _draw_hand, belt_texture, draw_mango


def _belt(seed: int, hw=(240, 320)) -> np.ndarray:
    return belt_texture(np.random.default_rng(seed), hw)


def _mango(img, seed, centre, axes=(50, 33), angle=10.0, grade="A"):
    x0, y0, x1, y1 = draw_mango(img, np.random.default_rng(seed), grade, centre, axes, angle)
    return Box(x0, y0, x1 - x0, y1 - y0)


@pytest.mark.parametrize("grade", ["A", "B", "C"])
def test_every_mango_colour_is_found_with_a_tight_box(grade):
    loc = Localizer()
    for seed in range(12):
        img = _belt(seed)
        rng = np.random.default_rng(100 + seed)
        truth = _mango(img, seed, (160 + rng.uniform(-30, 30), 120 + rng.uniform(-20, 20)),
                       angle=float(rng.uniform(-40, 40)), grade=grade)
        boxes = loc(img)
        assert len(boxes) == 1, f"seed {seed}: {boxes}"
        b = boxes[0]
        assert max(abs(b.x - truth.x), abs(b.y - truth.y), abs(b.x2 - truth.x2), abs(b.y2 - truth.y2)) <= 6
        assert not b.touches_edge


def test_mask_width_keeps_hd_frames_cheap_and_boxes_tight():
    img = _belt(7, (720, 1280))
    truth = _mango(img, 7, (640, 360), (110, 72), angle=-20.0)
    loc = Localizer()
    assert loc.mask(img).shape == (90, 160)  # shrunk 8x, like a 640x480 frame 4x
    (b,) = loc(img)
    assert max(abs(b.x - truth.x), abs(b.y - truth.y), abs(b.x2 - truth.x2), abs(b.y2 - truth.y2)) <= 10


def test_hands_are_not_fruit():
    img = _belt(1, (480, 640))
    for i, tone in enumerate(_HAND_TONES):
        _draw_hand(img, np.random.default_rng(i), (60 + i * 120, 150), 50, 33, 80, tone, front=False)
    m1 = _mango(img, 5, (300, 380), (55, 36))
    m2 = _mango(img, 6, (500, 380), (55, 36), grade="C")
    boxes = Localizer()(img)
    assert len(boxes) == 2 and all(abs(b.x - m.x) <= 6 and abs(b.y - m.y) <= 6 for b, m in zip(boxes, (m1, m2)))


def test_partially_visible_fruit_is_flagged_at_every_edge():
    img = _belt(2)
    _mango(img, 1, (15, 120))  # cut by the left edge
    _mango(img, 2, (160, 120))
    _mango(img, 3, (300, 60))  # cut by the right edge
    boxes = Localizer()(img)
    assert [b.touches_edge for b in boxes] == [True, False, True]
    assert boxes[0].x == 0 and boxes[2].x2 == 320


def test_roi_limits_the_search_and_its_border_is_an_edge():
    img = _belt(3)
    _mango(img, 1, (70, 120))
    _mango(img, 2, (230, 120))
    roi = (120, 40, 200, 180)
    boxes = Localizer(LocalizeConfig(roi=roi))(img)
    assert len(boxes) == 1 and boxes[0].x > 150  # frame coordinates, only the fruit inside
    cut = Localizer(LocalizeConfig(roi=(0, 0, 240, 240)))(img)  # the ROI's right border cuts fruit 2
    assert [b.touches_edge for b in cut] == [False, True]


def test_area_limits_drop_specks_and_floods():
    img = _belt(4)
    img[10:14, 10:14] = (0, 0, 255)  # a red speck
    assert Localizer()(img) == []
    img[:, :] = (0, 140, 255)  # the whole view saturated (a crate in front of the camera)
    assert Localizer()(img) == []


def test_full_frame_is_one_fruit():
    img = _belt(5)
    assert Localizer(LocalizeConfig(full_frame=True))(img) == [Box(0, 0, 320, 240, 320 * 240.0, False)]
    assert Localizer(LocalizeConfig(full_frame=True, roi=(10, 20, 100, 50)))(img)[0].w == 100


def test_crop_adds_margin_matches_the_model_aspect_and_clips():
    frame = np.zeros((240, 320, 3), np.uint8)
    c = crop(frame, Box(100, 100, 60, 40), 0.25)
    assert c.shape[:2] == (60, 90) and np.shares_memory(c, frame)
    assert crop(frame, Box(100, 100, 60, 40), 0.25, aspect=4 / 3).shape[:2] == (68, 90)
    assert crop(frame, Box(100, 60, 40, 60), 0.25, aspect=4 / 3).shape[:2] == (90, 68)  # portrait box
    assert crop(frame, Box(0, 0, 60, 40), 0.5).shape[:2] == (60, 90)  # clipped at the corner


def test_config_errors_name_the_value():
    assert parse_roi("0,80,640,320") == (0, 80, 640, 320) and parse_roi(None) is None
    with pytest.raises(ConfigError, match="roi"):
        parse_roi("0,80,640")
    with pytest.raises(ConfigError, match="min_area"):
        LocalizeConfig(min_area=0.6)
    with pytest.raises(ConfigError, match="outside"):
        Localizer(LocalizeConfig(roi=(400, 0, 10, 10)))(np.zeros((240, 320, 3), np.uint8))


def test_downscaled_mask_finds_the_same_boxes_on_the_conveyor():
    """The default 160 px mask (a 640x480 frame shrunk 4x: 16x fewer pixels) against a 320 px one with
    the kernels at that scale: same fruit, same cut-off flags, boxes within 4 px, on a synthetic belt."""
    from mnet.conveyor import plan_conveyor

    plan = plan_conveyor(fruits=8, seed=2, size_wh=(640, 480))
    fine = Localizer(LocalizeConfig(mask_width=320, open_px=3, close_px=7))
    fast = Localizer()
    compared = 0
    for f in range(0, plan.frames, 4):
        img, _ = plan.render(f)
        a, b = fine(img), fast(img)
        assert len(a) == len(b), f"frame {f}: {a} vs {b}"
        for p, q in zip(a, b):
            assert p.touches_edge == q.touches_edge, f"frame {f}: {p} vs {q}"
            assert max(abs(p.x - q.x), abs(p.y - q.y), abs(p.x2 - q.x2), abs(p.y2 - q.y2)) <= 4, f"frame {f}"
            compared += 1
    assert compared > 50
