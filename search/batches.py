"""Minibatches from a cached `Split`, with the data kept on the training device.

The uint8 images live on the device once (a 5600×24×32 set is 13 MB); flip and normalisation run
there per batch, so there are no DataLoader workers and no host round trips per step. Shuffling and
flips draw from one CPU `torch.Generator`, so a run is reproducible and resumable on any device.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from mnet.data import Split
from mnet.preprocess import Preprocess

__all__ = ["DeviceData", "fast_path"]


class DeviceData:
    def __init__(self, split: Split, preprocess: Preprocess, device: torch.device | str = "cpu",
                 indices: np.ndarray | None = None):
        idx = np.arange(len(split)) if indices is None else np.asarray(indices)
        self.device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(split.images[idx])).to(self.device)  # N,H,W,3 uint8
        self.labels = torch.from_numpy(split.labels[idx]).to(self.device)
        self.mean = torch.tensor(preprocess.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.std, device=self.device).view(1, 3, 1, 1)
        self.channels_last = False  # NHWC batches for a channels_last model (`fast_path`)

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)

    def to_input(self, images_u8: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """NHWC uint8 → normalised NCHW float32 (the torch twin of `Preprocess.normalize`)."""
        x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
        if flip is not None:  # no `flip.any()` shortcut: it would stall a GPU step on a host sync
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batches(self, batch_size: int, *, shuffle: bool = False, flip_p: float = 0.0,
                generator: torch.Generator | None = None, drop_last: bool = False,
                shard: tuple[int, int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Minibatches in order (or shuffled); `shard=(rank, world)` yields rank's contiguous slice of each
        global batch of `batch_size`. Every rank draws the whole batch's order and flips, so the
        generators stay in step and the union of the slices is the single-process batch; a final batch
        with fewer items than ranks is skipped (search.distributed)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for b in range(self.num_batches(batch_size, drop_last)):
            idx = order[b * batch_size:(b + 1) * batch_size]
            flip = torch.rand(len(idx), generator=generator) < flip_p if flip_p > 0 else None
            if shard is not None:
                rank, world = shard
                if len(idx) < world:
                    continue
                idx = idx.tensor_split(world)[rank]
                flip = flip.tensor_split(world)[rank] if flip is not None else None
            flip = flip.to(self.device) if flip is not None else None
            idx = idx.to(self.device)
            yield self.to_input(self.images[idx], flip), self.labels[idx]

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One random minibatch (without replacement inside it), no augmentation: for rewards."""
        idx = torch.randperm(len(self), generator=generator)[:batch_size].to(self.device)
        return self.to_input(self.images[idx]), self.labels[idx]


def fast_path(model: torch.nn.Module, data: list[DeviceData], device: torch.device, compile_modules=None,
              autotune: bool = False) -> None:
    """GPU settings that change speed, not results: channels_last tensors on CUDA, cuDNN autotuning
    when `autotune`, and `torch.compile` of `compile_modules` (in place, so state_dict names do not
    change) when given.

    Autotuning is off by default: measured on an H100 (bench/gpu_bench.py, mnet-24-32 supernet, amp),
    `cudnn.benchmark` spent 278 s of the first epoch trying algorithms for the large-kernel depthwise
    shapes and then saved 1.2 s per epoch (6.2 s vs 7.4 s steady): it breaks even after ~230 epochs,
    more than the paper's 100."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = autotune
        model.to(memory_format=torch.channels_last)
        for d in data:
            d.channels_last = True
    for m in compile_modules or ():
        m.compile()
