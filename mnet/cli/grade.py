"""`mnet grade`: grade fruit on a conveyor from a camera, a video, a stream or a folder of images."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.live import Live
from rich.table import Table

from mnet.cli._common import console, err

# TrackerConfig().max_views, written here so that starting the CLI does not load OpenCV (a test keeps them equal)
_DEFAULT_VIEWS = 3


def grade(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (from `mnet export onnx`).")],
    source: Annotated[str, typer.Option(help="0 (camera), video file or file://, rtsp://..., csi://N (Jetson), "
                                        "gst:PIPELINE, or a directory of images.")],
    backend: Annotated[str, typer.Option(help="auto, tensorrt, onnxruntime or torch.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8 (the bundle's file for it).")] = "fp32",
    events: Annotated[Optional[str], typer.Option(help="JSONL of grade events, one per fruit ('-' = stdout).")]
    = "events.jsonl",
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write events as CSV here.")] = None,
    mqtt: Annotated[Optional[str], typer.Option(help="Also publish events: mqtt://host:port/topic (QoS 1).")] = None,
    save: Annotated[Optional[Path], typer.Option(help="Write an annotated video (boxes, IDs, grades, fps).")] = None,
    show: Annotated[bool, typer.Option(help="Show the annotated video in a window (q quits).")] = False,
    roi: Annotated[Optional[str], typer.Option(help="Region of the belt to watch: x,y,w,h in pixels.")] = None,
    trigger_x: Annotated[Optional[float], typer.Option(help="Emit a fruit's grade when it crosses this x.")] = None,
    full_frame: Annotated[bool, typer.Option(help="The whole frame is one fruit (hand-held shots).")] = False,
    input_size: Annotated[Optional[str], typer.Option(help="Resize frames to WxH before localising.")] = None,
    fps_limit: Annotated[Optional[float], typer.Option(help="Process at most this many frames per second.")] = None,
    latency_budget_ms: Annotated[Optional[float], typer.Option(help="Warn when a frame takes longer.")] = None,
    views: Annotated[Optional[int], typer.Option(help="Classified views per fruit, spaced along the belt "
                                                 f"(default {_DEFAULT_VIEWS}); 0 = every frame it is seen.")]
    = None,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime CPU threads.")] = None,
    summary_json: Annotated[Optional[Path], typer.Option("--summary", help="Write the summary JSON here.")] = None,
) -> None:
    """Localise fruit, track them along the belt and emit exactly one grade per fruit."""
    from mnet.bundle import load_bundle
    from mnet.io import write_json
    from mnet.runtime.backends import open_backend
    from mnet.runtime.grader import GradeConfig, stop_on_signals
    from mnet.runtime.grader import grade as run_grade
    from mnet.runtime.sinks import annotate, open_sinks

    b = load_bundle(bundle)
    net = open_backend(b, backend, precision, threads=threads)
    cfg = GradeConfig.from_options(roi=roi, trigger_x=trigger_x, full_frame=full_frame, input_size=input_size,
                                   fps_limit=fps_limit, latency_budget_ms=latency_budget_ms, views=views)
    to_stdout = events == "-"
    sinks = open_sinks(events=None if to_stdout else events, csv_path=csv, mqtt=mqtt, save=save,
                       stream=sys.stdout if to_stdout else None)
    stop = threading.Event()
    status = err if to_stdout else console
    status.print(f"grading {source} with {b.card.display_name} on {net.describe()}")

    def line(info) -> Table:
        t = Table.grid(padding=(0, 2))
        stages = "  ".join(f"{k} {v:.1f}" for k, v in info.stage_ms.items())
        last = f"#{info.last_event.fruit_id} {info.last_event.grade}" if info.last_event else "-"
        t.add_row(f"fps {info.fps:5.1f} (in {info.input_fps:5.1f})", f"graded {info.graded}",
                  f"dropped {info.dropped}", f"last {last}", f"ms: {stages}")
        return t

    with stop_on_signals(stop), Live(console=status, refresh_per_second=4, transient=True) as live:
        def on_frame(frame, info) -> None:
            live.update(line(info))
            if show:
                import cv2

                cv2.imshow("mnet grade", annotate(frame, info))
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    stop.set()

        summary = run_grade(net, b.card.preprocess, b.card.classes, source, cfg, sinks,
                            model=f"{b.card.display_name}:{b.path.name}:{precision}", stop=stop, on_frame=on_frame)
    net.close()
    s = summary.to_json()
    t = Table(title="grading summary" + (" (stopped)" if s.get("stopped") else ""))
    t.add_column("what")
    t.add_column("value", justify="right")
    for key in ("frames_read", "frames_processed", "frames_dropped", "fruit_graded", "views", "views_skipped",
                "input_fps", "processed_fps"):
        if key in s and not (key == "views_skipped" and not s[key]):  # skips happen only on live sources
            v = s[key]
            t.add_row(key.replace("_", " "), f"{v:.1f}" if isinstance(v, float) else str(v))
    for grade_name, n in (s.get("grades") or {}).items():
        t.add_row(f"grade {grade_name}", str(n))
    for stage, st in (s.get("stages") or {}).items():
        t.add_row(f"{stage} p50 / p99 ms", f"{st['p50_ms']:.2f} / {st['p99_ms']:.2f}")
    status.print(t)
    if events and not to_stdout:
        status.print(f"events → {events}" + (f"   annotated video → {save}" if save else ""))
    if summary_json:
        write_json(summary_json, s)


def register(app: typer.Typer) -> None:
    app.command("grade")(grade)
