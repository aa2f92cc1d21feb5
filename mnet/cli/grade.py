"""`mnet grade`: grade fruit on a conveyor from a camera, a video, a stream or a folder of images."""

from __future__ import annotations

import contextlib
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from mnet.cli._common import console, err

# TrackerConfig().max_views, written here so that starting the CLI does not load OpenCV (a test keeps them equal)
_DEFAULT_VIEWS = 3


class Fsync(str, Enum):
    every = "every"
    exit = "exit"


def grade(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (from `mnet export onnx`).")],
    source: Annotated[Optional[list[str]], typer.Option(metavar="URI", help="0 (camera), video file or file://, "
                                                        "rtsp://..., csi://N "
                                                        "(Jetson), gst:PIPELINE, or a directory of images. Repeat it "
                                                        "to grade several lanes in one process.")] = None,
    lanes: Annotated[Optional[Path], typer.Option(help="JSON file of lanes (name, source, roi, trigger_x, save each), "
                                                  "graded in one process with one batched inference worker.")]
    = None,
    backend: Annotated[str, typer.Option(help="auto, tensorrt, onnxruntime or torch.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8 (the bundle's file for it), or auto: the one "
                                           "`mnet bundle bench --all` chose on this device (else fp32).")] = "fp32",
    events: Annotated[Optional[str], typer.Option(help="JSONL of grade events, one per fruit ('-' = stdout).")]
    = "events.jsonl",
    fsync: Annotated[Fsync, typer.Option(help="When the JSONL reaches the disk: 'every' event (a power cut loses at "
                                         "most the one being written; one disk sync per fruit) or at 'exit' (a "
                                         "power cut can lose what the OS had not written yet).")] = Fsync.exit,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write events as CSV here.")] = None,
    mqtt: Annotated[Optional[str], typer.Option(help="Also publish events: mqtt://host:port/topic or "
                                                "mqtt://user@host:port/topic (QoS 1). The password: "
                                                "--mqtt-password-file or $MNET_MQTT_PASSWORD.")] = None,
    mqtt_password_file: Annotated[Optional[Path], typer.Option(help="File holding the MQTT password (kept out of "
                                                               "the command line and every log).")] = None,
    mqtt_spool: Annotated[Optional[Path], typer.Option(help="Directory where events the broker has not acknowledged "
                                                       "wait on disk; the next start resends them.")] = None,
    mqtt_client_id: Annotated[Optional[str], typer.Option(help="MQTT client id (persistent session); default: "
                                                          "derived from the host and spool, or random.")] = None,
    # A str, not a Path: Path("rtp://h:5000") folds the "//" and the URI is lost.
    save: Annotated[Optional[str], typer.Option(help="Write an annotated video (boxes, IDs, grades, fps) to a file, "
                                                "or stream it: rtp://HOST:PORT or rtsp://HOST:PORT/PATH (needs "
                                                "OpenCV with GStreamer, e.g. JetPack's). Several lanes: one "
                                                "each, named by {lane} (its name) or {index} in it.")] = None,
    show: Annotated[bool, typer.Option(help="Show the annotated video in a window (q quits).")] = False,
    roi: Annotated[Optional[str], typer.Option(help="Region of the belt to watch: x,y,w,h in pixels.")] = None,
    trigger_x: Annotated[Optional[float], typer.Option(help="Emit a fruit's grade when it crosses this x.")] = None,
    full_frame: Annotated[bool, typer.Option(help="The whole frame is one fruit (hand-held shots).")] = False,
    input_size: Annotated[Optional[str], typer.Option(help="Resize frames to WxH before localising.")] = None,
    fps_limit: Annotated[Optional[float], typer.Option(help="Process at most this many frames per second.")] = None,
    open_timeout: Annotated[float, typer.Option(help="Seconds a camera or stream that is down at start is retried "
                                                "(0: fail at once).")] = 10.0,
    latency_budget_ms: Annotated[Optional[float], typer.Option(help="Warn when a frame takes longer.")] = None,
    views: Annotated[Optional[int], typer.Option(help="Classified views per fruit, spaced along the belt "
                                                 f"(default {_DEFAULT_VIEWS}); 0 = every frame it is seen.")]
    = None,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime CPU threads.")] = None,
    summary_json: Annotated[Optional[Path], typer.Option("--summary", help="Write the summary JSON here.")] = None,
    serve: Annotated[Optional[str], typer.Option(help="Live view in the browser, /metrics (Prometheus) and /healthz "
                                                 "at HOST:PORT, e.g. 127.0.0.1:8080.")] = None,
    serve_token: Annotated[Optional[str], typer.Option(envvar="MNET_SERVE_TOKEN", help="Token every --serve request "
                                                       "must carry (Bearer header or ?token=); required for a host "
                                                       "other than loopback. Prefer $MNET_SERVE_TOKEN.")] = None,
) -> None:
    """Localise fruit, track them along the belt and emit exactly one grade per fruit."""
    from mnet.bundle import load_bundle
    from mnet.io import write_json
    from mnet.redact import redact
    from mnet.runtime.backends import open_backend
    from mnet.runtime.gate import GateConfig
    from mnet.runtime.grader import GradeConfig, stop_on_signals
    from mnet.runtime.grader import grade as run_grade
    from mnet.runtime.sinks import annotate, open_sinks

    b = load_bundle(bundle)
    net = open_backend(b, backend, precision, threads=threads)
    precision = net.precision if precision == "auto" else precision  # what auto resolved to, in every event
    cfg = GradeConfig.from_options(roi=roi, trigger_x=trigger_x, full_frame=full_frame, input_size=input_size,
                                   fps_limit=fps_limit, latency_budget_ms=latency_budget_ms, views=views,
                                   open_timeout_s=open_timeout, gate=GateConfig.from_card(b.card))
    if lanes is not None or len(source or []) != 1:  # several lanes: runtime/lanes.py (one source: as below)
        from mnet.cli._lanes import grade_lanes

        return grade_lanes(b, net, precision, cfg, source or [], lanes, events=events, fsync_every=fsync is Fsync.every,
                           csv=csv, mqtt=mqtt, mqtt_password_file=mqtt_password_file, mqtt_spool=mqtt_spool,
                           mqtt_client_id=mqtt_client_id, summary_json=summary_json, save=save,
                           serve=serve, serve_token=serve_token, single_only={"--show": show})
    source = source[0]
    view = None
    if serve:  # listening before the sinks open: a port in use fails here, having written nothing
        from mnet.runtime.serve import LiveView, ServeConfig

        view = LiveView(ServeConfig.parse(serve, serve_token), backend=net.name, precision=precision,
                        model=b.card.display_name, source=redact(source)).start()
        net = view.watch(net, warmup=cfg.warmup)  # counts views, inference errors and latency for the view
    to_stdout = events == "-"
    # classes: a CSV with other columns is refused now, not at the first fruit. raise_on_close off: a failed
    # sink is reported after the summary (the other sinks went on), then raised as one error line.
    sinks = open_sinks(events=None if to_stdout else events, csv_path=csv, mqtt=mqtt, save=save,
                       video_size=cfg.input_size,
                       stream=sys.stdout if to_stdout else None, classes=b.card.classes,
                       fsync_each=fsync is Fsync.every, raise_on_close=False, mqtt_spool=mqtt_spool,
                       mqtt_password_file=mqtt_password_file, mqtt_client_id=mqtt_client_id)
    if view is not None:
        sinks.add(view.sink())  # every event, also those flushed after the last frame
    stop = threading.Event()
    status = err if to_stdout else console
    status.print(f"grading {redact(source)} with {b.card.display_name} on {net.describe()}")
    if view is not None:
        status.print(f"live view → {view.url}   metrics → {view.url}metrics")

    def line(info) -> Table:
        t = Table.grid(padding=(0, 2))
        stages = "  ".join(f"{k} {v:.1f}" for k, v in info.stage_ms.items())
        last = f"#{info.last_event.fruit_id} {info.last_event.grade}" if info.last_event else "-"
        t.add_row(f"fps {info.fps:5.1f} (in {info.input_fps:5.1f})", f"graded {info.graded}",
                  f"dropped {info.dropped}", f"last {last}", f"ms: {stages}")
        return t

    with stop_on_signals(stop), contextlib.closing(view) if view else contextlib.nullcontext(), \
            Live(console=status, refresh_per_second=4, transient=True) as live:
        def on_frame(frame, info) -> None:
            if view is not None:
                view.on_frame(frame, info)
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
    s["sinks"] = sinks.report()
    t = Table(title="grading summary" + (" (stopped)" if s.get("stopped") else ""))
    t.add_column("what")
    t.add_column("value", justify="right")
    faults = ("views_skipped", "fruit_failed", "views_failed", "infer_errors", "nonfinite_outputs")
    for key in ("run_id", "frames_read", "frames_processed", "frames_dropped", "fruit_graded", "views", *faults,
                "input_fps", "processed_fps"):
        if key in s and not (key in faults and not s[key]):  # shown when they happen (skips: live sources only)
            v = s[key]
            t.add_row(key.replace("_", " "), f"{v:.1f}" if isinstance(v, float) else str(v))
    for grade_name, n in (s.get("grades") or {}).items():
        t.add_row(f"grade {grade_name}", str(n))
    for stage, st in (s.get("stages") or {}).items():
        t.add_row(f"{stage} p50 / p99 ms", f"{st['p50_ms']:.2f} / {st['p99_ms']:.2f}")
    for f in sinks.failed:
        t.add_row(f"sink {escape(f['sink'])} FAILED", f"{f['missed']} event(s) missed")
    status.print(t)
    if events and not to_stdout and not any(f["sink"].startswith("jsonl ") for f in sinks.failed):
        status.print(f"events → {escape(events)}" + (f"   annotated video → {escape(redact(save))}" if save else ""))
    if summary_json:
        write_json(summary_json, s)
    sinks.raise_failures()  # one line, exit 2, after the summary has said what the other sinks kept


def register(app: typer.Typer) -> None:
    app.command("grade")(grade)
