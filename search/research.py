"""Re-search: a fresh controller on a finished two-stage supernet, for a new latency budget.

The two-stage schedule trains the supernet with uniform sampling, so its weights do not depend on any
reward: a new device or budget needs only the controller stage and a derivation — minutes, not the
hours of supernet training. `sweep` runs several budgets and writes the accuracy/latency Pareto view.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from mnet.search.controller import ControllerConfig, Reinforce
from mnet.search.derive import Candidate, derive, derive_meta, write_derived
from mnet.search.enas import _AGENT_SEED, OpenRun, open_run, train_controller
from mnet.search.supernet import RewardFn

from mnet.errors import ConfigError
from mnet.io import atomic_path, write_json
from mnet.metrics import pareto_front

__all__ = ["research", "sweep", "annotate_arch"]

Progress = Optional[Callable[[str, int, int, dict], None]]  # (stage, done, total, info)


def annotate_arch(out: str | os.PathLike, meta: dict[str, Any], best: Candidate) -> None:
    """Record in OUT/arch.json what the latency term was (budget, table, prediction); `Arch.from_json`
    ignores the extra key, so `mnet train` reads the file as before."""
    write_json(Path(out) / "arch.json", {**best.arch.to_json(), "search": {
        **meta, "predicted_latency_ms": best.extras.get("latency_ms"), "reward": best.reward,
        "accuracy": best.accuracy}})


def research(opened: OpenRun, out: str | os.PathLike, reward: RewardFn, *, steps: int | None = None,
             controller_lr: float | None = None, derive_samples: int | None = None, seed: int | None = None,
             meta: dict[str, Any] | None = None, progress: Progress = None) -> Candidate:
    """Train a fresh controller with `reward` on `opened`'s supernet, derive, write OUT/arch.json & co."""
    cfg = opened.config
    if cfg.schedule != "two-stage":
        raise ConfigError(f"re-search needs a two-stage supernet (trained with uniform sampling); this run used "
                          f"--schedule {cfg.schedule}, whose supernet followed its own controller")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed if seed is None else seed
    ccfg: ControllerConfig = cfg.controller
    ccfg = replace(ccfg, **{k: v for k, v in (("steps", steps), ("lr", controller_lr)) if v is not None})
    samples = derive_samples or cfg.derive_samples
    t0 = time.time()

    # a fresh controller; its samples and their batches follow from the seed (search.controller.stream),
    # so re-searches of one supernet with one seed score the same batches whatever ran before
    opened.evaluator.reward = reward
    agent = Reinforce(opened.space, ccfg, seed + _AGENT_SEED)
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)

    def on_step(record: dict) -> None:
        with open(metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if progress:
            progress("controller", record["step"], ccfg.steps, record)

    train_controller(agent, opened.evaluator, ccfg.steps, batch=cfg.controller_batch, on_step=on_step)
    with atomic_path(out / "controller.pt") as tmp:
        torch.save({"agent": agent.state_dict()}, tmp)
    candidates = derive(opened.space, opened.evaluator, agent.controller, samples=samples, seed=seed,
                        on_sample=(lambda d, t: progress("derive", d, t, {})) if progress else None,
                        rescore_top=cfg.rescore_top)
    best = write_derived(out, candidates, {**derive_meta("enas", samples, False, cfg),
                                           "research_of": str(meta.get("run")) if meta else None}, cfg.topk)
    seconds = time.time() - t0
    annotate_arch(out, meta or {}, best)
    write_json(out / "research.json", {**(meta or {}), "controller": asdict(ccfg), "derive_samples": samples,
                                       "seconds": seconds, "best": best.to_json(), "config": cfg.to_json()})
    return best


def sweep(run: str | os.PathLike, out: str | os.PathLike, budgets: Sequence[float],
          make_reward: Callable[[float], RewardFn], *, device: str = "auto", steps: int | None = None,
          controller_lr: float | None = None, derive_samples: int | None = None, meta: dict[str, Any] | None = None,
          progress: Progress = None) -> dict[str, Any]:
    """`research` for each budget into OUT/budget-<ms>/ (a single budget: OUT itself), then OUT/pareto.json
    and OUT/pareto.png."""
    if not budgets:
        raise ConfigError("--budgets: give at least one latency budget in milliseconds")
    out = Path(out)
    opened = open_run(run, device=device, controller=False)
    t0 = time.time()
    points = []
    for i, budget in enumerate(budgets):
        if progress:
            progress("budget", i, len(budgets), {"budget_ms": budget})
        sub = out if len(budgets) == 1 else out / f"budget-{budget:g}ms"
        best = research(opened, sub, make_reward(budget), steps=steps, controller_lr=controller_lr,
                        derive_samples=derive_samples, meta={**(meta or {}), "run": str(run), "budget_ms": budget},
                        progress=progress)
        topk = json.loads((sub / "topk.json").read_text(encoding="utf-8"))
        points.append({"budget_ms": budget, "dir": str(sub), "best": best.to_json(),
                       "candidates": [{"accuracy": c["accuracy"], "latency_ms": c.get("latency_ms"),
                                       "reward": c["reward"]} for c in topk]})
    result = {**(meta or {}), "run": str(run), "budgets": list(budgets), "seconds": time.time() - t0,
              "points": points}
    write_json(out / "pareto.json", result)
    _plot(out / "pareto.png", points)
    return result


def _plot(path: Path, points: list[dict]) -> None:
    from mnet.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    allpts = []
    for i, p in enumerate(points):
        c = [(x["latency_ms"], x["accuracy"]) for x in p["candidates"] if x.get("latency_ms") is not None]
        allpts += c
        ax.scatter([x[0] for x in c], [100 * x[1] for x in c], s=12, alpha=0.5, color=f"C{i}")
        b = p["best"]
        ax.scatter([b.get("latency_ms")], [100 * b["accuracy"]], s=60, marker="*", color=f"C{i}",
                   label=f"budget {p['budget_ms']:g} ms")
        ax.axvline(p["budget_ms"], color=f"C{i}", ls="--", lw=1)
    front = pareto_front(allpts)
    if front:
        ax.step([x[0] for x in front], [100 * x[1] for x in front], where="post", color="k", lw=1, label="Pareto front")
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("validation accuracy, shared weights (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
