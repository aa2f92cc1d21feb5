"""The open-set gate: is a tracked object a fruit to grade, or something to reject?

The classifier only knows its fruit classes, so anything the localiser passes gets a grade, often a
confident one (a leaf, a glove, a film scene: issue 14 item 13). Two checks turn such objects into
`reject` events with a reason instead:

- `foreign:shape` / `foreign:colour` / `foreign:flat`: the localiser's fruit priors (localize.LocalizeConfig) failed on
  more than `prior_share` of the fruit's judged views (whole views; a box cut by the border is not
  judged). Voting over views keeps one odd mask (a fruit touching another, a highlight) from
  rejecting a fruit.
- `foreign:low_confidence`: the vote's top probability (max-softmax) is below `min_confidence`, a
  threshold calibrated on the dev split and kept in the bundle card (`open_set`, calibration/open_set.py).
  Off (0) unless the card carries one.

Which of these earns its place was measured on a synthetic belt with foreign objects and a seed the
thresholds were not tuned on: bench/foreign.py → bench/results/foreign.json.
numpy only, like all of mnet.runtime.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from mnet.runtime.localize import Box

from mnet.errors import ConfigError

__all__ = ["REASON_LOW_CONFIDENCE", "GateConfig", "OpenSetGate"]

REASON_LOW_CONFIDENCE = "foreign:low_confidence"
_MAX_OPEN = 10_000  # tracks observed but never decided (discarded noise) are forgotten beyond this


@dataclass(frozen=True)
class GateConfig:
    """Open-set gate options; `from_card` takes the calibrated threshold from a bundle card."""

    enabled: bool = True
    min_confidence: float = 0.0  # reject a vote whose top probability is below this (0: off)
    prior_share: float = 0.5  # reject when more than this share of the judged views fail a fruit prior

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_confidence < 1.0:
            raise ConfigError(f"gate field 'min_confidence' = {self.min_confidence!r}: expected 0 <= value < 1")
        if not 0.0 <= self.prior_share < 1.0:
            raise ConfigError(f"gate field 'prior_share' = {self.prior_share!r}: expected 0 <= value < 1")

    @classmethod
    def from_card(cls, card: Any, **overrides: Any) -> GateConfig:
        """The card's calibrated `open_set.min_confidence` (0 when the bundle has none), then `overrides`."""
        open_set = getattr(card, "open_set", None) or {}
        kw: dict[str, Any] = {}
        if isinstance(open_set.get("min_confidence"), (int, float)):
            kw["min_confidence"] = float(open_set["min_confidence"])
        return cls(**{**kw, **overrides})


class OpenSetGate:
    """Collects the fruit-prior verdicts of each track's views, then decides once per object.

    The grader calls `observe(uid, box)` for every view it classifies and `decide(uid, probs)` when it
    votes; decide returns the reject reason, or None for a fruit to grade.
    """

    def __init__(self, config: GateConfig = GateConfig()) -> None:
        self.config = config
        self._views: dict[int, Counter] = {}  # uid → {"judged": n, reason: n}

    def observe(self, uid: int, box: Box) -> None:
        if not self.config.enabled or box.touches_edge:
            return
        tally = self._views.get(uid)
        if tally is None:
            if len(self._views) >= _MAX_OPEN:
                self._views.pop(next(iter(self._views)))
            tally = self._views[uid] = Counter()
        tally["judged"] += 1
        if box.foreign:
            tally[box.foreign] += 1

    def decide(self, uid: int | None, probs: np.ndarray) -> str | None:
        tally = self._views.pop(uid, None) if uid is not None else None
        if not self.config.enabled:
            return None
        if tally:
            judged = tally.pop("judged", 0)
            if tally and judged:
                reason, n = tally.most_common(1)[0]
                if n > self.config.prior_share * judged:
                    return f"foreign:{reason}"
        if self.config.min_confidence > 0 and float(np.max(probs)) < self.config.min_confidence:
            return REASON_LOW_CONFIDENCE
        return None
