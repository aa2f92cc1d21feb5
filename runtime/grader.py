"""The grading loop: source → localise → crop → preprocess → backend → tracker → sinks.

    grade(backend, preprocess, classes, "belt.mp4", GradeConfig(...), open_sinks(events="out.jsonl"))

runs until the source ends or `stop` is set, then flushes the tracker (every fruit still in view is
emitted), closes the sinks and returns a `GradeSummary`. The CLI stays thin: it builds the backend
from the bundle, a GradeConfig from its options (`GradeConfig.from_options`), the sinks
(`open_sinks`), sets the stop event from signals (`stop_on_signals`) and draws its live status line
from the `on_frame` callback.

Two things keep a 20 ms model off a 120 fps frame path:
- The tracker associates boxes without probabilities and plans a few views per fruit (tracker.py:
  `max_views`, `view_stride`); only those are cropped and classified, one batch per frame.
- The backend runs in one worker thread fed by a bounded queue (onnxruntime, TensorRT and torch
  release the GIL), so localising the next frames overlaps inference. Every backend call, warm-up
  included, happens on that thread. A file waits when the queue is full (nothing is lost); a live
  source skips an optional view instead (the fruit gets it on a later frame), so the loop keeps up
  with the camera. A fruit's event is written once all its views are back, in exit order; flush()
  waits for the views still in flight.

A fault costs at most what it touches. A backend call that raises, or returns NaN/Inf rows, is retried
once; a view still without finite probabilities is dropped and the fruit is voted on its other views
(a fruit left with none is not graded, only counted: `fruit_failed`). `max_consecutive_failures`
calls in a row without one good row mean the backend is gone: BackendError. Whatever ends the loop
(that error, a sink's, a second Ctrl-C), every fruit whose vote is complete is still written to the
sinks before they close (`Grader.salvage`). Every event carries the run's `run_id` (GradeConfig's, or
a new one per grade() call) and `event_id` = "<run_id>:<lane>:<fruit_id>", so runs never collide.

Per-stage times: capture (read: decode for files, the wait for the next frame for live sources),
localise, preprocess (crops of the planned views), track, sink, `wait` (a file's frame waiting for a
place in the full queue: backpressure, 0 while the worker keeps up) and `frame` = everything after
capture except that wait (the frame's own processing latency); all per processed frame. `infer` is
per backend call, timed in the worker. The latency budget applies to a
frame's localise + preprocess + track and to each inference.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Protocol

import numpy as np
from mnet.runtime.gate import GateConfig, OpenSetGate
from mnet.runtime.localize import Box, LocalizeConfig, Localizer, crop, parse_roi
from mnet.runtime.sinks import Sinks
from mnet.runtime.sources import CaptureFactory, Source, Status, open_source
from mnet.runtime.tracker import FruitVote, Tracker, TrackerConfig, TrackView

from mnet.errors import BackendError, ConfigError
from mnet.events import GradeEvent, check_run_id, new_run_id
from mnet.preprocess import Preprocess
from mnet.redact import redact

__all__ = [
    "STAGES",
    "Backend",
    "FrameInfo",
    "GradeConfig",
    "GradeSummary",
    "Grader",
    "grade",
    "parse_size",
    "stop_on_signals",
]

_log = logging.getLogger(__name__)

STAGES = ("capture", "localise", "preprocess", "infer", "track", "sink", "wait", "frame")
_BUDGET_STAGES = ("localise", "preprocess", "track")
_WARN_EVERY_S = 5.0
_MAX_SAMPLES = 100_000  # per stage: ~1 h at 30 fps; older samples age out of the percentiles
_POLL_S = 0.05  # how often a wait on the worker checks that it is still alive
_SALVAGE_WAIT_S = 2.0  # after an error, how long a live worker may take to return the views in flight


class Backend(Protocol):
    """What the grader needs from an inference backend (runtime/backends.py implements it)."""

    name: str

    def infer(self, x: np.ndarray) -> np.ndarray:
        """NCHW float32 batch → (N, num_classes) float32 probabilities."""


def parse_size(text: str | Sequence[int] | None) -> tuple[int, int] | None:
    """'640x480' or (640, 480) → (640, 480); None → None. ConfigError names the bad value."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        w, h = (int(v) for v in (text.lower().split("x") if isinstance(text, str) else text))
    except (ValueError, TypeError):
        raise ConfigError(f"input size = {text!r}: expected WIDTHxHEIGHT, e.g. 640x480") from None
    if w <= 0 or h <= 0:
        raise ConfigError(f"input size = {text!r}: width and height must be > 0")
    return (w, h)


