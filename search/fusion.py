"""Fusion baselines (paper Table 3): linear SVMs on the penultimate features of trained networks.

- feature level: concatenate the (standardised) penultimate features of the networks, one linear SVM;
- decision level: one one-vs-rest linear SVM per network, their decision values summed.
Every combination of two or more runs is fitted on train, chosen on dev, and reported on test — the
paper reports only the best combination, and so does `best`.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from mnet.errors import ConfigError, DataError
from mnet.io import write_json

__all__ = ["extract_features", "fuse", "FusionResult"]

SPLITS = ("train", "dev", "test")


@torch.no_grad()
def extract_features(checkpoint: str | os.PathLike, data_root: str | os.PathLike, device: str = "cpu",
                     batch_size: int = 256) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (features, labels)} — the input of each network's classifier."""
    from mnet.data import Dataset
    from mnet.search.baselines import last_linear
    from mnet.search.batches import DeviceData
    from mnet.search.checkpoint import build_model, load_checkpoint
    from mnet.search.train import resolve_device

    ckpt = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    model = build_model(ckpt).to(dev)
    captured: list[torch.Tensor] = []
    _, _, fc = last_linear(model)
    hook = fc.register_forward_hook(lambda m, inp, out: captured.append(inp[0].float().cpu()))
    ds = Dataset(data_root)
    out = {}
    try:
        for split in SPLITS:
            data = ds.load(split, ckpt.preprocess)
            if not data.labelled:
                raise DataError(f"{data_root}: split '{split}' has no labels; fusion needs labelled train/dev/test")
            captured.clear()
            for x, _ in DeviceData(data, ckpt.preprocess, dev).batches(batch_size):
                model(x)
            out[split] = (torch.cat(captured).numpy(), data.labels.copy())
    finally:
        hook.remove()
    return out


@dataclass(frozen=True)
class FusionResult:
    mode: str
    runs: tuple[str, ...]
    combos: tuple[dict, ...]  # {"runs", "dev_acc", "test_acc"}
    best: dict
    seconds: float

    def to_json(self) -> dict:
        return {"kind": "fusion", "mode": self.mode, "runs": list(self.runs), "best": self.best,
                "combinations": list(self.combos), "seconds": self.seconds}


def _svm(seed: int):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    return make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=5000, random_state=seed))


def fuse(runs: list[str], data_root: str | os.PathLike, mode: str, out: str | os.PathLike, *,
         device: str = "cpu", seed: int = 0, progress: Optional[Callable[[int, int], None]] = None) -> FusionResult:
    if mode not in ("feature", "decision"):
        raise ConfigError(f"--mode {mode!r}: choose feature or decision")
    if len(runs) < 2:
        raise ConfigError("--runs: fusion needs at least two trained runs, comma-separated")
    t0 = time.time()
    feats = {}
    for r in runs:
        p = Path(r)
        feats[r] = extract_features(p / "best.pt" if p.is_dir() else p, data_root, device)
    labels = feats[runs[0]]
    y = {s: labels[s][1] for s in SPLITS}
    for r in runs[1:]:
        if any(not np.array_equal(feats[r][s][1], y[s]) for s in SPLITS):
            raise DataError(f"{r}: saw different images than {runs[0]} (skipped files differ); fix the dataset")

    per_net = {}
    if mode == "decision":  # one OvR SVM per network, fitted once and reused by every combination
        for r in runs:
            clf = _svm(seed).fit(feats[r]["train"][0], y["train"])
            per_net[r] = {s: clf.decision_function(feats[r][s][0]) for s in ("dev", "test")}

    combos = [c for k in range(2, len(runs) + 1) for c in itertools.combinations(runs, k)]
    results = []
    for i, combo in enumerate(combos, 1):
        if mode == "feature":
            x = {s: np.concatenate([feats[r][s][0] for r in combo], 1) for s in SPLITS}
            clf = _svm(seed).fit(x["train"], y["train"])
            pred = {s: clf.predict(x[s]) for s in ("dev", "test")}
        else:
            pred = {s: sum(per_net[r][s] for r in combo).argmax(1) for s in ("dev", "test")}
        results.append({"runs": list(combo), "dev_acc": float((pred["dev"] == y["dev"]).mean()),
                        "test_acc": float((pred["test"] == y["test"]).mean())})
        if progress:
            progress(i, len(combos))
    best = max(results, key=lambda r: (r["dev_acc"], -len(r["runs"])))
    result = FusionResult(mode, tuple(runs), tuple(results), best, time.time() - t0)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / "fusion.json", result.to_json())
    return result
