"""Credentials never leave the process: source and MQTT URIs are redacted in events (JSONL, CSV),
the summary, logs and error messages; the user is kept, the password becomes ***."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest
from conftest import ByBrightness, FakeCapture
from mnet.runtime.grader import GradeConfig, Grader, grade
from mnet.runtime.sinks import open_sinks, parse_mqtt_uri
from mnet.runtime.sources import parse_uri

from mnet.errors import ConfigError, SourceError
from mnet.preprocess import Preprocess
from mnet.redact import redact

CLASSES = ("A", "B", "C")


@pytest.mark.parametrize("text, shown", [
    ("rtsp://admin:secret@cam.local:554/stream1", "rtsp://admin:***@cam.local:554/stream1"),
    ("rtsps://admin:se%40cret@cam/s", "rtsps://admin:***@cam/s"),
    ("rtsp://admin:p@ss@cam/s", "rtsp://admin:***@cam/s"),  # an unescaped '@' in the password
    ("rtsp://admin:ab/secret@cam/s", "rtsp://admin:***@cam/s"),  # an unescaped '/' in the password
    ("rtsp://admin:se?cret@cam/s", "rtsp://admin:***@cam/s"),  # ... or '?'
    ("mqtts://line1:secret@broker:8883/f/grades", "mqtts://line1:***@broker:8883/f/grades"),
    ("http://cam/video?user=admin&password=secret&fps=5", "http://cam/video?user=admin&password=***&fps=5"),
    ("rtsp://cam/s?token=secret", "rtsp://cam/s?token=***"),
    ("gst:rtspsrc location=rtsp://u:secret@cam/s user-pw=secret ! decodebin",
     "gst:rtspsrc location=rtsp://u:***@cam/s user-pw=*** ! decodebin"),
    ('gst:rtspsrc user-pw="se cret" ! x', "gst:rtspsrc user-pw=*** ! x"),
    ("source 'file://user:secret@frames': no such file", "source 'file://user:***@frames': no such file"),
])
def test_redact_hides_passwords_and_keeps_the_user(text, shown):
    assert redact(text) == shown
    assert redact(shown) == shown  # idempotent


@pytest.mark.parametrize("text", ["belt.mp4", "0", "/dev/video0", "csi://0?width=640", "rtsp://cam.local:554/live@1",
                                  "rtsp://[fe80::1]:554/live@1", "http://cam/x?mail=a@b",
                                  "rtsp://viewer@cam/s", "mqtt://broker/line1/grades", "gst:videotestsrc ! appsink",
                                  "bypass=1", ""])
def test_redact_leaves_uris_without_secrets_alone(text):
    assert redact(text) == text


def test_source_uri_is_stored_redacted_and_only_the_capture_target_keeps_the_password(tmp_path, monkeypatch):
    spec = parse_uri("rtsp://admin:secret@cam.local/stream")
    assert spec.uri == "rtsp://admin:***@cam.local/stream"
    assert spec.target == "rtsp://admin:secret@cam.local/stream"  # what OpenCV connects with
    monkeypatch.chdir(tmp_path)
    for bad in ("file://user:secret@nowhere", "ftp://user:secret@host/x"):
        with pytest.raises(SourceError) as e:
            parse_uri(bad)
        assert "secret" not in str(e.value) and "user:***@" in str(e.value)


def test_mqtt_uri_errors_do_not_echo_the_password():
    for bad in ("mqtt://u:secret@h", "mqtt://u:secret@h/a/#", "http://u:secret@h/t", "mqtt://u:secret@h:x/t"):
        with pytest.raises(ConfigError) as e:
            parse_mqtt_uri(bad)
        assert "secret" not in str(e.value)


def _camera(frames: int):
    """A fake network camera: `frames` distinct shots, then the stop flag is set by the test."""
    state = {"reads": 0}

    class Camera(FakeCapture):
        def __init__(self, target, api):
            assert "secret" in str(target)  # the capture itself still gets the credentials
            super().__init__(target, api)

        def read(self):
            time.sleep(0.002)
            state["reads"] += 1
            return True, np.full((48, 64, 3), 120 * (state["reads"] % 3), np.uint8)

    return Camera


def _assert_no_secret(*texts: str) -> None:
    for t in texts:
        assert "secret" not in t, t


def test_grading_an_rtsp_source_with_credentials_leaks_them_nowhere(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    uri = "rtsp://admin:secret@cam.local/stream?token=secret"
    sinks = open_sinks(events=tmp_path / "e.jsonl", csv_path=tmp_path / "e.csv")
    stop = threading.Event()
    seen = []

    def on_frame(img, info):
        seen.append(info)
        if len(seen) == 6:
            stop.set()

    summary = grade(ByBrightness(), Preprocess((24, 32)), CLASSES, uri, GradeConfig.from_options(full_frame=True),
                    sinks, stop=stop, on_frame=on_frame, capture_factory=_camera(6))
    events = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert events and {e["source"] for e in events} == {"rtsp://admin:***@cam.local/stream?token=***"}
    assert summary.to_json()["source"] == "rtsp://admin:***@cam.local/stream?token=***"
    _assert_no_secret((tmp_path / "e.jsonl").read_text(), (tmp_path / "e.csv").read_text(),
                      json.dumps(summary.to_json()), caplog.text, *(r.getMessage() for r in caplog.records))


def test_grading_a_file_uri_with_credentials_keeps_them_out_of_events(tmp_path, monkeypatch, caplog):
    import cv2

    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)
    shots = tmp_path / "user:secret@frames"
    shots.mkdir()
    for i in range(3):
        cv2.imwrite(str(shots / f"shot{i}.png"), np.full((48, 64, 3), 120 * i, np.uint8))
    sinks = open_sinks(events=tmp_path / "e.jsonl", csv_path=tmp_path / "e.csv")
    summary = grade(ByBrightness(), Preprocess((24, 32)), CLASSES, "file://user:secret@frames",
                    GradeConfig.from_options(full_frame=True), sinks)
    events = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert len(events) == 3 and {e["source"] for e in events} == {"file://user:***@frames"}
    _assert_no_secret((tmp_path / "e.jsonl").read_text(), (tmp_path / "e.csv").read_text(),
                      json.dumps(summary.to_json()), caplog.text)


def test_a_grader_built_with_a_raw_uri_redacts_it_in_its_events():
    with Grader(ByBrightness(), Preprocess((24, 32)), CLASSES, GradeConfig.from_options(full_frame=True),
                source="rtsp://admin:secret@cam/s") as g:
        assert g.source == "rtsp://admin:***@cam/s"  # what every event it builds carries
