"""`make bench`: run every benchmark on this machine, then regenerate README's Performance table.

Each script prints one JSON object of ratios measured side by side in one run and writes it under
bench/results/; the table below is built from those files only (never typed by hand).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

# script, arguments sized for a 2-core CPU
SCRIPTS = [
    ("cpu_speedups.py", ["--archs", "2", "--reps", "2"]),
    ("supernet_overhead.py", []),
    ("inference.py", []),
    ("latency_predictor.py", []),
    ("runtime.py", []),
    ("faults.py", []),  # issue 14's fault-injection bench: about 1 min (real time: processes, broker, camera)
    ("foreign.py", ["--seeds", "2026,2027"]),  # issue 14 item 13: trains a tiny bundle first (minutes)
    ("live_view.py", []),  # issue 15: the cost of `mnet grade --serve`
    ("lanes.py", []),  # issue 15 item 1: concurrent 30-fps camera lanes in one process (3-4 min)
    ("int8_search.py", []),  # issue 15 item 4: 3 ENAS searches per table, the tables' picks, 8 random archs
    ("search_quality.py", []),
    ("controller_planted.py", []),
    ("search_real.py", []),  # Fashion-MNIST: 83 min here with the ground truth cached in /tmp (cold: about 2 h)
]

# result file → rows of (what, key, target text)
ROWS = {
    "cpu_speedups": [("Supernet/child step, exact crop vs naive full kernels (CPU)", "crop_speedup", None),
                     ("… crop + fast depthwise (conv/dense/FFT by timing) vs naive (CPU)", "crop_fast_speedup", "≥ 3×")],
    "supernet_overhead": [("Weight-sharing overhead: supernet step ÷ standalone child step", "overhead", "≤ 1.10")],
    "inference": [("ORT CPU fp32 vs torch eager, mnet-24-32 batch 1", "ort_over_torch_mnet_24_32_b1", "≥ 10×"),
                  ("ORT INT8 vs fp32, mnet-24-32 batch 1 (random arch, every node int8)", "int8_over_fp32_mnet_24_32_b1",
                   "≥ 1.5×"),
                  ("… the same with nodes slower at int8 kept fp32 (`--keep-fp32 auto`)",
                   "int8_auto_over_fp32_mnet_24_32_b1", None),
                  ("INT8 accuracy drop (points)", "int8_accuracy_drop_points", "≤ 0.5")],
    "latency_predictor": [("Latency predictor Kendall τ, ORT CPU, tiny", "ort_tiny_tau", "≥ 0.9"),
                          ("Latency predictor MAPE, ORT CPU, tiny", "ort_tiny_mape", "≤ 10%"),
                          ("Latency predictor Kendall τ, ORT CPU, mnet-24-32", "ort_mnet_24_32_tau", "≥ 0.9"),
                          ("Latency predictor MAPE, ORT CPU, mnet-24-32", "ort_mnet_24_32_mape", "≤ 10%")],
    "runtime": [("Conveyor runtime processed fps (640×480, mnet-24-32, ORT CPU, 3 views/fruit)", "processed_fps",
                 "≥ 120"),
                ("Runtime ÷ decode-only fps", "ratio_to_decode", "≥ 0.5"),
                ("… best ratio any scheduling could reach on this machine (measured stage costs)",
                 "ratio_bound.value", None),
                ("Runtime frame p99 (ms)", "stages.frame.p99_ms", "≤ 20")],
    "gpu": [("Paper protocol (100 supernet epochs + 5000 controller steps), mnet-24-32, one H100, GPU-hours",
             "sections.search_24x32.paper_protocol_gpu_hours", "≤ 0.05"),
            ("… the same, mnet-120-160 (extrapolated from a short sample)",
             "sections.search_120x160.paper_protocol_gpu_hours", "≤ 1"),
            ("Standalone retrain, 100 epochs, mnet-24-32, GPU-hours", "sections.child_epoch_24x32.paper_train_hours_100_epochs",
             None)],
    "faults": [("Fault injection (backend raise/NaN, broker kill -9, SIGKILL+restart, SIGTERM, full disk, corrupt "
                "video, clock step, camera unplug): rows with 0 keepable lost, 0 duplicates, right exit, no secret",
                "rows_meeting_targets", "all"),
               ("… rows that miss a target", "rows_failing", None)],
    "live_view": [("Live view (--serve) CPU cost per frame, no viewer (%)", "accounted_cost_pct.no_viewer", "≈ 0"),
                  ("… one viewer connected (%)", "accounted_cost_pct.one_viewer", "≤ 5"),
                  ("… 4 lanes, one viewer of the mosaic (%)", "lanes.accounted_cost_pct", "≤ 5")],
    "lanes": [("Concurrent 640×480 30-fps camera lanes graded in one process, no dropped frame, every fruit "
               "(mnet-24-32, ORT CPU, 3 views/fruit)", "lanes", "≥ 8"),
              ("… their aggregate fps", "aggregate_fps", None),
              ("… frame p99 of the slowest lane (ms; every lane's in the JSON)", "frame_p99_ms_max", None),
              ("… batching gain: inference CPU ms per view, one call per crop ÷ shared batched worker",
               "batching_gain.value", None),
              ("… INT8 vs fp32 on those lanes: inference CPU per view, fp32 ÷ int8 (random weights, every node "
               "int8)", "int8_over_fp32", None)],
    "int8_search": [("ORT CPU INT8 vs fp32 of the archs `mnet search` finds under an int8 latency table (tiny "
                     "skeleton, width 256; nodes slower at int8 kept fp32, `--keep-fp32 auto`), mean ± std over "
                     "search seeds", "int8_over_fp32±int8_over_fp32_std", "≥ 1.5× each"),
                    ("… each seed's", "int8_over_fp32_values", None),
                    ("… the same archs with every node int8", "int8_over_fp32_all_int8±int8_over_fp32_all_int8_std",
                     None),
                    ("… their INT8 accuracy drop per seed (points; test split; standard errors in the JSON)",
                     "int8_drop_points_values", "≤ 0.5 each"),
                    ("… their fp32 vs INT8 accuracy, mean of the seeds (majority class in the JSON)",
                     "accuracy.fp32_mean/accuracy.int8_mean", None),
                    ("… archs `mnet research` finds on the same supernets under the fp32 table, mean ± std",
                     "int8_over_fp32_fp32_table.mean±int8_over_fp32_fp32_table.std", None),
                    ("… uniformly random archs, mean ± std (fp32 kept where slower)",
                     "int8_over_fp32_random_mean±int8_over_fp32_random_std", None),
                    ("… uniformly random archs, every node int8",
                     "int8_over_fp32_random_all_int8.mean±int8_over_fp32_random_all_int8.std", None),
                    ("… spread of one timing run's ratio vs another's for the same bundle (max − min over the "
                     "runs; median vs max over archs)", "run_to_run_spread.median/run_to_run_spread.max", None),
                    ("… the int8 table's direct pick (most predicted int8 gain under the budget; "
                     "fp32 kept where slower / every node int8)",
                     "tables_pick.int8_over_fp32/tables_pick.int8_over_fp32_all_int8", None)],
    "foreign": [("Foreign objects rejected (leaves, gloves, stones, packaging; conveyor seed not tuned on)",
                 "foreign_rejected", "≥ 0.9"),
                ("… fruit rejected", "fruit_rejected", "≤ 0.05")],
    "search_quality": [("ENAS pick test accuracy (tiny, synthetic; measured before issue 13's search changes, "
                        "superseded by the Fashion-MNIST rows)", "enas_test_acc", None),
                       ("Random-search pick test accuracy", "random_test_acc", None),
                       ("Kendall τ supernet rank vs standalone", "kendall_tau", None)],
    "controller_planted": [("Planted reward: optimum's ops found by the default controller in 5000 samples (of 4; "
                            "uniform 0.2), mean ± std of 3 seeds", "settings.default.mean_g_mean±settings.default.mean_g_std",
                            None),
                           ("… the paper's setting (1 per update, moving average, lr 0.1)",
                            "settings.paper.mean_g_mean", None)],
    "search_real": [("Fashion-MNIST: Kendall τ supernet vs standalone (n archs below)", "kendall_tau", "≥ 0.6"),
                    ("… its bootstrap 95% CI", "kendall_tau_ci95", None),
                    ("… the highest τ the ground truth's seed noise lets any predictor show",
                     "kendall_tau_ceiling.tau", None),
                    ("… archs retrained standalone (ground truth)", "n_archs", "≥ 30"),
                    ("Fashion-MNIST: ENAS pick test accuracy, mean ± std over seeds",
                     "search_test_acc_mean±search_test_acc_std", "> random by > 1 std"),
                    ("… equal-budget random search pick", "random_test_acc_mean±random_test_acc_std", None),
                    ("… ENAS picks' percentile among the uniform archs, per seed", "search_pick_percentiles",
                     "≥ 90 in 2 of 3"),
                    ("… random-search picks' percentile", "random_pick_percentiles", None),
                    ("… mean test accuracy: final policy samples vs uniform archs",
                     "policy_test_acc_mean/uniform_test_acc_mean", None),
                    ("Fashion-MNIST: found model's test accuracy (search + train)", "fashion_best_test_acc", "≥ 0.925"),
                    ("… its parameters", "fashion_best_params", "≤ 100K"),
                    ("… search + train wall time (s, this CPU)", "fashion_wall_s", "≤ 3600"),
                    ("… a 2-conv CNN trained for the same wall time", "fashion_two_conv_same_wall_test_acc",
                     "below the found model")],
}

BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _get(data: dict, key: str):
    value = data
    for part in key.split("."):  # dotted keys reach into nested results
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _value(data: dict, key: str) -> str | None:
    """`a±b` renders "a ± b" (mean ± std), `a/b` renders "a vs b"; None when a part is missing."""
    for sep, shown in (("±", " ± "), ("/", " vs ")):
        if sep in key:
            parts = [_get(data, k) for k in key.split(sep)]
            return None if None in parts else shown.join(_fmt(p) for p in parts)
    value = _get(data, key)
    if value is None:  # a key the bench wrote as null was left out of that run (say so); a missing one is not shown
        return "not measured" if key.split(".")[0] in data else None
    return _fmt(value)


def table() -> str:
    lines = ["| measurement | value | target | from |", "|---|---|---|---|"]
    for name, rows in ROWS.items():
        f = RESULTS / f"{name}.json"
        if not f.exists():
            continue
        data = json.loads(f.read_text())
        for what, key, target in rows:
            value = _value(data, key)
            if value is not None:
                lines.append(f"| {what} | {value} | {target or ''} | `bench/results/{name}.json` |")
    return "\n".join(lines)


def update_readme() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text:
        return
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")


def main() -> int:
    only = set(sys.argv[1:])
    failed = []
    for script, args in SCRIPTS:
        if only and script not in only:
            continue
        if not (HERE / script).exists():
            continue
        print(f"== {script}", flush=True)
        r = subprocess.run([sys.executable, str(HERE / script), *args], cwd=HERE, check=False)
        if r.returncode:
            failed.append(script)
    update_readme()
    print(table())
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
