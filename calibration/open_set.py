"""Calibrate the runtime's open-set gate on the dev split and keep it in the bundle card.

The score is the max-softmax probability (MSP) of each dev image through the bundle (ONNX Runtime,
the card's preprocessing); the threshold is its `fruit_reject` quantile, so about that share of dev
fruit would be rejected as `foreign:low_confidence`. The card's `open_set` records the threshold and
how it was obtained; runtime/gate.py reads `min_confidence` from it.

Whether the threshold is worth using is a measurement, not an assumption: bench/foreign.py grades a
belt with foreign objects with and without it (bench/results/foreign.json). On that bench MSP
separates fruit from foreign objects poorly, so `adopt=False` (the default) records the threshold
under `msp_threshold` without turning it on; `adopt=True` sets `min_confidence` as well.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mnet.bundle import Bundle, load_bundle, update_card, utc_now
from mnet.data import Dataset
from mnet.errors import ConfigError, DataError
from mnet.runtime.backends import open_backend
from mnet.runtime.evaluate import predict_images

__all__ = ["calibrate_open_set", "msp_scores"]


def msp_scores(bundle: Bundle | str | os.PathLike, data_root: str | os.PathLike, split: str = "dev",
               backend: str = "onnxruntime") -> np.ndarray:
    """Max-softmax probability of every image of DATA's `split` through the bundle (N,)."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    data = Dataset(data_root).load(split, b.card.preprocess)
    if len(data.images) == 0:
        raise DataError(f"{data_root}: split '{split}' has no images to calibrate the open-set gate on")
    with open_backend(b, backend, "fp32") as be:
        probs = predict_images(be, data.images, b.card.preprocess)
    return probs.max(axis=1)


def calibrate_open_set(bundle: Bundle | str | os.PathLike, data_root: str | os.PathLike, *, split: str = "dev",
                       fruit_reject: float = 0.02, adopt: bool = False, write: bool = True,
                       backend: str = "onnxruntime") -> dict[str, Any]:
    """The card's `open_set` record for a max-softmax threshold rejecting `fruit_reject` of `split`."""
    if not 0.0 < fruit_reject < 0.5:
        raise ConfigError(f"fruit_reject = {fruit_reject!r}: expected a share of dev fruit in (0, 0.5), e.g. 0.02")
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    msp = msp_scores(b, data_root, split, backend)
    threshold = float(np.quantile(msp, fruit_reject))
    record: dict[str, Any] = {
        "score": "max_softmax",
        "msp_threshold": round(threshold, 6),
        "fruit_reject": fruit_reject,
        "split": split,
        "n": int(msp.size),
        "msp_quantiles": {q: round(float(np.quantile(msp, float(q))), 4) for q in ("0.01", "0.05", "0.5")},
        "adopted": bool(adopt),
        "bench": "bench/results/foreign.json",
        "created": utc_now(),
    }
    if adopt:
        record["min_confidence"] = record["msp_threshold"]
    if write:
        update_card(b.path, open_set=record)
    return record
