"""The `mnet` command line: one Typer app, one module per command group, thin commands.

Commands import their heavy dependencies (torch, onnx) inside the function, so `mnet grade` starts on
a Jetson that has no torch. Any `MnetError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

import typer

from mnet.cli import _common
from mnet.errors import MnetError

__all__ = ["app", "main"]

app = typer.Typer(
    name="mnet",
    help="MNet: search, train, export and run small ConvNets for fruit grading.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log library messages (INFO).")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _register() -> None:
    from mnet.cli import arch, data, train  # noqa: F401  (each module adds its commands)

    for mod in (data, arch, train):
        mod.register(app)
    for name in ("search", "research", "export", "calibrate", "latency", "grade", "report", "demo"):
        try:
            mod = __import__(f"mnet.cli.{name}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"mnet.cli.{name}":
                raise
            continue
        mod.register(app)


_register()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: run the app, turning user errors into one line and exit 2 (no traceback)."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name="mnet")
    except MnetError as e:
        _common.error(str(e))
        return 2
    except SystemExit as e:  # typer/click exit normally through SystemExit
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
