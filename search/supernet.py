"""The ENAS supernet: every (layer, distinct op) owns its weights; a forward runs one sampled architecture.

Layer i holds one `SepConv` per *distinct* op of the search space, built exactly as the standalone
`MNet` builds it (kernel cropped to layer i's feature size). Ops that crop to the same (kh, kw,
dilation) at layer i are the same function there (`mnet.arch.op_key`: at 6×8 only 6 of the 20 paper
ops differ), so they share one module: exact, and each distinct function gets all of its updates
instead of 1/20 of them (issue 13: separate copies starved every op). A sampled sub-network's weights
copy 1:1 into `MNet(arch)` (`child_state_dict`, `child`) and give identical outputs. Skips have no weights: any
earlier node can be added, and `forward` is `search.ops.forward_arch` — the one forward both use.

``sharing="entangled"`` goes further (Once-for-All's elastic kernel, without its learned kernel
transform): per layer and dilation one module at the largest kernel, every smaller kernel its centre
taps, BN and pointwise shared, so every step trains every layer. Which mode ranks architectures more
like standalone training is measured, not assumed (bench/results/search_real.json, "fidelity").

BatchNorm. Each (layer, op) has its own BN (ENAS practice), but what an op sees depends on the path
before it (earlier ops, skips), so running statistics accumulated while training many paths describe
a mixture, not the sampled path. How a sampled path is scored is therefore a choice (`BN_MODES`):

- ``batch``  — normalise with the statistics of the scored minibatch itself (running stats untouched).
  This is what ENAS implementations do in practice (the child is effectively in training mode) and
  costs one forward. Default.
- ``running`` — eval mode with the shared running statistics: one forward, but biased by the mixture.
- ``recalibrate`` — reset the path's running statistics and re-estimate them on a few training
  batches, then eval mode: the most faithful and the slowest (extra forwards per arch).

Measured on the tiny preset, synthetic set (bench/search_quality.py, section "bn_modes"; 16 uniform
archs; "truth" = recalibrated accuracy on the whole reward split; Kendall τ, SE ≈ 0.18 at n = 16):

    supernet (train acc)           τ one minibatch vs truth      τ whole split vs truth
                                   batch   running  recalib.     batch   running  recalib.
    12 ep. lr 0.01 (0.39)           0.40    0.03     0.47         0.60    0.21     0.94
    24 ep. lr 0.05 (0.40), n = 12   0.05   -0.12    -0.03         0.75   -0.10     0.98
    80 ep. lr 0.05 (0.44)           0.36    0.64     0.44         0.45    0.74     0.88

and against the retrained (15 epochs, test split) accuracy of 18 architectures on the 80-epoch
supernet, τ of the whole-split accuracy was -0.01 (batch), 0.12 (running), -0.09 (recalibrate): at
these budgets no mode ranks like standalone training. Cost per scored arch: batch ≈ running,
recalibrate ≈ 5x. ``running`` fails on a supernet that is still moving (rows 1-2; the alternating
schedule scores exactly such a supernet) and ``batch`` scores under the statistics the shared weights
were trained with, so ``batch`` is the default; on a long-trained two-stage supernet ``--bn running``
did as well.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from mnet.arch import Arch, Layer, SearchSpace
from mnet.errors import CheckpointError, ConfigError
from mnet.search.batches import DeviceData
from mnet.search.checkpoint import FORMAT
from mnet.search.depthwise import restore_depthwise
from mnet.search.model import MNet
from mnet.search.ops import Head, SepConv, Stem, forward_arch
from mnet.search.reward import accuracy_reward
from mnet.search.train import autocast

__all__ = [
    "BN_MODES",
    "SHARING",
    "Supernet",
    "batch_stats",
    "recalibrate_bn",
    "load_supernet",
    "RewardFn",
    "Score",
    "Evaluator",
]

BN_MODES = ("batch", "running", "recalibrate")
# How ops share weights (module docstring): "exact" — only ops that are the same function after cropping;
# "entangled" — every kernel of a dilation is the centre of that layer's largest (Once-for-All's elastic
# kernel, without its learned transform), sharing BN and pointwise too.
SHARING = ("exact", "entangled")

# reward(arch, accuracy) -> (reward, extras): extras (e.g. a predicted latency) are logged per sample
# and stored with the top-k. `mnet.search.reward` has the paper's accuracy reward and the latency-aware
# R = acc x (LAT/T)^w.
RewardFn = Callable[[Arch, float], tuple[float, dict[str, Any]]]


class Supernet(nn.Module):
    """Stem, L×|ops| candidate `SepConv`s and the head; `forward(x, arch)` runs only `arch`'s path."""

    def __init__(self, space: SearchSpace, dropout: float = 0.0, sharing: str = "exact"):
        super().__init__()
        if sharing not in SHARING:
            raise ConfigError(f"supernet sharing {sharing!r}: expected one of {', '.join(SHARING)}")
        self.space, self.sharing = space, sharing
        # Feature sizes do not depend on the choices, only on the skeleton.
        skeleton = space.skeleton([Layer(*space.ops[0])] * space.num_layers)
        self.stem = Stem(space.width, space.stem_stride)
        self.cells = nn.ModuleList()
        self.op_module: list[list[int]] = []  # [layer][op index] → index into cells[layer]
        self.op_crop: list[list[tuple[int, int] | None]] = []  # [layer][op index] → centre taps, None = all
        for i in range(1, space.num_layers + 1):
            hw = skeleton.node_hw(i)
            keys = space.op_keys(i)
            # exact: one module per distinct function; entangled: one per dilation, built at the largest kernel
            groups = keys if sharing == "exact" else [d for _, d in space.ops]
            distinct = list(dict.fromkeys(groups))
            builder = {}  # group → the op that builds its module: the largest kernel (ops ascend in size)
            for op, key, group in zip(space.ops, keys, groups):
                if group not in builder or key[0] * key[1] > builder[group][1][0] * builder[group][1][1]:
                    builder[group] = (op, key)
            self.op_module.append([distinct.index(g) for g in groups])
            self.op_crop.append([None if key == builder[g][1] else key[:2] for key, g in zip(keys, groups)])
            self.cells.append(nn.ModuleList(SepConv(space.width, *builder[g][0], hw) for g in distinct))
        self.head = Head(space.width, space.num_classes, dropout)

    def _check(self, arch: Arch) -> None:
        if not self.space.contains(arch) or arch.num_classes != self.space.num_classes:
            raise ConfigError(f"arch {arch.to_json()} is not in the supernet's search space '{self.space.name}' "
                              f"({self.space.num_layers} layers, width {self.space.width}, input "
                              f"{list(self.space.input_hw)}, {self.space.num_classes} classes)")

    def _choices(self, arch: Arch) -> list[tuple[SepConv, tuple[int, int] | None]]:
        out = []
        for i, layer in enumerate(arch.layers):
            j = self.space.ops.index((layer.kernel, layer.dilation))
            out.append((self.cells[i][self.op_module[i][j]], self.op_crop[i][j]))
        return out

    def path(self, arch: Arch) -> list[SepConv]:
        """The op module each layer of `arch` uses (entangled: the module its kernel is nested in)."""
        return [m for m, _ in self._choices(arch)]

    def forward(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        cells = [m if crop is None else functools.partial(m, kernel_hw=crop) for m, crop in self._choices(arch)]
        return self.head(forward_arch(x, arch, self.stem, cells))

    def path_modules(self, arch: Arch) -> Iterator[nn.Module]:
        """Every module the forward of `arch` touches (for BN handling of that path only)."""
        yield self.stem
        yield from self.path(arch)
        yield self.head

    def child_state_dict(self, arch: Arch) -> dict[str, torch.Tensor]:
        """`arch`'s shared weights under `MNet(arch)`'s names (cells.{i}.{op}.x → cells.{i}.x); copies."""
        self._check(arch)
        out: dict[str, torch.Tensor] = {}
        for prefix, module in (("stem", self.stem), ("head", self.head)):
            out.update({f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
        for i, (cell, crop) in enumerate(self._choices(arch)):
            state = cell.state_dict()
            if crop is not None:
                state["dw.weight"] = cell.centre(crop)
            out.update({f"cells.{i}.{k}": v.detach().clone() for k, v in state.items()})
        return out

    def child(self, arch: Arch, dropout: float = 0.0) -> MNet:
        """A standalone `MNet(arch)` holding copies of the supernet's weights for `arch`."""
        model = MNet(arch, dropout=dropout)
        model.load_state_dict(self.child_state_dict(arch))
        for cell, shared in zip(model.cells, self.path(arch)):
            cell.impl = shared.impl  # the same depthwise implementation: the same numbers
        return model.to(next(self.parameters()).device)


@contextlib.contextmanager
def batch_stats(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, BatchNorms in `modules` normalise with batch statistics and update nothing.

    Torch uses batch statistics whenever a BN has no running buffers, and then also has nothing to
    update; so the buffers are detached for the duration and put back after. Dropout and the rest of
    the model keep their mode (call this in eval mode for a clean score).
    """
    saved = []
    for m in modules:
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                saved.append((bn, bn.running_mean, bn.running_var))
                bn.running_mean, bn.running_var = None, None
    try:
        yield
    finally:
        for bn, mean, var in saved:
            bn.running_mean, bn.running_var = mean, var


@torch.no_grad()
def recalibrate_bn(model: nn.Module, forward, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate the running statistics of every BN in `model` as the exact average over `batches`.

    `forward(x)` runs the network (e.g. `lambda x: supernet(x, arch)`); only BNs on its path see data,
    so with a supernet pass `model=` the path's modules to leave the others alone.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    state = [(bn, bn.momentum, bn.training) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: the plain mean over the batches seen
        bn.train()
    try:
        for x in batches:
            forward(x)
    finally:
        for bn, momentum, training in state:
            bn.momentum = momentum
            bn.train(training)


def load_supernet(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Supernet, dict]:
    """A supernet checkpoint (`RUN/supernet.pt`) alone: the network with its weights, and the raw dict."""
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"supernet checkpoint not found: {path}; run `mnet search` first") from None
    except Exception as e:  # torch raises many types for corrupt / foreign files
        raise CheckpointError(f"{path}: not a loadable supernet checkpoint ({type(e).__name__}: {str(e)[:200]})") \
            from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("kind") != "supernet":
        raise CheckpointError(f"{path}: not an mnet supernet checkpoint (written by `mnet search`)")
    net = Supernet(SearchSpace.from_json(raw["space"]), sharing=(raw.get("config") or {}).get("sharing", "exact"))
    try:
        net.load_state_dict(raw["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its search space ({str(e)[:200]})") from None
    restore_depthwise(net, raw)  # names, or the bool "dense" list of older checkpoints
    return net.to(map_location), raw


@dataclass(frozen=True)
class Score:
    reward: float
    accuracy: float
    extras: dict[str, Any] = field(default_factory=dict)


class Evaluator:
    """Scores a sampled path: accuracy on one validation minibatch, then the reward hook.

    Without a given batch, minibatches come from its own seeded generator (`state_dict` keeps it);
    the controller phase passes each architecture its own batch, drawn from (seed, architecture
    number) so that any number of ranks scores the same batches (search.enas.train_controller). `bn` picks how BatchNorm normalises the path (module docstring);
    ``recalibrate`` uses `calib_batches` fixed batches of `calib_data` (the supernet's train part).
    """

    def __init__(self, supernet: Supernet, val_data: DeviceData, batch_size: int, *,
                 reward: RewardFn | None = None, bn: str = "batch", amp: bool = False, seed: int = 0,
                 calib_data: DeviceData | None = None, calib_batches: int = 4):
        if bn not in BN_MODES:
            raise ConfigError(f"bn mode {bn!r}: expected one of {', '.join(BN_MODES)}")
        if bn == "recalibrate" and calib_data is None:
            raise ConfigError("bn mode 'recalibrate' needs calib_data (training images)")
        self.supernet, self.val_data, self.batch_size = supernet, val_data, batch_size
        self.reward, self.bn, self.amp = reward or accuracy_reward, bn, amp
        self.generator = torch.Generator().manual_seed(seed)
        self._calib: list[torch.Tensor] = []
        if bn == "recalibrate":
            gen = torch.Generator().manual_seed(seed + 1)
            self._calib = [x for x, _ in itertools.islice(
                calib_data.batches(batch_size, shuffle=True, generator=gen), calib_batches)]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next validation minibatch (without replacement inside it)."""
        return self.val_data.sample_batch(self.batch_size, self.generator)

    @torch.no_grad()
    def _recalibrated(self, arch: Arch) -> MNet:
        # A standalone copy: the recalibrated statistics must not leak into the shared weights.
        model = self.supernet.child(arch)
        with autocast(self._calib[0].device, self.amp):
            recalibrate_bn(model, model, self._calib)
        return model.eval()

    @torch.no_grad()
    def logits(self, arch: Arch, x: torch.Tensor, model: MNet | None = None) -> torch.Tensor:
        """`model`: `arch`'s recalibrated copy when the caller has one (recalibrate mode, several batches)."""
        device = x.device
        if self.bn == "recalibrate":
            model = model or self._recalibrated(arch)
            with autocast(device, self.amp):
                return model(x).float()
        self.supernet.eval()
        stats = batch_stats(self.supernet.path_modules(arch)) if self.bn == "batch" else contextlib.nullcontext()
        with stats, autocast(device, self.amp):
            return self.supernet(x, arch).float()

    def accuracy(self, arch: Arch, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.logits(arch, x).argmax(1) == y).float().mean())

    def split_score(self, arch: Arch) -> Score:
        """`arch` scored on every reward image (in minibatches of `batch_size`, the BN mode as for one)."""
        correct = 0
        model = self._recalibrated(arch) if self.bn == "recalibrate" else None  # once, not once per batch
        for x, y in self.val_data.batches(self.batch_size):
            correct += int((self.logits(arch, x, model).argmax(1) == y).sum())
        acc = correct / len(self.val_data)
        reward, extras = self.reward(arch, acc)
        return Score(float(reward), acc, dict(extras))

    def __call__(self, arch: Arch, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> Score:
        """Score `arch` on `batch`, or on the next validation minibatch."""
        x, y = batch if batch is not None else self.batch()
        acc = self.accuracy(arch, x, y)
        reward, extras = self.reward(arch, acc)
        return Score(float(reward), acc, dict(extras))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
