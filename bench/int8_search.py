"""Does a latency table measured at INT8 make the search find architectures that are fast at INT8?

Issue 15, item 4: on ONNX Runtime CPU INT8 is only ~1.07× fp32 for a random mnet-24-32 architecture
(ORT's int8 depthwise kernels for large kernels are slow). This bench measures, on one small space,
the INT8/fp32 speed ratio (ORT CPU, 1 thread) and the INT8 accuracy drop of:

  (a) `int8_table`: an architecture chosen with the INT8 latency table (`mnet calibrate latency
      --precision int8`) under a tight INT8 budget (the 10th percentile of its predictions);
  (b) `fp32_table`: one chosen with the fp32 table under a budget at the same percentile;
  (c) `--random` uniformly random architectures.

Two routes. `--route search`: (a) is `mnet search --latency-table int8.json --latency-budget-ms B
--latency-mode hard`, (b) `mnet research` on its supernet with the fp32 table. `--route tables` (the
default: at width 256 the supernet alone takes far longer than this bench's time box on a 2-core CPU):
`--samples` uniform archs are ranked with the two tables; a hard budget makes the search's reward
accuracy alone under the budget, so (a) is the arch the tables predict gains most at int8
(fp32 ÷ int8 of the blocks' sums) among those under the int8 budget, `int8_table_any` a random one
under that budget, and (b) a random one under the fp32 budget.

Width: the tiny skeleton (4 layers, 24×32) at width 256 (mnet-24-32's): at tiny's width 16 the int8
table has every block slower at int8 than at fp32 (QDQ overhead on 16 channels), so no choice of ops
can be faster at int8 there.

Every architecture is trained on the embedded synthetic set (`mnet train`; the int8-table pick, whose
drop is the headline, for `--epochs`, the others, whose speed is compared, for `--other-epochs`), exported
(`mnet export onnx`) and quantised twice (`mnet calibrate int8`, S8S8 QDQ): every node ONNX Runtime can
quantise (`all_int8`), and with `--keep-fp32 auto` (the shipped variant, the headline): the op types and
Conv nodes that measure slower at int8 on this CPU stay fp32 (calibration/int8.py). The accuracy drop is
measured on the test split (`--n-test` images, not used for checkpoint selection), with the standard
error of the paired difference. Speed: all fp32 and int8 sessions are open at once and timed
interleaved, `--rounds` rounds of `--reps` calls each; the ratio per architecture is the median over
rounds of that round's fp32-median ÷ int8-median (a paired ratio, so load from a neighbour hits both
alike).

The tables' per-op fp32/int8 ratios (p50 ÷ p50, per kernel/dilation and resolution) are reported
as they are: they say which ops ORT runs faster at int8 on this CPU.

    python bench/int8_search.py [--route tables|search] [--width 256] [--epochs 12] [--other-epochs 1] [--lr 0.02]
                                [--n-train 1200] [--n-test 2000] [--random 8] [--rounds 21] [--reps 30] [--work DIR]
                                [--no-write]
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


def _time_pairs(bundles: dict[str, Path], hw: tuple[int, int], threads: int, rounds: int, reps: int) -> dict:
    """Interleaved timing of every bundle's fp32 and int8 sessions: per-round medians, paired ratios."""
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
    out = {}
    for name in bundles:
        f, q = ms[(name, "fp32")], ms[(name, "int8")]
        out[name] = {"fp32_ms": statistics.median(f), "int8_ms": statistics.median(q),
                     "int8_over_fp32": statistics.median(a / b for a, b in zip(f, q, strict=True)),
                     "int8_over_fp32_rounds": [a / b for a, b in zip(f, q, strict=True)]}
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
    p.add_argument("--route", choices=("tables", "search"), default="tables",
                   help="tables: rank uniform archs with the two tables (minutes); search: mnet search + research "
                        "(too slow at width 256 on a 2-core CPU)")
    p.add_argument("--samples", type=int, default=2000, help="uniform archs ranked with the tables")
    p.add_argument("--calib", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--work", type=Path, default=None, help="keep intermediate files here (reused when present)")
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
    if a.route == "search":
        s8, s32 = work / "search_int8", work / "search_fp32"
        if not (s8 / "arch.json").exists():
            _mnet("search", str(data), *space_opts, "--out", str(s8), "--supernet-epochs", str(a.supernet_epochs),
                  "--controller-steps", str(a.controller_steps), "--derive-samples", str(a.derive_samples),
                  "--latency-table", str(tables["int8"]), "--latency-budget-ms", f"{budget8:.4f}",
                  "--latency-mode", "hard", "--device", "cpu", log=log)
        if not (s32 / "arch.json").exists():
            _mnet("research", str(s8), "--latency-table", str(tables["fp32"]), "--latency-budget-ms",
                  f"{budget32:.4f}", "--latency-mode", "hard", "--controller-steps", str(a.controller_steps),
                  "--derive-samples", str(a.derive_samples), "--device", "cpu", "--out", str(s32), log=log)
        archs["int8_table"] = Arch.from_json(json.loads((s8 / "arch.json").read_text()))
        how["int8_table"] = f"mnet search, int8 table, hard budget {budget8:.3f} ms (p{a.budget_percentile:g})"
        archs["fp32_table"] = Arch.from_json(json.loads((s32 / "arch.json").read_text()))
        how["fp32_table"] = f"mnet research on the same supernet, fp32 table, hard budget {budget32:.3f} ms"
    else:
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
        epochs = a.epochs if name == "int8_table" else a.other_epochs
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

    print(f"  timing {len(archs)} archs × fp32/int8/all-int8, {a.rounds} rounds × {a.reps} calls ...", flush=True)
    timing = _time_pairs(bundles, space.input_hw, a.threads, a.rounds, a.reps)
    for name in info:
        info[name].update(timing[name])
        t_all = timing[f"{name}/all_int8"]
        info[name].update({"all_int8_ms": t_all["int8_ms"], "all_int8_over_fp32": t_all["int8_over_fp32"],
                           "all_int8_over_fp32_rounds": t_all["int8_over_fp32_rounds"]})

    def random_stats(key: str) -> dict:
        v = [info[n][key] for n in archs if n.startswith("random_")]
        return {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}

    rnd, rnd_all = random_stats("int8_over_fp32"), random_stats("all_int8_over_fp32")
    rnd_drop = [info[n]["int8_drop_points"] for n in archs if n.startswith("random_")]
    head = info["int8_table"]
    ratio, drop = head["int8_over_fp32"], head["int8_drop_points"]
    meets = bool(ratio >= TARGET_RATIO and drop is not None and drop <= TARGET_DROP)
    result = {
        "what": ("INT8 vs fp32 speed (ORT CPU) of an arch chosen under an int8 latency table vs one chosen under "
                 "the fp32 table vs uniform archs, quantised with the nodes slower at int8 kept fp32 (--keep-fp32 "
                 "auto) and fully; tiny skeleton at width 256, synthetic mangoes"),
        "route": ("mnet search (int8 table) + mnet research (fp32 table) on the same supernet" if a.route == "search"
                  else "tables directly: uniform archs ranked by predicted int8 latency and predicted fp32/int8"),
        "space": space.describe(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "work"},
        "budgets_ms": {"int8": budget8, "fp32": budget32, "percentile": a.budget_percentile},
        "tables": {k: {"fingerprint": pred[k].table.fingerprint, "correction": tj[k]["correction"]} for k in tj},
        "int8_over_fp32": ratio,
        "int8_drop_points": drop,
        "int8_drop_se_points": head["int8_drop_se_points"],
        "int8_drop_ci95_points": [drop - 1.96 * head["int8_drop_se_points"], drop + 1.96 * head["int8_drop_se_points"]],
        "accuracy": {"split": head["eval_split"], "n": head["n_eval"], "epochs": a.epochs, "lr": a.lr,
                     "n_train": a.n_train, "fp32": head["fp32_accuracy"], "int8": head["int8_accuracy"],
                     "all_int8": head["all_int8_accuracy"],
                     "majority_class": _majority_share(data, head["eval_split"])},
        "kept_fp32": {"op_types": head["kept_fp32"]["op_types"], "nodes": head["kept_fp32"]["nodes"]},
        "int8_over_fp32_all_int8": head["all_int8_over_fp32"],
        "int8_drop_points_all_int8": head["all_int8_drop_points"],
        "int8_over_fp32_fp32_table": info["fp32_table"]["int8_over_fp32"],
        "int8_over_fp32_fp32_table_all_int8": info["fp32_table"]["all_int8_over_fp32"],
        "int8_drop_points_fp32_table": info["fp32_table"]["int8_drop_points"],
        "int8_over_fp32_random": rnd,
        "int8_over_fp32_random_mean": rnd["mean"],
        "int8_over_fp32_random_std": rnd["std"],
        "int8_over_fp32_random_all_int8": rnd_all,
        "int8_drop_points_random_mean": statistics.mean(rnd_drop) if None not in rnd_drop else None,
        "int8_over_fp32_int8_budget_any": info["int8_table_any"]["int8_over_fp32"] if "int8_table_any" in info
        else None,
        "targets": {"int8_over_fp32": f">= {TARGET_RATIO}", "int8_drop_points": f"<= {TARGET_DROP}"},
        "meets_target": meets,
        "shortfall_ratio": None if meets else TARGET_RATIO - ratio,
        "per_op_fp32_over_int8": ops,
        "blocks_faster_at_int8": sum(v > 1 for v in ops["by_block"].values()),
        "per_op_fp32_over_int8_other_width": other,
        "archs": info,
        "wall_s": time.time() - t_start,
    }
    if a.no_write:
        print(json.dumps(result, indent=2))
    else:
        emit("int8_search", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
