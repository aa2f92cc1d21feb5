"""The grade event contract: exact JSON fields, round trip, validation that names the bad field."""

from __future__ import annotations

import json

import pytest

from mnet.errors import ConfigError
from mnet.events import EVENT_FIELDS, EVENT_SCHEMA_VERSION, GradeEvent, check_run_id


def _event(**kw) -> GradeEvent:
    d = {"fruit_id": 3, "grade": "B", "confidence": 0.7, "probs": {"A": 0.2, "B": 0.7, "C": 0.1}, "frames": 12,
             "views": 3, "first_ts": 1.5, "last_ts": 1.9, "source": "belt.mp4", "model": "tiny@abc", "run_id": "r1"}
    d.update(kw)
    return GradeEvent(**d)


def test_json_fields_are_exactly_the_contract_and_round_trip():
    e = _event()
    d = e.to_json()
    assert set(d) == {"fruit_id", "grade", "confidence", "probs", "frames", "views", "first_ts", "last_ts",
                      "source", "model", "schema_version", "run_id", "event_id", "lane", "reason"}
    assert tuple(d) == EVENT_FIELDS == ("schema_version", "run_id", "event_id", "lane", "fruit_id", "grade",
                                        "reason", "confidence", "probs", "frames", "views", "first_ts", "last_ts",
                                        "source", "model")
    assert (d["schema_version"], d["run_id"], d["event_id"], d["reason"]) == (3, "r1", "r1:0:3", None)
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
        ({"schema_version": 4}, "schema_version"),
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
    for k in ("run_id", "event_id", "lane", "reason"):
        del d[k]
    d["schema_version"] = 2
    del d["views"]
    with pytest.raises(ConfigError, match="missing.*views"):  # version 2 needs it
        GradeEvent.from_json(d)
    d["schema_version"] = 1
    e = GradeEvent.from_json(d)
    assert e.views is None and e.to_json() == d  # written back as it was read
    with pytest.raises(ConfigError, match="unknown.*views"):
        GradeEvent.from_json({**d, "views": 3})


# ------------------------------------------------------------------------ version 3: run id, event id, reason
def test_event_id_is_derived_from_run_and_fruit_and_checked():
    e = _event(run_id="lot-7.line2", fruit_id=12)
    assert e.event_id == "lot-7.line2:0:12" and GradeEvent.from_json(e.to_line()).event_id == e.event_id
    with pytest.raises(ConfigError, match="'event_id'.*'lot-7.line2:0:12'"):
        _event(run_id="lot-7.line2", fruit_id=12, event_id="lot-7.line2:0:13")
    # fruit 12 of lane 1 is another fruit than fruit 12 of lane 0
    assert _event(run_id="r", fruit_id=12, lane=1).event_id == "r:1:12"
    for lane in (-1, True, 1.0):
        with pytest.raises(ConfigError, match="'lane'"):
            _event(lane=lane)
    for bad in (None, "", "has space", "x" * 129, "a/b", "a:b", 7):
        with pytest.raises(ConfigError, match="'run_id'"):
            _event(run_id=bad)
    assert check_run_id("9f" * 16) == "9f" * 16


def test_from_probs_gives_each_run_its_own_ids():
    kw = {"frames": 3, "views": 1, "first_ts": 0.0, "last_ts": 0.1, "source": "s", "model": "m"}
    probs = {"A": 0.1, "B": 0.25, "C": 0.65}
    a, b = GradeEvent.from_probs(1, probs, run_id="r", **kw), GradeEvent.from_probs(1, probs, run_id="s", **kw)
    assert (a.event_id, b.event_id) == ("r:0:1", "s:0:1")  # fruit 1 of two runs: two events, not a duplicate
    assert a.reason is None and a.schema_version == EVENT_SCHEMA_VERSION == 3
    # without a run id an event belongs to this process's default run: built twice, it is the same event
    c, d = GradeEvent.from_probs(1, probs, **kw), GradeEvent.from_probs(1, probs, **kw)
    assert c == d and len(c.run_id) == 32 and c.run_id not in ("r", "s") and c.event_id == f"{c.run_id}:0:1"


