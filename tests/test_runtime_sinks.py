"""Sinks: JSONL / CSV content and durability, the fan-out, annotated video through real codecs, and
MQTT against a real mosquitto broker (including the broker going down and coming back)."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from _faultkit import Broker, mosquitto_binary
from mnet.runtime.grader import FrameInfo
from mnet.runtime.localize import Box
from mnet.runtime.sinks import (
    CsvSink,
    JsonlSink,
    MqttSink,
    Sink,
    SinkError,
    Sinks,
    VideoSink,
    VideoStreamSink,
    annotate,
    is_stream_uri,
    open_sinks,
    parse_mqtt_uri,
    parse_stream_uri,
    stream_pipeline,
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
    shots = _one_shot(tmp_path)

    with caplog.at_level("WARNING", logger="mnet.runtime.sinks"):
        summary = grade(_Constant(), Preprocess((24, 32)), ("A", "B", "C"), str(shots),
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
    assert list(rows[0]) == ["run_id", "event_id", "lane", "fruit_id", "grade", "reason", "confidence", "p_A", "p_B",
                             "p_C", "frames", "views", "first_ts", "last_ts", "source", "model"]
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
    sinks.write(_ev(8))  # the broken sink is set aside; the others got event 8
    assert len(sinks) == 3
    # its close error does not replace its first one
    with pytest.raises(SinkError, match=r"broken: cannot write event 8: \[Errno 28\] No space.*1 event\(s\) missed") as e:
        sinks.close()
    assert "close failed" not in str(e.value) and isinstance(e.value, DataError)
    assert Broken.closed and (tmp_path / "e.csv").read_text().count("\n") == 3  # header + 2 rows
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 2


def _one_shot(tmp_path: Path) -> Path:
    """A folder holding one plain image: one fruit with --full-frame."""
    shots = tmp_path / "shots"
    shots.mkdir()
    cv2.imwrite(str(shots / "a.jpg"), np.full((48, 64, 3), 200, np.uint8))
    return shots


class _Constant:
    """A backend that grades every crop B."""

    name = "constant"

    def infer(self, x):
        return np.tile(np.array([[0.1, 0.8, 0.1]], np.float32), (len(x), 1))


def _open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_sink_costs_only_its_own_events(tmp_path, caplog):
    """`--events /dev/full --csv x.csv`: the CSV gets every event, the JSONL's failure is named with its OS error
    and the events it missed, raised once at close (never replaced by its close error), and its fd is released."""
    buf = io.StringIO()
    sinks = open_sinks(events="/dev/full", csv_path=tmp_path / "x.csv", stream=buf)
    with caplog.at_level("ERROR", logger="mnet.runtime.sinks"):
        for i in (1, 2, 3):
            sinks.write(_ev(i))
    assert [r["fruit_id"] for r in csv.DictReader((tmp_path / "x.csv").open())] == ["1", "2", "3"]
    assert [json.loads(line)["fruit_id"] for line in buf.getvalue().splitlines()] == [1, 2, 3]
    assert any("/dev/full" in r.getMessage() and "No space left" in r.getMessage() for r in caplog.records)
    assert len(sinks) == 2  # the JSONL is set aside
    with pytest.raises(SinkError) as e:
        sinks.close()
    msg = str(e.value)
    assert "jsonl /dev/full: cannot write event 1" in msg and "No space left on device" in msg
    assert "3 event(s) missed" in msg and f"csv {tmp_path / 'x.csv'}" in msg and "\n" not in msg
    assert e.value.failures == [{"sink": "jsonl /dev/full", "written": 0, "missed": 3, "frames_missed": 0,
                                 "error": "cannot write event 1: [Errno 28] No space left on device"}]
    assert "/dev/full" not in _open_fds()
    sinks.close()  # raised once: closing again neither raises nor reopens anything


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_no_sink_left_stops_at_once_and_close_does_not_mask_it(tmp_path):
    sinks = open_sinks(events="/dev/full")
    with pytest.raises(SinkError, match=r"jsonl /dev/full: cannot write event 1.*No space.*no sink left"):
        sinks.write(_ev(1))
    sinks.close()  # the error above is the one reported: its close error is only logged
    assert "/dev/full" not in _open_fds()
    # a plain JsonlSink on a full disk releases its fd even though its close fails
    sink = JsonlSink("/dev/full")
    sink._f.write("x\n")
    with pytest.raises(OSError, match="No space"):
        sink.close()
    assert sink._f.closed


def test_fan_out_collects_frame_and_close_failures_and_closes_every_sink(tmp_path):
    events, frames, closed = [], [], []

    class Fake(Sink):
        def __init__(self, name, wants_frames=False, fail_write=False, fail_frame=False, fail_close=False):
            self.name, self.wants_frames = name, wants_frames
            self.fail_write, self.fail_frame, self.fail_close = fail_write, fail_frame, fail_close

        def write(self, event):
            if self.fail_write:
                raise ValueError("a bug in the sink")
            events.append((self.name, event.fruit_id))

        def frame(self, image, info):
            if self.fail_frame:
                raise OSError(5, "Input/output error")
            frames.append((self.name, info.index))

        def close(self):
            closed.append(self.name)
            if self.fail_close:
                raise OSError(5, "fsync failed")

    sinks = Sinks([Fake("buggy", fail_write=True), Fake("video", True, fail_frame=True), Fake("ok", True),
                   Fake("slow", fail_close=True)])
    img = np.zeros((8, 8, 3), np.uint8)
    for i in (1, 2):
        sinks.write(_ev(i))
        sinks.frame(img, _info(i, []))
    assert events == [("video", 1), ("ok", 1), ("slow", 1), ("ok", 2), ("slow", 2)]  # video is set aside
    assert frames == [("ok", 1), ("ok", 2)] and sinks.wants_frames
    with pytest.raises(SinkError) as e:
        sinks.close()
    assert closed == ["buggy", "video", "ok", "slow"]
    assert [(f["sink"], f["missed"], f["frames_missed"]) for f in e.value.failures] == [
        ("buggy", 2, 0), ("video", 1, 2), ("slow", 0, 0)]
    msg = str(e.value)
    assert "buggy: cannot write event 1: ValueError: a bug in the sink" in msg
    assert "video: cannot write frame 1: [Errno 5] Input/output error" in msg
    assert "slow: cannot close: [Errno 5] fsync failed" in msg and "ok got every event" in msg


def test_an_error_on_its_way_out_is_not_replaced_by_a_sink_failure():
    class Broken(Sink):
        name = "broken"

        def write(self, event):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    class Fine(Broken):
        name = "fine"

        def write(self, event):
            pass

    with pytest.raises(KeyError, match="the first error"), Sinks([Broken(), Fine()]) as sinks:
        sinks.write(_ev(1))
        raise KeyError("the first error")
    sinks = Sinks([Broken(), Fine()])
    with pytest.raises(KeyError, match="the first error"):
        try:  # grade(): a backend error, then its `finally` closes the sinks
            sinks.write(_ev(1))
            raise KeyError("the first error")
        finally:
            sinks.close()
    quiet = Sinks([Broken(), Fine()], raise_on_close=False)
    quiet.write(_ev(1))
    quiet.close()  # reported by the caller instead
    assert [f["sink"] for f in quiet.failed] == ["broken"]
    with pytest.raises(SinkError, match="broken"):
        quiet.raise_failures()


def test_a_csv_with_other_columns_is_refused_before_the_jsonl_holds_anything(tmp_path):
    from mnet.preprocess import Preprocess
    from mnet.runtime.grader import GradeConfig, grade

    other = tmp_path / "old.csv"
    other.write_text("fruit_id,grade,p_ok,p_bad\n1,ok,0.9,0.1\n")
    jsonl = tmp_path / "e.jsonl"
    # told the classes at open (the CLI): refused before the JSONL is even opened
    with pytest.raises(ConfigError, match="has columns"):
        open_sinks(events=jsonl, csv_path=other, classes=("A", "B", "C"))
    assert not jsonl.exists()
    # not told (a library caller): grade() starts every sink before the first frame
    shots = _one_shot(tmp_path)

    with pytest.raises(ConfigError, match="has columns"):
        grade(_Constant(), Preprocess((24, 32)), ("A", "B", "C"), str(shots), GradeConfig.from_options(full_frame=True),
              open_sinks(events=jsonl, csv_path=other))
    assert jsonl.read_text() == ""
    assert other.read_text() == "fruit_id,grade,p_ok,p_bad\n1,ok,0.9,0.1\n"
    # a new CSV started with the classes gets its header before any event; other classes are refused
    fresh = CsvSink(tmp_path / "new.csv")
    fresh.start(("A", "B", "C"))
    fresh.start(["A", "B", "C"])
    with pytest.raises(ConfigError, match="differ"):
        fresh.start(("A", "B"))
    fresh.close()
    assert (tmp_path / "new.csv").read_text().splitlines() == [",".join(CsvSink.header(["A", "B", "C"]))]


def test_open_sinks_passes_fsync_each_to_the_jsonl(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    sinks = open_sinks(events=tmp_path / "e.jsonl", fsync_each=True)
    sinks.write(_ev(1))
    sinks.write(_ev(2))
    assert len(synced) == 2
    sinks.close()
    assert open_sinks(events=tmp_path / "f.jsonl").sinks[0].fsync_each is False


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


def test_annotate_draws_the_header_and_last_text_once():
    """Each text is one pass on a dark box, exactly as one putText draws it: no second, thicker copy whose
    wider glyph advance (OpenCV 5) drifts from the first and smears the line; the input frame is untouched."""
    import dataclasses

    frame = np.full((120, 320, 3), 90, np.uint8)
    info = dataclasses.replace(_info(3, []), roi=None, trigger_x=None)
    img = annotate(frame, info)
    assert (frame == 90).all()
    font = cv2.FONT_HERSHEY_SIMPLEX
    for text, org, colour in (("123.0 fps  graded 3  dropped 0", (6, 18), (255, 255, 255)),
                              ("last: #1 A (0.80)", (6, 112), (80, 200, 60))):
        (tw, th), base = cv2.getTextSize(text, font, 0.5, 1)
        ref = np.zeros_like(frame)  # the same text drawn once, on black
        cv2.putText(ref, text, org, font, 0.5, colour, 1, cv2.LINE_AA)
        rows = slice(org[1] - th - 2, org[1] + base + 1)
        assert (img[rows, org[0] - 2:org[0] + tw + 3] == ref[rows, org[0] - 2:org[0] + tw + 3]).all(), text
        assert (img[rows, org[0] + tw + 4:] == 90).all(), text  # nothing drawn past the text's own width


# ---------------------------------------------------------------------------------- network video


def test_stream_pipeline_for_rtp_and_rtsp():
    rtp = stream_pipeline("rtp://192.168.1.20:5000", 30, (640, 480), "x264enc")
    assert rtp.startswith("appsrc ")
    assert "x264enc tune=zerolatency" in rtp and "key-int-max=30" in rtp
    assert rtp.endswith("h264parse ! rtph264pay config-interval=1 pt=96 ! udpsink host=192.168.1.20 port=5000 "
                        "sync=false async=false")
    rtsp = stream_pipeline("rtsp://cam:pw@10.0.0.5:8554/belt", 25, (1280, 720), "nvv4l2h264enc")
    assert "nvvidconv ! video/x-raw(memory:NVMM),format=I420 ! nvv4l2h264enc bitrate=4000000" in rtsp
    assert "iframeinterval=25" in rtsp and "x264enc" not in rtsp and "udpsink" not in rtsp
    assert rtsp.endswith('h264parse ! rtspclientsink location="rtsp://cam:pw@10.0.0.5:8554/belt" latency=0')
    with pytest.raises(ConfigError, match="encoder"):
        stream_pipeline("rtp://h:5000", 30, (640, 480), "vp8enc")
    with pytest.raises(ConfigError, match="size"):
        stream_pipeline("rtp://h:5000", 30, (0, 480))


def _gst_missing(*elements: str) -> str | None:
    """Why GStreamer cannot run a pipeline of `elements` here (None: it can)."""
    import shutil

    from mnet.runtime.sinks import _gst_element_exists

    if not shutil.which("gst-launch-1.0"):
        return "no gst-launch-1.0 (.ci/run installs gstreamer1.0-tools and its plugins)"
    missing = [e for e in elements if not _gst_element_exists(e)]
    return f"GStreamer has no {', '.join(missing)} here" if missing else None


def _h264_nal_types(rtp_payload: bytes) -> set[int]:
    """The H.264 NAL unit types one RTP packet carries (RFC 6184: single NAL, STAP-A, or FU-A's first part)."""
    kind = rtp_payload[0] & 0x1F
    if kind == 24:  # STAP-A: 16-bit size, NAL, ...
        out, i = set(), 1
        while i + 2 < len(rtp_payload):
            n = int.from_bytes(rtp_payload[i:i + 2], "big")
            out.add(rtp_payload[i + 2] & 0x1F)
            i += 2 + n
        return out
    if kind == 28:  # FU-A: the fragmented NAL's type is in the FU header (start bit set on its first part)
        return {rtp_payload[1] & 0x1F} if rtp_payload[1] & 0x80 else set()
    return {kind}


def _gst_send(uri: str, frames: int = 20, eos_may_hang: bool = False) -> None:
    """Run the pipeline `VideoStreamSink` hands OpenCV for `uri` in GStreamer itself (gst-launch-1.0), a test
    source in place of OpenCV's appsrc: PyPI's OpenCV has no GStreamer, a Jetson's has.

    `eos_may_hang`: rtspclientsink (GStreamer 1.22) now and then never finishes its teardown after EOS (2 runs
    in 15 here); the caller then judges by what the server received."""
    import shlex
    import subprocess

    pipeline = stream_pipeline(uri, 30, (320, 240), "x264enc")
    head = "appsrc is-live=true"
    assert pipeline.startswith(head)
    # what OpenCV's writer gives its appsrc: BGR frames of the size and rate it was opened with
    src = f"videotestsrc num-buffers={frames} is-live=true ! video/x-raw,format=BGR,width=320,height=240,framerate=30/1"
    try:
        run = subprocess.run(["gst-launch-1.0", "-q", *shlex.split(src + pipeline[len(head):])],
                             capture_output=True, text=True, timeout=30 if eos_may_hang else 120)
    except subprocess.TimeoutExpired:
        if eos_may_hang:
            return
        raise
    assert run.returncode == 0, run.stderr[-2000:]


_SEND = ("videotestsrc", "videoconvert", "x264enc", "h264parse")


def test_rtp_stream_pipeline_runs_in_real_gstreamer():
    """rtp://: a receiver gets RTP H.264 with SPS, PPS and a keyframe."""
    why = _gst_missing(*_SEND, "rtph264pay", "udpsink")
    if why:
        pytest.skip(why)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(0.5)
    _gst_send(f"rtp://127.0.0.1:{rx.getsockname()[1]}")
    packets = []
    try:
        while True:
            packets.append(rx.recv(65536))
    except TimeoutError:
        pass
    finally:
        rx.close()
    assert packets, "no RTP packet arrived"
    assert all(p[0] >> 6 == 2 and p[1] & 0x7F == 96 for p in packets)  # RTP v2, the payload type we set
    nals = set().union(*(_h264_nal_types(p[12 + 4 * (p[0] & 0x0F):]) for p in packets))
    assert {7, 8, 5} <= nals, nals  # SPS, PPS (config-interval=1) and an IDR frame: a late viewer can start


def _python_with_rtsp_server() -> str | None:
    """An interpreter that can run tests/rtsp_record_server.py (PyGObject + gst-rtsp-server), or None."""
    import shutil
    import subprocess

    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    for exe in dict.fromkeys(x for x in (sys.executable, "/usr/bin/python3", shutil.which("python3")) if x):
        if subprocess.run([exe, "-c", probe], capture_output=True, timeout=60).returncode == 0:
            return exe
    return None


def test_rtsp_stream_pipeline_publishes_to_a_real_rtsp_server(tmp_path):
    """rtsp://: rtspclientsink publishes (ANNOUNCE/RECORD) to a real RTSP server, which receives the H.264."""
    import subprocess

    why = _gst_missing(*_SEND, "rtspclientsink")
    exe = None if why else _python_with_rtsp_server()
    if why or exe is None:
        pytest.skip(why or "no python3-gi with gst-rtsp-server (.ci/run installs them)")
    got = tmp_path / "received.h264"
    server = subprocess.Popen([exe, str(Path(__file__).with_name("rtsp_record_server.py")), "belt", str(got)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        _gst_send(f"rtsp://127.0.0.1:{port}/belt", eos_may_hang=True)
        deadline, size = time.monotonic() + 10, -1
        while time.monotonic() < deadline:  # until the server's file stops growing (its filesink flushes late)
            time.sleep(0.3)
            now = got.stat().st_size if got.exists() else 0
            if now and now == size:
                break
            size = now
    finally:
        server.kill()
        server.wait(timeout=10)
    data = got.read_bytes()
    nals = {data[i + 3] & 0x1F for i in range(len(data) - 3) if data[i:i + 3] == b"\x00\x00\x01"}
    assert {7, 8, 5} <= nals, nals  # SPS, PPS and an IDR frame reached the server


@pytest.mark.parametrize("uri, why", [
    ("rtp://:5000", "needs a host"),
    ("rtp://host", "needs a port"),
    ("rtp://host:0", "needs a port"),
    ("rtp://host:70000", "needs a port"),
    ("rtp://host:port", "needs a port"),
    ("rtsp://host:99999/belt", "needs a port"),
    ("rtp://host:5000/path", "only HOST:PORT"),
    ("rtsp://host:8554", "stream path"),
    ("rtsp://host:8554/a b", "whitespace"),
    ("rtsp://host:8554/x ! filesink location=/etc/x", "whitespace"),
    ("http://host:80/x", "expected rtp://"),
])
def test_stream_uri_validation(uri, why):
    with pytest.raises(ConfigError, match=why) as e:
        parse_stream_uri(uri)
    assert "\n" not in str(e.value)


def test_stream_uri_parsing_and_detection():
    assert parse_stream_uri("rtp://10.0.0.2:5000") == ("rtp", "10.0.0.2", 5000)
    assert parse_stream_uri("rtsp://u:p@server/belt") == ("rtsp", "server", None)  # the RTSP default port
    assert is_stream_uri("rtp://h:1") and is_stream_uri("RTSP://h/x")
    assert not is_stream_uri("annotated.mp4") and not is_stream_uri(Path("out/rtp.mp4"))


def test_stream_without_gstreamer_is_one_redacted_line_at_open(monkeypatch):
    import mnet.runtime.sources

    monkeypatch.setattr(mnet.runtime.sources, "has_gstreamer", lambda: False)  # as the PyPI OpenCV here
    with pytest.raises(ConfigError) as e:
        open_sinks(save="rtsp://admin:hunter2@cam.local:8554/belt")
    msg = str(e.value)
    assert "\n" not in msg and "hunter2" not in msg
    assert "rtsp://admin:***@cam.local:8554/belt" in msg and "GStreamer" in msg and "JetPack" in msg


def test_a_stream_that_does_not_open_fails_at_open_redacted():
    class Closed:
        released = False

        def isOpened(self):
            return False

        def release(self):
            Closed.released = True

    with pytest.raises(ConfigError) as e:
        VideoStreamSink("rtsp://admin:hunter2@cam:8554/belt", encoder="x264enc",
                        writer_factory=lambda *a: Closed())
    msg = str(e.value)
    assert "\n" not in msg and "hunter2" not in msg and Closed.released
    assert "could not start" in msg and "mediamtx" in msg and 'location="rtsp://admin:***@cam:8554/belt"' in msg


def test_rtsp_without_a_listening_server_fails_at_open_redacted():
    """rtspclientsink connects only once frames flow (OpenCV then reports the writer open and warns per frame),
    so the server is checked at open: one line, password redacted, before the writer is even built."""
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    built = []
    with pytest.raises(ConfigError) as e:
        VideoStreamSink(f"rtsp://op:hunter2@127.0.0.1:{port}/belt", encoder="x264enc", check_server=True,
                        writer_factory=lambda *a: built.append(a))
    msg = str(e.value)
    assert "\n" not in msg and "hunter2" not in msg and not built
    assert f"rtsp://op:***@127.0.0.1:{port}/belt" in msg and "no RTSP server listening" in msg and "mediamtx" in msg
    with socket.socket() as server:  # a listening server: the sink opens
        server.bind(("127.0.0.1", 0))
        server.listen()

        class Writer:
            def isOpened(self):
                return True

            def release(self):
                pass

        sink = VideoStreamSink(f"rtsp://127.0.0.1:{server.getsockname()[1]}/belt", encoder="x264enc",
                               check_server=True, writer_factory=lambda *a: Writer())
        sink.close()


def test_stream_sink_writes_bgr_frames_at_the_fixed_size():
    class Writer:
        def __init__(self, pipeline, fps, size):
            self.args, self.frames, self.released = (pipeline, fps, size), [], False

        def isOpened(self):
            return True

        def write(self, img):
            self.frames.append(img.copy())

        def release(self):
            self.released = True

    made: list[Writer] = []
    sink = VideoStreamSink("rtp://127.0.0.1:5000", fps=20, size=(320, 180), encoder="x264enc",
                           writer_factory=lambda *a: made.append(Writer(*a)) or made[-1])
    w = made[0]
    assert w.args == (stream_pipeline("rtp://127.0.0.1:5000", 20, (320, 180), "x264enc"), 20.0, (320, 180))
    assert sink.wants_frames and sink.shown == "rtp://127.0.0.1:5000"
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[..., 0] = 200  # pure blue in BGR
    for i, size in enumerate([(120, 160), (180, 320), (90, 200)]):  # sources of other sizes are letterboxed
        f = np.ascontiguousarray(np.broadcast_to(frame[:1, :1], (*size, 3)))
        sink.frame(f, _info(i, []))
    sink.close()
    assert w.released and sink.frames == 3
    assert all(img.shape == (180, 320, 3) and img.dtype == np.uint8 for img in w.frames)
    mid = w.frames[0][60, 120]  # source (40, 53): off the ROI, trigger line and text, the frame's own pixel
    assert mid[0] > 150 and mid[1] < 30 and mid[2] < 30  # still blue: BGR in, BGR out
    assert (w.frames[0][:, :20] == 0).all()  # 4:3 into 16:9: black bars left and right, not stretched


# --------------------------------------------------------------------------------------------- MQTT


def test_parse_mqtt_uri():
    assert parse_mqtt_uri("mqtt://broker/line1/grades") == ("broker", 1883, "line1/grades", None, None, False)
    assert parse_mqtt_uri("mqtts://u:p%40ss@h:8884/t") == ("h", 8884, "t", "u", "p@ss", True)
    for bad in ("http://h/t", "mqtt://h", "mqtt://h/a/#"):
        with pytest.raises(ConfigError, match="mqtt"):
            parse_mqtt_uri(bad)


@pytest.fixture
def broker(tmp_path):
    if mosquitto_binary() is None:
        pytest.skip("mosquitto binary not found (apt-get install mosquitto) — MQTT sink tests need a real broker")
    b = Broker(tmp_path)
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
