"""`mnet search` / `mnet derive`: a tiny end-to-end run, and user errors as one line with exit 2."""

import json
import subprocess
import sys

import pytest

from mnet.arch import Arch
from mnet.cli import main

TINY = ["--preset", "tiny", "--supernet-epochs", "1", "--controller-steps", "4", "--controller-batch", "2", "--derive-samples", "2",
        "--batch-size", "32", "--device", "cpu", "--no-fast-depthwise"]


@pytest.fixture(scope="module")
def run(colour_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["search", str(colour_data), "--out", str(out), *TINY]) == 0
    return out


def _one_error_line(capsys, *needles):
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err
    for n in needles:
        assert n in err[0], err[0]


def test_search_then_derive(run, capsys):
    arch = Arch.from_json(json.loads((run / "arch.json").read_text()))
    assert arch.num_layers == 4 and (run / "search.json").is_file() and (run / "reward.png").is_file()
    assert main(["derive", str(run), "--argmax"]) == 0
    assert "arch →" in capsys.readouterr().out
    assert len(json.loads((run / "topk.json").read_text())) == 1
    assert main(["derive", str(run), "--samples", "3"]) == 0
    assert json.loads((run / "derive.json").read_text())["samples"] == 3


@pytest.mark.parametrize("args,needles", [
    (["--strategy", "evolution"], ["--strategy", "enas, random"]),
    (["--supernet-epochs", "0"], ["--supernet-epochs"]),
    (["--strategy", "random", "--schedule", "alternating"], ["--schedule", "two-stage"]),
    (["--bn", "frozen"], ["--bn"]),
    (["--preset", "huge"], ["preset", "tiny"]),
])
def test_bad_search_options(colour_data, tmp_path, capsys, args, needles):
    assert main(["search", str(colour_data), "--out", str(tmp_path / "r"), *TINY, *args]) == 2
    _one_error_line(capsys, *needles)


def test_run_directory_errors(colour_data, run, tmp_path, capsys):
    assert main(["search", str(colour_data), "--out", str(run), *TINY]) == 2
    _one_error_line(capsys, "--resume")
    assert main(["search", str(colour_data), "--out", str(tmp_path / "new"), *TINY, "--resume"]) == 2
    _one_error_line(capsys, "start without --resume")
    assert main(["derive", str(tmp_path / "nowhere")]) == 2
    _one_error_line(capsys, "supernet.pt")
    assert main(["derive", str(run), "--argmax", "--samples", "3"]) == 2
    _one_error_line(capsys, "--samples", "--argmax")


def test_no_traceback_from_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mnet", "search", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "r"), "--preset", "tiny"], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]
