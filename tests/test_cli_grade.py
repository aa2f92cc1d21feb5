"""`mnet grade` end to end through the CLI, in a process where torch cannot be imported (a Jetson)."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from mnet.cli import main
from mnet.conveyor import make_conveyor_video
from mnet.search.train import TrainConfig, train

_NO_TORCH = textwrap.dedent("""
    import sys, importlib.abc
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "torch" or name.startswith(("torch.", "mnet.search")):
                raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, _Block())
    from mnet.cli import main
    raise SystemExit(main(sys.argv[1:]))
""")


def test_grade_cli_without_torch(colour_data, tiny_arch, tmp_path):
    train(colour_data, tiny_arch, tmp_path / "r", TrainConfig(epochs=1, batch_size=32, lr=0.05, fast_depthwise=False))
    assert main(["export", "onnx", str(tmp_path / "r" / "best.pt"), "--out", str(tmp_path / "b")]) == 0
    truth = make_conveyor_video(tmp_path / "c.mp4", fruits=3, seed=1)
    assert truth["frames"] > 0
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, "grade", str(tmp_path / "b"), "--source",
                        str(tmp_path / "c.mp4"), "--events", str(tmp_path / "e.jsonl"), "--summary",
                        str(tmp_path / "s.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert len(events) == 3 and [e["fruit_id"] for e in events] == [1, 2, 3]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["fruit_graded"] == 3 and summary["frames_dropped"] == 0
    # a missing bundle is one line, exit 2, no traceback — also without torch
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, "grade", str(tmp_path / "nope"), "--source", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().startswith("error:")


def test_grade_views_help_states_the_trackers_default():
    import typing

    from mnet.runtime.tracker import TrackerConfig

    from mnet.cli import grade as grade_cmd

    opt = typing.get_type_hints(grade_cmd.grade, include_extras=True)["views"].__metadata__[0]
    assert f"(default {TrackerConfig().max_views})" in opt.help


# ------------------------------------------------ sinks through the CLI, in process, with a stand-in bundle


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_grade_cli_one_full_sink_keeps_the_others_and_exits_2_with_one_line(fake_grade, tmp_path, capsys):
    x = tmp_path / "x.csv"
    rc = fake_grade("--events", "/dev/full", "--csv", str(x), "--summary", str(tmp_path / "s.json"))
    out, stderr = capsys.readouterr()
    assert rc == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/dev/full" in errors[0] and "No space left on device" in errors[0]
    assert "3 event(s) missed" in errors[0]
    assert [r["grade"] for r in csv.DictReader(x.open())] == ["B", "B", "B"]  # the CSV got every fruit
    assert "FAILED" in out and "3 event(s) missed" in out  # the summary table names the sink
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["fruit_graded"] == 3
    assert {r["sink"]: (r["written"], r["missed"]) for r in summary["sinks"]} == {"jsonl /dev/full": (0, 3),
                                                                                  f"csv {x}": (3, 0)}


def test_grade_cli_refuses_a_csv_with_other_columns_before_writing_any_event(fake_grade, tmp_path, capsys):
    other = tmp_path / "old.csv"
    other.write_text("fruit_id,grade,p_ok,p_bad\n1,ok,0.9,0.1\n")
    rc = fake_grade("--events", str(tmp_path / "e.jsonl"), "--csv", str(other))
    stderr = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in stderr and "has columns" in stderr
    assert not (tmp_path / "e.jsonl").exists() or (tmp_path / "e.jsonl").read_text() == ""


@pytest.mark.parametrize("fsync, per_event", [(None, False), ("exit", False), ("every", True)])
def test_grade_cli_fsync_option_reaches_the_jsonl(fake_grade, tmp_path, monkeypatch, fsync, per_event):
    import mnet.runtime.sinks

    made = []
    real = mnet.runtime.sinks.JsonlSink

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(mnet.runtime.sinks, "JsonlSink", Spy)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    rc = fake_grade("--events", str(tmp_path / "e.jsonl"), *(["--fsync", fsync] if fsync else []))
    assert rc == 0 and len(made) == 1 and made[0].fsync_each is per_event
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 3
    assert len(synced) == (3 + 1 if per_event else 1)  # per event (and at close), or only at close


def test_grade_cli_fsync_help_names_both_choices():
    import typing

    from mnet.cli import grade as grade_cmd

    opt = typing.get_type_hints(grade_cmd.grade, include_extras=True)["fsync"].__metadata__[0]
    assert "'every'" in opt.help and "'exit'" in opt.help
    assert main(["grade", "b", "--source", "0", "--fsync", "sometimes"]) == 2  # not a choice: a usage error


def test_grade_cli_stream_without_gstreamer_is_one_redacted_line_before_any_event(fake_grade, tmp_path, capsys,
                                                                                   monkeypatch):
    import mnet.runtime.sources

    monkeypatch.setattr(mnet.runtime.sources, "has_gstreamer", lambda: False)  # the PyPI OpenCV; not Jetson's
    rc = fake_grade("--events", str(tmp_path / "e.jsonl"), "--save", "rtsp://op:hunter2@mtx:8554/belt")
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and "Traceback" not in stderr and len(errors) == 1 and "hunter2" not in stderr
    # the URI reached the sink whole (a Path would have folded "//"), redacted
    assert "rtsp://op:***@mtx:8554/belt" in errors[0] and "GStreamer" in errors[0]
    assert not (tmp_path / "e.jsonl").exists() or (tmp_path / "e.jsonl").read_text() == ""


def test_grade_cli_streams_frames_through_the_gstreamer_writer(fake_grade, tmp_path, monkeypatch):
    import mnet.runtime.sinks
    import mnet.runtime.sources

    class Writer:
        def __init__(self, pipeline, api, fourcc, fps, size, colour):
            self.pipeline, self.size, self.shapes = pipeline, size, []
            made.append(self)

        def isOpened(self):
            return True

        def write(self, img):
            self.shapes.append(img.shape)

        def release(self):
            pass

    made: list[Writer] = []
    monkeypatch.setattr(mnet.runtime.sources, "has_gstreamer", lambda: True)  # as Jetson's OpenCV
    monkeypatch.setattr(mnet.runtime.sinks.cv2, "VideoWriter", Writer)
    monkeypatch.setattr(mnet.runtime.sinks, "pick_encoder", lambda: "x264enc")
    rc = fake_grade("--events", str(tmp_path / "e.jsonl"), "--save", "rtp://127.0.0.1:5000", "--input-size", "64x48")
    assert rc == 0 and len(made) == 1
    assert made[0].pipeline.endswith("udpsink host=127.0.0.1 port=5000 sync=false async=false")
    assert made[0].size == (64, 48) and made[0].shapes == [(48, 64, 3)] * 3
