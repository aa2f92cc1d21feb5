"""Video sources: URI grammar, files and image dirs (nothing dropped), live sources (newest frame,
reconnect with backoff) through a cv2.VideoCapture test double."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from _faultkit import avi_frame_chunks
from mnet.runtime.sources import Status, csi_pipeline, has_gstreamer, open_source, parse_uri

from mnet.errors import SourceError

# ----------------------------------------------------------------------------------------- URIs


def test_parse_camera_network_and_gst_uris():
    assert (parse_uri("0").kind, parse_uri("0").target) == ("camera", 0)
    assert (parse_uri(2).kind, parse_uri(2).target) == ("camera", 2)
    assert (parse_uri("/dev/video3").kind, parse_uri("/dev/video3").target) == ("camera", 3)
    rtsp = parse_uri("rtsp://user:pw@10.0.0.5:554/stream1")
    assert (rtsp.kind, rtsp.target, rtsp.live, rtsp.api) == ("network", "rtsp://user:pw@10.0.0.5:554/stream1",
                                                             True, cv2.CAP_FFMPEG)
    gst = parse_uri("gst:videotestsrc ! videoconvert")
    assert gst.kind == "gst" and gst.api == cv2.CAP_GSTREAMER
    assert gst.target.startswith("videotestsrc ! videoconvert") and gst.target.endswith("appsink drop=true max-buffers=1")
    assert parse_uri("gst:v4l2src ! appsink").target == "v4l2src ! appsink"  # the user's appsink is kept


def test_csi_pipeline_string():
    spec = parse_uri("csi://1?fps=60&flip=2", input_size=(1920, 1080))
    assert spec.kind == "csi" and spec.live and spec.api == cv2.CAP_GSTREAMER
    assert spec.target == (
        "nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=60/1 ! "
        "nvvidconv flip-method=2 ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
        "appsink drop=true max-buffers=1")
    assert csi_pipeline(0) in parse_uri("csi://0").target
    with pytest.raises(SourceError, match="sensor number"):
        parse_uri("csi://left")


@pytest.mark.skipif(has_gstreamer(), reason="this OpenCV has GStreamer; the missing-GStreamer message cannot show")
def test_csi_without_gstreamer_says_so():
    with pytest.raises(SourceError, match=r"csi://0.*without GStreamer"):
        open_source("csi://0")


def test_unknown_or_missing_sources_name_the_uri(tmp_path):
    with pytest.raises(SourceError, match=r"'nope\.mp4'.*no such file"):
        parse_uri("nope.mp4")
    with pytest.raises(SourceError, match=r"ftp://x/y.*unknown scheme"):
        parse_uri("ftp://x/y")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        parse_uri(str(tmp_path / "empty"))
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(SourceError, match="broken.mp4"):
        open_source(str(bad))


# -------------------------------------------------------------------------------- files and dirs


def _write_video(path: Path, n: int, codec: str, fps: float = 25.0) -> None:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (64, 48))
    assert w.isOpened()
    for i in range(n):
        img = np.full((48, 64, 3), 40, np.uint8)
        for bit in range(8):  # the frame number in binary, one 8x16 block per bit: survives lossy codecs
            img[16:32, bit * 8:(bit + 1) * 8] = 255 if (i >> bit) & 1 else 0
        w.write(img)
    w.release()


def _frame_number(img: np.ndarray) -> int:
    return sum(1 << bit for bit in range(8) if img[18:30, bit * 8 + 2:bit * 8 + 6].mean() > 128)


@pytest.mark.parametrize("codec, ext", [("MJPG", ".avi"), ("mp4v", ".mp4")])
def test_file_source_reads_every_frame_in_order(tmp_path, codec, ext):
    path = tmp_path / f"clip{ext}"
    _write_video(path, 40, codec)
    with open_source(f"file://{path}") as src:
        assert src.kind == "file" and not src.live and src.fps == pytest.approx(25.0)
        caps = list(src)
        assert src.read().status is Status.EOS and not src.streaming
        assert [c.index for c in caps] == list(range(40))
        assert [_frame_number(c.frame) for c in caps] == list(range(40))  # no frame skipped or repeated
        assert [c.ts for c in caps] == pytest.approx([i / 25.0 for i in range(40)])
        assert (src.stats.read, src.stats.delivered, src.stats.dropped) == (40, 40, 0)
    cap = cv2.VideoCapture(str(path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 40
    cap.release()


def test_file_source_input_size_and_fps_limit(tmp_path):
    path = tmp_path / "clip.avi"
    _write_video(path, 10, "MJPG")
    t = time.perf_counter()
    with open_source(str(path), input_size=(32, 24), fps_limit=100) as src:
        caps = list(src)
    assert time.perf_counter() - t >= 0.085  # 10 frames at most 100/s
    assert len(caps) == 10 and all(c.frame.shape == (24, 32, 3) for c in caps)


def test_image_dir_natural_order_and_unreadable_file(tmp_path):
    for i in (10, 2, 1):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), np.full((20, 30, 3), i, np.uint8))
    (tmp_path / "img5.jpg").write_bytes(b"corrupt")
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_source(str(tmp_path))
    assert src.kind == "images"
    got = []
    while True:
        c = src.read()
        if c.status is Status.EOS:
            break
        got.append((c.status, None if c.frame is None else int(c.frame[0, 0, 0])))
    assert got == [(Status.OK, 1), (Status.OK, 2), (Status.ERROR, None), (Status.OK, 10)]
    assert (src.stats.delivered, src.stats.errors, src.stats.dropped) == (3, 1, 0)
    single = open_source(str(tmp_path / "img2.png"))
    assert [int(c.frame[0, 0, 0]) for c in single] == [2]


# ---------------------------------------------------------------------------------- live sources


class _World:
    """A camera's state shared by every capture the factory builds (so it survives reconnects)."""

    def __init__(self, period_s: float = 0.002, fail_reads=(), refuse_opens: int = 0) -> None:
        self.period_s = period_s
        self.fail_reads = set(fail_reads)  # read numbers (over all captures) that fail
        self.refuse_opens = refuse_opens  # how many opens after the first one fail
        self.opens = 0
        self.targets = []  # what each open was given (the /dev/videoN index for cameras)
        self.reads = 0
        self.produced = 0  # frames successfully produced
        self.lock = threading.Lock()

    def factory(self, target, api):
        self.targets.append(target)
        return _FakeCapture(self)


