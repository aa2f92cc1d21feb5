"""`mnet train` and `mnet evaluate`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from mnet.cli._common import console, err, metrics_table, progress_bar

log = logging.getLogger(__name__)


def train(
    data: Annotated[Path, typer.Argument(help="Dataset directory (AICUP csv layout or ImageFolder).")],
    out: Annotated[Path, typer.Option("--out", help="Run directory: metrics.jsonl, last.pt, best.pt.")],
    arch: Annotated[Optional[Path], typer.Option("--arch", help="arch.json to train (from `mnet search` or "
                                                 "`mnet arch sample`).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Instead of --arch: a torchvision baseline "
                     "(alexnet, vgg16, resnext50_32x4d, densenet121, shufflenet_v2_x1_0).")] = None,
    input_size: Annotated[int, typer.Option(help="Baselines: square input size.")] = 224,
    pretrained: Annotated[bool, typer.Option(help="Baselines: start from ImageNet weights in the local torch "
                                             "cache (never downloaded).")] = False,
    epochs: Annotated[int, typer.Option(help="Epochs (paper: 100).")] = 100,
    batch_size: Annotated[int, typer.Option(help="Batch size (paper: 128).")] = 128,
    lr: Annotated[float, typer.Option(help="SGD learning rate (paper: 0.001).")] = 0.001,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 5e-4,
    lr_schedule: Annotated[str, typer.Option(help="cosine (decay to zero over the epochs; the default, as ENAS "
                                                  "anneals) or constant (the paper's fixed lr 0.001).")] = "cosine",
    flip_p: Annotated[float, typer.Option(help="Horizontal flip probability (paper: 0.5).")] = 0.5,
    dropout: Annotated[float, typer.Option(help="Dropout before the classifier.")] = 0.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision (bf16 where supported).")] = False,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model (GPU; a one-off "
                                                "compile time, faster epochs).")] = False,
    fast_depthwise: Annotated[bool, typer.Option(help="MNet: time conv vs the exact dense and FFT depthwise "
                                                      "forms per layer shape once and use the fastest.")] = True,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt (same options).")] = False,
    strict: Annotated[bool, typer.Option(help="Fail on unreadable images instead of skipping them.")] = False,
) -> None:
    """Train an architecture (or, as `mnet baseline`, a torchvision model) from scratch; keeps the best
    dev-accuracy epoch in OUT/best.pt."""
    from mnet.arch import Arch
    from mnet.errors import ConfigError
    from mnet.io import read_json
    from mnet.preprocess import Preprocess
    from mnet.search.baselines import train_baseline
    from mnet.search.train import TrainConfig
    from mnet.search.train import train as run_train

    if (arch is None) == (model is None):
        raise ConfigError("give exactly one of --arch ARCH.json (an MNet) or --model NAME (a torchvision baseline)")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                      lr_schedule=lr_schedule, flip_p=flip_p, dropout=dropout, device=device, amp=amp, seed=seed,
                      compile=compile_model, fast_depthwise=fast_depthwise)
    if arch is not None:
        a = Arch.from_json(read_json(arch, "arch.json"))
        pre = Preprocess(a.input_hw)

        def run(**kw):
            return run_train(data, a, out, cfg, preprocess=pre, arch_source=str(arch), **kw)
    else:
        pre = Preprocess((input_size, input_size))

        def run(**kw):
            return train_baseline(data, model, out, cfg, input_size=input_size, pretrained=pretrained, **kw)
    splits = _load_with_progress(data, pre, strict)
    if arch is not None and len(splits["train"].classes) != a.num_classes:  # train() sets the head from the data
        console.print(f"{arch}: {a.num_classes}-class head; training with {len(splits['train'].classes)} "
                      f"(the classes of {data})", highlight=False, markup=False)
    with progress_bar() as p:
        task = p.add_task("train", total=epochs, info="")
        step_task = p.add_task("  epoch", total=None, info="")

        def on_step(epoch: int, step: int, steps: int) -> None:
            p.update(step_task, completed=step, total=steps, description=f"  epoch {epoch + 1}")

        def on_epoch(r: dict) -> None:
            p.update(task, completed=r["epoch"],
                     info=f"loss {r['train_loss']:.3f} dev acc {r['dev_acc']:.3f}")

        result = run(resume=resume, splits=splits, on_step=on_step, on_epoch=on_epoch)
    console.print(f"best dev accuracy {result.best_dev_accuracy:.4f} at epoch {result.best_epoch}; "
                  f"{result.seconds:.1f}s → {out / 'best.pt'}")


def _load_with_progress(data: Path, pre, strict: bool, splits=("train", "dev")):
    from mnet.search.train import load_splits

    with progress_bar(transient=True) as p:
        task = p.add_task("load", total=None, info="")
        out = load_splits(data, pre, splits, strict=strict,
                          progress=lambda d, t: p.update(task, completed=d, total=t))
    for s in out.values():
        if s.skipped:
            err.print(f"[yellow]skipped {len(s.skipped)} unreadable image(s) in {s.name}:[/]")
            for where, why in s.skipped:
                err.print(f"  {where}: {why}", highlight=False, markup=False)
    return out


def evaluate(
    model: Annotated[Path, typer.Argument(help="Checkpoint (RUN/best.pt) or bundle directory.")],
    data: Annotated[Path, typer.Argument(help="Dataset directory.")],
    split: Annotated[str, typer.Option(help="train, dev or test.")] = "test",
    backend: Annotated[str, typer.Option(help="For bundles: onnxruntime, tensorrt or torch.")] = "onnxruntime",
    precision: Annotated[str, typer.Option(help="For bundles: fp32, fp16 or int8.")] = "fp32",
    device: Annotated[str, typer.Option(help="For checkpoints: auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 256,
    plot: Annotated[Optional[Path], typer.Option(help="Confusion matrix PNG (default: beside the model).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the metrics as JSON here.")] = None,
) -> None:
    """Accuracy (weighted average recall), per-class recall, macro-F1 and the confusion matrix."""
    from mnet.errors import DataError
    from mnet.io import write_json

    if model.is_dir() and (model / "mnet.json").is_file():
        from mnet.runtime.evaluate import evaluate_bundle

        metrics = evaluate_bundle(model, data, split=split, backend=backend, precision=precision,
                                  batch_size=batch_size)
        default_plot = model / f"confusion.{split}.{backend}.{precision}.png"
        label = f"{model} ({backend} {precision})"
    else:
        from mnet.search.batches import DeviceData
        from mnet.search.checkpoint import build_model, load_checkpoint
        from mnet.search.train import evaluate as run_eval
        from mnet.search.train import resolve_device

        ckpt = load_checkpoint(model)
        split_data = _load_with_progress(data, ckpt.preprocess, False, (split,))[split]
        if not split_data.labelled:
            raise DataError(f"{data}: split '{split}' has no labels; evaluate on train or dev")
        if tuple(split_data.classes) != tuple(ckpt.classes):
            raise DataError(f"{data}: classes {split_data.classes} differ from the model's {ckpt.classes}")
        dev = resolve_device(device)
        net = build_model(ckpt).to(dev)
        metrics, _ = run_eval(net, DeviceData(split_data, ckpt.preprocess, dev), ckpt.classes, batch_size)
        default_plot = ckpt.path.parent / "confusion.png"
        label = str(ckpt.path)
    console.print(metrics_table(metrics, title=f"{label} on {split}"))
    console.print(f"accuracy (weighted average recall) {metrics.accuracy:.4f}  macro-F1 {metrics.macro_f1:.4f}  "
                  f"n={metrics.n}")
    if model.is_dir() and (model / "mnet.json").is_file():
        from mnet.runtime.evaluate import card_accuracy

        recorded = card_accuracy(model, split, precision)
        if recorded is not None:  # the card's figures are onnxruntime CPU ones (mnet calibrate int8)
            same = backend == "onnxruntime" and round(recorded, 4) == round(metrics.accuracy, 4)
            verdict = "the same" if same else ("differs" if backend == "onnxruntime" else f"{backend} here")
            console.print(f"card: {precision} accuracy on {split} {recorded:.4f} (onnxruntime CPU) — {verdict}")
    if json_out:
        write_json(json_out, metrics.to_json())
    try:
        from mnet.plots import plot_confusion

        plot_confusion(metrics, plot or default_plot, title=f"{split}: accuracy {metrics.accuracy:.3f}")
        console.print(f"confusion matrix → {plot or default_plot}")
    except Exception as e:  # a missing matplotlib must not lose the printed metrics
        log.warning("no confusion plot: %s", e)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("baseline", help="Train a torchvision baseline (paper Table 2) with the same pipeline as "
                "`mnet train`: `mnet baseline DATA --model NAME --out RUN`.")(train)
    app.command("evaluate")(evaluate)
