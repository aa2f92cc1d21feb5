"""Search spaces from the command line: --input-size, --layers, --width, --stem-stride, --kernels, --dilations
on `mnet arch sample`, `mnet search` and `mnet calibrate latency`, and the latency table's space checks."""

import json
import random

import pytest

from mnet.arch import PRESETS, Arch, Layer, build_space
from mnet.calibration.predictor import LatencyPredictor
from mnet.cli import main
from mnet.errors import ConfigError

TINY = ["--preset", "tiny", "--supernet-epochs", "1", "--controller-steps", "4", "--controller-batch", "2", "--derive-samples", "2",
        "--batch-size", "32", "--device", "cpu", "--no-fast-depthwise"]
SPACE = ["--input-size", "20x28", "--layers", "3", "--width", "8", "--kernels", "3,5"]
CUSTOM = build_space("tiny", input_hw=(20, 28), layers=3, width=8, kernels=(3, 5))


def _one_error_line(capsys, *needles):
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err
    for n in needles:
        assert n in err[0], err[0]


def _read_arch(path) -> Arch:
    return Arch.from_json(json.loads(path.read_text()))


@pytest.fixture(scope="module")
def custom_run(colour_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("space") / "run"
    assert main(["search", str(colour_data), "--out", str(out), *TINY, *SPACE]) == 0
    return out


@pytest.fixture(scope="module")
def custom_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("space") / "latency.json"
    assert main(["calibrate", "latency", "--preset", "tiny", *SPACE, "--threads", "1", "--fit-archs", "2",
                 "--out", str(out)]) == 0
    return out


def test_arch_sample_custom_space(capsys):
    for seed in range(3):
        assert main(["arch", "sample", "--preset", "tiny", "--input-size", "28x28", "--layers", "3",
                     "--kernels", "3,5", "--dilations", "1", "--seed", str(seed)]) == 0
        arch = Arch.from_json(json.loads(capsys.readouterr().out))
        assert arch.input_hw == (28, 28) and arch.num_layers == 3 and arch.width == PRESETS["tiny"].width
        assert {x.kernel for x in arch.layers} <= {3, 5} and {x.dilation for x in arch.layers} == {1}


def test_arch_sample_classes_from_data(tmp_path, capsys):
    for c in ("apple", "kiwi", "lime", "plum"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "train" / c / "x.jpg").write_bytes(b"not an image")  # the classes need no decoding
    assert main(["arch", "sample", "--data", str(tmp_path), "--out", str(tmp_path / "a.json")]) == 0
    assert _read_arch(tmp_path / "a.json").num_classes == 4
    assert main(["arch", "sample", "--data", str(tmp_path), "--num-classes", "4"]) == 2
    _one_error_line(capsys, "--num-classes", "--data")


@pytest.mark.parametrize("args,option", [
    (["--input-size", "28"], "--input-size"),
    (["--kernels", "4"], "--kernels"),
    (["--kernels", "3,x"], "--kernels"),
    (["--dilations", "0"], "--dilations"),
    (["--stem-stride", "3"], "--stem-stride"),
    (["--layers", "0"], "--layers"),
])
def test_bad_space_options_are_one_line(args, option, capsys):
    assert main(["arch", "sample", "--preset", "tiny", *args]) == 2
    _one_error_line(capsys, option)


def test_search_custom_space_then_derive(custom_run, capsys):
    for _ in range(2):  # what the search wrote, then what `mnet derive` re-derives from the saved supernet
        arch = _read_arch(custom_run / "arch.json")
        assert arch.input_hw == (20, 28) and arch.num_layers == 3 and arch.width == 8
        assert {x.kernel for x in arch.layers} <= {3, 5}
        assert main(["derive", str(custom_run), "--argmax"]) == 0
    assert json.loads((custom_run / "search.json").read_text())["space"]["name"] == "tiny+custom"


def test_resume_with_another_space_is_one_line(colour_data, custom_run, capsys):
    other = [*SPACE[:2], "--layers", "4", *SPACE[4:]]
    assert main(["search", str(colour_data), "--out", str(custom_run), *TINY, *other, "--resume"]) == 2
    _one_error_line(capsys, "--resume", "layers")


def test_calibrate_custom_space(custom_table, tmp_path):
    table = json.loads(custom_table.read_text())
    assert table["complete"] and table["space"] == CUSTOM.to_json()
    assert main(["calibrate", "check", str(custom_table), "--archs", "3", "--plot", str(tmp_path / "c.png")]) == 0


def test_resume_table_of_another_space_is_one_line(custom_table, capsys):
    assert main(["calibrate", "latency", "--preset", "tiny", "--out", str(custom_table)]) == 2
    _one_error_line(capsys, "search space 'tiny+custom'", "not 'tiny'", "--out")


def test_search_refuses_a_table_of_another_space_up_front(colour_data, custom_table, tmp_path, capsys):
    assert main(["search", str(colour_data), "--out", str(tmp_path / "r"), *TINY, "--latency-table",
                 str(custom_table), "--latency-budget-ms", "1"]) == 2
    _one_error_line(capsys, "'tiny+custom'", "'tiny'", "mnet calibrate latency --preset tiny --input-size 24x32 "
                    "--layers 4 --width 16 --stem-stride 1 --kernels 3,7,11")
    assert not (tmp_path / "r").exists()


def test_predictor_refuses_an_arch_of_another_space(custom_table):
    predictor = LatencyPredictor.from_file(custom_table)
    assert predictor.predict_ms(CUSTOM.sample(random.Random(0))) > 0
    predictor.check_space(build_space("tiny", input_hw=(20, 28), layers=3, width=8, kernels=(5,)))  # a sub-space
    cases = [(PRESETS["tiny"].sample(random.Random(0)), "--input-size 24x32 --layers 4 --width 16"),
             (CUSTOM.with_classes(10).sample(random.Random(0)), "--num-classes 10"),
             (CUSTOM.skeleton([Layer(7, 1), Layer(3, 1), Layer(5, 1)]), "--kernels 3,5,7")]  # an op it lacks
    for arch, needle in cases:
        with pytest.raises(ConfigError) as e:
            predictor.predict_ms(arch)
        msg = str(e.value)
        assert "\n" not in msg and "'tiny+custom'" in msg and "mnet calibrate latency" in msg and needle in msg, msg


def test_research_on_a_custom_space(custom_run, custom_table, tmp_path, capsys):
    assert main(["research", str(custom_run), "--latency-table", str(custom_table), "--latency-budget-ms", "1",
                 "--out", str(tmp_path / "r"), "--controller-steps", "2", "--derive-samples", "2",
                 "--device", "cpu"]) == 0
    arch = _read_arch(tmp_path / "r" / "arch.json")
    assert arch.input_hw == (20, 28) and arch.num_layers == 3 and {x.kernel for x in arch.layers} <= {3, 5}
