"""Training from scratch (paper: SGD lr 0.001, momentum 0.9, wd 5e-4, 100 epochs, batch 128, flip).

Read top to bottom: config → `train()` (data, model) → `fit()` (the loop: one epoch of SGD, evaluate
on dev, checkpoint) → helpers. `fit` takes any nn.Module, so the torchvision baselines share it.
Progress goes out through callbacks; the CLI owns the console.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnet.arch import Arch
from mnet.data import Dataset, Split
from mnet.errors import CheckpointError, ConfigError
from mnet.io import write_json
from mnet.metrics import Metrics, compute_metrics
from mnet.preprocess import Preprocess
from mnet.search.batches import DeviceData, fast_path
from mnet.search.checkpoint import load_checkpoint, save_checkpoint
from mnet.search.depthwise import depthwise_impls, restore_depthwise, select_depthwise, set_depthwise_impls
from mnet.search.distributed import setup as setup_distributed
from mnet.search.model import MNet

__all__ = ["TrainConfig", "TrainResult", "train", "fit", "predict", "evaluate", "resolve_device", "lr_at",
           "autocast", "load_splits"]

log = logging.getLogger(__name__)

StepCallback = Optional[Callable[[int, int, int], None]]  # (epoch, step, steps)
EpochCallback = Optional[Callable[[dict], None]]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # or "constant"
    flip_p: float = 0.5
    dropout: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    eval_batch_size: int = 512
    fast_depthwise: bool = True  # exact dense / FFT depthwise where timing says faster (search.depthwise)
    compile: bool = False  # torch.compile the model (pays off on long GPU runs)

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs >= 1, "expected >= 1"),
            ("batch_size", self.batch_size >= 1, "expected >= 1"),
            ("lr", self.lr > 0, "expected > 0"),
            ("momentum", 0 <= self.momentum < 1, "expected in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "expected >= 0"),
            ("lr_schedule", self.lr_schedule in ("cosine", "constant"), "expected cosine or constant"),
            ("flip_p", 0 <= self.flip_p <= 1, "expected in [0, 1]"),
            ("dropout", 0 <= self.dropout < 1, "expected in [0, 1)"),
            ("device", self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             "expected auto, cpu or cuda"),
        ]
        for name, ok, fix in checks:
            if not ok:
                raise ConfigError(f"train option '{name}' = {getattr(self, name)!r}: {fix}")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TrainResult:
    out: Path
    best_epoch: int
    best_dev_accuracy: float
    epochs_run: int
    seconds: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast where supported (no loss scaling needed), else fp16 on CUDA."""
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return torch.autocast(device.type, dtype=dtype)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate for a 0-based epoch: constant, or cosine decay to zero over the run."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))


def load_splits(data_root: str | os.PathLike, preprocess: Preprocess, splits=("train", "dev"),
                strict: bool = False, progress=None) -> dict[str, Split]:
    ds = Dataset(data_root)
    return {s: ds.load(s, preprocess, strict=strict, progress=progress) for s in splits}


@torch.no_grad()
def predict(model: nn.Module, data: DeviceData, batch_size: int = 512, amp: bool = False) -> tuple[np.ndarray, float]:
    """Softmax probabilities for every item (in order) and the mean cross-entropy."""
    model.eval()
    probs, loss_sum = [], torch.zeros((), device=data.device)
    for x, y in data.batches(batch_size):
        with autocast(data.device, amp):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        probs.append(logits.softmax(1))
    return torch.cat(probs).cpu().numpy(), float(loss_sum) / max(1, len(data))


def evaluate(model: nn.Module, data: DeviceData, classes, batch_size: int = 512, amp: bool = False) -> tuple[Metrics, float]:
    probs, loss = predict(model, data, batch_size, amp)
    return compute_metrics(data.labels.cpu().numpy(), probs, classes), loss


