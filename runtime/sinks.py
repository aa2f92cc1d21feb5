"""Where grade events go: JSONL (the default record), CSV, a stream, MQTT, and an annotated video.

Every sink has the same small face — `write(event)`, `frame(image, info)` for the ones that want
every frame (the video writer), `close()` — and `Sinks` fans one event out to all of them.

Durability: JSONL and CSV flush each event as it is written (a crash loses at most the event being
written) and fsync on close. MQTT publishes with QoS 1 and never blocks the grading loop: while the
broker is unreachable paho-mqtt keeps the unacknowledged messages in memory and sends them after it
reconnects; close() waits, bounded, until the broker has acknowledged every event.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from mnet.errors import ConfigError, DataError
from mnet.events import GradeEvent

if TYPE_CHECKING:  # only for annotations: grader imports this module
    from mnet.runtime.grader import FrameInfo

__all__ = [
    "CsvSink",
    "JsonlSink",
    "MqttSink",
    "Sink",
    "Sinks",
    "StreamSink",
    "VideoSink",
    "annotate",
    "open_sinks",
    "parse_mqtt_uri",
]

_log = logging.getLogger(__name__)


class Sink:
    """Base class. Subclasses override write() and close(); frame sinks set wants_frames."""

    name = "sink"
    wants_frames = False

    def write(self, event: GradeEvent) -> None:
        raise NotImplementedError

    def frame(self, image: np.ndarray, info: FrameInfo) -> None:
        """Called once per processed frame when wants_frames is True."""

    def close(self) -> None:
        raise NotImplementedError


class Sinks:
    """Fan-out to several sinks; a context manager that closes all of them, even if one fails."""

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.sinks: list[Sink] = list(sinks)

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)

    @property
    def wants_frames(self) -> bool:
        return any(s.wants_frames for s in self.sinks)

    def write(self, event: GradeEvent) -> None:
        for s in self.sinks:
            try:
                s.write(event)
            except OSError as e:
                raise DataError(f"{s.name} sink: cannot write event {event.fruit_id}: {e}") from None

    def frame(self, image: np.ndarray, info: FrameInfo) -> None:
        for s in self.sinks:
            if s.wants_frames:
                s.frame(image, info)

    def close(self) -> None:
        first: BaseException | None = None
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:  # noqa: BLE001 -- close the others before reporting the first failure
                _log.error("%s sink: close failed: %s", s.name, e)
                first = first or e
        self.sinks = []
        if first is not None:
            raise first

    def __enter__(self) -> Sinks:  # noqa: PYI034 -- typing.Self needs 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.sinks)


def _open_text(path: Path, append: bool, what: str) -> TextIO:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a" if append else "w", encoding="utf-8", newline="")
    except OSError as e:
        raise DataError(f"{what} file {path}: cannot open for writing ({e.strerror}); "
                        "check the directory exists and is writable") from None


def _fsync_close(f: TextIO) -> None:
    if f.closed:
        return
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _torn_last_line(path: Path) -> bool:
    """Whether a regular, non-empty file does not end with a newline (a crash mid-write tore its last line)."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:  # unreadable: opening it for writing reports the problem
        return False


