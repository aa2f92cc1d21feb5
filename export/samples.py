"""Small reproducible image samples for export checks (parity) and INT8 calibration.

Both need a few hundred images from the training split, put through exactly the preprocessing the
model was trained with. `Dataset.load` decodes a whole split; this decodes only the sampled files,
so checking an export against a 50 000-image dataset costs the same as against a small one.
"""

from __future__ import annotations

import logging
import os

import cv2
import numpy as np

from mnet.data import Dataset
from mnet.errors import DataError
from mnet.preprocess import Preprocess

__all__ = ["sample_split", "synthetic_images"]

log = logging.getLogger(__name__)


def sample_split(data_root: str | os.PathLike, split: str, preprocess: Preprocess, n: int,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to `n` images of a split, chosen at random with `seed`: (uint8 RGB NHWC at the model size, labels).

    Unreadable images are skipped (and logged); fewer than `n` readable images means all of them.
    """
    samples = Dataset(data_root).index(split)
    order = np.random.default_rng(seed).permutation(len(samples))
    images, labels, bad = [], [], 0
    for i in order:
        if len(images) == n:
            break
        s = samples[int(i)]
        img = cv2.imread(str(s.path), cv2.IMREAD_COLOR) if s.path.is_file() else None
        if img is None or img.size == 0:
            bad += 1
            continue
        images.append(preprocess.resize(img))
        labels.append(s.label)
    if bad:
        log.warning("%s/%s: skipped %d unreadable image(s) while sampling", data_root, split, bad)
    if not images:
        raise DataError(f"{data_root}: no readable image in split '{split}'")
    return np.stack(images), np.asarray(labels, np.int64)


def synthetic_images(preprocess: Preprocess, n: int, seed: int = 0) -> np.ndarray:
    """`n` random uint8 RGB images at the model size, for checks when no dataset is given."""
    h, w = preprocess.input_hw
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
