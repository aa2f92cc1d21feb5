"""The live view: an HTTP server inside the grading process (`mnet grade ... --serve 127.0.0.1:8080`).

    with LiveView(ServeConfig.parse("127.0.0.1:8080"), backend="onnxruntime", precision="fp32") as view:
        grade(view.watch(net), ..., on_frame=view.on_frame)

serves
- `/`             a small page: the annotated video, live counters and the last events (polls /status.json)
- `/stream.mjpg`  the annotated video as MJPEG (multipart/x-mixed-replace), at most `stream_fps`
- `/status.json`  fps, stage p50/p99, graded per grade, dropped, views, infer errors, backend, last events
- `/metrics`      Prometheus text format (prometheus_client, a registry of its own)
- `/healthz`      200 while frames arrive, 503 once none came for `stall_s` (a watchdog's check)

The grading thread pays for none of the drawing nor the counting: `on_frame` only keeps a reference
to the newest frame and its FrameInfo (an older one not yet encoded is simply replaced) and queues the
FrameInfo for the counters. One encoder thread folds that queue into the counters and metrics twice a
second (and every request does before it answers), and annotates and JPEG-encodes the newest frame,
only while a viewer is connected: with nobody watching, no frame is ever copied, drawn or encoded. Views, inference errors and inference
latency are not in FrameInfo; `watch(backend)` wraps the backend to count them, so the grading loop
needs no hook of its own.

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
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np
from mnet.runtime.grader import FrameInfo
from mnet.runtime.sinks import annotate
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

from mnet.errors import ConfigError

__all__ = ["LiveView", "ServeConfig"]

_log = logging.getLogger(__name__)

_BOUNDARY = "mnetframe"
_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_STAGE_WINDOW = 1000  # frames behind the page's p50/p99 (Prometheus keeps the whole run in its histogram)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port (LiveView.url says which)
    token: str | None = None  # required on every request when set; required to bind anything but loopback
    stall_s: float = 5.0  # /healthz says 503 once no frame came for this long (counted from the start)
    stream_fps: float = 15.0  # at most this many JPEGs a second, whatever the grading rate
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
        if self.stall_s <= 0 or self.stream_fps <= 0 or not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"serve stall_s = {self.stall_s}, stream_fps = {self.stream_fps}, jpeg_quality = "
                              f"{self.jpeg_quality}: expected positive times and a quality in 1..100")

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
    """The Prometheus side: a registry of its own (never the process-wide default one)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.frames = Counter("mnet_frames_processed", "Frames graded", registry=r)
        self.dropped = Counter("mnet_frames_dropped", "Frames the source dropped (the loop was behind)", registry=r)
        self.fruit = Counter("mnet_fruit_graded", "Fruit graded, by grade", ["grade"], registry=r)
        self.views = Counter("mnet_views", "Crops classified (backend rows), warm-up excluded", registry=r)
        self.infer_errors = Counter("mnet_infer_errors", "Backend calls that raised (retries included)", registry=r)
        self.encodes = Counter("mnet_live_view_jpeg_encodes", "Frames encoded for the live view", registry=r)
        self.fps = Gauge("mnet_fps", "Processed frames per second (last second or so)", registry=r)
        self.input_fps = Gauge("mnet_input_fps", "Frames the source produced per second", registry=r)
        self.viewers = Gauge("mnet_live_view_viewers", "Clients watching /stream.mjpg", registry=r)
        self.age = Gauge("mnet_last_frame_age_seconds", "Seconds since the last processed frame", registry=r)
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


