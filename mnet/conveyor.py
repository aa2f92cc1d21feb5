"""Synthetic conveyor-belt video: the default input of the runtime, with ground truth per fruit.

Mangoes painted by `mnet.synth.draw_mango` (the dataset's renderer, so video fruit look like the
training images) ride left→right on a scrolling textured belt. Fruit are spaced along the belt so
they never overlap, several are on screen at once, and each one fully enters and fully leaves the
frame. Next to the video, `<stem>.truth.json` records every fruit's drawn grade (no label noise) and
the first/last frame in which any part of it is visible, ordered by exit:

    {"schema_version": 1, "fps": 30, "size": [w, h], "frames": N,
     "fruits": [{"fruit_id": 0, "grade": "B", "first_frame": 3, "last_frame": 80}, ...]}

With `foreign=N`, N foreign objects (`mnet.synth.FOREIGN_KINDS`: leaves, gloves, stones, packaging)
ride between the fruit, spaced like them, so the runtime's open-set gate can be measured (issue 14
item 13, bench/foreign.py). The truth file is then version 2: every entry gains `kind` ("mango" or
the foreign kind) and foreign entries have grade "foreign". Off by default, and a video without
foreign objects is exactly what it was (version 1, same frames), so existing truth keeps its meaning.

Everything derives from one seed: the same seed gives the same frames (and, with the same OpenCV
build and codec, the same file).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

from mnet.errors import ConfigError, DataError
from mnet.synth import CLASS_BALANCE, FOREIGN_KINDS, GRADES, belt_texture, draw_foreign, draw_mango, draw_rails

__all__ = ["FOREIGN", "ConveyorFruit", "ConveyorPlan", "make_conveyor_video", "plan_conveyor", "truth_path_for"]

log = logging.getLogger(__name__)

_SCHEMA_VERSION = 1
_FOREIGN_SCHEMA_VERSION = 2  # truth with foreign objects: entries gain `kind`
FOREIGN = "foreign"  # the truth grade of a foreign object
_FOREIGN_LEN = (60.0, 150.0)  # foreign object length, px: from a pebble to a glove longer than a fruit
_REF_W, _REF_H = 640, 480  # sizes below are given for this frame and scale with it
_DEFAULT_SPEED = 10.0      # px/frame at 640 wide: a 20-fruit video at 30 fps lasts about 15 s
_LEN_RANGE = (80.0, 140.0)  # fruit length, px
_GAP_RANGE = (24.0, 150.0)  # free belt between neighbours, px (more than a drop shadow)
_LEAD_FRAMES = 3            # belt-only frames before the first fruit and after the last
_SHADOW = 0.45
_BELT_PERIOD = 256          # px: the belt texture tile, scrolled with the fruit

Progress = Optional[Callable[[int, int], None]]


@dataclass(frozen=True)
class ConveyorFruit:
    """One object on the belt: its look (grade, seed), pose, and where it is on the belt.

    A foreign object has grade FOREIGN, its `kind`, and axes (L/2, L/2) for an object L px long.
    """

    fruit_id: int
    grade: str
    seed: np.random.SeedSequence = field(repr=False, compare=False)
    axes: tuple[float, float]
    angle: float
    y: int                            # centre row
    x0: int                           # centre column at frame 0 (negative: not yet on screen)
    box: tuple[int, int, int, int]    # painted box relative to the centre: dx0, dy0, dx1, dy1 (exclusive)
    first_frame: int
    last_frame: int
    kind: str = "mango"


def _paint(img: np.ndarray, f_seed: np.random.SeedSequence, grade: str, kind: str, centre: tuple[int, int],
           axes: tuple[float, float], angle: float, shadow: float) -> tuple[int, int, int, int]:
    # A fresh generator from the object's seed repaints the identical object every frame.
    rng = np.random.default_rng(f_seed)
    if grade == FOREIGN:
        return draw_foreign(img, rng, kind, centre, 2.0 * axes[0], angle, shadow=shadow)
    return draw_mango(img, rng, grade, centre, axes, angle, shadow=shadow)


@dataclass
class ConveyorPlan:
    """The whole video as data: render any frame on demand, or read the truth without rendering."""

    fps: float
    size_wh: tuple[int, int]
    speed_px: float
    frames: int
    band: tuple[int, int]             # belt rows [top, bottom)
    fruits: list[ConveyorFruit]
    _backdrop: np.ndarray = field(repr=False)
    _belt: np.ndarray = field(repr=False)

    def offset(self, frame: int) -> int:
        """How far (px) the belt has moved at `frame`; fruit and texture move together."""
        return math.floor(self.speed_px * frame + 0.5)

    def background(self, frame: int) -> np.ndarray:
        """The frame without fruit: static surroundings and the belt texture scrolled to `frame`."""
        img = self._backdrop.copy()
        w = self.size_wh[0]
        period = self._belt.shape[1]
        cols = (np.arange(w) - self.offset(frame)) % period
        top, bot = self.band
        img[top:bot] = self._belt[:, cols]
        return img

    def visible(self, frame: int) -> list[ConveyorFruit]:
        return [f for f in self.fruits if f.first_frame <= frame <= f.last_frame]

    def render(self, frame: int) -> tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int]]]]:
        """BGR frame `frame` and the (fruit_id, clipped box) that draw_mango reported for each fruit."""
        img = self.background(frame)
        boxes = []
        off = self.offset(frame)
        for f in self.visible(frame):
            box = _paint(img, f.seed, f.grade, f.kind, (f.x0 + off, f.y), f.axes, f.angle, _SHADOW)
            boxes.append((f.fruit_id, box))
        return img, boxes

    def truth(self) -> dict[str, Any]:
        fruits = sorted(self.fruits, key=lambda f: (f.last_frame, f.fruit_id))
        with_kind = any(f.grade == FOREIGN for f in fruits)
        return {
            "schema_version": _FOREIGN_SCHEMA_VERSION if with_kind else _SCHEMA_VERSION,
            "fps": self.fps,
            "size": [int(self.size_wh[0]), int(self.size_wh[1])],
            "frames": int(self.frames),
            "fruits": [
                {"fruit_id": f.fruit_id, "grade": f.grade, "first_frame": f.first_frame, "last_frame": f.last_frame,
                 **({"kind": f.kind} if with_kind else {})}
                for f in fruits
            ],
        }


def truth_path_for(video_path: str | os.PathLike) -> Path:
    """`c.mp4` → `c.truth.json` (same folder)."""
    p = Path(video_path)
    return p.with_name(p.stem + ".truth.json")


def _sibling_tmp(path: Path, suffix: str) -> Path:
    """An unused hidden name next to `path`, keeping the suffix (VideoWriter picks the container by it)."""
    while True:
        cand = path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}{suffix}")
        if not cand.exists():
            return cand


def _backdrop(rng: np.random.Generator, w: int, h: int, top: int, bot: int) -> np.ndarray:
    """Static surroundings: a dark floor gradient beyond the belt and a metal rail on each edge."""
    ramp = np.linspace(rng.uniform(45, 70), rng.uniform(70, 100), h, dtype=np.float32)[:, None, None]
    tint = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    img = np.broadcast_to(ramp * tint, (h, w, 3)).astype(np.uint8).copy()
    draw_rails(img, top, bot, rng)
    return img


def _measure_box(fruit_seed: np.random.SeedSequence, grade: str, axes: tuple[float, float],
                 angle: float, kind: str = "mango") -> tuple[int, int, int, int]:
    """Painted box of an object relative to its (integer) centre, measured by painting it once."""
    r = math.ceil(axes[0] * 1.6) + 8
    scratch = np.zeros((2 * r + 1, 2 * r + 1, 3), np.uint8)
    x0, y0, x1, y1 = _paint(scratch, fruit_seed, grade, kind, (r, r), axes, angle, 0.0)
    if x0 == 0 or y0 == 0 or x1 == scratch.shape[1] or y1 == scratch.shape[0]:
        raise AssertionError("scratch canvas too small to measure a fruit")  # a bug, not a user error
    return x0 - r, y0 - r, x1 - r, y1 - r


def plan_conveyor(
    fruits: int = 20,
    seed: int = 0,
    fps: float = 30,
    size_wh: tuple[int, int] = (640, 480),
    speed_px: float | None = None,
    foreign: int = 0,
) -> ConveyorPlan:
    """Lay out a conveyor video (fruit, foreign objects, poses, spacing, frame count) without rendering it."""
    fruits, foreign = int(fruits), int(foreign)
    w, h = int(size_wh[0]), int(size_wh[1])
    if fruits < 1:
        raise ConfigError(f"fruits = {fruits}: need at least 1")
    if foreign < 0:
        raise ConfigError(f"foreign = {foreign}: expected 0 or more foreign objects")
    if not fps > 0:
        raise ConfigError(f"fps = {fps}: must be > 0")
    if w < 160 or h < 120 or w > 4096 or h > 4096:
        raise ConfigError(f"size_wh = {size_wh}: expected width 160..4096 and height 120..4096 px")
    scale = min(w / _REF_W, h / _REF_H)
    speed = float(speed_px) if speed_px is not None else _DEFAULT_SPEED * w / _REF_W
    if not speed > 0:
        raise ConfigError(f"speed_px = {speed_px}: must be > 0 px/frame")

    layout = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(0,)))
    top, bot = round(0.1 * h), round(0.9 * h)
    cum = np.cumsum(CLASS_BALANCE)

    # Foreign objects draw from their own streams, so the fruit of a seed are the same with or without them.
    odd = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(3,)))
    is_foreign = np.zeros(fruits + foreign, bool)
    if foreign:
        is_foreign[odd.choice(fruits + foreign, foreign, replace=False)] = True

    placed = []
    prev_left = None  # belt-frame column of the previous object's left edge
    n_fruit = n_foreign = 0
    for i in range(fruits + foreign):
        if is_foreign[i]:
            grade, kind = FOREIGN, FOREIGN_KINDS[int(odd.integers(len(FOREIGN_KINDS)))]
            a = b = odd.uniform(*_FOREIGN_LEN) * scale / 2.0
            angle = float(odd.uniform(0, 360))
            gap = odd.uniform(*_GAP_RANGE) * scale
            yr = odd.random()
            fseed = np.random.SeedSequence(int(seed), spawn_key=(4, n_foreign))
            n_foreign += 1
        else:
            kind = "mango"
            grade = GRADES[int(min(np.searchsorted(cum, layout.random() * cum[-1], side="right"), 2))]
            a = layout.uniform(*_LEN_RANGE) * scale / 2.0
            b = a * layout.uniform(0.6, 0.74)
            angle = float(layout.uniform(-35, 35) + (180.0 if layout.random() < 0.5 else 0.0))
            gap = layout.uniform(*_GAP_RANGE) * scale
            yr = layout.random()
            fseed = np.random.SeedSequence(int(seed), spawn_key=(1, n_fruit))
            n_fruit += 1
        dx0, dy0, dx1, dy1 = _measure_box(fseed, grade, (a, b), angle, kind)
        margin = math.ceil(4 * scale)
        lo, hi = top + margin - dy0, bot - margin - dy1
        y = round(lo + yr * (hi - lo)) if hi > lo else (top + bot) // 2
        # Fruit 0 leads; each next one trails the previous by its own width plus a free gap.
        if prev_left is None:
            x0 = -dx1 - math.ceil(_LEAD_FRAMES * speed)
        else:
            x0 = math.floor(prev_left - gap) - dx1
        prev_left = x0 + dx0
        placed.append((i, grade, fseed, (a, b), angle, y, x0, (dx0, dy0, dx1, dy1), kind))

    # Frame of entry/exit from the (monotone) belt offset; enough frames for the last fruit to leave.
    last_x0, last_box = placed[-1][6], placed[-1][7]
    n_guess = math.ceil((w - last_box[0] - last_x0) / speed) + 2 * _LEAD_FRAMES + 2
    offs = np.floor(speed * np.arange(n_guess) + 0.5).astype(np.int64)
    planned = []
    for i, grade, fseed, axes, angle, y, x0, box, kind in placed:
        dx0, _, dx1, _ = box
        first = int(np.searchsorted(offs, 1 - dx1 - x0, side="left"))        # right edge reaches column 0
        last = int(np.searchsorted(offs, w - 1 - dx0 - x0, side="right")) - 1  # left edge still ≤ w-1
        planned.append(ConveyorFruit(i, grade, fseed, axes, angle, y, x0, box, first, last, kind))
    frames = max(f.last_frame for f in planned) + 1 + _LEAD_FRAMES

    scene = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(2,)))
    backdrop = _backdrop(scene, w, h, top, bot)
    belt = belt_texture(scene, (bot - top, max(16, round(_BELT_PERIOD * scale))))
    return ConveyorPlan(float(fps) if not float(fps).is_integer() else int(fps), (w, h), speed, frames, (top, bot),
                        planned, backdrop, belt)


def make_conveyor_video(
    out_path: str | os.PathLike,
    fruits: int = 20,
    seed: int = 0,
    fps: float = 30,
    size_wh: tuple[int, int] = (640, 480),
    speed_px: float | None = None,
    codec: str = "mp4v",
    progress: Progress = None,
    foreign: int = 0,
) -> dict[str, Any]:
    """Write the conveyor video and its `<stem>.truth.json`; return a summary.

    `codec` is a FourCC for cv2.VideoWriter: "mp4v" (.mp4) or "MJPG" (.avi). `speed_px` is the belt
    speed in px/frame (default 10 at 640 px wide); `foreign` adds that many foreign objects. The video is written to a temporary name in the
    same folder and renamed into place (replacing an existing file), and so is the truth file.
    Raises DataError when the writer cannot be opened (codec or container unsupported by this
    OpenCV build) and ConfigError for invalid options.
    """
    t_start = time.perf_counter()
    out = Path(out_path)
    if not isinstance(codec, str) or len(codec) != 4:
        raise ConfigError(f"codec = {codec!r}: expected a 4-character FourCC such as 'mp4v' or 'MJPG'")
    if codec.upper() == "MJPG" and out.suffix.lower() != ".avi":
        raise ConfigError(f"{out}: codec MJPG needs a .avi file name")
    if not out.suffix:
        raise ConfigError(f"{out}: give the video file an extension (.mp4 for mp4v, .avi for MJPG)")
    plan = plan_conveyor(fruits=fruits, seed=seed, fps=fps, size_wh=size_wh, speed_px=speed_px, foreign=foreign)
    w, h = plan.size_wh

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling_tmp(out, out.suffix)
    truth_path = truth_path_for(out)
    writer = None
    ttmp: Path | None = None
    try:
        try:
            writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*codec), float(plan.fps), (w, h))
        except cv2.error:
            writer = None  # some backends throw instead of returning a closed writer
        if writer is None or not writer.isOpened():
            raise DataError(
                f"{out}: cannot open a video writer for codec {codec!r} with a {out.suffix} file in this OpenCV "
                "build; try codec 'MJPG' with a .avi file name"
            )
        for i in range(plan.frames):
            frame, _ = plan.render(i)
            writer.write(frame)
            if progress:
                progress(i + 1, plan.frames)
        writer.release()
        writer = None
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise DataError(f"{out}: the video writer produced no data (codec {codec!r})")
        ttmp = _sibling_tmp(truth_path, ".json")
        with open(ttmp, "x", encoding="utf-8") as f:
            json.dump(plan.truth(), f, indent=1)
            f.write("\n")
        # Both files are complete before either is renamed, so a reader never pairs a new video
        # with a missing truth file for longer than two renames.
        os.replace(tmp, out)
        os.replace(ttmp, truth_path)
    except BaseException:
        if writer is not None:
            writer.release()
        tmp.unlink(missing_ok=True)
        if ttmp is not None:
            ttmp.unlink(missing_ok=True)
        raise

    seconds = time.perf_counter() - t_start
    n_foreign = sum(1 for f in plan.fruits if f.grade == FOREIGN)
    log.info("wrote %s: %d frames, %d fruit, %d foreign in %.1f s", out, plan.frames, len(plan.fruits) - n_foreign,
             n_foreign, seconds)
    return {
        "path": str(out),
        "truth_path": str(truth_path),
        "frames": plan.frames,
        "fruits": len(plan.fruits) - n_foreign,
        "foreign": n_foreign,
        "grades": {g: sum(1 for f in plan.fruits if f.grade == g) for g in GRADES},
        "fps": plan.fps,
        "size": [w, h],
        "duration_s": plan.frames / float(plan.fps),
        "codec": codec,
        "seconds": seconds,
    }