class JsonlSink(Sink):
    """One JSON line per fruit, flushed per event; fsync at close (and per event if fsync_each).

    Appending to a file whose last line is torn (a crash mid-write) starts on a fresh line, so the torn
    line stays one unreadable line instead of swallowing the next event; it is logged and counted in
    `torn_lines`, never dropped or repaired.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike, *, append: bool = True, fsync_each: bool = False) -> None:
        self.path = Path(path)
        self.fsync_each = fsync_each
        self.torn_lines = int(append and _torn_last_line(self.path))
        self._f = _open_text(self.path, append, "events")
        if self.torn_lines:
            _log.warning("events file %s: its last line is torn (no newline at the end, e.g. a crash mid-write); "
                         "it is kept as is and new events start on the next line", self.path)
            self._f.write("\n")
            self._f.flush()

    def write(self, event: GradeEvent) -> None:
        self._f.write(event.to_line() + "\n")
        self._f.flush()
        if self.fsync_each:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        _fsync_close(self._f)


class CsvSink(Sink):
    """One row per fruit: the event fields with probs expanded to one `p_<class>` column per class.

    The header is written with the first event (its classes fix the columns); appending to a file
    with a different header is refused rather than producing a CSV no tool can read.
    """

    name = "csv"

    def __init__(self, path: str | os.PathLike, *, append: bool = True,
                 classes: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self._existing_header: list[str] | None = None
        if append and self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, encoding="utf-8", newline="") as f:
                self._existing_header = next(csv.reader(f), None)
        self._f = _open_text(self.path, append, "CSV")
        self._writer = csv.writer(self._f)
        self._columns: list[str] | None = None
        if classes is not None:
            self._start(list(classes))

    @staticmethod
    def header(classes: Sequence[str]) -> list[str]:
        return (["fruit_id", "grade", "confidence"] + [f"p_{c}" for c in classes]
                + ["frames", "views", "first_ts", "last_ts", "source", "model"])

    def _start(self, classes: list[str]) -> None:
        self._classes = classes
        self._columns = self.header(classes)
        if self._existing_header is None:
            self._writer.writerow(self._columns)
        elif self._existing_header != self._columns:
            raise ConfigError(f"CSV file {self.path} has columns {self._existing_header}, these events need "
                              f"{self._columns}; write to a new file")

    def write(self, event: GradeEvent) -> None:
        if self._columns is None:
            self._start(list(event.probs))
        elif list(event.probs) != self._classes:
            raise ConfigError(f"CSV file {self.path}: event classes {list(event.probs)} differ from the "
                              f"columns' {self._classes}")
        self._writer.writerow([event.fruit_id, event.grade, f"{event.confidence:.6f}"]
                              + [f"{event.probs[c]:.6f}" for c in self._classes]
                              + [event.frames, "" if event.views is None else event.views, f"{event.first_ts:.6f}", f"{event.last_ts:.6f}",
                                 event.source, event.model])
        self._f.flush()

    def close(self) -> None:
        _fsync_close(self._f)


class StreamSink(Sink):
    """JSON lines to a text stream (stdout by default, looked up at write time); never closes it."""

    name = "stdout"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def write(self, event: GradeEvent) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        stream.write(event.to_line() + "\n")
        stream.flush()

    def close(self) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        stream.flush()


# --------------------------------------------------------------------------------------------- MQTT


def parse_mqtt_uri(uri: str) -> tuple[str, int, str, str | None, str | None, bool]:
    """mqtt[s]://[user[:password]@]host[:port]/topic/levels → (host, port, topic, user, password, tls)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"mqtt = {uri!r}: expected mqtt://host[:port]/topic (or mqtts:// for TLS)")
    tls = parts.scheme == "mqtts"
    # The topic is everything after the host, taken raw: urlsplit would read a '#' wildcard as a fragment.
    topic = unquote(uri.split("://", 1)[1].partition("/")[2])
    if not parts.hostname or not topic:
        raise ConfigError(f"mqtt = {uri!r}: needs a host and a topic, e.g. mqtt://broker:1883/factory/line1/grades")
    if any(ch in topic for ch in "+#"):
        raise ConfigError(f"mqtt = {uri!r}: topic {topic!r} has a wildcard (+ or #); publish to a plain topic")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"mqtt = {uri!r}: bad port") from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return parts.hostname, port, topic, user, password, tls