class _FakeCapture:
    """A cv2.VideoCapture test double: frames are 6x8 images carrying their sequence number."""

    def __init__(self, world: _World) -> None:
        self.w = world
        with world.lock:
            world.opens += 1
            self._open = world.opens == 1 or world.refuse_opens <= 0
            if world.opens > 1 and world.refuse_opens > 0:
                world.refuse_opens -= 1

    def isOpened(self):
        return self._open

    def set(self, prop, value):
        return True

    def get(self, prop):
        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self):
        time.sleep(self.w.period_s)
        with self.w.lock:
            self.w.reads += 1
            if self.w.reads in self.w.fail_reads:
                return False, None
            n = self.w.produced
            self.w.produced += 1
        img = np.zeros((6, 8, 3), np.uint8)
        img.reshape(-1)[:4] = np.frombuffer(np.uint32(n).tobytes(), np.uint8)
        return True, img

    def release(self):
        self._open = False


def _seq(frame: np.ndarray) -> int:
    return int(np.frombuffer(frame.reshape(-1)[:4].tobytes(), np.uint32)[0])


def test_live_source_recovers_from_failed_reads_and_keeps_counting():
    world = _World(fail_reads={20}, refuse_opens=2)
    src = open_source("0", capture_factory=world.factory, backoff_s=(0.01, 0.05), timeout_s=2.0)
    try:
        seen = []
        deadline = time.monotonic() + 5
        while (not seen or seen[-1] < 60) and time.monotonic() < deadline:
            c = src.read()
            assert c.status in (Status.OK, Status.TIMEOUT)
            if c.ok:
                seen.append(_seq(c.frame))
        assert seen[-1] >= 60, "frames stopped after the failure"
        assert seen == sorted(set(seen))  # strictly increasing: never an old frame twice
        assert src.stats.errors == 1 and src.stats.reconnects == 1
        assert world.opens == 4  # the first open, two refused reopens, the one that worked
        assert src.streaming
    finally:
        src.close()
    assert src.read().status is Status.EOS and not src.streaming


