"""The CLI: thin commands, one-line errors with exit 2 and no traceback."""

import json
import subprocess
import sys

import pytest

from mnet.cli import main


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mnet", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("args", [
    ["train", "/nonexistent/data", "--arch", "/nonexistent/a.json", "--out", "/tmp/x"],
    ["arch", "show", "/nonexistent/a.json"],
    ["arch", "sample", "--preset", "huge"],
    ["evaluate", "/nonexistent/best.pt", "/nonexistent/data"],
    ["data", "check", "/nonexistent/data"],
])
def test_user_errors_are_one_line_exit_2(args):
    r = run(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1, r.stderr
    assert r.stderr.strip().startswith("error:")


def test_bad_arch_json_names_field(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"input_hw": [24, 32], "width": 16, "stem_stride": 1, "reductions": [1],
                             "num_classes": 3, "layers": [{"kernel": 4, "dilation": 1, "skip": None},
                                                          {"kernel": 3, "dilation": 1}]}))
    r = run("arch", "show", p)
    assert r.returncode == 2 and "layers[0].kernel" in r.stderr


def test_arch_sample_show_train_evaluate(colour_data, tmp_path, capsys):
    assert main(["arch", "sample", "--preset", "tiny", "--seed", "0"]) == 0
    arch = json.loads(capsys.readouterr().out)
    (tmp_path / "a.json").write_text(json.dumps(arch))
    assert main(["arch", "show", str(tmp_path / "a.json")]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["train", str(colour_data), "--arch", str(tmp_path / "a.json"), "--out", str(tmp_path / "r"),
                 "--epochs", "1", "--lr", "0.05", "--batch-size", "32"]) == 0
    assert (tmp_path / "r" / "best.pt").is_file()
    assert main(["evaluate", str(tmp_path / "r" / "best.pt"), str(colour_data), "--split", "test",
                 "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "accuracy (weighted average recall)" in out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 30 and 0 <= m["accuracy"] <= 1
    assert (tmp_path / "r" / "confusion.png").stat().st_size > 0


def test_train_sets_a_sampled_archs_head_from_the_data(colour_data, tmp_path, capsys, caplog):
    """An arch is the body: a 10-class sample trains on a 3-class set with a 3-class head, and says so."""
    assert main(["arch", "sample", "--preset", "tiny", "--num-classes", "10", "--out", str(tmp_path / "a.json")]) == 0
    with caplog.at_level("INFO", logger="mnet.search.train"):
        assert main(["train", str(colour_data), "--arch", str(tmp_path / "a.json"), "--out", str(tmp_path / "r"),
                     "--epochs", "1", "--batch-size", "32", "--no-fast-depthwise"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "10-class head; training with 3 (the classes of" in out
    assert any("the head is set to 3" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "r" / "train.json").read_text())["arch"]["num_classes"] == 3
    assert main(["evaluate", str(tmp_path / "r" / "best.pt"), str(colour_data), "--split", "test"]) == 0


def test_data_check_exit_codes(colour_data, tmp_path, capsys):
    assert main(["data", "check", str(colour_data)]) == 0
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(colour_data, bad)
    (bad / "train" / "00000.jpg").write_bytes(b"broken")
    assert main(["data", "check", str(bad)]) == 2
