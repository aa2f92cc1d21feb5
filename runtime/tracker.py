"""Fruit identities across frames along the belt, and one vote per fruit.

Each frame brings boxes (from the localiser); probabilities come later, only for the views planned.
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

Motion is predicted on the tracker's *belt clock*, which advances by each frame's interval and so
handles dropped frames, except where the stream's timestamps cannot be taken at their word:
- a timestamp not after the previous frame's (a stale frame, a stream whose clock restarted): the frame
  is taken as the next one, one typical frame interval later;
- a gap longer than `gap_frames` typical intervals (an outage: an RTSP reconnect, a camera replugged):
  whether the belt kept running meanwhile is not known, so both are tried on this frame's boxes: the
  belt moved for the whole gap, or the stream resumed where it stopped (a paused belt, frames delivered
  late). The second is taken only when it matches more tracks and leaves no box unexplained in mid-belt
  (one frame on, new fruit only enter at the edge); a fruit that left during the outage is emitted once
  as usual. (One fruit gone during a real outage and another now standing, alone, where the first would
  be one frame on cannot be told apart by position.)
No speed is measured across a gap or a stale stamp, so a wrong guess costs no more than that frame's
prediction. A fruit's event timestamps are the frames' own, and its last_ts never goes back.

Association needs no probabilities, so the model does not have to see every fruit in every frame.
`step()` matches the boxes and then plans the *views*: which boxes to classify now. A fruit gets at
most `max_views` views, `view_stride` frames apart (so they differ), each a full view whose crop
(localize.crop_rect: box plus `view_margin`, widened to `view_aspect`) lies inside the searched
region along the belt — a crop cut by the frame edge is not what the model was trained on. The plan
depends only on the frames, never on timing, so a file grades the same on any machine. Until a fruit
has a view, the tracker remembers its best view so far (an opaque payload the caller keeps: the
grader keeps the frame and box); a fruit that finishes without a view (it never showed whole, or the
stream ended) is classified from that. With a trigger line a fruit crossing without a view is
classified on the crossing frame (a *required* view: the caller must not skip it). `max_views=0`
classifies every box of every frame until the fruit is emitted (the vote of all views, as before
budgets). A vote is never built from zero views: `vote()` refuses a fruit none of whose views came back.

The caller classifies the planned views (synchronously, or later in a worker), reports each with
`record_view()` when taken and `add_probs()` when its probabilities arrive, and asks `vote()` for a
done fruit once all its views are in. A done fruit stays known until it has been voted, and a
discarded tentative track until its views are back, so late calls for either never miss. `update()`
does all of that in one call for callers that have probabilities for every box (tests, simple loops).

The vote averages the probabilities of the views where the fruit was fully visible; views where it
was cut by the frame edge are used only when there is no full view (a fruit already on the belt when
the stream starts, or a trigger line close to the entry edge).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mnet.runtime.localize import Box, crop_rect

from mnet.errors import ConfigError

__all__ = ["FruitVote", "TrackStep", "TrackView", "Tracker", "TrackerConfig"]


@dataclass(frozen=True)
class TrackerConfig:
    min_hits: int = 3  # frames before a track is a fruit (rejects one-frame flickers)
    max_lost: int = 8  # frames a fruit may go unseen (occlusion, a missed mask) before it is finished
    gate: float = 0.8  # max distance from the prediction, in fruit sizes
    max_back: float = 0.3  # how far (in fruit sizes) a fruit may appear to move against the belt
    trigger_x: float | None = None  # emit when the centre crosses this x (frame pixels)
    direction: int = 1  # +1: belt runs left → right; -1: right → left
    velocity_smoothing: float = 0.5  # EMA weight of the newest velocity observation
    # a frame this many typical frame intervals after the previous one ends an outage (see the module doc)
    gap_frames: float = 4.0
    edge_px: int = 2
    # 3 views: enough that one odd view (a highlight, a neighbour in the crop) cannot decide the grade,
    # few enough that a 20 ms model keeps up with a 120 fps belt (~2 fruit in view, ~50 frames each).
    max_views: int = 3  # classified views per fruit; 0 = every box of every frame (no budget)
    view_stride: int = 6  # frames between two views of one fruit (60 px apart at 10 px/frame)
    view_margin: float = 0.3  # the crop margin (GradeConfig.margin): a view's crop must fit in the region
    view_aspect: float | None = None  # the crop's width / height (the model input's), as localize.crop widens it

    def __post_init__(self) -> None:
        if self.min_hits < 1:
            raise ConfigError(f"tracker field 'min_hits' = {self.min_hits!r}: expected >= 1")
        if self.max_lost < 0:
            raise ConfigError(f"tracker field 'max_lost' = {self.max_lost!r}: expected >= 0")
        if self.gate <= 0 or self.max_back < 0:
            raise ConfigError(f"tracker fields gate/max_back = {self.gate}/{self.max_back}: expected > 0 / >= 0")
        if self.direction not in (1, -1):
            raise ConfigError(f"tracker field 'direction' = {self.direction!r}: expected 1 (+x) or -1 (-x)")
        if not self.gap_frames > 1:
            raise ConfigError(f"tracker field 'gap_frames' = {self.gap_frames!r}: expected > 1 frame interval")
        if not 0 < self.velocity_smoothing <= 1:
            raise ConfigError(f"tracker field 'velocity_smoothing' = {self.velocity_smoothing!r}: expected (0, 1]")
        if self.max_views < 0:
            raise ConfigError(f"tracker field 'max_views' = {self.max_views!r}: expected >= 0 (0 = every frame)")
        if self.view_stride < 1:
            raise ConfigError(f"tracker field 'view_stride' = {self.view_stride!r}: expected >= 1 frame")
        if self.view_margin < 0:
            raise ConfigError(f"tracker field 'view_margin' = {self.view_margin!r}: expected >= 0")
        if self.view_aspect is not None and not self.view_aspect > 0:
            raise ConfigError(f"tracker field 'view_aspect' = {self.view_aspect!r}: expected > 0 (width / height)")


@dataclass(frozen=True)
class FruitVote:
    """A finished (or triggered) fruit: the averaged probabilities and when it was seen."""

    fruit_id: int
    probs: np.ndarray  # (num_classes,) float
    frames: int  # frames the fruit was seen in
    voted_frames: int  # views whose probabilities made the vote
    first_ts: float
    last_ts: float
    reason: str  # trigger | exit | lost | flush | frame
    box: Box  # last box seen (frames, last_ts and box as at the emission, however late the vote)


@dataclass(frozen=True)
class TrackStep:
    """What one frame asks of the caller. uids name tracks (fruit_id is only given on confirmation)."""

    classify: list[tuple[int, int, bool]]  # (uid, box index, required): classify this box now
    keep: list[tuple[int, int]]  # (uid, box index): the best view yet of a fruit without one; keep it
    done: list[tuple[int, Any]]  # (uid, payload kept or None), exit order: vote once views are in;
    # a payload means the fruit has no view yet: classify it and record_view() it first


@dataclass(frozen=True)
class TrackView:
    """What an overlay needs to draw one track in the current frame."""

    fruit_id: int | None  # None while tentative
    box: Box
    probs: np.ndarray | None  # current vote
    emitted: bool
    lost: int


@dataclass(eq=False)  # identity: tracks are looked up by object, and hold numpy arrays
class _Track:
    box: Box
    first_ts: float
    last_ts: float
    num_classes: int
    uid: int = 0
    last_bt: float = 0.0  # the tracker's belt clock when last seen (predictions run on it, not on last_ts)
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
    reason: str = ""
    views: int = 0  # views taken (classified or on their way)
    last_view: int = -(10 ** 9)  # frame number of the last view
    fallback: Any = None  # the caller's payload for the best view so far, while views == 0
    fallback_rank: tuple = ()
    seen_at: int = -1  # index of this frame's box, -1 when unseen this frame
    finished: bool = False  # no longer tracked (left, lost, flushed or discarded)
    voted: bool = False  # vote() was taken: the caller is done with it
    # (hits, last_ts, box) when emitted: a fruit emitted at the trigger line stays tracked, and its vote
    # may be taken frames later (when a worker's results are back) — the event must not depend on when.
    at_emit: tuple[int, float, Box] | None = None

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

    def fruit_vote(self) -> FruitVote:
        probs, n = self.vote()
        hits, last_ts, box = self.at_emit
        return FruitVote(self.fruit_id, probs, hits, n, self.first_ts, last_ts, self.reason, box)


class Tracker:
    """Feed `step()` (or `update()`) once per processed frame; fruit come out in exit order."""

    def __init__(self, num_classes: int, config: TrackerConfig = TrackerConfig()) -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes = {num_classes!r}: expected >= 1")
        self.num_classes = num_classes
        self.config = config
        self._tracks: list[_Track] = []
        self._by_uid: dict[int, _Track] = {}  # live tracks and finished ones whose vote was not taken yet
        self._next_id = 1
        self._next_uid = 1
        self._frame = -1  # frames stepped: views are spaced in frames, never in seconds (reproducible)
        self._belt_vx: float | None = None  # px/s, shared prior for new tracks
        self._clock = 0.0  # the belt clock (s): frame intervals, except across gaps and stale stamps
        self._prev_ts: float | None = None  # the previous frame's own timestamp
        self._intervals: deque[float] = deque(maxlen=15)  # recent frame intervals (s)
        self._gap = False  # this frame ends a gap or has a stale stamp: no speed is measured across it
        # Finished tracks linger for max_lost frames: a fruit that flickers back into view at the exit
        # edge (its mask area hovering around min_area) must not start a second fruit.
        self._ghosts: list[list] = []  # [track, frames left]
        self.created = 0
        self.discarded = 0
        self.emitted = 0

    # ------------------------------------------------------------------------------------ public
    @property
    def tracks(self) -> list[TrackView]:
        return [TrackView(t.fruit_id, t.box, t.vote()[0] if t.full_n or t.edge_n else None, t.emitted, t.lost)
                for t in self._tracks]

    @property
    def belt_velocity(self) -> float | None:
        """Estimated belt speed along x in pixels per second (None until measured)."""
        return self._belt_vx

    def step(self, boxes: Sequence[Box], ts: float, bounds: tuple[float, float]) -> TrackStep:
        """Match this frame's boxes to tracks; plan the views to classify; say which fruit are done.

        bounds: the (x_min, x_max) of the region the localiser searched; fruit leave through
        x_max when the belt runs +x and through x_min when it runs -x.
        """
        c = self.config
        self._frame += 1
        for t in self._tracks:
            t.seen_at = -1
        bt = self._advance(boxes, ts, bounds)
        matches = self._match(boxes, bt)
        matched_t = {ti for ti, _ in matches}
        matched_d = {di for _, di in matches}

        for ti, di in matches:
            t, b = self._tracks[ti], boxes[di]
            dt = bt - t.last_bt
            if dt > 0 and not self._gap and not t.box.touches_edge and not b.touches_edge:
                # Only whole views measure speed: a box growing at the entry edge moves at half speed;
                # and no displacement across a gap does: how long the belt ran is a guess there.
                obs_vx, obs_vy = (b.center[0] - t.box.center[0]) / dt, (b.center[1] - t.box.center[1]) / dt
                a = c.velocity_smoothing
                t.vx = obs_vx if t.vx is None else (1 - a) * t.vx + a * obs_vx
                t.vy = (1 - a) * t.vy + a * obs_vy
                if t.fruit_id is not None:
                    self._belt_vx = t.vx if self._belt_vx is None else 0.8 * self._belt_vx + 0.2 * t.vx
            t.box, t.last_ts, t.last_bt, t.lost, t.seen_at = b, max(t.last_ts, ts), bt, 0, di
            t.hits += 1

        for ti, t in enumerate(self._tracks):
            if ti not in matched_t:
                t.lost += 1

        self._ghosts = [g for g in self._ghosts if g[1] > 0]
        for g in self._ghosts:
            g[1] -= 1
        for di, b in enumerate(boxes):
            if di in matched_d or self._inside_existing(b) or self._absorbed_by_ghost(b, ts, bt):
                continue
            t = _Track(b, ts, ts, self.num_classes, uid=self._next_uid, last_bt=bt, seen_at=di)
            self._next_uid += 1
            self._by_uid[t.uid] = t
            self._tracks.append(t)
            self.created += 1

        classify: list[tuple[int, int, bool]] = []
        keep: list[tuple[int, int]] = []
        done: list[tuple[_Track, Any]] = []
        live: list[_Track] = []
        for t in self._tracks:
            if t.fruit_id is None and t.hits >= c.min_hits and t.lost == 0:
                t.fruit_id, self._next_id = self._next_id, self._next_id + 1
            if t.lost == 0:
                crossing = (c.trigger_x is not None and t.fruit_id is not None and not t.emitted
                            and (t.box.center[0] - c.trigger_x) * c.direction >= 0)
                # Graded at the line: a fruit without a view needs one now, whether or not it was due
                # anyway — an optional view may be skipped by a busy live worker.
                required = crossing and t.views == 0
                if required or self._wants_view(t, bounds):
                    classify.append((t.uid, t.seen_at, required))
                if t.views == 0 and self._better_fallback(t, bounds):
                    keep.append((t.uid, t.seen_at))
                if crossing:
                    done.append((self._emit(t, "trigger"), None))
                live.append(t)
                continue
            reason = "exit" if self._gone(t, bt, bounds) else "lost" if t.lost > c.max_lost else None
            if reason is None:
                live.append(t)
            else:
                self._finish(t, reason, done)
        self._tracks = live
        return TrackStep(classify, keep, [(t.uid, p) for t, p in self._exit_order(done)])

    def record_view(self, uid: int) -> None:
        """The caller took a view of this fruit (its probabilities may come later)."""
        t = self._by_uid[uid]
        t.views += 1
        t.last_view = self._frame
        t.fallback = None  # a view exists: the kept one is not needed any more

    def keep(self, uid: int, payload: Any) -> None:
        """Remember the caller's payload for a `TrackStep.keep` view (returned in `done` if needed)."""
        t = self._by_uid[uid]
        if t.views == 0:
            t.fallback = payload

    def add_probs(self, uid: int, probs: np.ndarray, partial: bool) -> None:
        """A view's probabilities arrived (any time before `vote(uid)`)."""
        t = self._by_uid[uid]
        t.add(np.asarray(probs, np.float64).reshape(self.num_classes), partial)
        if t.finished and t.fruit_id is None and t.full_n + t.edge_n >= t.views:
            del self._by_uid[uid]  # a discarded track's last view is back: nothing will ask for it

    def drop_view(self, uid: int) -> None:
        """A view taken (record_view) whose probabilities will never come (a failed inference): stop
        waiting for it. A fruit still in view may be planned another one in its place."""
        t = self._by_uid.get(uid)
        if t is None:
            return
        t.views -= 1
        if t.finished and t.fruit_id is None and t.full_n + t.edge_n >= t.views:
            del self._by_uid[uid]  # as in add_probs: a discarded track with nothing in flight is forgotten

    def settle(self, uid: int) -> FruitVote | None:
        """vote(), or None for a done fruit none of whose views brought probabilities: it is released
        unvoted (vote() refuses to make a grade from nothing)."""
        t = self._by_uid.get(uid)
        if t is not None and t.emitted and not t.voted and t.views == 0 and t.full_n + t.edge_n == 0:
            t.voted = True
            if t.finished:
                del self._by_uid[uid]
            return None
        return self.vote(uid)

    def vote(self, uid: int) -> FruitVote:
        """The vote of a done fruit, once all its views have their probabilities; releases the fruit."""
        t = self._by_uid.get(uid)
        if t is None or not t.emitted or t.voted:
            raise ValueError(f"vote({uid}): not a fruit that step() or finish() reported done and not yet voted")
        got = t.full_n + t.edge_n
        if got < t.views or got == 0:  # an all-zero vote would be a grade made up from nothing
            raise ValueError(f"vote({uid}): fruit {t.fruit_id} has {got} of {t.views} views back; classify its "
                             "views (or the kept payload from `done`), add_probs() them, then vote")
        t.voted = True
        if t.finished:  # else voted at the trigger line: tracked until it leaves, then released
            del self._by_uid[uid]
        return t.fruit_vote()

    def finish(self) -> list[tuple[int, Any]]:
        """End of stream: every confirmed fruit not yet done is done now (exit order), as in `step().done`."""
        done: list[tuple[_Track, Any]] = []
        for t in self._tracks:
            self._finish(t, "flush", done)
        self._tracks, self._ghosts = [], []
        return [(t.uid, p) for t, p in self._exit_order(done)]

    def update(self, boxes: Sequence[Box], probs: np.ndarray, ts: float,
               bounds: tuple[float, float]) -> list[FruitVote]:
        """step() for a caller with a probability row for every box: the planned views use theirs."""
        probs = np.asarray(probs, np.float64).reshape(len(boxes), self.num_classes) if len(boxes) else \
            np.zeros((0, self.num_classes))
        s = self.step(boxes, ts, bounds)
        for uid, di in s.keep:
            self.keep(uid, (probs[di], boxes[di].touches_edge))
        for uid, di, _ in s.classify:
            self.record_view(uid)
            self.add_probs(uid, probs[di], boxes[di].touches_edge)
        return self._vote_done(s.done)

    def flush(self) -> list[FruitVote]:
        """End of stream for update() callers: the votes of every fruit still in view, in exit order."""
        return self._vote_done(self.finish())

    def emit_single(self, box: Box, probs: np.ndarray, ts: float) -> FruitVote:
        """Full-frame mode: this frame alone is one fruit (a hand-held shot, one photo)."""
        t = _Track(box, ts, ts, self.num_classes, fruit_id=self._next_id)
        self._next_id += 1
        self.created += 1
        t.add(np.asarray(probs, np.float64).reshape(self.num_classes), False)
        self._emit(t, "frame")
        return t.fruit_vote()

    # ----------------------------------------------------------------------------------- helpers
    def _advance(self, boxes: Sequence[Box], ts: float, bounds: tuple[float, float]) -> float:
        """This frame's time on the belt clock (see the module docstring: stale stamps and gaps)."""
        prev, self._prev_ts, self._gap = self._prev_ts, ts, False
        if prev is None:
            return self._clock
        dt = ts - prev
        period = statistics.median(self._intervals) if self._intervals else None
        if dt <= 0:  # not after the previous frame: taken as the next one
            self._clock += period or 0.0
            self._gap = True
            return self._clock
        self._intervals.append(dt)  # gaps too: one outage hardly moves the median, a new frame rate does
        if period is None or dt <= self.config.gap_frames * period:
            self._clock += dt
        else:  # an outage: the belt ran for all of it, or the stream resumed where it stopped
            ran, resumed = self._clock + dt, self._clock + period
            self._clock = resumed if self._resumed(boxes, ran, resumed, bounds) else ran
            self._gap = True
        return self._clock

    def _resumed(self, boxes: Sequence[Box], ran: float, resumed: float, bounds: tuple[float, float]) -> bool:
        """After a gap: did the stream resume where it stopped? Only if that matches more tracks than the
        belt having run all along, and every box it leaves unmatched is a fruit entering at the entry edge
        (or part of a tracked one): one frame on, no fruit appears in mid-belt. After a real outage the
        view holds new fruit everywhere, and a few of them standing where old ones were prove nothing."""
        matched = self._match(boxes, resumed)
        if len(matched) <= len(self._match(boxes, ran)):
            return False
        mid = (bounds[0] + bounds[1]) / 2
        taken = {di for _, di in matched}
        return all(di in taken or self._inside_existing(b)
                   or (b.touches_edge and (b.center[0] - mid) * self.config.direction < 0)
                   for di, b in enumerate(boxes))

    def _predict(self, t: _Track, bt: float) -> tuple[float, float]:
        """Where the track's centre is at belt-clock time `bt`."""
        dt = max(0.0, bt - t.last_bt)
        vx = t.vx if t.vx is not None else (self._belt_vx or 0.0)
        cx, cy = t.box.center
        return cx + vx * dt, cy + t.vy * dt

    def _match(self, boxes: Sequence[Box], bt: float) -> list[tuple[int, int]]:
        c = self.config
        pairs = []
        for ti, t in enumerate(self._tracks):
            px, py = self._predict(t, bt)
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

    def _gone(self, t: _Track, bt: float, bounds: tuple[float, float]) -> bool:
        """Unseen now and last seen at the exit edge, or predicted past it: the fruit left the view."""
        lo, hi = bounds
        e = self.config.edge_px
        if self.config.direction > 0:
            return t.box.x2 >= hi - e or self._predict(t, bt)[0] - t.box.w / 2 >= hi
        return t.box.x <= lo + e or self._predict(t, bt)[0] + t.box.w / 2 <= lo

    def _absorbed_by_ghost(self, b: Box, ts: float, bt: float) -> bool:
        for g in self._ghosts:
            t = g[0]
            px, py = self._predict(t, bt)
            if math.hypot(b.center[0] - px, b.center[1] - py) <= self.config.gate * max(t.box.w, t.box.h, b.w, b.h):
                t.box, t.last_ts, t.last_bt, g[1] = b, max(t.last_ts, ts), bt, self.config.max_lost + 1
                return True
        return False

    def _finish(self, t: _Track, reason: str, out: list[tuple[_Track, Any]]) -> None:
        t.finished = True
        if reason != "flush" and t.fruit_id is not None:
            self._ghosts.append([t, self.config.max_lost + 1])
        if t.fruit_id is None:
            self.discarded += 1
            # max_views=0 classifies tentative tracks too: keep one until its views in flight are back
            # (add_probs releases it), so a late result finds it rather than raising KeyError.
            if t.full_n + t.edge_n >= t.views:
                self._by_uid.pop(t.uid, None)
        elif not t.emitted:
            out.append((self._emit(t, reason), t.fallback if t.views == 0 else None))
        elif t.voted:  # emitted at the trigger line and voted: released; otherwise vote() releases it
            self._by_uid.pop(t.uid, None)

    def _emit(self, t: _Track, reason: str) -> _Track:
        assert t.fruit_id is not None and not t.emitted
        t.emitted, t.reason, t.at_emit = True, reason, (t.hits, t.last_ts, t.box)
        self.emitted += 1
        return t

    def _exit_order(self, done: list[tuple[_Track, Any]]) -> list[tuple[_Track, Any]]:
        # Several fruit finishing in one frame: the one furthest along the belt left first.
        return sorted(done, key=lambda d: -d[0].box.center[0] * self.config.direction)

    def _fits(self, b: Box, bounds: tuple[float, float]) -> bool:
        """A whole view whose crop (margin and aspect widening included) lies inside the region along the belt."""
        x1, _, x2, _ = crop_rect(b, self.config.view_margin, self.config.view_aspect)
        return not b.touches_edge and x1 >= bounds[0] and x2 <= bounds[1]

    def _wants_view(self, t: _Track, bounds: tuple[float, float]) -> bool:
        c = self.config
        if t.emitted:
            return False  # graded already: another view would be inference nobody reads
        if c.max_views == 0:
            return True  # no budget: every box, tentative tracks too (their views count once confirmed)
        return (t.fruit_id is not None and t.views < c.max_views
                and self._frame - t.last_view >= c.view_stride and self._fits(t.box, bounds))

    def _better_fallback(self, t: _Track, bounds: tuple[float, float]) -> bool:
        # Best view so far: a fitting crop, then a whole fruit, then the largest visible part.
        rank = (self._fits(t.box, bounds), not t.box.touches_edge, t.box.area)
        if t.fallback_rank and rank <= t.fallback_rank:
            return False
        t.fallback_rank = rank
        return True

    def _vote_done(self, done: list[tuple[int, Any]]) -> list[FruitVote]:
        out = []
        for uid, payload in done:
            if payload is not None:
                probs, partial = payload
                self.record_view(uid)
                self.add_probs(uid, probs, partial)
            out.append(self.vote(uid))
        return out
