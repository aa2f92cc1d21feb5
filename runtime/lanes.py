"""Several sources in one grading process: one lane per camera, one inference worker for all of them.

    lanes = [LaneSpec("left", "rtsp://cam-a/belt"), LaneSpec("right", "rtsp://cam-b/belt", trigger_x=320)]
    summary = grade_lanes(backend, preprocess, classes, lanes, GradeConfig(...), open_sinks(events="out.jsonl"))

Each lane is the single-source pipeline of grader.py (`Grader` + `_run`) on its own thread: its own
source, localiser, tracker, counters and fruit ids (ids restart at 1 per lane; every event carries
`lane` = the lane's index, so event_id "<run_id>:<lane>:<fruit_id>" stays unique). What the lanes share
is the `Batcher`: one worker thread that takes every crop queued by any lane, up to the batch limit,
and makes one backend call of them, then routes each row back to its lane (DeepStream's nvstreammux,
without its wait: a batch is whatever queued while the previous call ran, so batching adds no
latency and grows exactly when inference is the bottleneck). Each lane keeps its own bounded queue in
the batcher, so a burst on one belt cannot starve the others.

A lane ends on its own: a file at its end, a live source only when stopped (a camera that is gone
reconnects with backoff inside its source while the other lanes go on; the time without frames is
counted as the lane's outages). A lane whose source cannot be opened at all ends with its error in
its summary, the others go on. A fault of the shared backend is every lane's: each writes the fruit
it can still vote (`Grader.salvage`) and the error is raised once all lanes have stopped. The run
ends when every lane has ended; the sinks are shared (one events file, a lock around each write).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from mnet.runtime.grader import (
    _POLL_S,
    _SALVAGE_WAIT_S,
    Backend,
    FrameInfo,
    GradeConfig,
    GradeSummary,
    Grader,
    _Inference,
    _Job,
    _run,
    _salvage,
    _Samples,
    _Worker,
)
from mnet.runtime.localize import Localizer, parse_roi
from mnet.runtime.sinks import Sinks, open_sinks
from mnet.runtime.sources import CaptureFactory, Source, Status, open_source, parse_uri

from mnet.errors import ConfigError, SourceError
from mnet.events import new_run_id
from mnet.preprocess import Preprocess
from mnet.redact import redact

__all__ = ["Batcher", "LaneResult", "LaneSpec", "LanesSummary", "batch_limit", "grade_lanes", "load_lanes"]

_log = logging.getLogger(__name__)

# A dynamic-batch model has no limit of its own; past a few dozen crops a CPU call gains nothing more
# and one lane's views would wait behind everybody's.
_DEFAULT_MAX_BATCH = 32
_LANE_KEYS = ("name", "source", "roi", "trigger_x", "save")


# ------------------------------------------------------------------------------------------ lanes file


@dataclass(frozen=True)
class LaneSpec:
    """One lane: a name (shown in the summary), a source (URI or an open Source), its belt region and
    trigger line (None: the run's GradeConfig values), and where its annotated video goes (`save`: a
    video file, rtp://HOST:PORT or rtsp://HOST:PORT/PATH; None: nowhere)."""

    name: str
    source: str | int | Source
    roi: tuple[int, int, int, int] | None = None
    trigger_x: float | None = None
    save: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"lane name = {self.name!r}: expected a non-empty string")
        if self.trigger_x is not None and (isinstance(self.trigger_x, bool) or not isinstance(self.trigger_x, (int, float))
                                           or not math.isfinite(self.trigger_x) or self.trigger_x < 0):
            raise ConfigError(f"lane {self.name!r}: trigger_x = {self.trigger_x!r}: expected a number of pixels >= 0")

    def to_json(self) -> dict[str, Any]:
        src = self.source.uri if isinstance(self.source, Source) else redact(str(self.source))
        return {"name": self.name, "source": src, "roi": list(self.roi) if self.roi else None,
                "trigger_x": self.trigger_x, "save": None if self.save is None else redact(self.save)}


