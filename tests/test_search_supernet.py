"""The supernet: a sampled path equals the standalone MNet holding the same weights; BN scoring modes."""

import random

import pytest
import torch

from mnet.arch import PRESETS, Arch, Layer
from mnet.errors import CheckpointError, ConfigError
from mnet.search.checkpoint import save_checkpoint
from mnet.search.depthwise import depthwise_impls, set_depthwise_impls
from mnet.search.model import MNet
from mnet.search.supernet import (
    Supernet,
    batch_stats,
    load_supernet,
    recalibrate_bn,
)

TINY = PRESETS["tiny"]


def _trained_looking(net: torch.nn.Module) -> None:
    """Random non-trivial weights and BN statistics, so that a wrong copy cannot pass by accident."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in list(net.parameters()) + [b for n, b in net.named_buffers() if "running" in n]:
            t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5 if t.dim() == 1 else
                    torch.randn(t.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def supernet():
    torch.manual_seed(0)
    net = Supernet(TINY)
    _trained_looking(net)
    return net


ARCHS = [
    TINY.sample(random.Random(s)) for s in range(3)
] + [TINY.skeleton([Layer(39, 2, None), Layer(3, 1, 0), Layer(39, 1, 1), Layer(23, 2, 0)])]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "-".join(f"{x.kernel}.{x.dilation}.{x.skip}" for x in a.layers))
def test_path_equals_standalone_eval_and_train(supernet, arch):
    x = torch.randn(6, 3, 24, 32)
    child = supernet.child(arch)
    assert isinstance(child, MNet) and child.arch == arch
    assert sum(p.numel() for p in child.parameters()) == arch.num_params()
    supernet.eval(), child.eval()
    with torch.no_grad():
        assert torch.equal(supernet(x, arch), child(x))
    # train mode: same outputs, same gradients, same running-statistics updates
    sd_before = {k: v.clone() for k, v in supernet.state_dict().items()}
    supernet.train(), child.train()
    out_s, out_c = supernet(x, arch), child(x)
    assert torch.equal(out_s, out_c)
    out_s.square().sum().backward()
    out_c.square().sum().backward()
    path = supernet.path(arch)
    for i, cell in enumerate(path):
        for (n, p), q in zip(cell.named_parameters(), child.cells[i].parameters()):
            assert torch.equal(p.grad, q.grad), (i, n)
    after = supernet.child_state_dict(arch)
    for k, v in child.state_dict().items():
        assert torch.equal(after[k], v), k
    # ops off the path were not touched
    other = [c for layer in supernet.cells for c in layer if all(c is not p for p in path)]
    assert all(p.grad is None for c in other for p in c.parameters())
    supernet.load_state_dict(sd_before)
    supernet.zero_grad(set_to_none=True)


def test_child_uses_the_same_depthwise_implementation(supernet):
    arch = ARCHS[3]
    for i, op in enumerate(supernet.path(arch)):
        op.impl = ("dense", "fft", "conv", "dense")[i]
    try:
        child = supernet.child(arch).eval()
        assert [c.impl for c in child.cells] == ["dense", "fft", "conv", "dense"]
        x = torch.randn(4, 3, 24, 32)
        with torch.no_grad():
            assert torch.equal(supernet.eval()(x, arch), child(x))
    finally:
        for op in supernet.path(arch):
            op.impl = "conv"


def test_child_state_dict_names_and_copies(supernet):
    arch = ARCHS[0]
    sd = supernet.child_state_dict(arch)
    assert set(sd) == set(MNet(arch).state_dict())
    sd["stem.conv.weight"].add_(1.0)  # a copy: the supernet is unchanged
    assert not torch.equal(sd["stem.conv.weight"], supernet.stem.conv.weight)


def test_arch_outside_the_space_is_refused(supernet):
    wide = Arch((24, 32), 32, 1, (1, 2), 3, ARCHS[0].layers)
    with pytest.raises(ConfigError, match="search space"):
        supernet.child_state_dict(wide)


def test_batch_stats_uses_batch_statistics_and_keeps_buffers(supernet):
    arch = ARCHS[1]
    x = torch.randn(8, 3, 24, 32)
    buffers = {k: v.clone() for k, v in supernet.state_dict().items()}
    child = supernet.child(arch).train()
    with torch.no_grad():
        expected = child(x)  # train mode: batch statistics
        supernet.eval()
        with batch_stats(supernet.path_modules(arch)):
            got = supernet(x, arch)
        plain = supernet(x, arch)  # and afterwards the running statistics are back
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(plain, got)
    for k, v in supernet.state_dict().items():
        assert torch.equal(v, buffers[k]), k


def test_recalibrate_is_the_exact_mean_over_batches():
    torch.manual_seed(0)
    model = MNet(ARCHS[2]).eval()
    batches = [torch.randn(4, 3, 24, 32) for _ in range(3)]
    recalibrate_bn(model, model, batches)
    assert not model.stem.bn.training  # BN modes restored
    feats = [model.stem.conv(b) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    torch.testing.assert_close(model.stem.bn.running_mean, mean.detach(), rtol=1e-5, atol=1e-6)
    assert model.stem.bn.momentum == 0.1


def test_load_supernet_round_trip(supernet, tmp_path):
    n = len(depthwise_impls(supernet))
    impls = [("conv", "dense", "fft")[i % 3] for i in range(n)]
    save_checkpoint(tmp_path / "supernet.pt", {"kind": "supernet", "space": TINY.to_json(),
                                               "model": supernet.state_dict(), "depthwise": impls})
    net, _ = load_supernet(tmp_path / "supernet.pt")
    assert net.space == TINY and depthwise_impls(net) == impls
    x = torch.randn(2, 3, 24, 32)
    set_depthwise_impls(supernet, impls)
    try:
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x, ARCHS[0]), supernet.eval()(x, ARCHS[0]), rtol=0, atol=0)
    finally:
        set_depthwise_impls(supernet, ["conv"] * n)
    save_checkpoint(tmp_path / "other.pt", {"kind": "mnet"})
    with pytest.raises(CheckpointError, match="not an mnet supernet"):
        load_supernet(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_supernet(tmp_path / "missing.pt")


def test_evaluator_modes_score_without_touching_the_supernet(supernet, colour_data):
    from mnet.data import Dataset
    from mnet.preprocess import Preprocess
    from mnet.search.batches import DeviceData
    from mnet.search.supernet import Evaluator

    pre = Preprocess((24, 32))
    split = Dataset(colour_data).load("dev", pre)
    val, calib = DeviceData(split, pre, indices=range(0, 30, 2)), DeviceData(split, pre, indices=range(1, 30, 2))
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    arch = ARCHS[0]
    scores = {}
    for mode in ("batch", "running", "recalibrate"):
        ev = Evaluator(supernet, val, 8, bn=mode, seed=0, calib_data=calib, calib_batches=2,
                       reward=lambda a, acc, mode=mode: (acc - 1.0, {"mode": mode}))
        s = ev(arch)
        assert 0 <= s.accuracy <= 1 and s.reward == s.accuracy - 1.0 and s.extras == {"mode": mode}
        scores[mode] = ev.logits(arch, val.to_input(val.images[:4]))
    for k, v in supernet.state_dict().items():
        assert torch.equal(v, before[k]), k
    # recalibrate = a standalone copy whose BN statistics are re-estimated on the calibration batches
    child = supernet.child(arch)
    gen = torch.Generator().manual_seed(1)
    recalibrate_bn(child, child, [x for x, _ in calib.batches(8, shuffle=True, generator=gen)][:2])
    with torch.no_grad():
        torch.testing.assert_close(scores["recalibrate"], child.eval()(val.to_input(val.images[:4])))
    assert not torch.allclose(scores["running"], scores["recalibrate"])
    with pytest.raises(ConfigError, match="calib_data"):
        Evaluator(supernet, val, 8, bn="recalibrate")
    # the whole split: one recalibration per arch (not one per minibatch), the same logits on every batch
    ev = Evaluator(supernet, val, 8, bn="recalibrate", seed=0, calib_data=calib, calib_batches=2)  # 2 batches
    calls = []
    ev._recalibrated = lambda a, real=ev._recalibrated: calls.append(a) or real(a)
    whole = ev.split_score(arch)
    with torch.no_grad():
        expect = (child.eval()(val.to_input(val.images)).argmax(1) == torch.as_tensor(val.labels)).float().mean()
    assert calls == [arch] and whole.accuracy == pytest.approx(float(expect))


def test_ops_identical_after_cropping_share_one_module(supernet):
    """Issue 13 item 3: at 6×8 a 39×39 kernel is an 11×15, so k = 15…39 (d = 1) are one function."""
    keys = TINY.op_keys(4)  # layer 4 runs at 6×8
    assert len(set(keys)) < len(keys) and len(supernet.cells[3]) == len(set(keys))
    for i in range(1, TINY.num_layers + 1):
        assert len(supernet.cells[i - 1]) == len(set(TINY.op_keys(i)))
    a = TINY.skeleton([Layer(3, 1), Layer(3, 1), Layer(3, 1), Layer(27, 1)])
    b = a.replace_layers([*a.layers[:3], Layer(39, 1)])
    assert supernet.path(a)[3] is supernet.path(b)[3]
    assert supernet.path(a)[3] is not supernet.path(a.replace_layers([*a.layers[:3], Layer(11, 1)]))[3]
    x = torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        assert torch.equal(supernet.eval()(x, a), supernet.child(b).eval()(x))
    assert TINY.effective_size() < TINY.size()


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "-".join(f"{x.kernel}.{x.dilation}.{x.skip}" for x in a.layers))
def test_entangled_path_equals_standalone_with_the_centre_taps(arch):
    """Entangled sharing: one module per (layer, dilation); a smaller kernel is the largest's centre,
    and its child is exactly that network (forward and gradients reach the shared taps only)."""
    torch.manual_seed(0)
    net = Supernet(TINY, sharing="entangled")
    _trained_looking(net)
    assert all(len(cells) == 2 for cells in net.cells)
    x = torch.randn(4, 3, 24, 32)
    child = net.child(arch)
    net.eval(), child.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, arch), child(x), rtol=1e-5, atol=1e-5)
    net.train()
    net(x, arch).square().sum().backward()
    for i, (cell, layer) in enumerate(zip(net.path(arch), arch.layers), start=1):
        kh, kw = arch.layer_kernel_hw(i)
        g = cell.dw.weight.grad
        h0, w0 = (g.shape[2] - kh) // 2, (g.shape[3] - kw) // 2
        outside = g.clone()
        outside[:, :, h0:h0 + kh, w0:w0 + kw] = 0
        assert g.abs().sum() > 0 and outside.abs().sum() == 0
    with pytest.raises(ConfigError, match="sharing"):
        Supernet(TINY, sharing="nope")
