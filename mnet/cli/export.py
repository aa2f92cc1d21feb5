"""`mnet export onnx|fp16|tensorrt` and `mnet bundle show|bench`: thin wrappers over mnet.export and mnet.runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from mnet.cli._common import console, err, print_json

__all__ = ["bundle_app", "export_app", "register"]

export_app = typer.Typer(help="Export a trained model: a verified ONNX bundle, its fp16 model, then TensorRT "
                                   "engines on the device.", no_args_is_help=True)
bundle_app = typer.Typer(help="Inspect bundles (model.onnx + mnet.json + optional int8 model and engines).",
                         no_args_is_help=True)


@export_app.command("onnx")
def onnx_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to export (RUN/best.pt or a run directory).")],
    out: Annotated[Path, typer.Option("--out", help="Bundle directory to write.")],
    opset: Annotated[int, typer.Option(help="ONNX opset (17: TensorRT 8.5/8.6 on JetPack 5/6 read at most 17).")] = 17,
    batch: Annotated[str, typer.Option(help="'dynamic' or a fixed batch size.")] = "dynamic",
    simplify: Annotated[bool, typer.Option(help="Run onnxslim on the graph (pip install onnxslim).")] = False,
    data: Annotated[Optional[Path], typer.Option(help="Dataset whose train images the parity check uses "
                                                       "(default: synthetic images).")] = None,
    parity_images: Annotated[int, typer.Option(help="Images in the parity check.")] = 32,
    exporter: Annotated[str, typer.Option(help="auto, torchscript or dynamo (torch.export).")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle at --out.")] = False,
) -> None:
    """Export to ONNX (fp32), check it (onnx.checker, parity with PyTorch) and write the bundle."""
    from mnet.export.onnx import export_onnx

    with err.status(f"exporting {checkpoint} …"):
        b = export_onnx(checkpoint, out, opset=opset, batch=batch, simplify=simplify, data_root=data,
                        parity_images=parity_images, exporter=exporter, overwrite=force)
    p = b.card.metrics["parity"]
    console.print(f"bundle → {b.path}")
    console.print(f"  {b.card.tools.get('exporter')} exporter, opset {b.card.opset}, input {b.card.input_shape}, "
                  f"{b.onnx_path.stat().st_size / 1e6:.2f} MB")
    console.print(f"  parity on {p['images']} images ({p['source']}): max |Δlogit| {p['max_abs_logit_diff']:.2e}, "
                  f"top-1 agreement {p['top1_agreement']:.3f}", highlight=False)


@export_app.command("fp16")
def fp16_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (from `mnet export onnx`).")],
    data: Annotated[Optional[Path], typer.Argument(help="Dataset whose dev split measures fp32 vs fp16 accuracy "
                                                        "(without it nothing is measured, and `--precision auto` "
                                                        "never chooses fp16).")] = None,
    split: Annotated[str, typer.Option(help="Split the fp32 and fp16 accuracies are measured on.")] = "dev",
) -> None:
    """Write model.fp16.onnx (half precision, fp32 I/O) and record fp32 vs fp16 accuracy in the card."""
    from mnet.export.fp16 import export_fp16

    with err.status("fp16 …") as status:
        report = export_fp16(bundle, data, eval_split=split, on_stage=lambda s: status.update(f"fp16: {s} …"))
    for w in report.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"{report.path} (sha256 {report.sha256[:12]}…)", highlight=False)
    if not report.measured:
        err.print(f"note: no accuracy measured, so `--precision auto` will not choose fp16; "
                  f"measure it with: mnet export fp16 {bundle} DATA", highlight=False)
        return
    t = Table(title="fp16 vs fp32 (onnxruntime CPU, fp16 weights and activations)")
    for col in ("split", "fp32 accuracy", "fp16 accuracy", "drop (points)", "top-1 agreement"):
        t.add_column(col, justify="right")
    t.add_row(f"{report.split} (n={report.n})", f"{report.fp32_accuracy:.4f}", f"{report.accuracy:.4f}",
              f"{report.drop_points:+.2f}", f"{report.top1_agreement:.3f}")
    console.print(t)


@export_app.command("tensorrt")
def tensorrt_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (from `mnet export onnx`).")],
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8 (int8 needs `mnet calibrate int8` first).")] = "fp32",
    max_batch: Annotated[int, typer.Option(help="Largest batch the engine takes (profile 1..N, optimised for N; --dla: exactly N, smaller batches padded).")] = 8,
    workspace_mb: Annotated[int, typer.Option(help="Builder workspace limit in MiB.")] = 1024,
    timing_cache: Annotated[Optional[Path], typer.Option(help="Timing cache file to read and update "
                                                              "(faster rebuilds).")] = None,
    dla: Annotated[Optional[int], typer.Option(help="Build for this DLA core (Jetson AGX/NX; fp16/int8), "
                                                    "GPU fallback on.")] = None,
    print_trtexec: Annotated[bool, typer.Option("--print-trtexec", help="Print the equivalent trtexec command "
                                                                        "and build nothing.")] = False,
) -> None:
    """Build a TensorRT engine for this GPU and TensorRT version, with its sidecar, into the bundle."""
    if print_trtexec:
        from mnet.export.tensorrt import trtexec_command

        typer.echo(trtexec_command(bundle, precision, max_batch, workspace_mb, timing_cache, dla))
        err.print("note: mnet runs only engines that have the sidecar `mnet export tensorrt` writes", highlight=False)
        return
    from mnet.export.tensorrt import build_engine

    with err.status(f"building the {precision} engine (this can take minutes) …"):
        build = build_engine(bundle, precision, max_batch, workspace_mb, timing_cache, dla)
    i = build.info
    console.print(f"engine → {build.path}", highlight=False)
    console.print(f"  TensorRT {i.tensorrt_version} on {i.gpu_name} (sm {i.compute_capability[0]}.{i.compute_capability[1]}), "
                  f"{i.precision} from {i.onnx_file}, batch {i.min_batch}..{i.max_batch}"
                  f"{', strongly typed' if i.strongly_typed else ''}; sidecar {build.sidecar.name}", highlight=False)


@bundle_app.command("show")
def show(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the card as JSON.")] = False,
) -> None:
    """Print the bundle card: model, preprocessing, metrics, latencies, files and engines."""
    from mnet.bundle import load_bundle

    b = load_bundle(bundle)
    c = b.card
    if as_json:
        print_json(c.to_json())
        return
    t = Table(title=str(b.path), show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    arch = (f"{c.arch.num_layers} layers, width {c.arch.width}, input {c.arch.input_hw[0]}x{c.arch.input_hw[1]}"
            if c.arch else c.display_name)
    t.add_row("model", arch)
    t.add_row("classes", ", ".join(c.classes))
    t.add_row("input", f"{c.input_name} {c.input_shape} float32 NCHW; output {c.output_name} ({c.output})")
    pre = c.preprocess
    t.add_row("preprocessing", f"mean {list(pre.mean)} std {list(pre.std)} {pre.interpolation} "
                               f"rotate_portrait={pre.rotate_portrait}")
    t.add_row("params / MACs", f"{c.params:,} / {c.macs:,}" if c.macs is not None else f"{c.params:,} / -")
    for key, value in c.metrics.items():
        t.add_row(f"metrics.{key}", _brief(value))
    for key, value in c.latency.items():
        t.add_row(f"latency.{key}", _brief(value))
    for key, value in c.precision_choice.items():
        t.add_row(f"precision_choice.{key}", f"{value['chosen']} (" + ", ".join(
            f"{p} {ms:.3g} ms" for p, ms in value["measured"].items()) + f"; {value.get('measured_at', '')})")
    t.add_row("source", f"{c.source.get('checkpoint')} (sha256 {str(c.source.get('sha256'))[:12]}…)")
    t.add_row("tools", ", ".join(f"{k} {v}" for k, v in c.tools.items()))
    files = [p.name for p in (b.onnx_path, b.int8_path, b.fp16_path) if p.is_file()]
    t.add_row("files", ", ".join(files))
    for path, info, why in b.engines():
        t.add_row("engine", f"{path.name}: " + (f"TensorRT {info.tensorrt_version}, {info.gpu_name}, {info.precision}, "
                                                f"batch ≤ {info.max_batch}" if info else f"unusable ({why})"))
    console.print(t)


@bundle_app.command("bench")
def bench(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    backend: Annotated[str, typer.Option(help="auto, onnxruntime, tensorrt or torch.")] = "onnxruntime",
    precision: Annotated[Optional[str], typer.Option(help="fp32 (default), fp16 or int8.")] = None,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 1,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime CPU threads.")] = None,
    seconds: Annotated[float, typer.Option(help="Time at least this long (--all: per precision, over all "
                                                "rounds).")] = 1.0,
    all_precisions: Annotated[bool, typer.Option("--all", help="Measure every precision the bundle has on this "
                                                 "backend and device, side by side, and record the fastest within "
                                                 "the accuracy tolerance for `mnet grade --precision auto`.")] = False,
    rounds: Annotated[int, typer.Option(help="--all: interleaved rounds; each precision's p50 is the median of "
                                             "its round medians.")] = 5,
    tolerance: Annotated[Optional[float], typer.Option(help="--all: largest accuracy drop vs fp32, in points, "
                                                            "of a precision that may be chosen (default 0.5, "
                                                            "the INT8 target).")] = None,
) -> None:
    """Measure the model's latency on this machine and record it in the card (card.latency)."""
    from mnet.errors import ConfigError
    from mnet.runtime.benchmark import ACCURACY_TOLERANCE_POINTS, measure_bundle, measure_precisions

    if not all_precisions:
        key, v = measure_bundle(bundle, backend, precision or "fp32", batch, threads=threads, min_seconds=seconds)
        console.print(f"{key}: p50 {v['p50_ms']:.3f} ms, p90 {v['p90_ms']:.3f} ms over {v['n']} runs on "
                      f"{v['device']} → {bundle / 'mnet.json'}")
        return
    if precision is not None:
        raise ConfigError(f"--all measures every precision; drop --precision {precision}")
    with err.status(f"timing every precision of {bundle} in {rounds} rounds …"):
        key, e = measure_precisions(bundle, backend, batch, threads=threads, rounds=rounds, min_seconds=seconds,
                                    tolerance=ACCURACY_TOLERANCE_POINTS if tolerance is None else tolerance)
    t = Table(title=f"{key}, batch {batch}")
    for col in ("precision", "p50 ms", "vs fp32", "accuracy drop", ""):
        t.add_column(col, justify="left" if col in ("precision", "") else "right")
    for p, ms in e["measured"].items():
        drop = e["accuracy_drop"].get(p)
        note = "chosen" if p == e["chosen"] else e["ineligible"].get(p, "slower")
        t.add_row(p, f"{ms:.3f}", f"{e['measured']['fp32'] / ms:.2f}×", "-" if drop is None else f"{drop:+.2f}",
                  escape(note))
    for p, why in e["unavailable"].items():
        t.add_row(p, "-", "-", "-", escape(f"not measured: {why}"))
    console.print(t)
    console.print(f"precision auto → {e['chosen']} (tolerance {e['tolerance_points']:g} points) "
                  f"→ {bundle / 'mnet.json'}", highlight=False)


def _brief(value) -> str:
    if not isinstance(value, dict):
        return str(value)
    keep = {k: v for k, v in value.items() if not isinstance(v, (dict, list)) or k == "warnings"}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items())


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
    app.add_typer(bundle_app, name="bundle")
