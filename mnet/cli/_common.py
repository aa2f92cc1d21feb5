"""Console helpers for the CLI layer (the only place that prints)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["console", "err", "error", "progress_bar", "print_json", "metrics_table", "parse_hw"]

# Under torchrun every rank runs the CLI: ranks other than 0 show no results or progress bars (errors
# still print, from whichever rank hits them).
_WORKER_RANK = os.environ.get("RANK", "0") not in ("", "0")
console = Console(quiet=_WORKER_RANK)
err = Console(stderr=True)


def error(msg: str) -> None:
    # One line, no markup interpretation of user paths.
    from rich.markup import escape

    err.print("[bold red]error:[/] " + escape(msg), soft_wrap=True, highlight=False)


@contextlib.contextmanager
def progress_bar(transient: bool = False) -> Iterator[Progress]:
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err, transient=transient,
                  disable=_WORKER_RANK) as p:
        yield p


def print_json(obj: Any) -> None:
    console.print_json(json.dumps(obj))


def metrics_table(metrics, title: str = "") -> Table:
    """Accuracy, per-class recall and the confusion matrix of a `mnet.metrics.Metrics`."""
    from rich.markup import escape

    t = Table(title=escape(title) if title else None)
    t.add_column("true \\ pred")
    for c in metrics.classes:
        t.add_column(c, justify="right")
    t.add_column("recall", justify="right")
    for i, c in enumerate(metrics.classes):
        t.add_row(c, *[str(v) for v in metrics.confusion[i]], f"{metrics.recall[c]:.3f}")
    return t


def parse_hw(text: str, what: str = "--input-size") -> tuple[int, int]:
    """'WxH' → (h, w)."""
    from mnet.errors import ConfigError

    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
        return h, w
    except ValueError:
        raise ConfigError(f"{what} '{text}': expected WIDTHxHEIGHT, e.g. 640x480") from None
