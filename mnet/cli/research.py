"""`mnet research`: a fresh controller on a finished supernet, for a new latency budget (or several)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mnet.cli._common import console, progress_bar


def latency_reward_from_options(table: Optional[Path], budget_ms: Optional[float], mode: str,
                                alpha: Optional[float], beta: Optional[float], space=None):
    """(reward_fn or None, meta) from the latency options shared by `mnet search` and `mnet research`; with
    `space` (a SearchSpace), a table that does not cover it is refused."""
    from mnet.errors import ConfigError

    if table is None and budget_ms is None:
        return None, {}
    if table is None or budget_ms is None:
        raise ConfigError("--latency-table and --latency-budget-ms go together: give both or neither")
    from mnet.calibration.predictor import LatencyPredictor
    from mnet.search.reward import latency_reward

    predictor = LatencyPredictor.from_file(table)
    if space is not None:
        predictor.check_space(space)
    reward = latency_reward(predictor, budget_ms, mode, alpha, beta)
    return reward, {"latency_table": str(table.resolve()), "table_fingerprint": predictor.table.fingerprint,
                    "latency_budget_ms": budget_ms, "latency_mode": mode, "alpha": reward.alpha, "beta": reward.beta}


def research(
    run: Annotated[Path, typer.Argument(help="A finished two-stage `mnet search` directory (its supernet is reused).")],
    latency_table: Annotated[Path, typer.Option(help="latency.json of the target device.")],
    out: Annotated[Path, typer.Option(help="Output directory (arch.json, topk.json; per budget with --budgets).")],
    latency_budget_ms: Annotated[Optional[float], typer.Option(help="Latency budget T in milliseconds.")] = None,
    budgets: Annotated[Optional[str], typer.Option(help="Several budgets, e.g. 1,2,4: one re-search each, plus "
                                                   "pareto.json and pareto.png.")] = None,
    latency_mode: Annotated[str, typer.Option(help="soft (α=β=−0.07) or hard (α=0, β=−1).")] = "soft",
    latency_alpha: Annotated[Optional[float], typer.Option(help="Override α (exponent under the budget).")] = None,
    latency_beta: Annotated[Optional[float], typer.Option(help="Override β (exponent over the budget).")] = None,
    controller_steps: Annotated[Optional[int], typer.Option(help="Controller steps (default: the run's; a multiple "
                                                           "of its --controller-batch).")] = None,
    controller_lr: Annotated[Optional[float], typer.Option(help="Controller learning rate (default: the run's).")]
    = None,
    derive_samples: Annotated[Optional[int], typer.Option(help="Architectures scored at the end.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Train only a new controller with the latency reward on RUN's supernet, then derive."""
    from mnet.errors import ConfigError
    from mnet.search.research import sweep

    if (latency_budget_ms is None) == (budgets is None):
        raise ConfigError("give --latency-budget-ms B or --budgets B1,B2,...")
    try:
        values = [latency_budget_ms] if budgets is None else [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--budgets {budgets!r}: expected comma-separated milliseconds, e.g. 1,2,4") from None

    def make_reward(budget: float):
        return latency_reward_from_options(latency_table, budget, latency_mode, latency_alpha, latency_beta)[0]

    _, meta = latency_reward_from_options(latency_table, values[0], latency_mode, latency_alpha, latency_beta)
    meta.pop("latency_budget_ms")
    with progress_bar() as p:
        task = p.add_task("controller", total=None, info="")
        btask = p.add_task("budgets", total=len(values), info="")

        def progress(stage: str, done: int, total: int, info: dict) -> None:
            if stage == "budget":
                p.update(btask, completed=done, info=f"{info['budget_ms']:g} ms")
            else:
                extra = f"reward {info['reward']:.3f} lat {info.get('latency_ms', 0):.3f} ms" if info else ""
                p.update(task, completed=done, total=total, description=stage, info=extra)

        result = sweep(run, out, values, make_reward, device=device, steps=controller_steps,
                       controller_lr=controller_lr, derive_samples=derive_samples, meta=meta, progress=progress)
        p.update(btask, completed=len(values))
    t = Table(title=f"re-search of {run} in {result['seconds']:.1f}s")
    for col in ("budget (ms)", "predicted latency (ms)", "val acc (shared weights)", "reward", "arch.json"):
        t.add_column(col, justify="right")
    for pt in result["points"]:
        b = pt["best"]
        t.add_row(f"{pt['budget_ms']:g}", f"{b.get('latency_ms', float('nan')):.3f}", f"{b['accuracy']:.3f}",
                  f"{b['reward']:.3f}", str(Path(pt["dir"]) / "arch.json"))
    console.print(t)
    if len(values) > 1:
        console.print(f"Pareto view → {out / 'pareto.json'}, {out / 'pareto.png'}")


def register(app: typer.Typer) -> None:
    app.command("research")(research)
