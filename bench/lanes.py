"""How many conveyor cameras one grading process keeps up with on this CPU (issue 15 item 1).

Each lane is a 640x480 30-fps "camera": a synthetic conveyor clip played in real time through the
live-source path (runtime/sources.py's capture thread keeps only the newest frame, so a frame the
grader has not taken when the next one arrives is dropped and counted, as with a real camera; each
lane decodes its own copy of the clip, as an RTSP camera would need). All lanes are graded by
runtime/lanes.py in one process: a lane thread each, one batched inference worker, a mnet-24-32-preset
model with random weights (as bench/runtime.py builds it) on onnxruntime CPU, 3 views per fruit.
Lanes 1, 2, 4, 8, 16, ... are tried until a lane drops a frame, skips a view or misses a fruit; the
largest count that passed is `lanes` (goal >= 8), with its aggregate fps and each lane's frame p99.
Lanes start a fraction of a frame apart and alternate two clips, so fruit do not arrive in lockstep.

batching_gain: the same lanes at camera pace with one backend call per crop (max batch 1) instead of
the shared batched worker: inference milliseconds per view, per-crop over batched (and whether the
per-crop run still kept up). Also flat out (clips read as files, as fast as the lanes go): aggregate
fps batched over per-crop.

    python bench/lanes.py                  # -> bench/results/lanes.json (about 3-4 min on 2 cores)
    python bench/lanes.py --max-lanes 8 --fruits 8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from _common import emit, timeit
from mnet.runtime.grader import GradeConfig
from mnet.runtime.lanes import LaneSpec, grade_lanes
from mnet.runtime.sinks import Sinks
from runtime import _OrtBackend, _random_bundle, _random_tiny_onnx  # bench/runtime.py: the same models

from mnet.conveyor import make_conveyor_video
from mnet.preprocess import Preprocess

CLASSES = ["A", "B", "C"]
FPS = 30.0
TARGETS = {"lanes": 8}


class _Camera:
    """A clip played at FPS in real time, starting `phase_s` after `go` is set; read() fails at its end
    (the lane's source then ends: max_reconnects=0)."""

    def __init__(self, video: Path, go: threading.Event, phase_s: float) -> None:
        self.cap, self.go, self.phase_s = cv2.VideoCapture(str(video)), go, phase_s
        self.t0: float | None = None
        self.i = 0

    def isOpened(self) -> bool:
        return self.cap.isOpened()

    def set(self, *a) -> bool:
        return True

    def get(self, prop: int) -> float:
        return FPS if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self):
        ok, frame = self.cap.read()  # decoded before its due time, as a camera exposes before it delivers
        if self.t0 is None:
            self.go.wait()
            self.t0 = time.monotonic() + self.phase_s
        wait = self.t0 + self.i / FPS - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.i += 1
        return ok, frame

    def release(self) -> None:
        self.cap.release()


class _Count:
    name, wants_frames = "count", False

    def __init__(self) -> None:
        self.views: dict[int, dict[int, int]] = {}  # lane → fruit_id → views voted

    def write(self, e) -> None:
        self.views.setdefault(e.lane, {})[e.fruit_id] = e.views

    def close(self) -> None:
        pass


def _baseline_views(backend, preprocess, clip: Path) -> dict[int, int]:
    """Views per fruit when the clip is graded as a file (nothing skipped, nothing dropped)."""
    sink = _Count()
    grade_lanes(backend, preprocess, CLASSES, [LaneSpec("file", str(clip))], GradeConfig(), Sinks([sink]))
    return sink.views[0]


