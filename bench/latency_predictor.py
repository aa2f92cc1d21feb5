"""Latency predictor quality: Kendall τ and MAPE of predicted vs measured whole networks.

For onnxruntime CPU and torch CPU at `tiny` and `mnet-24-32` (narrowed with --width for the torch
backend, whose large-kernel depthwise convs are slow on this CPU), measure a table, then check it on
random networks not used for the fit.

    python bench/latency_predictor.py [--archs 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import emit

from mnet.calibration.latency import TimingConfig, check_table, measure_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backends", default="onnxruntime,torch")
    ap.add_argument("--presets", default="tiny,mnet-24-32")
    args = ap.parse_args()
    out = {"threads": args.threads, "archs": args.archs}
    timing = TimingConfig(warmup=5, min_reps=20, min_seconds=0.15)
    with tempfile.TemporaryDirectory() as d:
        for backend in args.backends.split(","):
            for preset in args.presets.split(","):
                if backend == "torch" and preset != "tiny":
                    continue  # PyTorch eager with 39×39 depthwise kernels at width 256 takes minutes per net here
                path = Path(d) / f"{backend}-{preset}.json"
                measure_table(preset, path, backend=backend, threads=args.threads, fit_archs=10, timing=timing)
                r = check_table(path, archs=args.archs, timing=timing, threads=args.threads)
                tag = f"{'ort' if backend == 'onnxruntime' else backend}_{preset.replace('-', '_')}"
                out[f"{tag}_tau"] = r["kendall_tau"]
                out[f"{tag}_mape"] = r["mape"]
                out[f"{tag}_max_rel_error"] = r["max_rel_error"]
    emit("latency_predictor", out)


if __name__ == "__main__":
    main()
