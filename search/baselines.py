"""The paper's manual baselines (Table 2): torchvision models trained with MNet's own pipeline.

Same data pipeline, same `fit` loop, same checkpoint format (kind "torchvision"), so `mnet evaluate`,
`mnet export` and `mnet report` treat a baseline exactly like an MNet. `--pretrained` uses ImageNet
weights only when they already sit in the local torch cache: nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnet.errors import CheckpointError, ConfigError
from mnet.preprocess import Preprocess

__all__ = ["BASELINES", "build_baseline", "pretrained_path", "last_linear", "train_baseline"]

BASELINES = ("alexnet", "vgg16", "resnext50_32x4d", "densenet121", "shufflenet_v2_x1_0")


def _check_name(name: str) -> None:
    if name not in BASELINES:
        raise ConfigError(f"--model {name!r}: choose one of {', '.join(BASELINES)}")


def last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent, attribute, module) of the classifier: the last nn.Linear in registration order."""
    found = None
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (parent, attr, child)
    if found is None:
        raise ConfigError(f"{type(model).__name__} has no linear classifier")
    return found


def build_baseline(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised torchvision model with a `num_classes` head."""
    import torchvision

    _check_name(name)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def pretrained_path(name: str) -> Path:
    """Where torchvision would cache the ImageNet weights of `name` (we only read them from there)."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _pretrained(name: str, num_classes: int) -> nn.Module:
    import torchvision

    path = pretrained_path(name)
    if not path.is_file():
        raise CheckpointError(f"--pretrained: ImageNet weights for {name} are not in the local torch cache ({path}); "
                              "copy them there or train without --pretrained (nothing is downloaded at run time)")
    model = torchvision.models.get_model(name, weights=None)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{path}: cannot load pretrained weights ({type(e).__name__}: {str(e)[:160]})") from None
    parent, attr, fc = last_linear(model)
    setattr(parent, attr, nn.Linear(fc.in_features, num_classes))
    return model


def _check_input_size(model: nn.Module, name: str, size: int) -> None:
    """Fail early, in one line, where the network's pooling stack cannot take this input size."""
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    except RuntimeError as e:
        raise ConfigError(f"--input-size {size} is too small for {name} ({str(e).splitlines()[0][:120]}); "
                          "use a larger size, e.g. 64 or 224") from None
    finally:
        model.train(was)


def train_baseline(data_root, name: str, out, cfg, *, input_size: int = 224, pretrained: bool = False,
                   resume: bool = False, splits=None, on_step=None, on_epoch=None):
    """Train a torchvision baseline with `mnet.search.train.fit` (same loop, outputs and checkpoints)."""
    from mnet.search.train import fit, load_splits

    _check_name(name)
    if input_size < 32:
        raise ConfigError(f"--input-size {input_size}: torchvision baselines need at least 32 pixels")
    preprocess = Preprocess((input_size, input_size))
    splits = splits or load_splits(data_root, preprocess)
    classes = splits["train"].classes
    torch.manual_seed(cfg.seed)
    model = _pretrained(name, len(classes)) if pretrained else build_baseline(name, len(classes))
    _check_input_size(model, name, input_size)
    meta: dict[str, Any] = {"kind": "torchvision", "model_name": name, "pretrained": pretrained,
                            "dataset": str(Path(data_root).resolve())}
    return fit(model, splits["train"], splits["dev"], out, cfg, preprocess, meta, resume=resume,
               on_step=on_step, on_epoch=on_epoch)
