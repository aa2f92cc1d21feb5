"""Sinks: JSONL / CSV content and durability, the fan-out, annotated video through real codecs, and
MQTT against a real mosquitto broker (including the broker going down and coming back)."""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from mnet.runtime.grader import FrameInfo
from mnet.runtime.localize import Box
from mnet.runtime.sinks import (
    CsvSink,
    JsonlSink,
    MqttSink,
    Sink,
    VideoSink,
    annotate,
    open_sinks,
    parse_mqtt_uri,
)
from mnet.runtime.tracker import TrackView

from mnet.errors import ConfigError, DataError
from mnet.events import GradeEvent


def _ev(i: int, grade: str = "A") -> GradeEvent:
    probs = {"A": 0.1, "B": 0.1, "C": 0.1}
    probs[grade] = 0.8
    return GradeEvent.from_probs(i, probs, frames=5, views=1, first_ts=i * 1.0, last_ts=i + 0.5, source="belt.mp4",
                                 model="tiny")


# ----------------------------------------------------------------------------------- JSONL / CSV


def test_jsonl_lines_flushed_per_event_and_fsynced_at_close(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "out" / "events.jsonl"
    sink = JsonlSink(path)
    sink.write(_ev(1))
    sink.write(_ev(2, "C"))
    # flushed per event: another reader sees both lines before close
    assert [json.loads(line)["fruit_id"] for line in path.read_text().splitlines()] == [1, 2]
    assert synced == []
    sink.close()
    assert len(synced) == 1
    assert [GradeEvent.from_json(line) for line in path.read_text().splitlines()] == [_ev(1), _ev(2, "C")]
    JsonlSink(path).close()  # append is the default: a restart never truncates the record
    assert len(path.read_text().splitlines()) == 2
    JsonlSink(path, append=False).close()
    assert path.read_text() == ""


def test_appending_after_a_torn_last_line_starts_a_fresh_line(tmp_path, caplog):
    """A crash mid-write leaves a last line without its newline; grading that appends to the file must not glue
    its first event onto it: the torn line stays (reported), every other line parses."""
    from mnet.preprocess import Preprocess
    from mnet.runtime.grader import GradeConfig, grade

    path = tmp_path / "events.jsonl"
    torn = _ev(2).to_line()[:25]
    path.write_text(_ev(1).to_line() + "\n" + torn)
    shots = tmp_path / "shots"
    shots.mkdir()
    cv2.imwrite(str(shots / "a.jpg"), np.full((48, 64, 3), 200, np.uint8))

    class Constant:
        name = "constant"

        def infer(self, x):
            return np.tile(np.array([[0.1, 0.8, 0.1]], np.float32), (len(x), 1))

    with caplog.at_level("WARNING", logger="mnet.runtime.sinks"):
        summary = grade(Constant(), Preprocess((24, 32)), ("A", "B", "C"), str(shots),
                        GradeConfig.from_options(full_frame=True), open_sinks(events=path))
    assert summary.fruit_graded == 1
    lines = path.read_text().split("\n")
    assert lines[-1] == "" and len(lines) == 4  # full, torn, new, and the final newline
    assert GradeEvent.from_json(lines[0]) == _ev(1) and lines[1] == torn
    new = GradeEvent.from_json(lines[2])
    assert (new.fruit_id, new.grade, new.source) == (1, "B", str(shots))
    assert any("last line is torn" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    # a whole file gets no extra line, an empty one no leading newline
    for text in (_ev(1).to_line() + "\n", ""):
        path.write_text(text)
        sink = JsonlSink(path)
        sink.write(_ev(3))
        sink.close()
        assert sink.torn_lines == 0 and path.read_text() == text + _ev(3).to_line() + "\n"


def test_csv_rows_and_header_checks(tmp_path):
    path = tmp_path / "events.csv"
    sink = CsvSink(path)
    sink.write(_ev(1))
    sink.write(_ev(2, "B"))
    sink.close()
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["fruit_id", "grade", "confidence", "p_A", "p_B", "p_C", "frames", "views", "first_ts",
                             "last_ts", "source", "model"]
    assert [(r["fruit_id"], r["grade"], float(r["p_B"])) for r in rows] == [("1", "A", 0.1), ("2", "B", 0.8)]
    again = CsvSink(path)  # appending with the same columns: no second header
    again.write(_ev(3))
    again.close()
    assert len(list(csv.DictReader(path.open()))) == 3
    other = CsvSink(path)
    with pytest.raises(ConfigError, match="has columns"):
        other.write(GradeEvent.from_probs(4, {"ok": 0.6, "bad": 0.4}, frames=1, views=1, first_ts=0, last_ts=0,
                                          source="s", model="m"))
    other.close()


def test_stream_sink_and_fan_out_closes_everything(tmp_path):
    buf = io.StringIO()

    class Broken(Sink):
        name = "broken"
        closed = False

        def write(self, event):
            raise OSError(28, "No space left on device")

        def close(self):
            Broken.closed = True
            raise OSError("close failed")

    sinks = open_sinks(events=tmp_path / "e.jsonl", csv_path=tmp_path / "e.csv", stream=buf)
    assert len(sinks) == 3 and not sinks.wants_frames
    sinks.write(_ev(7))
    assert json.loads(buf.getvalue())["fruit_id"] == 7
    sinks.add(Broken())
    with pytest.raises(DataError, match="broken sink.*event 8.*No space"):
        sinks.write(_ev(8))
    with pytest.raises(OSError, match="close failed"):
        sinks.close()
    assert Broken.closed and (tmp_path / "e.csv").read_text().count("\n") == 3  # header + 2 rows


# -------------------------------------------------------------------------------------------- video


def _info(i: int, boxes) -> FrameInfo:
    tracks = [TrackView(k + 1, b, np.array([0.8, 0.1, 0.1]), False, 0) for k, b in enumerate(boxes)]
    return FrameInfo(index=i, capture_index=i, ts=i / 20, boxes=boxes, tracks=tracks, events=[], stage_ms={},
                     fps=123.0, input_fps=30.0, dropped=0, graded=i, classes=("A", "B", "C"), roi=(0, 0, 160, 120),
                     trigger_x=80.0, source_fps=20.0, last_event=_ev(1) if i else None)


@pytest.mark.parametrize("name, fourcc", [("out.mp4", "mp4v"), ("out.avi", "MJPG")])
def test_video_sink_writes_annotated_frames_through_real_codecs(tmp_path, name, fourcc):
    sink = VideoSink(tmp_path / name)
    assert sink.codec == fourcc and sink.wants_frames
    frame = np.full((120, 160, 3), 40, np.uint8)
    box = Box(20, 30, 50, 40)
    for i in range(12):
        sink.frame(frame, _info(i, [box]))
    sink.close()
    cap = cv2.VideoCapture(str(tmp_path / name))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(20.0)
    ok, img = cap.read()
    cap.release()
    assert ok and img.shape == (120, 160, 3)
    # the box outline is drawn in grade A's colour (green dominant) where the plain frame was grey
    edge = img[30:70, 20:23].reshape(-1, 3).mean(axis=0)
    assert edge[1] > 120 and edge[1] > edge[2] + 40
    assert frame.mean() == 40  # annotate drew on a copy


def test_annotate_draws_trigger_line_and_status():
    frame = np.zeros((120, 160, 3), np.uint8)
    img = annotate(frame, _info(3, []))
    assert img[60:120, 80].mean() > 100  # the trigger line (top rows carry the status text)
    assert img[5:20, 5:150].max() == 255  # the status line


# --------------------------------------------------------------------------------------------- MQTT


def test_parse_mqtt_uri():
    assert parse_mqtt_uri("mqtt://broker/line1/grades") == ("broker", 1883, "line1/grades", None, None, False)
    assert parse_mqtt_uri("mqtts://u:p%40ss@h:8884/t") == ("h", 8884, "t", "u", "p@ss", True)
    for bad in ("http://h/t", "mqtt://h", "mqtt://h/a/#"):
        with pytest.raises(ConfigError, match="mqtt"):
            parse_mqtt_uri(bad)


def _mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


class _Broker:
    """A private mosquitto on 127.0.0.1:<free port>, with persistence so it can be stopped and restarted."""

    def __init__(self, binary: str, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (workdir / "db").mkdir()
        self.conf = workdir / "mosquitto.conf"
        # `user`: run as whoever runs the tests (as root mosquitto would otherwise switch to the
        # 'mosquitto' user, which cannot write the persistence db into pytest's private tmp dir).
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
                             f"persistence true\npersistence_location {workdir / 'db'}/\n")
        self.binary, self.log = binary, workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence db and exits
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def broker(tmp_path):
    binary = _mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto binary not found (apt-get install mosquitto) — MQTT sink tests need a real broker")
    b = _Broker(binary, tmp_path)
    b.start()
    yield b
    b.stop()


class _Subscriber:
    """A QoS 1 subscriber with a persistent session: the broker keeps its messages while it is away."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.received: list[dict] = []
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="mnet-test-sub", clean_session=False)
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.c.on_message = lambda c, u, m: self.received.append(json.loads(m.payload))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.subscribed.wait(5), "subscriber could not subscribe"

    def ids(self) -> set:
        return {m["fruit_id"] for m in self.received}

    def wait_for(self, n: int, timeout: float = 10.0) -> set:
        deadline = time.monotonic() + timeout
        while len(self.ids()) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.ids()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_mqtt_publishes_every_event_as_json(broker):
    sub = _Subscriber(broker.port, "factory/line1/grades")
    try:
        sink = MqttSink(f"mqtt://127.0.0.1:{broker.port}/factory/line1/grades", close_timeout_s=5)
        for i in range(1, 6):
            sink.write(_ev(i, "ABC"[i % 3]))
        sink.close()
        assert sink.unsent == 0 and sink.acked == 5
        assert sub.wait_for(5) == {1, 2, 3, 4, 5}
        assert GradeEvent.from_json(sub.received[0]) == _ev(sub.received[0]["fruit_id"], sub.received[0]["grade"])
    finally:
        sub.close()


def test_mqtt_buffers_while_the_broker_is_down_and_loses_nothing(broker):
    topic = "factory/line1/grades"
    sub = _Subscriber(broker.port, topic)
    sink = MqttSink(f"mqtt://127.0.0.1:{broker.port}/{topic}", reconnect_delay_s=(0.1, 0.5), close_timeout_s=15)
    try:
        for i in range(1, 6):
            sink.write(_ev(i))
        assert sink.flush(5) and sub.wait_for(5) == set(range(1, 6))

        broker.stop()
        t = time.perf_counter()
        for i in range(6, 36):  # more than paho's 20 in-flight messages, all while the broker is away
            sink.write(_ev(i))
        assert time.perf_counter() - t < 0.5, "write() blocked while the broker was down"
        time.sleep(0.3)
        assert sink.outstanding == 30

        broker.start()
        for i in range(36, 41):
            sink.write(_ev(i))
        sink.close()  # waits for the broker to acknowledge everything
        assert sink.unsent == 0 and sink.outstanding == 0
        assert sub.wait_for(40, timeout=15) == set(range(1, 41))
    finally:
        sub.close()
