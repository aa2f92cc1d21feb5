"""Classification metrics shared by training, export checks and the runtime (numpy only).

The paper's "accuracy (weighted average recall)" is recall averaged with class-support weights,
which is exactly plain accuracy; we report it with per-class recall, macro-F1 and the confusion matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["Metrics", "compute_metrics", "confusion_matrix", "pareto_front"]


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """cm[true, pred] counts."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(preds, np.int64)), 1)
    return cm


@dataclass(frozen=True)
class Metrics:
    classes: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]

    @property
    def cm(self) -> np.ndarray:
        return np.asarray(self.confusion, np.int64)

    @property
    def n(self) -> int:
        return int(self.cm.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.cm) / max(1, self.n))

    @property
    def recall(self) -> dict[str, float]:
        cm = self.cm
        return {c: float(cm[i, i] / cm[i].sum()) if cm[i].sum() else 0.0 for i, c in enumerate(self.classes)}

    @property
    def weighted_recall(self) -> float:
        cm = self.cm
        support = cm.sum(1)
        rec = np.divide(np.diag(cm), support, out=np.zeros(len(cm)), where=support > 0)
        return float((rec * support).sum() / max(1, support.sum()))

    @property
    def macro_f1(self) -> float:
        cm = self.cm
        tp = np.diag(cm).astype(float)
        prec = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
        rec = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
        f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(tp), where=(prec + rec) > 0)
        return float(f1.mean())

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "weighted_recall": self.weighted_recall,
            "macro_f1": self.macro_f1,
            "recall": self.recall,
            "classes": list(self.classes),
            "confusion": [list(r) for r in self.confusion],
        }


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(cost, accuracy) points no cheaper point beats, cheapest first."""
    front: list[tuple[float, float]] = []
    for cost, acc in sorted(points):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


def compute_metrics(labels: np.ndarray, probs_or_preds: np.ndarray, classes: Sequence[str]) -> Metrics:
    """Metrics from labels and either predicted class ids (N,) or scores (N, C)."""
    p = np.asarray(probs_or_preds)
    preds = p.argmax(1) if p.ndim == 2 else p
    cm = confusion_matrix(labels, preds, len(classes))
    return Metrics(tuple(classes), tuple(tuple(int(v) for v in r) for r in cm))
