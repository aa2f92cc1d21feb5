"""Several lanes in one process (runtime/lanes.py): each lane grades as it would alone, crops of all
lanes share backend calls, a lane whose camera dies does not stop the others, the lanes file is
validated field by field, and `mnet grade` takes --source more than once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from conftest import FakeCapture
from mnet.runtime.grader import GradeConfig, grade
from mnet.runtime.lanes import LaneSpec, batch_limit, grade_lanes, load_lanes
from mnet.runtime.sinks import Sinks

from mnet.cli import main
from mnet.conveyor import make_conveyor_video
from mnet.errors import BackendError, ConfigError
from mnet.preprocess import Preprocess

CLASSES = ("A", "B", "C")
CLIP = {"fruits": 6, "size_wh": (640, 480), "speed_px": 20}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two different belts (seeds 0 and 1) and their truth."""
    d = tmp_path_factory.mktemp("lanes")
    out = []
    for seed in (0, 1):
        path = d / f"belt{seed}.mp4"
        make_conveyor_video(path, seed=seed, **CLIP)
        out.append((path, json.loads(path.with_name(f"belt{seed}.truth.json").read_text())))
    return out


class _ByPixels:
    """A backend whose answer for a crop depends on that crop's pixels only (never on the rest of the
    batch), so a lane's grades cannot depend on whose crops shared its calls. Records every call."""

    name = "pixels"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s, self.sizes = delay_s, []

    def infer(self, x):
        self.sizes.append(len(x))
        time.sleep(self.delay_s)
        m = x.reshape(len(x), 3, -1).mean(axis=2)
        k = np.floor(np.abs(m[:, 0] - m[:, 2]) * 7).astype(int) % 3
        out = np.full((len(x), 3), 0.1, np.float32)
        out[np.arange(len(x)), k] = 0.8
        return out


class _Collect:
    name, wants_frames = "collect", False

    def __init__(self) -> None:
        self.events = []

    def write(self, e):
        self.events.append(e)

    def close(self):
        pass


def _key(e):
    return (e.fruit_id, e.grade, e.views, e.frames, e.probs, e.first_ts, e.last_ts)


def _alone(path, backend=None):
    got = _Collect()
    s = grade(backend or _ByPixels(), Preprocess((24, 32)), CLASSES, str(path), GradeConfig(), Sinks([got]))
    return got.events, s


def test_two_lanes_grade_exactly_as_each_alone(clips):
    alone = [_alone(path)[0] for path, _ in clips]
    got = _Collect()
    summary = grade_lanes(_ByPixels(), Preprocess((24, 32)), CLASSES,
                          [LaneSpec("left", str(clips[0][0])), LaneSpec("right", str(clips[1][0]))],
                          GradeConfig(), Sinks([got]), model="pixels")
    for lane, ((_, truth), want) in enumerate(zip(clips, alone)):
        mine = [e for e in got.events if e.lane == lane]
        assert [_key(e) for e in mine] == [_key(e) for e in want]  # same fruit, ids, views and votes
        assert len(mine) == len(truth["fruits"]) == summary.lanes[lane].summary.fruit_graded
        assert [e.fruit_id for e in mine] == list(range(1, len(mine) + 1))  # ids restart per lane
        assert all(e.source.endswith(f"belt{lane}.mp4") and e.event_id.endswith(f":{lane}:{e.fruit_id}") for e in mine)
        res = summary.lanes[lane]
        assert res.name == ("left", "right")[lane] and res.error is None and res.outages == 0
        assert res.summary.frames_processed == truth["frames"] and res.summary.frames_dropped == 0
    assert len({e.run_id for e in got.events}) == 1 and len({e.event_id for e in got.events}) == len(got.events)
    agg = summary.to_json()
    assert agg["fruit_graded"] == len(got.events) and [x["name"] for x in agg["lanes"]] == ["left", "right"]
    assert agg["frames_processed"] == sum(t["frames"] for _, t in clips) and agg["lanes_failed"] == 0