def test_live_source_gives_up_after_max_reconnects():
    world = _World(fail_reads={5}, refuse_opens=10**6)
    src = open_source("/dev/video0", capture_factory=world.factory, backoff_s=(0.01, 0.02), max_reconnects=3)
    statuses = set()
    deadline = time.monotonic() + 5
    while src.streaming and time.monotonic() < deadline:
        statuses.add(src.read(timeout=0.5).status)
    assert not src.streaming and src.read().status is Status.ERROR
    assert Status.OK in statuses and world.opens == 1 + 3
    src.close()


def test_live_source_returns_the_newest_frame_and_counts_drops():
    world = _World(period_s=0.001)
    src = open_source("0", capture_factory=world.factory)
    try:
        first = src.read()
        assert first.ok
        time.sleep(0.1)  # a slow grader: the camera keeps producing meanwhile
        c = src.read()
        produced = world.produced
        assert c.ok and produced - _seq(c.frame) <= 10, "a stale frame was returned"
        assert _seq(c.frame) - _seq(first.frame) >= 20  # ~100 produced meanwhile; the queue was skipped
        assert c.index == _seq(c.frame)  # the capture index counts the dropped frames too
        assert src.stats.dropped >= 10
        st = src.stats
        assert st.read - st.delivered - st.dropped in (0, 1)  # at most the newest one is still pending
    finally:
        src.close()


def _closed_capture() -> type:
    """A capture class that never opens (a camera unplugged, a stream down); counts its opens."""

    class Closed:
        opens = 0

        def __init__(self, *a):
            Closed.opens += 1

        def isOpened(self):
            return False

        def release(self):
            pass

    return Closed


def test_live_source_that_cannot_open_names_the_uri():
    Closed = _closed_capture()

    with pytest.raises(SourceError, match=r"'rtsp://cam\.local/live'.*cannot connect"):
        open_source("rtsp://cam.local/live", capture_factory=Closed, open_timeout_s=0)
    with pytest.raises(SourceError, match=r"'1'.*cannot open camera 1"):
        open_source("1", capture_factory=Closed, open_timeout_s=0)


# ------------------------------------------------------------- faults (issue 14 items 3, 4, 10)


def _seq_frame(n: int) -> np.ndarray:
    img = np.zeros((6, 8, 3), np.uint8)
    img.reshape(-1)[:4] = np.frombuffer(np.uint32(n).tobytes(), np.uint8)
    return img


class _SteppingClock:
    """The `time` module as sources.py sees it, with a wall clock that steps back an hour after
    `step_after_s` (a Jetson's RTC/NTP sync after boot); monotonic and sleep are the real ones."""

    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)

    def __init__(self, step_after_s: float) -> None:
        self.step_at = time.monotonic() + step_after_s

    def time(self) -> float:
        return time.time() - (3600.0 if time.monotonic() >= self.step_at else 0.0)


def test_live_timestamps_never_go_backwards_when_the_wall_clock_steps(monkeypatch):
    monkeypatch.setattr(sys.modules[open_source.__module__], "time", _SteppingClock(step_after_s=0.1))
    src = open_source("0", capture_factory=_World(period_s=0.002).factory, timeout_s=2.0)
    try:
        stamps = []
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:
            c = src.read()
            if c.ok:
                stamps.append(c.ts)
    finally:
        src.close()
    assert len(stamps) > 20
    assert stamps == sorted(stamps), "a frame was stamped before the one ahead of it"
    # Unix time from the reading at start, advancing with the monotonic clock through the step.
    assert abs(stamps[0] - time.time()) < 5 and stamps[-1] - stamps[0] < 5


class _FakeVideoFile:
    """A video-file capture double of `declared` frames (FRAME_COUNT) of which `real` exist; reads of
    the `bad` frame numbers fail. advance_on_fail=True moves POS_FRAMES past a bad frame like OpenCV's
    MJPEG reader; False keeps it at the frames decoded so far, like FFmpeg."""

    def __init__(self, declared: int, bad=(), *, real: int | None = None, advance_on_fail: bool = True) -> None:
        self.declared, self.real = declared, declared if real is None else real
        self.bad, self.advance = set(bad), advance_on_fail
        self.next = 0  # the next frame in the container
        self.decoded = 0

    def isOpened(self):
        return True

    def set(self, prop, value):
        return False

    def get(self, prop):
        return {cv2.CAP_PROP_FPS: 25.0, cv2.CAP_PROP_FRAME_COUNT: float(self.declared),
                cv2.CAP_PROP_POS_FRAMES: float(self.next if self.advance else self.decoded)}.get(prop, 0.0)

    def read(self):
        if self.next >= self.real:
            return False, None
        i = self.next
        self.next += 1
        if i in self.bad:
            return False, None
        self.decoded += 1
        return True, _seq_frame(i)

    def release(self):
        pass


