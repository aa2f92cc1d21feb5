"""The live view: an HTTP server inside the grading process (`mnet grade ... --serve 127.0.0.1:8080`).

    with LiveView(ServeConfig.parse("127.0.0.1:8080"), backend="onnxruntime", precision="fp32") as view:
        grade(view.watch(net), ..., sinks=Sinks([..., view.sink()]), on_frame=view.on_frame)
    # several lanes: LiveView(..., lanes=[("left", uri), ("right", uri)]), grade_lanes(..., on_frame=view.on_lane_frame)

serves
- `/`                    a small page: the annotated video, live counters, the lanes, the last events
- `/stream.mjpg`         the annotated video as MJPEG (multipart/x-mixed-replace), at most `stream_fps`:
                         one lane's frames as they are; several lanes tiled into one mosaic (DeepStream's
                         tiler), so a page holds one connection whatever the number of lanes (a browser
                         opens at most 6 to a host)
- `/stream.mjpg?lane=N`  lane N alone, full size (the page's `?lane=N`)
- `/status.json`         fps, stage p50/p99, graded per grade, dropped, views, infer errors, backend, last
                         events, and the same per lane
- `/metrics`             Prometheus text format (prometheus_client, a registry of its own; per-lane series
                         carry a `lane` label, the lane's name)
- `/healthz`             200 while every lane's frames arrive, 503 once one had none for `stall_s`

The grading threads pay for none of the drawing nor the counting: `on_frame` only keeps a reference
to the lane's newest frame and its FrameInfo (an older one not yet encoded is simply replaced) and
queues the FrameInfo for the counters; `sink()`, one of the run's sinks, queues every event (also
those the end-of-source flush emits after the last frame). One encoder thread folds those queues into
the counters and metrics twice a second (and every request does before it answers), and annotates and
JPEG-encodes the newest frames only of the streams somebody watches: with nobody watching, no frame is
ever copied, drawn or encoded. Views, inference errors and inference latency are not in FrameInfo;
`watch(backend)` wraps the (shared) backend to count them, so the grading loop needs no hook of its own.

Anything but a loopback address needs a token (`Authorization: Bearer TOKEN` or `?token=TOKEN`); once a
token is set, every request without it gets 401.
"""

from __future__ import annotations

import collections
import hmac
import html
import ipaddress
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np
from mnet.runtime.grader import FrameInfo
from mnet.runtime.sinks import Sink, annotate, text_on_box
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

from mnet.errors import ConfigError
from mnet.events import GradeEvent

__all__ = ["LiveView", "ServeConfig"]

_log = logging.getLogger(__name__)

_BOUNDARY = "mnetframe"
_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_STAGE_WINDOW = 1000  # frames behind the page's p50/p99 (Prometheus keeps the whole run in its histogram)
_MOSAIC_WIDTH = 1280  # the mosaic's tiles are scaled down to fit this many pixels across


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port (LiveView.url says which)
    token: str | None = None  # required on every request when set; required to bind anything but loopback
    stall_s: float = 5.0  # /healthz says 503 once no frame came for this long (counted from the start)
    stream_fps: float = 15.0  # at most this many JPEGs a second, whatever the grading rate
    # drawing and encoding take at most this share of one core: where a JPEG costs more (a loaded or slow
    # CPU, a mosaic of many lanes) the stream's frame rate gives way, not the grading (bench/live_view.py)
    cpu_share: float = 0.04
    jpeg_quality: int = 80
    events: int = 20  # last events on the page and in /status.json

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"serve port = {self.port}: expected 0..65535 (0 = any free port)")
        if self.token is not None and not self.token.strip():
            raise ConfigError("serve token is empty: give a non-empty --serve-token (or $MNET_SERVE_TOKEN), or none")
        if not _is_loopback(self.host) and not self.token:
            raise ConfigError(f"serve = {self.host}:{self.port} is reachable from other machines: give a token "
                              "(--serve-token or $MNET_SERVE_TOKEN), or serve on 127.0.0.1")
        if self.stall_s <= 0 or self.stream_fps <= 0 or not 1 <= self.jpeg_quality <= 100 or \
                not 0 < self.cpu_share <= 1:
            raise ConfigError(f"serve stall_s = {self.stall_s}, stream_fps = {self.stream_fps}, jpeg_quality = "
                              f"{self.jpeg_quality}, cpu_share = {self.cpu_share}: expected positive times, a "
                              "quality in 1..100 and a share in (0, 1]")

    @classmethod
    def parse(cls, text: str, token: str | None = None, **kw: Any) -> ServeConfig:
        """'HOST:PORT', '[IPv6]:PORT', ':PORT' or 'PORT' (host 127.0.0.1)."""
        text = text.strip()
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = "", text
        host = host.strip("[]") or "127.0.0.1"
        try:
            return cls(host=host, port=int(port), token=token or None, **kw)
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"serve = {text!r}: expected HOST:PORT such as 127.0.0.1:8080") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


