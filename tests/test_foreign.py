"""Foreign objects (issue 14 item 13): the conveyor draws them with truth, the localiser's fruit priors
flag them, the open-set gate turns them into reject events with a reason, never a grade."""

from __future__ import annotations

import numpy as np
import pytest

from mnet import conveyor, synth
from mnet.bundle import BundleCard
from mnet.errors import ConfigError
from mnet.preprocess import Preprocess
from mnet.runtime.gate import REASON_LOW_CONFIDENCE, GateConfig, OpenSetGate
from mnet.runtime.grader import GradeConfig, Grader
from mnet.runtime.localize import Box, LocalizeConfig, Localizer

SIZE = (320, 240)
CLASSES = ("A", "B", "C")


def _belt(w: int = 320, h: int = 240) -> np.ndarray:
    return np.full((h, w, 3), 40, np.uint8)


def test_conveyor_adds_foreign_objects_with_truth_and_keeps_the_fruit():
    plain = conveyor.plan_conveyor(fruits=4, seed=3, size_wh=SIZE)
    mixed = conveyor.plan_conveyor(fruits=4, seed=3, size_wh=SIZE, foreign=3)
    truth = mixed.truth()
    assert truth["schema_version"] == 2 and plain.truth()["schema_version"] == 1
    assert "kind" not in plain.truth()["fruits"][0]
    odd = [t for t in truth["fruits"] if t["grade"] == conveyor.FOREIGN]
    assert len(odd) == 3 and len(truth["fruits"]) == 7
    assert all(t["kind"] in synth.FOREIGN_KINDS for t in odd)
    assert all(t["kind"] == "mango" and t["grade"] in synth.GRADES for t in truth["fruits"] if t not in odd)
    # The same seed's fruit look the same with or without foreign objects between them.
    fruit = [f for f in mixed.fruits if f.grade != conveyor.FOREIGN]
    assert [(f.grade, f.axes, f.angle) for f in fruit] == [(f.grade, f.axes, f.angle) for f in plain.fruits]
    # Every foreign object is painted where the truth says it is visible.
    for f in mixed.fruits:
        if f.grade == conveyor.FOREIGN:
            mid = (f.first_frame + f.last_frame) // 2
            x0, y0, x1, y1 = dict(mixed.render(mid)[1])[f.fruit_id]
            assert x1 > x0 and y1 > y0
    with pytest.raises(ConfigError, match="foreign"):
        conveyor.plan_conveyor(fruits=2, foreign=-1)


@pytest.mark.parametrize("kind", synth.FOREIGN_KINDS)
def test_draw_foreign_is_deterministic_and_boxed(kind):
    a, b = _belt(), _belt()
    box = synth.draw_foreign(a, np.random.default_rng(5), kind, (160, 120), 90, 30)
    assert box == synth.draw_foreign(b, np.random.default_rng(5), kind, (160, 120), 90, 30)
    assert np.array_equal(a, b)
    x0, y0, x1, y1 = box
    assert 0 < x1 - x0 <= 1.5 * 90 and 0 < y1 - y0 <= 1.5 * 90  # a rotated rectangle reaches past its length
    assert synth.draw_foreign(_belt(), np.random.default_rng(5), kind, (-500, 120), 90, 0) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="kind"):
        synth.draw_foreign(_belt(), np.random.default_rng(5), "brick", (160, 120), 90, 0)


