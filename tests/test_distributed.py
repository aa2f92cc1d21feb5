"""Data-parallel training and search (search.distributed) on CPU: 2 gloo ranks.

BatchNorm on CPU normalises each rank's shard with its own statistics (SyncBatchNorm is CUDA-only),
so 2 ranks at global batch B equal one process that runs the two halves of every batch through the
network separately ("ghost batch norm", `_Ghost` below) — not one process at batch B. The equality
test compares against that reference with real BNs, and checks that the plain full-batch run differs
by far more than the tolerance, so the comparison cannot pass vacuously.

The controller phase has no such caveat: each sampled architecture is scored whole on one rank, so
2 ranks at --controller-batch 2 equal one process at --controller-batch 2 (up to the order of a float
sum), from the same supernet. Those tests share one supernet (a single-process stage, copied) and
compare only what the controller phase does.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from mnet.search import enas
from mnet.search.controller import ControllerConfig
from mnet.search.distributed import setup as setup_distributed
from mnet.search.enas import SearchConfig, search
from mnet.search.model import MNet
from mnet.search.train import TrainConfig, fit, load_splits
from torch import nn

from mnet.arch import PRESETS
from mnet.data import Dataset, Split
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
           "--supernet-epochs", "2", "--controller-steps", "4", "--controller-batch", "2", "--derive-samples", "3",
           "--batch-size", "16", "--no-fast-depthwise", "--device", "cpu"]
    r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 + 4  # supernet epochs + scored architectures, written once (rank 0)
    assert [(x["step"], x["update"]) for x in records[2:]] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert (out / "arch.json").is_file() and (out / "controller.pt").is_file()
    assert json.loads((out / "search.json").read_text())["ranks"] == 2
    assert r.stdout.count("arch →") == 1  # rank 1 prints nothing


def _gradients_rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist, _ = setup_distributed("cpu")
    both, none, other = (nn.Parameter(torch.zeros(3)) for _ in range(3))
    both.grad = torch.full((3,), rank + 1.0)
    if rank == 1:
        other.grad = torch.full((3,), 5.0)
    dist.all_reduce_gradients([both, none, other], keep_unused=True)
    torch.save({"both": both.grad, "none": none.grad, "other": other.grad}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_all_reduce_gradients_keeps_unused_parameters_unused(tmp_path):
    """What one process would do: a gradient no rank has stays None (Adam skips the parameter), one
    that a single rank has is summed with zeros elsewhere."""
    mp.spawn(_gradients_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        g = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(g["both"], torch.full((3,), 3.0)) and g["none"] is None
        assert torch.equal(g["other"], torch.full((3,), 5.0))


def _thread_names() -> list[str]:
    return sorted(p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm"))


def _teardown_rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist, _ = setup_distributed("cpu")
    during = _thread_names()
    torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)  # what a run does after joining: imports torch._dynamo
    importlib.import_module("torch.distributed.nn")  # what torch._dynamo imports: defaults of group.WORLD
    dist.all_gather(rank)
    torch.distributed.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"during": during, "after": _thread_names()}))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
def test_destroying_the_group_stops_its_threads(tmp_path):
    """The group must not outlive destroy_process_group: its gloo and TCPStore threads, torn down with the
    interpreter instead, can abort a rank at exit (a CI run failed that way, SIGABRT)."""
    mp.spawn(_teardown_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert any(n.startswith("gloo") for n in got["during"]), got  # not vacuous: the names are visible
        assert not [n for n in got["after"] if n.startswith(("gloo", "pt_gloo", "pt_tcpstore"))], (rank, got)


def _interrupt_rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist, _ = setup_distributed("cpu")
    flags = [dist.any(False), dist.any(rank == 1)]
    interrupt, stopped_at = enas._DeferredInterrupt(dist), None
    for step in range(4):
        if rank == 1 and step == 2:
            interrupt.requested = True  # the Ctrl-C reached rank 1 only (or first)
        try:
            interrupt.check()
        except KeyboardInterrupt:
            stopped_at = step
            break
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"flags": flags, "stopped_at": stopped_at}))
    torch.distributed.destroy_process_group()


def test_a_ctrl_c_on_one_rank_stops_every_rank_at_the_same_boundary(tmp_path):
    mp.spawn(_interrupt_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"flags": [False, True], "stopped_at": 2}, rank


# --- the controller phase on 2 ranks ---------------------------------------------------------------

# 4 updates of 2 architectures (a save every 4); lr high enough that the policy moves far beyond the tolerance
SEARCH = SearchConfig(preset="tiny", supernet_epochs=1, batch_size=8, derive_samples=2, topk=2,
                      controller=ControllerConfig(steps=8, lr=0.02), controller_batch=2, checkpoint_every=4,
                      device="cpu", fast_depthwise=False)


def _search_splits(data: Path) -> dict[str, Split]:
    """48 training images: 39 for the supernet, 9 for rewards (as in test_search_enas)."""
    full = Dataset(data).load("train", Preprocess((24, 32)))
    keep = list(range(48))
    return {"train": Split("train", full.images[keep], full.labels[keep], full.classes,
                           [full.paths[i] for i in keep])}


def _search(data: Path, out: Path, cfg: SearchConfig, resume: bool = False, stop_at=None) -> None:
    def progress(stage, done, total, info):
        if (stage, done) == stop_at:
            raise _Stop  # a crash: nothing saved on the way out

    try:
        search(data, out, cfg, splits=_search_splits(data), resume=resume, progress=progress, plots=False)
    except _Stop:
        pass


def _search_rank_main(rank: int, world: int, port: int, data: str, out: str, cfg: SearchConfig, resume: bool,
                      stop_at) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    train_controller = enas.train_controller

    def keep_controller(agent, *args, **kwargs):  # each rank's final controller, to compare across ranks
        train_controller(agent, *args, **kwargs)
        torch.save(agent.controller.state_dict(), Path(out) / f"controller-rank{rank}.pt")

    enas.train_controller = keep_controller
    _search(Path(data), Path(out), cfg, resume, stop_at)
    torch.distributed.destroy_process_group()


def _search_2_ranks(data: Path, out: Path, stop_at=None) -> None:
    mp.spawn(_search_rank_main, args=(2, _free_port(), str(data), str(out), SEARCH, True, stop_at), nprocs=2,
             join=True)


def _controller(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "controller.pt", weights_only=True)["agent"]["controller"]


def _controller_records(run: Path) -> list[dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records if r["stage"] == "controller"]


@pytest.fixture(scope="module")
def supernet_run(colour_data, tmp_path_factory):
    """One single-process supernet stage (stopped right after its save) that every controller run resumes."""
    out = tmp_path_factory.mktemp("supernet") / "run"
    _search(colour_data, out, SEARCH, stop_at=("supernet", SEARCH.supernet_epochs))
    assert (out / "supernet.pt").is_file() and not (out / "controller.pt").exists()
    return out


@pytest.fixture(scope="module")
def two_rank_search(colour_data, supernet_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks") / "run"
    shutil.copytree(supernet_run, out)
    _search_2_ranks(colour_data, out)
    return out


def test_controller_on_2_ranks_equals_one_process(colour_data, supernet_run, two_rank_search, tmp_path):
    two = _controller(two_rank_search)
    # every rank ends with the same controller, bit for bit (one all-reduce, one Adam step on each)
    rank1 = torch.load(two_rank_search / "controller-rank1.pt", weights_only=True)
    assert all(torch.equal(two[k], rank1[k]) for k in two)
    one_run = tmp_path / "one"
    shutil.copytree(supernet_run, one_run)
    _search(colour_data, one_run, SEARCH, resume=True)
    one = _controller(one_run)
    # the same architectures, scored on the same minibatches; the gradient sum differs only in float order
    a, b = _controller_records(one_run), _controller_records(two_rank_search)
    assert [(r["step"], r["update"], r["arch"], r["reward"]) for r in a] == \
        [(r["step"], r["update"], r["arch"], r["reward"]) for r in b]
    assert [r["log_prob"] for r in a] == pytest.approx([r["log_prob"] for r in b], abs=1e-5)
    # Adam divides by sqrt(v) + 1e-8, so gradient entries near 1e-8 turn float-order noise into visible
    # steps: one process summing the same two per-sample gradients in the other order ends 3e-5 away
    # (measured, lr 0.02, 4 updates); a wrong semantics moves by > 1e-2 (below)
    assert _max_diff(one, two) < 1e-4
    # derivation: the ranks scored alternate candidates and gathered them, one process scored them all
    top1, top2 = (json.loads((r / "topk.json").read_text()) for r in (one_run, two_rank_search))
    assert len(top1) > 1 and [(c["arch"], c["reward"], c["accuracy"]) for c in top1] == \
        [(c["arch"], c["reward"], c["accuracy"]) for c in top2]
    # not vacuous: the policy moved far beyond that tolerance, and one architecture per update (the
    # paper's batch) with the same budget ends elsewhere
    init = enas.Reinforce(_space(supernet_run), SEARCH.controller, SEARCH.seed + enas._AGENT_SEED)
    assert _max_diff(init.controller.state_dict(), two) > 1e-2
    batch1 = SearchConfig(**{**SEARCH.__dict__, "controller_batch": 1})
    _search(colour_data, tmp_path / "batch1", batch1)
    assert _max_diff(_controller(tmp_path / "batch1"), two) > 1e-2


def test_controller_on_2_ranks_killed_and_resumed(colour_data, supernet_run, two_rank_search, tmp_path):
    run = tmp_path / "killed"
    shutil.copytree(supernet_run, run)
    _search_2_ranks(colour_data, run, stop_at=("controller", 5))  # in update 3: the save after update 2 is left
    assert torch.load(run / "controller.pt", weights_only=True)["agent"]["step"] == 4
    assert len(_controller_records(run)) == 6  # update 3 was logged, not saved: the resume drops its lines
    _search_2_ranks(colour_data, run)
    full, resumed = _controller(two_rank_search), _controller(run)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert _controller_records(run) == _controller_records(two_rank_search)
    assert (run / "arch.json").read_text() == (two_rank_search / "arch.json").read_text()


def _space(run: Path):
    from mnet.arch import SearchSpace

    return SearchSpace.from_json(torch.load(run / "supernet.pt", weights_only=True)["space"])