class _StageLatency:
    """`mnet_stage_latency_seconds`, a Prometheus histogram per stage, filled in batches: values are
    queued (a list append per value) and folded into the buckets with numpy when the view counts
    (`LiveView._drain`) or Prometheus scrapes, instead of one locked observe() per value per frame."""

    name = "mnet_stage_latency_seconds"
    help = "Per-stage latency: per frame (capture, localise, preprocess, track, wait), infer per backend call"

    def __init__(self, buckets_s: tuple[float, ...]) -> None:
        self.bounds = np.asarray(buckets_s, np.float64)
        self._le = [floatToGoString(b) for b in buckets_s] + ["+Inf"]
        self._counts: dict[str, np.ndarray] = {}
        self._sums: dict[str, float] = {}
        self._queued: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def add(self, values_ms: dict[str, list[float]]) -> None:
        """Queue values in milliseconds, by stage."""
        with self._lock:
            for stage, v in values_ms.items():
                self._queued.setdefault(stage, []).extend(v)

    def fold(self) -> None:
        with self._lock:
            queued, self._queued = self._queued, {}
            for stage, q in queued.items():
                a = np.asarray(q, np.float64) / 1e3
                # bucket i counts bounds[i-1] < v <= bounds[i] (Prometheus "le"); the last one is +Inf
                hist = np.bincount(np.searchsorted(self.bounds, a, side="left"), minlength=len(self.bounds) + 1)
                self._counts[stage] = self._counts.get(stage, 0) + hist
                self._sums[stage] = self._sums.get(stage, 0.0) + float(a.sum())

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.help, labels=["stage"])]

    def collect(self) -> list[HistogramMetricFamily]:
        self.fold()
        fam = HistogramMetricFamily(self.name, self.help, labels=["stage"])
        with self._lock:
            for stage, counts in self._counts.items():
                cum = np.cumsum(counts)
                fam.add_metric([stage], list(zip(self._le, (float(c) for c in cum))), self._sums[stage])
        return [fam]