@dataclass(frozen=True)
class GradeConfig:
    """Everything the grading loop can be told; the CLI builds it with from_options()."""

    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    margin: float = 0.3  # crop margin, fraction of the box size on each side (see localize.crop)
    input_size: tuple[int, int] | None = None  # (w, h) frames are delivered at
    fps_limit: float | None = None
    latency_budget_ms: float | None = None
    max_batch: int | None = None  # split a frame's crops for engines with a fixed max batch
    read_timeout_s: float = 1.0
    open_timeout_s: float = 10.0  # a live source down at start is retried this long (sources.open_source)
    warmup: bool = True  # one inference before the loop so the first frame is not an outlier
    max_frames: int | None = None  # stop after this many processed frames (smoke tests, benches)
    queue_depth: int = 8  # backend calls (frames with views) waiting for the worker before the loop waits
    # Backend calls in a row (each retried once) without a single finite row before grading stops: a
    # transient fault costs views, a device that is gone ends the run instead of dropping every fruit.
    max_consecutive_failures: int = 5
    run_id: str | None = None  # names the run in every event (None: a new uuid4 hex per grade() call)
    gate: GateConfig = field(default_factory=GateConfig)  # open-set gate: foreign objects → reject events

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ConfigError(f"grade field 'margin' = {self.margin!r}: expected >= 0")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise ConfigError(f"latency budget = {self.latency_budget_ms!r} ms: expected > 0")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"grade field 'max_batch' = {self.max_batch!r}: expected >= 1")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"grade field 'max_frames' = {self.max_frames!r}: expected >= 1")
        if self.queue_depth < 1:
            raise ConfigError(f"grade field 'queue_depth' = {self.queue_depth!r}: expected >= 1")
        if isinstance(self.max_consecutive_failures, bool) or not isinstance(self.max_consecutive_failures, int) \
                or self.max_consecutive_failures < 1:
            raise ConfigError(f"grade field 'max_consecutive_failures' = {self.max_consecutive_failures!r}: "
                              "expected an integer >= 1")
        if self.run_id is not None:
            check_run_id(self.run_id, "run_id")

    @classmethod
    def from_options(cls, *, roi: str | Sequence[int] | None = None, trigger_x: float | None = None,
                     full_frame: bool = False, input_size: str | Sequence[int] | None = None,
                     fps_limit: float | None = None, latency_budget_ms: float | None = None,
                     views: int | None = None, **kw: Any) -> GradeConfig:
        """The CLI's options as given (strings allowed for roi 'x,y,w,h' and input size 'WxH').

        views: classified views per fruit (None: the tracker's default; 0: every frame).
        """
        roi_t = parse_roi(roi) if isinstance(roi, str) or roi is None else tuple(int(v) for v in roi)
        base = cls(**kw)
        tracker = replace(base.tracker, trigger_x=trigger_x)
        if views is not None:
            tracker = replace(tracker, max_views=int(views))
        return replace(base,
                       localize=replace(base.localize, roi=roi_t, full_frame=bool(full_frame)),
                       tracker=tracker,
                       input_size=parse_size(input_size), fps_limit=fps_limit,
                       latency_budget_ms=latency_budget_ms)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FrameInfo:
    """Handed to sinks that want frames and to the on_frame callback after every processed frame."""

    index: int  # processed frames before this one
    capture_index: int  # the frame's position in the source (dropped frames counted)
    ts: float
    boxes: list[Box]
    tracks: list[TrackView]
    events: list[GradeEvent]  # emitted while processing this frame
    stage_ms: dict[str, float]
    fps: float  # processed frames per second, over the last second or so
    input_fps: float  # frames the source produced per second, same window
    dropped: int
    graded: int
    classes: tuple[str, ...]
    roi: tuple[int, int, int, int] | None
    trigger_x: float | None
    source_fps: float | None
    last_event: GradeEvent | None


