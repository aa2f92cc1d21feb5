"""Does a latency table measured at INT8 make the search find architectures that are fast at INT8?

Issue 15, item 4: on ONNX Runtime CPU INT8 is only ~1.07× fp32 for a random mnet-24-32 architecture
(ORT's int8 depthwise kernels for large kernels are slow). This bench measures, on one small space,
the INT8/fp32 speed ratio (ORT CPU, 1 thread) and the INT8 accuracy drop of:

  (a) `int8_search_s{seed}`: the architecture `mnet search --latency-table int8.json --latency-budget-ms B
      --latency-mode hard` finds, for `--search-seeds` seeds, under a tight INT8 budget B (the 10th
      percentile of the int8 table's predictions over uniform architectures): the headline;
  (b) `fp32_search_s{seed}`: `mnet research` on the same supernet with the fp32 table under a budget at the
      same percentile;
  (c) `--random` uniformly random architectures;
  (d) `int8_table` / `fp32_table`: the tables used directly (`--route tables` alone, or with the search, the
      default `both`): `--samples` uniform archs are ranked with the two tables; (d) is the arch the tables
      predict gains most at int8 (fp32 ÷ int8 of the blocks' sums) among those under the int8 budget, and a
      random one under the fp32 budget. This says how much the ratio could gain from a search that aimed at
      it (a hard budget makes the search's reward accuracy alone).

Width: the tiny skeleton (4 layers, 24×32) at width 256 (mnet-24-32's): at tiny's width 16 the int8
table has every block slower at int8 than at fp32 (QDQ overhead on 16 channels), so no choice of ops
can be faster at int8 there.

Every architecture is trained on the embedded synthetic set (`mnet train`; the headline picks, whose
drop is reported, for `--epochs`, the others, whose speed is compared, for `--other-epochs`), exported
(`mnet export onnx`) and quantised twice (`mnet calibrate int8`, S8S8 QDQ): every node ONNX Runtime can
quantise (`all_int8`), and with `--keep-fp32 auto` (the shipped variant, the headline): the op types and
Conv nodes that measure slower at int8 on this CPU stay fp32 (calibration/int8.py). The accuracy drop is
measured on the test split (`--n-test` images, not used for checkpoint selection), with the standard
error of the paired difference. Speed: all fp32 and int8 sessions are open at once and timed
interleaved, `--rounds` rounds of `--reps` calls each; the ratio per architecture is the median over
rounds of that round's fp32-median ÷ int8-median (a paired ratio, so load from a neighbour hits both
alike), pooled over `--timing-runs` runs with fresh sessions: on this shared machine one run's ratio for
the same bundle sat 0.18 from another's an hour later (`run_to_run_spread` says how far apart the runs
were this time).

The tables' per-op fp32/int8 ratios (p50 ÷ p50, per kernel/dilation and resolution) are reported
as they are: they say which ops ORT runs faster at int8 on this CPU.

    python bench/int8_search.py [--route both|search|tables] [--search-seeds 3] [--width 256] [--epochs 12]
                                [--other-epochs 1] [--lr 0.02] [--n-train 1200] [--n-test 2000] [--random 8]
                                [--rounds 21] [--reps 30] [--timing-runs 3] [--work DIR] [--name NAME] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import emit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration.predictor import LatencyPredictor  # noqa: E402
from mnet.arch import Arch, build_space  # noqa: E402
from mnet.bundle import load_bundle  # noqa: E402
from mnet.latency_table import arch_blocks  # noqa: E402
from mnet.runtime.backends import open_backend  # noqa: E402

TARGET_RATIO, TARGET_DROP = 1.5, 0.5


def _mnet(*args: str, log: Path) -> None:
    """Run one CLI step; its output goes to `log` (shown on failure)."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ mnet {' '.join(args)}\n")
        f.flush()
        r = subprocess.run([sys.executable, "-m", "mnet", *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"  mnet {args[0]} {args[1] if len(args) > 1 else ''} ... {time.time() - t0:.0f}s", flush=True)
    if r.returncode:
        sys.stderr.write(Path(log).read_text()[-3000:])
        raise SystemExit(f"mnet {' '.join(args)} failed (exit {r.returncode}); see {log}")


def _per_op_ratios(t32: dict, t8: dict) -> dict:
    """fp32 p50 ÷ int8 p50 for every block both tables have, and per op (kernel/dilation) as the geometric
    mean over resolutions."""
    by_block = {k: t32["entries"][k]["p50_ms"] / t8["entries"][k]["p50_ms"]
                for k in sorted(t32["entries"]) if k in t8["entries"] and t8["entries"][k]["p50_ms"] > 0}
    per_op: dict[str, list[float]] = {}
    for k, r in by_block.items():
        if k.startswith("op:"):
            per_op.setdefault(k.split(":")[1], []).append(r)
    geo = {op: float(np.exp(np.mean(np.log(v)))) for op, v in per_op.items()}
    return {"by_block": by_block, "by_op_geomean": dict(sorted(geo.items(), key=lambda kv: -kv[1]))}


def _time_once(bundles: dict[str, Path], hw: tuple[int, int], threads: int, rounds: int,
               reps: int) -> dict[tuple, list[float]]:
    """One timing run: fresh fp32 and int8 sessions of every bundle, timed interleaved; per-round medians (ms)."""
    x = np.random.default_rng(0).standard_normal((1, 3, *hw)).astype(np.float32)
    sessions = {}
    for name, b in bundles.items():
        for prec in ("fp32", "int8"):
            sessions[(name, prec)] = open_backend(b, "onnxruntime", prec, providers="cpu", threads=threads)
    for be in sessions.values():  # warm-up
        for _ in range(10):
            be.infer(x)
    ms: dict[tuple, list[float]] = {k: [] for k in sessions}
    for r in range(rounds):
        keys = list(sessions)
        random.Random(r).shuffle(keys)  # no fixed order within a round
        for k in keys:
            be, t = sessions[k], []
            for _ in range(reps):
                t0 = time.perf_counter()
                be.infer(x)
                t.append(time.perf_counter() - t0)
            ms[k].append(1e3 * statistics.median(t))
    for be in sessions.values():
        be.close()
    return ms


def _time_pairs(bundles: dict[str, Path], hw: tuple[int, int], threads: int, rounds: int, reps: int,
                runs: int = 1) -> dict:
    """`runs` timing runs (fresh sessions each: a session's own memory layout can make it steadily faster or
    slower); per arch the median of all rounds' paired fp32 ÷ int8 ratios, and each run's median."""
    per_run = [_time_once(bundles, hw, threads, rounds, reps) for _ in range(runs)]
    out = {}
    for name in bundles:
        f = [v for ms in per_run for v in ms[(name, "fp32")]]
        q = [v for ms in per_run for v in ms[(name, "int8")]]
        out[name] = {"fp32_ms": statistics.median(f), "int8_ms": statistics.median(q),
                     "int8_over_fp32": statistics.median(a / b for a, b in zip(f, q, strict=True)),
                     "int8_over_fp32_rounds": [a / b for a, b in zip(f, q, strict=True)],
                     "int8_over_fp32_by_run": [statistics.median(a / b for a, b in zip(ms[(name, "fp32")],
                                                                                      ms[(name, "int8")],
                                                                                      strict=True))
                                               for ms in per_run]}
    return out


def _best_dev_accuracy(run: Path) -> float | None:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return max((r["dev_acc"] for r in rows), default=None)


def _majority_share(data: Path, split: str) -> float:
    """The accuracy of always answering the split's most common class (what an untrained model scores)."""
    counts = json.loads((data / "synth.json").read_text())["label_counts"][split]
    return max(counts.values()) / sum(counts.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--width", type=int, default=256, help="channels (tiny's 16 makes every op slower at int8)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--also-width", type=int, default=16,
                   help="also measure both tables at this width and report their per-op ratios (0: skip)")
    p.add_argument("--n-train", type=int, default=1200)
    p.add_argument("--n-dev", type=int, default=300, help="checkpoint selection during training")
    p.add_argument("--n-test", type=int, default=2000, help="the int8 accuracy drop is measured here")
    p.add_argument("--epochs", type=int, default=12,
                   help="training of the int8-table pick (its drop is the headline)")
    p.add_argument("--other-epochs", type=int, default=1,
                   help="training of the other archs (their speed is compared; their drop is from this model)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--any", action="store_true", help="also build a random arch under the int8 budget")
    p.add_argument("--supernet-epochs", type=int, default=2)
    p.add_argument("--controller-steps", type=int, default=60)
    p.add_argument("--derive-samples", type=int, default=20)
    p.add_argument("--budget-percentile", type=float, default=10.0,
                   help="the budget: this percentile of the table's predicted latency over uniform archs")
    p.add_argument("--random", type=int, default=8, help="uniform archs to compare with (default 8)")
    p.add_argument("--route", choices=("both", "search", "tables"), default="both",
                   help="search: `mnet search` under the int8 table and `mnet research` under the fp32 table, per "
                        "search seed; tables: rank uniform archs with the two tables; both (default)")
    p.add_argument("--search-seeds", type=int, default=3, help="ENAS searches (seeds 0..N-1) on the search route")
    p.add_argument("--samples", type=int, default=2000, help="uniform archs ranked with the tables")
    p.add_argument("--calib", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--timing-runs", type=int, default=3,
                   help="timing runs, each with fresh sessions (one run's ratio can sit 0.1-0.2 off another's)")
    p.add_argument("--work", type=Path, default=None, help="keep intermediate files here (reused when present)")
    p.add_argument("--name", default="int8_search", help="write bench/results/NAME.json (e.g. another preset's run)")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    logging.disable(logging.WARNING)
    t_start = time.time()
    work = a.work or Path(tempfile.mkdtemp(prefix="int8_search_"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "steps.log"
    space_opts = ["--preset", a.preset, "--width", str(a.width)] + (["--layers", str(a.layers)] if a.layers else [])
    space = build_space(a.preset, width=a.width, layers=a.layers)

    data = work / "data"
    if not (data / "train").exists():
        _mnet("data", "synth", str(data), "--n-train", str(a.n_train), "--n-dev", str(a.n_dev),
              "--n-test", str(a.n_test), "--seed", "0", log=log)

    tables = {}
    for prec in ("fp32", "int8"):
        t = work / f"latency_{prec}.json"
        if not t.exists() or not json.loads(t.read_text()).get("complete"):
            _mnet("calibrate", "latency", *space_opts, "--precision", prec, "--threads", str(a.threads),
                  "--out", str(t), log=log)
        tables[prec] = t
    tj = {k: json.loads(v.read_text()) for k, v in tables.items()}
    pred = {k: LatencyPredictor.from_file(v) for k, v in tables.items()}
    ops = _per_op_ratios(tj["fp32"], tj["int8"])
    other = None
    if a.also_width:
        ow = {}
        for prec in ("fp32", "int8"):
            t = work / f"latency_w{a.also_width}_{prec}.json"
            if not t.exists() or not json.loads(t.read_text()).get("complete"):
                _mnet("calibrate", "latency", "--preset", a.preset, "--width", str(a.also_width), "--precision", prec,
                      "--threads", str(a.threads), "--out", str(t), log=log)
            ow[prec] = json.loads(t.read_text())
        r = _per_op_ratios(ow["fp32"], ow["int8"])
        other = {"width": a.also_width, "blocks_faster_at_int8": sum(v > 1 for v in r["by_block"].values()),
                 "blocks": len(r["by_block"]), "by_op_geomean": r["by_op_geomean"]}

    # uniform archs ranked by the tables (budgets, and the "direct" route)
    rng = random.Random(1234)
    pool = [space.sample(rng) for _ in range(a.samples)]
    p8 = np.array([pred["int8"].predict_ms(x) for x in pool])
    p32 = np.array([pred["fp32"].predict_ms(x) for x in pool])
    raw8 = np.array([pred["int8"].raw_ms(x) for x in pool])
    raw32 = np.array([pred["fp32"].raw_ms(x) for x in pool])
    budget8 = float(np.percentile(p8, a.budget_percentile))
    budget32 = float(np.percentile(p32, a.budget_percentile))

    archs: dict[str, Arch] = {}
    how: dict[str, str] = {}
    under8 = [i for i in range(len(pool)) if p8[i] <= budget8]
    under32 = [i for i in range(len(pool)) if p32[i] <= budget32]
    ratio_raw = raw32 / raw8  # the tables' predicted fp32/int8 ratio (raw sums: a 10-network correction is noisy)
    if a.route in ("search", "both"):
        # what the issue asks for: the architecture ENAS finds with the int8 table as its latency model (a hard
        # budget: reward = accuracy under it), and on the same supernet with the fp32 table, per search seed
        for seed in range(a.search_seeds):
            s8, s32 = work / f"search_int8_s{seed}", work / f"search_fp32_s{seed}"
            if not (s8 / "arch.json").exists():
                _mnet("search", str(data), *space_opts, "--out", str(s8), "--supernet-epochs", str(a.supernet_epochs),
                      "--controller-steps", str(a.controller_steps), "--derive-samples", str(a.derive_samples),
                      "--latency-table", str(tables["int8"]), "--latency-budget-ms", f"{budget8:.4f}",
                      "--latency-mode", "hard", "--device", "cpu", "--seed", str(seed), log=log)
            if not (s32 / "arch.json").exists():
                _mnet("research", str(s8), "--latency-table", str(tables["fp32"]), "--latency-budget-ms",
                      f"{budget32:.4f}", "--latency-mode", "hard", "--controller-steps", str(a.controller_steps),
                      "--derive-samples", str(a.derive_samples), "--device", "cpu", "--out", str(s32), log=log)
            archs[f"int8_search_s{seed}"] = Arch.from_json(json.loads((s8 / "arch.json").read_text()))
            how[f"int8_search_s{seed}"] = (f"mnet search --seed {seed}, int8 table, hard budget {budget8:.3f} ms "
                                           f"(p{a.budget_percentile:g})")
            archs[f"fp32_search_s{seed}"] = Arch.from_json(json.loads((s32 / "arch.json").read_text()))
            how[f"fp32_search_s{seed}"] = (f"mnet research on seed {seed}'s supernet, fp32 table, hard budget "
                                           f"{budget32:.3f} ms")
    if a.route in ("tables", "both"):
        # the tables used directly on `--samples` uniform archs. A hard-budget search rewards accuracy alone
        # under the budget, so what the int8 table contributes is the set of archs under its budget; among
        # them we take the one the tables predict gains most at int8, and (for reference) a random one.
        best = max(under8, key=lambda i: ratio_raw[i])
        archs["int8_table"] = pool[best]
        how["int8_table"] = (f"highest predicted fp32/int8 ({ratio_raw[best]:.2f}) of the {len(under8)} archs under "
                             f"the int8 budget {budget8:.3f} ms (p{a.budget_percentile:g} of {a.samples} uniform)")
        pick = random.Random(11)
        i8 = pick.choice(under8)
        if a.any:
            archs["int8_table_any"] = pool[i8]
            how["int8_table_any"] = f"a random one of the {len(under8)} archs under the int8 budget"
        i32 = pick.choice(under32)
        archs["fp32_table"] = pool[i32]
        how["fp32_table"] = (f"a random one of the {len(under32)} archs under the fp32 budget {budget32:.3f} ms "
                             f"(p{a.budget_percentile:g}); a hard-budget search picks by accuracy among them")
    rr = random.Random(7)
    for i in range(a.random):
        archs[f"random_{i}"] = space.sample(rr)
        how[f"random_{i}"] = "uniform"

    bundles, info = {}, {}
    for name, arch in archs.items():
        run, bundle, bundle_all = work / f"run_{name}", work / f"bundle_{name}", work / f"bundle_{name}_all_int8"
        aj = work / f"arch_{name}.json"
        aj.write_text(json.dumps(arch.to_json()))
        epochs = a.epochs if name == "int8_table" or name.startswith("int8_search_") else a.other_epochs
        if not (run / "best.pt").exists():
            _mnet("train", str(data), "--arch", str(aj), "--out", str(run), "--epochs", str(epochs),
                  "--lr", str(a.lr), "--batch-size", str(a.batch_size), "--device", "cpu", "--seed", "0", log=log)
        if not (bundle / "model.onnx").exists():
            _mnet("export", "onnx", str(run / "best.pt"), "--out", str(bundle), "--parity-images", "8", "--force",
                  log=log)
        if not (bundle_all / "model.int8.onnx").exists():
            shutil.rmtree(bundle_all, ignore_errors=True)
            shutil.copytree(bundle, bundle_all, ignore=shutil.ignore_patterns("model.int8.onnx"))
            _mnet("calibrate", "int8", str(bundle_all), str(data), "--samples", str(a.calib), "--split", "test",
                  log=log)
        if not (bundle / "model.int8.onnx").exists():
            _mnet("calibrate", "int8", str(bundle), str(data), "--samples", str(a.calib), "--split", "test",
                  "--keep-fp32", "auto", "--threads", str(a.threads), log=log)
        m = load_bundle(bundle).card.metrics["int8"]
        m_all = load_bundle(bundle_all).card.metrics["int8"]
        bundles[name], bundles[f"{name}/all_int8"] = bundle, bundle_all
        kept = m.get("keep_fp32", {})
        info[name] = {"how": how[name], "layers": [[x.kernel, x.dilation, x.skip] for x in arch.layers],
                      "params": arch.num_params(), "macs": arch.macs(), "epochs": epochs,
                      "predicted_int8_ms": pred["int8"].predict_ms(arch),
                      "predicted_fp32_ms": pred["fp32"].predict_ms(arch),
                      "predicted_fp32_over_int8_raw": pred["fp32"].raw_ms(arch) / pred["int8"].raw_ms(arch),
                      "checkpoint_dev_accuracy": _best_dev_accuracy(run),
                      "eval_split": m.get("split"), "n_eval": m.get("n"),
                      "fp32_accuracy": m.get("fp32_accuracy"), "int8_accuracy": m.get("accuracy"),
                      "int8_drop_points": m.get("drop_points"), "int8_drop_se_points": m.get("drop_se_points"),
                      "top1_agreement": m.get("top1_agreement"),
                      "all_int8_accuracy": m_all.get("accuracy"), "all_int8_drop_points": m_all.get("drop_points"),
                      "all_int8_drop_se_points": m_all.get("drop_se_points"),
                      "kept_fp32": {"op_types": kept.get("op_types"), "nodes": kept.get("nodes"),
                                    "trials": kept.get("trials"),
                                    "calibration_ms": {k: kept.get(k) for k in ("fp32_ms", "all_int8_ms", "int8_ms")}},
                      "tensorrt_compatible": m.get("tensorrt_compatible"),
                      "blocks": len(arch_blocks(arch))}

    print(f"  timing {len(archs)} archs × fp32/int8/all-int8, {a.timing_runs} runs × {a.rounds} rounds × {a.reps} "
          "calls ...", flush=True)
    timing = _time_pairs(bundles, space.input_hw, a.threads, a.rounds, a.reps, a.timing_runs)
    for name in info:
        info[name].update(timing[name])
        t_all = timing[f"{name}/all_int8"]
        info[name].update({"all_int8_ms": t_all["int8_ms"], "all_int8_over_fp32": t_all["int8_over_fp32"],
                           "all_int8_over_fp32_rounds": t_all["int8_over_fp32_rounds"],
                           "all_int8_over_fp32_by_run": t_all["int8_over_fp32_by_run"]})

    def stats(names: list[str], key: str) -> dict:
        v = [info[n][key] for n in names]
        return {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "min": min(v),
                "values": v}

    spread = [max(info[n]["int8_over_fp32_by_run"]) - min(info[n]["int8_over_fp32_by_run"]) for n in info]
    randoms = [n for n in archs if n.startswith("random_")]
    searched = [n for n in archs if n.startswith("int8_search_")]
    # the headline: the archs ENAS found under the int8 table (one per search seed), else the tables' pick
    heads = searched or ["int8_table"]
    ratio, ratio_all = stats(heads, "int8_over_fp32"), stats(heads, "all_int8_over_fp32")
    drops = [info[n]["int8_drop_points"] for n in heads]
    ok = [info[n]["int8_over_fp32"] >= TARGET_RATIO and info[n]["int8_drop_points"] is not None
          and info[n]["int8_drop_points"] <= TARGET_DROP for n in heads]
    rnd, rnd_all = stats(randoms, "int8_over_fp32"), stats(randoms, "all_int8_over_fp32")
    rnd_drop = [info[n]["int8_drop_points"] for n in randoms]
    ref = [n for n in archs if n.startswith("fp32_search_")] or ["fp32_table"]

    def table_pick(name: str) -> dict | None:
        if name not in info:
            return None
        x = info[name]
        return {"int8_over_fp32": x["int8_over_fp32"], "int8_over_fp32_all_int8": x["all_int8_over_fp32"],
                "int8_drop_points": x["int8_drop_points"], "int8_drop_se_points": x["int8_drop_se_points"],
                "fp32_accuracy": x["fp32_accuracy"], "int8_accuracy": x["int8_accuracy"], "epochs": x["epochs"]}

    result = {
        "what": ("INT8 vs fp32 speed (ORT CPU) of the archs ENAS finds under an int8 latency table (one per search "
                 "seed) vs under the fp32 table vs uniform archs, quantised with the nodes slower at int8 kept fp32 "
                 f"(--keep-fp32 auto) and fully; also the arch the tables pick directly; {space.name} space at "
                 f"width {space.width}, synthetic mangoes"),
        "route": {"both": "mnet search + mnet research per seed, and the tables directly",
                  "search": "mnet search (int8 table) + mnet research (fp32 table) on the same supernet, per seed",
                  "tables": "tables directly: uniform archs ranked by predicted int8 latency and predicted fp32/int8",
                  }[a.route],
        "headline": "mnet search under the int8 table, per seed" if searched else "the int8 table's direct pick",
        "space": space.describe(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                     if k not in ("work", "name")},
        "budgets_ms": {"int8": budget8, "fp32": budget32, "percentile": a.budget_percentile},
        "tables": {k: {"fingerprint": pred[k].table.fingerprint, "correction": tj[k]["correction"]} for k in tj},
        "headline_archs": heads,
        "int8_over_fp32": ratio["mean"],
        "int8_over_fp32_std": ratio["std"],
        "int8_over_fp32_min": ratio["min"],
        "int8_over_fp32_values": ratio["values"],
        "int8_over_fp32_by_run": {n: info[n]["int8_over_fp32_by_run"] for n in heads},
        # how far one timing run's ratio can sit from another's for the same bundle (max - min over runs)
        "run_to_run_spread": {"median": statistics.median(spread), "max": max(spread)},
        "int8_drop_points": statistics.mean(drops) if None not in drops else None,
        "int8_drop_points_max": max(drops) if None not in drops else None,
        "int8_drop_points_values": drops,
        "int8_drop_se_points_values": [info[n]["int8_drop_se_points"] for n in heads],
        "accuracy": {"split": info[heads[0]]["eval_split"], "n": info[heads[0]]["n_eval"], "epochs": a.epochs,
                     "lr": a.lr, "n_train": a.n_train,
                     "fp32_mean": statistics.mean(info[n]["fp32_accuracy"] for n in heads),
                     "int8_mean": statistics.mean(info[n]["int8_accuracy"] for n in heads),
                     "fp32": [info[n]["fp32_accuracy"] for n in heads],
                     "int8": [info[n]["int8_accuracy"] for n in heads],
                     "all_int8": [info[n]["all_int8_accuracy"] for n in heads],
                     "majority_class": _majority_share(data, info[heads[0]]["eval_split"])},
        "kept_fp32": {n: {"op_types": info[n]["kept_fp32"]["op_types"], "nodes": info[n]["kept_fp32"]["nodes"]}
                      for n in heads},
        "int8_over_fp32_all_int8": ratio_all["mean"],
        "int8_over_fp32_all_int8_std": ratio_all["std"],
        "fp32_table_archs": ref,
        "int8_over_fp32_fp32_table": stats(ref, "int8_over_fp32"),
        "int8_over_fp32_fp32_table_all_int8": stats(ref, "all_int8_over_fp32"),
        "int8_drop_points_fp32_table": [info[n]["int8_drop_points"] for n in ref],
        "tables_pick": table_pick("int8_table") if searched else None,
        "tables_pick_fp32": table_pick("fp32_table") if searched else None,
        "int8_over_fp32_random": rnd,
        "int8_over_fp32_random_mean": rnd["mean"],
        "int8_over_fp32_random_std": rnd["std"],
        "int8_over_fp32_random_all_int8": rnd_all,
        "int8_drop_points_random_mean": statistics.mean(rnd_drop) if None not in rnd_drop else None,
        "int8_over_fp32_int8_budget_any": info["int8_table_any"]["int8_over_fp32"] if "int8_table_any" in info
        else None,
        "targets": {"int8_over_fp32": f">= {TARGET_RATIO} for every headline arch",
                    "int8_drop_points": f"<= {TARGET_DROP} for every headline arch"},
        "headline_archs_meeting_target": sum(ok),
        "meets_target": all(ok),
        "shortfall_ratio": max(0.0, TARGET_RATIO - ratio["min"]),
        "per_op_fp32_over_int8": ops,
        "blocks_faster_at_int8": sum(v > 1 for v in ops["by_block"].values()),
        "per_op_fp32_over_int8_other_width": other,
        "archs": info,
        "wall_s": time.time() - t_start,
    }
    if a.no_write:
        print(json.dumps(result, indent=2))
    else:
        emit(a.name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
