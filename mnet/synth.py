"""Embedded synthetic mango dataset: procedurally drawn mangoes graded A/B/C, in the AICUP layout.

Nothing is downloaded: every image is painted with numpy + OpenCV from a per-image random generator,
so a seed reproduces the dataset byte for byte (same library versions) and the work can be split
across processes in any order.

What an image shows: a phone-like 4:3 JPEG (about 15% portrait) of one mango — kidney-shaped body,
red→orange→yellow→green skin gradient, lenticels, shading and a specular highlight — held in a hand
or lying on a dark textured conveyor belt, in front of blurred clutter.

Grades follow the grading rules of the real set, with deliberately overlapping distributions:
  A  no defects, even colour (a few with slight unevenness);
  B  uneven colour and/or small defects a thumb could cover (latex stains, healed scratches),
     some of them tiny;
  C  any black spot, anthracnose (clusters of dark sunken spots), rot, or large defects.
On top, `label_noise` of the labels are moved to a neighbouring grade (A↔B↔C) to mimic grader
disagreement. Defects are sized so that most stay visible after the models' 24×32 resize: a small
CNN can learn the grades, a linear probe on pixels much less so, and nothing reaches 100%.

`draw_mango` paints one fruit onto an existing canvas; the conveyor video (`mnet.conveyor`) reuses it
and `belt_texture`, so dataset fruit and video fruit look alike. `draw_foreign` paints what must not be
graded (leaves, gloves, stones, packaging) for the conveyor's foreign objects; never in the dataset.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

from mnet.errors import ConfigError, DataError

__all__ = [
    "CLASS_BALANCE",
    "GRADES",
    "PORTRAIT_FRACTION",
    "SCENES",
    "SPLITS",
    "FOREIGN_KINDS",
    "belt_texture",
    "draw_foreign",
    "draw_labels",
    "draw_mango",
    "draw_rails",
    "render_mango",
    "synthesize",
]

log = logging.getLogger(__name__)

GRADES = ("A", "B", "C")
# Class balance of the real AICUP train split (about 32/37/31 %).
CLASS_BALANCE = (0.32, 0.37, 0.31)
SPLITS = ("train", "dev", "test")
PORTRAIT_FRACTION = 0.15
SCENES = ("hand", "belt")
_HAND_FRACTION = 0.5
_JPEG_QUALITY = 90
# Half-length (px) up to which a fruit is shaded at full resolution (covers the conveyor's fruit).
_FULL_RES_A = 90.0
_SCHEMA_VERSION = 1

Progress = Optional[Callable[[int, int], None]]

# Skin palette, BGR, from deep red (0) through orange and yellow to green (5). A fruit's colour is a
# position t on this ramp; evenness of colour is how little t varies over the fruit.
_SKIN_RAMP_RGB = np.array(
    [
        (140, 22, 38),   # deep red
        (196, 44, 42),   # red
        (232, 112, 40),  # orange
        (238, 186, 64),  # yellow
        (186, 190, 62),  # yellow-green
        (104, 150, 52),  # green
    ],
    np.float32,
)
_SKIN_RAMP = _SKIN_RAMP_RGB[:, ::-1].copy()
_RAMP_MAX = float(len(_SKIN_RAMP) - 1)

# Human skin tones, BGR, light to dark.
_HAND_TONES = np.array([(160, 185, 232), (128, 160, 212), (98, 132, 186), (70, 100, 150), (48, 70, 110)], np.float32)

_NOISE_TILE: tuple[np.ndarray, np.ndarray] | None = None


# --------------------------------------------------------------------------------------------------
# labels and per-image random streams
# --------------------------------------------------------------------------------------------------
def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def _image_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """Independent generator per (seed, split, image, stream): splits never share draws, any order works."""
    ss = np.random.SeedSequence(int(seed), spawn_key=(_split_id(split), int(index), int(stream)))
    return np.random.default_rng(ss)


_LABEL_STREAM, _IMAGE_STREAM = 0, 1


def _noisy_label(rng: np.random.Generator, grade: int, label_noise: float) -> int:
    # Graders disagree between neighbouring grades, so noise moves a label by one step only.
    if rng.random() >= label_noise:
        return grade
    if grade == 0:
        return 1
    if grade == 2:
        return 1
    return 0 if rng.random() < 0.5 else 2


def draw_labels(n: int, *, seed: int = 0, split: str = "train", label_noise: float = 0.05) -> list[tuple[str, str]]:
    """(drawn grade, written label) for images 0..n-1 of a split, without rendering anything.

    The drawn grade is what the image shows; the label is what goes into the CSV (differs with
    probability `label_noise`). `synthesize` uses exactly these.
    """
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    cum = np.cumsum(CLASS_BALANCE)
    out = []
    for i in range(int(n)):
        rng = _image_rng(seed, split, i, _LABEL_STREAM)
        g = int(min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), len(GRADES) - 1))
        lab = _noisy_label(rng, g, label_noise)
        out.append((GRADES[g], GRADES[lab]))
    return out


# --------------------------------------------------------------------------------------------------
# the fruit
# --------------------------------------------------------------------------------------------------
def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """Zero-mean, roughly unit-std low-frequency noise of shape (h, w): a few random cells, upsampled."""
    grid = rng.standard_normal(cells).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _plan_look(rng: np.random.Generator, grade: str) -> dict[str, Any]:
    """Every random choice about one fruit's appearance, drawn in a fixed order (determinism)."""
    look: dict[str, Any] = {
        "bend": float(rng.uniform(0.05, 0.24)) * (1 if rng.random() < 0.5 else -1),
        "asym": float(rng.uniform(-0.16, 0.16)),
        "t0": float(rng.uniform(0.2, 2.2)),
        "grad_dir": float(rng.uniform(-0.5, 0.5)),
        "grad_sign": 1.0 if rng.random() < 0.5 else -1.0,
        "ambient": float(rng.uniform(0.38, 0.52)),
        "spec_gain": float(rng.uniform(0.18, 0.5)),
        "spec_sigma": float(rng.uniform(0.1, 0.2)),
        "ramp_jitter": rng.uniform(-14, 14, size=(len(_SKIN_RAMP), 3)).astype(np.float32),
        "lenticels": int(rng.integers(15, 70)),
        "mottle": float(rng.uniform(0.04, 0.12)),
        "defects": [],
    }
    # Colour evenness: `span` is the smooth stem-to-tip gradient, `uneven` the blotchiness.
    if grade == "A":
        look["span"] = float(rng.uniform(0.3, 1.5))
        # Most A fruit are even; some are slightly uneven and overlap the mildest B fruit.
        look["uneven"] = float(rng.uniform(0.0, 0.25) if rng.random() < 0.75 else rng.uniform(0.25, 0.7))
    else:
        look["span"] = float(rng.uniform(0.8, 3.0))
        uneven_p = 0.55 if grade == "B" else 0.45
        look["uneven"] = float(rng.uniform(0.5, 1.6) if rng.random() < uneven_p else rng.uniform(0.0, 0.5))

    defects = look["defects"]
    if grade == "B":
        # Small defects a thumb could cover; fruit without broad unevenness always has at least one.
        n_small = int(rng.integers(0, 3)) if look["uneven"] >= 0.5 else int(rng.integers(1, 4))
        for _ in range(n_small):
            defects.append(_plan_small_defect(rng, tiny=rng.random() < 0.3))
    elif grade == "C":
        kinds = ["black_spots", "anthracnose", "rot", "large"]
        first = kinds[int(rng.choice(4, p=[0.35, 0.3, 0.15, 0.2]))]
        chosen = [first]
        if rng.random() < 0.3:
            chosen.append(kinds[int(rng.integers(0, 4))])
        for kind in chosen:
            defects.append(_plan_major_defect(rng, kind))
        if rng.random() < 0.3:
            defects.append(_plan_small_defect(rng, tiny=False))
    return look