class LiveView:
    """The HTTP server and its state; `on_frame` is the grading loop's callback. A context manager."""

    def __init__(self, config: ServeConfig = ServeConfig(), *, backend: str = "", precision: str = "",
                 model: str = "", source: str = "") -> None:
        self.config = config
        self.about = {"backend": backend, "precision": precision, "model": model, "source": source}
        self.metrics = _Metrics()
        self.metrics.info.info(self.about)
        self.encodes = 0  # JPEGs made: 0 while nobody watches
        self.encode_cpu_s = 0.0  # CPU seconds the encoder thread spent drawing and encoding
        self.stream_cpu_s = 0.0  # CPU seconds the stream handlers spent sending
        self.drain_cpu_s = 0.0  # CPU seconds the encoder thread spent counting (see _drain)
        self._lock = threading.Lock()  # the counters below: the encoder thread, the handlers, the inference worker
        self._started = time.monotonic()
        self._last_frame: float | None = None
        self._frames = self._dropped = self._graded = self._views = self._infer_errors = 0
        self._fps = self._input_fps = 0.0
        self._grades: dict[str, int] = {}
        self._stages: dict[str, collections.deque[float]] = {}
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=config.events)
        self._pending: collections.deque[FrameInfo] = collections.deque()  # handed over, not yet counted
        # frame hand-over: the grading thread replaces _latest; the encoder takes the newest when woken
        self._latest: tuple[np.ndarray, FrameInfo] | None = None
        self._fresh = threading.Event()
        self._viewers = 0
        self._jpeg: bytes | None = None
        self._jpeg_seq = 0
        self._jpeg_ready = threading.Condition()
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.metrics.age.set_function(self._age)
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

    # ------------------------------------------------------------------------------------ grading side
    def on_frame(self, frame: np.ndarray, info: FrameInfo) -> None:
        """The grading loop's callback: hand over the frame and its info, nothing else (about a microsecond).
        Counters and metrics are brought up to date off this thread (`_drain`): twice a second by the
        encoder thread and before every /status.json or /metrics answer."""
        self._latest = (frame, info)  # replaces a frame the encoder has not taken yet: only the newest matters
        self._last_frame = time.monotonic()
        self._pending.append(info)
        if self._viewers:
            self._fresh.set()

    def _drain(self) -> None:
        """Fold the FrameInfos handed over since the last call into the counters and the Prometheus metrics."""
        m = self.metrics
        latency: dict[str, list[float]] = collections.defaultdict(list)
        with self._lock:
            new_frames = new_dropped = 0
            while True:
                try:
                    info = self._pending.popleft()
                except IndexError:
                    break
                if not self._grades:  # every class shown from the first frame, 0 until graded (as in GradeSummary)
                    for c in info.classes:
                        self._grades.setdefault(c, 0)
                        m.fruit.labels(c)
                frames, dropped = info.index + 1, info.dropped
                new_frames += max(0, frames - self._frames)
                new_dropped += max(0, dropped - self._dropped)
                self._frames, self._dropped, self._graded = frames, dropped, info.graded
                self._fps, self._input_fps = info.fps, info.input_fps
                for stage, ms in info.stage_ms.items():
                    window = self._stages.get(stage)
                    if window is None:
                        window = self._stages[stage] = collections.deque(maxlen=_STAGE_WINDOW)
                    window.append(ms)
                    latency[stage].append(ms)
                for e in info.events:
                    self._grades[e.grade] = self._grades.get(e.grade, 0) + 1
                    self._events.append({"fruit_id": e.fruit_id, "grade": e.grade,
                                         "confidence": round(e.confidence, 4), "views": e.views, "lane": e.lane,
                                         "ts": round(e.last_ts, 3), "reason": e.reason})
                    m.fruit.labels(e.grade).inc()
            if new_frames:
                m.frames.inc(new_frames)
            if new_dropped:
                m.dropped.inc(new_dropped)
            m.fps.set(self._fps)
            m.input_fps.set(self._input_fps)
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
        cfg = self.config
        params = [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality]
        while not self._closing.is_set():
            fresh = self._fresh.wait(0.5)
            cpu0 = time.thread_time()
            self._drain()  # the counters, off the grading thread
            self.drain_cpu_s += time.thread_time() - cpu0
            if not fresh:
                continue
            self._fresh.clear()
            item = self._latest
            if item is None or not self._viewers or self._closing.is_set():
                continue
            t0, cpu0 = time.monotonic(), time.thread_time()
            try:
                frame, info = item
                ok, buf = cv2.imencode(".jpg", annotate(frame, info), params)
            except Exception:  # a drawing or encoding bug must not end the view (nor the grading)
                _log.exception("live view: a frame could not be encoded")
                ok = False
            self.encode_cpu_s += time.thread_time() - cpu0
            if ok:
                with self._jpeg_ready:
                    self._jpeg, self._jpeg_seq = buf.tobytes(), self._jpeg_seq + 1
                    self._jpeg_ready.notify_all()
                self.encodes += 1
                self.metrics.encodes.inc()
            self._closing.wait(max(0.0, 1.0 / cfg.stream_fps - (time.monotonic() - t0)))  # the stream's rate cap

    def _next_jpeg(self, after: int, timeout: float) -> tuple[bytes | None, int]:
        """The newest JPEG newer than sequence number `after` (None on timeout or close)."""
        with self._jpeg_ready:
            self._jpeg_ready.wait_for(lambda: self._jpeg_seq > after or self._closing.is_set(), timeout)
            if self._jpeg_seq > after and not self._closing.is_set():
                return self._jpeg, self._jpeg_seq
            return None, after

    def _add_viewer(self, delta: int) -> None:
        with self._lock:
            self._viewers += delta
        if delta > 0:
            self._fresh.set()  # the newest frame at once, not at the next one (the source may be stalled)

    # ------------------------------------------------------------------------------------ read side
    def _age(self) -> float:
        last = self._last_frame
        return time.monotonic() - (last if last is not None else self._started)

    def healthy(self) -> bool:
        """Frames arrived within `stall_s` (the first one is awaited that long after the start)."""
        return self._age() <= self.config.stall_s

    def status(self) -> dict[str, Any]:
        self._drain()
        with self._lock:
            windows = {k: np.fromiter(v, np.float64, len(v)) for k, v in self._stages.items() if v}
            s = {**self.about, "frames": self._frames, "fps": round(self._fps, 2),
                 "input_fps": round(self._input_fps, 2), "dropped": self._dropped, "graded": self._graded,
                 "grades": dict(self._grades), "views": self._views, "infer_errors": self._infer_errors,
                 "events": list(self._events)[::-1], "viewers": self._viewers}
        stages = {}
        for k, a in windows.items():
            p50, p99 = np.percentile(a, [50, 99])
            stages[k] = {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}
        return {**s, "stages": stages, "encodes": self.encodes, "last_frame_age_s": round(self._age(), 3),
                "healthy": self.healthy()}


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
            body = f"{'ok' if ok else 'stalled'}: last frame {view._age():.1f} s ago\n".encode()
            self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body, "text/plain; charset=utf-8")
        elif route == "/stream.mjpg":
            self._stream(view)
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

    def _stream(self, view: LiveView) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={_BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        view._add_viewer(1)
        try:
            seq = 0
            while not view._closing.is_set():
                jpeg, seq = view._next_jpeg(seq, timeout=1.0)
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
            view._add_viewer(-1)
            self.close_connection = True


def _page(view: LiveView) -> str:
    title = html.escape(" · ".join(v for v in (view.about["model"], view.about["source"]) if v) or "mnet grade")
    return _PAGE.replace("{title}", title).replace("{stall}", str(view.config.stall_s))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mnet grade: {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px system-ui,sans-serif;margin:0;background:#15171a;color:#e6e6e6}
 header{padding:8px 14px;background:#23262b;display:flex;gap:16px;align-items:baseline}
 header b{font-size:16px} #health{padding:2px 8px;border-radius:4px;background:#2e7d32}
 #health.bad{background:#c62828} main{display:flex;gap:14px;padding:14px;flex-wrap:wrap}
 #video{max-width:100%;background:#000;border:1px solid #333;min-width:320px;min-height:240px}
 table{border-collapse:collapse} td,th{padding:2px 10px 2px 0;text-align:left;font-variant-numeric:tabular-nums}
 th{color:#9aa} h3{margin:10px 0 4px;font-size:14px;color:#9aa} .num{text-align:right}
</style></head><body>
<header><b>mnet grade</b><span>{title}</span><span id="about"></span><span id="health">…</span></header>
<main>
 <div><img id="video" alt="annotated video (appears while frames arrive)"></div>
 <div>
  <h3>counters</h3><table id="counters"></table>
  <h3>graded per grade</h3><table id="grades"></table>
  <h3>stage latency (ms)</h3><table id="stages"><tr><th>stage</th><th class="num">p50</th><th class="num">p99</th></tr></table>
  <h3>last events</h3><table id="events"></table>
 </div>
</main>
<script>
const q = location.search;  // carries ?token=... to every request of the page
document.getElementById("video").src = "stream.mjpg" + q;
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
const rows = (pairs) => pairs.map(([k, v]) => `<tr><td>${esc(k)}</td><td class="num">${esc(v)}</td></tr>`).join("");
async function tick() {
  try {
    const s = await (await fetch("status.json" + q, {cache: "no-store"})).json();
    document.getElementById("about").textContent = `${s.backend} ${s.precision}`;
    const h = document.getElementById("health");
    h.textContent = s.healthy ? "running" : `stalled ${s.last_frame_age_s.toFixed(0)} s`;
    h.className = s.healthy ? "" : "bad";
    document.getElementById("counters").innerHTML = rows([["fps", s.fps.toFixed(1)],
      ["input fps", s.input_fps.toFixed(1)], ["frames", s.frames], ["graded", s.graded],
      ["dropped", s.dropped], ["views", s.views], ["infer errors", s.infer_errors], ["viewers", s.viewers]]);
    document.getElementById("grades").innerHTML = rows(Object.entries(s.grades));
    document.getElementById("stages").innerHTML = "<tr><th>stage</th><th class=num>p50</th><th class=num>p99</th></tr>" +
      Object.entries(s.stages).map(([k, v]) => `<tr><td>${esc(k)}</td><td class="num">${v.p50_ms.toFixed(2)}</td>` +
        `<td class="num">${v.p99_ms.toFixed(2)}</td></tr>`).join("");
    document.getElementById("events").innerHTML = s.events.map(e => `<tr><td>#${e.fruit_id}</td>` +
      `<td>${esc(e.grade)}</td><td class="num">${e.confidence.toFixed(2)}</td><td>${e.views ?? ""} views</td>` +
      `<td>${e.reason ? esc(e.reason) : ""}</td></tr>`).join("");
  } catch (err) {
    const h = document.getElementById("health"); h.textContent = "no connection"; h.className = "bad";
  }
}
tick(); setInterval(tick, 500);
</script></body></html>
"""
