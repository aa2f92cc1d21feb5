"""Fault-injection bench (issue 14): grade a synthetic conveyor clip with a real bundle, one fault at a time.

A tiny-preset MNet with random weights is exported to a real bundle (onnxruntime CPU; grading only has
to run, not be right) and a conveyor clip with a truth file is written once. Each case then grades the
clip through the real runtime and injects one fault:

    baseline           no fault (what the tracker makes of the clip)
    backend_raise      the backend raises on every Nth call (in-process wrapper around the real one)
    nan_output         the backend returns NaN rows on every Nth call
    broker_kill9       mosquitto SIGKILLed and restarted mid-run (`mnet grade --mqtt --mqtt-spool` process)
    sigkill_restart    the grading process SIGKILLed mid-run, then started again (spool + --fsync every)
    sigterm_mid_fruit  SIGTERM while fruit are in view (exit code, every fruit seen written)
    full_disk_sink     --events /dev/full plus --csv (exit 2, one error line, CSV complete)
    corrupt_video      frames zeroed inside an MJPG AVI's chunks (the container stays intact)
    clock_step         a live source whose wall clock steps back an hour mid-run (patched `time` in sources)
    camera_vanish      a /dev/v4l/by-id-style link removed mid-run and re-created to another /dev/videoN; the
                       "camera" is the clip played in real time by a capture_factory (the belt moves on while
                       it is away), so fruit that pass during the outage are really gone

Counting: events are deduplicated by event_id (what an idempotent consumer does), then matched to the
truth by frame span (a file's timestamps are media time; a live source's are mapped back through the
clip's clock). `lost` = truth fruit without an event, `lost_reason` says why when the design cannot keep
them (never seen long enough while the process or the camera was up), `lost_keepable` = the rest, which
must be 0. `duplicates` = extra events for one physical fruit after the dedupe (a consumer cannot remove
those); `raw_duplicates` = copies of one event_id before it (at-least-once delivery). `secret_seen`: the
secret from the MQTT password file and from a `user:secret@` source URI grepped in every output file,
stdout/stderr and log. `ok`: the row meets the issue's targets.

    python bench/faults.py                      # every case (about a minute: the live cases run in real time)
    python bench/faults.py --cases baseline,nan_output
    python bench/faults.py --bundle demo/bundle # a trained bundle instead of the random one
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # imported by tests/test_faults_bench.py
    sys.path.append(str(Path(__file__).resolve().parent))  # last: bench/runtime.py must not shadow anything
from _common import emit  # noqa: E402
from _faultkit import Broker, avi_frame_chunks  # noqa: E402

SECRET = "S3cr3t-faults-pw"  # in the MQTT password file and the source URI; must appear in no output
TOPIC = "factory/line1/grades"
USER = "line1"
CLIP_FPS = 30


# ------------------------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class Env:
    """What every case shares: the bundle, the clip and its truth, and a scratch folder."""

    work: Path
    bundle: Path
    clip: Path  # MJPG AVI (the corrupt case needs its chunk layout)
    truth: dict

    @property
    def fruits(self) -> list[dict]:
        return self.truth["fruits"]

    @property
    def secret_link(self) -> str:
        """The clip behind a `file://user:SECRET@…` URI, relative to `work` (redact() masks it there)."""
        return f"user:{SECRET}@belt.avi"


def random_bundle(out: Path, seed: int = 0) -> Path:
    """A tiny-preset MNet with random weights, exported by mnet.export (seconds; torch needed)."""
    import torch
    from mnet.export.onnx import export_onnx
    from mnet.search.checkpoint import save_checkpoint
    from mnet.search.model import MNet

    from mnet.arch import PRESETS
    from mnet.preprocess import Preprocess

    arch = PRESETS["tiny"].sample(random.Random(seed))
    torch.manual_seed(seed)
    ckpt = out.parent / "random.pt"
    save_checkpoint(ckpt, {"kind": "mnet", "arch": arch.to_json(), "classes": ["A", "B", "C"],
                           "model": MNet(arch).eval().state_dict(),
                           "preprocess": Preprocess(tuple(arch.input_hw)).to_json()})
    export_onnx(ckpt, out, parity_images=8, overwrite=True)
    return out


def make_env(work: Path, bundle: Path | None = None, fruits: int = 8, size_wh: tuple[int, int] = (640, 480),
             seed: int = 0) -> Env:
    from mnet.conveyor import make_conveyor_video

    work.mkdir(parents=True, exist_ok=True)
    bundle = bundle or random_bundle(work / "bundle", seed)
    clip = work / "belt.avi"
    info = make_conveyor_video(clip, fruits=fruits, seed=seed, fps=CLIP_FPS, size_wh=size_wh, codec="MJPG")
    env = Env(work, Path(bundle), clip, json.loads(Path(info["truth_path"]).read_text()))
    link = work / env.secret_link
    if not link.exists():
        link.symlink_to(clip.name)
    return env


# -------------------------------------------------------------------------------------- counting


def _dedupe(events: list[dict]) -> tuple[list[dict], int]:
    """First copy of each event_id, in order, and how many copies were dropped."""
    seen: dict[str, dict] = {}
    for e in events:
        seen.setdefault(e["event_id"], e)
    return list(seen.values()), len(events) - len(seen)


def _match(events: list[dict], fruits: list[dict], to_frame: Callable[[float], float]) -> dict[Any, list[dict]]:
    """Events assigned to truth fruit by the overlap of their frame spans (key None: no fruit overlaps).

    One to one first, largest overlap first (ties: the closer first frame), so neighbours in view together
    each get theirs; an event left over joins the fruit it overlaps most: a second event for that fruit.
    """
    spans = [(to_frame(e["first_ts"]), to_frame(e["last_ts"])) for e in events]
    pairs = []
    for ei, (a, b) in enumerate(spans):
        for f in fruits:
            overlap = min(b, f["last_frame"] + 0.5) - max(a, f["first_frame"] - 0.5)
            if overlap > 0:
                pairs.append((-overlap, abs(a - f["first_frame"]), ei, f["fruit_id"]))
    pairs.sort()
    owner: dict[int, Any] = {}
    taken: set = set()
    for _, _, ei, fid in pairs:
        if ei not in owner and fid not in taken:
            owner[ei] = fid
            taken.add(fid)
    for _, _, ei, fid in pairs:  # left over: the best overlap (pairs are sorted)
        owner.setdefault(ei, fid)
    out: dict[Any, list[dict]] = {f["fruit_id"]: [] for f in fruits}
    out[None] = []
    for ei, e in enumerate(events):
        out[owner.get(ei)].append(e)
    return out


def _media_frame(ts: float) -> float:
    return ts * CLIP_FPS


def _score(events: list[dict], fruits: list[dict], *, to_frame: Callable[[float], float] = _media_frame,
           unkeepable: Callable[[dict], str | None] = lambda f: None) -> dict:
    """events (after dedupe), lost (+ reason / keepable), duplicates for one pass over `fruits`.

    unkeepable(fruit) returns why the design cannot grade that fruit (None: it must be graded).
    """
    unique, raw = _dedupe(events)
    matched = _match(unique, fruits, to_frame)
    lost = [f for f in fruits if not matched[f["fruit_id"]]]
    reasons = [r for r in (unkeepable(f) for f in lost) if r]
    return {"events": len(unique), "lost": len(lost), "lost_keepable": len(lost) - len(reasons),
            "lost_reasons": reasons, "duplicates": sum(max(0, len(v) - 1) for k, v in matched.items() if k is not None),
            "duplicated_fruit": [k for k, v in matched.items() if k is not None and len(v) > 1],
            "unmatched_events": len(matched[None]), "raw_duplicates": raw}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a torn last line (SIGKILL mid-write) is not an event
            out.append(json.loads(line))
    return out


def _secret_in(texts: list[str], paths: list[Path]) -> bool:
    files = []
    for p in paths:
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file()]
        elif p.is_file():
            files.append(p)
    blobs = texts + [f.read_bytes().decode("utf-8", "replace") for f in files]
    return any(SECRET in b for b in blobs)


def _row(fault: str, fruit: int, score: dict, exit_code: int | None, secret_seen: bool, seconds: float,
         expected_exit: int | tuple = 0, **extra: Any) -> dict:
    expected = expected_exit if isinstance(expected_exit, tuple) else (expected_exit,)
    row = {"fault": fault, "fruit": fruit, "events": score["events"], "lost": score["lost"]}
    if score["lost"]:
        row["lost_reason"] = "; ".join(sorted(set(score["lost_reasons"]))) or "none: the design should keep these"
    if score.get("duplicated_fruit"):
        row["duplicated_fruit"] = score["duplicated_fruit"]  # truth fruit_id with more than one event_id
    row.update({"lost_keepable": score["lost_keepable"], "duplicates": score["duplicates"],
                "raw_duplicates": score["raw_duplicates"], "unmatched_events": score["unmatched_events"],
                "exit_code": exit_code, "secret_seen": secret_seen})
    extra_ok = extra.pop("_ok", True)
    row["ok"] = bool(extra_ok and score["lost_keepable"] == 0 and score["duplicates"] == 0 and score["unmatched_events"] == 0
                     and exit_code in expected and not secret_seen)
    row["seconds"] = round(seconds, 2)
    row.update(extra)
    return row


# ------------------------------------------------------------------------------ in-process grading


@contextlib.contextmanager
def _captured_logs() -> Iterator[io.StringIO]:
    """Every log record (DEBUG up) of the run, formatted with its arguments, for the secret grep."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _fresh(out: Path) -> Path:
    """An empty output folder: the sinks append, and a rerun must not count the last run's events."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def _open_bundle(env: Env):
    from mnet.bundle import load_bundle
    from mnet.runtime.backends import open_backend
    from mnet.runtime.gate import GateConfig
    from mnet.runtime.grader import GradeConfig

    b = load_bundle(env.bundle)
    net = open_backend(b, "onnxruntime", "fp32", threads=1)
    return b, net, GradeConfig.from_options(gate=GateConfig.from_card(b.card))  # as `mnet grade` builds it


def _grade_inproc(env: Env, out: Path, source: Any, *, wrap: Callable | None = None, **kw: Any) -> tuple[Any, int, str]:
    """grade() with the bundle's real backend (wrapped by `wrap`) into out/e.jsonl + out/e.csv.

    Returns (summary or None, exit code as the CLI would give it, captured log text).
    """
    from mnet.runtime.grader import grade
    from mnet.runtime.sinks import open_sinks

    from mnet.errors import MnetError

    b, net, cfg = _open_bundle(env)
    backend = wrap(net) if wrap else net
    _fresh(out)
    summary, code = None, 0
    with _captured_logs() as logs, _cwd(env.work):
        try:
            sinks = open_sinks(events=out / "e.jsonl", csv_path=out / "e.csv", classes=b.card.classes)
            summary = grade(backend, b.card.preprocess, b.card.classes, source, cfg, sinks,
                            model=f"{b.card.display_name}:faults", **kw)
        except MnetError as e:  # the CLI's contract: one line, exit 2
            logging.getLogger("faults").error("%s", e)
            code = 2
        finally:
            net.close()
    if summary is not None:
        (out / "summary.json").write_text(json.dumps(summary.to_json()))
    return summary, code, logs.getvalue()


class FaultyBackend:
    """The real backend, with a fault on every `every`-th call (warm-up included): raise, or NaN rows."""

    def __init__(self, inner: Any, every: int, mode: str) -> None:
        assert mode in ("raise", "nan")
        self.inner, self.every, self.mode = inner, every, mode
        self.name = f"{inner.name}+{mode}/{every}"
        self.calls = self.faults = 0

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        y = self.inner.infer(x)
        if self.calls % self.every:
            return y
        self.faults += 1
        if self.mode == "raise":
            raise RuntimeError("injected backend fault")
        return np.full_like(y, np.nan)


def _summary_extra(s: Any) -> dict:
    keys = ("infer_errors", "nonfinite_outputs", "views_failed", "fruit_failed", "read_errors", "reconnects",
            "frames_dropped", "frames_read")
    return {} if s is None else {k: getattr(s, k) for k in keys if getattr(s, k)}


def _file_case(env: Env, fault: str, source: str, *, wrap: Callable | None = None, fruits: list[dict] | None = None,
               unkeepable: Callable[[dict], str | None] = lambda f: None, **extra: Any) -> dict:
    t = time.perf_counter()
    out = env.work / fault
    summary, code, logs = _grade_inproc(env, out, source, wrap=wrap)
    fruits = env.fruits if fruits is None else fruits
    score = _score(_read_jsonl(out / "e.jsonl"), fruits, unkeepable=unkeepable)
    csv_rows = max(0, len((out / "e.csv").read_text().splitlines()) - 1) if (out / "e.csv").exists() else 0
    secret = _secret_in([logs, json.dumps(summary.to_json()) if summary else ""], [out])
    return _row(fault, len(fruits), score, code, secret, time.perf_counter() - t, csv_rows=csv_rows,
                _ok=csv_rows == score["events"] + score["raw_duplicates"], **_summary_extra(summary), **extra)


def case_baseline(env: Env) -> dict:
    return _file_case(env, "baseline", f"file://{env.secret_link}")


def case_backend_raise(env: Env, every: int = 3) -> dict:
    return _file_case(env, "backend_raise", f"file://{env.secret_link}",
                      wrap=lambda net: FaultyBackend(net, every, "raise"), every_nth_call=every)


def case_nan_output(env: Env, every: int = 4) -> dict:
    return _file_case(env, "nan_output", f"file://{env.secret_link}",
                      wrap=lambda net: FaultyBackend(net, every, "nan"), every_nth_call=every)


def case_corrupt_video(env: Env, first: int | None = None, count: int = 5) -> dict:
    """`count` frames' JPEG data zeroed in the middle of the clip (the container and its index intact)."""
    data = bytearray(env.clip.read_bytes())
    chunks = avi_frame_chunks(bytes(data))
    first = len(chunks) // 2 if first is None else first
    for offset, size in chunks[first:first + count]:
        data[offset:offset + size] = bytes(size)
    bad = env.work / f"user:{SECRET}@corrupt.avi"
    bad.write_bytes(bytes(data))
    min_hits = _min_hits()

    def unkeepable(f: dict) -> str | None:
        seen = (f["last_frame"] - f["first_frame"] + 1) - _overlap(f, first, first + count - 1)
        return f"in readable frames only {seen} frame(s) (< min_hits {min_hits})" if seen < min_hits else None

    row = _file_case(env, "corrupt_video", f"file://{bad.name}", unkeepable=unkeepable,
                     corrupt_frames=[first, first + count - 1])
    bad.unlink()
    return row