@pytest.mark.parametrize("advance_on_fail", [True, False], ids=["mjpeg-like", "ffmpeg-like"])
def test_file_source_reads_past_corrupt_frames_in_the_middle(tmp_path, caplog, advance_on_fail):
    (tmp_path / "belt.mp4").write_bytes(b"x")
    bad = {10, 11, 12, 20}
    src = open_source(str(tmp_path / "belt.mp4"), prefetch=2,
                      capture_factory=lambda t, a: _FakeVideoFile(30, bad, advance_on_fail=advance_on_fail))
    with caplog.at_level(logging.WARNING, logger="mnet.runtime.sources"), src:
        got = []
        while (c := src.read()).status is not Status.EOS:
            got.append((c.status, c.index, _seq(c.frame) if c.ok else None))
    assert [i for s, i, _ in got if s is Status.ERROR] == sorted(bad)
    assert [(i, n) for s, i, n in got if s is Status.OK] == [(i, i) for i in range(30) if i not in bad]
    assert (src.stats.read, src.stats.delivered, src.stats.errors) == (26, 26, 4)
    assert "read 26 of the 30 frames" in caplog.text and "belt.mp4" in caplog.text


def test_file_source_warns_when_the_container_holds_more_than_was_read(tmp_path, caplog):
    (tmp_path / "belt.mp4").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="mnet.runtime.sources"):
        # a truncated file: 30 frames declared, 18 there (FFmpeg keeps failing at the cut)
        with open_source(str(tmp_path / "belt.mp4"),
                         capture_factory=lambda t, a: _FakeVideoFile(30, real=18, advance_on_fail=False)) as src:
            assert [c.index for c in src] == list(range(18))
        assert src.stats.errors == 12 and "read 18 of the 30 frames" in caplog.text
        # a bogus frame count must not keep the reader spinning
        t = time.monotonic()
        with open_source(str(tmp_path / "belt.mp4"),
                         capture_factory=lambda t, a: _FakeVideoFile(10**9, real=5, advance_on_fail=False)) as src:
            assert len(list(src)) == 5
        assert time.monotonic() - t < 10 and src.stats.errors == 1000
    # a clean file says nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mnet.runtime.sources"):
        with open_source(str(tmp_path / "belt.mp4"), capture_factory=lambda t, a: _FakeVideoFile(7)) as src:
            assert len(list(src)) == 7
    assert src.stats.errors == 0 and not caplog.records


def test_real_mjpg_avi_with_a_corrupt_stretch_is_read_to_the_end(tmp_path, caplog):
    path = tmp_path / "belt.avi"
    _write_video(path, 40, "MJPG")
    data = bytearray(path.read_bytes())
    chunks = avi_frame_chunks(bytes(data))
    assert len(chunks) == 40
    for offset, size in chunks[15:20]:  # five frames' JPEG data zeroed; the container is intact
        data[offset:offset + size] = bytes(size)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mnet.runtime.sources"), open_source(str(path)) as src:
        numbers = [_frame_number(c.frame) for c in src]
    assert numbers == [*range(15), *range(20, 40)]  # before the fix: range(15), then exit as if done
    assert src.stats.errors >= 1 and "read 35 of the 40 frames" in caplog.text


def test_live_source_down_at_start_is_retried_until_it_comes_up():
    world = _World(refuse_opens=0)
    calls = {"n": 0}

    def factory(target, api):
        calls["n"] += 1
        if calls["n"] <= 3:  # the stream is not up for the first three attempts
            return type("Down", (), {"isOpened": lambda s: False, "release": lambda s: None})()
        return world.factory(target, api)

    t = time.monotonic()
    src = open_source("rtsp://cam.local/live", capture_factory=factory, backoff_s=(0.01, 0.02), open_timeout_s=5)
    try:
        assert time.monotonic() - t < 2 and calls["n"] == 4
        assert src.read(timeout=2.0).ok
    finally:
        src.close()


