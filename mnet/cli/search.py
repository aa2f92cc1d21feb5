"""`mnet search` and `mnet derive`: thin wrappers around `mnet.search.enas` and `mnet.search.derive`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mnet.cli._common import (DilationsOpt, InputSizeOpt, KernelsOpt, LayersOpt, StemStrideOpt, WidthOpt, console, err,
                              progress_bar, space_options)


def search(
    data: Annotated[Path, typer.Argument(help="Dataset directory; its train split is searched (80% weights, "
                                               "20% rewards).")],
    out: Annotated[Path, typer.Option("--out", help="Run directory: supernet.pt, controller.pt, metrics.jsonl, "
                                                    "arch.json, topk.json, search.json, plots.")],
    preset: Annotated[str, typer.Option(help="Search space: tiny, mnet-24-32 or mnet-120-160 (the next six options "
                                             "replace parts of it).")] = "mnet-24-32",
    input_size: InputSizeOpt = None,
    layers: LayersOpt = None,
    width: WidthOpt = None,
    stem_stride: StemStrideOpt = None,
    kernels: KernelsOpt = None,
    dilations: DilationsOpt = None,
    strategy: Annotated[str, typer.Option(help="enas (LSTM controller) or random (same budget, uniform).")] = "enas",
    schedule: Annotated[str, typer.Option(help="two-stage (supernet, then controller; paper) or alternating "
                                               "(original ENAS).")] = "two-stage",
    supernet_epochs: Annotated[int, typer.Option(help="Supernet epochs (paper: 100).")] = 100,
    controller_steps: Annotated[int, typer.Option(help="Controller steps = architectures sampled and scored, "
                                                  "one validation minibatch per update (paper: 5000).")] = 5000,
    controller_batch: Annotated[int, typer.Option(help="Architectures per controller update (REINFORCE "
                                                  "averaged over them; paper: 1). Global under torchrun: the "
                                                  "ranks score them in parallel, so a multiple of the ranks "
                                                  "makes the controller phase N× faster. All of an update's "
                                                  "architectures are scored on one minibatch, each against the "
                                                  "mean of the others.")] = 5,
    derive_samples: Annotated[int, typer.Option(help="Architectures sampled and scored to pick the result.")] = 100,
    controller_lr: Annotated[float, typer.Option(help="Controller Adam learning rate (paper: 0.1; the default is "
                                                      "measured with the planted-reward test, see "
                                                      "search/controller.py).")] = 0.03,
    lr: Annotated[float, typer.Option(help="Supernet SGD learning rate (paper: 0.01).")] = 0.01,
    batch_size: Annotated[int, typer.Option(help="Batch size of supernet steps and reward minibatches.")] = 128,
    bn: Annotated[str, typer.Option(help="BatchNorm when scoring a path: batch, running or recalibrate.")] = "batch",
    sharing: Annotated[str, typer.Option(help="How supernet ops share weights: entangled (every kernel of a "
                                              "dilation is the centre of the layer's largest) or exact (only ops "
                                              "identical after cropping). See search/supernet.py.")] = "entangled",
    rescore_top: Annotated[int, typer.Option(help="Re-score the best K one-minibatch candidates on the whole "
                                                  "reward split before picking (0: the minibatch decides).")] = 10,
    lr_schedule: Annotated[str, typer.Option(help="Supernet learning rate: cosine (to zero over the epochs) or "
                                                  "constant (Table 1).")] = "cosine",
    val_fraction: Annotated[float, typer.Option(help="Share of the train split held out for rewards.")] = 0.2,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision (bf16 where supported).")] = False,
    compile_ops: Annotated[bool, typer.Option("--compile", help="torch.compile each supernet op module (GPU; "
                                              "a one-off compile time, faster steps).")] = False,
    fast_depthwise: Annotated[bool, typer.Option(help="Time conv vs the exact dense and FFT depthwise forms per "
                                                      "op shape once and use the fastest (minutes on a CPU, pays "
                                                      "off).")] = True,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the search in OUT (same options).")] = False,
    strict: Annotated[bool, typer.Option(help="Fail on unreadable images instead of skipping them.")] = False,
    latency_table: Annotated[Optional[Path], typer.Option(help="latency.json of the target device "
                                                          "(`mnet calibrate latency`): adds latency to the reward.")]
    = None,
    latency_budget_ms: Annotated[Optional[float], typer.Option(help="Latency budget T in ms (with --latency-table).")]
    = None,
    latency_mode: Annotated[str, typer.Option(help="soft (α=β=−0.07) or hard (α=0, β=−1): "
                                              "R = acc × (LAT/T)^w, w = α if LAT ≤ T else β.")] = "soft",
    latency_alpha: Annotated[Optional[float], typer.Option(help="Override α.")] = None,
    latency_beta: Annotated[Optional[float], typer.Option(help="Override β.")] = None,
) -> None:
    """Search for an architecture with ENAS (or random search); writes OUT/arch.json for `mnet train`."""
    from mnet.cli.train import _load_with_progress
    from mnet.data import open_dataset
    from mnet.preprocess import Preprocess
    from mnet.search.controller import ControllerConfig
    from mnet.search.enas import SearchConfig, check_run_dir
    from mnet.search.enas import search as run_search

    from mnet.cli.research import latency_reward_from_options
    from mnet.search.distributed import current as current_dist
    from mnet.search.research import annotate_arch

    check_run_dir(out, resume)
    cfg = SearchConfig(preset=preset, **space_options(input_size, layers, width, stem_stride, kernels, dilations),
                       strategy=strategy, schedule=schedule, supernet_epochs=supernet_epochs,
                       derive_samples=derive_samples, batch_size=batch_size, lr=lr, bn=bn, val_fraction=val_fraction,
                       sharing=sharing, rescore_top=rescore_top, lr_schedule=lr_schedule,
                       controller=ControllerConfig(steps=controller_steps, lr=controller_lr),
                       controller_batch=controller_batch,
                       seed=seed, device=device, amp=amp, fast_depthwise=fast_depthwise,
                       compile=compile_ops)
    space = cfg.space()
    # a table of another space is refused now, not at the first reward after hours of supernet training
    reward, latency_meta = latency_reward_from_options(
        latency_table, latency_budget_ms, latency_mode, latency_alpha, latency_beta,
        space=space.with_classes(len(open_dataset(data).classes)) if latency_table is not None else None)
    splits = _load_with_progress(data, Preprocess(space.input_hw), strict, ("train",))
    with progress_bar() as p:
        tasks = {"supernet": p.add_task("supernet", total=supernet_epochs, info="")}
        tasks["batch"] = p.add_task("  epoch", total=None, info="")
        if strategy == "enas":
            tasks["controller"] = p.add_task("controller", total=controller_steps, info="")
        tasks["derive"] = p.add_task("derive", total=cfg.derive_budget, info="")

        def progress(stage: str, done: int, total: int, info: dict) -> None:
            if stage == "batch":
                p.update(tasks["batch"], completed=done, total=total, description=f"  epoch {info['epoch']}")
            elif stage == "supernet":
                p.update(tasks["supernet"], completed=done, info=f"loss {info['loss']:.3f} acc {info['acc']:.3f}")
            elif stage == "controller":
                p.update(tasks["controller"], completed=done,
                         info=f"reward {info['reward']:.3f} baseline {info['baseline']:.3f} "
                              f"entropy {info['entropy']:.2f}")
            else:
                p.update(tasks[stage], completed=done, total=total)

        try:
            result = run_search(data, out, cfg, reward=reward, resume=resume, splits=splits, progress=progress)
        except KeyboardInterrupt:
            p.stop()
            err.print(f"interrupted: the search state is saved in {out}; continue it with the same command "
                      "and --resume", highlight=False, markup=False)
            raise typer.Exit(130) from None
    b = result.best
    if latency_meta and current_dist().is_main:  # under torchrun only rank 0 writes
        annotate_arch(out, latency_meta, b)
        console.print(f"predicted latency {b.extras['latency_ms']:.3f} ms (budget {latency_budget_ms:g} ms on "
                      f"{latency_meta['table_fingerprint']})", highlight=False, markup=False)
    console.print(f"arch → {out / 'arch.json'}  (reward {b.reward:.4f}, reward-split accuracy {b.accuracy:.4f}, "
                  f"{b.arch.num_params():,} params, {b.arch.macs():,} MACs; {result.seconds:.1f}s on {result.device})")
    console.print(f"next: mnet train {data} --arch {out / 'arch.json'} --out RUN", highlight=False, markup=False)


def derive(
    run: Annotated[Path, typer.Argument(help="A `mnet search` output directory.")],
    samples: Annotated[Optional[int], typer.Option(help="Sample N architectures and keep the best on one validation "
                                                        "minibatch (default: the search's own budget).")] = None,
    argmax: Annotated[bool, typer.Option("--argmax", help="Take the most probable decision at every step "
                                                          "instead of sampling.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Re-derive RUN/arch.json and RUN/topk.json from the saved supernet and controller."""
    from mnet.errors import ConfigError
    from mnet.search.derive import derive_run
    from mnet.search.enas import open_run

    if argmax and samples is not None:
        raise ConfigError("--samples and --argmax exclude each other: pass one of them")
    opened = open_run(run, device=device)
    with progress_bar(transient=True) as p:
        task = p.add_task("derive", total=samples, info="")
        best = derive_run(run, samples=samples, argmax=argmax, opened=opened,
                          on_sample=lambda i, n: p.update(task, completed=i, total=n))
    console.print(f"arch → {run / 'arch.json'}  (reward {best.reward:.4f}, one-minibatch accuracy "
                  f"{best.accuracy:.4f}, {best.arch.num_params():,} params); top-k → {run / 'topk.json'}")


def register(app: typer.Typer) -> None:
    app.command("search")(search)
    app.command("derive")(derive)
