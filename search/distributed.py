"""Data-parallel training and search under torchrun: `torchrun --nproc_per_node N -m mnet train|search ...`.

`setup()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), initialises the process group
(NCCL on CUDA with device cuda:LOCAL_RANK, gloo on CPU) and returns a `Dist`; without torchrun it
returns the single-process `Dist` and nothing else changes. The loops (`search.train.fit`,
`search.enas.SupernetTrainer`) take it from there:

- Batches. `batch_size` is the GLOBAL batch: every rank draws the same seeded permutation and flips
  from its own copy of the data generator and takes a contiguous slice of each global batch
  (`DeviceData.batches(shard=...)`). So N ranks see exactly the images, in the same order, that one
  process would with the same --batch-size and seed, and a run resumes on any number of ranks.
  A final batch smaller than N is skipped (every rank must hold at least one image).
- Gradients. Each rank's loss is its shard's mean × its share of the global batch, and `all_reduce_
  gradients` sums the gradients of a given parameter list in one flat all-reduce: the result is the
  gradient of the global-batch mean. We do this by hand instead of wrapping in DDP because a supernet
  step touches one path (stem, L of L×|ops| cells, head): DDP would need find_unused_parameters (a
  graph walk per step and an all-reduce of every weight) where the path's parameters are known up
  front. Every rank trains the SAME path each step: the path samplers are seeded alike and consume
  the same draws on every rank.
- BatchNorm. On CUDA the BNs become SyncBatchNorm, so the normalisation uses global-batch statistics
  and a step equals the single-process step. On CPU (gloo; SyncBatchNorm is CUDA-only) each rank
  normalises with its shard's statistics ("ghost batch norm"): the same gradient as one process that
  runs each shard through the network separately. The running statistics are averaged across ranks
  at every epoch end (`average_buffers`), so all ranks hold the same model, the checkpoint describes
  every rank, and a resumed run matches an uninterrupted one.
- Files. Rank 0 alone writes checkpoints, metrics, plots and arch.json; every rank reads the same
  checkpoint on --resume. Choices made by timing (`search.depthwise`) are made on rank 0 and broadcast.
- Controller. An update averages REINFORCE over `--controller-batch` B sampled architectures, B being
  the GLOBAL batch like `--batch-size`: rank r samples and scores positions r, r + N, r + 2N, … of
  each batch, each on its own validation minibatch. Sample k of the run (its architecture and its
  minibatch) is drawn from generators seeded by (seed, k) (`search.controller.stream`), so it is the
  same whichever rank draws it. The rewards (with the log-probs, entropies and reward extras that
  rank 0 logs) are all-gathered (`all_gather`), every rank updates the baseline from all B rewards
  in sample order, computes the REINFORCE loss of its own samples only, and the controller's
  gradients are summed (`all_reduce_gradients`, loss scaled by 1/B: the batch mean), so every rank
  takes the same Adam step and the controllers stay identical. N ranks score B architectures in the
  time one process scores B/N: the phase is N× faster for a budget of scored architectures when N
  divides B, and a run resumes on any number of ranks. B = 1 (the paper) leaves all ranks but rank 0
  idle in the phase. Scoring uses whole minibatches on one rank, so it is the same on CPU and CUDA.
"""

from __future__ import annotations

import atexit
import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mnet.errors import ConfigError

