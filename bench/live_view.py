"""What the live view (`mnet grade --serve`) costs the grading loop: processed fps with no server, with the
server and nobody watching, and with one viewer reading /stream.mjpg, side by side.

The same 640x480 synthetic conveyor video is graded flat out (a file: the loop runs as fast as it can)
with a tiny-shaped random ONNX model on onnxruntime CPU (one thread; a fast model makes the view's
share of each frame the largest). The viewer is a `curl` process (another process, as a browser would
be) reading the MJPEG stream the whole run. The three modes run back to back in a rotating order,
`--repeats` rounds. Three measures of the cost:
- fps: the median over rounds of each round's own fps ratio (background load drifts between rounds
  more than within one); on a loaded machine identical runs still differ by tens of percent;
- CPU time per frame of this process (all its threads), the same way: steadier, and a CPU-bound loop's
  fps falls as its CPU per frame rises;
- accounted, the steadiest: the CPU time of the view's own code (on_frame on the grading thread,
  counting and encoding on the encoder thread, the stream handler), timed with thread_time where it
  runs, per frame, over the CPU time per frame without a server.
The baseline is `mnet grade` without --serve, which always passes an on_frame (its status line): the
grader builds its FrameInfo per frame either way, so that is not the view's cost.
Targets: one viewer costs <= 5 % of the fps, no viewer ~0 (judged on the accounted cost).
Then `--lanes` (4) copies of a shorter video graded as lanes of one process, without a server and with
one viewer of the page's stream, the mosaic of every lane (`lanes` in the JSON, the same measures).

    python bench/live_view.py                 # -> bench/results/live_view.json
    python bench/live_view.py --repeats 9 --lanes 4 --lane-repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import emit
from mnet.runtime.grader import GradeConfig, grade
from mnet.runtime.lanes import LaneSpec, grade_lanes
from mnet.runtime.serve import LiveView, ServeConfig
from mnet.runtime.sinks import Sinks
from runtime import _OrtBackend, _random_tiny_onnx  # bench/runtime.py: the same tiny model

from mnet.conveyor import make_conveyor_video
from mnet.preprocess import Preprocess

TARGETS = {"one_viewer_cost_pct": 5.0, "no_viewer_cost_pct": 1.0}
MODES = ("no_server", "server_no_viewer", "server_one_viewer")
LANE_MODES = ("no_server", "server_one_viewer")
CLASSES = ["A", "B", "C"]


def _grade(backend, preprocess, video: Path, lanes: int, sinks: Sinks, on_frame) -> tuple[float, int]:
    """(processed fps, frames) of one run: `grade` on the video, or `grade_lanes` on `lanes` copies of it."""
    if lanes == 1:
        s = grade(backend, preprocess, CLASSES, str(video), GradeConfig(), sinks, model="bench", on_frame=on_frame)
        return s.processed_fps, s.frames_processed
    specs = [LaneSpec(f"lane{i}", str(video)) for i in range(lanes)]
    s = grade_lanes(backend, preprocess, CLASSES, specs, GradeConfig(), sinks, model="bench",
                    on_frame=lambda lane, frame, info: on_frame(frame, info, lane))
    agg = s.aggregate()
    return agg["processed_fps"], agg["frames_processed"]


def _run(mode: str, backend, preprocess, video: Path, lanes: int = 1) -> dict:
    cpu0 = time.process_time()  # every thread of this process: grading, encoder and HTTP handlers
    if mode == "no_server":  # as `mnet grade` without --serve: an on_frame (its status line), so FrameInfos are built
        fps, frames = _grade(backend, preprocess, video, lanes, Sinks(), lambda frame, info, lane=0: None)
        return {"fps": fps, "frames": frames, "cpu_ms_per_frame": (time.process_time() - cpu0) * 1e3 / frames}
    names = [(f"lane{i}", "") for i in range(lanes)]
    with LiveView(ServeConfig(port=0), backend=backend.name, precision="fp32", lanes=names) as view:
        viewer = None
        if mode == "server_one_viewer":  # several lanes: the page's stream, the mosaic of all of them
            viewer = subprocess.Popen(["curl", "-s", "-N", "-o", os.devnull, view.url + "stream.mjpg"])
            end = time.monotonic() + 10
            while view.status()["viewers"] < 1 and time.monotonic() < end:
                time.sleep(0.02)
            assert view.status()["viewers"] == 1, "the viewer did not connect"
        hook_cpu = 0.0

        def on_frame(frame, info, lane=0) -> None:  # the view's share of a grading thread, measured where it runs
            nonlocal hook_cpu
            t = time.thread_time()
            view.on_frame(frame, info, lane)
            hook_cpu += time.thread_time() - t  # several lanes: a sum from several threads (no lock: an estimate)

        try:
            fps, frames = _grade(view.watch(backend), preprocess, video, lanes, Sinks([view.sink()]), on_frame)
        finally:
            if viewer is not None:
                viewer.terminate()
                viewer.wait(10)
        cpu = (time.process_time() - cpu0) * 1e3 / frames
        view_cpu = (hook_cpu + view.encode_cpu_s + view.stream_cpu_s + view.drain_cpu_s) * 1e3 / frames
        return {"fps": fps, "frames": frames,
                "encodes": view.encodes, "cpu_ms_per_frame": cpu,
                "view_cpu_ms_per_frame": view_cpu, "on_frame_us": hook_cpu * 1e6 / frames,
                "drain_us": view.drain_cpu_s * 1e6 / frames,
                "encode_us": view.encode_cpu_s * 1e6 / frames,
                "stream_us": view.stream_cpu_s * 1e6 / frames,
                "encode_ms": view.encode_cpu_s * 1e3 / max(1, view.encodes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9, help="rounds of the three modes (default 9)")
    ap.add_argument("--fruits", type=int, default=120, help="fruit in the generated video (default 120)")
    ap.add_argument("--lanes", type=int, default=4, help="lanes of the multi-lane section (1: skip it; default 4)")
    ap.add_argument("--lane-repeats", type=int, default=5, help="rounds of the multi-lane section (default 5)")
    ap.add_argument("--lane-fruits", type=int, default=40, help="fruit in each lane's video (default 40)")
    args = ap.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed for the viewer")

    tmp = Path(tempfile.mkdtemp(prefix="mnet-bench-live-"))
    try:
        preprocess = Preprocess((24, 32))
        backend = _OrtBackend(_random_tiny_onnx(tmp / "tiny.onnx", preprocess.input_hw, classes=3), threads=1)
        video = tmp / "belt.mp4"
        make_conveyor_video(video, fruits=args.fruits, seed=0, size_wh=(640, 480))
        load_before = os.getloadavg()[0]
        _run("no_server", backend, preprocess, video)  # warm: page cache, onnxruntime, OpenCV
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(args.repeats):
            for i in range(len(MODES)):
                mode = MODES[(r + i) % len(MODES)]  # rotating order: no mode always runs first or last
                runs[mode].append(_run(mode, backend, preprocess, video))
        lane_runs: dict[str, list[dict]] = {m: [] for m in LANE_MODES}
        if args.lanes > 1:  # several lanes, one viewer of the page's stream: the mosaic of every lane
            short = tmp / "short.mp4"
            make_conveyor_video(short, fruits=args.lane_fruits, seed=1, size_wh=(640, 480))
            for r in range(args.lane_repeats):
                for i in range(len(LANE_MODES)):
                    mode = LANE_MODES[(r + i) % len(LANE_MODES)]
                    lane_runs[mode].append(_run(mode, backend, preprocess, short, lanes=args.lanes))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    fps = {m: statistics.median(x["fps"] for x in runs[m]) for m in MODES}
    base = fps["no_server"]
    paired = {m: [x["fps"] / b["fps"] for x, b in zip(runs[m], runs["no_server"])] for m in MODES[1:]}
    cost = {m: round(100.0 * (1.0 - statistics.median(paired[m])), 2) for m in MODES[1:]}
    cpu = {m: statistics.median(x["cpu_ms_per_frame"] for x in runs[m]) for m in MODES}
    cpu_paired = {m: [x["cpu_ms_per_frame"] / b["cpu_ms_per_frame"] for x, b in zip(runs[m], runs["no_server"])]
                  for m in MODES[1:]}
    cpu_cost = {m: round(100.0 * (statistics.median(cpu_paired[m]) - 1.0), 2) for m in MODES[1:]}
    accounted = {m: 100.0 * statistics.median(x["view_cpu_ms_per_frame"] for x in runs[m]) / cpu["no_server"]
                 for m in MODES[1:]}
    emit("live_view", {
        "model": "tiny-shaped random ONNX (bench/runtime.py), onnxruntime CPU, 1 thread",
        "video": {"size": [640, 480], "fruits": args.fruits, "frames": runs["no_server"][0]["frames"]},
        "cpu_count": os.cpu_count(),
        "loadavg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "repeats": args.repeats,
        "stream_fps_cap": ServeConfig().stream_fps,
        "median_fps": {m: round(v, 1) for m, v in fps.items()},
        "fps_runs": {m: [x["fps"] for x in runs[m]] for m in MODES},
        "jpeg_encodes_per_run": {m: [x.get("encodes", 0) for x in runs[m]] for m in MODES[1:]},
        "cost_pct": {"no_viewer": cost["server_no_viewer"], "one_viewer": cost["server_one_viewer"],
                     "how": "100 * (1 - median over rounds of fps(mode) / fps(no server) in the same round)"},
        "cost_pct_of_medians": {m.removeprefix("server_"): round(100.0 * (1.0 - fps[m] / base), 2)
                                for m in MODES[1:]},
        "median_cpu_ms_per_frame": {m: round(v, 4) for m, v in cpu.items()},
        "cpu_cost_pct": {"no_viewer": cpu_cost["server_no_viewer"], "one_viewer": cpu_cost["server_one_viewer"],
                         "how": "100 * (median over rounds of CPU time per frame (mode) / (no server) - 1): this "
                                "process's CPU, all threads; steadier than fps on a loaded machine"},
        "accounted_cost_pct": {m.removeprefix("server_"): round(v, 2) for m, v in accounted.items()},
        "view_cpu_us_per_frame": {m.removeprefix("server_"): {
            k: round(statistics.median(x[k] for x in runs[m]), 2) for k in ("on_frame_us", "drain_us", "encode_us",
                                                                            "stream_us")} for m in MODES[1:]},
        "accounted_how": "CPU time of the view's own code (on_frame on the grading thread, counting and encoding on "
                         "the encoder thread, the stream handler), timed with thread_time where it runs, per frame, "
                         "over the CPU time per frame of the run without a server",
        "encode_ms_per_jpeg": round(statistics.median(x["encode_ms"] for x in runs["server_one_viewer"]), 3),
        "targets": TARGETS,
        "meets": {"one_viewer_cost_pct": accounted["server_one_viewer"] <= TARGETS["one_viewer_cost_pct"],
                  "no_viewer_cost_pct": accounted["server_no_viewer"] <= TARGETS["no_viewer_cost_pct"]},
        "meets_how": "on the accounted cost; the A/B fps and CPU figures above are as noisy as the machine's load",
        "lanes": _lanes_section(lane_runs, args),
    })


def _lanes_section(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict | None:
    if not runs["no_server"]:
        return None
    base, view = runs["no_server"], runs["server_one_viewer"]
    cpu_base = statistics.median(x["cpu_ms_per_frame"] for x in base)
    accounted = 100.0 * statistics.median(x["view_cpu_ms_per_frame"] for x in view) / cpu_base
    return {
        "what": f"{args.lanes} lanes of a {args.lane_fruits}-fruit 640x480 video graded flat out in one process "
                "(grade_lanes), no server vs one viewer of /stream.mjpg (the mosaic of every lane, what the page "
                "shows)",
        "lanes": args.lanes, "repeats": args.lane_repeats,
        "median_aggregate_fps": {m: round(statistics.median(x["fps"] for x in runs[m]), 1) for m in LANE_MODES},
        "fps_cost_pct": round(100.0 * (1.0 - statistics.median(v["fps"] / b["fps"] for v, b in zip(view, base))), 2),
        "cpu_cost_pct": round(100.0 * (statistics.median(v["cpu_ms_per_frame"] / b["cpu_ms_per_frame"]
                                                         for v, b in zip(view, base)) - 1.0), 2),
        "accounted_cost_pct": round(accounted, 2),
        "view_cpu_us_per_frame": {k: round(statistics.median(x[k] for x in view), 2)
                                  for k in ("on_frame_us", "drain_us", "encode_us", "stream_us")},
        "mosaic_encodes_per_run": [x["encodes"] for x in view],
        "encode_ms_per_mosaic": round(statistics.median(x["encode_ms"] for x in view), 3),
        "meets_one_viewer_target": accounted <= TARGETS["one_viewer_cost_pct"],
    }


if __name__ == "__main__":
    main()