def _paced(n: int, backend, preprocess, clips, max_batch: int | None = None) -> dict:
    """n camera lanes at FPS until their clips end; what each lane kept up with: every frame, every fruit,
    and every fruit its full views (those it gets from the file; a live lane may skip an optional view
    while the worker is busy and take it a few frames later, which costs nothing)."""
    from mnet.runtime.sources import open_source

    go = threading.Event()
    cams = {}

    def factory(target, api):
        cams[target] = _Camera(clips[target % len(clips)][0], go, target / n / FPS)
        return cams[target]

    # Opened here (max_reconnects=0: the clip's end ends the lane), played once every lane is waiting.
    sources = [open_source(str(k), fps_limit=None, timeout_s=0.5, max_reconnects=0, open_timeout_s=0,
                           capture_factory=factory) for k in range(n)]
    threading.Timer(1.0, go.set).start()
    sink = _Count()
    try:
        s = grade_lanes(backend, preprocess, CLASSES, [LaneSpec(f"cam{k}", src) for k, src in enumerate(sources)],
                        GradeConfig(max_batch=max_batch, read_timeout_s=0.5), Sinks([sink]))
    finally:
        for src in sources:
            src.close()
    lanes = []
    for lane in s.lanes:
        sm, (_, truth, want) = lane.summary, clips[lane.index % len(clips)]
        views = sink.views.get(lane.index, {})
        short = sum(1 for fid, v in want.items() if views.get(fid, 0) < v)  # fruit with fewer views than the file's
        ok = (sm.frames_dropped == 0 and sm.frames_processed == truth["frames"] and short == 0
              and sm.fruit_graded == len(truth["fruits"]) and not sm.fruit_failed)
        lanes.append({"name": lane.name, "ok": ok, "frames": sm.frames_processed, "of": truth["frames"],
                      "dropped": sm.frames_dropped, "fruit": sm.fruit_graded, "of_fruit": len(truth["fruits"]),
                      "fruit_short_of_views": short, "views_skipped_then_retaken": sm.views_skipped,
                      "views_per_fruit": round(sum(views.values()) / max(len(views), 1), 2),
                      "frame_p99_ms": sm.stages["frame"]["p99_ms"], "frame_p50_ms": sm.stages["frame"]["p50_ms"]})
    b = s.batcher
    played = max(truth["frames"] for _, truth, _ in clips) / FPS
    return {"lanes": n, "ok": all(x["ok"] for x in lanes),
            "aggregate_fps": round(sum(x["frames"] for x in lanes) / played, 1),
            "frame_p99_ms": [x["frame_p99_ms"] for x in lanes], "per_lane": lanes,
            "batcher": {k: b[k] for k in ("max_batch", "calls", "rows", "mean_batch", "multi_lane_calls")},
            "infer_wall_ms_per_view": round(b["infer"]["mean_ms"] * b["infer"]["n"] / max(b["rows"], 1), 3),
            "infer_cpu_ms_per_view": b["cpu_ms_per_row"]}


def _model_batch_gain(backend, preprocess, batch: int = 8) -> dict:
    """The model alone: `batch` crops one call each vs one call of `batch` (the most batching can give)."""
    x = preprocess.batch([np.full((*preprocess.input_hw, 3), 128, np.uint8)] * batch)
    one = timeit(lambda: [backend.infer(x[i:i + 1]) for i in range(batch)], reps=5)
    together = timeit(lambda: backend.infer(x), reps=5)
    return {"batch": batch, "ms_per_crop_batch_1": round(one / batch * 1e3, 3),
            "ms_per_crop_batched": round(together / batch * 1e3, 3), "gain": round(one / together, 3)}


