"""The grading loop end to end on a synthetic conveyor video, with an oracle backend that answers
each crop with the grade of the fruit under it (from the video's own plan): every fruit is graded
exactly once, right, in exit order. Plus: stop flag, latency budget, live sources, backend checks."""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import threading
import time
import weakref

import cv2
import numpy as np
import pytest
from conftest import ByBrightness, FakeCapture
from mnet.runtime.grader import GradeConfig, Grader, grade, parse_size, stop_on_signals
from mnet.runtime.localize import Box, Localizer
from mnet.runtime.sinks import Sinks, open_sinks
from mnet.runtime.tracker import Tracker, TrackerConfig

from mnet.conveyor import make_conveyor_video, plan_conveyor
from mnet.errors import BackendError, ConfigError
from mnet.events import GradeEvent
from mnet.preprocess import Preprocess

CLASSES = ("A", "B", "C")
VIDEO = {"fruits": 20, "seed": 0, "size_wh": (640, 480), "speed_px": 20}  # a fast belt: ~37 frames per fruit


@pytest.fixture(scope="module")
def conveyor(tmp_path_factory):
    path = tmp_path_factory.mktemp("conveyor") / "belt.mp4"
    make_conveyor_video(path, **VIDEO)
    truth = json.loads(path.with_name("belt.truth.json").read_text())
    return path, truth, plan_conveyor(**VIDEO)


class _Recording:
    """Wraps the real localiser; remembers which frame (by object) is which frame number."""

    def __init__(self, inner: Localizer) -> None:
        self.inner, self.frame, self.boxes = inner, -1, []
        self._frames: dict[int, tuple[weakref.ref, int]] = {}

    def __call__(self, frame):
        self.frame += 1  # a file source delivers every frame, in order
        self._frames[id(frame)] = (weakref.ref(frame), self.frame)
        self.boxes = self.inner(frame)
        return self.boxes

    def region(self, frame):
        return self.inner.region(frame)

    def where(self, crop):
        """(frame number, crop's (x0, y0, x1, y1)) of a crop: crops are views into the frame."""
        base = crop.base
        ref, index = self._frames[id(base)]
        assert ref() is base, "a crop of a frame the localiser never saw"
        off = crop.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        y, x = divmod(off, base.strides[0])
        x //= base.strides[1]
        return index, (x, y, x + crop.shape[1], y + crop.shape[0])


def _overlap(b, xyxy) -> int:
    x0, y0, x1, y1 = xyxy
    bx0, by0, bx1, by1 = b
    return max(0, min(bx1, x1) - max(bx0, x0)) * max(0, min(by1, y1) - max(by0, y0))


class _Tagging:
    """Wraps Preprocess: for each batch, the planned fruit under each crop (read by the oracle, which
    runs later, on the worker thread, when the localiser may be frames ahead)."""

    def __init__(self, inner: Preprocess, rec: _Recording, plan) -> None:
        self.inner, self.rec, self.plan, self.input_hw = inner, rec, plan, inner.input_hw
        self.tags: dict[int, tuple] = {}

    def _planned(self, f):
        off = self.plan.offset(f)
        for fr in self.plan.visible(f):
            dx0, dy0, dx1, dy1 = fr.box
            yield fr, (fr.x0 + off + dx0, fr.y + dy0, fr.x0 + off + dx1, fr.y + dy1)

    def batch(self, crops):
        x = self.inner.batch(crops)
        fruit = []
        for c in crops:
            if c.base is None or id(c.base) not in self.rec._frames:  # the warm-up's blank crop
                fruit.append(None)
                continue
            f, xyxy = self.rec.where(c)
            fruit.append(max(self._planned(f), key=lambda item, xyxy=xyxy: _overlap(item[1], xyxy))[0])
        self.tags[x.__array_interface__["data"][0]] = (x, fruit)  # x kept alive: its address stays unique
        return x