def test_live_source_that_stays_down_gives_up_with_one_line_and_no_password(caplog):
    Closed = _closed_capture()

    t = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="mnet.runtime.sources"), \
            pytest.raises(SourceError) as info:
        open_source("rtsp://admin:hunter2@cam.local/live", capture_factory=Closed, backoff_s=(0.02, 0.05),
                    open_timeout_s=0.3)
    elapsed, msg = time.monotonic() - t, str(info.value)
    assert 0.3 <= elapsed < 3 and Closed.opens >= 4
    assert "\n" not in msg and "cam.local/live" in msg and "cannot connect" in msg and "gave up after" in msg
    assert "hunter2" not in msg and "hunter2" not in caplog.text
    with pytest.raises(Exception, match="open_timeout_s"):
        open_source("0", capture_factory=Closed, open_timeout_s=-1)


def test_v4l_by_id_links_are_cameras(tmp_path):
    by_id = tmp_path / "v4l" / "by-id"
    by_id.mkdir(parents=True)
    link = by_id / "usb-Belt_Cam_1234-video-index0"
    link.symlink_to("/dev/video7")
    spec = parse_uri(str(link))
    assert (spec.kind, spec.target, spec.link, spec.live) == ("camera", 7, str(link), True)
    udev = tmp_path / "belt-cam"  # a udev SYMLINK+= name, itself pointing at the by-id link
    udev.symlink_to(link)
    assert parse_uri(f"v4l2://{udev}").target == 7
    # a camera unplugged at start has no by-id link yet: still a camera (opening retries it)
    missing = parse_uri("/dev/v4l/by-id/usb-Not_Plugged_In-video-index0")
    assert (missing.kind, missing.link) == ("camera", "/dev/v4l/by-id/usb-Not_Plugged_In-video-index0")
    # a link to a video file is still a file
    _write_video(tmp_path / "clip.avi", 2, "MJPG")
    (tmp_path / "latest.avi").symlink_to(tmp_path / "clip.avi")
    assert parse_uri(str(tmp_path / "latest.avi")).kind == "file"


def test_camera_that_returns_as_another_device_is_found_through_its_link(tmp_path):
    link = tmp_path / "usb-Belt_Cam_1234-video-index0"
    link.symlink_to("/dev/video3")
    world = _World(fail_reads={10})
    real_read = _FakeCapture.read

    def unplug_then_replug(cap):
        ok, frame = real_read(cap)
        if not ok:  # the camera drops off the bus; it re-enumerates as /dev/video5 a moment later
            link.unlink()
            threading.Timer(0.1, lambda: link.symlink_to("/dev/video5")).start()
        return ok, frame

    capture = type("Replugging", (_FakeCapture,), {"read": unplug_then_replug})
    src = open_source(str(link), capture_factory=lambda t, a: (world.targets.append(t), capture(world))[1],
                      backoff_s=(0.02, 0.05), timeout_s=2.0)
    try:
        deadline = time.monotonic() + 5
        while src.stats.read < 30 and time.monotonic() < deadline:
            src.read()
        assert src.stats.read >= 30, "frames stopped after the camera came back as /dev/video5"
        assert world.targets == [3, 5] and src.stats.reconnects == 1
    finally:
        src.close()


def test_grade_retries_a_source_down_at_start_for_the_configured_time():
    from mnet.preprocess import Preprocess
    from mnet.runtime.grader import GradeConfig, grade

    Closed = _closed_capture()

    class Never:
        def infer(self, x):
            raise AssertionError("no frame was ever read")

    for timeout, at_least in ((0.0, 1), (0.3, 2)):
        Closed.opens = 0
        with pytest.raises(SourceError, match="cannot connect"):
            grade(Never(), Preprocess((32, 24)), ["A", "B"], "rtsp://cam.local/live",
                  GradeConfig(open_timeout_s=timeout, warmup=False), capture_factory=Closed)
        assert (Closed.opens == 1) if timeout == 0 else (Closed.opens >= at_least)
