"""`mnet arch sample | show`."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mnet.cli._common import (DilationsOpt, InputSizeOpt, KernelsOpt, LayersOpt, StemStrideOpt, WidthOpt, console,
                              space_options)

arch_app = typer.Typer(help="Architectures: sample, show.", no_args_is_help=True)


def load_arch(path: Path):
    from mnet.arch import Arch
    from mnet.io import read_json

    return Arch.from_json(read_json(path, "arch.json"))


@arch_app.command("sample")
def sample(
    preset: Annotated[str, typer.Option(help="Search space: tiny, mnet-24-32, mnet-120-160 (the next six options "
                                             "replace parts of it).")] = "tiny",
    input_size: InputSizeOpt = None,
    layers: LayersOpt = None,
    width: WidthOpt = None,
    stem_stride: StemStrideOpt = None,
    kernels: KernelsOpt = None,
    dilations: DilationsOpt = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    num_classes: Annotated[Optional[int], typer.Option(help="Number of classes (default: 3, or those of --data).")]
    = None,
    data: Annotated[Optional[Path], typer.Option(help="Dataset directory: take the number of classes from its "
                                                      "train split, as `mnet train` will.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write arch.json here instead of printing it.")] = None,
) -> None:
    """Print a uniformly random valid arch.json of the search space."""
    from mnet.arch import build_space
    from mnet.data import open_dataset
    from mnet.errors import ConfigError
    from mnet.io import write_json

    if num_classes is not None and data is not None:
        raise ConfigError("--num-classes and --data exclude each other: pass one of them")
    if data is not None:
        num_classes = len(open_dataset(data).classes)  # the class list only: no image is read
    space = build_space(preset, **space_options(input_size, layers, width, stem_stride, kernels, dilations))
    arch = (space if num_classes is None else space.with_classes(num_classes)).sample(random.Random(seed))
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