class _Oracle:
    """A backend that 'classifies' each crop as the grade of the planned fruit its crop overlaps most."""

    name = "oracle"

    def __init__(self, tagging: _Tagging, delay_s: float = 0.0) -> None:
        self.tagging, self.delay_s, self.calls = tagging, delay_s, 0
        self.rows: list = []  # the planned fruit of every row classified, in order

    def infer(self, x):
        self.calls += 1
        time.sleep(self.delay_s)
        _, fruit = self.tagging.tags[x.__array_interface__["data"][0]]
        out = np.full((len(x), 3), 0.05, np.float32)
        for i, fr in enumerate(fruit):
            if fr is None:
                out[i] = 1 / 3
            else:
                out[i, CLASSES.index(fr.grade)] = 0.9
                self.rows.append(fr)
        return out


def _grade(conveyor, config=None, sinks=None, **kw):
    config = config or GradeConfig()
    path, _truth, plan = conveyor
    rec = _Recording(Localizer(config.localize))
    tagging = _Tagging(Preprocess((24, 32)), rec, plan)
    backend = kw.pop("backend", None) or _Oracle(tagging, kw.pop("delay_s", 0.0))
    if "wrap" in kw:  # a fault injector around the oracle
        backend = kw.pop("wrap")(backend)
    summary = grade(backend, tagging, CLASSES, str(path), config, sinks, model="oracle", localizer=rec, **kw)
    return summary, backend


def test_localiser_finds_every_fruit_on_the_conveyor(conveyor):
    _path, _truth, plan = conveyor
    loc = Localizer()
    for f in range(0, plan.frames, 7):
        img, drawn = plan.render(f)
        boxes = loc(img)
        for x0, y0, x1, y1 in (b for _, b in drawn if b[0] >= 8 and b[2] <= 632):  # clearly whole fruit
            assert any(max(abs(b.x - x0), abs(b.y - y0), abs(b.x2 - x1), abs(b.y2 - y1)) <= 6
                       and not b.touches_edge for b in boxes), f"frame {f}: {(x0, y0, x1, y1)} not in {boxes}"
        for b in boxes:  # no false positives; cut-off fruit are flagged
            x0, y0, x1, y1 = max((d for _, d in drawn), key=lambda d: min(b.x2, d[2]) - max(b.x, d[0]))
            assert min(b.x2, x1) - max(b.x, x0) > 0.8 * b.w and min(b.y2, y1) - max(b.y, y0) > 0.8 * b.h, f"frame {f}"
            if x0 == 0 or x1 == 640:
                assert b.touches_edge, f"frame {f}: {b}"


