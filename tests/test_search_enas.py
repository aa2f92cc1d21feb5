"""The search loop: both schedules and strategies write their files; kill-and-resume is exact."""

import json
import shutil

import numpy as np
import pytest
import torch
from mnet.search.controller import ControllerConfig
from mnet.search.derive import derive_run
from mnet.search.enas import SearchConfig, search, split_train_val

from mnet.arch import Arch
from mnet.data import Dataset, Split
from mnet.errors import CheckpointError, ConfigError
from mnet.preprocess import Preprocess

CFG = SearchConfig(preset="tiny", supernet_epochs=2, batch_size=8, derive_samples=4, topk=3,
                   controller=ControllerConfig(steps=6), controller_batch=1, checkpoint_every=4, device="cpu")
ALT = SearchConfig(**{**CFG.__dict__, "schedule": "alternating"})
RANDOM = SearchConfig(**{**CFG.__dict__, "strategy": "random"})
# 3 updates of 2 architectures; a save every 3 architectures falls inside an update, so it happens at its end
BATCH = SearchConfig(**{**CFG.__dict__, "controller_batch": 2, "checkpoint_every": 3})


def _half_reward(arch, acc):
    """A stand-in for the latency-aware reward: scales the accuracy and reports an extra."""
    return 0.5 * acc, {"mmacs": arch.macs() / 1e6}


def _every_other_dense(model, batch=128, **_):
    """Stands in for the timing-based choice: deterministic, and mixed, so a resume must restore it."""
    from mnet.search.ops import SepConv

    for i, m in enumerate(x for x in model.modules() if isinstance(x, SepConv)):
        m.impl = "dense" if i % 2 else "conv"


@pytest.fixture(scope="module", autouse=True)
def fixed_depthwise_choice():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mnet.search.enas.select_depthwise", _every_other_dense)
        yield


@pytest.fixture(scope="module")
def splits(colour_data):
    """48 training images (39 for the supernet = 5 batches of 8, 9 for rewards: a reward minibatch of 8 is a true sample): fast on a CPU."""
    full = Dataset(colour_data).load("train", Preprocess((24, 32)))
    keep = np.arange(48)
    return {"train": Split("train", full.images[keep], full.labels[keep], full.classes,
                           [full.paths[i] for i in keep])}


@pytest.fixture(scope="module")
def runs(colour_data, splits, tmp_path_factory):
    """Uninterrupted reference runs, one per schedule / strategy."""
    root = tmp_path_factory.mktemp("search")
    search(colour_data, root / "two-stage", CFG, splits=splits, plots=True)
    search(colour_data, root / "alternating", ALT, splits=splits, reward=_half_reward, plots=False)
    search(colour_data, root / "random", RANDOM, splits=splits, plots=False)
    search(colour_data, root / "batch", BATCH, splits=splits, plots=False)
    return root


def _records(run):
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("seconds", None)
        out.append(r)
    return out


def _assert_same_run(a, b):
    assert json.loads((a / "arch.json").read_text()) == json.loads((b / "arch.json").read_text())
    assert json.loads((a / "topk.json").read_text()) == json.loads((b / "topk.json").read_text())
    assert _records(a) == _records(b)
    for name, key in (("supernet.pt", "model"), ("controller.pt", "agent")):
        if not (a / name).exists():
            assert not (b / name).exists()
            continue
        x = torch.load(a / name, weights_only=True)[key]
        y = torch.load(b / name, weights_only=True)[key]
        if key == "agent":
            x, y = x["controller"], y["controller"]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)


def _stop_at(stage, done, exc=KeyboardInterrupt, epoch=None):
    def progress(s, d, total, info):
        if s == stage and d == done and (epoch is None or info.get("epoch") == epoch):
            raise exc("stop here")
    return progress


