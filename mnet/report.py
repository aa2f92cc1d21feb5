"""`mnet report`: the paper's Table 2 (plus measured latency) for your runs, as Markdown and HTML.

Inputs are run directories as the other stages leave them, in any order:
- training runs (`train.json`, `best.pt`; `test_metrics.json` from `mnet evaluate --json`),
- search runs (`search.json`, `metrics.jsonl`: search cost, reward curves, the random-search row),
- bundles (`mnet.json`: measured latency per backend/precision, the INT8 accuracy drop),
- latency tables (`latency.json`: predicted latency of each MNet on that target),
- fusion runs (`fusion.json`: the paper's Table 3).
Everything is read from those files; nothing is re-measured here, so a report is cheap and repeatable.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mnet.arch import PRESETS, Arch
from mnet.errors import DataError
from mnet.io import atomic_path, read_json, write_text
from mnet.metrics import pareto_front

__all__ = ["ModelRow", "collect", "write_report"]


@dataclass
class ModelRow:
    name: str
    run: str
    input_hw: tuple[int, int]
    method: str  # "ENAS (RL)", "random search", "manual", "random sample"
    params: int | None = None
    macs: int | None = None
    accuracy: float | None = None
    accuracy_split: str = "test"
    search_seconds: float | None = None
    search_device: str | None = None
    search_gpu_hours: float | None = None
    latency: dict[str, float] = field(default_factory=dict)  # "onnxruntime/cpu/fp32/b1" -> p50 ms
    int8_drop_points: float | None = None
    confusion: Optional[dict] = None
    arch: Arch | None = None


@dataclass
class Inputs:
    rows: list[ModelRow]
    searches: dict[str, dict]  # search dir -> search.json (+ "curve")
    tables: list[tuple[str, Any]]  # (path, LatencyTable)
    fusions: list[dict]
    search_benches: list[dict] = field(default_factory=list)  # bench/results/search_real.json


def _kind(path: Path) -> str:
    if path.is_dir():
        for name, kind in (("mnet.json", "bundle"), ("search.json", "search"), ("train.json", "train"),
                           ("fusion.json", "fusion")):
            if (path / name).is_file():
                return kind
        raise DataError(f"{path}: not a run, search, bundle or fusion directory (no train.json, search.json, "
                        "mnet.json or fusion.json)")
    if path.suffix == ".json" and path.is_file():
        d = read_json(path, "report input")
        if isinstance(d, dict) and "entries" in d and "backend" in d:
            return "table"
        if isinstance(d, dict) and d.get("bench") == "search_real":
            return "search_bench"
    raise DataError(f"{path}: not a run directory, latency table or bench/results/search_real.json")


def _search_curve(search_dir: Path) -> list[tuple[int, float]]:
    f = search_dir / "metrics.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r.get("stage") == "controller":
            out.append((int(r["step"]), float(r["reward"])))
    return out


def _search_method(search: dict) -> str:
    return "random search" if search.get("config", {}).get("strategy") == "random" else "ENAS (RL)"


def _mnet_name(arch: Arch) -> str:
    """The model's name from the preset whose skeleton it has: "MNet-24-32 (12L, C=256)" only for the paper's
    skeleton, "MNet-tiny (4L, C=16)" for the demo's, "MNet custom (6L, C=64)" for any other (the input size
    has its own column)."""
    preset = next((name for name, sp in PRESETS.items()
                   if (sp.num_layers, sp.width, tuple(sp.input_hw), sp.stem_stride)
                   == (arch.num_layers, arch.width, tuple(arch.input_hw), arch.stem_stride)), None)
    base = "MNet custom" if preset is None else "MNet-" + preset.removeprefix("mnet-")
    return f"{base} ({arch.num_layers}L, C={arch.width})"


def _train_row(run: Path, searches: dict[str, dict]) -> ModelRow:
    meta = read_json(run / "train.json", "train.json")
    test = run / "test_metrics.json"
    if test.exists():
        m = read_json(test, "test metrics")
        acc, split, cm = m["accuracy"], "test", m
    else:  # fall back to the best dev accuracy recorded during training
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if (run / "metrics.jsonl").exists() else []
        acc = max((json.loads(x)["dev_acc"] for x in lines), default=None)
        split, cm = "dev", None
    hw = tuple(meta["preprocess"]["input_hw"])
    if meta.get("kind") == "torchvision":
        params, macs = _torchvision_cost(meta["model_name"], len(meta["classes"]), hw)
        return ModelRow(meta["model_name"], str(run), hw, "manual", params=params, macs=macs, accuracy=acc,
                        accuracy_split=split, confusion=cm)
    arch = Arch.from_json(meta["arch"])
    row = ModelRow(_mnet_name(arch), str(run), hw, "random sample", params=arch.num_params(),
                   macs=arch.macs(), accuracy=acc, accuracy_split=split, confusion=cm, arch=arch)
    src = meta.get("arch_source")
    if src and (Path(src).parent / "search.json").is_file():
        sdir = str(Path(src).parent.resolve())
        search = searches.get(sdir) or read_json(Path(sdir) / "search.json", "search.json")
        searches.setdefault(sdir, {**search, "curve": _search_curve(Path(sdir))})
        row.method = _search_method(search)
        row.search_seconds = search["seconds"]["total"]
        row.search_device = search.get("device_name") or search.get("device")
        row.search_gpu_hours = search.get("gpu_hours")
        if row.method == "random search":
            row.name += " (random search)"
    return row


def _torchvision_cost(name: str, num_classes: int, hw: tuple[int, int]) -> tuple[int | None, int | None]:
    """Parameters and MACs (FLOP counter / 2) of a baseline at its input size."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from mnet.search.baselines import build_baseline
    except ImportError:  # a report on a machine without torch still renders
        return None, None
    model = build_baseline(name, num_classes).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, *hw))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def collect(paths: list[str | os.PathLike]) -> Inputs:
    from mnet.bundle import load_bundle
    from mnet.latency_table import LatencyTable

    rows: list[ModelRow] = []
    searches: dict[str, dict] = {}
    tables, fusions, bundles, benches = [], [], [], []
    for p in map(Path, paths):
        kind = _kind(p)
        if kind == "train":
            rows.append(_train_row(p, searches))
        elif kind == "search":
            sd = str(p.resolve())
            searches.setdefault(sd, {**read_json(p / "search.json", "search.json"), "curve": _search_curve(p)})
        elif kind == "bundle":
            bundles.append(load_bundle(p))
        elif kind == "table":
            tables.append((str(p), LatencyTable.from_json(read_json(p), str(p))))
        elif kind == "search_bench":
            benches.append(read_json(p))
        else:
            fusions.append(read_json(p / "fusion.json", "fusion.json"))
    # bundles: match to their training run through the checkpoint they were exported from
    for b in bundles:
        ckpt = Path(b.card.source.get("checkpoint", "")).resolve().parent
        row = next((r for r in rows if Path(r.run).resolve() == ckpt), None)
        if row is None:
            continue
        for key, v in b.card.latency.items():
            row.latency[key] = float(v["p50_ms"] if isinstance(v, dict) else v)
        int8 = b.card.metrics.get("int8") or {}
        if "drop_points" in int8:
            row.int8_drop_points = float(int8["drop_points"])
    # latency tables: predicted latency of every MNet the table can serve
    from mnet.calibration.predictor import LatencyPredictor

    for path, table in tables:
        pred = LatencyPredictor(table, path)
        key = f"predicted {table.backend}/{table.precision}/b{table.batch}"
        for r in rows:
            if r.arch is not None:
                try:
                    r.latency[key] = pred.predict_ms(r.arch)
                except Exception:  # another preset: this table cannot serve that row
                    continue
    return Inputs(rows, searches, tables, fusions, benches)


