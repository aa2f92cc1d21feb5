"""The grade event: one JSON object per graded fruit (events.jsonl, CSV rows, MQTT payloads).

    {"schema_version": 3, "run_id": "9f1c2e…", "event_id": "9f1c2e…:0:7", "lane": 0,
     "fruit_id": 7, "grade": "A",
     "reason": null, "confidence": 0.91, "probs": {"A": 0.91, "B": 0.07, "C": 0.02}, "frames": 23,
     "views": 3, "first_ts": 12.40, "last_ts": 13.13, "source": "belt.mp4", "model": "mnet-24-32@3f2a…"}

`probs` is the per-fruit vote (class probabilities averaged over the `views` crops the model
classified, out of the `frames` the fruit was seen in) in the model's class order; `grade` is its
argmax and `confidence` its probability. A rejected object (foreign material, an unsure crop) has
grade "reject", a non-empty `reason` (e.g. "foreign:low_confidence") and `confidence` its top
probability; a graded fruit has reason null. Timestamps are seconds: media time for files and image
directories, Unix time for live sources.

`fruit_id` restarts at 1 in every grading run and counts per lane (camera), so `run_id` names the run
(one per `grade()` call), `lane` the camera (0 for a single source) and `event_id` =
"<run_id>:<lane>:<fruit_id>" names the event everywhere: a consumer that receives an event twice (MQTT
delivers at least once) keeps the first and drops the rest by `event_id` (DESIGN, grade event).

Versions: 3 added run_id, event_id, lane and reason; 2 added views. Older events still read (the newer
fields are None) and are written back as they were; new events are version 3. Plain stdlib, so
anything that consumes events (a PLC bridge, a dashboard) can import it without numpy or OpenCV.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mnet.errors import ConfigError

__all__ = ["EVENT_FIELDS", "EVENT_SCHEMA_VERSION", "REJECT", "GradeEvent", "check_run_id", "new_run_id"]

EVENT_SCHEMA_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
# The JSON field order written by to_json (and the CSV column order, probs expanded per class).
EVENT_FIELDS = ("schema_version", "run_id", "event_id", "lane", "fruit_id", "grade", "reason", "confidence",
                "probs", "frames", "views", "first_ts", "last_ts", "source", "model")
_V3_ONLY = ("run_id", "event_id", "lane", "reason")
_FIELDS_OF = {3: EVENT_FIELDS,
              2: tuple(k for k in EVENT_FIELDS if k not in _V3_ONLY),
              1: tuple(k for k in EVENT_FIELDS if k not in _V3_ONLY and k != "views")}
REJECT = "reject"  # the grade of an object that is not graded as fruit (`reason` says why)
# Safe in a file name, a CSV cell and an MQTT topic; long enough for a uuid or a lot number with a date.
# No ':' — it separates the parts of an event_id, which must parse back unambiguously.
_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Averaged softmax outputs sum to 1 up to float32 rounding; anything further off is not a distribution.
_PROB_SUM_TOL = 1e-3
_CONF_TOL = 1e-6
_PROCESS_RUN_ID = None  # the run of events built without one (from_probs), made on first use


def new_run_id() -> str:
    """A fresh run id: 32 hex digits, unique without coordination between devices."""
    return uuid.uuid4().hex


def _process_run_id() -> str:
    global _PROCESS_RUN_ID
    if _PROCESS_RUN_ID is None:
        _PROCESS_RUN_ID = new_run_id()
    return _PROCESS_RUN_ID


def check_run_id(value: Any, name: str = "run_id") -> str:
    """`value` if it is a usable run id, else ConfigError naming `name`."""
    if not isinstance(value, str) or not _RUN_ID.fullmatch(value):
        raise _bad(name, value, "1-128 characters of A-Z a-z 0-9 . _ - (e.g. a uuid4 hex)")
    return value


def _bad(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"grade event field '{name}' = {value!r}: expected {expected}")


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, value, "a finite number")
    return float(value)


@dataclass(frozen=True)
class GradeEvent:
    """One graded fruit; validated on construction so a bad event never reaches a sink.

    A version-3 event built without `event_id` gets "<run_id>:<lane>:<fruit_id>".
    """

    fruit_id: int
    grade: str
    confidence: float
    probs: Mapping[str, float] = field(hash=False)
    frames: int
    first_ts: float
    last_ts: float
    source: str
    model: str
    views: int | None = None  # classified crops in the vote; None only in version-1 events
    run_id: str | None = None  # None only in version-1 and -2 events, as are event_id, lane and reason
    event_id: str | None = None
    lane: int | None = None  # the camera of a multi-source run; a version-3 event without one is lane 0
    reason: str | None = None  # why a "reject" is one; None for a graded fruit
    schema_version: int = EVENT_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version not in _READABLE_VERSIONS or isinstance(self.schema_version, bool):
            raise _bad("schema_version", self.schema_version, f"one of {list(_READABLE_VERSIONS)}")
        if isinstance(self.fruit_id, bool) or not isinstance(self.fruit_id, int) or self.fruit_id < 0:
            raise _bad("fruit_id", self.fruit_id, "an integer >= 0")
        self._check_ids()
        if not isinstance(self.probs, Mapping) or not self.probs:
            raise _bad("probs", self.probs, "a non-empty object of class -> probability")
        probs = {}
        for k, v in self.probs.items():
            if not isinstance(k, str) or not k:
                raise _bad("probs", self.probs, "class names as non-empty strings")
            p = _finite(f"probs.{k}", v)
            if not 0.0 <= p <= 1.0 + _CONF_TOL:
                raise _bad(f"probs.{k}", v, "a probability in [0, 1]")
            probs[k] = p
        if abs(sum(probs.values()) - 1.0) > _PROB_SUM_TOL:
            raise _bad("probs", self.probs, f"probabilities summing to 1 (sum is {sum(probs.values()):.6f})")
        # A private copy: the event is frozen, so nobody may mutate the caller's dict under it.
        object.__setattr__(self, "probs", probs)
        conf = _finite("confidence", self.confidence)
        if self._check_grade(probs):
            if abs(conf - probs[self.grade]) > _CONF_TOL:
                raise _bad("confidence", self.confidence, f"probs[{self.grade!r}] = {probs[self.grade]}")
        elif not 0.0 <= conf <= 1.0 + _CONF_TOL:
            raise _bad("confidence", self.confidence, "a probability in [0, 1]")
        object.__setattr__(self, "confidence", conf)
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise _bad("frames", self.frames, "an integer >= 1")
        if self.schema_version == 1:
            if self.views is not None:
                raise _bad("views", self.views, "no value in a version-1 event (the field came with version 2)")
        elif isinstance(self.views, bool) or not isinstance(self.views, int) or not 1 <= self.views <= self.frames:
            raise _bad("views", self.views, f"an integer in 1..frames ({self.frames})")
        first, last = _finite("first_ts", self.first_ts), _finite("last_ts", self.last_ts)
        if last < first:
            raise _bad("last_ts", self.last_ts, f"a time >= first_ts ({first})")
        object.__setattr__(self, "first_ts", first)
        object.__setattr__(self, "last_ts", last)
        for name in ("source", "model"):
            if not isinstance(getattr(self, name), str):
                raise _bad(name, getattr(self, name), "a string")

    def _check_ids(self) -> None:
        if self.schema_version < 3:
            for name in _V3_ONLY:
                if getattr(self, name) is not None:
                    raise _bad(name, getattr(self, name),
                               f"no value in a version-{self.schema_version} event (the field came with version 3)")
            return
        check_run_id(self.run_id)
        if self.lane is None:
            object.__setattr__(self, "lane", 0)
        if isinstance(self.lane, bool) or not isinstance(self.lane, int) or self.lane < 0:
            raise _bad("lane", self.lane, "an integer >= 0")
        expected = f"{self.run_id}:{self.lane}:{self.fruit_id}"
        if self.event_id is None:
            object.__setattr__(self, "event_id", expected)
        elif self.event_id != expected:
            # Derived, never chosen: two writers of one fruit must produce the id a consumer dedupes on.
            raise _bad("event_id", self.event_id, f"'<run_id>:<lane>:<fruit_id>' = {expected!r}")

    def _check_grade(self, probs: dict[str, float]) -> bool:
        """True for a graded fruit (grade is a class), False for a reject; ConfigError otherwise."""
        if isinstance(self.grade, str) and self.grade in probs:
            if self.reason is not None:
                raise _bad("reason", self.reason, f"null for a graded fruit (grade {self.grade!r} is a class)")
            return True
        if self.grade == REJECT and self.schema_version >= 3:
            if not isinstance(self.reason, str) or not self.reason:
                raise _bad("reason", self.reason, f"a non-empty string saying why the grade is {REJECT!r}")
            return False
        raise _bad("grade", self.grade, f"one of the classes in probs {list(probs)}"
                   + (f", or {REJECT!r} with a reason" if self.schema_version >= 3 else ""))

    @classmethod
    def from_probs(cls, fruit_id: int, probs: Mapping[str, float], *, frames: int, first_ts: float,
                   last_ts: float, source: str, model: str, views: int, run_id: str | None = None,
                   reason: str | None = None, lane: int = 0) -> GradeEvent:
        """Build an event from a class -> probability vote; grade and confidence are its argmax.

        reason: make it a reject (grade "reject", confidence the top probability) for this reason.
        run_id: the grading run's (None: this process's default run, one id for all such events).
        """
        # 6 digits keep lines short; the rounding error (< 1e-5 summed) is far inside the sum check.
        probs = {str(k): round(float(v), 6) for k, v in probs.items()}
        top = max(probs, key=probs.__getitem__)
        return cls(fruit_id=int(fruit_id), grade=top if reason is None else REJECT, confidence=probs[top],
                   probs=probs, frames=int(frames), views=int(views), first_ts=float(first_ts),
                   last_ts=float(last_ts), source=str(source), model=str(model),
                   run_id=_process_run_id() if run_id is None else run_id, reason=reason, lane=lane)

    def to_json(self) -> dict[str, Any]:
        # A version-1 or -2 event read back is written back as it was.
        return {k: dict(self.probs) if k == "probs" else getattr(self, k) for k in _FIELDS_OF[self.schema_version]}

    def to_line(self) -> str:
        """One compact JSON line without the newline (JSONL, MQTT payload, stdout)."""
        return json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, d: Any) -> GradeEvent:
        if isinstance(d, (str, bytes)):
            try:
                d = json.loads(d)
            except json.JSONDecodeError as e:
                raise ConfigError(f"grade event: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"grade event must be a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        fields = _FIELDS_OF.get(version, EVENT_FIELDS) if isinstance(version, int) else EVENT_FIELDS
        missing = [k for k in fields if k not in d and k != "schema_version"]
        if missing:
            raise ConfigError(f"grade event is missing field(s) {missing}")
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"grade event has unknown field(s) {unknown}; expected {list(fields)}")
        return cls(**{k: d[k] for k in fields if k in d})
