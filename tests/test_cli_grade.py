"""`mnet grade` end to end through the CLI, in a process where torch cannot be imported (a Jetson)."""

import json
import subprocess
import sys
import textwrap

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