def test_localiser_priors_flag_a_leaf_and_gloves_but_not_a_grade_c_mango():
    loc = Localizer(LocalizeConfig())
    leaf, glove, mango = _belt(), _belt(), _belt()
    synth.draw_foreign(leaf, np.random.default_rng(1), "leaf", (160, 120), 110, 25)
    # The palette pick is internal to the look: find a seed whose glove is nitrile blue.
    blue = next(s for s in range(50) if synth._foreign_shape(np.random.default_rng(s), "glove", 100)[1]["rgb"][2] > 150)
    synth.draw_foreign(glove, np.random.default_rng(blue), "glove", (160, 120), 100, 10)
    synth.draw_mango(mango, np.random.default_rng(2), "C", (160, 120), (50, 34), 15)
    (lb,) = loc(leaf)
    (gb,) = loc(glove)
    (mb,) = loc(mango)
    assert lb.foreign == "shape"
    assert gb.foreign == "colour"
    assert mb.foreign is None
    assert Localizer(LocalizeConfig(foreign_priors=False))(leaf)[0].foreign is None
    # A yellow rubber glove has a mango's hue and saturation, but lies flat: no shading towards its rim.
    yellow = next(s for s in range(50) if synth._foreign_shape(np.random.default_rng(s), "glove", 100)[1]["rgb"][2] < 60
                  and synth._foreign_shape(np.random.default_rng(s), "glove", 100)[1]["rgb"][0] > 200)
    yg = _belt()
    synth.draw_foreign(yg, np.random.default_rng(yellow), "glove", (160, 120), 100, 10)
    assert [b.foreign for b in loc(yg)] == ["flat"]


def test_gate_votes_priors_over_whole_views_and_applies_the_confidence_threshold():
    gate = OpenSetGate(GateConfig(min_confidence=0.5))
    fruit, leaf, cut = Box(0, 0, 10, 10), Box(0, 0, 30, 8, foreign="shape"), Box(0, 0, 5, 10, touches_edge=True)
    sure = np.array([0.8, 0.1, 0.1])
    for v in (leaf, leaf, fruit):
        gate.observe(1, v)
    assert gate.decide(1, sure) == "foreign:shape"
    for v in (leaf, fruit, fruit):  # one odd mask among three views does not reject a fruit
        gate.observe(2, v)
    assert gate.decide(2, sure) is None
    gate.observe(3, cut)  # cut by the border: not judged
    assert gate.decide(3, sure) is None
    assert gate.decide(4, np.array([0.4, 0.35, 0.25])) == REASON_LOW_CONFIDENCE
    assert OpenSetGate(GateConfig(enabled=False)).decide(5, np.array([0.4, 0.35, 0.25])) is None
    with pytest.raises(ConfigError, match="min_confidence"):
        GateConfig(min_confidence=1.5)


def test_gate_threshold_comes_from_the_card():
    card = BundleCard(classes=CLASSES, preprocess=Preprocess((24, 32)), params=1, model_name="m",
                      open_set={"score": "max_softmax", "min_confidence": 0.41})
    again = BundleCard.from_json(card.to_json())
    assert again.open_set == card.open_set
    assert GateConfig.from_card(again).min_confidence == pytest.approx(0.41)
    assert GateConfig.from_card(BundleCard(classes=CLASSES, preprocess=Preprocess((24, 32)), params=1,
                                           model_name="m")).min_confidence == 0.0


class _Confident:
    """A backend sure of grade A for anything: the gate, not the model, must reject foreign objects."""

    name = "confident"

    def infer(self, x):
        p = np.zeros((len(x), 3), np.float32)
        p[:, 0] = 0.99
        p[:, 1:] = 0.005
        return p


def test_grader_rejects_a_foreign_object_with_a_reason_and_grades_the_fruit():
    # The first seed whose foreign object is a leaf: a clearly foreign shape.
    plan = next(p for p in (conveyor.plan_conveyor(fruits=2, foreign=1, seed=s, size_wh=(320, 240)) for s in range(40))
                if any(f.kind == "leaf" for f in p.fruits))
    cfg = GradeConfig(warmup=False)
    events = []
    with Grader(_Confident(), Preprocess((24, 32)), CLASSES, cfg) as g:
        for i in range(plan.frames):
            events += g.process(plan.render(i)[0], i / 30)[0]
        events += g.flush()
    kinds = [f.grade for f in sorted(plan.fruits, key=lambda f: f.last_frame)]
    assert len(events) == 3
    for e, truth in zip(events, kinds):
        if truth == conveyor.FOREIGN:
            assert e.grade == "reject" and e.reason == "foreign:shape"
        else:
            assert e.grade == "A" and e.reason is None
    assert g.grades.get("reject") == 1