def _lane_error(path: str, where: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"lanes file {path}: {where} = {value!r}: expected {expected}")


def load_lanes(path: str | os.PathLike) -> list[LaneSpec]:
    """Read a lanes file; ConfigError names the file, the lane and the field.

        {"lanes": [{"name": "left", "source": "rtsp://cam-a/belt", "roi": [0, 80, 640, 320], "trigger_x": 320},
                   {"name": "right", "source": "/dev/v4l/by-id/usb-cam-b", "roi": "0,60,640,360"}]}

    `source` is required; `name` defaults to "lane<i>"; `roi` (x,y,w,h), `trigger_x` and `save` (the
    lane's annotated video: a file or an rtp:// / rtsp:// stream) are optional. Source URIs are parsed
    here (not opened), so a typo fails before any lane starts.
    """
    where = str(path)
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"lanes file {where}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"lanes file {where}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"lanes"})
        if unknown:
            raise _lane_error(where, "field(s)", unknown, "only 'lanes'")
        data = data.get("lanes")
    if not isinstance(data, list) or not data:
        raise _lane_error(where, "lanes", data, "a non-empty list of {name, source, roi, trigger_x} objects")
    lanes = []
    for i, d in enumerate(data):
        at = f"lanes[{i}]"
        if not isinstance(d, dict):
            raise _lane_error(where, at, d, "an object with 'source' (and optional name, roi, trigger_x)")
        unknown = sorted(set(d) - set(_LANE_KEYS))
        if unknown:
            raise _lane_error(where, f"{at} field(s)", unknown, f"only {list(_LANE_KEYS)}")
        source = d.get("source")
        if isinstance(source, bool) or not isinstance(source, (str, int)) or str(source).strip() == "":
            raise _lane_error(where, f"{at}.source", source, "a source URI (0, a file, rtsp://..., csi://N, ...)")
        try:
            parse_uri(source)
        except SourceError as e:
            raise ConfigError(f"lanes file {where}: {at}.source: {e}") from None
        name = d.get("name", f"lane{i}")
        if not isinstance(name, str) or not name.strip():
            raise _lane_error(where, f"{at}.name", name, "a non-empty string")
        roi = d.get("roi")
        if roi is not None:
            ints = isinstance(roi, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in roi)
            try:
                roi = parse_roi(roi if isinstance(roi, str) else ",".join(map(str, roi)) if ints else "?")
            except ConfigError:
                raise _lane_error(where, f"{at}.roi", d["roi"], "[x, y, w, h] or \"x,y,w,h\" in pixels, "
                                  "x, y >= 0 and w, h > 0") from None
        trigger = d.get("trigger_x")
        if trigger is not None and (isinstance(trigger, bool) or not isinstance(trigger, (int, float))
                                    or not math.isfinite(trigger) or trigger < 0):
            raise _lane_error(where, f"{at}.trigger_x", trigger, "a number of pixels >= 0")
        save = d.get("save")
        if save is not None and (not isinstance(save, str) or not save.strip()):
            raise _lane_error(where, f"{at}.save", save, "a video file or an rtp://HOST:PORT / rtsp:// URI")
        lanes.append(LaneSpec(name.strip(), source, roi, None if trigger is None else float(trigger), save))
    names = [lane.name for lane in lanes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _lane_error(where, "lane names", dup, "each name once")
    return lanes


# --------------------------------------------------------------------------------------------- batcher


def batch_limit(backend: Backend, max_batch: int | None = None) -> int:
    """Rows per backend call: GradeConfig.max_batch, else the backend's fixed or largest batch (a fixed
    batch pads every call to it, so a batch fills it), else _DEFAULT_MAX_BATCH."""
    for v in (max_batch, getattr(backend, "exact_batch", None), getattr(backend, "max_batch", None)):
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return v
    return _DEFAULT_MAX_BATCH


class _Port(_Worker):
    """A lane's end of the shared Batcher, with a Grader's worker interface (submit / collect / drain)."""

    def __init__(self, batcher: Batcher, lane: int, depth: int) -> None:  # noqa: D107 -- no thread of its own
        self._batcher, self.lane, self._depth = batcher, lane, depth
        self._results: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.in_flight = 0  # submitted, not yet collected
        self.queued = 0  # in the batcher's queue, not yet taken by its thread (guarded by its lock)

    @property
    def alive(self) -> bool:
        return self._batcher.alive

    def submit(self, job: _Job, block: bool) -> bool:
        b = self._batcher
        with b._cond:
            while self.queued >= self._depth and b.alive:
                if not block:
                    return False
                b._cond.wait(_POLL_S)
            if not b.alive:
                return False  # the caller's next collect() raises the failed call's error
            b._queue.append((self, job))
            self.queued += 1
            b._cond.notify_all()
        self.in_flight += 1
        return True

    def close(self) -> None:
        """The lane is done: its jobs still queued are dropped (after flush() there are none)."""
        b = self._batcher
        with b._cond:
            kept = [item for item in b._queue if item[0] is not self]
            b._queue.clear()
            b._queue.extend(kept)
            self.queued = 0
            b._cond.notify_all()


class Batcher:
    """One inference worker thread for several Graders: every backend call takes the crops queued by
    all lanes, up to `max_batch` rows, and each row goes back to its lane's Grader.

    Use `port(lane, depth)` as a Grader's `worker`; close() when every lane is done. Retries, NaN rows
    and the failed-calls-in-a-row limit work as in a Grader's own worker (grader._Inference).
    """

    def __init__(self, backend: Backend, classes: Sequence[str], *, max_batch: int | None = None,
                 max_consecutive_failures: int = 5) -> None:
        self.backend = backend
        self.max_batch = batch_limit(backend, max_batch)
        self._infer = _Inference(backend, classes, self.max_batch, max_consecutive_failures)
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[_Port, _Job]] = collections.deque()
        self._closed = False
        self._alive = True
        self.error: BaseException | None = None
        # statistics (written by the worker thread only)
        self.calls = 0  # batches run (a batch over max_batch rows is one job split into several calls)
        self.rows = 0
        self.multi_lane_calls = 0  # batches that carried the crops of more than one lane
        self.sizes: collections.Counter[int] = collections.Counter()  # rows per batch → batches
        self.infer_errors = 0
        self.samples = _Samples()  # ms per batch
        self.cpu_ms = 0.0  # this thread's CPU time in backend calls (wall time also counts other threads' turns)
        self._thread = threading.Thread(target=self._run, name="mnet-infer-lanes", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._alive

    def port(self, lane: int, depth: int) -> _Port:
        return _Port(self, lane, depth)

    def _take(self) -> list[tuple[_Port, _Job]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            batch = [self._queue.popleft()]
            rows = len(batch[0][1].x)
            while self._queue and rows + len(self._queue[0][1].x) <= self.max_batch:
                batch.append(self._queue.popleft())
                rows += len(batch[-1][1].x)
            for port, _ in batch:
                port.queued -= 1
            self._cond.notify_all()  # room in those lanes' queues
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            jobs = [job for _, job in batch]
            merged = _Job(jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs]), [])
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                self._infer(merged)
            except BaseException as e:  # noqa: BLE001 -- handed to every lane, raised on their threads
                merged.error = e
            ms = (time.perf_counter() - t0) * 1e3
            self.cpu_ms += (time.thread_time() - c0) * 1e3
            self.calls += 1
            self.rows += len(merged.x)
            self.sizes[len(merged.x)] += 1
            self.multi_lane_calls += len({port.lane for port, _ in batch}) > 1
            self.infer_errors += merged.infer_errors
            self.samples.add(ms)
            at = 0
            for port, job in batch:
                rows = slice(at, at + len(job.x))
                at = rows.stop
                if merged.probs is not None:
                    job.probs, job.ok = merged.probs[rows], merged.ok[rows]
                    job.nonfinite = int(merged.row_nonfinite[rows].sum())
                job.infer_errors, job.failure, job.error, job.ms = merged.infer_errors, merged.failure, merged.error, ms
                port._results.put(job)
            if merged.error is not None:
                with self._cond:
                    self.error, self._alive = merged.error, False
                    self._cond.notify_all()
                return

    def stats(self) -> dict[str, Any]:
        return {"max_batch": self.max_batch, "calls": self.calls, "rows": self.rows,
                "mean_batch": round(self.rows / self.calls, 3) if self.calls else 0.0,
                "multi_lane_calls": self.multi_lane_calls, "infer_errors": self.infer_errors,
                "cpu_ms_per_row": round(self.cpu_ms / self.rows, 4) if self.rows else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())}, "infer": self.samples.summary()}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        # A call already running cannot be interrupted; the thread is a daemon, so it never blocks exit.
        self._thread.join(timeout=5.0)
        self._alive = False


