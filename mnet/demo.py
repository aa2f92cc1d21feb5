"""The embedded demo: the whole pipeline on synthetic data, as the CLI commands a user would type.

Each stage is one `mnet ...` command run as a subprocess, with the files it must leave behind; a
stage whose marker exists is reused, so re-running the demo only does what is left.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mnet.errors import MnetError

__all__ = ["Stage", "demo_stages", "run_demo", "DemoSizes"]


@dataclass(frozen=True)
class DemoSizes:
    """How big the demo is; `tiny()` is what the end-to-end test uses."""

    n_train: int = 600
    n_dev: int = 100
    n_test: int = 200
    train_epochs: int = 30
    train_lr: float = 0.05

    @classmethod
    def tiny(cls) -> "DemoSizes":
        return cls(n_train=60, n_dev=30, n_test=30, train_epochs=1)


@dataclass(frozen=True)
class Stage:
    name: str
    args: tuple[str, ...]
    outputs: tuple[Path, ...]  # what must exist afterwards


def demo_stages(out: Path, sizes: DemoSizes = DemoSizes()) -> list[Stage]:
    data, run = out / "data", out / "train"
    arch = out / "arch.json"
    return [
        Stage("synthesise mango set", ("data", "synth", str(data), "--n-train", str(sizes.n_train), "--n-dev",
                                       str(sizes.n_dev), "--n-test", str(sizes.n_test), "--seed", "0"),
              (data / "test.csv",)),
        Stage("sample architecture", ("arch", "sample", "--preset", "tiny", "--seed", "0", "--out", str(arch)),
              (arch,)),
        Stage("train", ("train", str(data), "--arch", str(arch), "--out", str(run), "--epochs",
                        str(sizes.train_epochs), "--lr", str(sizes.train_lr), "--batch-size", "64"),
              (run / "best.pt",)),
        Stage("evaluate", ("evaluate", str(run / "best.pt"), str(data), "--split", "test", "--json",
                           str(run / "test_metrics.json")), (run / "test_metrics.json",)),
    ]


def run_demo(out: Path, stages: list[Stage], *, on_stage: Optional[Callable[[Stage, str, float], None]] = None,
             stream_output: bool = True) -> float:
    """Run the stages in order, reusing finished ones; returns total seconds. Raises on a failed stage."""
    out.mkdir(parents=True, exist_ok=True)
    marks = out / ".stages"
    marks.mkdir(exist_ok=True)
    t_all = time.time()
    for i, stage in enumerate(stages, start=1):
        mark = marks / f"{i:02d}.done"
        if mark.exists() and mark.read_text() == " ".join(stage.args) and all(p.exists() for p in stage.outputs):
            if on_stage:
                on_stage(stage, "reused", 0.0)
            continue
        if on_stage:
            on_stage(stage, "start", 0.0)
        t0 = time.time()
        cmd = [sys.executable, "-m", "mnet", *stage.args]
        r = subprocess.run(cmd, stdout=None if stream_output else subprocess.PIPE,
                           stderr=None if stream_output else subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if r.returncode != 0:
            tail = "" if stream_output else f": {(r.stdout or '').strip().splitlines()[-1:]}"
            raise MnetError(f"demo stage '{stage.name}' failed (exit {r.returncode}){tail}; "
                            f"command: mnet {' '.join(stage.args)}")
        missing = [str(p) for p in stage.outputs if not p.exists()]
        if missing:
            raise MnetError(f"demo stage '{stage.name}' did not write {', '.join(missing)}")
        mark.write_text(" ".join(stage.args))
        if on_stage:
            on_stage(stage, "done", time.time() - t0)
    return time.time() - t_all
