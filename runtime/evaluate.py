"""Accuracy of a bundle on a dataset split, through any backend (numpy + OpenCV; no torch).

Images go through the card's preprocessing (`Preprocess.resize` when the split is decoded,
`Preprocess.normalize` per batch), exactly as in training and in the grading loop, so the number
printed by `mnet evaluate BUNDLE DATA` is the number the deployed model earns.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import numpy as np

from mnet.bundle import Bundle, load_bundle
from mnet.data import Dataset, Split
from mnet.errors import DataError
from mnet.metrics import Metrics, compute_metrics
from mnet.preprocess import Preprocess
from mnet.runtime.backends import Backend, open_backend

__all__ = ["card_accuracy", "evaluate_bundle", "evaluate_split", "labelled_splits", "predict_images"]

log = logging.getLogger(__name__)

Progress = Optional[Callable[[int, int], None]]


def labelled_splits(data_root: str | os.PathLike, b: Bundle, eval_split: str,
                    warnings: list[str]) -> dict[str, Split]:
    """What a precision's accuracy is measured on (`mnet calibrate int8`, `mnet export fp16`): `eval_split`,
    which must be labelled with the model's classes (else DataError), and a labelled test split when there
    is one. That one is an extra figure: a test split that cannot be read (an empty or broken list) is
    reported in `warnings`, not fatal, and an unlabelled one (a release test set) is simply not scored."""
    pre, dataset = b.card.preprocess, Dataset(data_root)
    ev = dataset.load(eval_split, pre)
    if not ev.labelled or tuple(ev.classes) != tuple(b.card.classes):
        raise DataError(f"{data_root}: split '{eval_split}' must be labelled with the model's classes "
                        f"{list(b.card.classes)}")
    splits = {eval_split: ev}
    if eval_split != "test" and "test" in dataset.splits():
        try:
            test = dataset.load("test", pre)
        except DataError as e:
            warnings.append(f"test split not measured: {e}")
            log.warning(warnings[-1])
        else:
            if test.labelled and tuple(test.classes) == tuple(b.card.classes):
                splits["test"] = test
    return splits


def predict_images(backend: Backend, images_rgb: np.ndarray, preprocess: Preprocess, batch_size: int = 64,
                   progress: Progress = None) -> np.ndarray:
    """Probabilities (N, C) for uint8 RGB images already at the model size (a `Split`'s images)."""
    if batch_size < 1:
        raise DataError(f"batch size {batch_size}: expected >= 1")
    out = []
    for i in range(0, len(images_rgb), batch_size):
        out.append(backend.infer(preprocess.normalize(images_rgb[i:i + batch_size])))
        if progress is not None:
            progress(min(i + batch_size, len(images_rgb)), len(images_rgb))
    return np.concatenate(out) if out else np.zeros((0, backend.num_classes), np.float32)


def evaluate_split(backend: Backend, split: Split, preprocess: Preprocess, classes: tuple[str, ...],
                   batch_size: int = 64, progress: Progress = None) -> Metrics:
    """Metrics of `backend` on a decoded split whose classes must be the model's."""
    if not split.labelled:
        raise DataError(f"split '{split.name}' has no labels; evaluate on train or dev")
    if tuple(split.classes) != tuple(classes):
        raise DataError(f"split '{split.name}' has classes {list(split.classes)}, the model {list(classes)}")
    probs = predict_images(backend, split.images, preprocess, batch_size, progress)
    return compute_metrics(split.labels, probs, classes)


def evaluate_bundle(bundle: Bundle | str | os.PathLike, data_root: str | os.PathLike, split: str = "test",
                    backend: str = "onnxruntime", precision: str = "fp32", batch_size: int = 64, *,
                    providers="auto", progress: Progress = None) -> Metrics:
    """Accuracy, per-class recall, macro-F1 and confusion matrix of a bundle on DATA's `split`."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    pre = b.card.preprocess
    data = Dataset(data_root).load(split, pre)
    with open_backend(b, backend, precision, providers=providers) as be:
        return evaluate_split(be, data, pre, b.card.classes, batch_size, progress)


def card_accuracy(bundle: Bundle | str | os.PathLike, split: str, precision: str) -> float | None:
    """The accuracy the bundle's card recorded on `split` at `precision` (fp32, fp16 or int8), or None.

    `mnet calibrate int8` and `mnet export fp16 BUNDLE DATA` measure fp32 and their precision with
    onnxruntime CPU on their split and on a labelled test split (`metrics.<precision>.by_split`); cards
    written before `by_split` hold the one split. fp32 comes from either record (the int8 one first).
    """
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    key = "fp32_accuracy" if precision == "fp32" else "accuracy"
    for name in ("int8", "fp16") if precision == "fp32" else (precision,):
        record = b.card.metrics.get(name)
        if not isinstance(record, dict):
            continue
        row = (record.get("by_split") or {}).get(split)
        if row is None and record.get("split") == split:
            row = record
        if row is not None and row.get(key) is not None:
            return float(row[key])
    return None