def train(data_root: str | os.PathLike, arch: Arch, out: str | os.PathLike, cfg: TrainConfig, *,
          resume: bool = False, preprocess: Preprocess | None = None, splits: dict[str, Split] | None = None,
          arch_source: str | None = None, on_step: StepCallback = None, on_epoch: EpochCallback = None) -> TrainResult:
    """Train an MNet from scratch on DATA's train split, selecting the best epoch on dev."""
    preprocess = preprocess or Preprocess(arch.input_hw)
    if tuple(preprocess.input_hw) != tuple(arch.input_hw):
        raise ConfigError(f"preprocess input_hw {preprocess.input_hw} differs from the arch's {arch.input_hw}")
    splits = splits or load_splits(data_root, preprocess)
    classes = splits["train"].classes
    if len(classes) != arch.num_classes:
        # An arch is the body; the head is sized by the data (`mnet arch sample` defaults to 3 classes).
        log.info("arch has a %d-class head; DATA has %d classes (%s): the head is set to %d",
                 arch.num_classes, len(classes), ", ".join(classes), len(classes))
        arch = replace(arch, num_classes=len(classes))
    torch.manual_seed(cfg.seed)
    model = MNet(arch, dropout=cfg.dropout)
    meta = {"kind": "mnet", "arch": arch.to_json(), "dataset": str(Path(data_root).resolve()),
            # where the arch came from (e.g. a search run's arch.json), so reports can find the search
            "arch_source": str(Path(arch_source).resolve()) if arch_source else None}
    return fit(model, splits["train"], splits["dev"], out, cfg, preprocess, meta, resume=resume,
               on_step=on_step, on_epoch=on_epoch)


