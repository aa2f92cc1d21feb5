"""`mnet calibrate latency` and `mnet calibrate check`: latency tables of a target device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mnet.cli._common import (DilationsOpt, InputSizeOpt, KernelsOpt, LayersOpt, StemStrideOpt, WidthOpt, console,
                              progress_bar, space_options)


def latency(
    out: Annotated[Path, typer.Option("--out", help="latency.json to write (an unfinished one is completed).")],
    preset: Annotated[str, typer.Option(help="Search space: tiny, mnet-24-32, mnet-120-160 (the next six options "
                                             "replace parts of it: pass those of your `mnet search`).")] = "tiny",
    input_size: InputSizeOpt = None,
    layers: LayersOpt = None,
    width: WidthOpt = None,
    stem_stride: StemStrideOpt = None,
    kernels: KernelsOpt = None,
    dilations: DilationsOpt = None,
    num_classes: Annotated[int, typer.Option(help="Classes of your data set (the head block's size).")] = 3,
    backend: Annotated[str, typer.Option(help="onnxruntime, torch or tensorrt (the runtime you will deploy on).")]
    = "onnxruntime",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8.")] = "fp32",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: the library's own).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size to time.")] = 1,
    fit_archs: Annotated[int, typer.Option(help="Whole networks measured to fit the correction.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the fit networks.")] = 0,
) -> None:
    """Measure every block the search space can contain on this machine (needs the space only, no model)."""
    from mnet.arch import build_space
    from mnet.calibration.latency import measure_table

    space = build_space(preset, **space_options(input_size, layers, width, stem_stride, kernels, dilations))
    space = space.with_classes(num_classes)

    with progress_bar() as p:
        task = p.add_task("blocks", total=None, info="")
        net = p.add_task("fit networks", total=fit_archs, info="")

        def progress(done: int, total: int, what: str) -> None:
            if what == "network":
                p.update(net, completed=done, total=total)
            else:
                p.update(task, completed=done, total=total, info=what)

        table = measure_table(space, out, backend=backend, device=device, precision=precision, threads=threads,
                              batch=batch, fit_archs=fit_archs, seed=seed, progress=progress)
    c = table.correction
    console.print(f"{len(table.entries)} blocks on {table.fingerprint}\n"
                  f"correction: {c.slope:.3f}·Σ {c.per_block_ms:+.4f} ms/block {c.intercept_ms:+.4f} ms "
                  f"(r²={c.r2 if c.r2 is None else round(c.r2, 4)}, {c.fit_archs} networks) → {out}")


def check(
    table: Annotated[Path, typer.Argument(help="latency.json to validate.")],
    archs: Annotated[int, typer.Option(help="Random networks to measure end to end.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the sampled networks.")] = 1,
    plot: Annotated[Optional[Path], typer.Option(help="Scatter plot PNG (default: TABLE.check.png).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON here.")] = None,
) -> None:
    """Predicted vs measured latency of random networks: Kendall τ, MAPE, max error, scatter plot."""
    from mnet.calibration.latency import check_table
    from mnet.io import write_json

    plot = plot or table.with_suffix(".check.png")
    with progress_bar() as p:
        task = p.add_task("networks", total=archs, info="")
        r = check_table(table, archs=archs, seed=seed, plot=plot,
                        progress=lambda d, t, w: p.update(task, completed=d, total=t))
    console.print(f"Kendall τ {r['kendall_tau']:.3f}   MAPE {r['mape']:.1%}   max error {r['max_abs_error_ms']:.3f} ms "
                  f"({r['max_rel_error']:.1%})   n={r['n']}   on {r['fingerprint']}")
    console.print(f"scatter plot → {plot}")
    if json_out:
        write_json(json_out, r)


def register(app: typer.Typer) -> None:
    from mnet.cli.calibrate import calibrate_app

    calibrate_app.command("latency")(latency)
    calibrate_app.command("check")(check)
