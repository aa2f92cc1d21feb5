"""Checkpoints: save atomically, load with `weights_only=True`, rebuild the model they describe.

A checkpoint is a plain dict of tensors and JSON-able values (never pickled objects), so it loads
with `torch.load(..., weights_only=True)` and carries everything needed downstream: the model's
`kind` and arch (or baseline name), preprocessing, classes, the training config and metrics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnet.arch import Arch
from mnet.errors import CheckpointError, MnetError
from mnet.io import atomic_path
from mnet.preprocess import Preprocess

__all__ = ["FORMAT", "Checkpoint", "save_checkpoint", "load_checkpoint", "build_model"]

FORMAT = "mnet-checkpoint/1"


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    kind: str  # "mnet" or "torchvision"
    preprocess: Preprocess
    classes: tuple[str, ...]
    state_dict: dict[str, torch.Tensor]
    arch: Arch | None = None
    model_name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def display_name(self) -> str:
        return self.model_name or "mnet"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt / foreign files
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                              "it must be written by mnet (weights_only loading refuses pickled objects)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mnet checkpoint (format {raw.get('format') if isinstance(raw, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    try:
        kind = raw["kind"]
        arch = Arch.from_json(raw["arch"]) if raw.get("arch") else None
        return Checkpoint(
            path=path,
            kind=kind,
            preprocess=Preprocess.from_json(raw["preprocess"]),
            classes=tuple(raw["classes"]),
            state_dict=raw["model"],
            arch=arch,
            model_name=raw.get("model_name"),
            config=dict(raw.get("config") or {}),
            epoch=int(raw.get("epoch", 0)),
            metrics=dict(raw.get("metrics") or {}),
            raw=raw,
        )
    except (KeyError, TypeError, MnetError) as e:
        raise CheckpointError(f"{path}: incomplete checkpoint ({e})") from None


def build_model(ckpt: Checkpoint, load_weights: bool = True) -> nn.Module:
    """The nn.Module a checkpoint describes, in eval mode, with its weights."""
    if ckpt.kind == "mnet":
        from mnet.search.model import MNet

        model: nn.Module = MNet(ckpt.arch, dropout=float(ckpt.config.get("dropout", 0.0)))
    elif ckpt.kind == "torchvision":
        from mnet.search.baselines import build_baseline

        model = build_baseline(ckpt.model_name, len(ckpt.classes))
    else:
        raise CheckpointError(f"{ckpt.path}: unknown model kind {ckpt.kind!r}")
    if load_weights:
        try:
            model.load_state_dict(ckpt.state_dict)
        except RuntimeError as e:
            raise CheckpointError(f"{ckpt.path}: weights do not match the model ({str(e)[:200]})") from None
    return model.eval()
