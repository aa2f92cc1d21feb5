"""The grade event: one JSON object per graded fruit (events.jsonl, CSV rows, MQTT payloads).

    {"schema_version": 2, "fruit_id": 7, "grade": "A", "confidence": 0.91,
     "probs": {"A": 0.91, "B": 0.07, "C": 0.02}, "frames": 23, "views": 3,
     "first_ts": 12.40, "last_ts": 13.13, "source": "belt.mp4", "model": "mnet-24-32@3f2a…"}

`probs` is the per-fruit vote (class probabilities averaged over the `views` crops the model
classified, out of the `frames` the fruit was seen in) in the model's class order; `grade` is its argmax and `confidence` its probability. Timestamps are
seconds: media time for files and image directories, Unix time for live sources. Plain stdlib, so
anything that consumes events (a PLC bridge, a dashboard) can import it without numpy or OpenCV.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mnet.errors import ConfigError

__all__ = ["EVENT_FIELDS", "EVENT_SCHEMA_VERSION", "GradeEvent"]

EVENT_SCHEMA_VERSION = 2  # 2 added `views`; version-1 events (without it) still read
_READABLE_VERSIONS = (1, 2)
# The JSON field order written by to_json (and the CSV column order, probs expanded per class).
EVENT_FIELDS = ("schema_version", "fruit_id", "grade", "confidence", "probs", "frames", "views",
                "first_ts", "last_ts", "source", "model")
_V1_FIELDS = tuple(k for k in EVENT_FIELDS if k != "views")
# Averaged softmax outputs sum to 1 up to float32 rounding; anything further off is not a distribution.
_PROB_SUM_TOL = 1e-3
_CONF_TOL = 1e-6


def _bad(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"grade event field '{name}' = {value!r}: expected {expected}")


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, value, "a finite number")
    return float(value)


@dataclass(frozen=True)
class GradeEvent:
    """One graded fruit; validated on construction so a bad event never reaches a sink."""

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
    schema_version: int = EVENT_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version not in _READABLE_VERSIONS or isinstance(self.schema_version, bool):
            raise _bad("schema_version", self.schema_version, f"one of {list(_READABLE_VERSIONS)}")
        if isinstance(self.fruit_id, bool) or not isinstance(self.fruit_id, int) or self.fruit_id < 0:
            raise _bad("fruit_id", self.fruit_id, "an integer >= 0")
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
        if not isinstance(self.grade, str) or self.grade not in probs:
            raise _bad("grade", self.grade, f"one of the classes in probs {list(probs)}")
        conf = _finite("confidence", self.confidence)
        if abs(conf - probs[self.grade]) > _CONF_TOL:
            raise _bad("confidence", self.confidence, f"probs[{self.grade!r}] = {probs[self.grade]}")
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

    @classmethod
    def from_probs(cls, fruit_id: int, probs: Mapping[str, float], *, frames: int, first_ts: float,
                   last_ts: float, source: str, model: str, views: int) -> GradeEvent:
        """Build an event from a class -> probability vote; grade and confidence are its argmax."""
        # 6 digits keep lines short; the rounding error (< 1e-5 summed) is far inside the sum check.
        probs = {str(k): round(float(v), 6) for k, v in probs.items()}
        grade = max(probs, key=probs.__getitem__)
        return cls(fruit_id=int(fruit_id), grade=grade, confidence=probs[grade], probs=probs,
                   frames=int(frames), views=int(views), first_ts=float(first_ts),
                   last_ts=float(last_ts), source=str(source), model=str(model))

    def to_json(self) -> dict[str, Any]:
        d = {
            "schema_version": self.schema_version,
            "fruit_id": self.fruit_id,
            "grade": self.grade,
            "confidence": self.confidence,
            "probs": dict(self.probs),
            "frames": self.frames,
            "views": self.views,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "source": self.source,
            "model": self.model,
        }
        if self.schema_version == 1:  # a version-1 event read back is written back as it was
            del d["views"]
        return d

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
        fields = _V1_FIELDS if d.get("schema_version") == 1 else EVENT_FIELDS
        missing = [k for k in fields if k not in d and k != "schema_version"]
        if missing:
            raise ConfigError(f"grade event is missing field(s) {missing}")
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"grade event has unknown field(s) {unknown}; expected {list(fields)}")
        return cls(**{k: d[k] for k in fields if k in d})