# ---------------------------------------------------------------------------------------------- lanes


class _Outages:
    """A lane's source, counting its outages: two frames in a row of a live source further apart (in
    capture time) than `gap_s` or 3 frame periods (a camera unplugged, a stream down and reconnecting),
    and no frame for that long when the lane ends. Read on the lane's thread only."""

    def __init__(self, src: Source, gap_s: float = 0.5) -> None:
        self._src = src
        self.gap_s = max(gap_s, 3.0 / src.fps if src.fps else 0.0)
        self.count = 0
        self.seconds = 0.0
        self._last_ts: float | None = None  # capture time of the last frame
        self._last_at = 0.0  # time.monotonic() when it was read

    def __getattr__(self, name: str) -> Any:  # uri, live, stats, fps, streaming: the source's own
        return getattr(self._src, name)

    def read(self) -> Any:
        cap = self._src.read()
        if cap.status is Status.OK and self._src.live:
            if self._last_ts is not None and cap.ts - self._last_ts > self.gap_s:
                self.count += 1
                self.seconds += cap.ts - self._last_ts
            self._last_ts, self._last_at = cap.ts, time.monotonic()
        return cap

    def end(self) -> None:
        idle = time.monotonic() - self._last_at
        if self._src.live and self._last_ts is not None and idle > self.gap_s:
            self.count += 1
            self.seconds += idle


