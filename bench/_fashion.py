"""Fashion-MNIST (70,000 real 28×28 product photos, 10 classes) as mnet `Split`s, for benches only.

The data come from Debian's package `dataset-fashion-mnist` (IDX files); `ensure()` installs it with
apt-get when it is missing and we are root, and otherwise says how. `make test` never needs it.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from mnet.data import Split

ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def ensure(root: Path = ROOT) -> Path:
    """The IDX folder; installs Debian's package when it is missing (root only)."""
    if all((root / f).is_file() for pair in _FILES.values() for f in pair):
        return root
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=False, env=env)
    if not all((root / f).is_file() for pair in _FILES.values() for f in pair):
        raise SystemExit(f"Fashion-MNIST not found under {root}: install it with "
                         "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu)")
    return root


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _split(name: str, images: np.ndarray, labels: np.ndarray) -> Split:
    rgb = np.repeat(images[..., None], 3, axis=3)  # the pipeline takes RGB: grey in all three channels
    return Split(name, np.ascontiguousarray(rgb), labels.astype(np.int64), CLASSES,
                 [f"{name}/{i}" for i in range(len(labels))])


def load(n_train: int, n_dev: int = 2000, seed: int = 0, root: Path = ROOT) -> dict[str, Split]:
    """train: `n_train` images of the official 60,000 (stratified, seeded); dev: `n_dev` others of the
    60,000; test: the official 10,000, whole."""
    root = ensure(root)
    x, y = _idx(root / _FILES["train"][0]), _idx(root / _FILES["train"][1])
    rng = np.random.default_rng(seed)
    train_idx, dev_idx = [], []
    for c in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(y == c))
        k_dev, k_train = round(n_dev / len(CLASSES)), round(n_train / len(CLASSES))
        dev_idx.append(idx[:k_dev])
        train_idx.append(idx[k_dev:k_dev + k_train])
    train_idx, dev_idx = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(dev_idx))
    xt, yt = _idx(root / _FILES["test"][0]), _idx(root / _FILES["test"][1])
    return {"train": _split("train", x[train_idx], y[train_idx]), "dev": _split("dev", x[dev_idx], y[dev_idx]),
            "test": _split("test", xt, yt)}