def test_two_stage_writes_every_file(runs):
    run = runs / "two-stage"
    for name in ("supernet.pt", "controller.pt", "metrics.jsonl", "search.json", "arch.json", "topk.json",
                 "derive.json", "supernet.png", "reward.png", "entropy.png", "ops.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    arch = Arch.from_json(json.loads((run / "arch.json").read_text()))
    assert set(json.loads((run / "arch.json").read_text())) == set(arch.to_json())  # pure Arch
    topk = json.loads((run / "topk.json").read_text())
    assert 1 <= len(topk) <= 3 and Arch.from_json(topk[0]["arch"]) == arch
    assert [t["reward"] for t in topk] == sorted((t["reward"] for t in topk), reverse=True)
    assert all(t["log_prob"] < 0 and t["params"] > 0 for t in topk)
    recs = _records(run)
    assert [r["epoch"] for r in recs if r["stage"] == "supernet"] == [1, 2]
    ctl = [r for r in recs if r["stage"] == "controller"]
    assert [r["step"] for r in ctl] == list(range(1, 7))
    assert all(0 <= r["accuracy"] <= 1 and r["entropy"] > 0 and len(r["arch"]) == 4 for r in ctl)
    meta = json.loads((run / "search.json").read_text())
    assert meta["config"]["schedule"] == "two-stage" and meta["arch"] == arch.to_json()
    assert meta["supernet_images"] == 39 and meta["reward_images"] == 9 and meta["gpu_hours"] is None
    # loadable with weights_only, and the supernet alone rebuilds
    from mnet.search.supernet import load_supernet

    net, raw = load_supernet(run / "supernet.pt")
    assert raw["position"]["epoch"] == 2 and net.space.name == "tiny"
    n = sum(len(layer) for layer in net.cells)  # distinct modules: 2 per layer, entangled (search.supernet)
    assert n == 8 and raw["depthwise"] == ["dense" if i % 2 else "conv" for i in range(n)] == \
        [c.impl for layer in net.cells for c in layer]
    assert torch.load(run / "controller.pt", weights_only=True)["agent"]["step"] == 6


def test_alternating_interleaves_and_reward_hook_is_logged(runs):
    recs = _records(runs / "alternating")
    order = [(r["stage"], r.get("epoch", r.get("step"))) for r in recs]
    assert order == [("supernet", 1), *[("controller", s) for s in (1, 2, 3)],
                     ("supernet", 2), *[("controller", s) for s in (4, 5, 6)]]
    for r in recs[1:4]:
        assert r["reward"] == pytest.approx(0.5 * r["accuracy"]) and r["mmacs"] > 0
    topk = json.loads((runs / "alternating" / "topk.json").read_text())
    assert all(t["reward"] == pytest.approx(0.5 * t["accuracy"]) and "mmacs" in t for t in topk)


def test_random_strategy_scores_the_same_budget(runs):
    run = runs / "random"
    assert not (run / "controller.pt").exists()
    d = json.loads((run / "derive.json").read_text())
    assert d["strategy"] == "random" and d["samples"] == CFG.derive_samples + CFG.controller_steps
    assert d["candidates"] == 10  # 10 distinct uniform samples
    assert all(t["log_prob"] is None for t in json.loads((run / "topk.json").read_text()))
    assert not any(r["stage"] == "controller" for r in _records(run))


def test_two_stage_kill_and_resume_is_exact(colour_data, splits, runs, tmp_path):
    out = tmp_path / "cut"
    # Ctrl-C in the middle of the second supernet epoch: state saved on the way out
    with pytest.raises(KeyboardInterrupt):
        search(colour_data, out, CFG, splits=splits, plots=False, progress=_stop_at("batch", 2, epoch=2))
    assert torch.load(out / "supernet.pt", weights_only=True)["position"]["batch"] == 2
    # a crash (no save on the way out) at controller step 5: the periodic save at step 4 is what's left
    with pytest.raises(RuntimeError):
        search(colour_data, out, CFG, splits=splits, plots=False, resume=True,
               progress=_stop_at("controller", 5, RuntimeError))
    assert torch.load(out / "controller.pt", weights_only=True)["agent"]["step"] == 4
    search(colour_data, out, CFG, splits=splits, plots=False, resume=True)
    _assert_same_run(runs / "two-stage", out)


def test_alternating_kill_and_resume_is_exact(colour_data, splits, runs, tmp_path):
    out = tmp_path / "cut"
    kw = {"splits": splits, "plots": False, "reward": _half_reward}
    with pytest.raises(KeyboardInterrupt):  # inside the first controller block
        search(colour_data, out, ALT, progress=_stop_at("controller", 2), **kw)
    with pytest.raises(KeyboardInterrupt):  # inside the second pass over the data
        search(colour_data, out, ALT, resume=True, progress=_stop_at("batch", 1, epoch=2), **kw)
    search(colour_data, out, ALT, resume=True, **kw)
    _assert_same_run(runs / "alternating", out)


def test_controller_batch_logs_every_scored_architecture(runs):
    ctl = [r for r in _records(runs / "batch") if r["stage"] == "controller"]
    # controller_steps counts scored architectures: 6 lines, 3 updates of 2
    assert [(r["step"], r["update"]) for r in ctl] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3)]
    for a, b in zip(ctl[::2], ctl[1::2]):  # leave-one-out: each against the other of its update
        assert a["advantage"] == pytest.approx(a["reward"] - b["reward"]) == pytest.approx(-b["advantage"])
    assert torch.load(runs / "batch" / "controller.pt", weights_only=True)["agent"]["step"] == 6
    # sample k is drawn from (seed, k) alone: the batched run's first architecture is the unbatched run's
    first = next(r for r in _records(runs / "two-stage") if r["stage"] == "controller")
    assert (first["arch"], first["reward"]) == (ctl[0]["arch"], ctl[0]["reward"])