def _overlap(f: dict, a: float, b: float) -> int:
    return max(0, int(min(f["last_frame"], b) - max(f["first_frame"], a) + 1))


def _min_hits() -> int:
    from mnet.runtime.tracker import TrackerConfig

    return TrackerConfig().min_hits


# ------------------------------------------------------------------------------------ live cases


class BeltCamera:
    """The clip played as a live camera in real time: frame k is on the sensor at t0 + k / fps, read or not.

    `factory` is a capture_factory. While `unplugged` is set (or a `link` is missing) reads fail and opens
    are refused, as a USB camera that dropped off the bus; the belt keeps moving meanwhile. After the
    last frame the belt stays empty (the last frame repeats).
    """

    def __init__(self, clip: Path, fps: float = CLIP_FPS, link: Path | None = None) -> None:
        self.clip, self.fps, self.link = clip, fps, link
        self._dec = cv2.VideoCapture(str(clip))
        self.total = int(self._dec.get(cv2.CAP_PROP_FRAME_COUNT))
        self._cursor, self._last = 0, None
        self._lock = threading.Lock()
        self.t0: float | None = None  # monotonic time of frame 0 (the first read)
        self.unplugged = threading.Event()
        self.targets: list[Any] = []
        self.delivered: list[int] = []  # clip frames handed out (the gaps are the outages)

    def largest_gap(self) -> tuple[int, int] | None:
        """The first and last clip frame of the longest run no capture delivered (None: no gap)."""
        gaps = [(b - a, a + 1, b - 1) for a, b in zip(self.delivered, self.delivered[1:]) if b - a > 1]
        return max(gaps)[1:] if gaps else None

    def present(self) -> bool:
        return not self.unplugged.is_set() and (self.link is None or os.path.lexists(self.link))

    def frame_at(self, mono: float) -> float:
        return (mono - self.t0) * self.fps if self.t0 is not None else 0.0

    def factory(self, target: Any, api: int) -> Any:
        self.targets.append(target)
        return _BeltCapture(self) if self.present() else _Closed()

    def _frame(self, k: int) -> np.ndarray:
        with self._lock:
            while self._cursor < min(k, self.total - 1):  # frames nobody sees: skipped, not decoded
                self._dec.grab()
                self._cursor += 1
            if self._cursor <= min(k, self.total - 1):
                ok, img = self._dec.read()
                self._cursor += 1
                if ok:
                    self._last = img
            return self._last

    def close(self) -> None:
        self._dec.release()


