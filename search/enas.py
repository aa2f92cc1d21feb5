"""The search loop: the space (supernet), the strategy (controller or uniform) and the evaluator meet
in `search()`. Read top to bottom: config → `search()` → the two stages (`SupernetTrainer.train_epoch`,
`train_controller`) → run files (checkpoints, metrics, resume).

Schedules (DESIGN "ENAS"):
- ``two-stage`` (default, the paper's practical process): the supernet trains with uniformly sampled
  paths for E epochs, then the controller trains for S steps against the frozen supernet. The saved
  supernet knows nothing of the controller, so it can be re-searched (e.g. with a latency reward) by
  `train_controller` alone.
- ``alternating`` (original ENAS): one pass over the supernet's data with paths sampled from the
  controller (m = 1 per minibatch), then a block of S/E controller steps; E times.

Controller steps. S = ``controller_steps`` counts SCORED ARCHITECTURES (the paper's 5000: one sampled
path each), whatever the batching: an update averages REINFORCE over ``controller_batch`` B of them,
all scored on the update's one validation minibatch and each compared with the others (B = 1 is the
paper: one update per architecture), so the phase makes S/B updates. metrics.jsonl has one line per scored architecture ("step" = its 1-based index in the run,
"update" = its update's), `controller.pt` saves at update boundaries and `Reinforce.step` counts
architectures, so logs, progress, checkpoints and the random-search budget all count the same thing.
Under torchrun the B architectures of an update are scored by the ranks in parallel (search.distributed).

Strategies: ``enas`` (the controller) or ``random`` — the same supernet, trained the same way, then
scoring `derive_samples + controller_steps` uniform architectures: as many one-minibatch evaluations
as ENAS spends on controller samples plus its own derivation, so the comparison is at equal budget.

Data: the dataset's train split is divided once (stratified, seeded) into 80% for the supernet's
weights and 20% for rewards; the dev and test splits are never seen by the search.

Resume: `supernet.pt` holds the supernet, its optimizer, the stage position (epoch, batch) and every
random draw the supernet stage makes; `controller.pt` the controller, its optimizer, baseline and
step (sample k's path and minibatch are drawn from generators seeded by (seed, k), so the step is
the controller stage's whole random state). Both are
written atomically at epoch ends / every `checkpoint_every` controller steps, and on Ctrl-C (deferred
to the next step boundary, so the state saved is consistent) before re-raising. A resumed seeded CPU
run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from mnet.arch import Arch, SearchSpace, build_space
from mnet.data import Split
from mnet.errors import CheckpointError, ConfigError, DataError
from mnet.io import write_json
from mnet.preprocess import Preprocess
from mnet.search.batches import DeviceData, fast_path
from mnet.search.checkpoint import FORMAT, save_checkpoint
from mnet.search.controller import ControllerConfig, Reinforce, stream
from mnet.search.depthwise import depthwise_impls, restore_depthwise, select_depthwise, set_depthwise_impls
from mnet.search.distributed import SINGLE, Dist
from mnet.search.distributed import setup as setup_distributed
from mnet.search.derive import Candidate, derive, derive_meta, write_derived
from mnet.search.supernet import (
    BN_MODES,
    SHARING,
    Evaluator,
    RewardFn,
    Supernet,
)
from mnet.search.train import autocast, load_splits, resolve_device

__all__ = [
    "STRATEGIES",
    "SCHEDULES",
    "SearchConfig",
    "SearchResult",
    "Progress",
    "search",
    "check_run_dir",
    "split_train_val",
    "supernet_step",
    "SupernetTrainer",
    "train_controller",
    "open_run",
    "OpenRun",
]

STRATEGIES = ("enas", "random")
SCHEDULES = ("two-stage", "alternating")

# Every random stream has its own generator, seeded at seed + offset: streams that share a seed would
# draw the same numbers for different purposes.
_ARCH_SEED, _EVAL_SEED, _AGENT_SEED, _PROBE_SEED = 1, 2, 3, 4

# progress(stage, done, total, info): stage is "batch" (within a supernet epoch), "supernet" (an epoch
# ended, info = its metrics), "controller" (a step ended, info = its metrics) or "derive".
Progress = Optional[Callable[[str, int, int, dict], None]]


@dataclass(frozen=True)
class SearchConfig:
    preset: str = "mnet-24-32"
    # any part of the preset's space replaced from the command line (None = the preset's; mnet.arch.build_space)
    input_hw: tuple[int, int] | None = None
    layers: int | None = None
    width: int | None = None
    stem_stride: int | None = None
    kernels: tuple[int, ...] | None = None
    dilations: tuple[int, ...] | None = None
    strategy: str = "enas"
    schedule: str = "two-stage"
    supernet_epochs: int = 100  # Table 1
    derive_samples: int = 100
    batch_size: int = 128  # Table 1; also the reward minibatch
    lr: float = 0.01  # Table 1: supernet SGD
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # ENAS anneals the shared weights; "constant" keeps Table 1's 0.01
    flip_p: float = 0.5  # paper §4: horizontal flip augmentation
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    # scored architectures per controller update (global under torchrun), all on one minibatch: the
    # leave-one-out baseline needs >= 2 (measured with search/planted.py: 5 learnt most in 5000 samples)
    controller_batch: int = 5
    bn: str = "batch"  # how a sampled path is scored: see search/supernet.py
    sharing: str = "entangled"  # how the supernet's ops share weights: see search/supernet.py SHARING
    val_fraction: float = 0.2
    checkpoint_every: int = 100  # controller steps between saves
    topk: int = 10
    rescore_top: int = 10  # best-of-N candidates re-scored on the whole reward split (search.derive)
    # fixed uniform architectures scored on `probe_images` reward images after every supernet epoch
    # (metrics.jsonl "probe_acc", probes.png): whether the supernet has learnt to tell them apart
    probe_archs: int = 8
    probe_images: int = 512
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    fast_depthwise: bool = True  # exact conv/dense/FFT depthwise, chosen per shape by timing (search.depthwise)
    compile: bool = False  # torch.compile each op module (GPU runs; search.enas.SupernetTrainer.fast_path)

    def __post_init__(self) -> None:
        for name in ("input_hw", "kernels", "dilations"):  # JSON gives lists; equality (resume) wants tuples
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))
        self.space()  # raises naming the preset or the bad part of the space
        checks = [
            ("strategy", self.strategy in STRATEGIES, f"expected one of {', '.join(STRATEGIES)}"),
            ("schedule", self.schedule in SCHEDULES, f"expected one of {', '.join(SCHEDULES)}"),
            ("schedule", not (self.strategy == "random" and self.schedule == "alternating"),
             ("alternating trains a controller between supernet epochs and random search has none; "
              "use --schedule two-stage")),
            ("supernet_epochs", self.supernet_epochs >= 1, "expected >= 1"),
            ("derive_samples", self.derive_samples >= 1, "expected >= 1"),
            ("batch_size", self.batch_size >= 2, "expected >= 2 (BatchNorm needs a batch)"),
            ("controller_batch", self.controller_batch >= 1, "expected >= 1"),
            ("controller_batch", self.controller.steps % max(self.controller_batch, 1) == 0,
             (f"--controller-steps {self.controller.steps} counts scored architectures and must be a multiple "
              "of the architectures per update; change one of them")),
            ("lr", self.lr > 0, "expected > 0"),
            ("momentum", 0 <= self.momentum < 1, "expected in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "expected >= 0"),
            ("lr_schedule", self.lr_schedule in ("cosine", "constant"), "expected cosine or constant"),
            ("flip_p", 0 <= self.flip_p <= 1, "expected in [0, 1]"),
            ("bn", self.bn in BN_MODES, f"expected one of {', '.join(BN_MODES)}"),
            ("sharing", self.sharing in SHARING, f"expected one of {', '.join(SHARING)}"),
            ("val_fraction", 0 < self.val_fraction < 1, "expected in (0, 1)"),
            ("checkpoint_every", self.checkpoint_every >= 1, "expected >= 1"),
            ("topk", self.topk >= 1, "expected >= 1"),
            ("rescore_top", self.rescore_top >= 0, "expected >= 0 (0 = keep the minibatch ranking)"),
            ("probe_archs", self.probe_archs >= 0, "expected >= 0"),
            ("probe_images", self.probe_images >= 1, "expected >= 1"),
            ("device", self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             "expected auto, cpu or cuda"),
        ]
        for name, ok, fix in checks:
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"search option {flag} = {getattr(self, name)!r}: {fix}")

    def space(self) -> SearchSpace:
        """The search space: the preset with this config's replacements (classes are set from the data)."""
        return build_space(self.preset, input_hw=self.input_hw, layers=self.layers, width=self.width,
                           stem_stride=self.stem_stride, kernels=self.kernels, dilations=self.dilations)

    @property
    def controller_steps(self) -> int:
        """Architectures the controller stage scores (not updates: there are `controller_updates`)."""
        return self.controller.steps

    @property
    def controller_updates(self) -> int:
        return self.controller.steps // self.controller_batch

    @property
    def derive_budget(self) -> int:
        """Architectures scored at derivation: random search also gets ENAS's controller samples."""
        return self.derive_samples + (self.controller.steps if self.strategy == "random" else 0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SearchConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["controller"] = ControllerConfig.from_json(kw.get("controller") or {})
        return cls(**kw)


@dataclass(frozen=True)
class SearchResult:
    out: Path
    arch: Arch
    best: Candidate
    seconds: float
    device: str


def search(data_root, out, cfg: SearchConfig, *, reward: RewardFn | None = None, resume: bool = False,
           splits: dict[str, Split] | None = None, progress: Progress = None, plots: bool = True) -> SearchResult:
    """Search DATA's train split for an architecture; writes everything under `out` (module docstring).

    `reward(arch, accuracy) -> (reward, extras)` replaces the plain accuracy reward (extras are logged
    per sample and kept with the top-k); `splits` passes an already loaded {"train": Split}.
    """
    out = Path(out)
    check_run_dir(out, resume)
    dist, device = setup_distributed(cfg.device)  # one rank of a torchrun job, or alone (search.distributed)
    report = progress or (lambda *_: None)

    # data: 80% of the train split trains the supernet, the other 20% scores architectures
    space = cfg.space()
    preprocess = Preprocess(space.input_hw)
    train_split = (splits or load_splits(data_root, preprocess, ("train",)))["train"]
    space = space.with_classes(len(train_split.classes))
    train_idx, val_idx = split_train_val(train_split.labels, cfg.val_fraction, cfg.seed)
    train_data = DeviceData(train_split, preprocess, device, train_idx)
    val_data = DeviceData(train_split, preprocess, device, val_idx)

    # space, strategy, evaluator
    trainer = SupernetTrainer(space, train_data, cfg, device, dist)
    agent = Reinforce(space, cfg.controller, cfg.seed + _AGENT_SEED) if cfg.strategy == "enas" else None
    evaluator = Evaluator(trainer.supernet, val_data, cfg.batch_size, reward=reward, bn=cfg.bn, amp=cfg.amp,
                          seed=cfg.seed + _EVAL_SEED, calib_data=train_data)
    files = _RunFiles(out, cfg, {
        "dataset": str(Path(data_root).resolve()) if data_root is not None else None,
        "classes": list(train_split.classes),
        "preprocess": preprocess.to_json(),
        "space": space.to_json(),
        "val_indices": torch.from_numpy(val_idx),
    }, writes=dist.is_main)
    if resume:  # every rank reads the same checkpoints
        files.restore(trainer, agent)
    else:
        files.start()
        if cfg.fast_depthwise:  # timed once here (rank 0); saved so a resumed run computes alike
            if dist.is_main:
                select_depthwise(trainer.supernet, batch=cfg.batch_size, amp=cfg.amp)
            set_depthwise_impls(trainer.supernet, dist.broadcast(depthwise_impls(trainer.supernet)))
    trainer.fast_path(val_data)
    if agent is not None and dist.enabled and cfg.controller_batch % dist.world_size and dist.is_main:
        busy = min(cfg.controller_batch, dist.world_size)
        logging.getLogger(__name__).warning(
            "--controller-batch %d on %d ranks: %d rank(s) score architectures in a controller update, the "
            "others wait; pass a multiple of %d for a controller phase %d× faster than one process",
            cfg.controller_batch, dist.world_size, busy, dist.world_size, dist.world_size)

    # the schedule; every step boundary may save (periodically, or on Ctrl-C) and report progress
    def on_batch(done: int, total: int) -> None:
        report("batch", done, total, {"epoch": trainer.epoch + 1})
        interrupt.check()

    probe_rng = random.Random(cfg.seed + _PROBE_SEED)
    probes = [space.sample(probe_rng) for _ in range(cfg.probe_archs)]
    probe_idx = np.sort(np.random.default_rng(cfg.seed + _PROBE_SEED).permutation(val_idx)[:cfg.probe_images])
    prober = Evaluator(trainer.supernet, DeviceData(train_split, preprocess, device, probe_idx), cfg.batch_size,
                       bn=cfg.bn, amp=cfg.amp, calib_data=train_data) if probes else None

    def end_epoch(record: dict) -> None:
        if prober is not None:  # every rank alike: no collective, the same numbers
            record["probe_acc"] = [prober.split_score(a).accuracy for a in probes]
        files.log(record)
        files.save_supernet(trainer)
        report("supernet", trainer.epoch, cfg.supernet_epochs, record)
        interrupt.check()

    def on_update(records: list[dict]) -> None:  # after each controller update, on every rank
        files.controller_seconds += sum(r["seconds"] for r in records)
        for r in records:  # every rank has every sample's record (gathered); rank 0 writes them
            files.log(r)
        for r in records:
            report("controller", r["step"], cfg.controller_steps, r)
        if agent.step // cfg.checkpoint_every > (agent.step - len(records)) // cfg.checkpoint_every:
            files.save_controller(agent)  # a multiple of checkpoint_every was passed
        interrupt.check()

    def uniform() -> Arch:
        return space.sample(trainer.arch_rng)

    def from_policy() -> Arch:
        with torch.no_grad():
            return agent.controller.sample(trainer.arch_gen)[0]

    interrupt = _DeferredInterrupt(dist)
    try:
        with interrupt:
            if cfg.schedule == "two-stage":
                while trainer.epoch < cfg.supernet_epochs:
                    end_epoch(trainer.train_epoch(uniform, on_batch))
                if agent is not None:
                    train_controller(agent, evaluator, cfg.controller_steps, batch=cfg.controller_batch,
                                     dist=dist, on_update=on_update)
                    files.save_controller(agent)
            else:  # alternating: pass e over the data with the policy's paths, then controller block e
                def block_end(epoch: int) -> int:  # controller steps done once block `epoch - 1` ends
                    # whole updates per block: a block boundary never splits a batch of B samples
                    return cfg.controller_batch * round(cfg.controller_updates * epoch / cfg.supernet_epochs)

                files.check_alternating(trainer, agent, block_end)
                while True:
                    if trainer.batch == 0 and agent.step < block_end(trainer.epoch):
                        train_controller(agent, evaluator, block_end(trainer.epoch), batch=cfg.controller_batch,
                                         dist=dist, on_update=on_update)
                        files.save_controller(agent)
                    if trainer.epoch == cfg.supernet_epochs:
                        break
                    end_epoch(trainer.train_epoch(from_policy, on_batch))
    except KeyboardInterrupt:
        files.save_supernet(trainer)
        if agent is not None:
            files.save_controller(agent)
        raise

    # derive: best-of-N from the policy (or uniform for random search), written as arch.json + topk
    t0 = time.time()
    n = cfg.derive_budget
    candidates = derive(space, evaluator, agent.controller if agent else None, samples=n, seed=cfg.seed,
                        on_sample=lambda i, total: report("derive", i, total, {}), dist=dist,
                        rescore_top=cfg.rescore_top)
    if dist.is_main:
        best = write_derived(out, candidates, derive_meta(cfg.strategy, n, False, cfg), cfg.topk)
    else:  # every rank holds the same gathered candidates; only rank 0 writes them
        best = candidates[0]  # sorted best first, as write_derived takes it
    seconds = files.finish(trainer, agent, best, time.time() - t0, device, plots, dist.world_size)
    return SearchResult(out, best.arch, best, seconds, str(device))


def split_train_val(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of indices into (supernet part, reward part), each sorted."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = round(len(idx) * val_fraction)
        val.append(idx[:k])
        train.append(idx[k:])
    train_idx, val_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    if not len(train_idx) or not len(val_idx):
        raise DataError(f"the train split has {len(labels)} images: too few to hold out --val-fraction "
                        f"{val_fraction} for rewards; add images or change --val-fraction")
    return train_idx, val_idx


# --- stage 1: the supernet ------------------------------------------------------------------------

def supernet_step(supernet: Supernet, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  arch: Arch, amp: bool = False, dist: Dist = SINGLE, n_global: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of `arch`'s path (m = 1); returns (loss, correct) on the device, unsynchronised.

    Gradients are set to None, not zero, so SGD skips the ops off the path entirely: no weight decay
    or momentum moves weights that did not take part. Under torchrun (`dist`, `x` = this rank's shard
    of a global batch of `n_global`) the path's gradients are summed over ranks: every rank trains the
    same `arch`, so no other weights need communication (search.distributed).
    """
    with autocast(x.device, amp):
        logits = supernet(x, arch)
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    (loss * dist.loss_weight(len(y), n_global or len(y))).backward()
    dist.all_reduce_gradients(p for m in supernet.path_modules(arch) for p in m.parameters())
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


class SupernetTrainer:
    """The supernet, its SGD, and its stage's position and random draws (resumable mid-epoch)."""

    def __init__(self, space: SearchSpace, data: DeviceData, cfg: SearchConfig, device: torch.device,
                 dist: Dist = SINGLE):
        self.cfg, self.data, self.dist = cfg, data, dist
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # initial weights are part of the seeded run
            self.supernet = dist.wrap_batchnorm(Supernet(space, sharing=cfg.sharing).to(device), device)
        self.optimizer = torch.optim.SGD(self.supernet.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)  # shuffles and flips
        self.arch_rng = random.Random(cfg.seed)  # uniform paths (two-stage)
        self.arch_gen = torch.Generator().manual_seed(cfg.seed + _ARCH_SEED)  # policy paths (alternating)
        self.epoch, self.batch = 0, 0  # epochs done; batches done in the current epoch
        self._epoch_start = self.data_gen.get_state()
        self._loss_sum = torch.zeros((), device=device)
        self._correct = torch.zeros((), device=device, dtype=torch.long)
        self.seconds = 0.0
        self.dirty = False  # changed since the last save

    def lr(self) -> float:
        if self.cfg.lr_schedule == "constant":
            return self.cfg.lr
        return 0.5 * self.cfg.lr * (1 + math.cos(math.pi * self.epoch / self.cfg.supernet_epochs))

    def fast_path(self, *other_data: DeviceData) -> None:
        """channels_last + cuDNN autotuning on CUDA; with `compile`, each op module is compiled on its
        own (a path's forward changes every step, the modules it is made of do not)."""
        net = self.supernet
        modules = [net.stem, *(cell for layer in net.cells for cell in layer), net.head] if self.cfg.compile else None
        fast_path(net, [self.data, *other_data], self.data.device, modules)

    def train_epoch(self, sample_arch: Callable[[], Arch], on_batch: Callable[[int, int], None]) -> dict:
        """One pass over the data (or what is left of it after a mid-epoch resume); the epoch's metrics."""
        t0 = time.time()
        if self.batch == 0:
            self._epoch_start = self.data_gen.get_state()
        else:  # resumed mid-epoch: replay the epoch's shuffle and flips up to where it stopped
            self.data_gen.set_state(self._epoch_start)
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = self.data.num_batches(self.cfg.batch_size)
        batches = self.data.batches(self.cfg.batch_size, shuffle=True, flip_p=self.cfg.flip_p,
                                    generator=self.data_gen, shard=self.dist.shard)
        for _ in range(self.batch):
            next(batches)
        self.supernet.train()
        for x, y in batches:
            n_global = min(self.cfg.batch_size, len(self.data) - self.batch * self.cfg.batch_size)
            loss, correct = supernet_step(self.supernet, self.optimizer, x, y, sample_arch(), self.cfg.amp,
                                          self.dist, n_global)
            self._loss_sum += loss * len(y)
            self._correct += correct
            self.batch += 1
            self.dirty = True
            self.seconds += time.time() - t0
            t0 = time.time()
            on_batch(self.batch, total)
        # ranks: global metrics (one sync per epoch) and one set of BN statistics for every rank
        self.dist.all_reduce_sum(self._loss_sum, self._correct)
        self.dist.average_buffers(self.supernet)
        record = {"stage": "supernet", "epoch": self.epoch + 1, "lr": lr,
                  "loss": float(self._loss_sum) / len(self.data), "acc": float(self._correct) / len(self.data)}
        self.epoch, self.batch = self.epoch + 1, 0
        self._loss_sum.zero_()
        self._correct.zero_()
        self.seconds += time.time() - t0
        return record

    def state_dict(self) -> dict[str, Any]:
        gauss = self.arch_rng.getstate()
        return {
            "model": {k: v.detach().cpu() for k, v in self.supernet.state_dict().items()},
            "depthwise": depthwise_impls(self.supernet),
            "optimizer": self.optimizer.state_dict(),
            "position": {"epoch": self.epoch, "batch": self.batch, "loss_sum": self._loss_sum.cpu(),
                         "correct": self._correct.cpu()},
            "rng": {"epoch_start": self._epoch_start, "data": self.data_gen.get_state(),
                    "arch_gen": self.arch_gen.get_state(),
                    "arch_rng": {"version": gauss[0], "state": list(gauss[1]), "gauss": gauss[2]}},
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.supernet.load_state_dict(state["model"])
        restore_depthwise(self.supernet, state)  # names, or the bool "dense" list of older checkpoints
        self.optimizer.load_state_dict(state["optimizer"])
        pos, rng = state["position"], state["rng"]
        self.epoch, self.batch = int(pos["epoch"]), int(pos["batch"])
        self._loss_sum.copy_(pos["loss_sum"])
        self._correct.copy_(pos["correct"])
        self._epoch_start = rng["epoch_start"]
        self.data_gen.set_state(rng["data"])
        self.arch_gen.set_state(rng["arch_gen"])
        r = rng["arch_rng"]
        self.arch_rng.setstate((r["version"], tuple(r["state"]), r["gauss"]))
        self.seconds = float(state["seconds"])


# --- stage 2: the controller ----------------------------------------------------------------------

def train_controller(agent: Reinforce, evaluator: Evaluator, until: int, *, batch: int = 1, dist: Dist = SINGLE,
                     on_step: Callable[[dict], None] | None = None,
                     on_update: Callable[[list[dict]], None] | None = None) -> None:
    """REINFORCE until `agent.step == until` scored architectures: each update samples `batch` paths,
    scores all of them on one validation minibatch and averages the policy gradient over them.
    Reusable on any saved supernet (e.g. a re-search with a latency reward).

    Sample k of the run (k = `agent.step` + position in the batch) takes its path from a generator
    seeded by (agent seed, k), and the update's minibatch comes from (agent seed, its first k), so the
    result does not depend on which process scores
    it: under torchrun (`dist`) rank r scores positions r, r + N, … of each batch, the records are
    all-gathered and every rank takes the same update (search.distributed). `on_step(record)` then
    sees each sample's record in sample order, `on_update(records)` the update's; both on every rank.
    """
    if (until - agent.step) % batch:
        raise ConfigError(f"controller: {until - agent.step} steps to go is not a whole number of updates of "
                          f"{batch} architectures; make the steps a multiple of the batch")
    bs = evaluator.batch_size
    while agent.step < until:
        t0 = time.time()
        first, update = agent.step, agent.step // batch + 1
        mine, local = [], []
        # one minibatch for the whole update: its difficulty is shared, so the leave-one-out baseline
        # cancels it (issue 13: per-architecture minibatches made the advantage mostly minibatch luck)
        minibatch = evaluator.val_data.sample_batch(bs, stream(agent.seed, "reward", first))
        for i in range(dist.rank, batch, dist.world_size):
            arch, log_p, entropy = agent.sample(first + i)
            score = evaluator(arch, minibatch)
            mine.append((i, log_p, entropy))
            local.append({"i": i, "reward": score.reward, "accuracy": score.accuracy,
                          "entropy": float(entropy.detach()), "log_prob": float(log_p.detach()),
                          "arch": [[x.kernel, x.dilation, x.skip] for x in arch.layers], "extras": score.extras})
        # every rank needs every reward (the baseline) and rank 0 logs every sample: one gather per update
        gathered = sorted((s for part in dist.all_gather(local) for s in part), key=lambda s: s["i"])
        stats = agent.update_batch([s["reward"] for s in gathered], mine, dist)
        seconds = (time.time() - t0) / batch  # the update's wall time, shared by its samples
        records = [{"stage": "controller", "step": first + s["i"] + 1, "update": update, "reward": s["reward"],
                    "accuracy": s["accuracy"], "advantage": stats["advantages"][j], "baseline": stats["baselines"][j],
                    "entropy": s["entropy"], "log_prob": s["log_prob"], "arch": s["arch"], **s["extras"],
                    "seconds": seconds} for j, s in enumerate(gathered)]
        if on_step is not None:
            for r in records:
                on_step(r)
        if on_update is not None:
            on_update(records)


# --- run files: checkpoints, metrics, resume ------------------------------------------------------

class _RunFiles:
    """RUN/supernet.pt, controller.pt, metrics.jsonl, search.json and the plots."""

    def __init__(self, out: Path, cfg: SearchConfig, meta: dict[str, Any], writes: bool = True):
        self.out, self.cfg, self.meta = out, cfg, meta
        self.writes = writes  # False on ranks other than 0: they read checkpoints, never write
        self.metrics = out / "metrics.jsonl"
        self.controller_seconds = 0.0

    def start(self) -> None:
        if not self.writes:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "controller.pt"):  # stale state of an earlier, unsaved start
            (self.out / name).unlink(missing_ok=True)

    def log(self, record: dict) -> None:
        if not self.writes:
            return
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _payload(self, kind: str) -> dict[str, Any]:
        return {"kind": kind, "config": self.cfg.to_json(), **self.meta}

    def save_supernet(self, trainer: SupernetTrainer) -> None:
        if trainer.dirty and self.writes:
            save_checkpoint(self.out / "supernet.pt", {**self._payload("supernet"), **trainer.state_dict()})
            trainer.dirty = False

    def save_controller(self, agent: Reinforce) -> None:
        if not self.writes:
            return
        # the agent's step is the stage's whole random state: sample k and its minibatch come from (seed, k)
        save_checkpoint(self.out / "controller.pt", {**self._payload("controller"), "agent": agent.state_dict(),
                                                     "seconds": self.controller_seconds})

    def restore(self, trainer: SupernetTrainer, agent: Reinforce | None) -> None:
        raw = _load(self.out / "supernet.pt", "supernet")
        _same_config(raw, self.cfg, self.out / "supernet.pt")
        if raw["val_indices"].tolist() != self.meta["val_indices"].tolist():
            raise CheckpointError(f"{self.out / 'supernet.pt'}: the train split differs from the one it was "
                                  "searched on; resume with the same dataset")
        trainer.load_state_dict(raw)
        if agent is not None and (self.out / "controller.pt").is_file():
            c = _load(self.out / "controller.pt", "controller")
            _same_config(c, self.cfg, self.out / "controller.pt")
            agent.load_state_dict(c["agent"])
            self.controller_seconds = float(c["seconds"])
        # drop metric lines written after the checkpoints (a kill between a log line and a save)
        steps = agent.step if agent is not None else 0
        keep = []
        if not self.writes:
            return
        if self.metrics.exists():
            for line in self.metrics.read_text(encoding="utf-8").splitlines():
                r = json.loads(line)
                if (r["stage"] == "supernet" and r["epoch"] <= trainer.epoch) or \
                        (r["stage"] == "controller" and r["step"] <= steps):
                    keep.append(line + "\n")
        self.metrics.write_text("".join(keep), encoding="utf-8")

    def check_alternating(self, trainer: SupernetTrainer, agent: Reinforce, block_end) -> None:
        """The controller must sit where the schedule puts it given the supernet's position."""
        lo = block_end(trainer.epoch - 1) if trainer.epoch > 0 and trainer.batch == 0 else block_end(trainer.epoch)
        if not lo <= agent.step <= block_end(trainer.epoch):
            raise CheckpointError(f"{self.out}: supernet.pt (epoch {trainer.epoch}) and controller.pt (step "
                                  f"{agent.step}) are from different points of the search; restart without --resume")

    def finish(self, trainer: SupernetTrainer, agent: Reinforce | None, best: Candidate, derive_seconds: float,
               device: torch.device, plots: bool, ranks: int = 1) -> float:
        from mnet.search.plots import plot_search

        seconds = trainer.seconds + self.controller_seconds + derive_seconds
        if not self.writes:
            return seconds
        write_json(self.out / "search.json", {
            "config": self.cfg.to_json(),
            "dataset": self.meta["dataset"],
            "classes": self.meta["classes"],
            "space": self.meta["space"],
            # exact cropping makes some ops one function at small maps: the distinct networks are fewer
            "space_size": trainer.supernet.space.size(),
            "space_effective_size": trainer.supernet.space.effective_size(),
            "supernet_images": len(trainer.data),
            "reward_images": len(self.meta["val_indices"]),
            "device": str(device),
            "ranks": ranks,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "seconds": {"supernet": trainer.seconds, "controller": self.controller_seconds,
                        "derive": derive_seconds, "total": seconds},
            "gpu_hours": seconds / 3600 if device.type == "cuda" else None,
            "torch": torch.__version__,
            "arch": best.arch.to_json(),
            "best": {"reward": best.reward, "accuracy": best.accuracy, "log_prob": best.log_prob, **best.extras},
        })
        if not plots:
            return seconds
        records = [json.loads(x) for x in self.metrics.read_text(encoding="utf-8").splitlines()]
        policy = None
        if agent is not None:
            gen = torch.Generator().manual_seed(self.cfg.seed)
            with torch.no_grad():
                policy = [agent.controller.sample(gen)[0] for _ in range(_POLICY_SAMPLES)]
        try:
            plot_search(self.out, records, policy, trainer.supernet.space.ops)
        except Exception as e:  # plots are a convenience: a missing matplotlib must not lose the search
            logging.getLogger(__name__).warning("no search plots: %s", e)
        return seconds


_POLICY_SAMPLES = 500  # architectures drawn from the final policy for the op histogram


def check_run_dir(out, resume: bool) -> None:
    """Refuse to overwrite a search, or to resume one that is not there (cheap: call before loading data)."""
    out = Path(out)
    if resume and not (out / "supernet.pt").is_file():
        raise CheckpointError(f"--resume: {out / 'supernet.pt'} not found; start without --resume")
    if not resume and (out / "supernet.pt").exists():
        raise ConfigError(f"--out {out} already holds a search (supernet.pt); pass --resume to continue it "
                          "or choose a new --out")


def _load(path: Path, kind: str) -> dict[str, Any]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt / foreign files
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("kind") != kind:
        raise CheckpointError(f"{path}: not an mnet {kind} checkpoint")
    return raw


def _same_config(raw: dict, cfg: SearchConfig, path: Path) -> None:
    saved = SearchConfig.from_json(raw["config"])
    if replace(saved, device=cfg.device) != cfg:
        a, b = saved.to_json(), cfg.to_json()
        diff = {k: (a[k], b[k]) for k in a if k != "device" and a[k] != b[k]}
        raise CheckpointError(f"--resume: options differ from the run in {path.parent} {diff}; pass the same options")


class _DeferredInterrupt:
    """Ctrl-C sets a flag that `check()` turns into KeyboardInterrupt at the next step boundary, so the
    state saved on the way out is never half an optimizer step. A second Ctrl-C interrupts at once.
    Under torchrun the ranks agree on the flag at each check (`Dist.any`), so all of them stop at the
    same boundary: a rank that stopped alone would leave the others waiting in their next collective."""

    def __init__(self, dist: Dist = SINGLE) -> None:
        self.requested = False
        self.dist = dist
        self._old = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.dist.any(self.requested):
            self.requested = False
            raise KeyboardInterrupt

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


# --- opening a finished (or stopped) run ----------------------------------------------------------

@dataclass
class OpenRun:
    config: SearchConfig
    space: SearchSpace
    supernet: Supernet
    agent: Reinforce | None
    evaluator: Evaluator
    raw: dict[str, Any] = field(repr=False)
    split: Split | None = field(default=None, repr=False)

    def train_data(self) -> DeviceData:
        """The supernet's training images (the other 80%), e.g. for BN recalibration."""
        train_idx, _ = split_train_val(self.split.labels, self.config.val_fraction, self.config.seed)
        return DeviceData(self.split, Preprocess.from_json(self.raw["preprocess"]), self.evaluator.val_data.device,
                          train_idx)


def open_run(run, *, reward: RewardFn | None = None, device: str = "auto",
             splits: dict[str, Split] | None = None, controller: bool = True) -> OpenRun:
    """A search directory's supernet, controller (if any; `controller=False` skips it, e.g. to train a
    fresh one on the saved supernet) and evaluator on its reward images, with `reward` as the hook."""
    run = Path(run)
    raw = _load(run / "supernet.pt", "supernet") if (run / "supernet.pt").is_file() else None
    if raw is None:
        raise CheckpointError(f"{run / 'supernet.pt'} not found; is {run} a `mnet search` output directory?")
    cfg = SearchConfig.from_json(raw["config"])
    dev = resolve_device(device)
    space = SearchSpace.from_json(raw["space"])
    preprocess = Preprocess.from_json(raw["preprocess"])
    if splits is None:
        if not raw.get("dataset") or not Path(raw["dataset"]).is_dir():
            raise CheckpointError(f"{run}: its dataset {raw.get('dataset')!r} is not there any more; "
                                  "restore it to the same path")
        splits = load_splits(raw["dataset"], preprocess, ("train",))
    train_split = splits["train"]
    train_idx, val_idx = split_train_val(train_split.labels, cfg.val_fraction, cfg.seed)
    if val_idx.tolist() != raw["val_indices"].tolist():
        raise CheckpointError(f"{run}: the dataset's train split differs from the one searched on")
    supernet = Supernet(space, sharing=cfg.sharing).to(dev)
    supernet.load_state_dict(raw["model"])
    restore_depthwise(supernet, raw)
    agent = None
    if controller and cfg.strategy == "enas":
        path = run / "controller.pt"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: the controller stage has not run yet; "
                                  "finish it with `mnet search ... --resume`")
        agent = Reinforce(space, cfg.controller, cfg.seed + _AGENT_SEED)
        agent.load_state_dict(_load(path, "controller")["agent"])
    calib = DeviceData(train_split, preprocess, dev, train_idx) if cfg.bn == "recalibrate" else None
    evaluator = Evaluator(supernet, DeviceData(train_split, preprocess, dev, val_idx), cfg.batch_size,
                          reward=reward, bn=cfg.bn, amp=cfg.amp, seed=cfg.seed + _EVAL_SEED, calib_data=calib)
    return OpenRun(cfg, space, supernet, agent, evaluator, raw, train_split)
