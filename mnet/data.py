"""Datasets: the AICUP csv layout (ours and the 2020 release as distributed) and ImageFolder.

Every image is decoded once, put through the shared `Preprocess.resize` (rotate portrait, resize to
the model resolution, RGB) and cached in memory as uint8, so an epoch costs no JPEG decoding.

Layouts, detected from the directory itself:
- ``aicup``:       <root>/<split>.csv (header ``image_id,label``) + images under <root>/<split>/
- ``aicup2020``:   train.csv / dev.csv beside C1-P1_Train/, C1-P1_Dev/ (the release as distributed);
                   a C1-P1_Test* folder without labels is the test split
- ``imagefolder``: <root>/<split>/<class>/*.jpg

Bad input: a corrupt or missing image is skipped, counted and listed (``strict`` makes it an error);
an unknown label is an error naming file:line; a csv path that is absolute or leaves the root is an
error; an empty split, or a train class without images, is an error.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

import cv2
import numpy as np

from mnet.errors import DataError
from mnet.preprocess import Preprocess

__all__ = ["SPLITS", "IMAGE_EXTS", "Sample", "Split", "Dataset", "open_dataset", "check_dataset", "CheckReport"]

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
AICUP_CLASSES = ("A", "B", "C")
_AICUP2020_DIRS = {"train": "C1-P1_Train", "dev": "C1-P1_Dev"}

Progress = Optional[Callable[[int, int], None]]


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # -1 when the split carries no labels
    where: str  # "file:line" or the path, for messages


@dataclass
class Split:
    """A split decoded into memory: uint8 RGB images at the model resolution."""

    name: str
    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    classes: tuple[str, ...]
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def class_counts(self) -> dict[str, int]:
        counts = Counter(int(v) for v in self.labels if v >= 0)
        return {c: counts.get(i, 0) for i, c in enumerate(self.classes)}


def _read_classes_file(root: Path) -> tuple[str, ...] | None:
    f = root / "classes.txt"
    if not f.is_file():
        return None
    names = tuple(x.strip() for x in f.read_text(encoding="utf-8").splitlines() if x.strip())
    if len(names) < 2 or len(set(names)) != len(names):
        raise DataError(f"{f}: expected at least two distinct class names, one per line")
    return names


def _safe_join(root: Path, rel: str, where: str) -> Path:
    """Join a csv image path to its folder, refusing absolute paths and escapes from the root."""
    p = PurePosixPath(rel.replace("\\", "/"))
    if not rel or p.is_absolute() or (len(rel) > 1 and rel[1] == ":") or ".." in p.parts:
        raise DataError(f"{where}: image path '{rel}' is absolute or leaves the dataset root; use a path "
                        "relative to the split folder")
    return root.joinpath(*p.parts)


class Dataset:
    """An image-classification dataset on disk; `load(split)` decodes and caches one split."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset directory not found: {self.root}")
        self.layout = self._detect()
        self.classes = self._classes()

    # --- layout -----------------------------------------------------------------------------
    def _detect(self) -> str:
        r = self.root
        if (r / "train.csv").is_file() and (r / _AICUP2020_DIRS["train"]).is_dir():
            return "aicup2020"
        if any((r / f"{s}.csv").is_file() for s in SPLITS):
            return "aicup"
        if (r / "train").is_dir() and any(p.is_dir() for p in (r / "train").iterdir()):
            return "imagefolder"
        raise DataError(
            f"{r}: not a dataset: expected <split>.csv files with <split>/ image folders (AICUP layout) or "
            "<split>/<class>/*.jpg (ImageFolder); `mnet data synth DIR` makes an example"
        )

    def _classes(self) -> tuple[str, ...]:
        named = _read_classes_file(self.root)
        if named:
            return named
        if self.layout == "imagefolder":
            return tuple(sorted(p.name for p in (self.root / "train").iterdir() if p.is_dir()))
        return AICUP_CLASSES

    def splits(self) -> list[str]:
        return [s for s in SPLITS if self._split_source(s) is not None]

    def _split_source(self, split: str) -> tuple[Path | None, Path] | None:
        """(csv or None, image folder) for a split, or None when the split is absent."""
        r = self.root
        if self.layout == "imagefolder":
            return (None, r / split) if (r / split).is_dir() else None
        if self.layout == "aicup2020":
            if split in _AICUP2020_DIRS:
                d = r / _AICUP2020_DIRS[split]
                return (r / f"{split}.csv", d) if (r / f"{split}.csv").is_file() and d.is_dir() else None
            tests = sorted(p for p in r.glob("C1-P1_Test*") if p.is_dir())
            return (None, tests[0]) if tests else None
        csv_path = r / f"{split}.csv"
        if csv_path.is_file():
            return csv_path, r / split
        return (None, r / split) if (r / split).is_dir() and split == "test" else None

    # --- indexing -----------------------------------------------------------------------------
    def index(self, split: str) -> list[Sample]:
        """List the split's images with labels, validating labels and paths (no decoding)."""
        src = self._split_source(split)
        if src is None:
            raise DataError(f"{self.root}: no '{split}' split (found: {', '.join(self.splits()) or 'none'})")
        csv_path, folder = src
        if csv_path is not None:
            samples = self._index_csv(csv_path, folder)
        elif self.layout == "imagefolder":
            samples = self._index_folders(folder)
        else:  # an unlabelled test folder
            samples = [Sample(p, -1, str(p)) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
        if not samples:
            raise DataError(f"{csv_path or folder}: split '{split}' is empty")
        return samples

    def _index_csv(self, csv_path: Path, folder: Path) -> list[Sample]:
        lookup = {c: i for i, c in enumerate(self.classes)}
        out = []
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None or [h.strip().lower() for h in header[:2]] != ["image_id", "label"]:
                raise DataError(f"{csv_path}:1: expected header 'image_id,label', got {header!r}")
            for line, row in enumerate(rows, start=2):
                if not row or not "".join(row).strip():
                    continue
                where = f"{csv_path}:{line}"
                if len(row) < 2:
                    raise DataError(f"{where}: expected 'image_id,label', got {row!r}")
                name, label = row[0].strip(), row[1].strip()
                if label not in lookup:
                    raise DataError(f"{where}: unknown label '{label}'; known: {', '.join(self.classes)} "
                                    "(add a classes.txt to the dataset root to change them)")
                out.append(Sample(_safe_join(folder, name, where), lookup[label], where))
        return out

    def _index_folders(self, folder: Path) -> list[Sample]:
        lookup = {c: i for i, c in enumerate(self.classes)}
        out = []
        for d in sorted(p for p in folder.iterdir() if p.is_dir()):
            if d.name not in lookup:
                raise DataError(f"{d}: unknown class folder '{d.name}'; train classes are {', '.join(self.classes)}")
            for p in sorted(d.iterdir()):
                if p.suffix.lower() in IMAGE_EXTS:
                    out.append(Sample(p, lookup[d.name], str(p)))
        return out

    # --- loading ------------------------------------------------------------------------------
    def load(self, split: str, preprocess: Preprocess, *, strict: bool = False, progress: Progress = None,
             workers: int | None = None) -> Split:
        samples = self.index(split)
        h, w = preprocess.input_hw
        images = np.zeros((len(samples), h, w, 3), np.uint8)
        ok = np.zeros(len(samples), bool)
        skipped: list[tuple[str, str]] = []

        def work(i: int) -> str | None:
            s = samples[i]
            if not s.path.is_file():
                return "missing file"
            img = cv2.imread(str(s.path), cv2.IMREAD_COLOR)
            if img is None or img.size == 0:
                return "unreadable or corrupt image"
            images[i] = preprocess.resize(img)
            ok[i] = True
            return None

        # cv2 releases the GIL while decoding, so threads give a real speed-up.
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            for done, (i, reason) in enumerate(zip(range(len(samples)), pool.map(work, range(len(samples)))), 1):
                if reason is not None:
                    skipped.append((samples[i].where, reason))
                if progress is not None:
                    progress(done, len(samples))
        if skipped:
            if strict:
                raise DataError(f"{len(skipped)} bad image(s) in split '{split}', first: {skipped[0][0]} "
                                f"({skipped[0][1]}); fix them or drop --strict to skip them")
            log.warning("split %s: skipped %d unreadable image(s)", split, len(skipped))
        keep = np.flatnonzero(ok)
        if not len(keep):
            raise DataError(f"{self.root}: no readable image in split '{split}'")
        out = Split(
            name=split,
            images=images[keep],
            labels=np.array([samples[i].label for i in keep], np.int64),
            classes=self.classes,
            paths=[str(samples[i].path) for i in keep],
            skipped=skipped,
        )
        if split == "train":
            empty = [c for c, n in out.class_counts().items() if n == 0]
            if empty:
                raise DataError(f"{self.root}: class(es) {', '.join(empty)} have no images in the train split")
        return out


def open_dataset(root: str | os.PathLike) -> Dataset:
    return Dataset(root)


@dataclass
class CheckReport:
    root: str
    layout: str
    classes: tuple[str, ...]
    splits: dict[str, dict]  # split -> {"counts": {...}, "n": int, "sizes": {...}}
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(root: str | os.PathLike, progress: Progress = None) -> CheckReport:
    """Index and decode every split; collect counts, image-size statistics and every problem."""
    ds = Dataset(root)
    problems: list[str] = []
    splits: dict[str, dict] = {}
    for split in SPLITS:
        try:
            samples = ds.index(split)
        except DataError as e:
            if split in ds.splits():
                problems.append(str(e))
            continue
        counts = Counter(s.label for s in samples)
        seen: dict[Path, str] = {}
        for s in samples:
            if s.path in seen:
                problems.append(f"{s.where}: duplicate of {seen[s.path]}")
            seen.setdefault(s.path, s.where)
        sizes = []

        def probe(s: Sample) -> tuple[Sample, tuple[int, int] | None]:
            img = cv2.imread(str(s.path), cv2.IMREAD_COLOR) if s.path.is_file() else None
            return s, None if img is None else img.shape[:2]

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for done, (s, hw) in enumerate(pool.map(probe, samples), 1):
                if hw is None:
                    problems.append(f"{s.where}: {'missing' if not s.path.is_file() else 'unreadable'} image {s.path}")
                else:
                    sizes.append(hw)
                if progress is not None:
                    progress(done, len(samples))
        labelled = all(s.label >= 0 for s in samples)
        if labelled:
            for i, c in enumerate(ds.classes):
                if counts.get(i, 0) == 0:
                    problems.append(f"split '{split}': class '{c}' has no images")
        hs = np.array([h for h, _ in sizes]) if sizes else np.zeros(0)
        ws = np.array([w for _, w in sizes]) if sizes else np.zeros(0)
        splits[split] = {
            "n": len(samples),
            "labelled": labelled,
            "counts": {c: counts.get(i, 0) for i, c in enumerate(ds.classes)} if labelled else {},
            "sizes": {
                "readable": len(sizes),
                "h": [int(hs.min()), int(np.median(hs)), int(hs.max())] if len(hs) else [],
                "w": [int(ws.min()), int(np.median(ws)), int(ws.max())] if len(ws) else [],
                "portrait": float((hs > ws).mean()) if len(hs) else 0.0,
            },
        }
    if "train" not in splits:
        problems.append(f"{ds.root}: no usable 'train' split")
    return CheckReport(str(ds.root), ds.layout, ds.classes, splits, problems)