class _LaneSinks:
    """The run's sinks as one lane sees them (writes from lane threads one at a time), and the lane's own
    annotated video, if it has one (its frames go there only)."""

    def __init__(self, sinks: Sinks, lock: threading.Lock, video: Sinks | None) -> None:
        self._sinks, self._lock, self.video = sinks, lock, video

    @property
    def wants_frames(self) -> bool:
        return self.video is not None and self.video.wants_frames

    def write(self, event: Any) -> None:
        with self._lock:
            self._sinks.write(event)

    def frame(self, frame: np.ndarray, info: FrameInfo) -> None:
        if self.video is not None:
            self.video.frame(frame, info)


@dataclass
class LaneResult:
    index: int
    name: str
    source: str
    summary: GradeSummary | None = None  # None when the lane never started (its source did not open)
    outages: int = 0  # stretches without frames (reads that timed out or failed) on a live source
    outage_s: float = 0.0
    error: str | None = None  # why the lane ended early (its source could not be opened, a backend fault)
    video: dict[str, Any] | None = None  # its annotated video's Sinks.report() row (written, error, ...)

    def to_json(self) -> dict[str, Any]:
        return {"lane": self.index, "name": self.name, "source": self.source, "outages": self.outages,
                "outage_s": round(self.outage_s, 3), "error": self.error, "video": self.video,
                **(self.summary.to_json() if self.summary else {})}


