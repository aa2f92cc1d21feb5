"""`mnet calibrate ...`: calibration for a target device (INT8, the open-set gate; latency tables join this sub-app)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mnet.cli._common import console, err

__all__ = ["calibrate_app", "register"]

calibrate_app = typer.Typer(help="Calibrate for a target: INT8 quantisation of a bundle, latency tables.",
                            no_args_is_help=True)


@calibrate_app.command("int8")
def int8(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (from `mnet export onnx`).")],
    data: Annotated[Path, typer.Argument(help="Dataset: train images calibrate, the dev split measures.")],
    samples: Annotated[int, typer.Option(help="Calibration images from the train split (300+ recommended).")] = 512,
    method: Annotated[str, typer.Option(help="minmax, entropy or percentile.")] = "minmax",
    per_channel: Annotated[bool, typer.Option("--per-channel/--no-per-channel",
                                              help="Per-channel weight scales.")] = True,
    activations: Annotated[str, typer.Option(help="int8 (symmetric, TensorRT-compatible) or uint8 "
                                                  "(asymmetric, onnxruntime CPU only).")] = "int8",
    split: Annotated[str, typer.Option(help="Split the fp32 and int8 accuracies are measured on.")] = "dev",
    keep_fp32: Annotated[str, typer.Option(help="Nodes left in fp32: none; auto (time each op type and each Conv "
                                                "at int8 vs fp32 on this CPU, keep fp32 those slower at int8); or "
                                                "a comma list of op types / node names.")] = "none",
    threads: Annotated[int, typer.Option(help="onnxruntime threads the --keep-fp32 auto timing uses (as "
                                              "deployed).")] = 1,
) -> None:
    """Quantise model.onnx to model.int8.onnx (QDQ) and record fp32 vs int8 accuracy in the card."""
    from mnet.calibration.int8 import calibrate_int8

    # The library logs its warnings; the report carries them too and is printed below, so without -v
    # the log copy would only repeat them.
    lib_log = logging.getLogger("mnet.calibration.int8")
    level = lib_log.level
    if not lib_log.isEnabledFor(logging.INFO):
        lib_log.setLevel(logging.ERROR)
    try:
        with err.status("int8 …") as status:
            report = calibrate_int8(bundle, data, samples, method, per_channel, activations=activations,
                                    eval_split=split, keep_fp32=keep_fp32, threads=threads,
                                    on_stage=lambda s: status.update(f"int8: {s} …"))
    finally:
        lib_log.setLevel(level)
    for w in report.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    t = Table(title=f"{report.path} ({report.method}, {report.calibration_images} calibration images)")
    for col in ("split", "fp32 accuracy", "int8 accuracy", "drop (points)", "top-1 agreement"):
        t.add_column(col, justify="right")
    t.add_row(f"{report.split} (n={report.n})", f"{report.fp32_accuracy:.4f}", f"{report.accuracy:.4f}",
              f"{report.drop_points:+.2f}", f"{report.top1_agreement:.3f}")
    console.print(t)
    kept = report.keep_fp32
    if kept["op_types"] or kept["nodes"]:
        line = f"kept fp32 ({kept['mode']}): " + ", ".join(kept["op_types"] + kept["nodes"])
        if kept["mode"] == "auto":
            line += (f"; {kept['int8_ms']:.3f} ms vs all-int8 {kept['all_int8_ms']:.3f} ms, fp32 {kept['fp32_ms']:.3f} "
                     f"ms ({kept['threads']} thread(s))")
        console.print(line, highlight=False, soft_wrap=True)
    elif kept["mode"] == "auto":
        console.print(f"kept fp32 (auto): nothing measured faster in fp32; int8 {kept['int8_ms']:.3f} ms, "
                      f"fp32 {kept['fp32_ms']:.3f} ms", highlight=False, soft_wrap=True)
    if not report.tensorrt_compatible and report.activations == "uint8":
        err.print("note: uint8 activations run on onnxruntime CPU only; TensorRT needs --activations int8")


@calibrate_app.command("open-set")
def open_set(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (from `mnet export onnx`).")],
    data: Annotated[Path, typer.Argument(help="Dataset whose split calibrates the max-softmax threshold.")],
    fruit_reject: Annotated[float, typer.Option(help="Share of the split's fruit the threshold may reject.")] = 0.02,
    adopt: Annotated[bool, typer.Option(help="Turn the threshold on in `mnet grade` (bench/results/foreign.json "
                                        "measured whether it helps).")] = False,
    split: Annotated[str, typer.Option(help="Split to calibrate on.")] = "dev",
) -> None:
    """Calibrate the grader's open-set gate (max-softmax threshold) and record it in the card's open_set."""
    from mnet.calibration.open_set import calibrate_open_set

    rec = calibrate_open_set(bundle, data, split=split, fruit_reject=fruit_reject, adopt=adopt)
    console.print(f"max-softmax threshold {rec['msp_threshold']:.4f} rejects {fruit_reject:.1%} of {split} "
                  f"(n={rec['n']}); {'adopted' if adopt else 'recorded, not adopted (--adopt turns it on)'}")


def register(app: typer.Typer) -> None:
    app.add_typer(calibrate_app, name="calibrate")
