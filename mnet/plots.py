"""PNG plots (matplotlib, imported lazily with the Agg backend; absent matplotlib → PlotError)."""

from __future__ import annotations

import os
from typing import Sequence

from mnet.errors import MnetError
from mnet.io import atomic_path
from mnet.metrics import Metrics

__all__ = ["PlotError", "plot_confusion", "plot_curves", "pyplot"]


class PlotError(MnetError):
    pass


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("matplotlib is not installed; `pip install matplotlib` to get plots") from None
    return plt


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def plot_confusion(metrics: Metrics, path: str | os.PathLike, title: str = "") -> None:
    plt = pyplot()
    cm = metrics.cm
    fig, ax = plt.subplots(figsize=(3.2 + 0.4 * len(cm), 2.8 + 0.4 * len(cm)))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(cm)), metrics.classes)
    ax.set_yticks(range(len(cm)), metrics.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {metrics.accuracy:.3f} (n={metrics.n})")
    _save(fig, path)


def plot_curves(path: str | os.PathLike, series: dict[str, tuple[Sequence[float], Sequence[float]]],
                xlabel: str, ylabel: str, title: str = "") -> None:
    """One line per named (x, y) series."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
