"""Data-parallel training and search (search.distributed) on CPU: 2 gloo ranks.

BatchNorm on CPU normalises each rank's shard with its own statistics (SyncBatchNorm is CUDA-only),
so 2 ranks at global batch B equal one process that runs the two halves of every batch through the
network separately ("ghost batch norm", `_Ghost` below) — not one process at batch B. The equality
test compares against that reference with real BNs, and checks that the plain full-batch run differs
by far more than the tolerance, so the comparison cannot pass vacuously.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from mnet.search.model import MNet
from mnet.search.train import TrainConfig, fit, load_splits
from torch import nn

from mnet.arch import PRESETS
from mnet.preprocess import Preprocess

ROOT = Path(__file__).resolve().parents[1]
ARCH = PRESETS["tiny"].sample(random.Random(0))
# batch 21 over 96 images: shards of 11 and 10 (unequal weights) and a last batch of 12
CFG = TrainConfig(epochs=3, batch_size=21, lr=0.05, lr_schedule="cosine", flip_p=0.5, seed=0, device="cpu",
                  fast_depthwise=False, eval_batch_size=64)


class _Stop(Exception):
    pass


class _Ghost(nn.Module):
    """One process doing what 2 CPU ranks do: each contiguous half of the batch through the net alone."""

    def __init__(self, net: nn.Module, parts: int):
        super().__init__()
        self.net, self.parts = net, parts

    def forward(self, x):
        return torch.cat([self.net(c) for c in x.tensor_split(self.parts)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(data: Path, out: Path, resume: bool = False, stop_after: int | None = None, ghost: int = 0):
    splits = load_splits(data, Preprocess(ARCH.input_hw))
    torch.manual_seed(CFG.seed)
    model = _Ghost(MNet(ARCH), ghost) if ghost else MNet(ARCH)

    def on_epoch(record):
        if stop_after is not None and record["epoch"] == stop_after:
            raise _Stop  # as if killed right after the epoch's checkpoint

    try:
        fit(model, splits["train"], splits["dev"], out, CFG, Preprocess(ARCH.input_hw), {"kind": "mnet"},
            resume=resume, on_epoch=on_epoch)
    except _Stop:
        pass
    return model


def _rank_main(rank: int, world: int, port: int, data: str, out: str, resume: bool, stop_after) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    _fit(Path(data), Path(out), resume, stop_after)
    torch.distributed.destroy_process_group()


def _ddp(data: Path, out: Path, resume: bool = False, stop_after: int | None = None) -> dict:
    mp.spawn(_rank_main, args=(2, _free_port(), str(data), str(out), resume, stop_after), nprocs=2, join=True)
    return torch.load(out / "last.pt", weights_only=True)["model"]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("net."): v.detach().clone() for k, v in model.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() <= b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def ddp_run(colour_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, _ddp(colour_data, out)


def test_ddp_equals_single_process_ghost_bn(colour_data, ddp_run, tmp_path):
    out, ddp_state = ddp_run
    ghost = _params(_fit(colour_data, tmp_path / "ghost", ghost=2))
    plain = _params(_fit(colour_data, tmp_path / "plain"))
    ddp = {k: ddp_state[k] for k in ghost}
    # float sums in another order (all-reduce vs one process) drift by ~1e-4 over 3 epochs of momentum SGD;
    # an order of magnitude below that, the wrong BN semantics differ by > 1e-2 (next assert)
    assert _max_diff(ghost, ddp) < 1e-3
    # not vacuous: full-batch BN statistics give clearly different weights after 3 epochs
    assert _max_diff(plain, ddp) > 1e-2
    # rank 0 alone wrote the metrics: one line per epoch, with global (both shards') metrics
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == CFG.epochs


def test_ddp_killed_run_resumes_to_the_same_weights(colour_data, ddp_run, tmp_path):
    _, full = ddp_run
    run = tmp_path / "killed"
    _ddp(colour_data, run, stop_after=1)
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    resumed = _ddp(colour_data, run, resume=True)
    for k, v in full.items():  # weights and BN statistics (averaged over ranks each epoch)
        assert torch.equal(v, resumed[k]), k
    assert len((run / "metrics.jsonl").read_text().splitlines()) == CFG.epochs


def test_torchrun_search_cli(colour_data, tmp_path):
    """`torchrun -m mnet search` end to end: 2 ranks, one set of files."""
    out = tmp_path / "search"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "mnet", "search", str(colour_data), "--out", str(out), "--preset", "tiny",
           "--supernet-epochs", "2", "--controller-steps", "4", "--derive-samples", "3", "--batch-size", "16",
           "--no-fast-depthwise", "--device", "cpu"]
    r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 + 4  # supernet epochs + controller steps, written once (rank 0)
    assert (out / "arch.json").is_file() and (out / "controller.pt").is_file()
    assert r.stdout.count("arch →") == 1  # rank 1 prints nothing
