"""`mnet grade` with several sources (repeated --source, or --lanes FILE): the console side of runtime/lanes.py."""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from rich.live import Live
from rich.markup import escape
from rich.table import Table

from mnet.cli._common import console, err
from mnet.errors import ConfigError, SourceError


def grade_lanes(b: Any, net: Any, precision: str, cfg: Any, sources: list[str], lanes_file: Optional[Path], *,
                events: Optional[str], fsync_every: bool, csv: Optional[Path], mqtt: Optional[str],
                mqtt_password_file: Optional[Path], mqtt_spool: Optional[Path], mqtt_client_id: Optional[str],
                summary_json: Optional[Path], save: Optional[str], serve: Optional[str], serve_token: Optional[str],
                single_only: dict[str, Any]) -> None:
    """Lanes from the file first, then one per --source (named lane<index>); --roi / --trigger-x apply to
    every lane that does not set its own, and --save (with {lane} or {index} in it) to every lane
    without a `save` of its own."""
    from mnet.io import write_json
    from mnet.runtime.grader import stop_on_signals
    from mnet.runtime.lanes import LaneSpec, grade_lanes as run_lanes, load_lanes
    from mnet.runtime.sinks import SinkError, open_sinks
    from mnet.runtime.sources import parse_uri

    if not sources and lanes_file is None:
        raise ConfigError("--source: missing; give --source URI (repeat it for several lanes) or --lanes FILE")
    specs = load_lanes(lanes_file) if lanes_file is not None else []
    for uri in sources:
        parse_uri(uri)  # a typo fails now, before any lane starts
        specs.append(LaneSpec(f"lane{len(specs)}", uri))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"lane names = {names!r}: a name in --lanes clashes with a --source lane's; rename it")
    if save:
        if "{lane}" not in save and "{index}" not in save:
            raise ConfigError(f"--save with {len(specs)} lanes: one video per lane, so put {{lane}} (its name) or "
                              "{index} in it, e.g. --save 'annotated-{lane}.mp4' or rtp://HOST:500{index}; or give "
                              "lanes a \"save\" each in --lanes FILE")
        specs = [spec if spec.save else replace(spec, save=save.replace("{lane}", spec.name).replace("{index}", str(i)))
                 for i, spec in enumerate(specs)]
    for option, value in single_only.items():
        if value:
            raise ConfigError(f"{option} with {len(specs)} lanes: it shows one source; watch every lane's annotated "
                              "video with --serve 127.0.0.1:8080 instead, or grade one --source")
    view = None
    if serve:  # listening before the sinks open: a port in use fails here, having written nothing
        from mnet.runtime.serve import LiveView, ServeConfig

        view = LiveView(ServeConfig.parse(serve, serve_token), backend=net.name, precision=precision,
                        model=b.card.display_name, lanes=[(s.name, s.to_json()["source"]) for s in specs]).start()
        net = view.watch(net, warmup=cfg.warmup)  # counts views, inference errors and latency for the view
    to_stdout = events == "-"
    sinks = open_sinks(events=None if to_stdout else events, csv_path=csv, mqtt=mqtt,
                       stream=sys.stdout if to_stdout else None, classes=b.card.classes, fsync_each=fsync_every,
                       raise_on_close=False, mqtt_spool=mqtt_spool, mqtt_password_file=mqtt_password_file,
                       mqtt_client_id=mqtt_client_id)
    if view is not None:
        sinks.add(view.sink())
    status = err if to_stdout else console
    status.print(f"grading {len(specs)} lanes with {b.card.display_name} on {net.describe()}")
    if view is not None:
        status.print(f"live view → {view.url}   metrics → {view.url}metrics")
    stop = threading.Event()
    last: dict[int, Any] = {}
    lock = threading.Lock()

    def table() -> Table:
        t = Table.grid(padding=(0, 2))
        for i, spec in enumerate(specs):
            info = last.get(i)
            if info is None:
                t.add_row(escape(spec.name), "starting")
                continue
            t.add_row(escape(spec.name), f"fps {info.fps:5.1f} (in {info.input_fps:5.1f})", f"graded {info.graded}",
                      f"dropped {info.dropped}", f"frame {info.stage_ms.get('localise', 0.0):.1f} ms")
        return t

    with stop_on_signals(stop), contextlib.closing(view) if view else contextlib.nullcontext(), \
            Live(console=status, refresh_per_second=4, transient=True) as live:
        def on_frame(lane: int, frame: Any, info: Any) -> None:
            if view is not None:
                view.on_frame(frame, info, lane)
            with lock:
                last[lane] = info
                live.update(table(), refresh=False)

        summary = run_lanes(net, b.card.preprocess, b.card.classes, specs, cfg, sinks,
                            model=f"{b.card.display_name}:{b.path.name}:{precision}", stop=stop, on_frame=on_frame)
    net.close()
    s = summary.to_json()
    s["sinks"] = sinks.report()
    t = Table(title=f"grading summary, {len(specs)} lanes" + (" (stopped)" if s["stopped"] else ""))
    for col in ("lane", "source", "frames", "dropped", "graded", "fps", "outages", "frame p99 ms"):
        t.add_column(col, justify="left" if col in ("lane", "source") else "right")
    for lane in s["lanes"]:
        frame_p99 = (lane.get("stages") or {}).get("frame", {}).get("p99_ms")
        t.add_row(escape(f"{lane['lane']} {lane['name']}"), escape(lane["source"]),
                  str(lane.get("frames_processed", 0)), str(lane.get("frames_dropped", 0)),
                  str(lane.get("fruit_graded", 0)), f"{lane.get('processed_fps', 0.0):.1f}",
                  f"{lane['outages']} ({lane['outage_s']:.1f} s)" if lane["outages"] else "0",
                  "-" if frame_p99 is None else f"{frame_p99:.2f}")
    t.add_row("all", "", str(s["frames_processed"]), str(s["frames_dropped"]), str(s["fruit_graded"]),
              f"{s['processed_fps']:.1f}", str(s["outages"]), "")
    status.print(t)
    bt = s["batcher"]
    status.print(f"run {s['run_id']}: {bt.get('calls', 0)} backend calls, {bt.get('mean_batch', 0.0):.2f} crops per "
                 f"call (max {bt.get('max_batch')}), grades {s['grades']}")
    for f in sinks.failed:
        status.print(f"sink {escape(f['sink'])} FAILED: {f['missed']} event(s) missed")
    videos = [(lane, lane["video"]) for lane in s["lanes"] if lane.get("video")]
    for lane, v in videos:
        status.print(f"lane {escape(lane['name'])}: annotated video → {escape(v['sink'])}"
                     + (f" FAILED: {escape(v['error'])} ({v['frames_missed']} frame(s) missed)" if v["error"] else ""))
    if events and not to_stdout and not any(f["sink"].startswith("jsonl ") for f in sinks.failed):
        status.print(f"events → {escape(events)}")
    if summary_json:
        write_json(summary_json, s)
    sinks.raise_failures()
    broken = [f"lane {lane['name']}: {v['sink']}: {v['error']}" for lane, v in videos if v["error"]]
    if broken:  # the events are all there; an annotated video is not: exit 2, as with one source
        raise SinkError(f"annotated video failed: {'; '.join(broken)}", [v for _, v in videos if v["error"]])
    failed = [lane for lane in s["lanes"] if lane["error"]]
    if failed:  # the other lanes graded to the end; the exit code still says that one did not
        raise SourceError(f"{len(failed)} of {len(specs)} lanes ended early: "
                          + "; ".join(f"lane {lane['lane']} ({lane['name']}): {lane['error']}" for lane in failed))