def test_crops_of_both_lanes_share_backend_calls(clips):
    backend = _ByPixels(delay_s=0.01)  # a slow model: crops of both belts queue up while it runs
    summary = grade_lanes(backend, Preprocess((24, 32)), CLASSES,
                          [LaneSpec("a", str(clips[0][0])), LaneSpec("b", str(clips[1][0]))], GradeConfig())
    views = sum(lane.summary.views for lane in summary.lanes)
    b = summary.batcher
    assert len(backend.sizes) == b["calls"] and sum(backend.sizes) == views + 1 == b["rows"]  # + the one warm-up
    assert b["multi_lane_calls"] > 0 and max(backend.sizes) > 1 and b["calls"] < views
    assert max(backend.sizes) <= b["max_batch"] == 32
    # a bundle's max batch bounds every call
    backend = _ByPixels(delay_s=0.01)
    summary = grade_lanes(backend, Preprocess((24, 32)), CLASSES,
                          [LaneSpec("a", str(clips[0][0])), LaneSpec("b", str(clips[1][0]))], GradeConfig(max_batch=2))
    assert max(backend.sizes) == 2 and summary.batcher["max_batch"] == 2
    assert sum(lane.summary.fruit_graded for lane in summary.lanes) == sum(len(t["fruits"]) for _, t in clips)


def test_batch_limit_follows_the_config_then_the_backend():
    fixed = SimpleNamespace(exact_batch=4, max_batch=4)
    assert batch_limit(fixed) == 4 and batch_limit(fixed, 2) == 2
    assert batch_limit(SimpleNamespace(exact_batch=None, max_batch=8)) == 8 and batch_limit(object()) == 32


def test_a_lane_whose_camera_dies_does_not_stop_the_other(clips):
    (path0, truth0), (path1, _) = clips
    cap = cv2.VideoCapture(str(path1))
    frames = [cap.read()[1] for _ in range(30)]
    cap.release()
    state = {"reads": 0, "opens": 0, "after": 0}

    class Camera(FakeCapture):  # dies after 20 frames; the first reopen fails, the second works
        def __init__(self):
            super().__init__()
            state["opens"] += 1
            self.ok = state["opens"] != 2

        def isOpened(self):
            return self.ok

        def read(self):
            time.sleep(0.01)
            state["reads"] += 1
            if state["reads"] == 20:
                return False, None
            if state["reads"] > 20:
                state["after"] += 1
            return True, frames[state["reads"] % len(frames)]

    def factory(target, api):
        return Camera() if isinstance(target, int) else cv2.VideoCapture(target, api)

    stop, file_done = threading.Event(), threading.Event()

    def on_frame(lane, frame, info):
        if lane == 0 and info.index == truth0["frames"] - 1:
            file_done.set()
        if lane == 1 and file_done.is_set() and state["after"] >= 10:
            stop.set()

    got = _Collect()
    summary = grade_lanes(_ByPixels(), Preprocess((24, 32)), CLASSES,
                          [LaneSpec("belt", str(path0)), LaneSpec("camera", "0"), LaneSpec("gone", str(path1))],
                          GradeConfig(read_timeout_s=0.2), Sinks([got]), stop=stop, on_frame=on_frame,
                          capture_factory=factory)
    file_lane, cam, other = summary.lanes
    want = _alone(path0)[0]
    assert [_key(e) for e in got.events if e.lane == 0] == [_key(e) for e in want]  # the file lane, untouched
    assert file_lane.summary.frames_processed == truth0["frames"] and not file_lane.summary.stopped
    assert cam.error is None and cam.summary.stopped and cam.summary.reconnects == 1
    assert cam.outages == 1 and 0.5 < cam.outage_s < 5.0  # the first reopen waits 0.25 s, the second 0.5 s more
    assert other.error is None and other.summary.fruit_graded == len(clips[1][1]["fruits"])
    assert summary.to_json()["outages"] == 1