@dataclass
class LanesSummary:
    lanes: list[LaneResult]
    run_id: str
    wall_s: float
    batcher: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False

    def aggregate(self) -> dict[str, Any]:
        """Counters summed over the lanes; fps over the whole run's wall time."""
        done = [lane.summary for lane in self.lanes if lane.summary is not None]
        keys = ("frames_read", "frames_processed", "frames_dropped", "read_errors", "reconnects", "fruit_graded",
                "over_budget", "tracks_discarded", "views", "views_skipped", "nonfinite_outputs", "views_failed",
                "fruit_failed")
        agg: dict[str, Any] = {k: sum(getattr(s, k) for s in done) for k in keys}
        grades: collections.Counter[str] = collections.Counter()
        for s in done:
            grades.update(s.grades)
        wall = max(self.wall_s, 1e-9)
        agg.update(lanes=len(self.lanes), lanes_failed=sum(1 for lane in self.lanes if lane.error),
                   outages=sum(lane.outages for lane in self.lanes),
                   outage_s=round(sum(lane.outage_s for lane in self.lanes), 3), grades=dict(grades),
                   infer_errors=self.batcher.get("infer_errors", 0), wall_s=round(self.wall_s, 4),
                   input_fps=round(agg["frames_read"] / wall, 2), processed_fps=round(agg["frames_processed"] / wall, 2))
        return agg

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "stopped": self.stopped, **self.aggregate(),
                "lanes": [lane.to_json() for lane in self.lanes], "batcher": self.batcher}


def _lane_config(config: GradeConfig, lane: LaneSpec, run_id: str) -> GradeConfig:
    cfg = replace(config, run_id=run_id, warmup=False)  # one warm-up for the shared backend, before the lanes
    if lane.roi is not None:
        cfg = replace(cfg, localize=replace(cfg.localize, roi=lane.roi))
    if lane.trigger_x is not None:
        cfg = replace(cfg, tracker=replace(cfg.tracker, trigger_x=lane.trigger_x))
    return cfg