class _Closed:
    def isOpened(self) -> bool:
        return False

    def release(self) -> None:
        pass


class _BeltCapture:
    def __init__(self, cam: BeltCamera) -> None:
        self.cam, self._open, self._next = cam, True, None

    def isOpened(self) -> bool:
        return self._open

    def set(self, prop: int, value: Any) -> bool:
        return True

    def get(self, prop: int) -> float:
        return float(self.cam.fps) if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self) -> tuple[bool, np.ndarray | None]:
        cam = self.cam
        if cam.t0 is None:
            cam.t0 = time.monotonic()
        # The next frame the sensor completes, handed out when it is due: never a stale frame (a reopened
        # capture too), so a frame's arrival time matches what it shows, as on a camera.
        # Decoded before the wait (a reopened capture skips the frames of the outage, tens of ms).
        while True:
            k = max(self._next or 0, math.ceil(cam.frame_at(time.monotonic())))
            img = cam._frame(k)
            if cam.frame_at(time.monotonic()) <= k:  # not yet due: the skipping decode did not overrun it
                break
        time.sleep(max(0.0, cam.t0 + k / cam.fps - time.monotonic()))
        if not cam.present():
            return False, None
        self._next = k + 1
        cam.delivered.append(k)
        return True, img.copy()

    def release(self) -> None:
        self._open = False


