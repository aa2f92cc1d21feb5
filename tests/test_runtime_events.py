"""The grade event contract: exact JSON fields, round trip, validation that names the bad field."""

from __future__ import annotations

import json

import pytest

from mnet.errors import ConfigError
from mnet.events import EVENT_FIELDS, GradeEvent


def _event(**kw) -> GradeEvent:
    d = {"fruit_id": 3, "grade": "B", "confidence": 0.7, "probs": {"A": 0.2, "B": 0.7, "C": 0.1}, "frames": 12,
             "views": 3, "first_ts": 1.5, "last_ts": 1.9, "source": "belt.mp4", "model": "tiny@abc"}
    d.update(kw)
    return GradeEvent(**d)


def test_json_fields_are_exactly_the_contract_and_round_trip():
    e = _event()
    d = e.to_json()
    assert set(d) == {"fruit_id", "grade", "confidence", "probs", "frames", "views", "first_ts", "last_ts",
                      "source", "model", "schema_version"}
    assert tuple(d) == EVENT_FIELDS
    assert list(d["probs"]) == ["A", "B", "C"]  # model class order is kept
    assert GradeEvent.from_json(d) == e
    assert GradeEvent.from_json(e.to_line()) == e
    assert "\n" not in e.to_line() and json.loads(e.to_line()) == d


def test_from_probs_takes_the_argmax():
    e = GradeEvent.from_probs(1, {"A": 0.1, "B": 0.25, "C": 0.65}, frames=3, views=1, first_ts=0.0, last_ts=0.1,
                              source="s", model="m")
    assert (e.grade, e.confidence) == ("C", 0.65)


def test_event_is_frozen_and_owns_its_probs():
    probs = {"A": 0.2, "B": 0.7, "C": 0.1}
    e = _event(probs=probs)
    probs["A"] = 0.9
    assert e.probs["A"] == 0.2
    with pytest.raises(AttributeError):
        e.grade = "A"


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"fruit_id": -1}, "fruit_id"),
        ({"fruit_id": True}, "fruit_id"),
        ({"grade": "D"}, "grade"),
        ({"confidence": 0.5}, "confidence"),  # must equal probs[grade]
        ({"probs": {"A": 0.5, "B": 0.7, "C": 0.1}}, "probs"),  # does not sum to 1
        ({"probs": {"A": -0.1, "B": 0.7, "C": 0.4}}, "probs.A"),
        ({"frames": 0}, "frames"),
        ({"views": 0}, "views"),
        ({"views": 13}, "views"),  # more views than frames seen
        ({"last_ts": 1.0}, "last_ts"),  # before first_ts
        ({"first_ts": float("nan")}, "first_ts"),
        ({"source": None}, "source"),
        ({"schema_version": 3}, "schema_version"),
        ({"schema_version": True}, "schema_version"),
        ({"views": None}, "views"),  # required from version 2 on
    ],
)
def test_validation_names_the_field(bad, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        _event(**bad)


def test_from_json_rejects_missing_and_unknown_fields():
    d = _event().to_json()
    with pytest.raises(ConfigError, match="missing.*frames"):
        GradeEvent.from_json({k: v for k, v in d.items() if k != "frames"})
    with pytest.raises(ConfigError, match="unknown.*colour"):
        GradeEvent.from_json({**d, "colour": "red"})
    with pytest.raises(ConfigError, match="not valid JSON"):
        GradeEvent.from_json("{nope")


def test_version_1_events_without_views_still_read():
    d = _event().to_json()
    assert d["schema_version"] == 2
    del d["views"]
    with pytest.raises(ConfigError, match="missing.*views"):  # version 2 needs it
        GradeEvent.from_json(d)
    d["schema_version"] = 1
    e = GradeEvent.from_json(d)
    assert e.views is None and e.to_json() == d  # written back as it was read
    with pytest.raises(ConfigError, match="unknown.*views"):
        GradeEvent.from_json({**d, "views": 3})