def _int8(tmp: Path, bundle_dir: Path, args, fp32_run: dict, preprocess, clips, fp32) -> dict:
    """The same lanes with the bundle's INT8 model (`mnet calibrate int8` on a small synthetic set:
    the weights are random, so only its speed means anything): inference CPU ms per view, fp32 ÷ int8,
    at camera pace; also flat out, and the model alone at batch 1 and 8 (timed alternately)."""
    from mnet.calibration.int8 import calibrate_int8
    from mnet.runtime.backends import open_backend

    from mnet.bundle import load_bundle
    from mnet.synth import synthesize

    data = tmp / "synth"
    synthesize(data, n_train=160, n_dev=60, n_test=0, image_size=(120, 160), workers=2)
    report = calibrate_int8(bundle_dir, data, samples=160)
    int8 = open_backend(load_bundle(bundle_dir), "onnxruntime", "int8", threads=args.threads)
    n = fp32_run["lanes"]
    paced = _paced(n, int8, preprocess, clips)
    alone = {}
    for batch in (1, 8):
        x = preprocess.batch([np.full((*preprocess.input_hw, 3), 128, np.uint8)] * batch)
        t32, t8 = [], []
        for _ in range(5):  # alternated: a neighbour's load hits both alike
            t32.append(timeit(lambda: fp32.infer(x), reps=20))
            t8.append(timeit(lambda: int8.infer(x), reps=20))
        alone[f"b{batch}"] = round(float(np.median(t32) / np.median(t8)), 3)
    flat = _flat_out(n, int8, preprocess, clips)
    return {"value": round(fp32_run["infer_cpu_ms_per_view"] / max(paced["infer_cpu_ms_per_view"], 1e-9), 3),
            "how": f"{n} lanes at camera pace, the shared batched worker: inference CPU ms per view, fp32 ÷ int8",
            "lanes": n, "infer_cpu_ms_per_view_fp32": fp32_run["infer_cpu_ms_per_view"],
            "infer_cpu_ms_per_view_int8": paced["infer_cpu_ms_per_view"], "int8_kept_up": paced["ok"],
            "mean_batch_int8": paced["batcher"]["mean_batch"], "model_alone_fp32_over_int8": alone,
            "flat_out_fps_int8": flat, "quantisation": {"format": "QDQ S8S8 (mnet calibrate int8)",
                                                        "calibration_images": report.calibration_images,
                                                        "tensorrt_compatible": report.tensorrt_compatible},
            "note": "random weights: the accuracy drop is meaningless here (bench/int8_search.py measures it)"}