class _SteppingClock:
    """The `time` module as sources.py sees it, with a wall clock that steps back `step_s` after `after_s`."""

    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)
    perf_counter = staticmethod(time.perf_counter)

    def __init__(self, after_s: float, step_s: float = -3600.0) -> None:
        self.at, self.step_s = time.monotonic() + after_s, step_s
        self.reads_after_step = 0  # 0 with today's sources (one reading at open); every frame before the fix

    def time(self) -> float:
        if time.monotonic() >= self.at:
            self.reads_after_step += 1
            return time.time() + self.step_s
        return time.time()


def _live_case(env: Env, fault: str, cam: BeltCamera, uri: str, *, during: Callable[[BeltCamera], None],
               unkeepable_window: Callable[[BeltCamera], tuple[int, int] | None] | None = None, **extra: Any) -> dict:
    """Grade `cam` through a live source until the clip is over; `during(cam)` injects the fault (thread)."""
    from mnet.runtime.sources import open_source

    t = time.perf_counter()
    stop = threading.Event()
    wall_offset = time.time() - time.monotonic()  # what the source stamps with (taken before any clock step)
    with _captured_logs() as logs:
        src = open_source(uri, capture_factory=cam.factory, backoff_s=(0.05, 0.4), timeout_s=0.2)
    injector = threading.Thread(target=during, args=(cam,), daemon=True)

    def ender() -> None:  # the belt is empty after the clip: stop then (the tracker flushes what it holds)
        while cam.t0 is None or cam.frame_at(time.monotonic()) < cam.total + 10:
            time.sleep(0.05)
        stop.set()

    threading.Thread(target=ender, daemon=True).start()
    injector.start()
    try:
        summary, code, glogs = _grade_inproc(env, env.work / fault, src, stop=stop)
    finally:
        src.close()
        cam.close()
    injector.join(timeout=5)
    to_frame = lambda ts: cam.frame_at(ts - wall_offset)  # noqa: E731

    def unkeepable(f: dict) -> str | None:
        window = unkeepable_window(cam) if unkeepable_window else None
        if window is None:
            return None
        a, b = window
        seen = (f["last_frame"] - f["first_frame"] + 1) - _overlap(f, a, b)
        return (f"in view only {seen} frame(s) while the camera was up (< min_hits {_min_hits()})"
                if seen < _min_hits() else None)

    out = env.work / fault
    events = _read_jsonl(out / "e.jsonl")
    score = _score(events, env.fruits, to_frame=to_frame, unkeepable=unkeepable)
    ordered = all(e["first_ts"] <= e["last_ts"] for e in events) and \
        all(a["first_ts"] <= b["first_ts"] + 1.0 for a, b in zip(events, events[1:]))
    secret = _secret_in([logs.getvalue(), glogs, json.dumps(summary.to_json()) if summary else ""], [out])
    return _row(fault, len(env.fruits), score, code, secret, time.perf_counter() - t, _ok=ordered,
                timestamps_ordered=ordered, **_summary_extra(summary), **extra)


