"""Where grade events go: JSONL (the default record), CSV, a stream, MQTT, and an annotated video
(a file, or an rtp:// / rtsp:// network stream where OpenCV has GStreamer).

Every sink has the same small face — `write(event)`, `frame(image, info)` for the ones that want
every frame (the video writer), `start(classes)` before the first frame, `close()` — and `Sinks`
fans one event out to all of them; a sink that fails is disabled and the others go on.

Durability: JSONL and CSV flush each event as it is written (a crash loses at most the event being
written) and fsync on close (the JSONL also per event with fsync_each: a power cut then loses at
most the event being written). MQTT publishes with QoS 1 and never blocks the grading loop: while the
broker is unreachable the unacknowledged events wait in memory and, with a spool directory, on disk
(fsync'd per event), so a crash or power cut loses none: the next start resends them (consumers
dedupe by event_id); close() waits, bounded, until the broker has acknowledged every event.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import hashlib
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from mnet.errors import ConfigError, DataError, MnetError
from mnet.events import EVENT_FIELDS, GradeEvent
from mnet.redact import redact

if TYPE_CHECKING:  # only for annotations: grader imports this module
    from mnet.runtime.grader import FrameInfo

__all__ = [
    "CsvSink",
    "JsonlSink",
    "MqttSink",
    "Sink",
    "SinkError",
    "Sinks",
    "StreamSink",
    "VideoSink",
    "VideoStreamSink",
    "annotate",
    "is_stream_uri",
    "open_sinks",
    "parse_mqtt_uri",
    "parse_stream_uri",
    "pick_encoder",
    "stream_pipeline",
    "text_on_box",
]

_log = logging.getLogger(__name__)


class Sink:
    """Base class. Subclasses override write() and close(); frame sinks set wants_frames."""

    name = "sink"
    wants_frames = False
    stores = True  # keeps events (a file, a broker); a viewer of them (the live view) sets False

    def write(self, event: GradeEvent) -> None:
        raise NotImplementedError

    def frame(self, image: np.ndarray, info: FrameInfo) -> None:
        """Called once per processed frame when wants_frames is True."""

    def start(self, classes: Sequence[str]) -> None:
        """Called once before the first frame with the model's classes: refuse a bad target now."""

    def close(self) -> None:
        raise NotImplementedError