@dataclass
class GradeSummary:
    source: str
    model: str
    backend: str
    run_id: str = ""  # in every event of this run
    frames_read: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    read_errors: int = 0
    reconnects: int = 0
    fruit_graded: int = 0
    grades: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    input_fps: float = 0.0
    processed_fps: float = 0.0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    latency_budget_ms: float | None = None
    over_budget: int = 0
    stopped: bool = False  # True when the stop flag ended the run (not the end of the source)
    tracks_discarded: int = 0  # tentative tracks that never became fruit (noise)
    views: int = 0  # crops classified (backend rows), warm-up excluded
    views_skipped: int = 0  # optional views a live source skipped because the worker was busy
    infer_errors: int = 0  # backend calls that raised, retries included (warm-up excluded, as in views)
    nonfinite_outputs: int = 0  # backend rows with NaN/Inf, retries included
    views_failed: int = 0  # views dropped: no finite probabilities after the retry
    fruit_failed: int = 0  # fruit not graded because none of their views had finite probabilities

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Samples:
    def __init__(self) -> None:
        self.values: collections.deque[float] = collections.deque(maxlen=_MAX_SAMPLES)

    def add(self, ms: float) -> None:
        self.values.append(ms)

    def summary(self) -> dict[str, float]:
        if not self.values:
            return {"p50_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0, "n": 0}
        a = np.fromiter(self.values, np.float64, len(self.values))
        p50, p99 = np.percentile(a, [50, 99])
        return {"p50_ms": round(float(p50), 4), "p99_ms": round(float(p99), 4),
                "mean_ms": round(float(a.mean()), 4), "n": int(a.size)}


class _Rate:
    """Events per second over a sliding window of about `window_s`."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self._marks: collections.deque[tuple[float, int]] = collections.deque()

    def mark(self, now: float, count: int) -> float:
        self._marks.append((now, count))
        while len(self._marks) > 2 and now - self._marks[0][0] > self.window_s:
            self._marks.popleft()
        (t0, c0), (t1, c1) = self._marks[0], self._marks[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass
class _Job:
    """One backend call: the crops of one frame's views and whom each row is for."""

    x: np.ndarray
    targets: list[tuple]  # ("track", uid, partial) or ("single", box, ts)
    probs: np.ndarray | None = None
    ok: np.ndarray | None = None  # (N,) bool: the row is finite; the others are dropped views
    ms: float = 0.0
    error: BaseException | None = None  # fatal: the worker stopped after this job
    done: bool = False
    infer_errors: int = 0  # calls that raised (retries included)
    nonfinite: int = 0  # NaN/Inf rows (retries included)
    failure: str = ""  # why the last failed attempt failed
    row_nonfinite: np.ndarray | None = None  # (N,) NaN/Inf answers per row: a shared batch is split by it


class _Worker:
    """The backend on its own thread, fed by a bounded queue; results come back in submit order."""

    def __init__(self, infer: Callable[[_Job], None], depth: int) -> None:
        self._infer = infer
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=depth)
        self._results: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.in_flight = 0  # submitted, not yet collected
        self._thread = threading.Thread(target=self._run, name="mnet-infer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            t0 = time.perf_counter()
            try:
                self._infer(job)
            except BaseException as e:  # noqa: BLE001 -- handed to the loop's thread, raised there
                job.error = e
            job.ms = (time.perf_counter() - t0) * 1e3
            self._results.put(job)
            if job.error is not None:
                return

    def submit(self, job: _Job, block: bool) -> bool:
        """Queue a job; False when the queue is full and `block` is off. Waits while the worker lives."""
        while True:
            try:
                if block:
                    self._jobs.put(job, timeout=_POLL_S)
                else:
                    self._jobs.put_nowait(job)
                self.in_flight += 1
                return True
            except queue.Full:
                if not block:
                    return False
                if not self._thread.is_alive():
                    return False  # it failed: the caller's next collect() raises its error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def drain(self, deadline: float) -> list[_Job]:
        """Jobs back by `deadline` (time.monotonic), failed ones included, never raising; the rest are
        given up (a dead worker never returns them)."""
        out = []
        while self.in_flight:
            waiting = self.alive and time.monotonic() < deadline
            try:
                job = self._results.get(timeout=_POLL_S) if waiting else self._results.get_nowait()
            except queue.Empty:
                if waiting:
                    continue
                break
            self.in_flight -= 1
            out.append(job)
        self.in_flight = 0
        return out

    def collect(self, wait: bool = False) -> list[_Job]:
        """Finished jobs in submit order; `wait`: block until at least one is back (if any is in flight)."""
        out = []
        while self.in_flight:
            try:
                job = self._results.get(timeout=_POLL_S) if wait and not out else self._results.get_nowait()
            except queue.Empty:
                if not (wait and not out):
                    break
                if not self.alive and self._results.empty():
                    raise BackendError("the inference worker stopped with backend calls in flight")
                continue
            self.in_flight -= 1
            out.append(job)
            if job.error is not None:
                break
        return out

    def close(self) -> None:
        """Stop the thread: pending jobs are dropped (after flush() there are none)."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._jobs.get_nowait()
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(None)
        # A call already running cannot be interrupted; the thread is a daemon, so it never blocks exit.
        self._thread.join(timeout=5.0)


class _Inference:
    """Fills a job's probs and ok: one backend call per max_batch slice, each retried once. Runs on the
    worker thread; one instance per worker, so the count of failed calls in a row is the worker's."""

    def __init__(self, backend: Backend, classes: Sequence[str], max_batch: int | None,
                 max_consecutive_failures: int) -> None:
        self.backend, self.classes, self.max_batch = backend, tuple(classes), max_batch
        self.max_consecutive_failures = max_consecutive_failures
        self._failed_calls = 0  # backend calls in a row without a finite row

    def __call__(self, job: _Job) -> None:
        n, step = len(job.x), self.max_batch or len(job.x)
        job.probs = np.full((n, len(self.classes)), np.nan, np.float32)  # NaN: a dropped row is never a vote
        job.ok = np.zeros(n, bool)
        job.row_nonfinite = np.zeros(n, np.int32)
        for i in range(0, n, step):
            self._call(job, slice(i, min(i + step, n)))

    def _call(self, job: _Job, rows: slice) -> None:
        """One backend call, retried once if it raises or returns NaN/Inf rows; a row still not finite
        stays dropped (job.ok False). Too many calls in a row without a finite row: BackendError."""
        x, name = job.x[rows], self.backend.name
        probs, ok = job.probs[rows], job.ok[rows]  # views: filled in place
        cause: Exception | None = None
        for _ in range(2):
            try:
                out = np.asarray(self.backend.infer(x))
            except Exception as e:  # noqa: BLE001 -- whatever the backend raises costs this call's views only
                job.infer_errors += 1
                job.failure, cause = f"{type(e).__name__}: {e}", e
                continue
            if out.shape != (len(x), len(self.classes)):  # a wrong model, not a fault a retry mends
                raise BackendError(f"backend {name!r} returned shape {out.shape} for a batch of {len(x)}; "
                                   f"expected ({len(x)}, {len(self.classes)}) for classes {list(self.classes)}")
            finite = np.isfinite(out).all(axis=1)
            job.nonfinite += int((~finite).sum())
            job.row_nonfinite[rows] += ~finite
            take = finite & ~ok  # a row good on the first try keeps its first answer
            probs[take] = out[take]
            ok |= finite
            if ok.all():
                break
            job.failure = f"{int((~finite).sum())} of {len(x)} rows NaN/Inf"
        if ok.any():
            self._failed_calls = 0
            return
        self._failed_calls += 1
        if self._failed_calls >= self.max_consecutive_failures:
            raise BackendError(f"backend {name!r} failed on a batch of {len(x)}: {job.failure} ({self._failed_calls} "
                               "call(s) in a row, each retried once, without a finite result); check the device "
                               "and the model") from cause


class Grader:
    """The per-frame pipeline, without a source: process(frame, ts) → events. grade() drives it.

    Owns an inference worker thread: call close() (or use it as a context manager) when done.
    `block_views=False` (live sources) skips an optional view when the worker is busy.
    `worker`: an inference worker shared with other graders instead (runtime/lanes.py: one backend call
    batches the crops of several lanes); `lane` goes into every event.
    """

    def __init__(self, backend: Backend, preprocess: Preprocess, classes: Sequence[str],
                 config: GradeConfig = GradeConfig(), *, model: str = "", source: str = "",
                 localizer: Localizer | None = None, block_views: bool = True, worker: _Worker | None = None,
                 lane: int = 0) -> None:
        if not classes or len(set(classes)) != len(classes):
            raise ConfigError(f"classes = {list(classes)!r}: expected distinct class names")
        self.backend, self.preprocess, self.config = backend, preprocess, config
        self.classes = tuple(str(c) for c in classes)
        self.model, self.source = model, redact(source)  # a caller's own URI may hold a password
        self.block_views, self.lane = block_views, lane
        # Injectable so another detector (or a test's recording wrapper) can stand in for the HSV one.
        self.localizer = localizer if localizer is not None else Localizer(config.localize)
        self._aspect = preprocess.input_hw[1] / preprocess.input_hw[0]  # crops match the model input
        # A view's crop must fit in the frame: the tracker tests the very rectangle the crops are cut
        # with (localize.crop_rect), so it needs the same margin and aspect.
        self.tracker = Tracker(len(self.classes), replace(config.tracker, view_margin=config.margin,
                                                          view_aspect=self._aspect))
        self.run_id = config.run_id or new_run_id()
        self.gate = OpenSetGate(config.gate)  # sees each view's localiser priors; decides at the vote
        self.samples = {s: _Samples() for s in STAGES}
        self.processed = 0
        self.graded = 0
        self.views = 0
        self.views_skipped = 0
        self.infer_errors = 0
        self.nonfinite_outputs = 0
        self.views_failed = 0
        self.fruit_failed = 0
        self._last_drop_warn = -1e9
        self._dropped_since_warn = 0
        self.grades: dict[str, int] = {c: 0 for c in self.classes}
        self.last_event: GradeEvent | None = None
        self.over_budget = 0
        self._over_since_warn = 0
        self._last_warn = -1e9
        self._wait_ms = 0.0  # this frame's wait for a place in the queue
        self._pending: dict[int, int] = {}  # uid → views in flight
        self._due: collections.deque[list] = collections.deque()  # [uid] or [None, job] in exit order
        self._worker = worker if worker is not None else _Worker(
            _Inference(backend, self.classes, config.max_batch, config.max_consecutive_failures),
            config.queue_depth)

    def __enter__(self) -> Grader:  # noqa: PYI034 -- typing.Self needs 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._worker.close()

    def warmup(self) -> None:
        """One inference on a blank crop (on the worker, like every call): pays lazy initialisation and
        checks the output contract."""
        h, w = self.preprocess.input_hw
        job = _Job(self.preprocess.batch([np.zeros((h, w, 3), np.uint8)]), [])
        self._worker.submit(job, block=True)
        for j in self._worker.collect(wait=True):
            self._check(j)
        if not job.ok.all():  # retried already: a model that fails on a blank crop is not fit to grade with
            raise BackendError(f"backend {self.backend.name!r} failed at warm-up on a blank crop: {job.failure}")
        probs = job.probs
        if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            raise BackendError(f"backend {self.backend.name!r} returns rows summing to {probs.sum(axis=1)}, "
                               "not probabilities; the backend must apply softmax")

    def _check(self, job: _Job) -> None:
        if job.error is not None:
            e = job.error
            if isinstance(e, BackendError):
                raise e
            raise BackendError(f"backend {self.backend.name!r} failed on a batch of {len(job.x)}: "
                               f"{type(e).__name__}: {e}") from e

    def _event(self, v: FruitVote, uid: int | None = None) -> GradeEvent:
        e = GradeEvent.from_probs(v.fruit_id, dict(zip(self.classes, v.probs.tolist())), frames=v.frames,
                                  views=v.voted_frames, first_ts=v.first_ts, last_ts=v.last_ts,
                                  source=self.source, model=self.model, run_id=self.run_id,
                                  reason=self.gate.decide(uid, v.probs), lane=self.lane)
        self.graded += 1
        self.grades[e.grade] = self.grades.get(e.grade, 0) + 1  # "reject" joins the classes when it happens
        self.last_event = e
        return e

    def _crop(self, frame: np.ndarray, box: Box) -> np.ndarray:
        if self.config.localize.full_frame:
            return crop(frame, box, 0.0)
        return crop(frame, box, self.config.margin, self._aspect)

    def _submit(self, crops: list[np.ndarray], targets: list[tuple], required: bool) -> bool:
        """Queue one backend call; False only when a live source skips an optional view (worker busy).

        A refusal because the worker died raises its real error here: otherwise the caller would go
        on as if the views were taken (a required view missing, a vote with nothing in it) or count
        a dead worker as a busy one.
        """
        job = _Job(self.preprocess.batch(crops), targets)
        t0 = time.perf_counter()
        ok = self._worker.submit(job, block=required or self.block_views)
        self._wait_ms += (time.perf_counter() - t0) * 1e3
        if not ok:
            if self._worker.alive:
                return False
            self._collect(wait=True)  # raises the failed call's BackendError
            raise BackendError(f"backend {self.backend.name!r}: the inference worker stopped")
        self.views += len(targets)
        for t in targets:
            if t[0] == "track":
                self._pending[t[1]] = self._pending.get(t[1], 0) + 1
        if targets[0][0] == "single":
            self._due.append([None, job])
        return True

    def _collect(self, wait: bool = False) -> None:
        for job in self._worker.collect(wait):
            self._check(job)
            self._take(job)

    def _take(self, job: _Job) -> None:
        """A finished call's rows to their fruit; a dropped row costs its view, not the fruit."""
        job.done = True
        self.samples["infer"].add(job.ms)
        self._check_budget({"infer": job.ms}, ("infer",))
        self.infer_errors += job.infer_errors
        self.nonfinite_outputs += job.nonfinite
        dropped = int((~job.ok).sum())
        if dropped:
            self._dropped(dropped, f"{job.failure}, also on the retry")
        for row, ok, t in zip(job.probs, job.ok, job.targets):
            if t[0] == "track":
                if ok:
                    self.tracker.add_probs(t[1], row, t[2])
                else:
                    self.tracker.drop_view(t[1])
                self._settle_pending(t[1])

    def _settle_pending(self, uid: int) -> None:
        # Dropped at zero: a discarded track (--views 0) is never voted, so _ready never pops it.
        if self._pending[uid] == 1:
            del self._pending[uid]
        else:
            self._pending[uid] -= 1

    def _dropped(self, n: int, why: str) -> None:
        self.views_failed += n
        self._dropped_since_warn += n
        now = time.monotonic()
        if now - self._last_drop_warn >= _WARN_EVERY_S:  # a flaky backend must not flood the log
            _log.warning("backend %r: %d view(s) dropped since the last warning (last: %s); %d in this run",
                         self.backend.name, self._dropped_since_warn, why, self.views_failed)
            self._last_drop_warn, self._dropped_since_warn = now, 0

    def _vote(self, uid: int) -> GradeEvent | None:
        v = self.tracker.settle(uid)
        if v is None:
            self.fruit_failed += 1
            _log.warning("a fruit was not graded: none of its views had finite probabilities (%d in this run)",
                         self.fruit_failed)
            return None
        return self._event(v, uid)

    def _ready(self) -> list[GradeEvent]:
        """Events of done fruit whose views are all back, from the head of the exit-order queue."""
        out = []
        while self._due:
            uid, job = self._due[0]
            if uid is None:
                if not job.done:
                    break
                self._due.popleft()
                e = self._single(job)
            else:
                if self._pending.get(uid, 0):
                    break
                self._pending.pop(uid, None)
                self._due.popleft()
                e = self._vote(uid)
            if e is not None:
                out.append(e)
        return out

    def _single(self, job: _Job) -> GradeEvent | None:
        """The event of a full-frame photo's one view; None when the view was dropped or never came."""
        if not (job.done and job.ok[0]):
            self.fruit_failed += 1
            return None
        _, box, ts = job.targets[0]
        return self._event(self.tracker.emit_single(box, job.probs[0], ts))

    def _queue_done(self, done: list[tuple[int, Any]]) -> None:
        # Queued before any view is submitted: a submit that raises leaves them to salvage(), not lost.
        self._due.extend([uid, None] for uid, _ in done)

    def _classify_kept(self, done: list[tuple[int, Any]]) -> None:
        for uid, kept in done:
            if kept is not None:  # no view yet: classify the best one it showed
                frame, box = kept
                self._submit([self._crop(frame, box)], [("track", uid, box.touches_edge)], required=True)
                self.tracker.record_view(uid)  # required: _submit queued it or raised
                self.gate.observe(uid, box)

    def process(self, frame: np.ndarray, ts: float) -> tuple[list[GradeEvent], list[Box], dict[str, float]]:
        """Grade one frame: the events ready now, the boxes found, and per-stage milliseconds."""
        clock = time.perf_counter
        self._wait_ms = 0.0
        t0 = clock()
        boxes = self.localizer(frame)
        t1 = clock()
        if self.config.localize.full_frame:
            t2 = t1  # no tracking before the crop: crop + preprocess + submit is all preprocess (less wait)
            if boxes:
                self._submit([self._crop(frame, boxes[0])], [("single", boxes[0], ts)], required=True)
            t3 = clock()
        else:
            rx, _, rw, _ = self.localizer.region(frame)
            step = self.tracker.step(boxes, ts, (rx, rx + rw))
            self._queue_done(step.done)
            t2 = clock()
            for uid, di in step.keep:
                self.tracker.keep(uid, (frame, boxes[di]))  # a reference: the crop is cut only if needed
            if step.classify:
                required = any(r for _, _, r in step.classify)
                crops = [self._crop(frame, boxes[di]) for _, di, _ in step.classify]
                targets = [("track", uid, boxes[di].touches_edge) for uid, di, _ in step.classify]
                if self._submit(crops, targets, required):
                    for uid, di, _ in step.classify:
                        self.tracker.record_view(uid)
                        self.gate.observe(uid, boxes[di])
                else:  # a live source's busy worker (a dead one raised in _submit)
                    self.views_skipped += len(targets)
            self._classify_kept(step.done)
            t3 = clock()
        self._collect()
        events = self._ready()
        t4 = clock()
        ms = {"localise": (t1 - t0) * 1e3, "preprocess": (t3 - t2) * 1e3 - self._wait_ms,
              "track": (t2 - t1 + t4 - t3) * 1e3, "wait": self._wait_ms}
        for k, v in ms.items():
            self.samples[k].add(v)
        self.processed += 1
        self._check_budget(ms, _BUDGET_STAGES)
        return events, boxes, ms

    def flush(self) -> list[GradeEvent]:
        """End of stream: every fruit still in view is done; waits for the views in flight."""
        return list(self._flush())

    def _flush(self) -> Iterator[GradeEvent]:
        # A generator: each event reaches the caller before the next wait, so an error there loses none.
        if not self.config.localize.full_frame:
            done = self.tracker.finish()
            self._queue_done(done)
            self._classify_kept(done)
        while self._due:
            yield from self._ready()
            if self._due:
                self._collect(wait=True)

    def salvage(self, wait_s: float = _SALVAGE_WAIT_S) -> list[GradeEvent]:
        """After an error in the loop: the events of every fruit that can still be voted, in exit order.

        Waits up to `wait_s` for views in flight while the worker lives (not at all once it is dead).
        Views not back by then are dropped, and fruit left without a view are counted in fruit_failed,
        as after a failed inference; fruit still in view are done now, as at the end of the stream, but
        a fruit without a view is not classified (the backend may be what failed).
        """
        for job in self._worker.drain(time.monotonic() + wait_s):
            if job.error is None:
                self._take(job)
        if not self.config.localize.full_frame:
            self._queue_done(self.tracker.finish())
        out = []
        for uid, job in self._due:
            if uid is None:
                if not job.done:
                    self._dropped(1, "not back when grading stopped")
                e = self._single(job)
            else:
                lost = self._pending.pop(uid, 0)
                for _ in range(lost):
                    self.tracker.drop_view(uid)
                if lost:
                    self._dropped(lost, "not back when grading stopped")
                e = self._vote(uid)
            if e is not None:
                out.append(e)
        self._due.clear()
        return out

    def _check_budget(self, ms: dict[str, float], stages: Sequence[str]) -> None:
        budget = self.config.latency_budget_ms
        if budget is None:
            return
        total = sum(ms.get(s, 0.0) for s in stages)
        if total <= budget:
            return
        self.over_budget += 1
        self._over_since_warn += 1
        now = time.monotonic()
        if now - self._last_warn >= _WARN_EVERY_S:
            worst = max(ms, key=ms.get)
            _log.warning("%s took %.1f ms, over the %.1f ms budget (%d over since the last warning; "
                         "slowest stage: %s %.1f ms)", "an inference" if stages == ("infer",) else "a frame",
                         total, budget, self._over_since_warn, worst, ms[worst])
            self._last_warn, self._over_since_warn = now, 0


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Set `stop` on SIGINT/SIGTERM so the loop finishes its frame and flushes; a second signal aborts.

    Only the main thread may install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def grade(
    backend: Backend,
    preprocess: Preprocess,
    classes: Sequence[str],
    source: str | int | Source,
    config: GradeConfig = GradeConfig(),
    sinks: Sinks | None = None,
    *,
    model: str = "",
    stop: threading.Event | None = None,
    on_frame: Callable[[np.ndarray, FrameInfo], None] | None = None,
    capture_factory: CaptureFactory | None = None,
    localizer: Localizer | None = None,
) -> GradeSummary:
    """Grade fruit from `source` (a URI or an open Source) until it ends or `stop` is set.

    Takes ownership of `sinks` (closed on return, also on error) and of a source it opened from a URI.
    `on_frame(frame, info)` runs after every processed frame (the CLI's live status / --show window).
    """
    sinks = sinks if sinks is not None else Sinks()
    stop = stop or threading.Event()
    own_source = not isinstance(source, Source)
    src: Source | None = None
    try:
        sinks.start([str(c) for c in classes])  # a sink that cannot take these events refuses before any frame
        src = open_source(source, input_size=config.input_size, fps_limit=config.fps_limit,
                          timeout_s=config.read_timeout_s, open_timeout_s=config.open_timeout_s,
                          capture_factory=capture_factory) if own_source else source
        with Grader(backend, preprocess, classes, config, model=model, source=src.uri, localizer=localizer,
                    block_views=not src.live) as grader:
            _log.info("grading run %s: %s", grader.run_id, grader.source)
            if config.warmup:
                grader.warmup()
            try:
                summary = _run(grader, src, sinks, stop, on_frame)
            except BaseException as exc:
                _salvage(grader, sinks, exc)  # before the sinks close: every complete vote is written
                raise
    finally:
        try:
            if own_source and src is not None:
                src.close()
        finally:
            sinks.close()
    _log.info("graded %d fruit from %d frames in %.1f s (%.1f fps processed, %d dropped)", summary.fruit_graded,
              summary.frames_processed, summary.wall_s, summary.processed_fps, summary.frames_dropped)
    return summary


def _salvage(grader: Grader, sinks: Sinks, exc: BaseException) -> None:
    """Write what can still be graded after `exc` ended the loop; never raises: `exc` is the error to report."""
    try:
        # A second Ctrl-C asks to stop now: no wait for views in flight, only what is back.
        events = grader.salvage(0.0 if isinstance(exc, KeyboardInterrupt) else _SALVAGE_WAIT_S)
        for e in events:
            sinks.write(e)
    except Exception:
        _log.exception("grading stopped (%s: %s) and the fruit already voted could not be written",
                       type(exc).__name__, exc)
        return
    _log.warning("grading stopped (%s: %s): wrote the %d fruit whose votes were complete; %d fruit of this run "
                 "not graded", type(exc).__name__, exc, len(events), grader.fruit_failed)


def _run(grader: Grader, src: Source, sinks: Sinks, stop: threading.Event,
         on_frame: Callable[[np.ndarray, FrameInfo], None] | None) -> GradeSummary:
    clock = time.perf_counter
    cfg = grader.config
    rate_out, rate_in = _Rate(), _Rate()
    stopped = False
    start = clock()
    while True:
        if stop.is_set():
            stopped = True
            break
        t0 = clock()
        cap = src.read()
        capture_ms = (clock() - t0) * 1e3
        if cap.status is Status.EOS:
            break
        if cap.status is Status.TIMEOUT:
            continue
        if cap.status is Status.ERROR:
            if not src.streaming:
                break
            continue
        grader.samples["capture"].add(capture_ms)
        events, boxes, ms = grader.process(cap.frame, cap.ts)
        t1 = clock()
        for e in events:
            sinks.write(e)
        now = clock()
        info = None
        if sinks.wants_frames or on_frame is not None:
            loc = cfg.localize
            info = FrameInfo(
                index=grader.processed - 1, capture_index=cap.index, ts=cap.ts, boxes=boxes,
                tracks=grader.tracker.tracks, events=events, stage_ms={"capture": capture_ms, **ms},
                fps=rate_out.mark(now, grader.processed), input_fps=rate_in.mark(now, src.stats.read),
                dropped=src.stats.dropped, graded=grader.graded, classes=grader.classes, roi=loc.roi,
                trigger_x=cfg.tracker.trigger_x, source_fps=src.fps, last_event=grader.last_event)
            sinks.frame(cap.frame, info)
        grader.samples["sink"].add((clock() - t1) * 1e3)
        grader.samples["frame"].add((clock() - t0) * 1e3 - capture_ms - ms["wait"])
        if on_frame is not None:
            on_frame(cap.frame, info)
        if cfg.max_frames is not None and grader.processed >= cfg.max_frames:
            break
    for e in grader._flush():  # each event written before the next wait: an error there loses none
        sinks.write(e)
    wall = max(clock() - start, 1e-9)
    st = src.stats
    return GradeSummary(
        source=src.uri, model=grader.model, backend=getattr(grader.backend, "name", type(grader.backend).__name__),
        run_id=grader.run_id, infer_errors=grader.infer_errors, nonfinite_outputs=grader.nonfinite_outputs,
        views_failed=grader.views_failed, fruit_failed=grader.fruit_failed,
        frames_read=st.read, frames_processed=grader.processed, frames_dropped=st.dropped, read_errors=st.errors,
        reconnects=st.reconnects, fruit_graded=grader.graded, grades=dict(grader.grades), wall_s=round(wall, 4),
        input_fps=round(st.read / wall, 2), processed_fps=round(grader.processed / wall, 2),
        stages={s: grader.samples[s].summary() for s in STAGES}, latency_budget_ms=cfg.latency_budget_ms,
        over_budget=grader.over_budget, stopped=stopped, tracks_discarded=grader.tracker.discarded,
        views=grader.views, views_skipped=grader.views_skipped)
