"""Console helpers for the CLI layer (the only place that prints)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mnet.errors import MnetError

__all__ = ["console", "err", "error", "progress_bar", "print_json", "metrics_table", "parse_hw",
           "InputSizeOpt", "LayersOpt", "WidthOpt", "StemStrideOpt", "KernelsOpt", "DilationsOpt", "space_options"]

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
        try:
            yield p
        except MnetError:
            p.live.transient = True  # a user error stays one line: no half-drawn bars above it (a refused --resume)
            raise


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


# The search-space options of `mnet search`, `mnet arch sample` and `mnet calibrate latency`: each replaces one
# part of --preset (None keeps the preset's), so crops need not be stretched to 24x32 (`mnet.arch.build_space`).
InputSizeOpt = Annotated[Optional[str], typer.Option(
    "--input-size", metavar="HxW", help="Network input, HEIGHTxWIDTH, e.g. 28x28 (default: the preset's); "
    "match your crops instead of stretching them.")]
LayersOpt = Annotated[Optional[int], typer.Option(help="Searched layers (default: the preset's).")]
WidthOpt = Annotated[Optional[int], typer.Option(help="Channels of every layer (default: the preset's).")]
StemStrideOpt = Annotated[Optional[int], typer.Option(help="Stem stride, 1 or 2 (default: the preset's).")]
KernelsOpt = Annotated[Optional[str], typer.Option(
    metavar="K,K,...", help="Depthwise kernel sizes to choose from, odd, e.g. 3,5,7 (default: the preset's "
    "3,7,...,39).")]
DilationsOpt = Annotated[Optional[str], typer.Option(
    metavar="D,D,...", help="Dilations to choose from, e.g. 1,2 (default: the preset's 1,2).")]


def space_options(input_size: Optional[str], layers: Optional[int], width: Optional[int],
                  stem_stride: Optional[int], kernels: Optional[str], dilations: Optional[str]) -> dict[str, Any]:
    """The space options as keywords of `mnet.arch.build_space` and `SearchConfig` (None where not given)."""
    # mnet.arch.parse_hw reads HEIGHTxWIDTH like arch.json's input_hw, unlike this module's camera-style parse_hw
    from mnet.arch import parse_hw as parse_input_hw
    from mnet.arch import parse_ints

    return {"input_hw": None if input_size is None else parse_input_hw(input_size, "--input-size"),
            "layers": layers, "width": width, "stem_stride": stem_stride,
            "kernels": None if kernels is None else parse_ints(kernels, "--kernels"),
            "dilations": None if dilations is None else parse_ints(dilations, "--dilations")}