# --- rendering ---------------------------------------------------------------------------------------

def _cost_columns(rows: list[ModelRow]) -> dict[int, tuple[str, str]]:
    searched = [r for r in rows if r.search_seconds]
    base = min((r.search_seconds for r in searched), default=None)
    out = {}
    for i, r in enumerate(rows):
        if not r.search_seconds:
            out[i] = ("-", "-")
            continue
        hours = r.search_seconds / 3600
        unit = "GPU-h" if r.search_gpu_hours is not None else "CPU-h"
        out[i] = (f"{hours:.3g} {unit}", f"{r.search_seconds / base:.1f}x")
    return out


def _table_rows(rows: list[ModelRow]) -> tuple[list[str], list[list[str]]]:
    lat_keys = sorted({k for r in rows for k in r.latency})
    header = ["Input size", "Model", "Search method", "Search cost", "Relative", "#Params (M)", "MACs (M)",
              "Acc (%)"] + [f"{k} (ms)" for k in lat_keys] + ["INT8 drop (pts)"]
    costs = _cost_columns(rows)
    body = []
    for i, r in enumerate(rows):
        body.append([
            f"{r.input_hw[0]} × {r.input_hw[1]}", r.name, r.method, *costs[i],
            f"{r.params / 1e6:.3f}" if r.params is not None else "-",
            f"{r.macs / 1e6:.1f}" if r.macs is not None else "-",
            (f"{100 * r.accuracy:.2f}" + ("" if r.accuracy_split == "test" else " (dev)")) if r.accuracy is not None else "-",
            *[f"{r.latency[k]:.3f}" if k in r.latency else "-" for k in lat_keys],
            f"{r.int8_drop_points:.2f}" if r.int8_drop_points is not None else "-",
        ])
    return header, body


