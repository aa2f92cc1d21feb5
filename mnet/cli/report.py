"""`mnet baseline-fusion` and `mnet report`: the paper's Tables 2 and 3 for your data and device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mnet.cli._common import console, progress_bar


def baseline_fusion(
    data: Annotated[Path, typer.Argument(help="Dataset directory (labelled train/dev/test).")],
    runs: Annotated[str, typer.Option(help="Comma-separated trained runs (RUN dirs or .pt files).")],
    out: Annotated[Path, typer.Option(help="Directory for fusion.json.")],
    mode: Annotated[str, typer.Option(help="feature (concatenated features, one SVM) or decision "
                                      "(one SVM per network, decision values summed).")] = "feature",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (feature extraction).")] = "cpu",
) -> None:
    """Fit linear SVMs on the penultimate features of trained networks; report the best combination."""
    from mnet.search.fusion import fuse

    run_list = [r.strip() for r in runs.split(",") if r.strip()]
    with progress_bar() as p:
        task = p.add_task("combinations", total=None, info="")
        result = fuse(run_list, data, mode, out, device=device,
                      progress=lambda d, t: p.update(task, completed=d, total=t))
    t = Table(title=f"{mode}-level fusion")
    t.add_column("runs")
    t.add_column("dev acc", justify="right")
    t.add_column("test acc", justify="right")
    for c in sorted(result.combos, key=lambda c: -c["dev_acc"]):
        t.add_row(" + ".join(Path(r).name for r in c["runs"]), f"{c['dev_acc']:.4f}", f"{c['test_acc']:.4f}",
                  style="bold" if c is result.best else None)
    console.print(t)
    console.print(f"best (chosen on dev): {' + '.join(result.best['runs'])} → test accuracy "
                  f"{result.best['test_acc']:.4f}; {out / 'fusion.json'}")


def report(
    runs: Annotated[list[Path], typer.Argument(help="Training runs, search runs, bundles, latency tables, fusion "
                                                "runs, bench/results/search_real.json (search vs chance) — in any "
                                                "order.")],
    out: Annotated[Path, typer.Option(help="Directory for report.md, report.html and the plots.")],
) -> None:
    """The paper's Table 2 for your runs (plus measured latency and the INT8 drop), with plots."""
    from mnet.report import write_report

    files = write_report(runs, out)
    console.print(f"report → {files['html']} and {files['markdown']}")


def register(app: typer.Typer) -> None:
    app.command("baseline-fusion")(baseline_fusion)
    app.command("report")(report)