__all__ = ["SINGLE", "Dist", "current", "setup"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        """(rank, world_size) for `DeviceData.batches`, or None when alone."""
        return (self.rank, self.world_size) if self.enabled else None

    def loss_weight(self, n_local: int, n_global: int) -> float:
        """Factor on a shard's mean loss that makes the summed gradients the global-batch mean's."""
        return n_local / n_global if self.enabled else 1.0

    def all_reduce_gradients(self, params: Iterable[nn.Parameter], keep_unused: bool = False) -> None:
        """Sum the gradients of `params` over ranks in one flat all-reduce (the same list on every rank).

        `keep_unused`: a parameter that no rank has a gradient for keeps `grad = None`, as it would in
        one process, so the optimizer skips it (Adam would otherwise move it with its momentum). The
        controller needs it (a decision no sample took, e.g. "no skip" never chosen, leaves its
        embedding without gradient), the supernet's path does not. The "has a gradient" flags travel
        in the same flat buffer: still one all-reduce.
        """
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        had = [p.grad is not None for p in params]
        for p in params:
            if p.grad is None:  # unused on this rank's shard; the others' gradients still count
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flags = [torch.tensor(had, dtype=grads[0].dtype, device=grads[0].device)] if keep_unused else []
        flat = self._all_reduce(_flatten_dense_tensors(grads + flags))
        reduced = _unflatten_dense_tensors(flat, grads + flags)
        for g, r in zip(grads, reduced):
            g.copy_(r)
        if keep_unused:
            for p, n in zip(params, reduced[-1].tolist()):
                if n == 0:  # counts of ranks with a gradient: exact in any float type
                    p.grad = None

    @staticmethod
    def _all_reduce(t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks; returns the result on `t`'s device. NCCL reduces CUDA tensors only, and the
        controller lives on the CPU (search.controller), so its tensors make a round trip to this
        rank's GPU there."""
        if t.device.type == "cpu" and torch_dist.get_backend() == "nccl":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            torch_dist.all_reduce(on_gpu)
            return on_gpu.cpu()
        torch_dist.all_reduce(t)
        return t

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` when alone."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, *tensors: torch.Tensor) -> None:
        """In-place sum over ranks (epoch metrics: one synchronisation per epoch, not per step)."""
        if self.enabled:
            for t in tensors:
                torch_dist.all_reduce(t)

    def average_buffers(self, model: nn.Module) -> None:
        """Average the floating-point buffers (BN running statistics) over ranks."""
        if not self.enabled:
            return
        bufs = [b for b in model.buffers() if b.is_floating_point()]
        if bufs:
            flat = _flatten_dense_tensors(bufs)
            torch_dist.all_reduce(flat)
            flat /= self.world_size
            for b, reduced in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
                b.copy_(reduced)

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any (a Ctrl-C that reached some ranks first).

        Over a gloo group even on NCCL jobs: a CPU flag needs no GPU round trip and no device sync."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], dtype=torch.int32)
        torch_dist.all_reduce(t, group=_control_group())
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (picklable objects: choices, flags)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def wrap_batchnorm(self, model: nn.Module, device: torch.device) -> nn.Module:
        """SyncBatchNorm on CUDA with several ranks (in place for the modules' children; returns the
        model, which is a new object only when `model` itself is a BN). Unchanged on CPU (ghost BN)."""
        if self.enabled and device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model


SINGLE = Dist()  # the process alone (no torchrun): every collective is a no-op


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def current() -> Dist:
    """The `Dist` of an initialised process group (torchrun), else the single-process one."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return SINGLE


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the torchrun job if there is one; returns (this rank, its device).

    `device` is the user's --device: "auto"/"cuda" become cuda:LOCAL_RANK under torchrun; an explicit
    "cuda:K" is refused there (each rank must own its GPU).
    """
    from mnet.search.train import resolve_device

    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE, resolve_device(device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device)
    if dev.type == "cuda":
        if device.startswith("cuda:"):
            raise ConfigError(f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK; "
                              "pass --device cuda or auto")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                              "lower --nproc_per_node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not torch_dist.is_initialized():
        _import_world_defaults()
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        atexit.register(_shutdown)
    return Dist(rank, world, local_rank), dev


# torch modules with `group=group.WORLD` default arguments: imported after init_process_group (the first
# optimizer imports torch._dynamo, which imports torch.distributed.nn), they keep the default group alive
# past destroy_process_group, and its gloo/store threads are then torn down with the interpreter, which
# can abort the process at exit (SIGABRT, "terminate called without an active exception").
_WORLD_DEFAULT_MODULES = ("torch.distributed.nn", "torch.distributed.optim", "torch.distributed.fsdp.sharded_grad_scaler")


def _import_world_defaults() -> None:
    """Import them while group.WORLD is still None, so their defaults hold None, not the group."""
    for name in _WORLD_DEFAULT_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # another torch version's layout: nothing there to capture the group
            pass


_CONTROL: Any = None


def _control_group() -> Any:
    """The gloo group for small CPU control messages (created on first use: every rank reaches the
    same first `any()`, as a collective must); the default group when that is gloo already."""
    global _CONTROL
    if torch_dist.get_backend() == "gloo":
        return None
    if _CONTROL is None:
        _CONTROL = torch_dist.new_group(backend="gloo")
    return _CONTROL


def _shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