def _flat_out(n: int, backend, preprocess, clips, max_batch: int | None = None) -> float:
    """Aggregate processed fps of n lanes reading the clips as files (no pacing)."""
    s = grade_lanes(backend, preprocess, CLASSES, [LaneSpec(f"f{k}", str(clips[k % len(clips)][0])) for k in range(n)],
                    GradeConfig(max_batch=max_batch))
    return s.aggregate()["processed_fps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-lanes", type=int, default=16, help="largest lane count tried (default 16)")
    ap.add_argument("--fruits", type=int, default=10, help="fruit per clip (default 10: about 8 s at 30 fps)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    ap.add_argument("--preset", default="mnet-24-32")
    args = ap.parse_args()
    # A clip's end looks like an unplugged camera to the live source: its warnings are expected here.
    logging.getLogger("mnet.runtime.sources").setLevel(logging.CRITICAL)
    tmp = Path(tempfile.mkdtemp(prefix="mnet-bench-lanes-"))
    try:
        _bench(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench(tmp: Path, args) -> None:
    load_before = os.getloadavg()
    t_start = time.monotonic()
    bundle_dir = _random_bundle(tmp / "bundle", CLASSES, args.preset)
    if bundle_dir is not None:
        from mnet.runtime.backends import open_backend

        from mnet.bundle import load_bundle

        bundle = load_bundle(bundle_dir)
        preprocess = bundle.card.preprocess
        backend = open_backend(bundle, "onnxruntime", threads=args.threads)
        model = f"{args.preset} preset, random arch and weights (seed 0), mnet.export bundle"
    else:  # no torch: a tiny-shaped model built with onnx.helper
        preprocess = Preprocess((24, 32))
        backend = _OrtBackend(_random_tiny_onnx(tmp / "tiny.onnx"), args.threads)
        model = "tiny-shaped random ONNX (onnx.helper): torch missing"
    clips = []
    for seed in (0, 1):
        path = tmp / f"belt{seed}.mp4"
        make_conveyor_video(path, fruits=args.fruits, seed=seed, size_wh=(640, 480))
        clips.append((path, json.loads(path.with_name(f"belt{seed}.truth.json").read_text()),
                      _baseline_views(backend, preprocess, path)))
    model_gain = _model_batch_gain(backend, preprocess)

    runs, best = [], None
    n = 1
    while n <= args.max_lanes:
        r = _paced(n, backend, preprocess, clips)
        runs.append(r)
        print(f"{n} lanes: {'ok' if r['ok'] else 'MISSED'}  aggregate {r['aggregate_fps']} fps, "
              f"mean batch {r['batcher']['mean_batch']}", flush=True)
        if not r["ok"]:
            break
        best = r
        n *= 2
    if best is not None and runs[-1] is not best and runs[-1]["lanes"] - best["lanes"] > 2:  # one step between
        mid = (best["lanes"] + runs[-1]["lanes"]) // 2
        r = _paced(mid, backend, preprocess, clips)
        runs.append(r)
        print(f"{mid} lanes: {'ok' if r['ok'] else 'MISSED'}  aggregate {r['aggregate_fps']} fps", flush=True)
        if r["ok"]:
            best = r

    gain_lanes = best["lanes"] if best else 1
    batched = next(r for r in runs if r["lanes"] == gain_lanes)
    per_crop = _paced(gain_lanes, backend, preprocess, clips, max_batch=1)
    flat_batched = _flat_out(gain_lanes, backend, preprocess, clips)
    flat_per_crop = _flat_out(gain_lanes, backend, preprocess, clips, max_batch=1)
    int8 = _int8(tmp, bundle_dir, args, batched, preprocess, clips, backend) if bundle_dir is not None else None
    load_after = os.getloadavg()
    result = {
        "model": model,
        "backend": getattr(backend, "describe", lambda: backend.name)(),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine_load": {"loadavg_1_5_15_before": [round(v, 2) for v in load_before],
                         "loadavg_1_5_15_after": [round(v, 2) for v in load_after],
                         "note": "1/5/15-min load averages of the machine; above cpu_count, other work shared "
                                 "the cores during the run (an idle machine keeps up with at least as many lanes)"},
        "stream": {"size": [640, 480], "fps": FPS, "frames_per_clip": [t["frames"] for _, t, _ in clips],
                   "fruit_per_clip": [len(t["fruits"]) for _, t, _ in clips], "views_per_fruit": 3,
                   "source": "live-source path (capture thread, newest frame only), clip played in real time"},
        "lanes": best["lanes"] if best else 0,
        "aggregate_fps": best["aggregate_fps"] if best else 0.0,
        "frame_p99_ms": best["frame_p99_ms"] if best else [],
        "frame_p99_ms_max": max(best["frame_p99_ms"]) if best else None,
        "batching_gain": {
            "value": round(per_crop["infer_cpu_ms_per_view"] / max(batched["infer_cpu_ms_per_view"], 1e-9), 3),
            "lanes": gain_lanes,
            "infer_cpu_ms_per_view_batched": batched["infer_cpu_ms_per_view"],
            "infer_cpu_ms_per_view_per_crop": per_crop["infer_cpu_ms_per_view"],
            "infer_wall_ms_per_view_batched": batched["infer_wall_ms_per_view"],
            "infer_wall_ms_per_view_per_crop": per_crop["infer_wall_ms_per_view"],
            "mean_batch": batched["batcher"]["mean_batch"],
            "model_alone": model_gain,
            "per_crop_kept_up": per_crop["ok"],
            "flat_out_fps_batched": flat_batched, "flat_out_fps_per_crop": flat_per_crop,
            "flat_out_fps_ratio": round(flat_batched / max(flat_per_crop, 1e-9), 3),
            "why": "inference CPU ms per view (the worker thread's; onnxruntime with 1 intra-op thread runs on it) "
                   "at camera pace, one backend call per crop ÷ the shared batched worker; wall ms also counts "
                   "the lane threads' turns on the 2 cores. Flat out, the lanes' frame path (decode, localise) "
                   "is the bound, not inference, so the fps ratio stays near 1",
        },
        "int8_over_fp32": int8["value"] if int8 else None,
        "int8": int8 or {"note": "not measured: torch is missing, so no bundle to quantise (tiny ONNX stand-in)"},
        "runs": runs,
        "per_crop_run": per_crop,
        "targets": TARGETS,
        "meets": {"lanes": bool(best) and best["lanes"] >= TARGETS["lanes"]},
        "bench_wall_s": round(time.monotonic() - t_start, 1),
    }
    emit("lanes", result)


if __name__ == "__main__":
    main()