def test_a_lane_that_cannot_open_ends_alone_with_its_error(clips):
    class Never:
        def isOpened(self):
            return False

        def release(self):
            pass

    def factory(target, api):
        return Never() if isinstance(target, int) else cv2.VideoCapture(target, api)

    got = _Collect()
    summary = grade_lanes(_ByPixels(), Preprocess((24, 32)), CLASSES,
                          [LaneSpec("cam", "0"), LaneSpec("belt", str(clips[0][0]))],
                          GradeConfig(open_timeout_s=0.0), Sinks([got]), capture_factory=factory)
    assert "cannot open camera" in summary.lanes[0].error and summary.lanes[0].summary is None
    assert summary.lanes[1].summary.fruit_graded == len(clips[0][1]["fruits"]) == len(got.events)
    assert {e.lane for e in got.events} == {1} and summary.to_json()["lanes_failed"] == 1


def test_a_backend_that_fails_is_every_lanes_error_after_each_wrote_its_votes(clips):
    class Dies:
        name = "dies"

        def __init__(self):
            self.calls = 0

        def infer(self, x):
            self.calls += 1
            if self.calls > 5:
                raise RuntimeError("device lost")
            return np.tile(np.float32([[0.8, 0.1, 0.1]]), (len(x), 1))

    got = _Collect()
    with pytest.raises(BackendError, match="device lost"):
        grade_lanes(Dies(), Preprocess((24, 32)), CLASSES,
                    [LaneSpec("a", str(clips[0][0])), LaneSpec("b", str(clips[1][0]))],
                    GradeConfig(max_consecutive_failures=1), Sinks([got]))
    assert all(e.grade == "A" for e in got.events)  # what was voted before the fault was written


# ---------------------------------------------------------------------------------------------- lanes file