def test_every_fruit_graded_once_right_and_in_exit_order(conveyor, tmp_path):
    _, truth, _ = conveyor
    frames_seen = []
    sinks = open_sinks(events=tmp_path / "events.jsonl", csv_path=tmp_path / "events.csv")
    summary, backend = _grade(conveyor, GradeConfig(), sinks, on_frame=lambda img, info: frames_seen.append(info))
    events = [GradeEvent.from_json(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    want = [f["grade"] for f in truth["fruits"]]  # truth is ordered by exit
    assert len(events) == 20 == summary.fruit_graded
    assert [e.grade for e in events] == want  # agreement 100 %, in exit order
    assert [e.fruit_id for e in events] == list(range(1, 21))
    assert all(e.source.endswith("belt.mp4") and e.model == "oracle" and e.frames >= 20 for e in events)
    assert all(e.first_ts < e.last_ts for e in events)
    assert (tmp_path / "events.csv").read_text().count("\n") == 21
    assert summary.frames_read == summary.frames_processed == truth["frames"] and summary.frames_dropped == 0
    assert summary.grades == {g: want.count(g) for g in CLASSES} and not summary.stopped
    assert set(summary.stages) == {"capture", "localise", "preprocess", "infer", "track", "sink", "wait", "frame"}
    assert summary.stages["frame"]["p50_ms"] >= summary.stages["localise"]["p50_ms"]
    # the view budget: 1..3 views per fruit (default max_views), every view of a real fruit, one batch a frame
    per_fruit = collections.Counter(fr.fruit_id for fr in backend.rows)
    assert summary.views == len(backend.rows) == sum(per_fruit.values()) and len(per_fruit) == 20
    assert all(1 <= n <= 3 for n in per_fruit.values()) and summary.views >= 50
    assert backend.calls - 1 <= summary.views and summary.views_skipped == 0
    assert sorted(e.views for e in events) == sorted(per_fruit.values())  # each event says how many voted
    assert len(frames_seen) == truth["frames"] and frames_seen[-1].graded == 20
    assert sum(len(i.events) for i in frames_seen) == 20  # every event was emitted during the stream


@pytest.mark.parametrize("delay_s", [0.0, 0.03])
def test_trigger_line_grades_each_fruit_as_it_crosses(conveyor, delay_s):
    # delay_s: a slow model, whose results (and so the votes) come back frames after the crossing
    _, truth, _ = conveyor
    got = []

    class Collect:
        name, wants_frames = "collect", False

        def write(self, e):
            got.append(e)

        def close(self):
            pass

    _summary, _ = _grade(conveyor, GradeConfig.from_options(trigger_x=320), Sinks([Collect()]), delay_s=delay_s)
    assert [e.grade for e in got] == [f["grade"] for f in truth["fruits"]]
    # emitted at the line, so each event's last frame is about mid-screen, long before the fruit leaves
    exits = [f["last_frame"] / truth["fps"] for f in truth["fruits"]]
    assert all(e.last_ts < t - 0.3 for e, t in zip(got, exits))


def test_stop_flag_finishes_the_frame_flushes_and_reports(conveyor, tmp_path):
    stop = threading.Event()

    def on_frame(img, info):
        if info.index == 99:
            stop.set()

    sinks = open_sinks(events=tmp_path / "e.jsonl", save=tmp_path / "annotated.avi")
    summary, _ = _grade(conveyor, GradeConfig(), sinks, stop=stop, on_frame=on_frame)
    events = [GradeEvent.from_json(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert summary.stopped and summary.frames_processed == 100
    cap = cv2.VideoCapture(str(tmp_path / "annotated.avi"))  # --save: every processed frame, closed properly
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 100 and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(30)
    cap.release()
    assert len(events) == summary.fruit_graded and len({e.fruit_id for e in events}) == len(events)
    assert events[-1].last_ts <= 99 / 30 + 1e-9  # the fruit still in view were flushed with what was seen


def test_latency_budget_warns_rate_limited(conveyor, caplog):
    caplog.set_level(logging.WARNING, logger="mnet.runtime.grader")
    # every frame classified (no view budget), each inference 3 ms: over a 1 ms budget
    summary, _ = _grade(conveyor, GradeConfig.from_options(latency_budget_ms=1.0, max_frames=40, views=0),
                        delay_s=0.003)
    warnings = [r for r in caplog.records if "over the 1.0 ms budget" in r.getMessage()]
    assert summary.frames_processed == 40 and summary.over_budget >= 20
    assert len(warnings) == 1  # one warning per 5 s, not one per frame


def test_backend_contract_is_checked(conveyor):
    class WrongShape:
        name = "wrong"

        def infer(self, x):
            return np.zeros((len(x), 5), np.float32)

    class Logits:
        name = "logits"

        def infer(self, x):
            return np.tile(np.float32([2.0, -1.0, 0.5]), (len(x), 1))

    with pytest.raises(BackendError, match=r"'wrong' returned shape \(1, 5\)"):
        _grade(conveyor, backend=WrongShape())
    with pytest.raises(BackendError, match="softmax"):
        _grade(conveyor, backend=Logits())


def test_full_frame_mode_grades_each_photo(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"shot{i}.jpg"), np.full((48, 64, 3), 120 * i, np.uint8))

    events = []

    class Collect:
        name, wants_frames = "collect", False

        def write(self, e):
            events.append(e)

        def close(self):
            pass

    summary = grade(ByBrightness(), Preprocess((24, 32)), CLASSES, str(tmp_path),
                    GradeConfig.from_options(full_frame=True), Sinks([Collect()]))
    assert [(e.fruit_id, e.frames, e.first_ts) for e in events] == [(1, 1, 0.0), (2, 1, 1.0), (3, 1, 2.0)]
    assert [e.grade for e in events] == ["A", "B", "C"] and summary.fruit_graded == 3


def test_live_source_through_the_grader_survives_a_dropout(conveyor):
    path, _, _plan = conveyor
    cap = cv2.VideoCapture(str(path))
    frames = [cap.read()[1] for _ in range(40)]
    cap.release()
    state = {"reads": 0}

    class Camera(FakeCapture):
        def read(self):
            time.sleep(0.002)
            state["reads"] += 1
            if state["reads"] == 25:
                return False, None  # the cable wobbles once
            return True, frames[state["reads"] % len(frames)]

    stop = threading.Event()
    infos = []

    def on_frame(img, info):
        infos.append(info)
        if len(infos) == 60:
            stop.set()

    backend = type("Uniform", (), {"name": "uniform",
                                   "infer": lambda self, x: np.full((len(x), 3), 1 / 3, np.float32)})()
    summary = grade(backend, Preprocess((24, 32)), CLASSES, "0", GradeConfig(read_timeout_s=2.0), stop=stop,
                    on_frame=on_frame, capture_factory=Camera)
    assert summary.stopped and summary.frames_processed == 60
    assert summary.reconnects == 1 and summary.read_errors == 1
    assert summary.frames_read - summary.frames_processed - summary.frames_dropped in (0, 1)
    assert abs(infos[-1].ts - time.time()) < 60  # live timestamps are wall-clock


def test_options_parsing():
    cfg = GradeConfig.from_options(roi="0,80,640,320", trigger_x=300, input_size="640x480", fps_limit=15,
                                   latency_budget_ms=20)
    assert cfg.localize.roi == (0, 80, 640, 320) and cfg.tracker.trigger_x == 300
    assert (cfg.input_size, cfg.fps_limit, cfg.latency_budget_ms) == ((640, 480), 15, 20)
    assert parse_size("1280X720") == (1280, 720) and parse_size(None) is None
    with pytest.raises(ConfigError, match="WIDTHxHEIGHT"):
        parse_size("big")
    with pytest.raises(ConfigError, match="latency budget"):
        GradeConfig(latency_budget_ms=0)


def test_first_signal_sets_the_stop_flag_and_handlers_are_restored():
    stop = threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 2
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):  # a second signal means "now"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before


def test_slow_backend_overlaps_the_frame_loop_and_flush_waits_for_views(conveyor, tmp_path):
    _, truth, _ = conveyor
    # 15 ms per call, the loop runs ahead of the worker; events still come out right and in exit order
    summary, backend = _grade(conveyor, GradeConfig(queue_depth=2), open_sinks(events=tmp_path / "e.jsonl"),
                              delay_s=0.015)
    events = [GradeEvent.from_json(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [e.grade for e in events] == [f["grade"] for f in truth["fruits"]]
    assert [e.fruit_id for e in events] == list(range(1, 21)) and summary.views == len(backend.rows)
    assert summary.stages["infer"]["p50_ms"] >= 15 > summary.stages["frame"]["p50_ms"]  # off the frame path
    assert summary.stages["wait"]["p99_ms"] > 1  # a file waits for the worker (queue of 2): nothing is lost
    # stopped mid-stream with views in flight: flush waits for them, every fruit in view is graded
    stop = threading.Event()
    summary, backend = _grade(conveyor, GradeConfig(), open_sinks(events=tmp_path / "s.jsonl"), delay_s=0.02,
                              stop=stop, on_frame=lambda img, info: info.index == 119 and stop.set())
    events = [GradeEvent.from_json(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert summary.stopped and summary.frames_processed == 120
    assert len(events) == summary.fruit_graded >= 5 and summary.views == len(backend.rows)
    assert [e.fruit_id for e in events] == list(range(1, len(events) + 1))


def test_backend_failure_in_the_worker_is_a_backend_error_not_a_hang(conveyor):
    class Flaky:
        name = "flaky"

        def __init__(self):
            self.calls = 0

        def infer(self, x):
            self.calls += 1
            if self.calls >= 4:  # warm-up and two batches work, then the device is gone for good
                raise RuntimeError("device lost")
            return np.full((len(x), 3), 1 / 3, np.float32)

    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"'flaky' failed on a batch of \d+: RuntimeError: device lost"):
        _grade(conveyor, GradeConfig(queue_depth=1), backend=Flaky())
    assert time.monotonic() - t0 < 30
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name == "mnet-infer"]  # the worker is gone


def test_views_zero_classifies_every_fruit_in_every_frame(conveyor):
    _, truth, _ = conveyor
    frames = []
    summary, backend = _grade(conveyor, GradeConfig.from_options(views=0), on_frame=lambda i, info: frames.append(info))
    assert summary.views == sum(len(i.boxes) for i in frames) == len(backend.rows)
    assert backend.calls == 1 + sum(1 for i in frames if i.boxes)  # warm-up + one batch per frame with fruit
    assert summary.fruit_graded == 20 and summary.grades == {g: [f["grade"] for f in truth["fruits"]].count(g)
                                                             for g in CLASSES}


class _Fixed:
    """A localiser that finds the same boxes in every frame (fruit standing still) in a 640x480 frame."""

    def __init__(self, boxes):
        self.boxes = boxes

    def __call__(self, frame):
        return list(self.boxes)

    def region(self, frame):
        return (0, 0, 640, 480)


class _DiesOnFirstCall:
    """The device goes away during the first call, after `delay_s`."""

    name = "dies"

    def __init__(self, delay_s=0.3):
        self.delay_s, self.started = delay_s, threading.Event()

    def infer(self, x):
        self.started.set()
        time.sleep(self.delay_s)
        raise RuntimeError("device lost")


_BLANK = np.zeros((480, 640, 3), np.uint8)


def test_the_tracker_tests_the_crop_the_grader_cuts():
    with Grader(_DiesOnFirstCall(), Preprocess((24, 32)), CLASSES, GradeConfig(margin=0.2)) as g:
        assert g.tracker.config.view_margin == 0.2 and g.tracker.config.view_aspect == pytest.approx(32 / 24)


def test_a_required_view_refused_by_a_dead_worker_raises_its_error_in_flush():
    # Fruit 1 sits at the exit edge and never fits a view; fruit 2 fits and gets views. The worker dies
    # on fruit 2's first call with its second queued (queue of 1: full). flush() then has fruit 1 first
    # in exit order and must classify its kept view: the refusal is the backend's error, not a vote
    # made of nothing (ConfigError from an all-zero event).
    # max_consecutive_failures=1: the first failed call (after its retry) stops the worker.
    cfg = GradeConfig(tracker=TrackerConfig(view_stride=1), queue_depth=1, max_consecutive_failures=1)
    loc = _Fixed([Box(300, 100, 60, 60, 3600.0), Box(600, 100, 40, 40, 1600.0, True)])
    with Grader(_DiesOnFirstCall(), Preprocess((24, 32)), CLASSES, cfg, localizer=loc) as g:
        for f in range(4):  # views of fruit 2 on frames 2 and 3 (confirmed at 3 hits)
            assert g.process(_BLANK, f / 30)[0] == []
        with pytest.raises(BackendError, match="'dies' failed on a batch of 1: RuntimeError: device lost"):
            g.flush()


def test_a_live_source_does_not_count_a_dead_worker_as_a_skipped_view():
    cfg = GradeConfig(tracker=TrackerConfig(view_stride=1), queue_depth=1, max_consecutive_failures=1)
    backend = _DiesOnFirstCall()
    with Grader(backend, Preprocess((24, 32)), CLASSES, cfg, localizer=_Fixed([Box(300, 100, 60, 60, 3600.0)]),
                block_views=False) as g:
        for f in range(3):
            g.process(_BLANK, f / 30)  # frame 2: the first view, taken by the worker
        assert backend.started.wait(5)
        g.process(_BLANK, 3 / 30)  # the second view waits in the queue (full)
        deadline = time.monotonic() + 5
        while g._worker._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(BackendError, match="device lost"):
            g.process(_BLANK, 4 / 30)  # the third view is refused: the worker is dead, not busy
        assert g.views_skipped == 0


def test_full_frame_mode_books_the_queue_wait_as_wait_not_as_track_or_negative_preprocess():
    class Slow:
        name = "slow"

        def infer(self, x):
            time.sleep(0.05)
            return np.full((len(x), 3), 1 / 3, np.float32)

    cfg = GradeConfig.from_options(full_frame=True, queue_depth=1)
    frame = np.zeros((48, 64, 3), np.uint8)
    with Grader(Slow(), Preprocess((24, 32)), CLASSES, cfg) as g:
        stages = [g.process(frame, f / 30)[2] for f in range(4)]  # the third and fourth wait for the worker
        g.flush()
    assert max(ms["wait"] for ms in stages) > 20
    for ms in stages:
        assert ms["preprocess"] >= 0 and ms["track"] < max(5.0, ms["wait"] / 2), ms


def test_views_zero_with_a_trigger_classifies_each_fruit_only_until_it_is_graded(conveyor):
    frames = []
    summary, backend = _grade(conveyor, GradeConfig.from_options(views=0, trigger_x=320),
                              on_frame=lambda i, info: frames.append(info))
    assert summary.fruit_graded == 20 and summary.views == len(backend.rows)
    # fruit are seen well past the line, but only views up to it are classified
    assert summary.views < 0.75 * sum(len(i.boxes) for i in frames)


# ------------------------------------------------------------------- faults: a failed inference costs a view
class _Collect:
    name, wants_frames = "collect", False

    def __init__(self):
        self.events = []

    def write(self, e):
        self.events.append(e)

    def close(self):
        pass


class _Faulty:
    """Wraps a backend; `fault(n)` says what call n does (1 is the warm-up, retries count): None answers,
    "raise" raises, "nan" puts NaN in row 0, "inf" makes every row Inf."""

    name = "faulty"

    def __init__(self, fault):
        self.fault, self.calls, self.raised, self.inner = fault, 0, 0, None

    def __call__(self, inner):  # _grade(wrap=...) hands over the oracle
        self.inner = inner
        return self

    def infer(self, x):
        self.calls += 1
        what = self.fault(self.calls)
        if what == "raise":
            self.raised += 1
            raise RuntimeError(f"glitch on call {self.calls}")
        out = np.array(self.inner.infer(x), np.float32)
        if what == "nan":
            out[0, 1] = np.nan
        elif what == "inf":
            out[:] = np.inf
        return out


def _votes(events):
    return [(e.fruit_id, e.grade, e.views, e.probs) for e in events]


@pytest.fixture(scope="module")
def clean_run(conveyor):
    sink = _Collect()
    summary, _ = _grade(conveyor, GradeConfig(), Sinks([sink]))
    return summary, sink.events


def test_a_backend_raising_every_nth_call_costs_nothing_after_the_retry(conveyor, clean_run):
    clean, clean_events = clean_run
    sink, faulty = _Collect(), _Faulty(lambda n: "raise" if n % 4 == 0 else None)
    summary, _ = _grade(conveyor, GradeConfig(), Sinks([sink]), wrap=faulty)
    assert faulty.raised >= 10 and summary.infer_errors == faulty.raised
    assert _votes(sink.events) == _votes(clean_events)  # every fruit, the same votes
    assert (summary.views_failed, summary.fruit_failed, summary.fruit_graded) == (0, 0, clean.fruit_graded)


@pytest.mark.parametrize("what, calls, dropped", [
    ("raise", {20, 21}, None),  # the call and its retry fail: that call's views are dropped
    ("nan", {20, 21}, 1),  # row 0 NaN twice: that one view is dropped
    ("nan", {20}, 0),  # NaN once: the retry mends it
    ("inf", {20, 21}, None),
])
def test_a_view_failing_twice_is_dropped_and_its_fruit_votes_on_its_other_views(conveyor, clean_run, what, calls,
                                                                              dropped):
    clean, clean_events = clean_run
    sink, faulty = _Faulty(lambda n: what if n in calls else None), _Collect()
    summary, _ = _grade(conveyor, GradeConfig(), Sinks([faulty]), wrap=sink)
    events = faulty.events
    assert summary.infer_errors == (2 if what == "raise" else 0)
    nonfinite = summary.nonfinite_outputs
    assert nonfinite == {"raise": 0, "nan": len(calls)}.get(what, nonfinite)
    assert summary.views_failed == (dropped if dropped is not None else summary.views_failed) and \
        (summary.views_failed >= 1) == (len(calls) == 2)
    # no fruit lost, and each graded as in the clean run (the oracle answers every view alike)
    assert summary.fruit_failed == 0 and summary.fruit_graded == clean.fruit_graded == len(events)
    assert [(e.fruit_id, e.grade) for e in events] == [(e.fruit_id, e.grade) for e in clean_events]
    assert summary.views == clean.views + summary.views_failed  # a fruit still in view gets a new view instead


def test_a_fruit_without_a_valid_view_is_counted_not_graded(conveyor, clean_run):
    clean, _ = clean_run
    sink, faulty = _Collect(), _Faulty(lambda n: "raise" if n > 30 else None)  # the device is gone after call 30 of ~55
    summary, _ = _grade(conveyor, GradeConfig(max_consecutive_failures=10 ** 6), Sinks([sink]), wrap=faulty)
    assert summary.fruit_failed >= 5 and summary.fruit_graded == len(sink.events) >= 5
    assert summary.fruit_graded + summary.fruit_failed == clean.fruit_graded  # every fruit accounted for
    assert summary.views_failed > 0 and summary.infer_errors == faulty.raised


def test_a_backend_that_keeps_failing_is_fatal_and_every_complete_vote_is_still_written(conveyor, tmp_path):
    # the device goes at call 30 of ~55; two failed calls in a row (each retried) end grading
    faulty = _Faulty(lambda n: "raise" if n > 30 else None)
    events = []
    with pytest.raises(BackendError, match=r"'faulty' failed on a batch of \d+: RuntimeError: glitch on call \d+ "
                                           r"\(2 call\(s\) in a row"):
        _grade(conveyor, GradeConfig(max_consecutive_failures=2), open_sinks(events=tmp_path / "e.jsonl"),
               wrap=faulty, on_frame=lambda img, info: events.extend(info.events))
    written = [GradeEvent.from_json(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    # every fruit the backend classified a view of has its event, also those still in view at the failure
    classified = {id(fr) for fr in faulty.inner.rows}
    assert len(written) == len(classified) > len(events) >= 1
    assert _votes(written[:len(events)]) == _votes(events) and len({e.fruit_id for e in written}) == len(written)
    assert faulty.raised == 4  # two calls, each retried once
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name == "mnet-infer"]


def test_any_error_in_the_loop_still_writes_the_fruit_in_flight(conveyor, tmp_path):
    written_live = []

    def on_frame(img, info):
        written_live.extend(info.events)
        if info.index == 150:
            raise KeyError("a bug in a callback")

    with pytest.raises(KeyError, match="a bug"):
        _grade(conveyor, GradeConfig(), open_sinks(events=tmp_path / "e.jsonl"), on_frame=on_frame, delay_s=0.005)
    written = [GradeEvent.from_json(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert len(written) > len(written_live) >= 1  # the fruit in view with views back were voted and written
    assert [e.fruit_id for e in written] == sorted({e.fruit_id for e in written})  # exit order, once each
    assert all(e.last_ts <= 150 / 30 + 1e-9 for e in written)


def test_full_frame_photo_with_a_nan_view_is_counted_not_graded(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"shot{i}.jpg"), np.full((48, 64, 3), 120 * i, np.uint8))

    class Uniform:
        def infer(self, x):
            return np.full((len(x), 3), 1 / 3, np.float32)

    sink = _Collect()
    faulty = _Faulty(lambda n: "nan" if n in (3, 4) else None)(Uniform())  # photo 2, and its retry
    summary = grade(faulty, Preprocess((24, 32)), CLASSES, str(tmp_path), GradeConfig.from_options(full_frame=True),
                    Sinks([sink]))
    assert [(e.fruit_id, e.first_ts) for e in sink.events] == [(1, 0.0), (2, 2.0)]
    assert (summary.fruit_graded, summary.fruit_failed, summary.views_failed, summary.nonfinite_outputs) == (2, 1, 1, 2)


def test_a_backend_failing_at_warm_up_is_fatal_at_once():
    class Uniform:
        def infer(self, x):
            return np.full((len(x), 3), 1 / 3, np.float32)

    faulty = _Faulty(lambda n: "inf")(Uniform())
    with pytest.raises(BackendError, match="'faulty' failed at warm-up on a blank crop: 1 of 1 rows NaN/Inf"):
        with Grader(faulty, Preprocess((24, 32)), CLASSES) as g:
            g.warmup()
    assert faulty.calls == 2  # retried once


def test_fault_options_are_checked():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="'max_consecutive_failures'"):
            GradeConfig(max_consecutive_failures=bad)
    with pytest.raises(ConfigError, match="'run_id'"):
        GradeConfig(run_id="no spaces please")


# ------------------------------------------------------------------------------------ run id and event id
def test_every_event_names_its_run_and_two_runs_never_share_an_event_id(tmp_path):
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"shot{i}.jpg"), np.full((48, 64, 3), 200, np.uint8))

    class Uniform:
        name = "uniform"

        def infer(self, x):
            return np.full((len(x), 3), 1 / 3, np.float32)

    def run(**kw):
        sink = _Collect()
        summary = grade(Uniform(), Preprocess((24, 32)), CLASSES, str(tmp_path),
                        GradeConfig.from_options(full_frame=True, **kw), Sinks([sink]))
        return summary, sink.events

    (s1, e1), (s2, e2) = run(), run()
    assert len(s1.run_id) == 32 and s1.run_id != s2.run_id and s1.to_json()["run_id"] == s1.run_id
    assert [e.event_id for e in e1] == [f"{s1.run_id}:0:1", f"{s1.run_id}:0:2"]
    assert {e.run_id for e in e2} == {s2.run_id} and not {e.event_id for e in e1} & {e.event_id for e in e2}
    assert all(e.schema_version == 3 and e.reason is None for e in e1 + e2)
    s3, e3 = run(run_id="lot-7")  # a run id given by the caller: the same in every event
    assert s3.run_id == "lot-7" and [e.event_id for e in e3] == ["lot-7:0:1", "lot-7:0:2"]


def test_a_dropped_view_releases_a_discarded_track_and_a_fruit_without_views_settles_unvoted():
    tr = Tracker(3, TrackerConfig(max_views=0))  # every box classified, tentative tracks too
    (uid, _, _), = tr.step([Box(300, 100, 60, 60, 3600.0)], 0.0, (0, 640)).classify
    tr.record_view(uid)
    for f in range(1, 30):  # seen once: noise, discarded while its view is in flight
        tr.step([], f / 30, (0, 640))
    assert uid in tr._by_uid and tr.discarded == 1
    tr.drop_view(uid)  # its view failed: nothing will come back for it
    assert uid not in tr._by_uid
    # a fruit whose every view failed: released without a vote, not left behind
    tr = Tracker(3, TrackerConfig(view_stride=1, min_hits=1))
    views = []
    for f in range(3):
        step = tr.step([Box(300 + 5 * f, 100, 60, 60, 3600.0)], f / 30, (0, 640))
        for u, _, _ in step.classify:
            tr.record_view(u)
            views.append(u)
    (uid,) = set(views)
    for _ in views:
        tr.drop_view(uid)
    (done,) = tr.finish()
    assert done[0] == uid and tr.settle(uid) is None and uid not in tr._by_uid