def test_controller_batch_kill_and_resume_is_exact(colour_data, splits, runs, tmp_path):
    out = tmp_path / "cut"
    with pytest.raises(RuntimeError):  # a crash in update 3: the save after update 2 (step 4 >= 3) is left
        search(colour_data, out, BATCH, splits=splits, plots=False, progress=_stop_at("controller", 5, RuntimeError))
    assert torch.load(out / "controller.pt", weights_only=True)["agent"]["step"] == 4
    search(colour_data, out, BATCH, splits=splits, plots=False, resume=True)
    _assert_same_run(runs / "batch", out)


def test_derive_repeats_the_search_and_argmax(colour_data, splits, runs, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(runs / "two-stage", run)
    for name in ("arch.json", "topk.json"):
        (run / name).unlink()
    derive_run(run, splits=splits, device="cpu")
    for name in ("arch.json", "topk.json"):
        assert (run / name).read_text() == (runs / "two-stage" / name).read_text()
    best = derive_run(run, argmax=True, splits=splits, device="cpu")
    topk = json.loads((run / "topk.json").read_text())
    assert len(topk) == 1 and Arch.from_json(topk[0]["arch"]) == best.arch
    assert json.loads((run / "derive.json").read_text())["method"] == "argmax"
    with pytest.raises(ConfigError, match="random search"):
        derive_run(runs / "random", argmax=True, splits=splits, device="cpu")


def test_resume_guards(colour_data, splits, runs, tmp_path):
    with pytest.raises(ConfigError, match="--resume"):
        search(colour_data, runs / "two-stage", CFG, splits=splits)
    with pytest.raises(CheckpointError, match="not found"):
        search(colour_data, tmp_path / "none", CFG, splits=splits, resume=True)
    run = tmp_path / "copy"
    shutil.copytree(runs / "two-stage", run)
    other = SearchConfig(**{**CFG.__dict__, "batch_size": 16})
    with pytest.raises(CheckpointError, match="options differ"):
        search(colour_data, run, other, splits=splits, resume=True)


def test_config_validation_names_the_option():
    with pytest.raises(ConfigError, match="--strategy"):
        SearchConfig(strategy="evolution")
    with pytest.raises(ConfigError, match="--schedule"):
        SearchConfig(strategy="random", schedule="alternating")
    with pytest.raises(ConfigError, match="preset"):
        SearchConfig(preset="huge")
    with pytest.raises(ConfigError, match="--controller-batch = 4: .*multiple"):
        SearchConfig(controller=ControllerConfig(steps=6), controller_batch=4)
    with pytest.raises(ConfigError, match="--controller-batch"):
        SearchConfig(controller_batch=0)
    cfg = SearchConfig.from_json(json.loads(json.dumps(CFG.to_json())))
    assert cfg == CFG


def test_split_is_stratified_and_seeded():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    tr, va = split_train_val(labels, 0.2, seed=0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(100))
    assert np.bincount(labels[va]).tolist() == [10, 6, 4]
    assert split_train_val(labels, 0.2, seed=0)[1].tolist() == va.tolist()
    assert split_train_val(labels, 0.2, seed=1)[1].tolist() != va.tolist()