def case_clock_step(env: Env, after_s: float = 3.0) -> dict:
    """The wall clock steps back an hour mid-run (a Jetson's NTP/RTC sync); only sources.py sees it."""
    import mnet.runtime.sources as sources

    clock = _SteppingClock(after_s)
    real = sources.time
    sources.time = clock  # as the sources tests do: the module's `time`, nothing else
    try:
        row = _live_case(env, "clock_step", BeltCamera(env.clip), f"rtsp://admin:{SECRET}@cam.local/belt",
                         during=lambda cam: None, clock_stepped_s=clock.step_s)
    finally:
        sources.time = real
    row["clock_stepped"] = time.monotonic() >= clock.at  # the step happened while the source ran
    row["wall_clock_reads_after_step"] = clock.reads_after_step
    row["ok"] = row["ok"] and row["clock_stepped"]
    return row


def case_camera_vanish(env: Env, at_frame: int = 60, outage_s: float = 2.5) -> dict:
    """A by-id link (in a temp dir) to /dev/video3 disappears mid-run and comes back pointing to /dev/video5.

    2.5 s away is longer than a fruit takes to cross the view (~2.4 s), so a fruit can pass unseen: the
    row then shows a loss the design cannot avoid, with its reason.
    """
    by_id = env.work / "v4l" / "by-id"
    by_id.mkdir(parents=True, exist_ok=True)
    link = by_id / "usb-Belt_Cam_1234-video-index0"
    link.unlink(missing_ok=True)
    link.symlink_to("/dev/video3")  # parse_uri only resolves the name; the capture_factory is the camera
    cam = BeltCamera(env.clip, link=link)
    at = at_frame

    def unplug(cam: BeltCamera) -> None:
        while cam.t0 is None or cam.frame_at(time.monotonic()) < at:
            time.sleep(0.01)
        link.unlink()
        time.sleep(outage_s)
        link.symlink_to("/dev/video5")  # re-enumerated as another device

    row = _live_case(env, "camera_vanish", cam, str(link), during=unplug, outage_s=outage_s,
                     unkeepable_window=BeltCamera.largest_gap)
    gap = cam.largest_gap()
    row["outage_frames"] = gap  # unplugged, plus the reconnect backoff
    across = [f["fruit_id"] for f in env.fruits if gap and f["first_frame"] < gap[0] and f["last_frame"] > gap[1]]
    if row["duplicates"]:
        row["duplicates_reason"] = (
            f"fruit {row.get('duplicated_fruit')} graded twice; fruit {across} were in view before and after the "
            "outage, where the tracker must dead-reckon each track over the gap (frames stop, the belt does not)")
    row["reopened_as"] = cam.targets[-1] if cam.targets else None
    return row