class SinkError(DataError):
    """Sinks that failed: the message names each one, its first error and the events it missed.

    `failures` holds one dict per failed sink (`Sinks.report()` rows).
    """

    def __init__(self, message: str, failures: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.failures = failures


@dataclass
class _Slot:
    """One sink of a fan-out and what happened to it."""

    sink: Any  # a Sink, or anything with its face (tests pass plain objects)
    label: str
    written: int = 0
    missed: int = 0  # events not written, from the one it failed on
    frames_missed: int = 0
    error: str | None = None  # the first error; the sink gets nothing more after it
    closed: bool = False


def _label(sink: Any) -> str:
    # A file path or a redacted URI (`shown`), never a raw URI: MQTT and RTSP URIs may carry a password.
    path = getattr(sink, "shown", None) or getattr(sink, "path", None)
    return f"{sink.name} {path}" if path is not None else f"{sink.name}"


def _why(e: BaseException) -> str:
    return str(e) if isinstance(e, (OSError, MnetError)) else f"{type(e).__name__}: {e}"


class Sinks:
    """Fan-out to several sinks; a context manager that closes all of them, even if one fails.

    A sink that fails (a full disk, a closed pipe) is disabled after its first error and the others
    go on, so one bad target never costs the events the others can keep. The failures are raised
    together as one SinkError by close() (naming each sink, its error and how many events it
    missed), or at once by write() when no sink is left to write to. With raise_on_close=False
    close() only logs them and the caller reports them itself (`report()`, `raise_failures()`).
    """

    def __init__(self, sinks: Iterable[Sink] = (), *, raise_on_close: bool = True) -> None:
        self._slots: list[_Slot] = []
        self.raise_on_close = raise_on_close
        self._raised = False  # the failures so far were raised once; never again (no masking by close)
        for s in sinks:
            self.add(s)

    def add(self, sink: Sink) -> None:
        self._slots.append(_Slot(sink, _label(sink)))

    @property
    def sinks(self) -> list[Sink]:
        """The sinks still working (not failed, not closed)."""
        return [sl.sink for sl in self._slots if sl.error is None and not sl.closed]

    @property
    def wants_frames(self) -> bool:
        return any(getattr(s, "wants_frames", False) for s in self.sinks)

    def start(self, classes: Sequence[str]) -> None:
        """Check every sink against the model's classes before the first frame (a CSV with other
        columns is refused before any sink holds an event); raises the first sink's error."""
        for s in self.sinks:
            start = getattr(s, "start", None)
            if start is not None:
                start(classes)

    def _fail(self, slot: _Slot, e: Exception, what: str, after: str = "; it gets no more events, the other "
              "sinks go on") -> None:
        slot.error = f"{what}: {_why(e)}"
        # A bug in a sink keeps its traceback in the log; a full disk or a closed pipe does not need one.
        _log.error("%s sink: %s%s", slot.label, slot.error, after, exc_info=not isinstance(e, (OSError, MnetError)))

    def write(self, event: GradeEvent) -> None:
        for slot in self._slots:
            if slot.closed:
                continue
            if slot.error is not None:
                slot.missed += 1
                continue
            try:
                slot.sink.write(event)
                slot.written += 1
            except Exception as e:  # noqa: BLE001 -- collected: the other sinks must still get this event
                slot.missed += 1
                self._fail(slot, e, f"cannot write event {event.fruit_id}")
        stores = [sl for sl in self._slots if getattr(sl.sink, "stores", True)]
        if stores and all(sl.error is not None for sl in stores) and not self._raised:
            # Nowhere left to keep events (a live view only shows them): grading on would only lose more fruit.
            self._raised = True
            raise self._error("no sink left to write to")

    def frame(self, image: np.ndarray, info: FrameInfo) -> None:
        for slot in self._slots:
            if slot.closed or not getattr(slot.sink, "wants_frames", False):
                continue
            if slot.error is not None:
                slot.frames_missed += 1
                continue
            try:
                slot.sink.frame(image, info)
            except Exception as e:  # noqa: BLE001 -- collected, like write()
                slot.frames_missed += 1
                self._fail(slot, e, f"cannot write frame {info.index}")

    def close(self) -> None:
        """Close every sink (also failed ones: their files are released); raise the failures, if any."""
        for slot in self._slots:
            if slot.closed:
                continue
            slot.closed = True
            try:
                slot.sink.close()
            except Exception as e:  # noqa: BLE001 -- close the others; a failed sink's close error is only logged
                if slot.error is None:
                    self._fail(slot, e, "cannot close", after="")  # e.g. fsync: its events may not be on disk
                else:
                    _log.debug("%s sink: close after its error failed too: %s", slot.label, _why(e))  # the same fault
        if not (self.raise_on_close and self.failed and not self._raised):
            return
        if sys.exc_info()[1] is not None:
            # Called while another error is on its way out (grade()'s finally, an except block, __exit__):
            # raising here would replace it, so the sinks' failures are only logged.
            _log.error("%s", self._error())
            return
        self.raise_failures()

    def report(self) -> list[dict[str, Any]]:
        """Per sink: what it wrote, what it missed and its error (None while it works)."""
        return [{"sink": sl.label, "written": sl.written, "missed": sl.missed, "frames_missed": sl.frames_missed,
                 "error": sl.error} for sl in self._slots]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.report() if r["error"] is not None]

    def raise_failures(self) -> None:
        """Raise one SinkError for the sinks that failed (once: a second call does nothing)."""
        if self.failed and not self._raised:
            self._raised = True
            raise self._error()

    def _error(self, stop: str = "") -> SinkError:
        failed = self.failed
        parts = [f"{r['sink']}: {r['error']} ({r['missed']} event(s) missed"
                 + (f", {r['frames_missed']} frame(s)" if r["frames_missed"] else "") + ")" for r in failed]
        ok = [r["sink"] for r in self.report() if r["error"] is None]
        tail = f"; {stop}" if stop else (f"; {', '.join(ok)} got every event" if ok else "")
        return SinkError(f"sink failed: {'; '.join(parts)}{tail}", failed)

    def __enter__(self) -> Sinks:  # noqa: PYI034 -- typing.Self needs 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # with an error on its way out, close() logs the sinks' failures instead of raising

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
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        # Always release the fd. After a failed flush, close() retries it and fails the same way: that
        # second error would only hide the first.
        with contextlib.suppress(OSError):
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

    The model's classes fix the columns: given at open (`classes`) or by start(), the header is
    checked and written before any sink holds an event; otherwise the first event's classes fix them.
    Appending to a file with a different header is refused rather than producing a CSV no tool can read.
    """

    name = "csv"

    def __init__(self, path: str | os.PathLike, *, append: bool = True,
                 classes: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self._existing_header: list[str] | None = None
        if append and self.path.is_file() and self.path.stat().st_size > 0:
            try:
                with open(self.path, encoding="utf-8", newline="") as f:
                    self._existing_header = next(csv.reader(f), None)
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"CSV file {self.path}: cannot read its header to append to it ({e}); "
                                "write to a new file") from None
        self._f = _open_text(self.path, append, "CSV")
        self._writer = csv.writer(self._f)
        self._columns: list[str] | None = None
        if classes is not None:
            try:
                self._start(list(classes))
            except BaseException:
                self._f.close()
                raise

    @staticmethod
    def header(classes: Sequence[str]) -> list[str]:
        # The event's fields in order; schema_version is left out: the header itself tells versions apart.
        return [col for k in EVENT_FIELDS if k != "schema_version"
                for col in ([f"p_{c}" for c in classes] if k == "probs" else [k])]

    def _start(self, classes: list[str]) -> None:
        columns = self.header(classes)
        if self._existing_header is not None and self._existing_header != columns:
            raise ConfigError(f"CSV file {self.path} has columns {self._existing_header}, these events need "
                              f"{columns}; write to a new file")
        if self._existing_header is None:
            self._writer.writerow(columns)
        # Set only once checked: a refused file must not take rows later.
        self._classes, self._columns = classes, columns

    def start(self, classes: Sequence[str]) -> None:
        if self._columns is None:
            self._start(list(classes))
        elif list(classes) != self._classes:
            raise ConfigError(f"CSV file {self.path}: the model's classes {list(classes)} differ from the "
                              f"columns' {self._classes}")

    def write(self, event: GradeEvent) -> None:
        if self._columns is None:
            self._start(list(event.probs))
        elif list(event.probs) != self._classes:
            raise ConfigError(f"CSV file {self.path}: event classes {list(event.probs)} differ from the "
                              f"columns' {self._classes}")
        row: list[Any] = []
        for k in EVENT_FIELDS:
            v = getattr(event, k)
            if k == "probs":
                row += [f"{v[c]:.6f}" for c in self._classes]
            elif k != "schema_version":  # None (no reason, a field older events lack): an empty cell
                row.append("" if v is None else f"{v:.6f}" if isinstance(v, float) else v)
        self._writer.writerow(row)
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

MQTT_PASSWORD_ENV = "MNET_MQTT_PASSWORD"
_MQTT_MAX_MIDS = 65_535  # MQTT packet ids are 16 bit: paho cannot track more unacknowledged messages


def parse_mqtt_uri(uri: str) -> tuple[str, int, str, str | None, str | None, bool]:
    """mqtt[s]://[user[:password]@]host[:port]/topic/levels → (host, port, topic, user, password, tls)."""
    shown = redact(uri)  # error messages reach the console
    parts = urlsplit(uri)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"mqtt = {shown!r}: expected mqtt://host[:port]/topic (or mqtts:// for TLS)")
    tls = parts.scheme == "mqtts"
    # The topic is everything after the host, taken raw: urlsplit would read a '#' wildcard as a fragment.
    topic = unquote(uri.split("://", 1)[1].partition("/")[2])
    if not parts.hostname or not topic:
        raise ConfigError(f"mqtt = {shown!r}: needs a host and a topic, e.g. mqtt://broker:1883/factory/line1/grades")
    if any(ch in topic for ch in "+#"):
        raise ConfigError(f"mqtt = {shown!r}: topic {topic!r} has a wildcard (+ or #); publish to a plain topic")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"mqtt = {shown!r}: bad port") from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return parts.hostname, port, topic, user, password, tls