class _Metrics:
    """The Prometheus side: a registry of its own (never the process-wide default one). What a lane
    does is labelled with its name; inference (one worker for every lane) is not."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.frames = Counter("mnet_frames_processed", "Frames graded", ["lane"], registry=r)
        self.dropped = Counter("mnet_frames_dropped", "Frames the source dropped (the loop was behind)", ["lane"],
                               registry=r)
        self.fruit = Counter("mnet_fruit_graded", "Fruit graded, by grade", ["lane", "grade"], registry=r)
        self.views = Counter("mnet_views", "Crops classified (backend rows), warm-up excluded", registry=r)
        self.infer_errors = Counter("mnet_infer_errors", "Backend calls that raised (retries included)", registry=r)
        self.encodes = Counter("mnet_live_view_jpeg_encodes", "Frames encoded for the live view", registry=r)
        self.fps = Gauge("mnet_fps", "Processed frames per second (last second or so)", ["lane"], registry=r)
        self.input_fps = Gauge("mnet_input_fps", "Frames the source produced per second", ["lane"], registry=r)
        self.viewers = Gauge("mnet_live_view_viewers", "Clients watching a /stream.mjpg", registry=r)
        self.age = Gauge("mnet_last_frame_age_seconds", "Seconds since the lane's last processed frame", ["lane"],
                         registry=r)
        self.info = Info("mnet_grading", "What is grading", registry=r)
        self.stage = _StageLatency(_LATENCY_BUCKETS_S)
        r.register(self.stage)


class _Watched:
    """A backend that counts for the live view what FrameInfo does not carry: views, errors, infer time."""

    def __init__(self, inner: Any, view: LiveView, warmup: bool) -> None:
        self._inner, self._view, self._skip = inner, view, warmup
        self.name = inner.name

    def infer(self, x: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            out = self._inner.infer(x)
        except Exception:
            if not self._skip:
                self._view._infer_done(0, None)
            raise
        if self._skip:  # the grader's warm-up call on a blank crop: not a view (as in GradeSummary)
            self._skip = False
        else:
            self._view._infer_done(len(x), (time.perf_counter() - t0) * 1e3)
        return out

    def __getattr__(self, name: str) -> Any:  # describe(), close(), max_batch, ...: the backend's own
        return getattr(self._inner, name)


class _EventTap(Sink):
    """The view's place among the run's sinks: every event, also those the end-of-source flush emits
    after the last frame (FrameInfo never carries them). Not a store of events: Sinks does not count
    it when it asks whether any sink is left to keep them (`stores`)."""

    name = "live view"
    stores = False

    def __init__(self, view: LiveView) -> None:
        self._view = view

    def start(self, classes: Sequence[str]) -> None:
        self._view._set_classes(classes)

    def write(self, event: GradeEvent) -> None:
        self._view._pending_events.append(event)  # counted off this thread, by _drain

    def close(self) -> None:
        pass  # the view outlives the sinks: it keeps answering until the CLI closes it


@dataclass
class _Lane:
    """One lane as the view sees it (written by that lane's thread in on_frame, read by the encoder)."""

    name: str
    source: str
    latest: tuple[np.ndarray, FrameInfo] | None = None
    seq: int = 0  # frames handed over
    last_frame: float | None = None  # time.monotonic() of the last one
    frames: int = 0
    dropped: int = 0
    graded: int = 0
    fps: float = 0.0
    input_fps: float = 0.0
    grades: dict[str, int] = field(default_factory=dict)
    tile: tuple[int, np.ndarray] | None = None  # (seq, annotated tile) for the mosaic: a lane without a
    # new frame is not drawn again


@dataclass
class _Channel:
    """One MJPEG stream: a lane's annotated video (key: its index) or the mosaic of all lanes (key None)."""

    viewers: int = 0
    jpeg: bytes | None = None
    seq: int = 0  # JPEGs made
    stamp: Any = None  # the lane frame(s) the JPEG shows: nothing new, nothing encoded
    due: float = 0.0  # time.monotonic() before which no new JPEG (the stream_fps cap)


class LiveView:
    """The HTTP server and its state; `on_frame` (`on_lane_frame` for several lanes) is the grading
    loop's callback and `sink()` its place among the run's sinks. A context manager."""

    def __init__(self, config: ServeConfig = ServeConfig(), *, backend: str = "", precision: str = "",
                 model: str = "", source: str = "", lanes: Sequence[tuple[str, str]] | None = None) -> None:
        """`lanes`: (name, source) per lane of a multi-source run (default: one lane, "lane0", `source`)."""
        self.config = config
        self.about = {"backend": backend, "precision": precision, "model": model, "source": source}
        self.lanes = [_Lane(name, src) for name, src in (lanes or [("lane0", source)])]
        if not self.lanes or len({lane.name for lane in self.lanes}) != len(self.lanes):
            raise ConfigError(f"live view lanes = {[lane.name for lane in self.lanes]!r}: expected distinct names")
        self.metrics = _Metrics()
        self.metrics.info.info(self.about)
        self.encodes = 0  # JPEGs made: 0 while nobody watches
        self.encode_cpu_s = 0.0  # CPU seconds the encoder thread spent drawing and encoding
        self.stream_cpu_s = 0.0  # CPU seconds the stream handlers spent sending
        self.drain_cpu_s = 0.0  # CPU seconds the encoder thread spent counting (see _drain)
        self._lock = threading.Lock()  # the counters below: the encoder thread, the handlers, the inference worker
        self._started = time.monotonic()
        self._views = self._infer_errors = 0
        self._classes: tuple[str, ...] = ()
        self._stages: dict[str, collections.deque[float]] = {}
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=config.events)
        self._pending: collections.deque[tuple[_Lane, FrameInfo]] = collections.deque()  # not yet counted
        self._pending_events: collections.deque[GradeEvent] = collections.deque()
        self._channels: dict[int | None, _Channel] = {None: _Channel(), **{i: _Channel() for i in range(len(self.lanes))}}
        self._viewers = 0
        self._wake_at = math.inf  # the grading threads wake the encoder from then on (a watched stream is due)
        self._fresh = threading.Event()
        self._jpeg_ready = threading.Condition()
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        for lane in self.lanes:  # every lane's series from the start, 0 until it grades
            for metric in (self.metrics.frames, self.metrics.dropped, self.metrics.fps, self.metrics.input_fps):
                metric.labels(lane.name)
            self.metrics.age.labels(lane.name).set_function(lambda lane=lane: self._age(lane))
        self.metrics.viewers.set_function(lambda: self._viewers)

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> LiveView:
        cfg = self.config
        server_cls = _Server6 if ":" in cfg.host else _Server
        try:
            self._server = server_cls((cfg.host, cfg.port), _Handler)
        except OSError as e:
            raise ConfigError(f"serve = {cfg.host}:{cfg.port}: cannot listen there ({e.strerror or e}); "
                              "choose another port or host") from None
        self._server.view = self
        self._threads = [threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                          name="mnet-serve", daemon=True),
                         threading.Thread(target=self._encode_loop, name="mnet-serve-jpeg", daemon=True)]
        for t in self._threads:
            t.start()
        _log.info("live view on %s", self.url)
        return self

    def close(self) -> None:
        self._closing.set()
        self._fresh.set()
        with self._jpeg_ready:
            self._jpeg_ready.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> LiveView:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "start() first"
        return self._server.server_address[0], self._server.server_address[1]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def watch(self, backend: Any, *, warmup: bool = True) -> _Watched:
        """`backend`, counting views, inference errors and latency for this view (`warmup`: the grader's
        first call is its warm-up, not counted, as in GradeSummary)."""
        return _Watched(backend, self, warmup)

    def sink(self) -> Sink:
        """Add this to the run's Sinks: the view counts grades from the events themselves."""
        return _EventTap(self)

    # ------------------------------------------------------------------------------------ grading side
    def on_frame(self, frame: np.ndarray, info: FrameInfo, lane: int = 0) -> None:
        """The grading loop's callback: hand over the frame and its info, nothing else (about a microsecond).
        Counters and metrics are brought up to date off this thread (`_drain`): twice a second by the
        encoder thread and before every /status.json or /metrics answer."""
        st = self.lanes[lane]
        st.latest = (frame, info)  # replaces a frame the encoder has not taken yet: only the newest matters
        st.seq += 1
        st.last_frame = now = time.monotonic()
        self._pending.append((st, info))
        if self._viewers and now >= self._wake_at:
            self._fresh.set()

    def on_lane_frame(self, lane: int, frame: np.ndarray, info: FrameInfo) -> None:
        """`on_frame` in runtime/lanes.py's argument order."""
        self.on_frame(frame, info, lane)

    def _set_classes(self, classes: Sequence[str]) -> None:
        """Every class shown from the start, 0 until graded (as in GradeSummary)."""
        with self._lock:
            self._classes = tuple(str(c) for c in classes)
            for st in self.lanes:
                for c in self._classes:
                    st.grades.setdefault(c, 0)
                    self.metrics.fruit.labels(st.name, c)

    def _drain(self) -> None:
        """Fold the FrameInfos and events handed over since the last call into the counters and metrics."""
        m = self.metrics
        latency: dict[str, list[float]] = collections.defaultdict(list)
        with self._lock:
            touched: set[int] = set()
            while True:
                try:
                    st, info = self._pending.popleft()
                except IndexError:
                    break
                frames = info.index + 1
                if frames > st.frames:
                    m.frames.labels(st.name).inc(frames - st.frames)
                if info.dropped > st.dropped:
                    m.dropped.labels(st.name).inc(info.dropped - st.dropped)
                st.frames, st.dropped = max(st.frames, frames), max(st.dropped, info.dropped)
                st.fps, st.input_fps = info.fps, info.input_fps
                touched.add(id(st))
                for stage, ms in info.stage_ms.items():
                    window = self._stages.get(stage)
                    if window is None:
                        window = self._stages[stage] = collections.deque(maxlen=_STAGE_WINDOW)
                    window.append(ms)
                    latency[stage].append(ms)
            while True:
                try:
                    e = self._pending_events.popleft()
                except IndexError:
                    break
                st = self.lanes[e.lane or 0] if (e.lane or 0) < len(self.lanes) else self.lanes[0]
                st.graded += 1
                st.grades[e.grade] = st.grades.get(e.grade, 0) + 1
                self._events.append({"fruit_id": e.fruit_id, "grade": e.grade, "confidence": round(e.confidence, 4),
                                     "views": e.views, "lane": e.lane or 0, "lane_name": st.name,
                                     "ts": round(e.last_ts, 3), "reason": e.reason})
                m.fruit.labels(st.name, e.grade).inc()
            for st in self.lanes:
                if id(st) in touched:
                    m.fps.labels(st.name).set(st.fps)
                    m.input_fps.labels(st.name).set(st.input_fps)
        m.stage.add(latency)
        m.stage.fold()

    def _infer_done(self, rows: int, ms: float | None) -> None:
        """From the backend wrapper, on the inference worker: rows classified, or an error (ms None)."""
        with self._lock:
            if ms is None:
                self._infer_errors += 1
            else:
                self._views += rows
                window = self._stages.get("infer")
                if window is None:
                    window = self._stages["infer"] = collections.deque(maxlen=_STAGE_WINDOW)
                window.append(ms)
        if ms is None:
            self.metrics.infer_errors.inc()
        else:
            self.metrics.views.inc(rows)
            self.metrics.stage.add({"infer": [ms]})

    # ------------------------------------------------------------------------------------ encoder thread
    def _encode_loop(self) -> None:
        """Counts twice a second; while somebody watches a stream, annotates and encodes its newest frame
        (a lane's, or every lane's tiled into the mosaic) at most `stream_fps` times a second."""
        cfg = self.config
        params = [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality]
        cost: dict[int | None, float] = {}  # CPU seconds per JPEG of each stream (a moving average)
        last_drain = -math.inf
        while not self._closing.is_set():
            self._fresh.wait(0.5)
            self._fresh.clear()
            if self._closing.is_set():
                return
            now = time.monotonic()
            if now - last_drain >= 0.5 or not self._viewers:
                cpu0 = time.thread_time()
                self._drain()  # the counters, off the grading thread
                self.drain_cpu_s += time.thread_time() - cpu0
                last_drain = now
            wake_at = math.inf
            for key, ch in list(self._channels.items()):
                if not ch.viewers:
                    continue
                if now < ch.due:
                    wake_at = min(wake_at, ch.due)
                    continue
                stamp = self._stamp(key)
                if stamp == ch.stamp:
                    wake_at = now  # due, nothing new: the next frame wakes this thread
                    continue
                t0, cpu0 = time.monotonic(), time.thread_time()
                try:
                    img = self._compose(key)
                    ok, buf = cv2.imencode(".jpg", img, params) if img is not None else (False, None)
                except Exception:  # a drawing or encoding bug must not end the view (nor the grading)
                    _log.exception("live view: a frame could not be encoded")
                    ok = False
                spent = time.thread_time() - cpu0
                self.encode_cpu_s += spent
                cost[key] = spent if key not in cost else 0.8 * cost[key] + 0.2 * spent
                # every watched stream gets its share of the CPU budget, none more than stream_fps
                watched = sum(1 for c in self._channels.values() if c.viewers)
                ch.stamp = stamp
                ch.due = t0 + max(1.0 / cfg.stream_fps, watched * cost[key] / cfg.cpu_share)
                wake_at = min(wake_at, ch.due)
                if ok:
                    with self._jpeg_ready:
                        ch.jpeg, ch.seq = buf.tobytes(), ch.seq + 1
                        self._jpeg_ready.notify_all()
                    self.encodes += 1
                    self.metrics.encodes.inc()
            self._wake_at = wake_at

    def _stamp(self, key: int | None) -> Any:
        return self.lanes[key].seq if key is not None else tuple(st.seq for st in self.lanes)

    def _compose(self, key: int | None) -> np.ndarray | None:
        """The annotated frame of lane `key`, or the mosaic: every lane's, scaled into a grid (one lane:
        its frame as it is). None while no lane has a frame."""
        if key is not None or len(self.lanes) == 1:
            item = self.lanes[key or 0].latest
            return None if item is None else annotate(*item)
        sizes = [st.latest[0].shape[:2] for st in self.lanes if st.latest is not None]
        if not sizes:
            return None
        cols = math.ceil(math.sqrt(len(self.lanes)))
        rows = math.ceil(len(self.lanes) / cols)
        fh, fw = max(sizes, key=lambda hw: hw[0] * hw[1])
        tw = min(fw, _MOSAIC_WIDTH // cols)
        th = max(1, round(fh * tw / fw))
        mosaic = np.zeros((rows * th, cols * tw, 3), np.uint8)
        for i, st in enumerate(self.lanes):
            item, seq = st.latest, st.seq
            if item is None:
                tile = np.full((th, tw, 3), 40, np.uint8)
                text_on_box(tile, f"{st.name}: waiting for frames", (6, th // 2), (200, 200, 200))
            elif st.tile is not None and st.tile[0] == seq and st.tile[1].shape[:2] == (th, tw):
                tile = st.tile[1]
            else:  # scaled to fit its tile, never up (a small camera's text would grow), centred
                img = annotate(*item)
                if img.ndim == 2:
                    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
                h, w = img.shape[:2]
                f = min(tw / w, th / h, 1.0)
                if f < 1.0:
                    img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
                    h, w = img.shape[:2]
                tile = np.full((th, tw, 3), 40, np.uint8)
                y0, x0 = (th - h) // 2, (tw - w) // 2
                tile[y0:y0 + h, x0:x0 + w] = img
                text_on_box(tile, st.name, (max(6, tw - 10 - 9 * len(st.name)), 18), (0, 255, 255))
                st.tile = (seq, tile)
            r, c = divmod(i, cols)
            mosaic[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tile
        return mosaic

    def _next_jpeg(self, key: int | None, after: int, timeout: float) -> tuple[bytes | None, int]:
        """The newest JPEG of stream `key` newer than sequence number `after` (None on timeout or close)."""
        ch = self._channels[key]
        with self._jpeg_ready:
            self._jpeg_ready.wait_for(lambda: ch.seq > after or self._closing.is_set(), timeout)
            if ch.seq > after and not self._closing.is_set():
                return ch.jpeg, ch.seq
            return None, after

    def _add_viewer(self, key: int | None, delta: int) -> None:
        with self._lock:
            self._channels[key].viewers += delta
            self._viewers += delta
        if delta > 0:
            self._wake_at = 0.0
            self._fresh.set()  # the newest frame at once, not at the next one (the source may be stalled)

    # ------------------------------------------------------------------------------------ read side
    def _age(self, lane: _Lane | None = None) -> float:
        """Seconds since a lane's last frame (the start, before its first); no lane: the stalest one."""
        if lane is None:
            return max(self._age(st) for st in self.lanes)
        last = lane.last_frame
        return time.monotonic() - (last if last is not None else self._started)

    def healthy(self) -> bool:
        """Every lane had a frame within `stall_s` (the first one is awaited that long after the start)."""
        return self._age() <= self.config.stall_s

    def status(self) -> dict[str, Any]:
        self._drain()
        with self._lock:
            windows = {k: np.fromiter(v, np.float64, len(v)) for k, v in self._stages.items() if v}
            lanes = [{"lane": i, "name": st.name, "source": st.source, "frames": st.frames,
                      "fps": round(st.fps, 2), "input_fps": round(st.input_fps, 2), "dropped": st.dropped,
                      "graded": st.graded, "grades": dict(st.grades), "viewers": self._channels[i].viewers}
                     for i, st in enumerate(self.lanes)]
            grades: dict[str, int] = dict.fromkeys(self._classes, 0)
            for st in self.lanes:
                for g, n in st.grades.items():
                    grades[g] = grades.get(g, 0) + n
            s = {**self.about, "frames": sum(st.frames for st in self.lanes),
                 "fps": round(sum(st.fps for st in self.lanes), 2),
                 "input_fps": round(sum(st.input_fps for st in self.lanes), 2),
                 "dropped": sum(st.dropped for st in self.lanes), "graded": sum(st.graded for st in self.lanes),
                 "grades": grades, "views": self._views, "infer_errors": self._infer_errors,
                 "events": list(self._events)[::-1], "viewers": self._viewers}
        for d, st in zip(lanes, self.lanes):
            d["last_frame_age_s"] = round(self._age(st), 3)
            d["healthy"] = d["last_frame_age_s"] <= self.config.stall_s
        stages = {}
        for k, a in windows.items():
            p50, p99 = np.percentile(a, [50, 99])
            stages[k] = {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}
        return {**s, "stages": stages, "encodes": self.encodes, "last_frame_age_s": round(self._age(), 3),
                "healthy": self.healthy(), "lanes": lanes}


# ---------------------------------------------------------------------------------------------- HTTP
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a viewer that stopped reading must not hold up the end of the run
    view: LiveView


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds a blocked write may take: a viewer that stopped reading is let go
    server_version = "mnet-live"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        _log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        view = self.server.view
        url = urlsplit(self.path)
        if not self._authorised(view.config.token, url.query):
            self._send(HTTPStatus.UNAUTHORIZED, b"token required: Authorization: Bearer TOKEN or ?token=TOKEN\n",
                       "text/plain; charset=utf-8", {"WWW-Authenticate": 'Bearer realm="mnet"'})
            return
        route = url.path
        if route in ("/", "/index.html"):
            self._send(HTTPStatus.OK, _page(view).encode(), "text/html; charset=utf-8")
        elif route == "/status.json":
            self._send(HTTPStatus.OK, json.dumps(view.status()).encode(), "application/json")
        elif route == "/metrics":
            view._drain()
            self._send(HTTPStatus.OK, generate_latest(view.metrics.registry), CONTENT_TYPE_LATEST)
        elif route == "/healthz":
            ok = view.healthy()
            if len(view.lanes) == 1:
                body = f"{'ok' if ok else 'stalled'}: last frame {view._age():.1f} s ago\n".encode()
            else:  # which lane is stalled, and every lane's age
                ages = {st.name: view._age(st) for st in view.lanes}
                stalled = [n for n, a in ages.items() if a > view.config.stall_s]
                body = (f"{'ok' if ok else 'stalled: ' + ', '.join(stalled)}; last frame "
                        + ", ".join(f"{n} {a:.1f} s" for n, a in ages.items()) + " ago\n").encode()
            self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body, "text/plain; charset=utf-8")
        elif route == "/stream.mjpg":
            lane = (parse_qs(url.query).get("lane") or [None])[0]
            if lane is None:
                self._stream(view, None)
            elif lane.isdigit() and int(lane) < len(view.lanes):
                self._stream(view, int(lane))
            else:
                self._send(HTTPStatus.NOT_FOUND, f"no lane {lane!r}: lanes are 0..{len(view.lanes) - 1}\n".encode(),
                           "text/plain; charset=utf-8")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def _authorised(self, token: str | None, query: str) -> bool:
        if token is None:
            return True
        auth = self.headers.get("Authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if given is None:
            given = (parse_qs(query).get("token") or [None])[0]
        return given is not None and hmac.compare_digest(given.encode(), token.encode())

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, view: LiveView, lane: int | None) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={_BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        view._add_viewer(lane, 1)
        try:
            seq = 0
            while not view._closing.is_set():
                jpeg, seq = view._next_jpeg(lane, seq, timeout=1.0)
                if jpeg is None:
                    continue
                cpu0 = time.thread_time()
                self.wfile.write(b"--%s\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n"
                                 % (_BOUNDARY.encode(), len(jpeg), jpeg))
                self.wfile.flush()
                view.stream_cpu_s += time.thread_time() - cpu0  # several viewers: an estimate (no lock)
        except (OSError, ValueError):  # the viewer went away (reset, broken pipe, timeout, closed file)
            pass
        finally:
            view._add_viewer(lane, -1)
            self.close_connection = True


def _page(view: LiveView) -> str:
    where = view.about["source"] if len(view.lanes) == 1 else f"{len(view.lanes)} lanes"
    title = html.escape(" · ".join(v for v in (view.about["model"], where) if v) or "mnet grade")
    return _PAGE.replace("{title}", title)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mnet grade: {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px system-ui,sans-serif;margin:0;background:#15171a;color:#e6e6e6}
 header{padding:8px 14px;background:#23262b;display:flex;gap:16px;align-items:baseline}
 header b{font-size:16px} .ok{padding:2px 8px;border-radius:4px;background:#2e7d32}
 .bad{padding:2px 8px;border-radius:4px;background:#c62828} main{display:flex;gap:14px;padding:14px;flex-wrap:wrap}
 #view{flex:1 1 640px;min-width:0} #side{flex:0 0 auto}
 #video{max-width:100%;background:#000;border:1px solid #333;min-width:320px;min-height:240px}
 table{border-collapse:collapse} td,th{padding:2px 10px 2px 0;text-align:left;font-variant-numeric:tabular-nums}
 th{color:#9aa} h3{margin:10px 0 4px;font-size:14px;color:#9aa} .num{text-align:right} a{color:#8cf}
</style></head><body>
<header><b>mnet grade</b><span>{title}</span><span id="shown"></span><span id="about"></span>
<span id="health" class="ok">…</span></header>
<main>
 <div id="view"><img id="video" alt="annotated video (appears while frames arrive)"><div id="lanes-box" hidden>
  <h3>lanes</h3><table id="lanes"></table></div></div>
 <div id="side">
  <h3>counters</h3><table id="counters"></table>
  <h3>graded per grade</h3><table id="grades"></table>
  <h3>stage latency (ms)</h3><table id="stages"><tr><th>stage</th><th class="num">p50</th><th class="num">p99</th></tr></table>
  <h3>last events</h3><table id="events"></table>
 </div>
</main>
<script>
// One MJPEG connection per page (a browser opens at most 6 to a host): the mosaic of every lane, or
// with ?lane=N that lane alone. location.search carries ?token=... on to every request of the page.
const q = new URLSearchParams(location.search);
const lane = q.get("lane");
const token = q.get("token");
const url = (path, extra) => {
  const p = new URLSearchParams(extra || {}); if (token) p.set("token", token);
  const s = p.toString(); return s ? `${path}?${s}` : path;
};
document.getElementById("video").src = url("stream.mjpg", lane === null ? {} : {lane});
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
const rows = (pairs) => pairs.map(([k, v]) => `<tr><td>${esc(k)}</td><td class="num">${esc(v)}</td></tr>`).join("");
async function tick() {
  try {
    const s = await (await fetch(url("status.json"), {cache: "no-store"})).json();
    document.getElementById("about").textContent = `${s.backend} ${s.precision}`;
    const h = document.getElementById("health");
    const stalled = s.lanes.filter(l => !l.healthy).map(l => l.name);
    h.textContent = s.healthy ? "running" : (s.lanes.length > 1 ? `stalled: ${stalled.join(", ")}` :
      `stalled ${s.last_frame_age_s.toFixed(0)} s`);
    h.className = s.healthy ? "ok" : "bad";
    if (s.lanes.length > 1) {
      document.getElementById("lanes-box").hidden = false;
      const shown = lane === null ? null : s.lanes[Number(lane)];
      document.getElementById("shown").innerHTML = shown ? `lane ${esc(shown.name)} · <a href="${url("./")}">all lanes</a>` : "";
      document.getElementById("lanes").innerHTML = "<tr><th>lane</th><th>source</th><th class=num>fps</th>" +
        "<th class=num>graded</th><th class=num>dropped</th><th></th></tr>" + s.lanes.map(l =>
        `<tr><td><a href="${url("./", {lane: l.lane})}">${esc(l.name)}</a></td><td>${esc(l.source)}</td>` +
        `<td class="num">${l.fps.toFixed(1)}</td><td class="num">${l.graded}</td><td class="num">${l.dropped}</td>` +
        `<td><span class="${l.healthy ? "ok" : "bad"}">${l.healthy ? "ok" : "stalled"}</span></td></tr>`).join("");
    }
    document.getElementById("counters").innerHTML = rows([["fps", s.fps.toFixed(1)],
      ["input fps", s.input_fps.toFixed(1)], ["frames", s.frames], ["graded", s.graded],
      ["dropped", s.dropped], ["views", s.views], ["infer errors", s.infer_errors], ["viewers", s.viewers]]);
    document.getElementById("grades").innerHTML = rows(Object.entries(s.grades));
    document.getElementById("stages").innerHTML = "<tr><th>stage</th><th class=num>p50</th><th class=num>p99</th></tr>" +
      Object.entries(s.stages).map(([k, v]) => `<tr><td>${esc(k)}</td><td class="num">${v.p50_ms.toFixed(2)}</td>` +
        `<td class="num">${v.p99_ms.toFixed(2)}</td></tr>`).join("");
    const many = s.lanes.length > 1;
    document.getElementById("events").innerHTML = s.events.map(e => `<tr>${many ? `<td>${esc(e.lane_name)}</td>` : ""}` +
      `<td>#${e.fruit_id}</td><td>${esc(e.grade)}</td><td class="num">${e.confidence.toFixed(2)}</td>` +
      `<td>${e.views ?? ""} views</td><td>${e.reason ? esc(e.reason) : ""}</td></tr>`).join("");
  } catch (err) {
    const h = document.getElementById("health"); h.textContent = "no connection"; h.className = "bad";
  }
}
tick(); setInterval(tick, 500);
</script></body></html>
"""
