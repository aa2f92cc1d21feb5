"""`mnet arch sample | show`."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mnet.cli._common import console

arch_app = typer.Typer(help="Architectures: sample, show.", no_args_is_help=True)


def load_arch(path: Path):
    from mnet.arch import Arch
    from mnet.io import read_json

    return Arch.from_json(read_json(path, "arch.json"))


@arch_app.command("sample")
def sample(
    preset: Annotated[str, typer.Option(help="Search space: tiny, mnet-24-32, mnet-120-160.")] = "tiny",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    num_classes: Annotated[int, typer.Option(help="Number of classes.")] = 3,
    out: Annotated[Optional[Path], typer.Option(help="Write arch.json here instead of printing it.")] = None,
) -> None:
    """Print a uniformly random valid arch.json of the preset."""
    from mnet.arch import get_preset
    from mnet.io import write_json

    arch = get_preset(preset).with_classes(num_classes).sample(random.Random(seed))
    if out is not None:
        write_json(out, arch.to_json())
    else:
        typer.echo(json.dumps(arch.to_json(), indent=2))


@arch_app.command("show")
def show(arch_json: Annotated[Path, typer.Argument(help="arch.json to describe.")]) -> None:
    """Table of layers (kernel, dilation, skip, params, MACs) with totals."""
    arch = load_arch(arch_json)
    c = arch.width
    t = Table(title=f"{arch_json}  input {arch.input_hw[0]}x{arch.input_hw[1]}, width {c}, "
                    f"reductions after {list(arch.reductions)}")
    for col in ("layer", "kernel", "dilation", "cropped", "skip", "feature", "params", "MACs"):
        t.add_column(col, justify="right")
    h, w = arch.node_hw(0)
    t.add_row("stem", "3", "1", "3x3", "-", f"{h}x{w}", f"{29 * c:,}", f"{h * w * c * 27:,}")
    for i, layer in enumerate(arch.layers, start=1):
        kh, kw = arch.layer_kernel_hw(i)
        h, w = arch.node_hw(i)
        t.add_row(str(i), str(layer.kernel), str(layer.dilation), f"{kh}x{kw}",
                  "-" if layer.skip is None else str(layer.skip), f"{h}x{w}",
                  f"{c * kh * kw + c * c + 4 * c:,}", f"{h * w * c * (kh * kw + c):,}")
    n = arch.num_classes
    t.add_row("head", "", "", "", "", "1x1", f"{c * n + n:,}", f"{c * n:,}")
    t.add_row("total", "", "", "", "", "", f"{arch.num_params():,}", f"{arch.macs():,}", style="bold")
    console.print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(arch_app, name="arch")