def _mqtt_password(uri_password: str | None, password_file: str | os.PathLike | None) -> str | None:
    """The file (--mqtt-password-file) first, then the URI, then $MNET_MQTT_PASSWORD."""
    if password_file is not None:
        try:
            return Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise ConfigError(f"mqtt password file {password_file}: cannot read it ({e.strerror}); "
                              "give a readable file holding only the password") from None
    return uri_password or os.environ.get(MQTT_PASSWORD_ENV) or None


class _Spool:
    """Events not yet acknowledged by the broker, on disk, so that a crash or power cut loses none.

    An append-only JSONL file: `{"seq": n, "event": "<json line>"}` (flushed and fsync'd) when an
    event is written, `{"ack": n}` (flushed only: a lost ack costs a duplicate, which consumers drop
    by event_id) when the broker acknowledged it. Opening it reads back the unacknowledged events for
    a resend and rewrites the file with only those; it is emptied whenever nothing is pending and
    removed on a clean close. An exclusive lock keeps a second process off the same file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "a+", encoding="utf-8")
        except OSError as e:
            raise DataError(f"mqtt spool {path}: cannot open for writing ({e.strerror}); "
                            "check the directory exists and is writable") from None
        try:
            import fcntl

            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            self._f.close()
            raise ConfigError(f"mqtt spool {path}: in use by another mnet process; give each grader its own "
                              "--mqtt-spool directory") from None
        self._f.seek(0)
        self.recovered = self._read(self._f)
        self._rewrite(self.recovered)
        self._next = len(self.recovered)

    def _read(self, f: TextIO) -> list[str]:
        events: dict[int, str] = {}
        torn = 0
        for line in f:
            try:
                rec = json.loads(line)
                if "ack" in rec:
                    events.pop(int(rec["ack"]), None)
                else:
                    events[int(rec["seq"])] = str(rec["event"])
            except (ValueError, KeyError, TypeError):
                torn += 1  # a crash mid-write tears at most the last line
        if torn:
            _log.warning("mqtt spool %s: %d unreadable line(s) skipped", self.path, torn)
        return [events[k] for k in sorted(events)]

    def _rewrite(self, payloads: Sequence[str]) -> None:
        self._f.seek(0)
        self._f.truncate()
        for seq, payload in enumerate(payloads):
            self._f.write(json.dumps({"seq": seq, "event": payload}) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def add(self, payload: str) -> int:
        seq, self._next = self._next, self._next + 1
        self._f.write(json.dumps({"seq": seq, "event": payload}) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        return seq

    def ack(self, seq: int) -> None:
        self._f.write(json.dumps({"ack": seq}) + "\n")
        self._f.flush()

    def clear(self) -> None:
        """Nothing is pending: drop the history so the file does not grow for ever."""
        self._f.truncate(0)
        self._f.seek(0)

    def close(self) -> None:
        """Keep only what is still unacknowledged (the file is the record of it); no file when nothing is."""
        if self._f.closed:
            return
        self._f.seek(0)
        pending = self._read(self._f)
        if pending:
            self._rewrite(pending)
        self._f.close()
        if not pending:
            self.path.unlink(missing_ok=True)


class MqttSink(Sink):
    """Publish each event as one JSON message, QoS 1 (at least once), without blocking the grading loop.

    write() appends the event to the spool (when given) and to a bounded queue; a sender thread hands
    queued events to paho-mqtt, at most `max_inflight` unacknowledged at a time (MQTT packet ids are
    16 bit, so paho can track at most 65,535). paho connects and reconnects in the background and
    resends what is in flight. With a spool, events the broker never acknowledged (broker down at
    exit, a crash, a power cut) are resent on the next start, and the session is persistent (fixed
    client id, clean_session False); duplicates carry the same event_id, so consumers drop them.
    close() waits up to `close_timeout_s` for the broker to acknowledge everything.

    The password comes from `password_file`, else the URI, else $MNET_MQTT_PASSWORD; it is never
    logged (the URI is kept only redacted).
    """

    name = "mqtt"

    def __init__(self, uri: str, *, client_id: str | None = None, qos: int = 1, close_timeout_s: float = 10.0,
                 reconnect_delay_s: tuple[float, float] = (1, 30), keepalive_s: int = 30,
                 max_buffer: int = 100_000, max_inflight: int = 1_000,
                 spool: str | os.PathLike | None = None, password_file: str | os.PathLike | None = None) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise ConfigError("the MQTT sink needs paho-mqtt 2.x: pip install 'mnet[mqtt]'") from None
        if not hasattr(mqtt, "CallbackAPIVersion"):
            raise ConfigError("the MQTT sink needs paho-mqtt >= 2.0: pip install -U 'paho-mqtt>=2'")
        if qos not in (0, 1, 2):
            raise ConfigError(f"mqtt qos = {qos!r}: expected 0, 1 or 2")
        if not 1 <= max_inflight <= _MQTT_MAX_MIDS:
            raise ConfigError(f"mqtt max_inflight = {max_inflight!r}: expected 1..{_MQTT_MAX_MIDS} "
                              "(MQTT packet ids are 16 bit)")
        self._mqtt = mqtt
        self.uri = redact(uri)  # only the redacted form is kept: it goes into logs
        host, port, self.topic, user, uri_password, tls = parse_mqtt_uri(uri)
        password = _mqtt_password(uri_password, password_file)
        if password_file is not None and not user:
            raise ConfigError(f"mqtt = {self.uri!r}: a password needs a user: mqtt://USER@host/topic")
        self.qos = qos
        self.close_timeout_s = close_timeout_s
        self.max_buffer = max_buffer
        self.max_inflight = max_inflight
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[int | None, str]] = collections.deque()  # (spool seq, payload)
        self._inflight: dict[int, int | None] = {}  # mid -> spool seq, until the broker acknowledges
        self._early_acks: set[int] = set()  # acks that beat publish() returning its mid
        self._deferred: list[int] = []  # spool seqs over max_buffer: on disk only, resent on the next start
        self._in_hand = 0  # 1 while the sender has popped an event and paho has not given it a packet id yet
        self.published = 0
        self.acked = 0
        self.unsent = 0  # events not delivered: refused, or still unacknowledged when close() gave up
        self.resent = 0  # events recovered from the spool at start
        self.overflowed = 0  # events written while the queue held max_buffer (spooled only, or dropped)
        self._connected = False
        self._closing = False

        self._spool: _Spool | None = None
        if spool is not None:
            digest = hashlib.sha1(f"{host}:{port}/{self.topic}".encode()).hexdigest()[:12]
            self._spool = _Spool(Path(spool) / f"mqtt-{digest}.jsonl")
            if client_id is None:  # fixed per machine, destination and spool, unique across machines
                client_id = "mnet-" + hashlib.sha1(f"{socket.gethostname()}|{self._spool.path.resolve()}".encode()
                                                   ).hexdigest()[:16]
            self.resent = len(self._spool.recovered)
            self._queue.extend(enumerate(self._spool.recovered))
            if self.resent:
                _log.warning("mqtt: resending %d event(s) the broker had not acknowledged (spool %s)",
                             self.resent, self._spool.path)
        persistent = bool(client_id)  # a persistent session needs a client id that stays the same

        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                   protocol=mqtt.MQTTv311, clean_session=not persistent)
        self.client_id = client_id
        if user:
            self._client.username_pw_set(user, password)
        if tls:
            self._client.tls_set()
        self._client.reconnect_delay_set(*reconnect_delay_s)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.connect_async(host, port, keepalive=keepalive_s)
        self._client.loop_start()
        self._sender = threading.Thread(target=self._send_loop, name="mnet-mqtt-send", daemon=True)
        self._sender.start()

    # paho network thread
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code == 0:
            self._connected = True
            _log.info("mqtt: connected to %s (%d event(s) awaiting ack)", self.uri, self.outstanding)
        else:
            _log.error("mqtt: broker %s refused the connection: %s", self.uri, reason_code)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self._connected:
            _log.warning("mqtt: lost connection to %s (%s); events are buffered until it is back",
                         self.uri, reason_code)
        self._connected = False

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if self.qos == 0:
            return  # counted as acknowledged when sent
        with self._cond:
            if mid in self._inflight:
                self._acked(self._inflight.pop(mid))
            else:
                self._early_acks.add(mid)
            self._cond.notify_all()

    def _acked(self, seq: int | None) -> None:  # with self._cond held
        self.acked += 1
        if self._spool is not None and seq is not None:
            try:
                if not self._pending():
                    self._spool.clear()
                else:
                    self._spool.ack(seq)
            except OSError as e:  # the event is delivered; at worst it is resent (same event_id) next start
                _log.warning("mqtt spool %s: cannot record an ack: %s", self._spool.path, e)

    # sender thread
    def _send_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or (self._queue and len(self._inflight) < self.max_inflight))
                if self._closing:
                    return
                seq, payload = self._queue.popleft()
                self._in_hand = 1
            info = self._client.publish(self.topic, payload, qos=self.qos)
            with self._cond:
                self._in_hand = 0
                if info.rc == self._mqtt.MQTT_ERR_QUEUE_SIZE:
                    # paho still holds an old message under this packet id: retry once acks free ids.
                    self._queue.appendleft((seq, payload))
                    self._cond.wait(0.05)
                elif info.rc not in (self._mqtt.MQTT_ERR_SUCCESS, self._mqtt.MQTT_ERR_NO_CONN):
                    _log.error("mqtt: an event was not queued (%s)", self._mqtt.error_string(info.rc))
                    self.unsent += 1
                elif self.qos == 0:
                    self.published += 1
                    self._acked(seq)
                else:
                    self.published += 1
                    if info.mid in self._early_acks:
                        self._early_acks.discard(info.mid)
                        self._acked(seq)
                    else:
                        self._inflight[info.mid] = seq
                self._cond.notify_all()

    def _pending(self) -> int:  # with self._cond held
        return len(self._inflight) + len(self._queue) + len(self._deferred) + self._in_hand

    @property
    def outstanding(self) -> int:
        """Events written (or recovered from the spool) that the broker has not acknowledged yet."""
        with self._cond:
            return self._pending()

    def write(self, event: GradeEvent) -> None:
        payload = event.to_line()
        with self._cond:
            over = len(self._inflight) + len(self._queue) + self._in_hand >= self.max_buffer  # all held in memory
            seq = None
            if self._spool is not None:
                seq = self._spool.add(payload)  # on disk (fsync'd) before write() returns
            if over:
                # The broker has been away for max_buffer events; memory must stay bounded.
                self.overflowed += 1
                if self.overflowed % 1000 == 1:  # once per thousand: one per fruit would flood the log
                    what = "kept in the spool for the next start" if seq is not None else "dropped"
                    _log.error("mqtt: buffer full (%d events); event %s and later ones %s (%d so far)",
                               self.max_buffer, getattr(event, "event_id", None) or event.fruit_id, what,
                               self.overflowed)
                if seq is not None:
                    self._deferred.append(seq)
                else:
                    self.unsent += 1
                return
            self._queue.append((seq, payload))
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until the broker acknowledged every queued event; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._inflight or self._queue or self._in_hand), timeout_s)

    def close(self) -> None:
        if self._client is None:
            return
        self.flush(self.close_timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._sender.join()
        self._client.disconnect()
        self._client.loop_stop()
        self._client = None
        with self._cond:
            n = self._pending()
        if n:
            self.unsent += n
            where = f"they stay in {self._spool.path} and are resent on the next start" if self._spool \
                else "they are in the JSONL log"
            _log.error("mqtt: %d event(s) not acknowledged by %s within %.0f s; %s",
                       n, self.uri, self.close_timeout_s, where)
        if self._spool is not None:
            self._spool.close()


# -------------------------------------------------------------------------------------------- video

_CLASS_COLOURS = [(80, 200, 60), (0, 200, 255), (40, 40, 230), (230, 160, 40), (200, 80, 200), (160, 160, 160)]
_FOURCC_BY_EXT = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "XVID"}


def _colour(i: int) -> tuple[int, int, int]:
    return _CLASS_COLOURS[i % len(_CLASS_COLOURS)]


def text_on_box(img: np.ndarray, text: str, org: tuple[int, int], colour: tuple[int, int, int]) -> None:
    """Draw `text` once, on a filled dark box so it reads on any belt. Not a thick dark copy under it
    as an outline: in OpenCV 5 a glyph's advance grows with the stroke thickness, so the two copies
    drift apart along the line and the text smears."""
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.5
    (tw, th), base = cv2.getTextSize(text, font, scale, 1)
    x, y = org
    cv2.rectangle(img, (x - 3, y - th - 3), (x + tw + 3, y + base + 1), (0, 0, 0), cv2.FILLED)
    cv2.putText(img, text, org, font, scale, colour, 1, cv2.LINE_AA)


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
    text_on_box(img, status, (6, 18), (255, 255, 255))
    if info.last_event is not None:
        e = info.last_event
        text = f"last: #{e.fruit_id} {e.grade} ({e.confidence:.2f})"
        text_on_box(img, text, (6, h - 8), _colour(list(e.probs).index(e.grade)))
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


# ------------------------------------------------------------------------------------ network video

STREAM_SCHEMES = ("rtp", "rtsp")
STREAM_SIZE = (1280, 720)  # the stream's fixed frame size unless told: a network stream cannot change size
_HW_ENCODER = "nvv4l2h264enc"  # Jetson's hardware H.264 encoder (JetPack); x264enc (CPU) otherwise
_SW_ENCODER = "x264enc"
_GST_HELP = ("network video (rtp://, rtsp://) needs OpenCV built with GStreamer; on a Jetson use the JetPack "
             "OpenCV (sudo apt install python3-opencv, and pip uninstall opencv-python-headless in this "
             "environment), or save to a file (--save annotated.mp4)")


def is_stream_uri(target: str | os.PathLike) -> bool:
    """Whether a --save target is a network stream (rtp://, rtsp://) rather than a video file."""
    scheme, sep, _ = str(target).partition("://")
    return bool(sep) and scheme.lower() in STREAM_SCHEMES


def parse_stream_uri(uri: str) -> tuple[str, str, int | None]:
    """rtp://HOST:PORT or rtsp://[user[:password]@]HOST[:PORT]/PATH → (scheme, host, port).

    The port of an rtp:// URI is required (a UDP stream has no default one); the path of an rtsp://
    URI names the stream on the server it is pushed to (mediamtx: any name).
    """
    shown = redact(uri)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in STREAM_SCHEMES:
        raise ConfigError(f"save = {shown!r}: expected rtp://HOST:PORT or rtsp://HOST[:PORT]/PATH for a network "
                          "stream, or a video file (annotated.mp4)")
    # The URI goes into a GStreamer pipeline: whitespace, quotes or '!' there would change the pipeline.
    if any(ch.isspace() or ch in "\"'!" for ch in uri):
        raise ConfigError(f"save = {shown!r}: whitespace, quotes and '!' are not allowed in a stream URI; "
                          "percent-encode them (%20, %22, %21)")
    try:
        port = parts.port
    except ValueError:
        port = -1  # not a number, or out of 0..65535
    if not parts.hostname:
        raise ConfigError(f"save = {shown!r}: needs a host, e.g. {scheme}://192.168.1.20:"
                          f"{'5000' if scheme == 'rtp' else '8554/belt'}")
    if port == -1 or port == 0 or (port is None and scheme == "rtp"):
        raise ConfigError(f"save = {shown!r}: needs a port 1-65535"
                          + (", e.g. rtp://192.168.1.20:5000" if scheme == "rtp" else ", e.g. :8554"))
    if scheme == "rtp" and (parts.path.strip("/") or parts.query or parts.username):
        raise ConfigError(f"save = {shown!r}: rtp:// takes only HOST:PORT (the receiver's address)")
    if scheme == "rtsp" and not parts.path.strip("/"):
        raise ConfigError(f"save = {shown!r}: needs a stream path, e.g. rtsp://HOST:8554/belt")
    return scheme, parts.hostname, port


def _gst_element_exists(name: str) -> bool:
    """Whether GStreamer has element `name`: through python gi when importable, else gst-inspect-1.0."""
    try:
        import gi

        gi.require_version("Gst", "1.0")
        from gi.repository import Gst

        Gst.init(None)
        return Gst.ElementFactory.find(name) is not None
    except (ImportError, ValueError):
        pass
    import shutil
    import subprocess

    tool = shutil.which("gst-inspect-1.0")
    if tool is None:
        return False
    try:
        return subprocess.run([tool, "--exists", name], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def pick_encoder() -> str:
    """nvv4l2h264enc where it exists (a Jetson: the encoder block, no CPU taken from grading), else x264enc."""
    return _HW_ENCODER if _gst_element_exists(_HW_ENCODER) else _SW_ENCODER


def stream_pipeline(uri: str, fps: float, size: tuple[int, int], encoder: str = _SW_ENCODER,
                    bitrate_kbps: int = 4000) -> str:
    """The GStreamer pipeline a cv2.VideoWriter turns BGR frames into an H.264 network stream with.

    rtp:// → RTP/UDP to HOST:PORT (play: a .sdp file or `gst-launch-1.0 udpsrc port=PORT ! ...`);
    rtsp:// → pushed with rtspclientsink to an RTSP server (e.g. mediamtx) that viewers then read from.
    """
    scheme, host, port = parse_stream_uri(uri)
    w, h = (int(v) for v in size)
    if w <= 0 or h <= 0 or not fps > 0:
        raise ConfigError(f"stream size {size!r} at {fps!r} fps: expected width, height and fps > 0")
    gop = max(1, round(fps))  # a keyframe every second: a viewer joining late waits at most that long
    if encoder == _HW_ENCODER:
        # The Jetson encoder reads NVMM buffers: nvvidconv copies the frame there (BGRx: it takes no BGR).
        enc = (f"videoconvert ! video/x-raw,format=BGRx ! nvvidconv ! video/x-raw(memory:NVMM),format=I420 ! "
               f"{_HW_ENCODER} bitrate={bitrate_kbps * 1000} iframeinterval={gop} idrinterval={gop} "
               "insert-sps-pps=true")
    elif encoder == _SW_ENCODER:
        # zerolatency: no B-frames nor lookahead, so a frame leaves as soon as it is encoded.
        enc = (f"videoconvert ! video/x-raw,format=I420 ! {_SW_ENCODER} tune=zerolatency speed-preset=ultrafast "
               f"bitrate={bitrate_kbps} key-int-max={gop}")
    else:
        raise ConfigError(f"stream encoder = {encoder!r}: expected {_HW_ENCODER} or {_SW_ENCODER}")
    # No caps on appsrc: OpenCV's writer sets them (BGR, the size and fps it was opened with).
    head = f"appsrc is-live=true ! queue ! {enc} ! h264parse"
    if scheme == "rtp":
        # sync=false: frames go out as they are graded, never held back by the sink's clock.
        return f"{head} ! rtph264pay config-interval=1 pt=96 ! udpsink host={host} port={port} sync=false async=false"
    return f'{head} ! rtspclientsink location="{uri}" latency=0'


def _letterbox(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`img` scaled into `size` (w, h) keeping its aspect, on black: the stream's size is fixed, sources' are not."""
    w, h = size
    ih, iw = img.shape[:2]
    if (iw, ih) == (w, h):
        return img
    s = min(w / iw, h / ih)
    nw, nh = max(1, round(iw * s)), max(1, round(ih * s))
    out = np.zeros((h, w, 3), np.uint8)
    x, y = (w - nw) // 2, (h - nh) // 2
    out[y:y + nh, x:x + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    return out


RTSP_PORT = 554  # RFC 2326's default; mediamtx listens on 8554


def _tcp_listening(host: str, port: int, timeout_s: float = 3.0) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _default_writer_factory(pipeline: str, fps: float, size: tuple[int, int]) -> Any:
    # fourcc 0: the pipeline names the encoder. The (filename, apiPreference, fourcc, fps, size, isColor)
    # overload is the same in OpenCV 4.x and 5.x.
    return cv2.VideoWriter(pipeline, cv2.CAP_GSTREAMER, 0, float(fps), size, True)


WriterFactory = Callable[[str, float, tuple[int, int]], Any]


class VideoStreamSink(Sink):
    """The annotated video as an H.264 network stream (rtp://HOST:PORT, rtsp://HOST:PORT/PATH), through
    OpenCV's GStreamer writer — what jetson-inference's videoOutput does for its network outputs.

    Opened here, not at the first frame: without GStreamer, or when the pipeline does not start (no
    RTSP server listening, a missing encoder), the run stops before grading with one line naming the
    URI (password redacted). Frames are BGR, letterboxed to the fixed `size`; fps (default 30) is the
    rate the stream declares, the grader's own pace sets when frames go out. writer_factory(pipeline,
    fps, size) builds the writer (tests inject a double; then GStreamer is not checked). check_server:
    whether an rtsp:// server must accept a TCP connection at open (default: with the real writer).
    """

    name = "stream"
    wants_frames = True

    def __init__(self, uri: str, *, fps: float | None = None, size: tuple[int, int] | None = None,
                 encoder: str | None = None, writer_factory: WriterFactory | None = None,
                 check_server: bool | None = None) -> None:
        self.scheme, self.host, self.port = parse_stream_uri(uri)
        self.shown = redact(uri)  # what logs, errors and the summary may show
        self.fps = float(fps or 30.0)
        self.size = tuple(int(v) for v in (size or STREAM_SIZE))
        real_writer = writer_factory is None
        if writer_factory is None:
            from mnet.runtime.sources import has_gstreamer  # sources imports cv2 only: no cycle, kept local

            if not has_gstreamer():
                raise ConfigError(f"save = {self.shown!r}: this OpenCV ({cv2.__version__}) was built without "
                                  f"GStreamer; {_GST_HELP}")
            writer_factory = _default_writer_factory
        if self.scheme == "rtsp" and check_server is not False and (check_server or real_writer):
            # rtspclientsink connects only once frames flow: OpenCV reports the writer open with no server
            # there and then only warns at every frame, so the server is checked here, before grading.
            port = self.port or RTSP_PORT
            if not _tcp_listening(self.host, port):
                raise ConfigError(f"save = {self.shown!r}: no RTSP server listening at {self.host}:{port}; start "
                                  "one to push the stream to (e.g. mediamtx, which listens on 8554) and check the "
                                  "host and port")
        self.encoder = encoder or pick_encoder()
        pipeline = stream_pipeline(uri, self.fps, self.size, self.encoder)
        self.pipeline = redact(pipeline)
        try:
            writer = writer_factory(pipeline, self.fps, self.size)
        except cv2.error as e:
            writer, why = None, f" ({redact(str(e)).splitlines()[0] if str(e) else 'cv2.error'})"
        else:
            why = ""
        if writer is None or not writer.isOpened():
            if writer is not None:
                writer.release()
            server = "; for rtsp:// an RTSP server (e.g. mediamtx) must be listening there" \
                if self.scheme == "rtsp" else ""
            raise ConfigError(f"save = {self.shown!r}: GStreamer could not start the stream pipeline{why}{server}; "
                              f"test it with gst-launch-1.0 (videotestsrc in place of appsrc): {self.pipeline}")
        self._writer = writer
        self.frames = 0

    def write(self, event: GradeEvent) -> None:
        """Events are drawn from the frame info; nothing to do per event."""

    def frame(self, image: np.ndarray, info: FrameInfo) -> None:
        img = _letterbox(annotate(image, info), self.size)
        self._writer.write(np.ascontiguousarray(img))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()  # sends EOS: an RTSP server sees the publisher leave cleanly
            self._writer = None


def open_sinks(*, events: str | os.PathLike | None = None, csv_path: str | os.PathLike | None = None,
               mqtt: str | None = None, save: str | os.PathLike | None = None,
               stream: TextIO | None = None, append: bool = True,
               video_fps: float | None = None, video_size: tuple[int, int] | None = None,
               classes: Sequence[str] | None = None,
               fsync_each: bool = False, raise_on_close: bool = True,
               mqtt_spool: str | os.PathLike | None = None, mqtt_password_file: str | os.PathLike | None = None,
               mqtt_client_id: str | None = None) -> Sinks:
    """Build the fan-out the CLI options describe; on a failure, closes what was already opened.

    save: a video file, or rtp://HOST:PORT / rtsp://HOST:PORT/PATH for a network stream (GStreamer; its
    fixed frame size is video_size, default STREAM_SIZE). classes: the model's, when known; a CSV whose header does not match is refused here, before the
    JSONL is opened. fsync_each: the JSONL fsyncs every event (otherwise at close). raise_on_close:
    see `Sinks`.
    """
    opened: list[Sink] = []
    try:
        # The CSV first: it is the one sink that can refuse its file, and the JSONL is then untouched.
        csv_sink = None if csv_path is None else CsvSink(csv_path, append=append, classes=classes)
        if csv_sink is not None:
            opened.append(csv_sink)
        if events is not None:
            opened.insert(0, JsonlSink(events, append=append, fsync_each=fsync_each))  # the record: written first
        if stream is not None:
            opened.append(StreamSink(stream))
        if mqtt:
            sink = MqttSink(mqtt, spool=mqtt_spool, password_file=mqtt_password_file, client_id=mqtt_client_id)
            # With a spool, MQTT is the durable record (fsynced per event), so it is written before the JSONL:
            # a SIGKILL between the two then never leaves a JSONL event that the broker will not get
            # (bench/faults.py, sigkill_restart, missed 1 run in 4 with the JSONL first).
            opened.insert(0 if mqtt_spool is not None else len(opened), sink)
        if save is not None:
            opened.append(VideoStreamSink(str(save), fps=video_fps, size=video_size) if is_stream_uri(save)
                          else VideoSink(save, fps=video_fps))
    except BaseException:
        Sinks(opened).close()  # their close errors are only logged: the open error is the one to report
        raise
    return Sinks(opened, raise_on_close=raise_on_close)
