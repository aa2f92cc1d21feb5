"""Fruit identities across frames along the belt, and one vote per fruit.

Each frame brings boxes (from the localiser) and one probability row per box (from the model).
Tracks are matched to boxes greedily by distance to a motion prediction: fruit ride the belt along
+x (or -x) at roughly the belt's speed, so a track's centre is predicted with its own velocity, or
with the belt velocity estimated from the other fruit while it is new. A box whose centre falls inside
an existing track's box never starts a second track (a fruit whose mask splits in two is one fruit).

Life of a track:
    tentative ──(seen min_hits times)──► confirmed: gets the next fruit_id (so ids follow belt order)
    confirmed ──(centre crosses trigger_x)──► emitted, still tracked so it cannot be counted again
    any ──(left through the exit edge, or unseen for max_lost frames)──► finished
A confirmed track is emitted exactly once: at the trigger line if there is one, else when it
finishes, else at flush(). Tentative tracks that finish are noise and are discarded.

The vote averages the probabilities of the frames where the fruit was fully visible; frames where
it was cut by the frame edge are used only when there is no full view (a fruit already on the belt
when the stream starts, or a trigger line close to the entry edge).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from mnet.runtime.localize import Box

from mnet.errors import ConfigError

__all__ = ["FruitVote", "TrackView", "Tracker", "TrackerConfig"]


@dataclass(frozen=True)
class TrackerConfig:
    min_hits: int = 3  # frames before a track is a fruit (rejects one-frame flickers)
    max_lost: int = 8  # frames a fruit may go unseen (occlusion, a missed mask) before it is finished
    gate: float = 0.8  # max distance from the prediction, in fruit sizes
    max_back: float = 0.3  # how far (in fruit sizes) a fruit may appear to move against the belt
    trigger_x: float | None = None  # emit when the centre crosses this x (frame pixels)
    direction: int = 1  # +1: belt runs left → right; -1: right → left
    velocity_smoothing: float = 0.5  # EMA weight of the newest velocity observation
    edge_px: int = 2

    def __post_init__(self) -> None:
        if self.min_hits < 1:
            raise ConfigError(f"tracker field 'min_hits' = {self.min_hits!r}: expected >= 1")
        if self.max_lost < 0:
            raise ConfigError(f"tracker field 'max_lost' = {self.max_lost!r}: expected >= 0")
        if self.gate <= 0 or self.max_back < 0:
            raise ConfigError(f"tracker fields gate/max_back = {self.gate}/{self.max_back}: expected > 0 / >= 0")
        if self.direction not in (1, -1):
            raise ConfigError(f"tracker field 'direction' = {self.direction!r}: expected 1 (+x) or -1 (-x)")
        if not 0 < self.velocity_smoothing <= 1:
            raise ConfigError(f"tracker field 'velocity_smoothing' = {self.velocity_smoothing!r}: expected (0, 1]")


@dataclass(frozen=True)
class FruitVote:
    """A finished (or triggered) fruit: the averaged probabilities and when it was seen."""

    fruit_id: int
    probs: np.ndarray  # (num_classes,) float
    frames: int  # frames the fruit was seen in
    voted_frames: int  # frames whose probabilities made the vote
    first_ts: float
    last_ts: float
    reason: str  # trigger | exit | lost | flush | frame
    box: Box  # last box seen


@dataclass(frozen=True)
class TrackView:
    """What an overlay needs to draw one track in the current frame."""

    fruit_id: int | None  # None while tentative
    box: Box
    probs: np.ndarray | None  # current vote
    emitted: bool
    lost: int


@dataclass
class _Track:
    box: Box
    first_ts: float
    last_ts: float
    num_classes: int
    vx: float | None = None  # px/s along x; None until two full views were seen
    vy: float = 0.0
    hits: int = 1
    lost: int = 0
    fruit_id: int | None = None
    emitted: bool = False
    full_sum: np.ndarray = field(default=None)
    full_n: int = 0
    edge_sum: np.ndarray = field(default=None)
    edge_n: int = 0

    def __post_init__(self) -> None:
        self.full_sum = np.zeros(self.num_classes, np.float64)
        self.edge_sum = np.zeros(self.num_classes, np.float64)

    def add(self, probs: np.ndarray, partial: bool) -> None:
        if partial:
            self.edge_sum += probs
            self.edge_n += 1
        else:
            self.full_sum += probs
            self.full_n += 1

    def vote(self) -> tuple[np.ndarray, int]:
        if self.full_n:
            return self.full_sum / self.full_n, self.full_n
        return self.edge_sum / max(1, self.edge_n), self.edge_n


class Tracker:
    """Feed `update()` once per processed frame; it returns the fruit to emit now, in exit order."""

    def __init__(self, num_classes: int, config: TrackerConfig = TrackerConfig()) -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes = {num_classes!r}: expected >= 1")
        self.num_classes = num_classes
        self.config = config
        self._tracks: list[_Track] = []
        self._next_id = 1
        self._belt_vx: float | None = None  # px/s, shared prior for new tracks
        # Finished tracks linger for max_lost frames: a fruit that flickers back into view at the exit
        # edge (its mask area hovering around min_area) must not start a second fruit.
        self._ghosts: list[list] = []  # [track, frames left]
        self.created = 0
        self.discarded = 0
        self.emitted = 0

    # ------------------------------------------------------------------------------------ public
    @property
    def tracks(self) -> list[TrackView]:
        return [TrackView(t.fruit_id, t.box, t.vote()[0] if t.hits else None, t.emitted, t.lost)
                for t in self._tracks]

    @property
    def belt_velocity(self) -> float | None:
        """Estimated belt speed along x in pixels per second (None until measured)."""
        return self._belt_vx

    def update(self, boxes: Sequence[Box], probs: np.ndarray, ts: float,
               bounds: tuple[float, float]) -> list[FruitVote]:
        """Match this frame's boxes (with their probability rows) to tracks; return fruit to emit.

        bounds: the (x_min, x_max) of the region the localiser searched; fruit leave through
        x_max when the belt runs +x and through x_min when it runs -x.
        """
        probs = np.asarray(probs, np.float64).reshape(len(boxes), self.num_classes) if len(boxes) else \
            np.zeros((0, self.num_classes))
        c = self.config
        out: list[FruitVote] = []
        matches = self._match(boxes, ts)
        matched_t = {ti for ti, _ in matches}
        matched_d = {di for _, di in matches}

        for ti, di in matches:
            t, b = self._tracks[ti], boxes[di]
            dt = ts - t.last_ts
            if dt > 0 and not t.box.touches_edge and not b.touches_edge:
                # Only whole views measure speed: a box growing at the entry edge moves at half speed.
                obs_vx, obs_vy = (b.center[0] - t.box.center[0]) / dt, (b.center[1] - t.box.center[1]) / dt
                a = c.velocity_smoothing
                t.vx = obs_vx if t.vx is None else (1 - a) * t.vx + a * obs_vx
                t.vy = (1 - a) * t.vy + a * obs_vy
                if t.fruit_id is not None:
                    self._belt_vx = t.vx if self._belt_vx is None else 0.8 * self._belt_vx + 0.2 * t.vx
            t.box, t.last_ts, t.lost = b, ts, 0
            t.hits += 1
            t.add(probs[di], b.touches_edge)

        for ti, t in enumerate(self._tracks):
            if ti not in matched_t:
                t.lost += 1

        self._ghosts = [g for g in self._ghosts if g[1] > 0]
        for g in self._ghosts:
            g[1] -= 1
        for di, b in enumerate(boxes):
            if di in matched_d or self._inside_existing(b) or self._absorbed_by_ghost(b, ts):
                continue
            t = _Track(b, ts, ts, self.num_classes)
            t.add(probs[di], b.touches_edge)
            self._tracks.append(t)
            self.created += 1

        keep: list[_Track] = []
        for t in self._tracks:
            if t.fruit_id is None and t.hits >= c.min_hits and t.lost == 0:
                t.fruit_id, self._next_id = self._next_id, self._next_id + 1
            if t.lost == 0:
                if (c.trigger_x is not None and t.fruit_id is not None and not t.emitted
                        and (t.box.center[0] - c.trigger_x) * c.direction >= 0):
                    out.append(self._emit(t, "trigger"))
                keep.append(t)
                continue
            reason = "exit" if self._gone(t, ts, bounds) else "lost" if t.lost > c.max_lost else None
            if reason is None:
                keep.append(t)
            else:
                self._finish(t, reason, out)
        self._tracks = keep
        return self._exit_order(out)

    def flush(self) -> list[FruitVote]:
        """End of stream: emit every confirmed fruit not yet emitted, in exit order."""
        out: list[FruitVote] = []
        for t in self._tracks:
            self._finish(t, "flush", out)
        self._tracks, self._ghosts = [], []
        return self._exit_order(out)

    def emit_single(self, box: Box, probs: np.ndarray, ts: float) -> FruitVote:
        """Full-frame mode: this frame alone is one fruit (a hand-held shot, one photo)."""
        t = _Track(box, ts, ts, self.num_classes, fruit_id=self._next_id)
        self._next_id += 1
        self.created += 1
        t.add(np.asarray(probs, np.float64).reshape(self.num_classes), False)
        return self._emit(t, "frame")

    # ----------------------------------------------------------------------------------- helpers
    def _predict(self, t: _Track, ts: float) -> tuple[float, float]:
        dt = max(0.0, ts - t.last_ts)
        vx = t.vx if t.vx is not None else (self._belt_vx or 0.0)
        cx, cy = t.box.center
        return cx + vx * dt, cy + t.vy * dt

    def _match(self, boxes: Sequence[Box], ts: float) -> list[tuple[int, int]]:
        c = self.config
        pairs = []
        for ti, t in enumerate(self._tracks):
            px, py = self._predict(t, ts)
            for di, b in enumerate(boxes):
                size = max(t.box.w, t.box.h, b.w, b.h, 1)
                bx, by = b.center
                if (bx - t.box.center[0]) * c.direction < -c.max_back * size:
                    continue  # fruit do not ride backwards
                cost = math.hypot(bx - px, by - py) / size
                if cost <= c.gate:
                    pairs.append((cost, ti, di))
        pairs.sort()
        used_t, used_d, matches = set(), set(), []
        for _, ti, di in pairs:
            if ti not in used_t and di not in used_d:
                used_t.add(ti)
                used_d.add(di)
                matches.append((ti, di))
        return matches

    def _inside_existing(self, b: Box) -> bool:
        cx, cy = b.center
        return any(t.box.x <= cx <= t.box.x2 and t.box.y <= cy <= t.box.y2 for t in self._tracks)

    def _gone(self, t: _Track, ts: float, bounds: tuple[float, float]) -> bool:
        """Unseen now and last seen at the exit edge, or predicted past it: the fruit left the view."""
        lo, hi = bounds
        e = self.config.edge_px
        if self.config.direction > 0:
            return t.box.x2 >= hi - e or self._predict(t, ts)[0] - t.box.w / 2 >= hi
        return t.box.x <= lo + e or self._predict(t, ts)[0] + t.box.w / 2 <= lo

    def _absorbed_by_ghost(self, b: Box, ts: float) -> bool:
        for g in self._ghosts:
            t = g[0]
            px, py = self._predict(t, ts)
            if math.hypot(b.center[0] - px, b.center[1] - py) <= self.config.gate * max(t.box.w, t.box.h, b.w, b.h):
                t.box, t.last_ts, g[1] = b, ts, self.config.max_lost + 1
                return True
        return False

    def _finish(self, t: _Track, reason: str, out: list[FruitVote]) -> None:
        if reason != "flush" and t.fruit_id is not None:
            self._ghosts.append([t, self.config.max_lost + 1])
        if t.fruit_id is None:
            self.discarded += 1
        elif not t.emitted:
            out.append(self._emit(t, reason))

    def _emit(self, t: _Track, reason: str) -> FruitVote:
        assert t.fruit_id is not None and not t.emitted
        t.emitted = True
        self.emitted += 1
        probs, n = t.vote()
        return FruitVote(t.fruit_id, probs, t.hits, n, t.first_ts, t.last_ts, reason, t.box)

    def _exit_order(self, votes: list[FruitVote]) -> list[FruitVote]:
        # Several fruit finishing in one frame: the one furthest along the belt left first.
        return sorted(votes, key=lambda v: -v.box.center[0] * self.config.direction)
