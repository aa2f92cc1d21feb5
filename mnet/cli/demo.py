"""`mnet demo`: the whole pipeline on the embedded synthetic data (what `make demo` runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mnet.cli._common import console


def demo(
    out: Annotated[Path, typer.Option(help="Working directory; finished stages are reused on re-runs.")] = Path("demo"),
    tiny: Annotated[bool, typer.Option(help="Minimum sizes (seconds, for tests).")] = False,
) -> None:
    """Synthesise data, search, train, export, calibrate, grade a conveyor video, and report."""
    from mnet.demo import DemoSizes, demo_stages, run_demo

    stages = demo_stages(out, DemoSizes.tiny() if tiny else DemoSizes())

    def on_stage(stage, status, seconds):
        if status == "start":
            console.rule(f"[bold]{stage.name}[/]  mnet {' '.join(stage.args)}", align="left")
        elif status == "reused":
            console.print(f"[dim]{stage.name}: reused (already done)[/]")
        else:
            console.print(f"[green]{stage.name}: done in {seconds:.1f}s[/]")

    total = run_demo(out, stages, on_stage=on_stage)
    console.rule(f"demo finished in {total:.1f}s")
    metrics = out / "train" / "test_metrics.json"
    if metrics.exists():
        console.print(f"test accuracy: {json.loads(metrics.read_text())['accuracy']:.4f}  ({metrics})")
    for what, path in (("report", out / "report" / "report.html"), ("annotated video", out / "annotated.mp4"),
                       ("grade events", out / "events.jsonl")):
        if path.exists():
            console.print(f"{what}: {path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
