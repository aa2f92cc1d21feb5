"""The embedded demo: the whole pipeline on synthetic data, as the CLI commands a user would type.

Each stage is one `mnet ...` command run as a subprocess, with the files it must leave behind; a
stage whose marker exists is reused, so re-running the demo only does what is left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from mnet.errors import MnetError

__all__ = ["Stage", "demo_stages", "run_demo", "DemoSizes", "demo_budget_ms"]


@dataclass(frozen=True)
class DemoSizes:
    """How big the demo is; `tiny()` is what the end-to-end test uses."""

    n_train: int = 2000
    n_dev: int = 400
    n_test: int = 400
    supernet_epochs: int = 4
    controller_steps: int = 100
    derive_samples: int = 30
    train_epochs: int = 40
    train_lr: float = 0.05
    calib_samples: int = 300
    fruits: int = 20
    fit_archs: int = 10

    @classmethod
    def tiny(cls) -> "DemoSizes":
        return cls(n_train=60, n_dev=30, n_test=30, supernet_epochs=1, controller_steps=5, derive_samples=2,
                   train_epochs=1, calib_samples=16, fruits=2, fit_archs=3)


@dataclass(frozen=True)
class Stage:
    name: str
    args: tuple[str, ...]
    outputs: tuple[Path, ...]  # what must exist afterwards
    # fills in arguments known only once earlier stages ran (the demo's latency budget)
    late: Optional[Callable[["Stage"], "Stage"]] = None
    clean: tuple[Path, ...] = ()  # removed before the stage runs again (commands that refuse to overwrite)


def demo_budget_ms(table: Path, quantile: float = 0.5, samples: int = 200) -> float:
    """A budget that binds: the `quantile` of predicted latencies of random architectures on this machine."""
    import random

    import numpy as np

    from mnet.arch import SearchSpace
    from mnet.calibration.predictor import LatencyPredictor

    predictor = LatencyPredictor.from_file(table)
    space = SearchSpace.from_json(predictor.table.space)
    rng = random.Random(0)
    lat = [predictor.predict_ms(space.sample(rng)) for _ in range(samples)]
    return round(float(np.quantile(lat, quantile)), 4)


def _with_budget(table: Path) -> Callable[[Stage], Stage]:
    def late(stage: Stage) -> Stage:
        budget = f"{demo_budget_ms(table):g}"
        return replace(stage, name=f"{stage.name} (budget {budget} ms)", late=None,
                       args=(*stage.args, "--latency-budget-ms", budget))

    return late


def demo_stages(out: Path, sizes: DemoSizes = DemoSizes()) -> list[Stage]:
    """The pipeline as CLI commands, in order."""
    data, search, run, bundle = out / "data", out / "search", out / "train", out / "bundle"
    table, video, events = out / "latency.json", out / "conveyor.mp4", out / "events.jsonl"
    return [
        Stage("synthesise mango set", ("data", "synth", str(data), "--n-train", str(sizes.n_train), "--n-dev",
                                       str(sizes.n_dev), "--n-test", str(sizes.n_test), "--seed", "0"),
              (data / "test.csv",)),
        Stage("latency table (onnxruntime CPU)", ("calibrate", "latency", "--preset", "tiny", "--backend", "onnxruntime",
                                                   "--threads", "1", "--fit-archs", str(sizes.fit_archs),
                                                   "--out", str(table)), (table,)),
        Stage("latency-constrained ENAS search", ("search", str(data), "--preset", "tiny", "--out", str(search),
                                                  "--supernet-epochs", str(sizes.supernet_epochs),
                                                  "--controller-steps", str(sizes.controller_steps),
                                                  "--derive-samples", str(sizes.derive_samples), "--lr", "0.05",
                                                  "--batch-size", "64",
                                                  "--latency-table", str(table), "--latency-mode", "hard"),
              (search / "arch.json",), late=_with_budget(table), clean=(search,)),
        Stage("train from scratch", ("train", str(data), "--arch", str(search / "arch.json"), "--out", str(run),
                                     "--epochs", str(sizes.train_epochs), "--lr", str(sizes.train_lr),
                                     "--batch-size", "64"), (run / "best.pt",)),
        Stage("evaluate on test", ("evaluate", str(run / "best.pt"), str(data), "--split", "test", "--json",
                                   str(run / "test_metrics.json")), (run / "test_metrics.json",)),
        Stage("export ONNX bundle", ("export", "onnx", str(run / "best.pt"), "--out", str(bundle), "--data", str(data),
                                     "--force"), (bundle / "mnet.json",)),
        Stage("INT8 calibration", ("calibrate", "int8", str(bundle), str(data), "--samples", str(sizes.calib_samples)),
              (bundle / "model.int8.onnx",)),
        Stage("measure latency fp32", ("bundle", "bench", str(bundle), "--precision", "fp32", "--threads", "1",
                                       "--seconds", "0.5"), (bundle / "mnet.json",)),
        Stage("measure latency int8", ("bundle", "bench", str(bundle), "--precision", "int8", "--threads", "1",
                                       "--seconds", "0.5"), (bundle / "mnet.json",)),
        Stage("synthesise conveyor video", ("data", "conveyor", str(video), "--fruits", str(sizes.fruits), "--seed", "0"),
              (video, video.with_suffix(".truth.json"))),
        Stage("grade the conveyor video", ("grade", str(bundle), "--source", str(video), "--events", str(events),
                                           "--save", str(out / "annotated.mp4"), "--summary", str(out / "grade.json"),
                                           "--threads", "1"),
              (events, out / "annotated.mp4", out / "grade.json")),
        Stage("report", ("report", str(run), str(search), str(bundle), str(table), "--out", str(out / "report")),
              (out / "report" / "report.html",)),
    ]


def run_demo(out: Path, stages: list[Stage], *, on_stage: Optional[Callable[[Stage, str, float], None]] = None,
             stream_output: bool = True) -> float:
    """Run the stages in order, reusing finished ones; returns total seconds. Raises on a failed stage."""
    out.mkdir(parents=True, exist_ok=True)
    marks = out / ".stages"
    marks.mkdir(exist_ok=True)
    t_all = time.time()
    rerun = False  # once a stage runs, everything after it runs again (its inputs changed)
    for i, stage in enumerate(stages, start=1):
        if stage.late is not None:
            stage = stage.late(stage)
        mark = marks / f"{i:02d}.done"
        if not rerun and mark.exists() and mark.read_text() == " ".join(stage.args) and \
                all(p.exists() for p in stage.outputs):
            if on_stage:
                on_stage(stage, "reused", 0.0)
            continue
        rerun = True
        mark.unlink(missing_ok=True)
        for path in stage.clean:
            shutil.rmtree(path, ignore_errors=True)
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