def test_a_reject_needs_a_reason_and_only_a_reject_has_one():
    kw = {"frames": 3, "views": 2, "first_ts": 0.0, "last_ts": 0.1, "source": "s", "model": "m", "run_id": "r"}
    e = GradeEvent.from_probs(4, {"A": 0.4, "B": 0.35, "C": 0.25}, reason="foreign:low_confidence", **kw)
    assert (e.grade, e.reason, e.confidence) == ("reject", "foreign:low_confidence", 0.4)
    assert GradeEvent.from_json(e.to_line()) == e and json.loads(e.to_line())["reason"] == "foreign:low_confidence"
    with pytest.raises(ConfigError, match="'reason' = None.*non-empty"):
        _event(grade="reject", confidence=0.7)
    with pytest.raises(ConfigError, match="'reason' = ''"):
        _event(grade="reject", confidence=0.7, reason="")
    with pytest.raises(ConfigError, match="'reason' = 'foreign:glove'.*null for a graded fruit"):
        _event(reason="foreign:glove")  # grade B is a class
    with pytest.raises(ConfigError, match="'grade' = 'D'.*or 'reject' with a reason"):
        _event(grade="D", reason="foreign:glove")
    with pytest.raises(ConfigError, match="'confidence'"):
        _event(grade="reject", reason="foreign:glove", confidence=1.5)
    # a version-2 event has no reject
    with pytest.raises(ConfigError, match="'reason'.*version-2"):
        _event(schema_version=2, run_id=None, grade="reject", reason="foreign:glove")


def test_version_2_events_still_read_and_are_written_back_as_read():
    d = {"schema_version": 2, "fruit_id": 3, "grade": "B", "confidence": 0.7, "probs": {"A": 0.2, "B": 0.7, "C": 0.1},
         "frames": 12, "views": 3, "first_ts": 1.5, "last_ts": 1.9, "source": "belt.mp4", "model": "tiny@abc"}
    e = GradeEvent.from_json(json.dumps(d))
    assert (e.run_id, e.event_id, e.lane, e.reason) == (None, None, None, None) and e.to_json() == d
    assert list(e.to_json()) == [k for k in EVENT_FIELDS if k not in ("run_id", "event_id", "lane", "reason")]
    with pytest.raises(ConfigError, match="unknown.*run_id"):
        GradeEvent.from_json({**d, "run_id": "r"})
    with pytest.raises(ConfigError, match="'run_id' = 'r'.*version-2"):
        GradeEvent(**{**d, "run_id": "r"})
    with pytest.raises(ConfigError, match=r"missing.*\['run_id', 'event_id', 'lane', 'reason'\]"):
        GradeEvent.from_json({**d, "schema_version": 3})


def test_csv_columns_follow_the_event_fields_and_a_version_2_csv_is_refused(tmp_path):
    import csv

    from mnet.runtime.sinks import CsvSink

    e = GradeEvent.from_probs(4, {"A": 0.4, "B": 0.35, "C": 0.25}, frames=3, views=2, first_ts=0.0, last_ts=0.1,
                              source="s", model="m", run_id="r", reason="foreign:glove")
    sink = CsvSink(tmp_path / "v3.csv")
    sink.write(e)
    sink.write(_event())
    sink.close()
    rows = list(csv.DictReader((tmp_path / "v3.csv").open()))
    assert list(rows[0]) == ["run_id", "event_id", "lane", "fruit_id", "grade", "reason", "confidence", "p_A", "p_B",
                             "p_C", "frames", "views", "first_ts", "last_ts", "source", "model"]
    assert [(r["event_id"], r["grade"], r["reason"]) for r in rows] == [("r:0:4", "reject", "foreign:glove"),
                                                                         ("r1:0:3", "B", "")]
    # appending version-3 rows to a file written with the version-2 columns: one line, before any row
    v2 = tmp_path / "v2.csv"
    v2.write_text("fruit_id,grade,confidence,p_A,p_B,p_C,frames,views,first_ts,last_ts,source,model\n"
                  "1,A,0.800000,0.800000,0.100000,0.100000,5,1,1.000000,1.500000,belt.mp4,tiny\n")
    before = v2.read_text()
    sink = CsvSink(v2)
    with pytest.raises(ConfigError, match=r"^CSV file .*v2.csv has columns \['fruit_id', .*\], these events need "
                                          r"\['run_id', 'event_id', .*; write to a new file$") as err:
        sink.write(_event())
    sink.close()
    assert "\n" not in str(err.value) and v2.read_text() == before
