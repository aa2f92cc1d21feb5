"""`mnet data synth | check | conveyor`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mnet.cli._common import console, err, progress_bar

data_app = typer.Typer(help="Datasets: synthesise, check.", no_args_is_help=True)


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="New or empty directory to write the AICUP layout into.")],
    n_train: Annotated[int, typer.Option(help="Training images.")] = 5600,
    n_dev: Annotated[int, typer.Option(help="Development images.")] = 800,
    n_test: Annotated[int, typer.Option(help="Test images.")] = 1600,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    label_noise: Annotated[float, typer.Option(help="Fraction of labels flipped, like grader disagreement.")] = 0.05,
) -> None:
    """Write the synthetic mango set (phone-like JPEGs, grades A/B/C) in the AICUP csv layout."""
    from mnet.synth import synthesize

    with progress_bar() as p:
        task = p.add_task("synth", total=n_train + n_dev + n_test, info="")
        summary = synthesize(out, n_train=n_train, n_dev=n_dev, n_test=n_test, seed=seed, label_noise=label_noise,
                             progress=lambda done, total: p.update(task, completed=done, total=total))
    counts = "; ".join(f"{split} " + "/".join(f"{c}:{n}" for c, n in per.items())
                       for split, per in summary["counts"].items())
    console.print(f"wrote {summary['images']} images to {out} in {summary['seconds']:.1f}s "
                  f"({summary['images_per_s']:.0f} images/s); {counts}", highlight=False)


@data_app.command("check")
def check(data: Annotated[Path, typer.Argument(help="Dataset directory.")]) -> None:
    """Per-split class counts, image sizes, and every problem found (exit 2 if any)."""
    from mnet.data import check_dataset

    with progress_bar(transient=True) as p:
        task = p.add_task("check", total=None, info="")
        report = check_dataset(data, progress=lambda d, t: p.update(task, completed=d, total=t))
    t = Table(title=f"{report.root} ({report.layout})")
    t.add_column("split")
    for c in report.classes:
        t.add_column(c, justify="right")
    t.add_column("images", justify="right")
    t.add_column("h min/med/max")
    t.add_column("w min/med/max")
    t.add_column("portrait", justify="right")
    for name, s in report.splits.items():
        counts = [str(s["counts"].get(c, 0)) if s["labelled"] else "-" for c in report.classes]
        sz = s["sizes"]
        t.add_row(name, *counts, str(s["n"]), "/".join(map(str, sz["h"])), "/".join(map(str, sz["w"])),
                  f"{sz['portrait']:.0%}")
    console.print(t)
    if report.problems:
        for prob in report.problems:
            err.print(f"[red]problem:[/] {prob}", highlight=False, markup=True)
        err.print(f"{len(report.problems)} problem(s)")
        raise typer.Exit(2)
    console.print("no problems found")


@data_app.command("conveyor")
def conveyor(
    out: Annotated[Path, typer.Argument(help="Video to write (.mp4 with mp4v, .avi with MJPG).")],
    fruits: Annotated[int, typer.Option(help="Number of mangoes crossing the belt.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    fps: Annotated[int, typer.Option(help="Frames per second.")] = 30,
    size: Annotated[str, typer.Option(help="Frame size WxH.")] = "640x480",
    speed: Annotated[float, typer.Option(help="Belt speed in pixels per frame (default: chosen from size).")] = 0.0,
    codec: Annotated[str, typer.Option(help="FourCC: mp4v or MJPG.")] = "",
    foreign: Annotated[int, typer.Option(help="Foreign objects (leaves, gloves, stones, packaging) between the "
                                         "fruit; truth grade 'foreign'.")] = 0,
) -> None:
    """Synthesise a conveyor video of mangoes and its ground truth (OUT.truth.json)."""
    from mnet.cli._common import parse_hw
    from mnet.conveyor import make_conveyor_video

    h, w = parse_hw(size, "--size")
    codec = codec or ("MJPG" if out.suffix.lower() == ".avi" else "mp4v")
    with progress_bar() as p:
        task = p.add_task("conveyor", total=None, info="")
        info = make_conveyor_video(out, fruits=fruits, seed=seed, fps=fps, size_wh=(w, h), speed_px=speed or None,
                                   codec=codec, progress=lambda d, t: p.update(task, completed=d, total=t),
                                   foreign=foreign)
    console.print(f"wrote {out} ({info.get('frames')} frames) and its truth file")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