def _surface_point(rng: np.random.Generator, reach: float = 0.72) -> tuple[float, float]:
    # A point on the visible face, in normalised body coordinates (unit disk), away from the rim.
    r = reach * math.sqrt(rng.random())
    phi = rng.uniform(0, 2 * math.pi)
    return r * math.cos(phi), r * math.sin(phi)


def _plan_small_defect(rng: np.random.Generator, *, tiny: bool) -> dict[str, Any]:
    kind = "latex" if rng.random() < 0.55 else "scratch"
    scale = rng.uniform(0.02, 0.045) if tiny else rng.uniform(0.06, 0.16)  # length / fruit length
    return {
        "kind": kind,
        "at": _surface_point(rng),
        "length": float(scale),
        "heading": float(rng.uniform(0, 2 * math.pi)),
        "wiggle": rng.uniform(-0.6, 0.6, size=3).astype(np.float32),
        "width": float(rng.uniform(0.012, 0.03) if kind == "latex" else rng.uniform(0.005, 0.011)),
        "opacity": float(rng.uniform(0.55, 0.85)),
    }


def _plan_major_defect(rng: np.random.Generator, kind: str) -> dict[str, Any]:
    d: dict[str, Any] = {"kind": kind}
    if kind == "black_spots":
        n = int(rng.integers(1, 6))
        # "Any black spot" makes a C, so some spots are tiny (an honest source of error at 24x32).
        d["spots"] = [
            (_surface_point(rng), float(rng.uniform(0.01, 0.06)), float(rng.uniform(0.7, 1.0)),
             float(rng.uniform(0, 180)))
            for _ in range(n)
        ]
    elif kind == "anthracnose":
        clusters = []
        for _ in range(int(rng.integers(1, 3))):
            cu, cv = _surface_point(rng, 0.6)
            spread = float(rng.uniform(0.06, 0.18))
            n = int(rng.integers(4, 23))
            offs = rng.normal(0, spread, size=(n, 2)).astype(np.float32)
            radii = rng.uniform(0.006, 0.022, size=n).astype(np.float32)
            clusters.append(((cu, cv), spread, offs, radii))
        d["clusters"] = clusters
    elif kind == "rot":
        d["at"] = _surface_point(rng, 0.55)
        d["radius"] = float(rng.uniform(0.1, 0.24))
        d["wobble"] = rng.uniform(0.7, 1.3, size=14).astype(np.float32)
    else:  # large latex burn or a long deep scar: a B defect too big for a thumb
        d["at"] = _surface_point(rng, 0.5)
        d["radius"] = float(rng.uniform(0.12, 0.25))
        d["wobble"] = rng.uniform(0.55, 1.35, size=12).astype(np.float32)
        d["scar"] = bool(rng.random() < 0.4)
        d["heading"] = float(rng.uniform(0, 2 * math.pi))
    return d


class _Body:
    """Maps normalised body coordinates (u along the fruit, v across, unit disk = body) to ROI pixels."""

    def __init__(self, a: float, b: float, angle_deg: float, bend: float, asym: float, ox: float, oy: float):
        self.a, self.b, self.bend, self.asym, self.ox, self.oy = a, b, bend, asym, ox, oy
        th = math.radians(angle_deg)
        self.c, self.s = math.cos(th), math.sin(th)

    def to_px(self, u: float, v: float) -> tuple[float, float]:
        v = v * (1.0 + self.asym * u) + self.bend * (u * u - 0.5)
        ua, vb = u * self.a, v * self.b
        return self.ox + ua * self.c - vb * self.s, self.oy + ua * self.s + vb * self.c


def _fx(p: tuple[float, float]) -> tuple[int, int]:
    # cv2 drawing with 4 fractional bits (shift=4): sub-pixel placement, then AA.
    return round(float(p[0]) * 16), round(float(p[1]) * 16)


def _paint(col: np.ndarray, mask: np.ndarray, bgr: Sequence[float], opacity: float) -> None:
    """col ← col·(1−m) + bgr·m with m = mask/255·opacity, in place (float32 HxWx3).

    Only the mask's non-zero pixels are touched: defects and lenticels cover a small part of the
    fruit, and blending the whole ROI per defect dominated the render time.
    """
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return
    flat = col.reshape(-1, 3)
    m = (mask.reshape(-1)[idx].astype(np.float32) * (opacity / 255.0))[:, None]
    flat[idx] = flat[idx] * (1.0 - m) + m * np.asarray(bgr, np.float32)