# ----------------------------------------------------------------------------------- broker + CLI


class Subscriber:
    """A QoS 1 consumer with a persistent session that keeps every payload it gets (duplicates too)."""

    def __init__(self, port: int, topic: str = TOPIC, password: str = SECRET) -> None:
        import paho.mqtt.client as mqtt

        self.raw: list[str] = []
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="faults-bench-sub", clean_session=False)
        self.c.username_pw_set(USER, password)
        self.c.reconnect_delay_set(0.05, 0.2)  # back before the publisher after a broker restart
        # Subscribe on every connect: a broker killed with -9 forgets sessions it had not saved.
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.c.on_message = lambda c, u, m: self.raw.append(m.payload.decode("utf-8", "replace"))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        if not self.subscribed.wait(5):
            raise RuntimeError("the bench's subscriber could not subscribe")

    def events(self) -> list[dict]:
        return [json.loads(p) for p in list(self.raw)]

    def wait_for(self, ids: set[str], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not ids <= {e["event_id"] for e in self.events()} and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _cli(env: Env, out: Path, *args: str) -> list[str]:
    """argv of `python -m mnet -v grade` on the secret-named clip, played at its frame rate."""
    return [sys.executable, "-m", "mnet", "-v", "grade", str(env.bundle), "--source", f"file://{env.secret_link}",
            "--backend", "onnxruntime", "--threads", "1", "--fps-limit", str(CLIP_FPS),
            "--summary", str(out / "summary.json"), *args]


def _spawn(env: Env, argv: list[str], out: Path, name: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(argv, cwd=env.work, stdout=(out / f"{name}.out").open("wb"),
                            stderr=(out / f"{name}.err").open("wb"), env={**os.environ, "COLUMNS": "160"})


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Until `path` holds n events (True) or the process ended / timed out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(_read_jsonl(path)) >= n:
            return True
        time.sleep(0.02)
    return False


def _mqtt_args(broker: Broker, out: Path, password_in_uri: bool = False) -> list[str]:
    """--mqtt with the password in a file (the way to deploy), or in the URI (must still be echoed nowhere)."""
    spool = ["--mqtt-spool", str(out / "spool")]
    if password_in_uri:
        return ["--mqtt", f"mqtt://{USER}:{SECRET}@127.0.0.1:{broker.port}/{TOPIC}", *spool]
    pw = out / "pw"
    pw.write_text(SECRET + "\n")
    return ["--mqtt", f"mqtt://{USER}@127.0.0.1:{broker.port}/{TOPIC}", "--mqtt-password-file", str(pw), *spool]


def _outputs(out: Path, broker: Broker | None = None, sub: Subscriber | None = None) -> tuple[list[str], list[Path]]:
    files = [p for p in out.iterdir() if p.name != "pw"] + ([broker.log] if broker else [])
    return (sub.raw if sub else []), files


def case_broker_kill9(env: Env, outage_s: float = 1.5) -> dict:
    t = time.perf_counter()
    out = _fresh(env.work / "broker_kill9")
    broker = Broker(out / "broker", USER, SECRET)
    broker.start()
    sub = Subscriber(broker.port)
    try:
        proc = _spawn(env, _cli(env, out, "--events", str(out / "e.jsonl"), *_mqtt_args(broker, out, True)), out,
                      "run")
        mid = _wait_lines(out / "e.jsonl", 2, proc)
        broker.kill9()
        time.sleep(outage_s)
        broker.start()
        rc = proc.wait(timeout=120)
        jsonl = _read_jsonl(out / "e.jsonl")
        sub.wait_for({e["event_id"] for e in jsonl})
        got = sub.events()
    finally:
        sub.close()
        broker.stop()
    score = _score(got, env.fruits)
    missing = {e["event_id"] for e in jsonl} - {e["event_id"] for e in got}
    texts, files = _outputs(out, broker, sub)
    return _row("broker_kill9", len(env.fruits), score, rc, _secret_in(texts, files), time.perf_counter() - t,
                _ok=mid and not missing, killed_mid_run=mid, jsonl_events=len(jsonl),
                jsonl_not_at_broker=len(missing), outage_s=outage_s)


def _spool_pending(spool: Path) -> int:
    """Events in the spool without an ack record (what the next start resends)."""
    pending: set[int] = set()
    for f in spool.glob("*") if spool.is_dir() else []:
        for line in f.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                rec = json.loads(line)
                pending.discard(int(rec["ack"])) if "ack" in rec else pending.add(int(rec["seq"]))
    return len(pending)


def case_sigkill_restart(env: Env, after_events: int = 3) -> dict:
    """SIGKILL once `after_events` fruit are in the JSONL, then a fresh process on the clip again.

    The second run stands for the belt after the restart: `fruit` counts both passes, and the fruit of the
    first pass still on the belt or being voted at the kill are lost by design (a dead process grades
    nothing). Everything either sink had got before the kill must be in both after the restart (the JSONL is
    fsynced per event; MQTT events not acknowledged wait in the spool and are resent by the next start).
    """
    t = time.perf_counter()
    out = _fresh(env.work / "sigkill_restart")
    broker = Broker(out / "broker", USER, SECRET)
    broker.start()
    sub = Subscriber(broker.port)
    jsonl = out / "e.jsonl"
    argv = _cli(env, out, "--events", str(jsonl), "--fsync", "every", *_mqtt_args(broker, out))
    try:
        first = _spawn(env, argv, out, "run1")
        mid = _wait_lines(jsonl, after_events, first)
        first.send_signal(signal.SIGKILL)
        rc1 = first.wait(timeout=30)
        pending = _spool_pending(out / "spool")
        killed_at_frame = None
        with contextlib.suppress(Exception):  # the last frame the dead run had graded: its newest event's span
            killed_at_frame = max(e["last_ts"] for e in _read_jsonl(jsonl)) * CLIP_FPS
        second = _spawn(env, argv, out, "run2")
        rc2 = second.wait(timeout=120)
        events = _read_jsonl(jsonl)
        sub.wait_for({e["event_id"] for e in events})
        got = sub.events()
    finally:
        sub.close()
        broker.stop()
    runs = list(dict.fromkeys(e["run_id"] for e in events))
    unique = _dedupe(events + got)[0]  # both sinks' records of the two runs
    raw = _dedupe(got)[1]  # at-least-once copies the broker delivered
    passes = [_score([e for e in unique if e["run_id"] == r], env.fruits,
                     unkeepable=lambda f: "not voted before the SIGKILL (on the belt or in flight; "
                                          "a killed process writes nothing more)" if i == 0 else None)
              for i, r in enumerate(runs[:2])]
    score = {"events": len(unique), "raw_duplicates": raw,
             **{k: sum(p[k] for p in passes) for k in ("lost", "lost_keepable", "duplicates", "unmatched_events")},
             "lost_reasons": [r for p in passes for r in p["lost_reasons"]]}
    silent = (2 - len(passes)) * len(env.fruits)  # a run that wrote nothing lost every fruit it should have had
    score["lost"] += silent
    score["lost_keepable"] += silent
    in_jsonl, at_broker = {e["event_id"] for e in events}, {e["event_id"] for e in got}
    texts, files = _outputs(out, broker, sub)
    return _row("sigkill_restart", 2 * len(env.fruits), score, rc2, _secret_in(texts, files), time.perf_counter() - t,
                _ok=mid and rc1 == -signal.SIGKILL and len(runs) == 2 and in_jsonl == at_broker,
                first_exit_code=rc1, spool_pending_after_kill=pending, jsonl_not_at_broker=len(in_jsonl - at_broker),
                broker_not_in_jsonl=len(at_broker - in_jsonl), first_run_graded_to_frame=killed_at_frame)


def case_sigterm_mid_fruit(env: Env, after_events: int = 3) -> dict:
    """SIGTERM while fruit are in view: the loop stops, every fruit it has seen is voted and written."""
    t = time.perf_counter()
    out = _fresh(env.work / "sigterm_mid_fruit")
    proc = _spawn(env, _cli(env, out, "--events", str(out / "e.jsonl"), "--csv", str(out / "e.csv")), out, "run")
    mid = _wait_lines(out / "e.jsonl", after_events, proc)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    read = summary.get("frames_processed", 0)  # frames_read counts the decoder's read-ahead too
    seen = [f for f in env.fruits if f["first_frame"] < read]  # entered the view before the stop
    in_view = [f for f in seen if f["last_frame"] >= read]
    min_hits = _min_hits()

    def unkeepable(f: dict) -> str | None:
        n = min(f["last_frame"], read - 1) - f["first_frame"] + 1
        return f"in view only {n} frame(s) before the stop (< min_hits {min_hits})" if n < min_hits else None

    score = _score(_read_jsonl(out / "e.jsonl"), seen, unkeepable=unkeepable)
    texts, files = _outputs(out)
    return _row("sigterm_mid_fruit", len(seen), score, rc, _secret_in(texts, files), time.perf_counter() - t,
                _ok=mid and bool(in_view) and summary.get("stopped") is True, stopped_at_frame=read,
                fruit_in_view_at_stop=len(in_view), fruit_after_stop=len(env.fruits) - len(seen))


def case_full_disk_sink(env: Env) -> dict:
    """--events /dev/full --csv: the CSV gets every event, exit 2 with one error line after the summary."""
    t = time.perf_counter()
    out = _fresh(env.work / "full_disk_sink")
    argv = [a for a in _cli(env, out, "--events", "/dev/full", "--csv", str(out / "e.csv")) if a != "-v"]
    argv[argv.index("--fps-limit"):argv.index("--fps-limit") + 2] = []  # no need to play it in real time
    proc = _spawn(env, argv, out, "run")
    rc = proc.wait(timeout=120)
    import csv

    rows = list(csv.DictReader((out / "e.csv").open())) if (out / "e.csv").exists() else []
    err = (out / "run.err").read_text()
    # The sink's failure is logged when it happens (the line goes on); the run ends with one error line.
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    score = _score([{**r, "first_ts": float(r["first_ts"]), "last_ts": float(r["last_ts"])} for r in rows], env.fruits)
    texts, files = _outputs(out)
    return _row("full_disk_sink", len(env.fruits), score, rc, _secret_in(texts, files), time.perf_counter() - t,
                expected_exit=2, _ok=len(error_lines) == 1 and "Traceback" not in err, csv_rows=len(rows),
                error_lines=len(error_lines), stderr_lines=len(err.splitlines()),
                error=error_lines[-1][:200] if error_lines else "")


CASES: dict[str, Callable[[Env], dict]] = {
    "baseline": case_baseline,
    "backend_raise": case_backend_raise,
    "nan_output": case_nan_output,
    "broker_kill9": case_broker_kill9,
    "sigkill_restart": case_sigkill_restart,
    "sigterm_mid_fruit": case_sigterm_mid_fruit,
    "full_disk_sink": case_full_disk_sink,
    "corrupt_video": case_corrupt_video,
    "clock_step": case_clock_step,
    "camera_vanish": case_camera_vanish,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    ap.add_argument("--bundle", type=Path, help="a bundle directory (default: a random tiny-preset one)")
    ap.add_argument("--fruits", type=int, default=8)
    ap.add_argument("--work", type=Path, help="keep the scratch files here (default: a temp dir, removed)")
    args = ap.parse_args()
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mnet-faults-") as tmp:
        work = args.work or Path(tmp)
        env = make_env(work, args.bundle, fruits=args.fruits)
        rows = []
        for name in names:
            print(f"== {name}", file=sys.stderr, flush=True)
            try:
                rows.append(CASES[name](env))
            except Exception as e:  # a case that cannot run (no mosquitto) is a row saying so, not a crash
                rows.append({"fault": name, "ok": False, "error": f"{type(e).__name__}: {e}"})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    failing = [r["fault"] for r in rows if not r["ok"]]
    emit("faults", {"faults": rows, "rows_ok": len(rows) - len(failing), "rows": len(rows),
                    "rows_meeting_targets": f"{len(rows) - len(failing)} of {len(rows)}",
                    "rows_failing": failing or "none",
                    "clip": {"fruits": len(env.fruits), "frames": env.truth["frames"], "fps": CLIP_FPS,
                             "size": env.truth["size"]},
                    "targets": "per row: lost_keepable 0, duplicates 0 after dedupe by event_id, exit 0 "
                               "(2 for the full disk), secret_seen false",
                    "seconds": round(time.perf_counter() - t0, 1)})
    return 0  # rows that miss a target say so (ok: false); the bench itself ran


if __name__ == "__main__":
    raise SystemExit(main())
