"""The live view (`mnet grade --serve`): page, status, Prometheus metrics, health and the MJPEG stream
against real grading runs of a synthetic conveyor clip; no encoding without a viewer; the token; the
default bind; and the page in headless chromium (skipped with the reason where it is not installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from mnet.runtime.grader import GradeConfig, grade
from mnet.runtime.lanes import LaneSpec, grade_lanes
from mnet.runtime.serve import LiveView, ServeConfig
from mnet.runtime.sinks import Sinks
from prometheus_client.parser import text_string_to_metric_families

from mnet.conveyor import make_conveyor_video
from mnet.errors import ConfigError
from mnet.preprocess import Preprocess

CLASSES = ("A", "B", "C")
PRE = Preprocess((24, 32))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("belt") / "belt.mp4"
    make_conveyor_video(path, fruits=6, seed=1, size_wh=(640, 480), speed_px=20)
    return str(path)


class Colour:
    """A fake backend: a crop's 'grade' is its colour, red A, green B, yellow C (grades vary along the belt)."""

    name = "colour"

    def infer(self, x):
        r, g = x[:, 0].mean(axis=(1, 2)), x[:, 1].mean(axis=(1, 2))
        m = np.stack([r - g, g - r, 0.4 - np.abs(r - g)], axis=1) * 8.0  # red A, green B, yellow C
        e = np.exp(m - m.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _get(view, path, headers=None, timeout=10):
    req = urllib.request.Request(view.url.rstrip("/") + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _run_in_background(view, clip, fps_limit=None):
    """A real grading run on its own thread, reporting to `view`; returns (thread, result holder)."""
    out = {}

    def run():
        out["summary"] = grade(view.watch(Colour()), PRE, CLASSES, clip, GradeConfig.from_options(fps_limit=fps_limit),
                               Sinks([view.sink()]), model="colour", on_frame=view.on_frame)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _read_parts(view, n, timeout=15, query=""):
    """n JPEG parts from /stream.mjpg, parsed from the multipart stream."""
    resp = urllib.request.urlopen(view.url + "stream.mjpg" + query, timeout=timeout)
    try:
        assert resp.headers["Content-Type"].startswith("multipart/x-mixed-replace; boundary=")
        boundary = resp.headers["Content-Type"].split("boundary=")[1].encode()
        parts = []
        while len(parts) < n:
            line = resp.readline().strip()
            if not line:
                continue
            assert line == b"--" + boundary, line
            headers = {}
            while (h := resp.readline().strip()):
                k, v = h.decode().split(":", 1)
                headers[k.lower()] = v.strip()
            assert headers["content-type"] == "image/jpeg"
            parts.append(resp.read(int(headers["content-length"])))
        return parts
    finally:
        resp.close()


def _metrics(view) -> dict[str, float]:
    status, headers, body = _get(view, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


# ------------------------------------------------------------------------------------ endpoints, live
def test_page_status_metrics_health_and_stream_during_a_real_run(clip):
    with LiveView(ServeConfig(port=0, stall_s=0.5), backend="colour", precision="fp32", model="m") as view:
        assert view.address[0] == "127.0.0.1"
        t, out = _run_in_background(view, clip, fps_limit=40)
        assert _wait_for(lambda: view.status()["frames"] >= 5), "no frames reached the view"

        status, headers, body = _get(view, "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b"stream.mjpg" in body and b"status.json" in body
        status, _, body = _get(view, "/healthz")
        assert status == 200 and body.startswith(b"ok")

        parts = _read_parts(view, 2)  # two frames, annotated, while grading goes on
        for p in parts:
            img = cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR)
            assert img is not None and img.shape == (480, 640, 3)
        assert view.encodes >= 2

        status, headers, body = _get(view, "/status.json")
        s = json.loads(body)
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert s["backend"] == "colour" and s["precision"] == "fp32" and s["frames"] >= 5 and s["fps"] > 0
        assert {"localise", "preprocess", "track", "capture"} <= set(s["stages"])
        assert all(v["p99_ms"] >= v["p50_ms"] >= 0 for v in s["stages"].values())
        assert _get(view, "/nope")[0] == 404 and _get(view, "/stream.mjpg?lane=1")[0] == 404

        t.join(60)
        summary = out["summary"]
        assert summary.fruit_graded >= 4
        s = view.status()
        assert s["graded"] == summary.fruit_graded and s["grades"] == summary.grades
        assert s["views"] == summary.views and s["infer_errors"] == 0
        assert s["events"] and s["events"][0]["grade"] in CLASSES  # newest first

        m = _metrics(view)
        assert m["mnet_frames_processed_total{lane=lane0}"] == summary.frames_processed
        assert m["mnet_frames_dropped_total{lane=lane0}"] == summary.frames_dropped
        assert m["mnet_views_total"] == summary.views and m["mnet_infer_errors_total"] == 0
        assert {k: v for k, v in m.items() if k.startswith("mnet_fruit_graded_total")} == \
            {f"mnet_fruit_graded_total{{grade={g},lane=lane0}}": float(n) for g, n in summary.grades.items()}
        assert m["mnet_stage_latency_seconds_count{stage=localise}"] == summary.frames_processed
        assert m["mnet_stage_latency_seconds_count{stage=infer}"] == summary.stages["infer"]["n"]
        assert m["mnet_grading_info{backend=colour,model=m,precision=fp32,source=}"] == 1.0
        assert m["mnet_live_view_jpeg_encodes_total"] == view.encodes

        # the source has ended: no frame for stall_s, the watchdog is told
        assert _wait_for(lambda: _get(view, "/healthz")[0] == 503, timeout=5)


def test_no_viewer_no_encoding(clip):
    with LiveView(ServeConfig(port=0)) as view:
        _t, out = _run_in_background(view, clip)
        _t.join(60)
        assert out["summary"].frames_processed > 50 and view.status()["frames"] == out["summary"].frames_processed
        assert view.encodes == 0 and _metrics(view)["mnet_live_view_jpeg_encodes_total"] == 0
        # a viewer arriving after the end still sees the last frame
        (jpeg,) = _read_parts(view, 1)
        assert jpeg[:2] == b"\xff\xd8" and view.encodes >= 1


def test_the_grading_thread_only_hands_over_the_newest_frame(clip):
    view = LiveView(ServeConfig(port=0))  # not started: no encoder
    _t, out = _run_in_background(view, clip)
    _t.join(60)
    frame, info = view.lanes[0].latest
    assert info.index + 1 == out["summary"].frames_processed and frame.shape == (480, 640, 3)


# ------------------------------------------------------------------------------------ several lanes
@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("belt2") / "small.mp4"
    make_conveyor_video(path, fruits=4, seed=2, size_wh=(320, 240), speed_px=12)
    return str(path)


@pytest.fixture(scope="module")
def clip2(tmp_path_factory):
    path = tmp_path_factory.mktemp("belt3") / "belt2.mp4"
    make_conveyor_video(path, fruits=6, seed=3, size_wh=(640, 480), speed_px=16)
    return str(path)


def _lanes_in_background(view, clips, fps_limit=None):
    out = {}
    specs = [LaneSpec(name, c) for name, c in zip(("left", "right"), clips)]

    def run():
        out["summary"] = grade_lanes(view.watch(Colour()), PRE, CLASSES, specs,
                                     GradeConfig.from_options(fps_limit=fps_limit), Sinks([view.sink()]),
                                     model="colour", on_frame=view.on_lane_frame)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_lanes_a_mosaic_each_lane_alone_and_counters_per_lane(clip, small_clip):
    with LiveView(ServeConfig(port=0, stall_s=0.5), backend="colour", precision="fp32",
                  lanes=[("left", "belt.mp4"), ("right", "small.mp4")]) as view:
        t, out = _lanes_in_background(view, [clip, small_clip], fps_limit=30)
        assert _wait_for(lambda: all(lane["frames"] >= 3 for lane in view.status()["lanes"]))
        (mosaic,) = _read_parts(view, 1)  # both lanes side by side, each in a 640x480 tile
        img = cv2.imdecode(np.frombuffer(mosaic, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (480, 1280, 3)
        assert img[:, :640].std() > 10 and img[:, 640:].std() > 10  # neither tile blank
        (right,) = _read_parts(view, 1, query="?lane=1")  # one lane at its own size
        assert cv2.imdecode(np.frombuffer(right, np.uint8), cv2.IMREAD_COLOR).shape == (240, 320, 3)
        for bad in ("2", "x", "-1"):
            assert _get(view, f"/stream.mjpg?lane={bad}")[0] == 404
        assert b"2 lanes" in _get(view, "/")[2]
        t.join(60)
        lanes = out["summary"].lanes
        s = view.status()
        assert [x["name"] for x in s["lanes"]] == ["left", "right"]
        for mine, res in zip(s["lanes"], lanes):
            assert mine["frames"] == res.summary.frames_processed and mine["graded"] == res.summary.fruit_graded
            assert mine["grades"] == res.summary.grades
        assert s["graded"] == sum(res.summary.fruit_graded for res in lanes) >= 6
        assert {e["lane_name"] for e in s["events"]} == {"left", "right"}
        m = _metrics(view)
        for res in lanes:
            assert m[f"mnet_frames_processed_total{{lane={res.name}}}"] == res.summary.frames_processed
            for g, n in res.summary.grades.items():
                assert m[f"mnet_fruit_graded_total{{grade={g},lane={res.name}}}"] == n
        assert m["mnet_views_total"] == sum(res.summary.views for res in lanes)
        # both sources ended: the watchdog hears which lanes are stalled
        assert _wait_for(lambda: _get(view, "/healthz")[2].startswith(b"stalled: left, right"), timeout=5)
        status, _, body = _get(view, "/healthz")
        assert status == 503 and "last frame left" in body.decode()


def test_only_the_watched_lane_is_drawn(clip, small_clip):
    with LiveView(ServeConfig(port=0), lanes=[("left", ""), ("right", "")]) as view:
        t, _ = _lanes_in_background(view, [clip, small_clip], fps_limit=30)
        assert _wait_for(lambda: view.status()["frames"] >= 4)
        _read_parts(view, 2, query="?lane=1")
        t.join(60)
        assert view.encodes >= 2 and view._channels[None].seq == 0 and view._channels[0].seq == 0
        assert view.lanes[0].tile is None  # lane 0 never annotated: nobody watched it, nor the mosaic


def test_the_stream_rate_gives_way_to_a_cpu_budget(clip):
    """A JPEG that costs more than the budget allows at stream_fps spaces the stream out, not the grading."""
    with LiveView(ServeConfig(port=0, stream_fps=30, cpu_share=0.01)) as view:
        t, _ = _run_in_background(view, clip, fps_limit=20)
        assert _wait_for(lambda: view.status()["frames"] >= 2)
        resp = urllib.request.urlopen(view.url + "stream.mjpg", timeout=15)
        stamps = []
        while len(stamps) < 3:  # the arrival of each part's boundary line
            if resp.readline().startswith(b"--mnetframe"):
                stamps.append(time.monotonic())
        resp.close()
        per_jpeg_s = view.encode_cpu_s / view.encodes
        view.close()
        t.join(60)
    gaps = np.diff(stamps)
    # at 30 fps the parts would come every 33 ms (20 fps of frames: 50 ms); the budget allows one per
    # per_jpeg_s / 0.01 seconds (a JPEG costs a millisecond or more)
    assert gaps.min() >= 0.5 * per_jpeg_s / 0.01 and gaps.min() > 0.07, (gaps, per_jpeg_s)


def test_the_view_is_not_a_place_to_keep_events(clip):
    """A run whose only working sink is the live view stops as if it had none: it keeps nothing."""
    from mnet.runtime.sinks import Sink, SinkError

    class Full(Sink):
        name = "jsonl"

        def write(self, event):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    view = LiveView(ServeConfig(port=0))
    with pytest.raises(SinkError, match="no sink left"):
        grade(Colour(), PRE, CLASSES, clip, GradeConfig(), Sinks([Full(), view.sink()]), model="colour")
    assert view.status()["graded"] >= 1  # it showed what it saw


def test_grade_cli_serves_several_lanes(cli_grade, capsys, monkeypatch, tmp_path):
    run, seen = cli_grade
    monkeypatch.delenv("MNET_SERVE_TOKEN", raising=False)
    assert run("--source", str(tmp_path / "shots"), "--serve", "127.0.0.1:0") == 0
    out = capsys.readouterr().out
    assert "live view → http://127.0.0.1:" in out and "2 lanes" in out
    (s,) = seen
    assert [lane["name"] for lane in s["lanes"]] == ["lane0", "lane1"]
    assert s["frames"] == 6 and s["graded"] == 6 and all(lane["graded"] == 3 for lane in s["lanes"])
    assert run("--source", str(tmp_path / "shots"), "--show") == 2
    assert "--serve" in capsys.readouterr().err  # the way to see several lanes


# ------------------------------------------------------------------------------------ binding and token
def test_binds_loopback_by_default_and_parses_addresses():
    assert ServeConfig().host == "127.0.0.1"
    assert ServeConfig.parse("8080") == ServeConfig(port=8080)
    assert ServeConfig.parse(":0").host == "127.0.0.1"
    assert ServeConfig.parse("localhost:9000").port == 9000
    assert ServeConfig.parse("[::1]:0").host == "::1"
    for bad in ("host:port", "127.0.0.1:99999", ""):
        with pytest.raises(ConfigError, match="serve"):
            ServeConfig.parse(bad)
    with LiveView(ServeConfig.parse("0")) as view:
        assert view.address[0] == "127.0.0.1" and view.url.startswith("http://127.0.0.1:")


def test_other_hosts_need_a_token_and_every_request_must_carry_it():
    for host in ("0.0.0.0", "192.168.1.5", "grader.local", "::"):
        with pytest.raises(ConfigError, match="token"):
            ServeConfig(host=host, port=0)
    assert ServeConfig(host="0.0.0.0", port=0, token="s3cret").token == "s3cret"
    with pytest.raises(ConfigError, match="empty"):
        ServeConfig(token=" ")

    with LiveView(ServeConfig(port=0, token="s3cret")) as view:
        for path in ("/", "/status.json", "/metrics", "/healthz", "/stream.mjpg"):
            status, headers, _ = _get(view, path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
        assert _get(view, "/metrics", {"Authorization": "Bearer wrong"})[0] == 401
        assert _get(view, "/status.json?token=wrong")[0] == 401
        assert _get(view, "/metrics", {"Authorization": "Bearer s3cret"})[0] == 200
        assert _get(view, "/status.json?token=s3cret")[0] == 200
        status, _, body = _get(view, "/?token=s3cret")
        assert status == 200 and b"location.search" in body  # the page passes its token on


def test_a_port_in_use_is_a_clear_error():
    with LiveView(ServeConfig(port=0)) as view:
        with pytest.raises(ConfigError, match="cannot listen"):
            LiveView(ServeConfig(port=view.address[1])).start()


# ------------------------------------------------------------------------------------ a real browser
def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (Debian: apt-get install chromium)")
def test_the_page_in_headless_chromium_shows_frames_lanes_and_counters(clip, clip2, tmp_path):
    shot = tmp_path / "live-view.png"
    common = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=4000", "--window-size=1400,800"]
    with LiveView(ServeConfig(port=0), backend="colour", precision="fp32", model="mnet-24-32",
                  lanes=[("left", "belt.mp4"), ("right", "belt2.mp4")]) as view:
        t, _ = _lanes_in_background(view, [clip, clip2], fps_limit=12)  # ~17 s of belt: it runs on
        assert _wait_for(lambda: view.status()["graded"] >= 1)
        dom = subprocess.run([*common, "--dump-dom", view.url], capture_output=True, text=True, timeout=90)
        subprocess.run([*common, f"--screenshot={shot}", view.url], capture_output=True, timeout=90)
        encodes, graded = view.encodes, view.status()["graded"]
        view.close()  # ends the stream; the run itself goes on to the end of the clips
        t.join(60)
    assert "<td>graded</td>" in dom.stdout and "<td>fps</td>" in dom.stdout, dom.stderr[-2000:]
    assert "colour fp32" in dom.stdout  # backend and precision, filled in by the page's script
    assert "?lane=0" in dom.stdout and ">right</a>" in dom.stdout  # the lanes table links each lane
    assert shot.exists(), "chromium wrote no screenshot"
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (800, 1400)
    for x0 in (40, 640):  # both tiles of the mosaic (scaled to the page: ~570 px each), not blank
        video = img[80:420, x0:x0 + 480]
        assert video.std() > 20 and len(np.unique(video.reshape(-1, 3), axis=0)) > 500, f"the video at x={x0} is blank"
    assert encodes >= 1 and graded >= 1
    if os.environ.get("MNET_SAVE_SCREENSHOT"):  # refresh the README's picture
        Path(os.environ["MNET_SAVE_SCREENSHOT"]).write_bytes(shot.read_bytes())


def test_the_batched_stage_histogram_matches_prometheus_own():
    from mnet.runtime.serve import _LATENCY_BUCKETS_S, _Metrics
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    values_ms = [0.1, 0.5, 0.5001, 1.0, 3.0, 20.0, 20.5, 700.0, 5000.0]  # bucket edges included (le: <=)
    m = _Metrics()
    m.stage.add({"localise": values_ms[:4]})
    m.stage.add({"localise": values_ms[4:], "infer": [2.0]})
    ref = CollectorRegistry()
    h = Histogram("mnet_stage_latency_seconds", m.stage.help, ["stage"], buckets=_LATENCY_BUCKETS_S, registry=ref)
    for v in values_ms:
        h.labels("localise").observe(v / 1e3)
    h.labels("infer").observe(2.0 / 1e3)

    def samples(registry):
        fams = text_string_to_metric_families(generate_latest(registry).decode())
        return {(s.name, tuple(sorted(s.labels.items()))): round(s.value, 9) for f in fams for s in f.samples
                if s.name.startswith("mnet_stage_latency_seconds") and not s.name.endswith("_created")}

    assert samples(m.registry) == samples(ref)


# ------------------------------------------------------------------------------------ through the CLI
@pytest.fixture
def cli_grade(fake_grade, tmp_path, monkeypatch):
    """`fake_grade` (three still images, a constant backend) and what the live view reported as it closed."""
    seen = []
    close = LiveView.close
    monkeypatch.setattr(LiveView, "close", lambda self: (seen.append(self.status()), close(self))[1])

    def run(*args: str) -> int:
        return fake_grade("--events", str(tmp_path / "e.jsonl"), *args)

    return run, seen


def test_grade_cli_serves_the_run(cli_grade, capsys, monkeypatch):
    run, seen = cli_grade
    monkeypatch.delenv("MNET_SERVE_TOKEN", raising=False)
    assert run("--serve", "127.0.0.1:0") == 0
    assert "live view → http://127.0.0.1:" in capsys.readouterr().out
    (s,) = seen
    # every fruit, also the last shot's, which the end-of-source flush emits after the last frame (the view
    # counts events from its sink, not from FrameInfo)
    assert s["frames"] == 3 and s["graded"] == 3 and s["grades"] == {"A": 0, "B": 3, "C": 0}
    assert s["views"] == 3 and s["backend"] == "constant" and s["precision"] == "fp32"


def test_grade_cli_refuses_another_host_without_a_token(cli_grade, capsys, monkeypatch, tmp_path):
    run, seen = cli_grade
    monkeypatch.delenv("MNET_SERVE_TOKEN", raising=False)
    assert run("--serve", "0.0.0.0:0") == 2
    err = capsys.readouterr().err
    assert "token" in err and "Traceback" not in err and not seen
    assert not (tmp_path / "e.jsonl").exists()  # refused before any sink opened
    monkeypatch.setenv("MNET_SERVE_TOKEN", "s3cret")  # the environment variable is the token
    assert run("--serve", "0.0.0.0:0") == 0 and len(seen) == 1
