"""Video sources: URI grammar, files and image dirs (nothing dropped), live sources (newest frame,
reconnect with backoff) through a cv2.VideoCapture test double."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
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
        self.reads = 0
        self.produced = 0  # frames successfully produced
        self.lock = threading.Lock()

    def factory(self, target, api):
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


def test_live_source_that_cannot_open_names_the_uri():
    class Closed:
        def __init__(self, *a):
            pass

        def isOpened(self):
            return False

        def release(self):
            pass

    with pytest.raises(SourceError, match=r"'rtsp://cam\.local/live'.*cannot connect"):
        open_source("rtsp://cam.local/live", capture_factory=Closed)
    with pytest.raises(SourceError, match=r"'1'.*cannot open camera 1"):
        open_source("1", capture_factory=Closed)