def grade_lanes(
    backend: Backend,
    preprocess: Preprocess,
    classes: Sequence[str],
    lanes: Sequence[LaneSpec],
    config: GradeConfig = GradeConfig(),
    sinks: Sinks | None = None,
    *,
    model: str = "",
    stop: threading.Event | None = None,
    on_frame: Callable[[int, np.ndarray, FrameInfo], None] | None = None,
    capture_factory: CaptureFactory | None = None,
    localizer: Callable[[int, GradeConfig], Localizer] | None = None,
) -> LanesSummary:
    """Grade every lane until each has ended (or `stop` is set); one backend call per batch of crops.

    Takes ownership of `sinks` (closed on return) and of the sources it opens from URIs (an open Source
    in a LaneSpec stays the caller's). A lane's `save` is opened before any lane starts (a stream that
    cannot start is a ConfigError then); a video that fails later stops only that video, reported in
    its LaneResult.video. `on_frame(lane, frame, info)` runs on the lane's thread.
    `localizer(lane, config)`: a localiser per lane (tests); default the HSV one from the lane's config.
    Raises the backend's error (after every lane has written what it could) when the shared worker
    fails; a lane whose source fails only ends that lane (LaneResult.error).
    """
    if not lanes:
        raise ConfigError("lanes: none given; expected at least one source")
    names = [lane.name for lane in lanes]
    if len(set(names)) != len(names):
        raise ConfigError(f"lane names = {names!r}: expected each name once")
    sinks = sinks if sinks is not None else Sinks()
    stop = stop or threading.Event()
    run_id = config.run_id or new_run_id()  # one run: every lane's events carry it
    results = [LaneResult(i, lane.name, lane.to_json()["source"]) for i, lane in enumerate(lanes)]
    fatal: list[BaseException] = []
    batcher = None
    videos: list[Sinks | None] = []
    start = time.perf_counter()
    try:
        for lane in lanes:  # before grading: a stream that cannot start stops the run having graded nothing
            videos.append(None if lane.save is None else
                          open_sinks(save=lane.save, video_size=config.input_size, raise_on_close=False))
        sinks.start([str(c) for c in classes])
        batcher = Batcher(backend, classes, max_batch=config.max_batch,
                          max_consecutive_failures=config.max_consecutive_failures)
        if config.warmup:  # once, through a lane's port, like every call
            with Grader(backend, preprocess, classes, replace(config, run_id=run_id),
                        worker=batcher.port(-1, 1)) as g:
                g.warmup()
        lock = threading.Lock()

        def lane_main(i: int) -> None:
            spec, res = lanes[i], results[i]
            cfg = _lane_config(config, spec, run_id)
            own = not isinstance(spec.source, Source)
            src = None
            try:
                src = open_source(spec.source, input_size=cfg.input_size, fps_limit=cfg.fps_limit,
                                  timeout_s=cfg.read_timeout_s, open_timeout_s=cfg.open_timeout_s,
                                  capture_factory=capture_factory) if own else spec.source
                meter = _Outages(src)
                cb = (lambda frame, info: on_frame(i, frame, info)) if on_frame is not None else None
                loc = localizer(i, cfg) if localizer is not None else None
                with Grader(backend, preprocess, classes, cfg, model=model, source=src.uri, localizer=loc,
                            block_views=not src.live, worker=batcher.port(i, cfg.queue_depth), lane=i) as g:
                    _log.info("lane %d (%s): %s", i, spec.name, g.source)
                    mine = _LaneSinks(sinks, lock, videos[i])
                    try:
                        res.summary = _run(g, meter, mine, stop, cb)
                    except BaseException as exc:
                        _salvage(g, mine, exc)
                        raise
                    finally:
                        meter.end()
                        res.outages, res.outage_s = meter.count, meter.seconds
            except SourceError as e:  # this lane's camera or file: the other lanes go on
                res.error = str(e)
                _log.error("lane %d (%s) ended: %s", i, spec.name, e)
            except BaseException as e:  # noqa: BLE001 -- the backend's fault (or a bug): raised after all lanes end
                res.error = f"{type(e).__name__}: {e}"
                fatal.append(e)
                stop.set()
            finally:
                if own and src is not None:
                    src.close()
                if videos[i] is not None:  # the lane's video ends with the lane (a file is whole at once)
                    videos[i].close()
                    res.video = videos[i].report()[0]

        threads = [threading.Thread(target=lane_main, args=(i,), name=f"mnet-lane[{i}]", daemon=True)
                   for i in range(len(lanes))]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(timeout=_POLL_S * 4)
        except BaseException:  # a second Ctrl-C: the lanes stop at their next frame and write what is voted
            stop.set()
            for t in threads:
                t.join(timeout=_SALVAGE_WAIT_S)
            raise
    finally:
        try:
            if batcher is not None:
                batcher.close()
        finally:
            for video in videos:  # those whose lane never ran (closing twice does nothing)
                if video is not None:
                    video.close()
            sinks.close()
    summary = LanesSummary(results, run_id, time.perf_counter() - start,
                           batcher.stats() if batcher is not None else {}, stopped=stop.is_set())
    if fatal:  # the lane whose call failed has the backend's own error; the others only saw the worker stop
        cause = batcher.error if batcher is not None else None
        raise next((e for e in fatal if cause is not None and (e is cause or e.__cause__ is cause)), fatal[0])
    agg = summary.aggregate()
    _log.info("graded %d fruit on %d lane(s) from %d frames in %.1f s (%.1f fps processed, %d dropped)",
              agg["fruit_graded"], len(lanes), agg["frames_processed"], agg["wall_s"], agg["processed_fps"],
              agg["frames_dropped"])
    return summary