class MqttSink(Sink):
    """Publish each event as one JSON message, QoS 1, without ever blocking the grading loop.

    paho-mqtt's network thread connects (and reconnects, with backoff) in the background; messages
    published while the broker is away stay queued in the client and go out after it reconnects.
    close() waits up to `close_timeout_s` for the broker to acknowledge everything.
    """

    name = "mqtt"

    def __init__(self, uri: str, *, client_id: str | None = None, qos: int = 1, close_timeout_s: float = 10.0,
                 reconnect_delay_s: tuple[int, int] = (1, 30), keepalive_s: int = 30,
                 max_buffer: int = 100_000) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise ConfigError("the MQTT sink needs paho-mqtt 2.x: pip install 'mnet[mqtt]'") from None
        if not hasattr(mqtt, "CallbackAPIVersion"):
            raise ConfigError("the MQTT sink needs paho-mqtt >= 2.0: pip install -U 'paho-mqtt>=2'")
        if qos not in (0, 1, 2):
            raise ConfigError(f"mqtt qos = {qos!r}: expected 0, 1 or 2")
        self._mqtt = mqtt
        self.uri = uri
        host, port, self.topic, user, password, tls = parse_mqtt_uri(uri)
        self.qos = qos
        self.close_timeout_s = close_timeout_s
        self._cond = threading.Condition()
        self._outstanding: dict[int, int] = {}  # mid -> fruit_id, until the broker acknowledges
        self._early_acks: set = set()  # acks that beat publish() returning its mid
        self.published = 0
        self.acked = 0
        self.unsent = 0  # events still unacknowledged when close() gave up
        self._connected = False

        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                   protocol=mqtt.MQTTv311, clean_session=True)
        if user:
            self._client.username_pw_set(user, password)
        if tls:
            self._client.tls_set()
        self._client.max_queued_messages_set(max_buffer)
        self._client.reconnect_delay_set(*reconnect_delay_s)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.connect_async(host, port, keepalive=keepalive_s)
        self._client.loop_start()

    # paho network thread
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code == 0:
            self._connected = True
            _log.info("mqtt: connected to %s (%d event(s) awaiting ack)", self.uri, len(self._outstanding))
        else:
            _log.error("mqtt: broker %s refused the connection: %s", self.uri, reason_code)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self._connected:
            _log.warning("mqtt: lost connection to %s (%s); events are buffered until it is back",
                         self.uri, reason_code)
        self._connected = False

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cond:
            if self._outstanding.pop(mid, None) is None:
                self._early_acks.add(mid)
            self.acked += 1
            self._cond.notify_all()

    @property
    def outstanding(self) -> int:
        with self._cond:
            return len(self._outstanding)

    def write(self, event: GradeEvent) -> None:
        info = self._client.publish(self.topic, event.to_line(), qos=self.qos)
        if info.rc not in (self._mqtt.MQTT_ERR_SUCCESS, self._mqtt.MQTT_ERR_NO_CONN):
            # QUEUE_SIZE: the broker has been away for max_buffer events; memory must stay bounded.
            _log.error("mqtt: event %d not queued (%s)", event.fruit_id, self._mqtt.error_string(info.rc))
            self.unsent += 1
            return
        self.published += 1
        if self.qos == 0:
            return
        with self._cond:
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
            else:
                self._outstanding[info.mid] = event.fruit_id

    def flush(self, timeout_s: float) -> bool:
        """Wait until the broker acknowledged every event published so far; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._outstanding, timeout_s)

    def close(self) -> None:
        if self._client is None:
            return
        if not self.flush(self.close_timeout_s):
            self.unsent += self.outstanding
            _log.error("mqtt: %d event(s) not acknowledged by %s within %.0f s; they are in the JSONL log",
                       self.outstanding, self.uri, self.close_timeout_s)
        self._client.disconnect()
        self._client.loop_stop()
        self._client = None


# -------------------------------------------------------------------------------------------- video

_CLASS_COLOURS = [(80, 200, 60), (0, 200, 255), (40, 40, 230), (230, 160, 40), (200, 80, 200), (160, 160, 160)]
_FOURCC_BY_EXT = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "XVID"}


def _colour(i: int) -> tuple[int, int, int]:
    return _CLASS_COLOURS[i % len(_CLASS_COLOURS)]


def annotate(frame: np.ndarray, info: FrameInfo) -> np.ndarray:
    """A copy of `frame` with the ROI, trigger line, tracked fruit (id, grade) and counters drawn on."""
    img = frame.copy()
    h, _w = img.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    if info.roi is not None:
        x, y, rw, rh = info.roi
        cv2.rectangle(img, (x, y), (x + rw - 1, y + rh - 1), (128, 128, 128), 1)
    if info.trigger_x is not None:
        tx = round(info.trigger_x)
        cv2.line(img, (tx, 0), (tx, h - 1), (0, 255, 255), 1)
    for t in info.tracks:
        if t.lost:
            continue
        b = t.box
        if t.fruit_id is None or t.probs is None:
            colour, label = (160, 160, 160), "?"
        else:
            k = int(np.argmax(t.probs))
            colour = _colour(k)
            label = f"#{t.fruit_id} {info.classes[k]} {float(t.probs[k]):.2f}" + (" *" if t.emitted else "")
        cv2.rectangle(img, (b.x, b.y), (b.x2 - 1, b.y2 - 1), colour, 2)
        cv2.putText(img, label, (b.x, max(12, b.y - 4)), font, 0.45, colour, 1, cv2.LINE_AA)
    status = f"{info.fps:5.1f} fps  graded {info.graded}  dropped {info.dropped}"
    cv2.putText(img, status, (6, 18), font, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, status, (6, 18), font, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    if info.last_event is not None:
        e = info.last_event
        text = f"last: #{e.fruit_id} {e.grade} ({e.confidence:.2f})"
        cv2.putText(img, text, (6, h - 8), font, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(img, text, (6, h - 8), font, 0.5, _colour(list(e.probs).index(e.grade)), 1, cv2.LINE_AA)
    return img


class VideoSink(Sink):
    """Write every processed frame, annotated, to a video file (opened at the first frame's size)."""

    name = "video"
    wants_frames = True

    def __init__(self, path: str | os.PathLike, *, fps: float | None = None, codec: str | None = None) -> None:
        self.path = Path(path)
        self.codec = codec or _FOURCC_BY_EXT.get(self.path.suffix.lower(), "mp4v")
        if len(self.codec) != 4:
            raise ConfigError(f"video codec = {self.codec!r}: expected a FourCC such as mp4v or MJPG")
        self.fps = fps
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self.frames = 0

    def _open(self, size: tuple[int, int], fps: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*self.codec), float(fps), size)
        if not writer.isOpened():
            raise ConfigError(f"save = {str(self.path)!r}: OpenCV cannot write codec {self.codec!r} to this "
                              "container; use .mp4 (mp4v) or .avi (MJPG)")
        self._writer, self._size = writer, size

    def write(self, event: GradeEvent) -> None:
        """Events are drawn from the frame info; nothing to do per event."""

    def frame(self, image: np.ndarray, info: FrameInfo) -> None:
        img = annotate(image, info)
        if self._writer is None:
            self._open((img.shape[1], img.shape[0]), self.fps or info.source_fps or 30.0)
        if (img.shape[1], img.shape[0]) != self._size:
            img = cv2.resize(img, self._size, interpolation=cv2.INTER_AREA)  # image dirs mix sizes
        self._writer.write(img)
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


def open_sinks(*, events: str | os.PathLike | None = None, csv_path: str | os.PathLike | None = None,
               mqtt: str | None = None, save: str | os.PathLike | None = None,
               stream: TextIO | None = None, append: bool = True,
               video_fps: float | None = None) -> Sinks:
    """Build the fan-out the CLI options describe; on a failure, closes what was already opened."""
    sinks = Sinks()
    try:
        if events is not None:
            sinks.add(JsonlSink(events, append=append))
        if csv_path is not None:
            sinks.add(CsvSink(csv_path, append=append))
        if stream is not None:
            sinks.add(StreamSink(stream))
        if mqtt:
            sinks.add(MqttSink(mqtt))
        if save is not None:
            sinks.add(VideoSink(save, fps=video_fps))
    except BaseException:
        sinks.close()
        raise
    return sinks