def _plots(inputs: Inputs, out: Path) -> list[tuple[str, Path]]:
    from mnet.plots import pyplot

    plt = pyplot()
    made = []
    rows = [r for r in inputs.rows if r.accuracy is not None]

    def save(fig, name, title):
        path = out / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append((title, path))

    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            if r.params:
                ax.scatter(r.params / 1e6, 100 * r.accuracy, s=30)
                ax.annotate(r.name, (r.params / 1e6, 100 * r.accuracy), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        save(fig, "accuracy_vs_params.png", "Accuracy vs parameters")
        lat_keys = sorted({k for r in rows for k in r.latency})
        if lat_keys:
            key = next((k for k in lat_keys if not k.startswith("predicted")), lat_keys[0])
            pts = sorted((r.latency[key], 100 * r.accuracy, r.name) for r in rows if key in r.latency)
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=30)
            for x, y, n in pts:
                ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            front = pareto_front([(x, y) for x, y, _ in pts])
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="C3", label="Pareto front")
            ax.set_xlabel(f"latency {key} (ms)")
            ax.set_ylabel("accuracy (%)")
            ax.legend()
            ax.grid(alpha=0.3)
            save(fig, "accuracy_vs_latency.png", f"Accuracy vs latency ({key})")
        cms = [r for r in rows if r.confusion]
        if cms:
            fig, axes = plt.subplots(1, len(cms), figsize=(3.2 * len(cms), 3.2), squeeze=False)
            for ax, r in zip(axes[0], cms):
                cm = r.confusion["confusion"]
                ax.imshow(cm, cmap="Blues")
                for i, row in enumerate(cm):
                    for j, v in enumerate(row):
                        ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
                ax.set_xticks(range(len(cm)), r.confusion["classes"])
                ax.set_yticks(range(len(cm)), r.confusion["classes"])
                ax.set_title(f"{r.name}\n{100 * r.confusion['accuracy']:.1f}%", fontsize=8)
            save(fig, "confusion_matrices.png", "Confusion matrices (test)")
    curves = {Path(k).name + f" ({_search_method(v)})": v["curve"] for k, v in inputs.searches.items() if v["curve"]}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, pts in curves.items():
            steps = [p[0] for p in pts]
            rewards = [p[1] for p in pts]
            ema, smooth = rewards[0], []
            for v in rewards:
                ema = 0.95 * ema + 0.05 * v
                smooth.append(ema)
            ax.plot(steps, rewards, alpha=0.25)
            ax.plot(steps, smooth, label=name)
        ax.set_xlabel("controller step")
        ax.set_ylabel("reward")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "search_rewards.png", "Search reward curves")
    return made


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _search_vs_chance(b: dict) -> tuple[list[str], list[list[str]], str]:
    """Search vs random vs hand-designed baselines from bench/results/search_real.json: each row's test
    accuracy with its seed spread and, for searched picks, their percentile among uniform archs."""
    header = ["method", "test acc (%)", "per seed (%)", "percentile among uniform archs", "params"]
    seeds = b.get("per_seed", [])
    gt = b.get("gt_test_acc", {})
    rows = [
        ["ENAS pick", f"{_pct(b['search_test_acc_mean'])} ± {_pct(b['search_test_acc_std'])}",
         ", ".join(_pct(s["enas_test_acc"]) for s in seeds), ", ".join(f"{p:.0f}" for p in b["search_pick_percentiles"]),
         ""],
        ["random search pick (equal budget)", f"{_pct(b['random_test_acc_mean'])} ± {_pct(b['random_test_acc_std'])}",
         ", ".join(_pct(s["random_test_acc"]) for s in seeds),
         ", ".join(f"{p:.0f}" for p in b.get("random_pick_percentiles", [])), ""],
        ["final policy samples", _pct(b["policy_test_acc_mean"]), "", "", ""],
        [f"uniform archs ({b['n_archs']})", f"{_pct(gt.get('mean', b['uniform_test_acc_mean']))} ± "
         f"{_pct(gt.get('std', 0.0))}", "", "50 (by definition)", ""],
    ]
    for name, r in b.get("baselines", {}).items():
        rows.append([name, _pct(r["test_acc"]), "", "", f"{r['params']:,}"])
    ci = b.get("kendall_tau_ci95") or [None, None]
    ci_text = "" if None in ci else f" (95% CI {ci[0]:.2f} … {ci[1]:.2f})"
    note = (f"Supernet fidelity: Kendall τ {b['kendall_tau']:.2f}{ci_text} between supernet and standalone accuracy "
            f"over {b['n_archs']} architectures.")
    return header, rows, note