def _draw_defects(col: np.ndarray, body: _Body, look: dict[str, Any]) -> None:
    h, w = col.shape[:2]
    L = 2.0 * body.a  # fruit length in px: defect sizes are fractions of it
    for d in look["defects"]:
        kind = d["kind"]
        if kind in ("latex", "scratch"):
            mask = np.zeros((h, w), np.uint8)
            u, v = d["at"]
            pts = [body.to_px(u, v)]
            step = d["length"] * L / 3.0
            heading = d["heading"]
            x, y = pts[0]
            for k in range(3):
                heading += float(d["wiggle"][k])
                x, y = x + step * math.cos(heading), y + step * math.sin(heading)
                pts.append((x, y))
            thick = max(1, round(d["width"] * L))
            arr = np.array([_fx(p) for p in pts], np.int32).reshape(-1, 1, 2)
            cv2.polylines(mask, [arr], False, 255, thick, cv2.LINE_AA, 4)
            if kind == "latex":
                # Latex burn: brownish stain with a soft edge.
                mask = cv2.blur(mask, (3, 3))
                _paint(col, mask, (38, 62, 98), d["opacity"])
            else:
                # Healed mechanical scratch: a pale tan scar line.
                _paint(col, mask, (120, 162, 196), d["opacity"])
        elif kind == "black_spots":
            halo = np.zeros((h, w), np.uint8)
            core = np.zeros((h, w), np.uint8)
            for (u, v), rad, ratio, ang in d["spots"]:
                c = _fx(body.to_px(u, v))
                r = rad * L
                cv2.ellipse(halo, c, (int(r * 1.5 * 16), int(r * 1.5 * ratio * 16)), ang, 0, 360, 255, -1,
                            cv2.LINE_AA, 4)
                cv2.ellipse(core, c, (int(max(r, 0.8) * 16), int(max(r * ratio, 0.8) * 16)), ang, 0, 360, 255, -1,
                            cv2.LINE_AA, 4)
            _paint(col, cv2.blur(halo, (5, 5)), (40, 58, 80), 0.5)
            _paint(col, core, (14, 16, 20), 0.95)
        elif kind == "anthracnose":
            sunk = np.zeros((h, w), np.uint8)
            spots = np.zeros((h, w), np.uint8)
            for (cu, cv_), spread, offs, radii in d["clusters"]:
                cx, cy = body.to_px(cu, cv_)
                cv2.circle(sunk, _fx((cx, cy)), int(spread * 1.2 * L * 16), 255, -1, cv2.LINE_AA, 4)
                for (ou, ov), rr in zip(offs, radii):
                    p = (cx + float(ou) * L * 0.5, cy + float(ov) * L * 0.5)
                    cv2.circle(spots, _fx(p), int(max(rr * L, 0.8) * 16), 255, -1, cv2.LINE_AA, 4)
            k = max(3, int(0.06 * L) | 1)
            # The sunken area darkens broadly around the cluster, the lesions themselves are near black.
            _paint(col, cv2.blur(sunk, (k, k)), (30, 45, 62), 0.35)
            _paint(col, spots, (18, 24, 32), 0.92)
        elif kind in ("rot", "large"):
            u, v = d["at"]
            cx, cy = body.to_px(u, v)
            r = d["radius"] * L
            wob = d["wobble"]
            n = len(wob)
            ang = np.linspace(0, 2 * math.pi, n, endpoint=False)
            # Irregular blob, elongated along a heading for scars.
            sx = 1.0
            sy = 0.35 if d.get("scar") else 1.0
            hd = d.get("heading", 0.0)
            px = np.cos(ang) * wob * r * sx
            py = np.sin(ang) * wob * r * sy
            poly = np.stack(
                [cx + px * math.cos(hd) - py * math.sin(hd), cy + px * math.sin(hd) + py * math.cos(hd)], 1
            )
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32).reshape(-1, 1, 2)], 255, cv2.LINE_AA, 4)
            k = max(3, int(0.05 * L) | 1)
            mask = cv2.blur(mask, (k, k))
            if kind == "rot":
                _paint(col, mask, (32, 52, 78), 0.9)
                inner = np.zeros((h, w), np.uint8)
                cv2.circle(inner, _fx((cx, cy)), int(r * 0.55 * 16), 255, -1, cv2.LINE_AA, 4)
                _paint(col, cv2.blur(inner, (k, k)), (16, 20, 26), 0.85)
            else:
                _paint(col, mask, (34, 56, 88) if not d.get("scar") else (70, 104, 140), 0.85)