def _write(tmp_path, data, name="lanes.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_lanes_file_reads_names_sources_rois_and_triggers(clips, tmp_path):
    p = _write(tmp_path, {"lanes": [
        {"name": "left", "source": str(clips[0][0]), "roi": [0, 80, 640, 320], "trigger_x": 320},
        {"source": str(clips[1][0]), "roi": "0,60,640,360"}]})
    a, b = load_lanes(p)
    assert (a.name, a.roi, a.trigger_x) == ("left", (0, 80, 640, 320), 320.0)
    assert (b.name, b.roi, b.trigger_x) == ("lane1", (0, 60, 640, 360), None)
    assert load_lanes(_write(tmp_path, [{"source": "0"}], "list.json"))[0].source == "0"  # a bare list too
    (c,) = load_lanes(_write(tmp_path, [{"source": "0", "save": "rtsp://u:pw@h:8554/left"}], "save.json"))
    assert c.save == "rtsp://u:pw@h:8554/left" and "pw" not in json.dumps(c.to_json())


def _frames_in(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_each_lane_writes_its_own_annotated_video(clips, tmp_path):
    specs = [LaneSpec(name, str(path), save=str(tmp_path / f"{name}.avi"))
             for name, (path, _) in zip(("left", "right"), clips)]
    summary = grade_lanes(_ByPixels(), Preprocess((24, 32)), CLASSES, specs, GradeConfig())
    for res, (_, truth) in zip(summary.lanes, clips):
        assert res.video["error"] is None and res.video["sink"] == f"video {tmp_path / res.name}.avi"
        assert _frames_in(tmp_path / f"{res.name}.avi") == res.summary.frames_processed == truth["frames"]


def test_a_lane_stream_that_cannot_start_stops_the_run_before_grading(clips, monkeypatch):
    import mnet.runtime.sources

    monkeypatch.setattr(mnet.runtime.sources, "has_gstreamer", lambda: False)
    got = _Collect()
    specs = [LaneSpec("left", str(clips[0][0])), LaneSpec("right", str(clips[1][0]), save="rtp://127.0.0.1:5004")]
    with pytest.raises(ConfigError, match="rtp://127.0.0.1:5004.*GStreamer"):
        grade_lanes(_ByPixels(), Preprocess((24, 32)), CLASSES, specs, GradeConfig(), Sinks([got]))
    assert got.events == []


@pytest.mark.parametrize("data, words", [
    ("{not json", ["not valid JSON"]),
    ({"lanes": []}, ["lanes = []"]),
    ({"lane": []}, ["field(s)", "'lane'"]),
    ({"lanes": [{"name": "x"}]}, ["lanes[0].source", "None"]),
    ({"lanes": [{"source": "/no/such/belt.mp4"}]}, ["lanes[0].source", "no such file"]),
    ({"lanes": [{"source": "0", "roi": [0, 0, 0, 10]}]}, ["lanes[0].roi", "[0, 0, 0, 10]"]),
    ({"lanes": [{"source": "0", "roi": "a,b"}]}, ["lanes[0].roi"]),
    ({"lanes": [{"source": "0", "trigger_x": "mid"}]}, ["lanes[0].trigger_x", "'mid'"]),
    ({"lanes": [{"source": "0", "speed": 3}]}, ["lanes[0] field(s)", "'speed'"]),
    ({"lanes": [{"source": "0", "name": "a"}, {"source": "1", "name": "a"}]}, ["lane names", "'a'"]),
    ({"lanes": [{"source": "0", "name": ""}]}, ["lanes[0].name"]),
    ({"lanes": [{"source": "0", "save": 5}]}, ["lanes[0].save", "5"]),
])
def test_lanes_file_errors_name_the_field(tmp_path, data, words):
    with pytest.raises(ConfigError) as e:
        load_lanes(_write(tmp_path, data))
    msg = str(e.value)
    assert msg.startswith(f"lanes file {tmp_path / 'lanes.json'}") and "\n" not in msg
    assert all(w in msg for w in words), msg


# --------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def fake_bundle(tmp_path, monkeypatch):
    import mnet.bundle
    import mnet.runtime.backends

    class Backend(_ByPixels):
        def describe(self):
            return "pixels"

        def close(self):
            pass

    card = SimpleNamespace(preprocess=Preprocess((24, 32)), classes=CLASSES, display_name="fake")
    monkeypatch.setattr(mnet.bundle, "load_bundle", lambda path: SimpleNamespace(card=card, path=Path(path)))
    monkeypatch.setattr(mnet.runtime.backends, "open_backend", lambda *a, **k: Backend())
    return str(tmp_path / "bundle")


def test_cli_grades_two_sources_as_two_lanes(clips, fake_bundle, tmp_path, capsys):
    rc = main(["grade", fake_bundle, "--source", str(clips[0][0]), "--source", str(clips[1][0]),
               "--events", str(tmp_path / "e.jsonl"), "--summary", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    events = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    for lane, (_, truth) in enumerate(clips):
        mine = [e for e in events if e["lane"] == lane]
        assert [e["fruit_id"] for e in mine] == list(range(1, len(truth["fruits"]) + 1))
    s = json.loads((tmp_path / "s.json").read_text())
    assert [x["name"] for x in s["lanes"]] == ["lane0", "lane1"] and s["fruit_graded"] == len(events)
    assert s["batcher"]["calls"] >= 1 and "2 lanes" in out


def test_cli_saves_one_annotated_video_per_lane(clips, fake_bundle, tmp_path, capsys):
    lanes = _write(tmp_path, {"lanes": [{"name": "left", "source": str(clips[0][0]),
                                         "save": str(tmp_path / "own.avi")}]})
    rc = main(["grade", fake_bundle, "--lanes", str(lanes), "--source", str(clips[1][0]),
               "--save", str(tmp_path / "belt-{lane}-{index}.avi"), "--events", str(tmp_path / "e.jsonl")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert _frames_in(tmp_path / "own.avi") == clips[0][1]["frames"]  # the lanes file's own save wins
    assert _frames_in(tmp_path / "belt-lane1-1.avi") == clips[1][1]["frames"]
    assert "annotated video → video" in out


def test_cli_lanes_file_error_is_one_line_and_exit_2(clips, fake_bundle, tmp_path, capsys):
    bad = _write(tmp_path, {"lanes": [{"source": str(clips[0][0]), "roi": "x"}]})
    assert main(["grade", fake_bundle, "--lanes", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lanes[0].roi" in err and len(err.strip().splitlines()) == 1
    assert main(["grade", fake_bundle, "--source", "0", "--source", "1", "--save", str(tmp_path / "v.avi")]) == 2
    assert "--save with 2 lanes" in capsys.readouterr().err  # one file for two videos: {lane} says which
    assert main(["grade", fake_bundle]) == 2  # no source at all
    assert "--source: missing" in capsys.readouterr().err