def write_report(paths: list[str | os.PathLike], out: str | os.PathLike) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = collect(paths)
    if not inputs.rows and not inputs.search_benches:
        raise DataError("mnet report: no trained model among the inputs; pass RUN directories from `mnet train` "
                        "or `mnet baseline` (or bench/results/search_real.json)")
    header, body = _table_rows(inputs.rows)
    plots = _plots(inputs, out)
    stamp = time.strftime("%Y-%m-%d %H:%M")

    md = [f"# MNet report ({stamp})", "", "Table 2 columns as in the paper, plus measured latency and the INT8 drop. "
          "Search cost is wall time on the device that searched (GPU-hours on CUDA, CPU-hours otherwise); "
          "relative = ÷ the cheapest search.", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in body]
    for t_path, table in inputs.tables:
        md += ["", f"Latency table `{t_path}`: {table.fingerprint}"]
    if inputs.fusions:
        md += ["", "## Fusion baselines (Table 3)", "", "| mode | best combination (chosen on dev) | dev acc (%) | "
               "test acc (%) |", "|---|---|---|---|"]
        for f in inputs.fusions:
            md.append(f"| {f['mode']} | {' + '.join(Path(r).name for r in f['best']['runs'])} | "
                      f"{100 * f['best']['dev_acc']:.2f} | {100 * f['best']['test_acc']:.2f} |")
    for b in inputs.search_benches:
        bh, brows, note = _search_vs_chance(b)
        md += ["", "## Search vs chance", "", "| " + " | ".join(bh) + " |", "|" + "---|" * len(bh)]
        md += ["| " + " | ".join(r) + " |" for r in brows] + ["", note]
    for title, p in plots:
        md += ["", f"## {title}", "", f"![{title}]({p.name})"]
    write_text(out / "report.md", "\n".join(md) + "\n")

    def img(p: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()

    e = html.escape
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>MNet report</title><style>",
         "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
         "td:nth-child(2),td:nth-child(3){text-align:left}img{max-width:100%;margin:1em 0}</style></head><body>",
         f"<h1>MNet report</h1><p>{e(stamp)} — Table 2 columns as in the paper, plus measured latency and the INT8 "
         "drop. Search cost is wall time on the device that searched.</p>",
         "<table id='table2'><tr>" + "".join(f"<th>{e(c)}</th>" for c in header) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body]
    h.append("</table>")
    for t_path, table in inputs.tables:
        h.append(f"<p>Latency table <code>{e(t_path)}</code>: {e(table.fingerprint)}</p>")
    if inputs.fusions:
        h.append("<h2>Fusion baselines (Table 3)</h2><table><tr><th>mode</th><th>best combination</th>"
                 "<th>dev acc (%)</th><th>test acc (%)</th></tr>")
        for f in inputs.fusions:
            h.append(f"<tr><td>{e(f['mode'])}</td><td>{e(' + '.join(Path(r).name for r in f['best']['runs']))}</td>"
                     f"<td>{100 * f['best']['dev_acc']:.2f}</td><td>{100 * f['best']['test_acc']:.2f}</td></tr>")
        h.append("</table>")
    for b in inputs.search_benches:
        bh, brows, note = _search_vs_chance(b)
        h.append("<h2>Search vs chance</h2><table id='search-vs-chance'><tr>"
                 + "".join(f"<th>{e(c)}</th>" for c in bh) + "</tr>")
        h += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in brows]
        h.append(f"</table><p>{e(note)}</p>")
    for title, p in plots:
        h.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='{img(p)}'>")
    h.append("</body></html>")
    write_text(out / "report.html", "\n".join(h))
    return {"markdown": out / "report.md", "html": out / "report.html", **{p.stem: p for _, p in plots}}