def draw_mango(
    canvas: np.ndarray,
    rng: np.random.Generator,
    grade: str,
    center_xy: tuple[float, float],
    axes_px: tuple[float, float],
    angle_deg: float,
    *,
    shadow: float = 0.45,
) -> tuple[int, int, int, int]:
    """Paint one mango of `grade` onto BGR uint8 `canvas` in place; return its box (x0, y0, x1, y1).

    `axes_px` are the semi-axes (half length, half width) as in cv2.ellipse, `angle_deg` rotates the
    long axis clockwise from +x (image coordinates). The fruit may extend past the canvas; the box is
    clipped to the canvas, x1/y1 exclusive, covering every pixel the body (not its shadow) changed
    noticeably; it is (0, 0, 0, 0) when the fruit is entirely off-canvas. `shadow` is the strength
    of the soft drop shadow (0 = none). All appearance comes from `rng`: the same generator state
    paints the same fruit at any integer position.
    """
    if grade not in GRADES:
        raise ValueError(f"grade must be one of {GRADES}, got {grade!r}")
    if canvas.ndim != 3 or canvas.shape[2] != 3 or canvas.dtype != np.uint8:
        raise ValueError("canvas must be an HxWx3 uint8 BGR image")
    a, b = float(axes_px[0]), float(axes_px[1])
    if a <= 1 or b <= 1:
        raise ValueError(f"axes_px must be > 1 px, got {axes_px}")
    look = _plan_look(rng, grade)
    # Fields drawn after the plan come from a sub-stream, so their size may depend on the ROI.
    lsub = np.random.default_rng(rng.integers(0, 2**63))

    cx, cy = float(center_xy[0]), float(center_xy[1])
    th = math.radians(angle_deg)
    c, s = math.cos(th), math.sin(th)
    b_eff = b * (1.0 + abs(look["asym"]) + 0.5 * abs(look["bend"]))
    pad = math.ceil(0.25 * b) + 4  # room for the drop shadow
    ex = math.ceil(math.hypot(a * c, b_eff * s)) + pad
    ey = math.ceil(math.hypot(a * s, b_eff * c)) + pad
    ix, iy = round(cx), round(cy)
    fx, fy = cx - ix, cy - iy
    # Big fruit (dataset photos) are shaded at 1/k resolution and upsampled: k² fewer pixels, and a
    # smooth skin loses nothing a 24x32 model or a phone photo would show. Conveyor-sized fruit
    # (a <= _FULL_RES_A) are always rendered at full resolution.
    k = max(1, math.ceil(a / _FULL_RES_A))
    rws, rhs = -(-(2 * ex + 1) // k), -(-(2 * ey + 1) // k)
    rw, rh = rws * k, rhs * k
    ka, kb = a / k, b / k

    # Normalised body coordinates of every (internal) pixel: rotate, straighten the kidney bend, undo
    # the asymmetric taper; the body is then the unit disk u² + v² ≤ 1. Internal pixel j sits at
    # full-resolution pixel (j + 0.5)·k − 0.5, the centre convention of cv2.resize.
    gx = (((np.arange(rws, dtype=np.float32) + 0.5) * k - 0.5 - ex - fx) / k)[None, :]
    gy = (((np.arange(rhs, dtype=np.float32) + 0.5) * k - 0.5 - ey - fy) / k)[:, None]
    u = (gx * c + gy * s) * (1.0 / ka)
    v = (gy * c - gx * s) * (1.0 / kb)
    v = (v - look["bend"] * (u * u - 0.5)) / (1.0 + look["asym"] * np.clip(u, -1.5, 1.5))
    rho2 = u * u + v * v
    rho = np.sqrt(rho2)
    alpha = np.clip((1.0 - rho) * (0.9 * kb) + 0.5, 0.0, 1.0)  # ~1 px anti-aliased rim

    # Skin colour: position on the ramp = smooth gradient + broad blotches + fine mottle.
    gd = look["grad_dir"]
    t = (look["t0"] + 0.5 * look["grad_sign"] * look["span"]) + (0.5 * look["grad_sign"] * look["span"]) * (u + gd * v)
    blotch = _smooth_field(lsub, rhs, rws, (4, 5))
    if look["uneven"] > 0:
        t += look["uneven"] * blotch
    t += look["mottle"] * _smooth_field(lsub, rhs, rws, (12, 16))
    idx = np.clip(t * (255.0 / _RAMP_MAX), 0, 255).astype(np.uint8)
    ramp = np.clip(_SKIN_RAMP + look["ramp_jitter"], 0, 255)
    lut = np.stack(
        [np.interp(np.linspace(0, _RAMP_MAX, 256), np.arange(len(ramp)), ramp[:, i]) for i in range(3)], 1
    ).astype(np.float32)
    col = lut[idx]

    body = _Body(ka, kb, angle_deg, look["bend"], look["asym"], (ex + fx + 0.5) / k - 0.5, (ey + fy + 0.5) / k - 0.5)
    # Lenticels: tiny pale dots all over the skin (every grade has them).
    lent = np.zeros((rhs, rws), np.uint8)
    for _ in range(look["lenticels"]):
        p = body.to_px(*_surface_point(lsub, 0.95))
        cv2.circle(lent, _fx(p), int(max(0.006 * ka, 0.6) * 16), 255, -1, cv2.LINE_AA, 4)
    _paint(col, lent, (150, 210, 235), 0.25)
    _draw_defects(col, body, look)

    # Shading: treat the body as a bulging ellipsoid lit from the top left, plus a soft highlight.
    nz = np.sqrt(np.clip(1.0 - rho2, 0.0, 1.0))
    lx, ly, lz = -0.45, -0.55, 0.70
    lu, lv = lx * c + ly * s, ly * c - lx * s
    amb = look["ambient"]
    shade = np.clip(u * lu + v * lv + nz * lz, 0.0, 1.0) * (1.0 - amb) + amb
    hu, hv = lu * 0.45, lv * 0.45
    spec = np.exp(((u - hu) ** 2 + (v - hv) ** 2) * (-0.5 / look["spec_sigma"] ** 2)) * look["spec_gain"]
    col *= (shade * (1.0 - spec))[..., None]
    col += (spec * 255.0)[..., None]
    col_u8 = np.clip(col + 0.5, 0, 255).astype(np.uint8)
    if k > 1:
        col_u8 = cv2.resize(col_u8, (rw, rh), interpolation=cv2.INTER_LINEAR)
        alpha = cv2.resize(alpha, (rw, rh), interpolation=cv2.INTER_LINEAR)

    return _composite(canvas, col_u8, alpha, ix - ex, iy - ey, shadow, b)


def _composite(canvas: np.ndarray, col_u8: np.ndarray, alpha: np.ndarray, x0: int, y0: int, shadow: float,
               shadow_px: float) -> tuple[int, int, int, int]:
    """Blend a rendered object (colour + alpha, top-left corner at x0, y0) onto `canvas`, clipped to
    it: a soft shadow first (offset as if lit from the top left, `shadow_px` its scale), then the
    object. Returns the visible object's box (x0, y0, x1, y1), all zeros when nothing shows."""
    h, w = alpha.shape[:2]
    H, W = canvas.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if cx1 <= cx0 or cy1 <= cy0:
        return (0, 0, 0, 0)
    sl = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    dst = canvas[cy0:cy1, cx0:cx1]
    al = np.ascontiguousarray(alpha[sl])
    if shadow > 0:
        m = np.float32([[1, 0, 0.10 * shadow_px], [0, 1, 0.16 * shadow_px]])
        sh = cv2.warpAffine(alpha, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        kk = max(3, int(0.2 * shadow_px) | 1)
        sh = np.ascontiguousarray(cv2.blur(sh, (kk, kk))[sl]) * float(shadow)
        dst = cv2.blendLinear(dst, np.zeros_like(dst), 1.0 - sh, sh)
    # blendLinear divides by w1 + w2; keep it away from 0 where both weights vanish.
    dst = cv2.blendLinear(dst, np.ascontiguousarray(col_u8[sl]), 1.0 - al + 1e-6, al)
    canvas[cy0:cy1, cx0:cx1] = dst
    seen = al > 0.05
    rows, cols = np.flatnonzero(seen.any(1)), np.flatnonzero(seen.any(0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (cx0 + int(cols[0]), cy0 + int(rows[0]), cx0 + int(cols[-1]) + 1, cy0 + int(rows[-1]) + 1)


# --------------------------------------------------------------------------------------------------
# foreign material (conveyor video only): things that are not fruit but reach the belt
# --------------------------------------------------------------------------------------------------
FOREIGN_KINDS = ("leaf", "glove", "stone", "packaging")

# RGB palettes; each object picks one entry and jitters it. Leaves are mostly green (some autumn
# colours that sit on the mango ramp: their shape must give them away), gloves nitrile blue/purple,
# black, white latex or yellow rubber, stones grey to terracotta, packaging cardboard or printed film.
_LEAF_RGB = np.array([(46, 104, 38), (72, 128, 44), (96, 118, 34), (58, 92, 52), (188, 98, 34), (150, 52, 34)],
                     np.float32)
_GLOVE_RGB = np.array([(48, 96, 200), (112, 70, 176), (38, 38, 44), (226, 222, 206), (236, 200, 48)], np.float32)
_STONE_RGB = np.array([(128, 126, 120), (104, 98, 92), (150, 132, 112), (92, 100, 108), (166, 104, 78)], np.float32)
_PACK_RGB = np.array([(168, 128, 84), (196, 40, 44), (40, 80, 190), (232, 232, 228), (48, 150, 70)], np.float32)


def _poly(pts_uv: np.ndarray, angle_deg: float, centre: float) -> np.ndarray:
    """Object coordinates (u along the object, v across) → int32 points for cv2 with shift=4."""
    th = math.radians(angle_deg)
    c, s = math.cos(th), math.sin(th)
    x = pts_uv[:, 0] * c - pts_uv[:, 1] * s + centre
    y = pts_uv[:, 0] * s + pts_uv[:, 1] * c + centre
    return np.round(np.stack([x, y], 1) * 16).astype(np.int32)


def _capsule_uv(p0: tuple[float, float], p1: tuple[float, float], r: float, n: int = 10) -> np.ndarray:
    """Outline of a stadium (finger, stem) from p0 to p1 with radius r, object coordinates."""
    (u0, v0), (u1, v1) = p0, p1
    ang = math.atan2(v1 - v0, u1 - u0)
    half = np.linspace(-math.pi / 2, math.pi / 2, n)
    a = [(u1 + r * math.cos(ang + t), v1 + r * math.sin(ang + t)) for t in half]
    b = [(u0 + r * math.cos(ang + math.pi + t), v0 + r * math.sin(ang + math.pi + t)) for t in half]
    return np.array(a + b, np.float64)


def _foreign_shape(rng: np.random.Generator, kind: str, size: float) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The outline polygons (object coordinates) and look of one foreign object, drawn in a fixed order."""
    L = size
    look: dict[str, Any] = {"lines": []}
    if kind == "leaf":
        w = L * rng.uniform(0.12, 0.2)
        t = np.linspace(0.0, 1.0, 48)
        serr = rng.uniform(0.0, 0.12) * np.sin(t * rng.uniform(40, 80))
        half = w * np.sin(math.pi * t) ** rng.uniform(0.6, 0.9) * (1.0 + serr)
        u = (t - 0.5) * L
        outline = np.concatenate([np.stack([u, -half], 1), np.stack([u[::-1], half[::-1]], 1)])
        stem = _capsule_uv((-0.5 * L - 0.14 * L, 0.0), (-0.5 * L + 0.02 * L, 0.0), max(1.0, 0.012 * L))
        look["rgb"] = _LEAF_RGB[int(rng.integers(len(_LEAF_RGB)))]
        look["lines"].append(((-0.5 * L, 0.0), (0.45 * L, 0.0), 0.25))  # midrib, lighter
        for k in range(int(rng.integers(4, 8))):
            u0 = -0.4 * L + k * 0.8 * L / 7
            for sgn in (-1, 1):
                look["lines"].append(((u0, 0.0), (u0 + 0.12 * L, sgn * 0.8 * w), 0.15))
        return [outline, stem], look
    if kind == "glove":
        pw = L * rng.uniform(0.26, 0.32)          # palm half-width
        spread = rng.uniform(0.0, 1.0)              # 0: fingers together (a crumpled glove), 1: spread
        palm = _capsule_uv((-0.35 * L, 0.0), (0.0, 0.0), pw, 14)
        cuff = np.array([(-0.62 * L, -0.8 * pw), (-0.3 * L, -0.9 * pw), (-0.3 * L, 0.9 * pw), (-0.62 * L, 0.8 * pw)])
        polys = [palm, cuff]
        fr = pw * 0.22
        for k in range(4):
            v0 = (-0.66 + 0.44 * k) * pw
            ang = math.radians((-18 + 12 * k) * spread)
            flen = L * rng.uniform(0.26, 0.36) * (0.8 if k in (0, 3) else 1.0)
            polys.append(_capsule_uv((0.0, v0), (flen * math.cos(ang), v0 + flen * math.sin(ang)), fr, 8))
        tang = math.radians(-60 - 30 * spread)
        polys.append(_capsule_uv((-0.2 * L, -0.8 * pw), (-0.2 * L + 0.25 * L * math.cos(tang),
                                                         -0.8 * pw + 0.25 * L * math.sin(tang)), fr * 1.1, 8))
        look["rgb"] = _GLOVE_RGB[int(rng.integers(len(_GLOVE_RGB)))]
        for _ in range(int(rng.integers(3, 7))):  # creases
            p = (rng.uniform(-0.5, 0.1) * L, rng.uniform(-0.7, 0.7) * pw)
            look["lines"].append((p, (p[0] + rng.uniform(-0.15, 0.15) * L, p[1] + rng.uniform(-0.3, 0.3) * pw), -0.3))
        return polys, look
    if kind == "stone":
        n = int(rng.integers(8, 14))
        ang = np.sort(rng.uniform(0, 2 * math.pi, n))
        aspect = rng.uniform(0.55, 0.95)
        r = 0.5 * L * (1.0 + rng.uniform(-0.18, 0.12, n))
        outline = np.stack([r * np.cos(ang), aspect * r * np.sin(ang)], 1)
        look["rgb"] = _STONE_RGB[int(rng.integers(len(_STONE_RGB)))]
        look["speckle"] = int(rng.integers(60, 200))
        return [outline], look
    if kind == "packaging":
        hw, hh = 0.5 * L, 0.5 * L * rng.uniform(0.45, 0.95)
        if rng.random() < 0.3:  # a crumpled wrapper: a few sharp corners
            n = int(rng.integers(5, 8))
            ang = np.sort(rng.uniform(0, 2 * math.pi, n))
            r = rng.uniform(0.8, 1.0, n)
            outline = np.stack([hw * r * np.cos(ang), hh * r * np.sin(ang)], 1)
        else:
            outline = np.array([(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)])
        look["rgb"] = _PACK_RGB[int(rng.integers(len(_PACK_RGB)))]
        look["stripes"] = [(rng.uniform(-0.8, 0.6) * hw, rng.uniform(0.06, 0.25) * hw,
                            _PACK_RGB[int(rng.integers(len(_PACK_RGB)))]) for _ in range(int(rng.integers(1, 4)))]
        look["text"] = [(rng.uniform(-0.8, 0.5) * hw, rng.uniform(-0.8, 0.6) * hh, rng.uniform(0.15, 0.4) * hw)
                        for _ in range(int(rng.integers(2, 6)))]
        return [outline], look
    raise ValueError(f"kind must be one of {FOREIGN_KINDS}, got {kind!r}")


def draw_foreign(
    canvas: np.ndarray,
    rng: np.random.Generator,
    kind: str,
    center_xy: tuple[float, float],
    size_px: float,
    angle_deg: float,
    *,
    shadow: float = 0.45,
) -> tuple[int, int, int, int]:
    """Paint one foreign object (`FOREIGN_KINDS`) of about `size_px` long onto `canvas`; return its box.

    The counterpart of `draw_mango` for the conveyor: same box convention (clipped, x1/y1 exclusive,
    (0, 0, 0, 0) off-canvas), same drop shadow, and the same generator state paints the same object
    at any integer position. Shapes, colours and textures are deliberately unlike a mango's (flat
    leaves with veins, fingered gloves, speckled stones, printed rectangles), though some share its hue.
    """
    if kind not in FOREIGN_KINDS:
        raise ValueError(f"kind must be one of {FOREIGN_KINDS}, got {kind!r}")
    if canvas.ndim != 3 or canvas.shape[2] != 3 or canvas.dtype != np.uint8:
        raise ValueError("canvas must be an HxWx3 uint8 BGR image")
    if size_px <= 4:
        raise ValueError(f"size_px must be > 4 px, got {size_px}")
    polys, look = _foreign_shape(rng, kind, float(size_px))
    sub = np.random.default_rng(rng.integers(0, 2**63))
    R = math.ceil(0.75 * size_px) + 8
    n = 2 * R + 1
    mask = np.zeros((n, n), np.uint8)
    for p in polys:  # one call each: fillPoly takes overlapping polygons as holes (even-odd)
        cv2.fillPoly(mask, [_poly(p, angle_deg, R)], 255, cv2.LINE_AA, 4)
    alpha = mask.astype(np.float32) / 255.0

    rgb = np.clip(look["rgb"] + sub.uniform(-14, 14, 3), 0, 255).astype(np.float32)
    col = np.empty((n, n, 3), np.float32)
    col[:] = rgb[::-1]
    col *= (1.0 + 0.06 * _smooth_field(sub, n, n, (6, 6)))[..., None]
    for p0, p1, gain in look["lines"]:  # veins and creases
        line = np.zeros((n, n), np.uint8)
        q = _poly(np.array([p0, p1]), angle_deg, R)
        cv2.line(line, tuple(q[0]), tuple(q[1]), 255, max(1, round(0.012 * size_px)), cv2.LINE_AA, 4)
        _paint(col, line, np.clip(rgb[::-1] * (1.0 + gain), 0, 255), 0.8)
    if kind == "stone":  # granite speckle
        dots = np.zeros((n, n), np.uint8)
        for _ in range(look["speckle"]):
            cv2.circle(dots, (int(sub.integers(n)), int(sub.integers(n))), int(sub.integers(1, 3)), 255, -1)
        _paint(col, dots, np.clip(rgb[::-1] * sub.uniform(0.4, 1.6), 0, 255), 0.7)
    if kind == "packaging":
        for u0, width, srgb in look["stripes"]:
            band = np.zeros((n, n), np.uint8)
            hh = size_px
            cv2.fillPoly(band, [_poly(np.array([(u0, -hh), (u0 + width, -hh), (u0 + width, hh), (u0, hh)]),
                                      angle_deg, R)], 255, cv2.LINE_AA, 4)
            _paint(col, band, srgb[::-1], 1.0)
        for u0, v0, ln in look["text"]:  # print: rows of dark blocks
            txt = np.zeros((n, n), np.uint8)
            q = _poly(np.array([(u0, v0), (u0 + ln, v0)]), angle_deg, R)
            cv2.line(txt, tuple(q[0]), tuple(q[1]), 255, max(1, round(0.04 * size_px)), cv2.LINE_AA, 4)
            _paint(col, txt, (30, 30, 30), 0.9)
    # Flat or mildly curved surfaces: a gentle light ramp from the top left, not a fruit's bulge.
    ramp = np.linspace(1.08, 0.88, n, dtype=np.float32)
    col *= (ramp[None, :, None] * 0.5 + ramp[:, None, None] * 0.5)
    col_u8 = np.clip(col + 0.5, 0, 255).astype(np.uint8)

    ix, iy = round(float(center_xy[0])), round(float(center_xy[1]))
    return _composite(canvas, col_u8, alpha, ix - R, iy - R, shadow, 0.3 * size_px)


# --------------------------------------------------------------------------------------------------
# scenes
# --------------------------------------------------------------------------------------------------
def belt_texture(rng: np.random.Generator, size_hw: tuple[int, int]) -> np.ndarray:
    """A dark conveyor-belt texture, BGR uint8 (h, w, 3), seamless when tiled along x (period w).

    The belt runs along x: transverse ridges, wear scuffs and grain. `mnet.conveyor` tiles and
    scrolls it so that the belt moves with the fruit.
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    base = float(rng.uniform(30, 58))
    tint = rng.uniform(0.85, 1.12, size=3).astype(np.float32)
    ridges = int(max(1, round(w / rng.uniform(10, 22))))
    ridge_amp = float(rng.uniform(5, 14))
    xs = np.arange(w, dtype=np.float32) * (2 * math.pi * ridges / w)
    xprof = ridge_amp * (np.cos(xs) ** 8) - ridge_amp * 0.3
    yprof = 6.0 * _smooth_field(rng, h, 1, (4, 1))
    gray = base + xprof[None, :] + yprof
    gray = gray + rng.integers(-6, 7, size=(h, w), dtype=np.int16)
    img = np.clip(gray, 0, 255).astype(np.uint8)
    # Scuffs drawn at x and x±w so they wrap around the seam.
    for _ in range(int(rng.integers(3, 10))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        ln, ang = rng.uniform(4, 30), rng.uniform(-0.5, 0.5)
        val = int(np.clip(base + rng.uniform(-18, 22), 0, 255))
        thick = int(rng.integers(1, 3))
        for shift in (-w, 0, w):
            p0 = (int(x + shift), int(y))
            p1 = (int(x + shift + ln * math.cos(ang)), int(y + ln * math.sin(ang)))
            cv2.line(img, p0, p1, val, thick, cv2.LINE_AA)
    return cv2.transform(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR), np.diag(tint).astype(np.float32))


def _clutter(rng: np.random.Generator, h: int, w: int, n_min: int, n_max: int) -> np.ndarray:
    """Out-of-focus surroundings: drawn at quarter resolution, upsampled (the blur is free)."""
    sh, sw = max(4, h // 4), max(4, w // 4)
    base = rng.uniform(60, 210, size=(2, 3, 3)).astype(np.float32)
    base = base * 0.6 + base.mean(axis=2, keepdims=True) * 0.4  # walls and tables are fairly grey
    small = cv2.resize(base, (sw, sh), interpolation=cv2.INTER_LINEAR)
    small = np.clip(small, 0, 255).astype(np.uint8)
    if rng.random() < 0.6:  # a table edge
        y = int(rng.uniform(0.45, 0.85) * sh)
        small[y:] = np.clip(small[y:].astype(np.int16) + rng.integers(-50, 30, size=3), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(n_min, n_max + 1))):
        colour = tuple(int(x) for x in rng.integers(20, 240, size=3))
        kind = rng.random()
        x, y = int(rng.integers(0, sw)), int(rng.integers(0, sh))
        if kind < 0.45:
            x2, y2 = x + int(rng.integers(3, sw // 2 + 4)), y + int(rng.integers(3, sh // 2 + 4))
            cv2.rectangle(small, (x, y), (x2, y2), colour, -1, cv2.LINE_AA)
        elif kind < 0.75:
            cv2.circle(small, (x, y), int(rng.integers(2, max(3, sh // 4))), colour, -1, cv2.LINE_AA)
        else:
            x2, y2 = int(rng.integers(0, sw)), int(rng.integers(0, sh))
            cv2.line(small, (x, y), (x2, y2), colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _belt_scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Landscape belt photo background: clutter, a metal rail on each side, the belt band between."""
    img = _clutter(rng, h, w, 2, 6)
    top = int(rng.uniform(0.02, 0.18) * h)
    bot = int(rng.uniform(0.82, 0.98) * h)
    img[top:bot] = belt_texture(rng, (bot - top, w))
    draw_rails(img, top, bot, rng)
    return img


def draw_rails(img: np.ndarray, top: int, bot: int, rng: np.random.Generator) -> None:
    """A rounded metal rail just above row `top` and from row `bot` down, in place (photos and video)."""
    h = img.shape[0]
    rail = max(3, int(0.035 * h))
    shade = rng.uniform(130, 200)
    profile = (shade * (0.75 + 0.25 * np.sin(np.linspace(0, math.pi, rail)))).astype(np.uint8)
    for y0 in (max(0, top - rail), bot):
        n = min(rail, h - y0)
        if n > 0:
            img[y0:y0 + n] = profile[:n, None, None]


def _draw_hand(canvas: np.ndarray, rng: np.random.Generator, centre: tuple[float, float], a: float, b: float,
               angle_deg: float, tone: np.ndarray, *, front: bool) -> None:
    """Palm, forearm and fingers behind the fruit (front=False) or the thumb over its rim (front=True)."""
    th = math.radians(angle_deg)
    e = np.array([math.cos(th), math.sin(th)])          # along the fruit
    n = np.array([-math.sin(th), math.cos(th)])         # across it, pointing down the image
    if n[1] < 0:
        n = -n
    c = np.asarray(centre, dtype=np.float64)
    dark = tuple(float(x) for x in tone * 0.78)
    light = tuple(float(x) for x in np.clip(tone * 1.1, 0, 255))
    base = tuple(float(x) for x in tone)

    def capsule(p0: np.ndarray, p1: np.ndarray, thick: float) -> None:
        t = max(2, int(thick))
        q0, q1 = _fx(tuple(p0)), _fx(tuple(p1))
        cv2.line(canvas, q0, q1, dark, t + 2, cv2.LINE_AA, 4)
        cv2.line(canvas, q0, q1, base, t, cv2.LINE_AA, 4)
        off = np.array([-0.15, -0.2]) * thick
        cv2.line(canvas, _fx(tuple(p0 + off)), _fx(tuple(p1 + off)), light, max(1, int(t * 0.4)), cv2.LINE_AA, 4)

    side = 1.0 if rng.random() < 0.5 else -1.0  # which end the fingers curl around
    if not front:
        far = c + n * (b * 3.5)
        capsule(c + n * (b * 0.9), far, b * 1.3)  # forearm, running off the frame
        pc = c + n * (b * 0.75)
        axes = (int(a * rng.uniform(0.75, 0.95) * 16), int(b * rng.uniform(0.6, 0.8) * 16))
        cv2.ellipse(canvas, _fx(tuple(pc)), (axes[0] + 32, axes[1] + 32), angle_deg, 0, 360, dark, -1, cv2.LINE_AA, 4)
        cv2.ellipse(canvas, _fx(tuple(pc)), axes, angle_deg, 0, 360, base, -1, cv2.LINE_AA, 4)
        fw = b * rng.uniform(0.26, 0.34)
        for k in range(4):
            along = side * a * (0.35 + 0.2 * k)
            p0 = c + e * along + n * (b * 0.6)
            p1 = c + e * (along + side * a * 0.25) - n * (b * rng.uniform(0.8, 1.1))
            capsule(p0, p1, fw)
    else:
        p0 = c - side * e * (a * 0.95) + n * (b * 0.9)
        p1 = c - side * e * (a * rng.uniform(0.55, 0.75)) + n * (b * rng.uniform(0.45, 0.7))
        capsule(p0, p1, b * rng.uniform(0.3, 0.38))


def _noise_tile() -> tuple[np.ndarray, np.ndarray]:
    """Sensor-noise tile (positive and negative parts) shared by all images; fixed seed → deterministic."""
    global _NOISE_TILE
    if _NOISE_TILE is None:
        n = np.random.default_rng(0x6D616E).normal(0, 3.0, size=(1024, 1024, 3))
        _NOISE_TILE = (np.clip(n, 0, 255).astype(np.uint8), np.clip(-n, 0, 255).astype(np.uint8))
    return _NOISE_TILE


def _camera(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Phone-camera look: white balance / exposure jitter, slight defocus, sensor noise."""
    gains = rng.uniform(0.9, 1.1, size=3) * rng.uniform(0.85, 1.15)
    m = np.zeros((3, 4), np.float32)
    m[[0, 1, 2], [0, 1, 2]] = gains
    m[:, 3] = rng.uniform(-8, 8)
    img = cv2.transform(img, m)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (5, 5), float(rng.uniform(0.5, 1.2)))
    pos, neg = _noise_tile()
    h, w = img.shape[:2]
    oy, ox = int(rng.integers(0, pos.shape[0] - h + 1)), int(rng.integers(0, pos.shape[1] - w + 1))
    img = cv2.add(img, pos[oy:oy + h, ox:ox + w])
    return cv2.subtract(img, neg[oy:oy + h, ox:ox + w])


def render_mango(
    rng: np.random.Generator,
    grade: str,
    *,
    scene: str = "hand",
    size_hw: tuple[int, int] = (480, 640),
) -> np.ndarray:
    """One photo of a mango of `grade`, BGR uint8 of shape size_hw + (3,).

    scene "hand": held on a palm with fingers behind and a thumb over the rim, clutter behind;
    scene "belt": lying on a conveyor belt with a drop shadow. Portrait sizes work too.
    """
    if grade not in GRADES:
        raise ValueError(f"grade must be one of {GRADES}, got {grade!r}")
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {SCENES}, got {scene!r}")
    h, w = int(size_hw[0]), int(size_hw[1])
    if h > 1024 or w > 1024 or h < 32 or w < 32:
        raise ValueError(f"size_hw must be within 32..1024 px, got {size_hw}")
    portrait = h > w
    long_side, short_side = max(h, w), min(h, w)

    # Fruit geometry first, so the hand can be placed around it.
    length = long_side * rng.uniform(0.42, 0.7)
    a = length / 2.0
    b = a * rng.uniform(0.58, 0.74)
    a = min(a, short_side * 0.62) if portrait and rng.random() < 0.3 else a
    base_angle = 90.0 if portrait and rng.random() < 0.7 else 0.0
    angle = base_angle + rng.uniform(-35, 35) + (180.0 if rng.random() < 0.5 else 0.0)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    cy = h / 2 + rng.uniform(-0.12, 0.12) * h

    if scene == "belt":
        if portrait:
            img = cv2.rotate(_belt_scene(rng, w, h), cv2.ROTATE_90_CLOCKWISE)
        else:
            img = _belt_scene(rng, h, w)
        draw_mango(img, rng, grade, (cx, cy), (a, b), angle, shadow=float(rng.uniform(0.35, 0.6)))
    else:
        img = _clutter(rng, h, w, 4, 10)
        tone = _HAND_TONES[int(rng.integers(0, len(_HAND_TONES)))] * rng.uniform(0.92, 1.08)
        hand_rng = np.random.default_rng(rng.integers(0, 2**63))
        _draw_hand(img, hand_rng, (cx, cy), a, b, angle, tone, front=False)
        draw_mango(img, rng, grade, (cx, cy), (a, b), angle, shadow=0.25)
        _draw_hand(img, hand_rng, (cx, cy), a, b, angle, tone, front=True)
    return _camera(rng, img)


# --------------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------------
def _render_one(seed: int, split: str, index: int, grade: str, image_size: tuple[int, int]) -> np.ndarray:
    rng = _image_rng(seed, split, index, _IMAGE_STREAM)
    scene = "hand" if rng.random() < _HAND_FRACTION else "belt"
    h, w = image_size
    if rng.random() < PORTRAIT_FRACTION:
        h, w = w, h
    return render_mango(rng, grade, scene=scene, size_hw=(h, w))


def _render_chunk(folder: str, seed: int, split: str, jobs: list[tuple[int, str, str]],
                  image_size: tuple[int, int]) -> int:
    """Render and write a list of (index, grade, file name); runs in a worker process or inline."""
    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]
    for index, grade, name in jobs:
        img = _render_one(seed, split, index, grade, image_size)
        path = os.path.join(folder, name)
        if not cv2.imwrite(path, img, params):
            raise DataError(f"could not write {path}: check free disk space and permissions")
    return len(jobs)


def _make_tmp_dir(out: Path) -> Path:
    """A fresh sibling `<out>.tmp-XXXXXXXX`; os.mkdir (unlike mkdtemp) keeps the umask's permissions."""
    for _ in range(100):
        cand = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
        try:
            cand.mkdir()
            return cand
        except FileExistsError:
            continue
    raise DataError(f"{out.parent}: could not create a temporary directory next to {out.name}")


def _check_out_dir(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out}: exists and is not a directory; pass an empty or new directory")
        if any(out.iterdir()):
            raise DataError(f"{out}: directory is not empty; pass an empty or new directory for the synthetic dataset")


def synthesize(
    out_dir: str | os.PathLike,
    n_train: int = 5600,
    n_dev: int = 800,
    n_test: int = 1600,
    seed: int = 0,
    label_noise: float = 0.05,
    image_size: tuple[int, int] = (480, 640),
    progress: Progress = None,
    *,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write a synthetic mango dataset in the AICUP layout and return a summary.

    Layout: <out>/{train,dev,test}.csv (header `image_id,label`, rows like `00002.jpg,C`) and the
    JPEGs under <out>/{train,dev,test}/; plus <out>/synth.json (parameters, counts, and the drawn
    grade of every image as a string per split, for measuring against clean labels). Image ids are
    numbered across splits, so they are unique in the whole dataset.

    The dataset is built in a sibling `<out>.tmp-*` directory and renamed into place, so `out_dir`
    either appears complete or not at all; it must not exist or be empty (else DataError).
    `image_size` is the landscape (h, w); PORTRAIT_FRACTION of images are its transpose.
    `workers` threads render in parallel (default: all CPUs, at most 8); the bytes written do not
    depend on it. `progress(done, total)` is called from this process as images complete.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    counts_in = {"train": int(n_train), "dev": int(n_dev), "test": int(n_test)}
    if any(n < 0 for n in counts_in.values()):
        raise ConfigError(f"image counts must be >= 0, got {counts_in}")
    if not 0.0 <= label_noise <= 1.0:
        raise ConfigError(f"label_noise = {label_noise}: must be in [0, 1]")
    ih, iw = int(image_size[0]), int(image_size[1])
    if not (32 <= ih <= 1024 and 32 <= iw <= 1024):
        raise ConfigError(f"image_size = {image_size}: must be within 32..1024 px per side")
    _check_out_dir(out)
    total = sum(counts_in.values())
    width = max(5, len(str(max(total - 1, 0))))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_tmp_dir(out)
    try:
        plans: dict[str, list[tuple[int, str, str, str]]] = {}
        first_id = 0
        for split in SPLITS:
            labels = draw_labels(counts_in[split], seed=seed, split=split, label_noise=label_noise)
            plans[split] = [
                (i, g, lab, f"{first_id + i:0{width}d}.jpg") for i, (g, lab) in enumerate(labels)
            ]
            first_id += counts_in[split]
            (tmp / split).mkdir()
            with open(tmp / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
                wr = csv.writer(f, lineterminator="\n")
                wr.writerow(["image_id", "label"])
                wr.writerows([(name, lab) for _, _, lab, name in plans[split]])

        chunk = 16
        tasks = [
            (str(tmp / split), split, [(i, g, name) for i, g, _, name in plans[split][k:k + chunk]])
            for split in SPLITS
            for k in range(0, len(plans[split]), chunk)
        ]
        n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
        n_workers = max(1, min(int(n_workers), len(tasks)))
        _noise_tile()  # build the shared tile once, before any thread needs it
        done = 0
        if progress:
            progress(0, total)
        if n_workers == 1:
            for folder, split, jobs in tasks:
                done += _render_chunk(folder, seed, split, jobs, (ih, iw))
                if progress:
                    progress(done, total)
        else:
            # Threads, not processes: OpenCV and large numpy operations release the GIL, and
            # threads need no `if __name__ == "__main__"` guard in the caller's script.
            with ThreadPoolExecutor(n_workers, thread_name_prefix="mnet-synth") as pool:
                futures = [pool.submit(_render_chunk, folder, seed, split, jobs, (ih, iw))
                           for folder, split, jobs in tasks]
                try:
                    for fut in as_completed(futures):
                        done += fut.result()
                        if progress:
                            progress(done, total)
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise

        counts = {
            split: {g: sum(1 for p in plans[split] if p[2] == g) for g in GRADES} for split in SPLITS
        }
        meta = {
            "schema_version": _SCHEMA_VERSION,
            "generator": "mnet.synth",
            "seed": int(seed),
            "label_noise": float(label_noise),
            "image_size": [ih, iw],
            "portrait_fraction": PORTRAIT_FRACTION,
            "class_balance": dict(zip(GRADES, CLASS_BALANCE)),
            "label_counts": counts,
            "drawn_grades": {split: "".join(p[1] for p in plans[split]) for split in SPLITS},
        }
        (tmp / "synth.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        _check_out_dir(out)  # someone may have filled it meanwhile
        os.replace(tmp, out)  # atomic; replaces an empty directory on POSIX
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    seconds = time.perf_counter() - t_start
    noisy = {split: sum(1 for p in plans[split] if p[1] != p[2]) for split in SPLITS}
    log.info("synthesized %d images into %s in %.1f s (%.0f img/s)", total, out, seconds, total / max(seconds, 1e-9))
    return {
        "out_dir": str(out),
        "counts": counts,
        "images": total,
        "noisy_labels": noisy,
        "seconds": seconds,
        "images_per_s": total / max(seconds, 1e-9),
        "workers": n_workers,
        "seed": int(seed),
    }

