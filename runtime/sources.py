"""Video sources opened from one URI grammar, after jetson-utils' videoSource.

    0, /dev/video0           V4L2 / USB camera (index)                                   live
    /dev/v4l/by-id/usb-...   a link to a /dev/videoN (also by-path, udev names)          live
    csi://0[?fps=30&flip=2]  Jetson CSI camera through nvarguscamerasrc (GStreamer)      live
    rtsp://host/path         network stream (also rtsps://, http(s):// MJPEG cameras)    live
    gst:PIPELINE             any GStreamer pipeline ending in an appsink                 live
    clip.mp4, file://clip.mp4  video file, read frame by frame                            file
    frames/, photo.jpg       a directory of images (natural sort order) or one image     file

`read()` never raises in the hot loop: it returns a `Capture` whose `status` says OK, TIMEOUT (no new
frame yet, e.g. while a camera reconnects), EOS (the file is over, or the live source was closed) or
ERROR (one frame could not be read; `source.streaming` says whether more can come).

Live sources run a capture thread that keeps only the newest frame: a grader slower than the camera
always sees the present, not a queue of stale frames, and every frame overwritten unread is counted
as dropped. A live source that is down at start is retried with backoff for `open_timeout_s`; when
reads fail the thread reopens the device with exponential backoff, re-resolving a /dev/v4l link each
time (a camera that comes back as another /dev/videoN is found again). Live timestamps are Unix time
derived from time.monotonic() and one wall-clock reading at start, so they never go backwards when
the system clock is stepped (Jetsons set theirs after boot).

Files and image directories deliver every frame in order and nothing is ever dropped (a video file is
decoded a few frames ahead in a reader thread that waits when its small queue is full). A frame the
decoder cannot read while the container still holds more is returned as ERROR, counted in
`stats.errors`, and reading goes on; a file that yields fewer frames than its container declares logs
a warning.

Every cv2.VideoCapture is built by `capture_factory(target, api_preference)` (default
`cv2.VideoCapture`), so tests can inject a capture that fails mid-stream.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union
from urllib.parse import parse_qs

import cv2
import numpy as np

from mnet.errors import ConfigError, SourceError
from mnet.redact import redact

__all__ = [
    "IMAGE_EXTENSIONS",
    "Capture",
    "CaptureFactory",
    "Source",
    "SourceSpec",
    "SourceStats",
    "Status",
    "csi_pipeline",
    "has_gstreamer",
    "open_source",
    "parse_uri",
]

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_NETWORK_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")
_URI_HELP = ("expected a camera index (0), /dev/videoN (or a /dev/v4l/by-id link), csi://N, rtsp://..., "
             "gst:PIPELINE, a video file, a directory of images or an image file")

# A capture is anything with cv2.VideoCapture's isOpened/read/release/get/set.
CaptureFactory = Callable[[Union[int, str], int], Any]
Size = tuple[int, int]


class Status(enum.Enum):
    OK = "ok"
    TIMEOUT = "timeout"
    EOS = "eos"
    ERROR = "error"


@dataclass(frozen=True)
class Capture:
    """The result of one read: a status and, when OK, a BGR frame with its timestamp (seconds)."""

    status: Status
    frame: np.ndarray | None = None
    ts: float = 0.0
    index: int = -1  # position in the stream (0-based); for live sources dropped frames count too

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


@dataclass
class SourceStats:
    """Frame counters. `read` = frames obtained from the device or file; `delivered` = returned OK."""

    read: int = 0
    delivered: int = 0
    dropped: int = 0
    errors: int = 0
    reconnects: int = 0


@dataclass(frozen=True)
class SourceSpec:
    """A parsed URI: what to open and how."""

    kind: str  # camera | csi | network | gst | file | images
    uri: str  # as the user gave it, password redacted (goes into grade events, logs and errors)
    target: int | str  # what cv2.VideoCapture gets, or the image path for kind=images
    api: int  # cv2.CAP_* preference
    images: tuple[str, ...] = ()  # kind=images: the files, in order
    # kind=camera given as a link (/dev/v4l/by-id/...): re-resolved at every (re)open, because the
    # kernel may give a replugged camera another /dev/videoN; `target` is its index at parse time
    # (-1 while the link is missing).
    link: str | None = None

    def __post_init__(self) -> None:
        # The one place a source URI is stored: only `target` keeps the credentials.
        object.__setattr__(self, "uri", redact(self.uri))

    @property
    def live(self) -> bool:
        return self.kind in ("camera", "csi", "network", "gst")


# ---------------------------------------------------------------------------------------------- URI


def has_gstreamer() -> bool:
    """True when this OpenCV build has the GStreamer backend (needed for csi:// and gst:)."""
    m = re.search(r"GStreamer:\s*(\w+)", cv2.getBuildInformation())
    return bool(m) and m.group(1).upper() == "YES"


def csi_pipeline(sensor_id: int = 0, *, width: int = 1280, height: int = 720, fps: int = 30,
                 flip_method: int = 0) -> str:
    """The Jetson nvarguscamerasrc pipeline for CSI sensor `sensor_id`, ending in a BGR appsink.

    `drop=true max-buffers=1` on the appsink keeps GStreamer itself from queueing stale frames.
    """
    return (
        f"nvarguscamerasrc sensor-id={int(sensor_id)} ! "
        f"video/x-raw(memory:NVMM),width={int(width)},height={int(height)},framerate={int(fps)}/1 ! "
        f"nvvidconv flip-method={int(flip_method)} ! video/x-raw,format=BGRx ! "
        "videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1"
    )


def _natural_key(name: str) -> list:
    # frame2.png before frame10.png, as a person numbering files expects.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _list_images(directory: Path) -> tuple[str, ...]:
    files = [p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return tuple(str(p) for p in sorted(files, key=lambda p: _natural_key(p.name)))


def _video_index(link: str) -> int | None:
    """N when `link` resolves (through any chain of links) to /dev/videoN, else None."""
    m = re.fullmatch(r"/dev/video(\d+)", os.path.realpath(link))
    return int(m.group(1)) if m else None


def parse_uri(uri: str | int | os.PathLike, *, input_size: Size | None = None) -> SourceSpec:
    """Parse a source URI into a SourceSpec without opening anything; SourceError if not understood."""
    if isinstance(uri, int) and not isinstance(uri, bool):
        uri = str(uri)
    text = os.fspath(uri) if isinstance(uri, os.PathLike) else uri
    if not isinstance(text, str) or not text.strip():
        raise SourceError(f"source {uri!r}: empty; {_URI_HELP}")
    text = text.strip()
    linux = sys.platform.startswith("linux")
    cam_api = cv2.CAP_V4L2 if linux else cv2.CAP_ANY

    if text.isdigit():
        return SourceSpec("camera", text, int(text), cam_api)
    m = re.fullmatch(r"(?:v4l2://)?/dev/video(\d+)", text)
    if m:
        return SourceSpec("camera", text, int(m.group(1)), cam_api)
    dev = text.removeprefix("v4l2://")
    if dev.startswith("/dev/v4l/") or (os.path.islink(dev) and _video_index(dev) is not None):
        # A missing /dev/v4l link is a camera that is unplugged right now: opening retries it.
        index = _video_index(dev)
        if index is None and os.path.exists(dev):
            raise SourceError(f"source {text!r}: {os.path.realpath(dev)} is not a /dev/videoN camera device")
        return SourceSpec("camera", text, -1 if index is None else index, cam_api, link=dev)
    if text.startswith("csi://"):
        head, _, query = text[len("csi://"):].partition("?")
        if not head.isdigit():
            raise SourceError(f"source {text!r}: csi:// needs a sensor number, e.g. csi://0")
        q = {k: v[-1] for k, v in parse_qs(query).items()}
        try:
            w, h = input_size if input_size else (int(q.get("width", 1280)), int(q.get("height", 720)))
            pipeline = csi_pipeline(int(head), width=w, height=h, fps=int(q.get("fps", 30)),
                                    flip_method=int(q.get("flip", 0)))
        except ValueError:
            raise SourceError(f"source {text!r}: csi options must be integers (width, height, fps, flip)") from None
        return SourceSpec("csi", text, pipeline, cv2.CAP_GSTREAMER)
    if text.startswith("gst:"):
        pipeline = text[len("gst:"):].strip()
        if not pipeline:
            raise SourceError(f"source {text!r}: gst: needs a pipeline, e.g. gst:videotestsrc ! appsink")
        if "appsink" not in pipeline:
            # OpenCV pulls frames from an appsink; add one (BGR, newest frame only) if the user did not.
            pipeline += " ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1"
        return SourceSpec("gst", text, pipeline, cv2.CAP_GSTREAMER)
    if text.lower().startswith(_NETWORK_SCHEMES):
        return SourceSpec("network", text, text, cv2.CAP_FFMPEG)

    path_text = text.removeprefix("file://")
    if "://" in path_text:
        raise SourceError(f"source {redact(text)!r}: unknown scheme; {_URI_HELP}")
    path = Path(path_text).expanduser()
    if path.is_dir():
        images = _list_images(path)
        if not images:
            raise SourceError(f"source {redact(text)!r}: directory has no images ({', '.join(IMAGE_EXTENSIONS)})")
        return SourceSpec("images", text, str(path), cv2.CAP_ANY, images)
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return SourceSpec("images", text, str(path), cv2.CAP_ANY, (str(path),))
        return SourceSpec("file", text, str(path), cv2.CAP_ANY)
    raise SourceError(f"source {redact(text)!r}: no such file, directory or device; {_URI_HELP}")


# ------------------------------------------------------------------------------------------ sources


class Source:
    """Base class: one read() contract for every input. Use as a context manager or call close()."""

    def __init__(self, spec: SourceSpec, *, input_size: Size | None, fps_limit: float | None,
                 timeout_s: float) -> None:
        if input_size is not None and (len(input_size) != 2 or min(input_size) <= 0):
            raise ConfigError(f"input_size = {input_size!r}: expected (width, height), both > 0")
        if fps_limit is not None and fps_limit <= 0:
            raise ConfigError(f"fps_limit = {fps_limit!r}: expected a positive number of frames per second")
        self.spec = spec
        self.input_size = tuple(int(v) for v in input_size) if input_size else None
        self.fps_limit = fps_limit
        self.timeout_s = float(timeout_s)
        self.stats = SourceStats()
        self.fps: float | None = None  # nominal rate reported by the device or container, if any
        self._next_due = 0.0

    uri = property(lambda self: self.spec.uri)
    kind = property(lambda self: self.spec.kind)
    live = property(lambda self: self.spec.live)

    @property
    def streaming(self) -> bool:
        """False once no further frame can come (end of file, closed, or a live source that gave up)."""
        raise NotImplementedError

    def read(self, timeout: float | None = None) -> Capture:
        """The next frame (file) or the newest one (live); waits at most `timeout` seconds (live)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Source:  # noqa: PYI034 -- typing.Self needs 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Capture]:
        """OK captures until the stream ends; timeouts and single bad frames are skipped."""
        while True:
            cap = self.read()
            if cap.ok:
                yield cap
            elif cap.status is Status.EOS or not self.streaming:
                return

    # helpers shared by subclasses
    def _pace(self) -> None:
        # fps_limit: never deliver faster than the limit (a live source then drops the frames between).
        if self.fps_limit:
            delay = self._next_due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            # From the later of "when it was due" and "now": a slow consumer never earns a burst.
            self._next_due = max(self._next_due, time.monotonic()) + 1.0 / self.fps_limit

    def _fit(self, frame: np.ndarray) -> np.ndarray:
        if self.input_size and (frame.shape[1], frame.shape[0]) != self.input_size:
            frame = cv2.resize(frame, self.input_size, interpolation=cv2.INTER_AREA)
        return frame


def _default_factory(target: int | str, api: int) -> Any:
    return cv2.VideoCapture(target, api)


def _open_capture(spec: SourceSpec, factory: CaptureFactory, input_size: Size | None) -> Any:
    """Open a capture or return None (the caller decides whether that is fatal)."""
    target = spec.target
    if spec.link is not None:
        target = _video_index(spec.link)
        if target is None:
            _log.debug("%s: the link leads to no /dev/videoN (camera unplugged?)", spec.uri)
            return None
        if target != spec.target:
            _log.info("%s: the link now leads to /dev/video%d", spec.uri, target)
    try:
        cap = factory(target, spec.api)
    except cv2.error as e:
        _log.debug("opening %s raised %s", spec.uri, e)
        return None
    if cap is None or not cap.isOpened():
        if cap is not None:
            cap.release()
        return None
    if spec.kind == "camera":
        # One driver buffer: V4L2 otherwise queues 4+ frames, i.e. >100 ms of lag at 30 fps.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if input_size:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, input_size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, input_size[1])
    return cap


def _get_count(cap: Any, prop: int) -> int:
    """An integer capture property (frame count, position); 0 when the backend does not know it."""
    try:
        value = float(cap.get(prop))
    except (cv2.error, TypeError, ValueError):
        return 0
    return int(value) if 0 < value < 2**53 else 0  # NaN, inf and -1 ("unknown") all become 0


def _nominal_fps(cap: Any) -> float | None:
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS))
    except (cv2.error, TypeError, ValueError):
        return None
    return fps if 0 < fps < 1000 else None


# Failed reads in a row after which a video file is taken as over even if its container claims more
# frames: a bogus frame count must not keep the reader spinning (1000 frames is ~40 s of video).
_MAX_BAD_RUN = 1000


class _FileSource(Source):
    """A video file, every frame in order; timestamps are media time.

    A reader thread decodes up to `prefetch` frames ahead into a bounded queue (it waits when the
    queue is full, so nothing is ever dropped): decoding overlaps the grading of the previous frame,
    which on a 2-core board is the difference between the sum and the max of the two.
    """

    _END = object()

    def __init__(self, spec: SourceSpec, factory: CaptureFactory, *, prefetch: int = 4, **kw: Any) -> None:
        super().__init__(spec, **kw)
        if prefetch < 1:
            raise ConfigError(f"prefetch = {prefetch!r}: expected >= 1 frame")
        self._cap = _open_capture(spec, factory, None)
        if self._cap is None:
            raise SourceError(f"source {spec.uri!r}: cannot open the video file (unsupported codec or corrupt "
                              "file?); check it plays with ffprobe, or convert it to H.264 mp4")
        self.fps = _nominal_fps(self._cap)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._closed = threading.Event()
        self._eos = False
        self._thread = threading.Thread(target=self._run, name=f"mnet-decode[{spec.uri}]", daemon=True)
        self._thread.start()

    @property
    def streaming(self) -> bool:
        return not self._eos

    def read(self, timeout: float | None = None) -> Capture:
        if self._eos:
            return Capture(Status.EOS)
        self._pace()
        item = self._queue.get()  # the reader always ends with _END, so this cannot hang
        if item is self._END:
            self._eos = True
            return Capture(Status.EOS)
        if item.ok:
            self.stats.delivered += 1
        return item

    def _put(self, item: Any) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        total = _get_count(self._cap, cv2.CAP_PROP_FRAME_COUNT)  # 0: the container does not say
        index = 0  # container frames read or lost so far, i.e. the next frame's index
        bad_run = 0  # failed reads in a row
        ts = 0.0
        try:
            while not self._closed.is_set():
                try:
                    ok, frame = self._cap.read()
                except cv2.error as e:
                    _log.debug("%s: decoding raised at frame %d: %s", self.uri, index, e)
                    ok, frame = False, None
                if ok and frame is not None:
                    ts = index / self.fps if self.fps else self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                    self.stats.read += 1
                    if bad_run:
                        _log.warning("%s: %d unreadable frame(s) before frame %d skipped", self.uri, bad_run, index)
                    bad_run = 0
                    if not self._put(Capture(Status.OK, self._fit(frame), float(ts), index)):
                        break
                    index += 1
                    continue
                # A corrupt frame fails exactly like the end of the file, so the container decides: go on
                # while it holds more frames. FFmpeg does not advance POS_FRAMES on a failed read (each
                # failed read still consumes a packet), hence `index` too; both bound the retries.
                pos = _get_count(self._cap, cv2.CAP_PROP_POS_FRAMES)
                if total == 0 or max(index, pos) >= total or bad_run >= _MAX_BAD_RUN:
                    break
                bad_run += 1
                self.stats.errors += 1
                if self.fps:
                    ts = index / self.fps
                if not self._put(Capture(Status.ERROR, None, float(ts), index)):
                    break
                index += 1
        finally:
            self._cap.release()
            if total and self.stats.read < total and not self._closed.is_set():
                _log.warning("%s: read %d of the %d frames the container declares (%d unreadable); "
                             "the file may be corrupt or truncated", self.uri, self.stats.read, total,
                             total - self.stats.read)
            self._put(self._END)

    def close(self) -> None:
        self._closed.set()
        self._eos = True
        self._thread.join(timeout=5.0)


class _ImageSource(Source):
    """A directory of images (or one image), one frame each; a frame's timestamp is its index."""

    def __init__(self, spec: SourceSpec, **kw: Any) -> None:
        super().__init__(spec, **kw)
        self._files = spec.images
        self._index = 0

    @property
    def streaming(self) -> bool:
        return self._index < len(self._files)

    def read(self, timeout: float | None = None) -> Capture:
        if self._index >= len(self._files):
            return Capture(Status.EOS)
        self._pace()
        index, path = self._index, self._files[self._index]
        self._index += 1
        frame = cv2.imread(path, cv2.IMREAD_COLOR)
        if frame is None:
            self.stats.errors += 1
            _log.warning("%s: cannot read image %s; skipped", self.uri, path)
            return Capture(Status.ERROR, None, float(index), index)
        self.stats.read += 1
        self.stats.delivered += 1
        return Capture(Status.OK, self._fit(frame), float(index), index)

    @property
    def current_path(self) -> str | None:
        """The file of the frame read last (for messages and events)."""
        return self._files[self._index - 1] if self._index else None

    def close(self) -> None:
        self._index = len(self._files)


class _LiveSource(Source):
    """Camera / CSI / network / GStreamer: a capture thread that keeps only the newest frame."""

    def __init__(self, spec: SourceSpec, factory: CaptureFactory, *, reconnect: bool,
                 backoff_s: tuple[float, float], max_reconnects: int | None, open_timeout_s: float,
                 **kw: Any) -> None:
        super().__init__(spec, **kw)
        if backoff_s[0] <= 0 or backoff_s[1] < backoff_s[0]:
            raise ConfigError(f"backoff_s = {backoff_s!r}: expected (first, max) with 0 < first <= max")
        if not open_timeout_s >= 0:
            raise ConfigError(f"open_timeout_s = {open_timeout_s!r}: expected >= 0 seconds (0 = one attempt)")
        self._factory = factory
        self._reconnect = reconnect
        self._backoff = (float(backoff_s[0]), float(backoff_s[1]))
        self._max_reconnects = max_reconnects
        cap = self._open_with_retry(float(open_timeout_s))
        # Stamps are Unix time from one wall-clock reading plus the monotonic clock: a clock stepped
        # later (NTP or RTC sync after boot) never makes a fruit's last_ts precede its first_ts.
        self._wall_offset = time.time() - time.monotonic()
        self.fps = _nominal_fps(cap)
        self._cap = cap
        self._cond = threading.Condition()
        self._latest: tuple[np.ndarray, float, int] | None = None
        self._seq = 0  # frames captured so far
        self._taken = 0  # value of _seq when the consumer last took a frame
        self._alive = True  # False once the thread gave up or was closed
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mnet-capture[{spec.uri}]", daemon=True)
        self._thread.start()

    @property
    def streaming(self) -> bool:
        with self._cond:
            return not self._closed.is_set() and (self._alive or self._seq > self._taken)

    def read(self, timeout: float | None = None) -> Capture:
        if self._closed.is_set():
            return Capture(Status.EOS)
        self._pace()
        timeout = self.timeout_s if timeout is None else timeout
        with self._cond:
            self._cond.wait_for(lambda: self._seq > self._taken or not self._alive, timeout)
            if self._seq > self._taken:
                frame, ts, index = self._latest
                self._taken = self._seq
                self.stats.delivered += 1
                return Capture(Status.OK, frame, ts, index)
            if not self._alive:
                return Capture(Status.EOS if self._closed.is_set() else Status.ERROR)
        return Capture(Status.TIMEOUT)

    def close(self) -> None:
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        # The thread releases the capture itself: releasing it here could race a blocking read().
        self._thread.join(timeout=3.0)
        if self._thread.is_alive():
            _log.warning("%s: capture thread still blocked in read(); it exits when the read returns", self.uri)

    def _open_with_retry(self, timeout_s: float) -> Any:
        # A camera still enumerating or a stream not up yet at start is retried like a reconnect.
        deadline = time.monotonic() + timeout_s
        delay, attempts = self._backoff[0], 0
        while True:
            cap = _open_capture(self.spec, self._factory, self.input_size)
            attempts += 1
            if cap is not None:
                if attempts > 1:
                    _log.info("%s: opened (attempt %d)", self.uri, attempts)
                return cap
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" (gave up after {attempts} attempts in {timeout_s:g} s)" if attempts > 1 else ""
                raise SourceError(_live_open_hint(self.spec) + waited)
            if attempts == 1:
                _log.warning("%s: cannot open; retrying for up to %g s", self.uri, timeout_s)
            time.sleep(min(delay, left))
            delay = min(delay * 2, self._backoff[1])

    # -- capture thread
    def _run(self) -> None:
        delay, attempts = self._backoff[0], 0
        cap = self._cap
        try:
            while not self._closed.is_set():
                if cap is None:
                    if not self._reconnect or (self._max_reconnects is not None
                                               and attempts >= self._max_reconnects):
                        _log.error("%s: giving up after %d reconnect attempt(s)", self.uri, attempts)
                        break
                    if self._closed.wait(delay):
                        break
                    delay, attempts = min(delay * 2, self._backoff[1]), attempts + 1
                    cap = _open_capture(self.spec, self._factory, self.input_size)
                    if cap is not None:
                        self.stats.reconnects += 1
                        _log.info("%s: reconnected (attempt %d)", self.uri, attempts)
                    continue
                try:
                    ok, frame = cap.read()
                except cv2.error as e:
                    _log.debug("%s: read raised %s", self.uri, e)
                    ok, frame = False, None
                if not ok or frame is None:
                    self.stats.errors += 1
                    _log.warning("%s: read failed; reconnecting", self.uri)
                    cap.release()
                    cap = None
                    continue
                delay, attempts = self._backoff[0], 0
                frame = self._fit(frame)
                with self._cond:
                    if self._seq > self._taken:
                        self.stats.dropped += 1  # the previous frame was never read: overwritten
                    self._latest = (frame, self._wall_offset + time.monotonic(), self._seq)
                    self._seq += 1
                    self.stats.read += 1
                    self._cond.notify_all()
        finally:
            if cap is not None:
                cap.release()
            with self._cond:
                self._alive = False
                self._cond.notify_all()


def _live_open_hint(spec: SourceSpec) -> str:
    if spec.kind == "camera":
        device = spec.link or spec.target
        return (f"source {spec.uri!r}: cannot open camera {device}; check it is plugged in "
                f"(ls /dev/video*), not used by another process, and that you may access it (group 'video')")
    if spec.kind == "csi":
        return (f"source {spec.uri!r}: cannot open the CSI camera; check the ribbon cable and that "
                f"nvargus-daemon runs (sudo systemctl restart nvargus-daemon). Pipeline: {spec.target}")
    if spec.kind == "gst":
        return f"source {spec.uri!r}: GStreamer could not start the pipeline; test it with gst-launch-1.0"
    return f"source {spec.uri!r}: cannot connect; check the URL, credentials and that the stream is up (ffprobe URL)"


def open_source(
    uri: str | int | os.PathLike,
    *,
    input_size: Size | None = None,
    fps_limit: float | None = None,
    timeout_s: float = 1.0,
    reconnect: bool = True,
    backoff_s: Sequence[float] = (0.25, 8.0),
    max_reconnects: int | None = None,
    open_timeout_s: float = 10.0,
    capture_factory: CaptureFactory | None = None,
    prefetch: int = 4,
) -> Source:
    """Open any source from its URI (see the module docstring); SourceError names the URI and the fix.

    input_size: (width, height) frames are delivered at (set on cameras, resized otherwise).
    fps_limit: deliver at most this many frames per second (live sources drop the rest).
    timeout_s: how long a live read() waits for a new frame before returning TIMEOUT.
    reconnect / backoff_s / max_reconnects: live sources reopen a failed device, waiting
        backoff_s[0], doubling up to backoff_s[1]; max_reconnects=None retries for ever.
    open_timeout_s: a live source that cannot be opened is retried (same backoff) for this long
        before SourceError; 0 = a single attempt.
    capture_factory: builds the cv2.VideoCapture (tests inject doubles).
    prefetch: video files decode this many frames ahead in a reader thread (never dropping any).
    """
    spec = parse_uri(uri, input_size=input_size)
    kw = {"input_size": input_size, "fps_limit": fps_limit, "timeout_s": timeout_s}
    if spec.kind == "images":
        return _ImageSource(spec, **kw)
    if capture_factory is None:
        if spec.api == cv2.CAP_GSTREAMER and not has_gstreamer():
            raise SourceError(
                f"source {spec.uri!r}: this OpenCV ({cv2.__version__}) was built without GStreamer, which "
                "csi:// and gst: need; on a Jetson use the JetPack OpenCV (sudo apt install python3-opencv, "
                "and pip uninstall opencv-python-headless in this environment)")
        capture_factory = _default_factory
    if spec.kind == "file":
        return _FileSource(spec, capture_factory, prefetch=prefetch, **kw)
    return _LiveSource(spec, capture_factory, reconnect=reconnect, backoff_s=tuple(backoff_s),
                       max_reconnects=max_reconnects, open_timeout_s=open_timeout_s, **kw)
