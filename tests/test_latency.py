import json
import random

import pytest

from mnet.arch import PRESETS, Arch, Layer
from mnet.calibration.blocks import arch_model, block_model
from mnet.calibration.latency import TimingConfig, check_table, measure_table
from mnet.calibration.predictor import LatencyPredictor, fit_correction, kendall_tau, load_table
from mnet.errors import CheckpointError, ConfigError
from mnet.latency_table import Correction, Entry, LatencyTable, arch_blocks, space_blocks
from mnet.search.reward import latency_reward

FAST = TimingConfig(warmup=1, min_reps=3, min_seconds=0.0, max_reps=3)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_table_keys_cover_every_block(preset):
    space = PRESETS[preset]
    keys = set(space_blocks(space))
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        blocks = arch_blocks(space.sample(rng))
        assert set(blocks) <= keys
        seen |= set(blocks)
    # every op at every layer resolution is in the table
    assert sum(k.startswith("op:") for k in keys) == 20 * len({space.skeleton([Layer(3, 1)] * space.num_layers)
                                                               .node_hw(i) for i in range(1, space.num_layers + 1)})
    assert len(seen) > len(keys) // 2


def test_arch_blocks_counts_pools_and_adds():
    a = Arch((24, 32), 16, 1, (1, 2), 3, (Layer(3, 1), Layer(7, 1, 0), Layer(3, 2, 0), Layer(11, 1)))
    b = arch_blocks(a)
    assert b[0] == "stem:c3-16:24x32:s1" and b[-1] == "head:c16:6x8:n3"
    # layer 2 at level 1: running pool + skip from stem pooled once + add
    # layer 3 at level 2: running pool + stem pooled twice + add
    assert b.count("pool:c16:24x32") == 3 and b.count("pool:c16:12x16") == 2
    assert b.count("add:c16:12x16") == 1 and b.count("add:c16:6x8") == 1


def _table(entries, correction=Correction()):
    return LatencyTable(device={"cpu": "x"}, backend="onnxruntime", precision="fp32", batch=1,
                        space=PRESETS["tiny"].to_json(), entries=entries, correction=correction, complete=True)


def test_predictor_sums_and_applies_fit():
    space = PRESETS["tiny"]
    entries = {k: Entry(0.01 * (i + 1), 0.02 * (i + 1), 5) for i, k in enumerate(space_blocks(space))}
    a = space.sample(random.Random(1))
    raw = sum(entries[k].p50_ms for k in arch_blocks(a))
    p = LatencyPredictor(_table(entries))
    assert p.raw_ms(a) == pytest.approx(raw) and p.predict_ms(a) == pytest.approx(raw)
    p2 = LatencyPredictor(_table(entries, Correction(slope=2.0, intercept_ms=0.5, per_block_ms=-0.01)))
    assert p2.predict_ms(a) == pytest.approx(2 * raw - 0.01 * len(arch_blocks(a)) + 0.5)


def test_fit_correction_recovers_a_line():
    raw = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    blocks = [6, 9, 7, 10, 8, 12, 11]
    measured = [0.8 * r - 0.02 * n + 0.3 for r, n in zip(raw, blocks)]
    c = fit_correction(raw, blocks, measured)
    assert c.slope == pytest.approx(0.8) and c.per_block_ms == pytest.approx(-0.02) and c.intercept_ms == pytest.approx(0.3)
    assert fit_correction([1.0], [5], [3.0]).intercept_ms == pytest.approx(2.0)


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("mode,lat,expected", [
    ("soft", 5.0, 0.8 * (5 / 10) ** -0.07),    # below the budget: a small bonus
    ("soft", 10.0, 0.8),                        # at the budget
    ("soft", 20.0, 0.8 * 2 ** -0.07),           # above: a small penalty
    ("hard", 5.0, 0.8),                         # below: no effect
    ("hard", 10.0, 0.8),
    ("hard", 20.0, 0.4),                        # above: acc × T/LAT
])
def test_reward_formulas(mode, lat, expected):
    r = latency_reward(lambda a: lat, 10.0, mode)
    value, extra = r(None, 0.8)
    assert value == pytest.approx(expected) and extra == {"latency_ms": lat}


def test_reward_overrides_and_errors():
    assert latency_reward(lambda a: 20.0, 10.0, "soft", beta=-1.0)(None, 0.8)[0] == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="latency-mode"):
        latency_reward(lambda a: 1.0, 10.0, "medium")
    with pytest.raises(ConfigError, match="budget"):
        latency_reward(lambda a: 1.0, 0.0)


def test_block_and_arch_graphs_are_valid_onnx():
    import onnx

    space = PRESETS["tiny"]
    for key in space_blocks(space)[:8] + [k for k in space_blocks(space) if k.startswith(("stem", "head", "add"))]:
        onnx.checker.check_model(block_model(key), full_check=True)
    onnx.checker.check_model(arch_model(space.sample(random.Random(0))), full_check=True)


def test_measure_resume_and_check(tmp_path):
    out = tmp_path / "lat.json"

    class Stop(Exception):
        pass

    def stop_at(done, total, what):
        if done == 5:
            raise Stop

    with pytest.raises(Stop):
        measure_table("tiny", out, threads=1, fit_archs=4, timing=FAST, progress=stop_at)
    partial = load_table(out)
    assert len(partial.entries) == 5 and not partial.complete
    with pytest.raises(ConfigError, match="incomplete"):
        LatencyPredictor.from_file(out)
    seen = []
    table = measure_table("tiny", out, threads=1, fit_archs=4, timing=FAST, progress=lambda d, t, w: seen.append(w))
    assert table.complete and set(table.entries) == set(space_blocks(PRESETS["tiny"]))
    assert len([w for w in seen if w != "network"]) == len(table.entries) - 5  # only the rest was measured
    result = check_table(out, archs=6, timing=FAST, plot=tmp_path / "s.png")
    assert result["n"] == 6 and -1 <= result["kendall_tau"] <= 1 and (tmp_path / "s.png").stat().st_size > 0


def test_corrupt_and_foreign_tables(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_table(p)
    p.write_text(json.dumps({"entries": {"x": {"p50_ms": 1}}}))
    with pytest.raises(CheckpointError, match="corrupt latency table"):
        load_table(p)
    space = PRESETS["tiny"]
    entries = {k: Entry(0.1, 0.1, 1) for k in space_blocks(space)}
    foreign = PRESETS["mnet-24-32"].sample(random.Random(0))
    with pytest.raises(ConfigError, match="search space 'tiny'"):
        LatencyPredictor(_table(entries)).predict_ms(foreign)