def fit(model: nn.Module, train_split: Split, dev_split: Split, out: str | os.PathLike, cfg: TrainConfig,
        preprocess: Preprocess, meta: dict[str, Any], *, resume: bool = False,
        on_step: StepCallback = None, on_epoch: EpochCallback = None) -> TrainResult:
    out = Path(out)
    dist, device = setup_distributed(cfg.device)  # one rank of a torchrun job, or alone (search.distributed)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_data = DeviceData(train_split, preprocess, device)
    dev_data = DeviceData(dev_split, preprocess, device)
    model = dist.wrap_batchnorm(model.to(device), device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    classes = train_split.classes
    start_epoch, best_acc, best_epoch, elapsed = 0, -1.0, -1, 0.0
    metrics_path = out / "metrics.jsonl"

    if resume:  # every rank reads the same last.pt
        start_epoch, best_acc, best_epoch, elapsed = _restore(out / "last.pt", model, optimizer, gen, cfg, device)
        if dist.is_main:
            _truncate_metrics(metrics_path, start_epoch)
    else:
        if cfg.fast_depthwise:  # timed on rank 0 only, so every rank computes with the same kernels
            if dist.is_main:
                select_depthwise(model, batch=cfg.batch_size, amp=cfg.amp)
            set_depthwise_impls(model, dist.broadcast(depthwise_impls(model)))
        if dist.is_main and metrics_path.exists():
            metrics_path.unlink()
    if dist.is_main:
        write_json(out / "train.json", {"config": asdict(cfg), **meta, "classes": list(classes),
                                        "preprocess": preprocess.to_json()})
    fast_path(model, [train_data, dev_data], device, [model] if cfg.compile else None)

    t_start = time.time() - elapsed
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # one pass of SGD over the train split; metrics accumulate on the device (no per-step sync)
        model.train()
        steps = train_data.num_batches(cfg.batch_size)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for step, (x, y) in enumerate(train_data.batches(cfg.batch_size, shuffle=True, flip_p=cfg.flip_p,
                                                          generator=gen, shard=dist.shard), start=1):
            with autocast(device, cfg.amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            # under torchrun: this rank's share of the global-batch mean, gradients summed over ranks
            n_global = min(cfg.batch_size, len(train_data) - (step - 1) * cfg.batch_size)
            (loss * dist.loss_weight(len(y), n_global)).backward()
            dist.all_reduce_gradients(model.parameters())
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            if on_step is not None:
                on_step(epoch, step, steps)

        # ranks: global epoch metrics, and one set of BN statistics for the checkpoint and the next epoch
        dist.all_reduce_sum(loss_sum, correct)
        dist.average_buffers(model)

        # evaluate on dev (every rank holds the same model), keep the best; rank 0 writes
        dev_metrics, dev_loss = evaluate(model, dev_data, classes, cfg.eval_batch_size, cfg.amp)
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": float(loss_sum) / len(train_data),
            "train_acc": float(correct) / len(train_data),
            "dev_loss": dev_loss,
            "dev_acc": dev_metrics.accuracy,
            "dev_macro_f1": dev_metrics.macro_f1,
            "seconds": time.time() - t0,
        }
        improved = dev_metrics.accuracy > best_acc
        if improved:
            best_acc, best_epoch = dev_metrics.accuracy, epoch + 1
        if dist.is_main:
            _save_epoch(out, model, optimizer, gen, device, cfg, meta, classes, preprocess, epoch, dev_metrics,
                        dev_loss, record, improved, best_acc, best_epoch, time.time() - t_start)
        if on_epoch is not None:
            on_epoch(record)

    return TrainResult(out, best_epoch, best_acc, cfg.epochs - start_epoch, time.time() - t_start)


def _save_epoch(out: Path, model: nn.Module, optimizer, gen: torch.Generator, device: torch.device,
                cfg: TrainConfig, meta: dict[str, Any], classes, preprocess: Preprocess, epoch: int,
                dev_metrics: Metrics, dev_loss: float, record: dict, improved: bool, best_acc: float,
                best_epoch: int, elapsed: float) -> None:
    """best.pt when improved, last.pt (with everything a resume needs), then the metrics line."""
    payload = {
        **meta,
        "classes": list(classes),
        "preprocess": preprocess.to_json(),
        "config": asdict(cfg),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "epoch": epoch + 1,
        "metrics": {"dev": dev_metrics.to_json(), "dev_loss": dev_loss, "train_loss": record["train_loss"]},
    }
    if improved:
        save_checkpoint(out / "best.pt", payload)
    save_checkpoint(out / "last.pt", {
        **payload,
        "optimizer": optimizer.state_dict(),
        "rng": {"generator": gen.get_state(), "torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
        "best": {"accuracy": best_acc, "epoch": best_epoch},
        "depthwise": depthwise_impls(model),
        "elapsed": elapsed,
    })
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _restore(path: Path, model: nn.Module, optimizer, gen: torch.Generator, cfg: TrainConfig,
             device: torch.device) -> tuple[int, float, int, float]:
    if not path.is_file():
        raise CheckpointError(f"--resume: {path} not found; start without --resume")
    ckpt = load_checkpoint(path, map_location=device)
    raw = ckpt.raw
    if "optimizer" not in raw:
        raise CheckpointError(f"{path}: has no optimizer state to resume from")
    saved = TrainConfig.from_json(ckpt.config)
    if {**asdict(saved), "epochs": 0, "device": ""} != {**asdict(cfg), "epochs": 0, "device": ""}:
        diff = {k: (v, getattr(cfg, k)) for k, v in asdict(saved).items() if k not in ("epochs", "device")
                and getattr(cfg, k) != v}
        raise CheckpointError(f"--resume: options differ from the run being resumed {diff}; pass the same options")
    model.load_state_dict(ckpt.state_dict)
    # the same depthwise implementations as before the interruption, so the run continues bit for bit
    restore_depthwise(model, raw)
    optimizer.load_state_dict(raw["optimizer"])
    gen.set_state(raw["rng"]["generator"])
    torch.set_rng_state(raw["rng"]["torch"])
    if "cuda" in raw["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(raw["rng"]["cuda"], device)
    return ckpt.epoch, float(raw["best"]["accuracy"]), int(raw["best"]["epoch"]), float(raw.get("elapsed", 0.0))


def _truncate_metrics(path: Path, epochs: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (a kill between the two writes)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()[:epochs]
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
