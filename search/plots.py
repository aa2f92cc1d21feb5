"""Search plots (PNG): supernet curves, controller reward and entropy, and the final policy's ops.

Built on `mnet.plots` (lazy matplotlib, atomic writes); a missing matplotlib raises its PlotError.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnet.arch import Arch
from mnet.io import atomic_path
from mnet.plots import plot_curves, pyplot

__all__ = ["plot_search", "plot_op_histogram", "op_histogram", "moving_average"]


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start), same length as `values`."""
    v = np.asarray(values, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def op_histogram(archs: Sequence[Arch], ops: Sequence[tuple[int, int]]) -> np.ndarray:
    """Fraction of `archs` choosing each op, per layer: shape (layers, len(ops))."""
    counts = np.zeros((archs[0].num_layers, len(ops)))
    index = {op: j for j, op in enumerate(ops)}
    for a in archs:
        for i, layer in enumerate(a.layers):
            counts[i, index[(layer.kernel, layer.dilation)]] += 1
    return counts / len(archs)


def plot_op_histogram(path: str | os.PathLike, freq: np.ndarray, ops: Sequence[tuple[int, int]],
                      title: str = "") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.42 * len(ops), 1.2 + 0.45 * len(freq)))
    im = ax.imshow(freq, cmap="viridis", vmin=0, vmax=max(1e-9, float(freq.max())), aspect="auto")
    ax.set_xticks(range(len(ops)), [f"{k}/{d}" for k, d in ops], rotation=90)
    ax.set_yticks(range(len(freq)), [str(i + 1) for i in range(len(freq))])
    ax.set_xlabel("op (kernel/dilation)")
    ax.set_ylabel("layer")
    ax.set_title(title or "op frequency under the final policy")
    fig.colorbar(im, ax=ax, fraction=0.03)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_search(out: str | os.PathLike, records: Sequence[dict], policy: Sequence[Arch] | None = None,
                ops: Sequence[tuple[int, int]] | None = None) -> list[Path]:
    """supernet.png, and for a controller reward.png, entropy.png, ops.png; returns the paths written."""
    out = Path(out)
    written = []
    sup = [r for r in records if r["stage"] == "supernet"]
    if sup:
        ep = [r["epoch"] for r in sup]
        plot_curves(out / "supernet.png", {"loss": (ep, [r["loss"] for r in sup]),
                                           "accuracy": (ep, [r["acc"] for r in sup])},
                    "epoch", "train (sampled paths)", "supernet")
        written.append(out / "supernet.png")
        if all("probe_acc" in r for r in sup) and sup[0]["probe_acc"]:
            plot_curves(out / "probes.png", {f"probe {j}": (ep, [r["probe_acc"][j] for r in sup])
                                             for j in range(len(sup[0]["probe_acc"]))},
                        "epoch", "accuracy on reward images", "fixed probe architectures (ranking stable?)")
            written.append(out / "probes.png")
    ctl = [r for r in records if r["stage"] == "controller"]
    if ctl:
        steps = [r["step"] for r in ctl]
        window = max(1, len(ctl) // 50)
        plot_curves(out / "reward.png", {
            "reward": (steps, [r["reward"] for r in ctl]),
            f"reward (mean of {window})": (steps, moving_average([r["reward"] for r in ctl], window)),
            "baseline": (steps, [r["baseline"] for r in ctl]),
        }, "controller step", "reward", "controller reward (one validation minibatch)")
        plot_curves(out / "entropy.png", {"entropy": (steps, [r["entropy"] for r in ctl])},
                    "controller step", "policy entropy (nats, summed over decisions)", "controller entropy")
        written += [out / "reward.png", out / "entropy.png"]
    if policy:
        from mnet.arch import OPS

        ops = ops or OPS
        plot_op_histogram(out / "ops.png", op_histogram(policy, ops), ops,
                          f"op frequency in {len(policy)} samples of the final policy")
        written.append(out / "ops.png")
    return written
