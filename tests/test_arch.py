import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnet.arch import OPS, PRESETS, Arch, Layer, cropped_kernel, get_preset
from mnet.errors import ConfigError
from mnet.preprocess import Preprocess


@st.composite
def archs(draw):
    n = draw(st.integers(1, 6))
    layers = []
    for i in range(1, n + 1):
        k, d = draw(st.sampled_from(OPS))
        layers.append(Layer(k, d, draw(st.one_of(st.none(), st.integers(0, i - 1)))))
    red = tuple(sorted(draw(st.sets(st.integers(1, n - 1), max_size=2)))) if n > 1 else ()
    return Arch((draw(st.integers(8, 40)), draw(st.integers(8, 40))), draw(st.integers(1, 32)),
                draw(st.sampled_from([1, 2])), red, draw(st.integers(2, 5)), tuple(layers))


@given(archs())
@settings(max_examples=60, deadline=None)
def test_arch_json_round_trip(arch):
    assert Arch.from_json(json.loads(json.dumps(arch.to_json()))) == arch


@pytest.mark.parametrize("field,value,needle", [
    ("width", 0, "'width'"),
    ("stem_stride", 3, "'stem_stride'"),
    ("num_classes", 1, "'num_classes'"),
    ("reductions", [4, 2], "'reductions'"),
    ("input_hw", [24], "'input_hw'"),
    ("schema_version", 9, "'schema_version'"),
])
def test_arch_validation_names_the_field(field, value, needle):
    d = PRESETS["tiny"].sample(random.Random(0)).to_json()
    d[field] = value
    with pytest.raises(ConfigError, match=needle):
        Arch.from_json(d)


@pytest.mark.parametrize("layer,needle", [
    ({"kernel": 4, "dilation": 1, "skip": None}, r"layers\[1\].kernel"),  # any odd kernel is valid (--kernels)
    ({"kernel": 3, "dilation": 0, "skip": None}, r"layers\[1\].dilation"),
    ({"kernel": 3, "dilation": 1, "skip": 2}, r"layers\[1\].skip"),
    ({"kernel": 3, "dilation": 1, "skip": -1}, r"layers\[1\].skip"),
])
def test_layer_validation(layer, needle):
    d = PRESETS["tiny"].sample(random.Random(0)).to_json()
    d["layers"][1] = layer
    with pytest.raises(ConfigError, match=needle):
        Arch.from_json(d)


def test_missing_field_and_non_object():
    d = PRESETS["tiny"].sample(random.Random(0)).to_json()
    del d["width"]
    with pytest.raises(ConfigError, match="width"):
        Arch.from_json(d)
    with pytest.raises(ConfigError):
        Arch.from_json([1, 2])


def test_search_space_sizes():
    # 20 ops per layer, i+1 skip choices for layer i: 20^L (L+1)!
    assert PRESETS["mnet-24-32"].size() == 20 ** 12 * math.factorial(13)
    assert PRESETS["tiny"].size() == 20 ** 4 * 120
    assert len(OPS) == 20
    assert PRESETS["mnet-24-32"].reductions == (4, 8)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")


def test_presets_sample_valid_and_contained():
    rng = random.Random(3)
    for space in PRESETS.values():
        for _ in range(20):
            a = space.sample(rng)
            assert space.contains(a)
            assert all(x.skip is None or 0 <= x.skip < i for i, x in enumerate(a.layers, 1))


def test_cropped_kernel():
    assert cropped_kernel(3, 1, 24, 32) == (3, 3)
    assert cropped_kernel(39, 1, 6, 8) == (11, 15)  # |offset| <= 5 rows, <= 7 cols
    assert cropped_kernel(39, 2, 6, 8) == (5, 7)  # offsets 2*i <= 5 → i <= 2
    assert cropped_kernel(39, 1, 120, 160) == (39, 39)


def test_node_geometry_and_cost():
    a = PRESETS["mnet-120-160"].sample(random.Random(0))
    assert a.node_hw(0) == (60, 80) and a.node_hw(5) == (30, 40) and a.node_hw(12) == (15, 20)
    c = a.width
    manual = 29 * c + sum(c * kh * kw + c * c + 4 * c for kh, kw in (a.layer_kernel_hw(i) for i in range(1, 13)))
    assert a.num_params() == manual + c * 3 + 3
    assert a.macs() > 0


def test_preprocess_round_trip_and_validation():
    p = Preprocess((24, 32))
    assert Preprocess.from_json(json.loads(json.dumps(p.to_json()))) == p
    with pytest.raises(ConfigError, match="std"):
        Preprocess((24, 32), std=(0.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="interpolation"):
        Preprocess((24, 32), interpolation="cubicish")


def test_search_space_json_round_trip_and_errors():
    for space in PRESETS.values():
        assert type(space).from_json(json.loads(json.dumps(space.to_json()))) == space
    d = PRESETS["tiny"].to_json()
    del d["width"]
    with pytest.raises(ConfigError, match="width"):
        type(PRESETS["tiny"]).from_json(d)
