"""The FFT depthwise form is exact, and one mechanism chooses conv / dense / fft per layer shape."""

import random

import pytest
import torch
from conftest import train_cut_after_first_epoch
import torch.nn.functional as F
from mnet.search import depthwise as dw
from mnet.search.depthwise import (
    IMPLS,
    depthwise,
    depthwise_impls,
    restore_depthwise,
    select_depthwise,
    set_depthwise_impls,
    use_conv,
)
from mnet.search.fft import fast_len, fft_depthwise, fft_size
from mnet.search.model import MNet
from mnet.search.ops import SepConv

from mnet.arch import PRESETS, cropped_kernel
from mnet.errors import CheckpointError


def _conv(x, wt, d):
    kh, kw = wt.shape[-2:]
    return F.conv2d(x, wt, None, 1, (d * (kh // 2), d * (kw // 2)), d, wt.shape[0])


def _close(got, ref, tol):
    """Equal up to `tol` relative to the tensor's scale: a k×k conv sums k² products, so float32
    rounding grows with the values, and elementwise relative error is meaningless near zero."""
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.detach().abs().max()))


def _case(k, d, h, w, n, crop, dtype=torch.float32):
    kh, kw = cropped_kernel(k, d, h, w) if crop else (k, k)
    x = torch.randn(n, 5, h, w, dtype=dtype, requires_grad=True)
    wt = torch.randn(5, 1, kh, kw, dtype=dtype, requires_grad=True)
    return x, wt


# odd and even maps, every map size of the presets, cropped kernels and full ones (taps that wrap
# around the FFT grid onto each other), dilation 1 and 2, batch 1 and 3
CASES = [(39, 1, 6, 8, 3, True), (39, 2, 6, 8, 1, True), (23, 2, 12, 16, 3, True), (7, 1, 5, 7, 3, True),
         (3, 1, 4, 4, 1, True), (11, 2, 3, 9, 3, True), (15, 1, 24, 32, 2, True), (39, 2, 24, 32, 2, True),
         (39, 2, 6, 8, 3, False), (7, 2, 5, 7, 3, False), (31, 1, 7, 5, 2, False), (3, 2, 1, 1, 2, True)]


@pytest.mark.parametrize("k,d,h,w,n,crop", CASES)
def test_fft_equals_conv2d_forward_and_backward(k, d, h, w, n, crop):
    torch.manual_seed(0)
    x, wt = _case(k, d, h, w, n, crop)
    ref, got = _conv(x, wt, d), fft_depthwise(x, wt, d)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    _close(got, ref, 1e-5)
    g = torch.randn_like(ref)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, wt), g)
    gx, gw = torch.autograd.grad(got, (x, wt), g)
    _close(gx, gx_ref, 1e-5)
    _close(gw, gw_ref, 1e-5)


@pytest.mark.parametrize("k,d,h,w,n,crop", CASES[::2])
def test_fft_float64_is_exact_to_rounding(k, d, h, w, n, crop):
    torch.manual_seed(1)
    x, wt = _case(k, d, h, w, n, crop, torch.float64)
    ref, got = _conv(x, wt, d), fft_depthwise(x, wt, d)
    assert got.dtype == torch.float64
    _close(got, ref, 1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, (x, wt), g), torch.autograd.grad(ref, (x, wt), g)):
        _close(a, b, 1e-12)


def test_fast_len_is_the_smallest_7_smooth_length():
    def smooth(m):
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 300):
        m = fast_len(n)
        assert m >= n and smooth(m) and not any(smooth(j) for j in range(n, m))
        e = fast_len(n, even=True)
        assert e >= n and e % 2 == 0 and smooth(e) and not any(smooth(j) and j % 2 == 0 for j in range(n, e))
    # the grid leaves room for the kernel's reach: 23×31 taps at dilation 2 reach 22 rows, 30 columns
    assert fft_size(23, 31, 2, 24, 32) == (48, 64)


def test_fft_under_cpu_autocast_runs_in_float32_and_returns_the_autocast_dtype():
    torch.manual_seed(2)
    x, wt = _case(23, 2, 12, 16, 3, True)
    ref = _conv(x, wt, 2)
    g = torch.randn_like(ref)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, wt), g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fft_depthwise(x, wt, 2)
        conv_dtype = _conv(x, wt, 2).dtype
    assert got.dtype == conv_dtype == torch.bfloat16
    # the float32 result rounded once to bf16 (8 bits of mantissa): what a bf16 FFT could not give
    _close(got, ref.to(torch.bfloat16), 1e-2)
    gx, gw = torch.autograd.grad(got, (x, wt), g.to(torch.bfloat16))
    assert gx.dtype == gw.dtype == torch.float32
    _close(gx, gx_ref, 2e-2)
    _close(gw, gw_ref, 2e-2)
    # bf16 activations (what the previous layer hands on under autocast) go through float32 as well
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_b = fft_depthwise(xb, wt, 2)
    assert got_b.dtype == torch.bfloat16
    _close(got_b, _conv(xb.detach().float(), wt.detach(), 2).to(torch.bfloat16), 1e-2)
    assert torch.autograd.grad(got_b.sum(), xb)[0].dtype == torch.bfloat16
    # autocast leaves float64 alone, and so does the FFT form
    x64, w64 = x.detach().double(), wt.detach().double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fft_depthwise(x64, w64, 2).dtype == torch.float64


def test_every_implementation_gives_the_same_network():
    torch.manual_seed(0)
    arch = PRESETS["tiny"].sample(random.Random(2))
    m = MNet(arch).train()
    x = torch.randn(4, 3, 24, 32)
    results = {}
    for impl in IMPLS:
        set_depthwise_impls(m, [impl] * arch.num_layers)
        m.zero_grad()
        out = m(x)
        out.square().sum().backward()
        results[impl] = (out.detach(), [p.grad.clone() for p in m.parameters()])
    for impl in ("dense", "fft"):
        torch.testing.assert_close(results[impl][0], results["conv"][0], rtol=1e-4, atol=1e-4)
        for a, b in zip(results[impl][1], results["conv"][1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    use_conv(m)
    assert depthwise_impls(m) == ["conv"] * arch.num_layers
    with pytest.raises(ValueError, match="'fast'"):
        depthwise(x, m.cells[0].dw, "fast")


def test_select_takes_the_fastest_candidate_per_shape(monkeypatch):
    """With a fake clock: each shape gets the fastest offered form; shapes are timed once; the dense
    form is not offered past its memory cap."""
    monkeypatch.setattr(dw, "_CHOICE_CACHE", {})
    offered = []

    def fake_times(runs, reps=3):
        offered.append(tuple(runs))
        fastest = "fft" if len(offered) % 2 else "dense"
        return {name: 1.0 if name == fastest else 2.0 for name in runs}

    monkeypatch.setattr(dw, "_time_impls", fake_times)
    ops = torch.nn.ModuleList([SepConv(4, 15, 1, (12, 16)), SepConv(4, 5, 2, (6, 8)), SepConv(4, 15, 1, (12, 16))])
    timings = {}
    counts = select_depthwise(ops, batch=2, timings=timings)
    assert len(offered) == 2  # the third op has the first one's shape
    assert depthwise_impls(ops) == ["fft", "dense", "fft"] and counts == {"conv": 0, "dense": 1, "fft": 2}
    assert set(timings) == {(4, (15, 15), 1, 12, 16), (4, (5, 5), 2, 6, 8)}
    # under autocast the forms are timed again (another dtype); past the cap dense is not a candidate
    monkeypatch.setattr(dw, "MAX_DENSE_ELEMENTS", 4 * 48 ** 2)  # a 6×8 map fits, 12×16 does not
    select_depthwise(ops, batch=2, amp=True)
    assert offered[2:] == [("conv", "fft"), IMPLS]


def test_select_with_the_real_clock_sets_a_known_form_everywhere():
    torch.manual_seed(0)
    arch = PRESETS["tiny"].sample(random.Random(3))
    m = MNet(arch)
    counts = select_depthwise(m, batch=4)
    assert sum(counts.values()) == arch.num_layers and set(depthwise_impls(m)) <= set(IMPLS)
    assert all(p.grad is None for p in m.parameters())  # timing ran on copies of the weights
    # timed under CPU autocast (bf16), as `--amp` trains; whatever was chosen trains under it
    select_depthwise(m, batch=4, amp=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(4, 3, 24, 32))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


def test_restore_reads_names_and_the_older_bool_lists():
    torch.manual_seed(0)
    arch = PRESETS["tiny"].sample(random.Random(4))
    m = MNet(arch)
    names = ["fft", "dense", "conv", "fft"]
    restore_depthwise(m, {"depthwise": names})
    assert depthwise_impls(m) == names
    # supernet checkpoints before the FFT form: one bool per SepConv
    restore_depthwise(m, {"dense": [True, False, False, True]})
    assert depthwise_impls(m) == ["dense", "conv", "conv", "dense"]
    # training checkpoints before the FFT form: one bool per module of model.modules()
    flags = [isinstance(x, SepConv) and i % 2 == 0 for i, x in enumerate(m.modules())]
    restore_depthwise(m, {"dense": flags})
    expect = [("dense" if f else "conv") for x, f in zip(m.modules(), flags) if isinstance(x, SepConv)]
    assert depthwise_impls(m) == expect and "dense" in expect and "conv" in expect
    assert [c.impl for c in m.cells] == expect
    with pytest.raises(CheckpointError, match="winograd"):
        restore_depthwise(m, {"depthwise": ["conv", "winograd", "conv", "conv"]})
    with pytest.raises(CheckpointError, match="3 saved depthwise choices for 4"):
        set_depthwise_impls(m, ["conv"] * 3)


def _fixed_choice(impls):
    def choose(model, batch=128, **_):
        """Stands in for the timing: deterministic and mixed, so a resume must restore it."""
        set_depthwise_impls(model, impls)
        return {}

    return choose


def _never(*_, **__):
    raise AssertionError("a resumed run must not time the depthwise forms again")


@pytest.mark.parametrize("legacy", [False, True])
def test_train_resume_with_saved_choices_is_bit_identical(colour_data, tiny_arch, tmp_path, monkeypatch, legacy):
    """`legacy`: the interrupted run's last.pt is rewritten in the pre-FFT form (bool per module)."""
    from mnet.search.checkpoint import load_checkpoint
    from mnet.search.train import TrainConfig, train

    impls = ["dense", "conv", "conv", "dense"] if legacy else ["fft", "dense", "conv", "fft"]
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=1)
    monkeypatch.setattr("mnet.search.train.select_depthwise", _fixed_choice(impls))
    train(colour_data, tiny_arch, tmp_path / "full", cfg)
    train_cut_after_first_epoch(colour_data, tiny_arch, tmp_path / "cut", cfg)
    last = tmp_path / "cut" / "last.pt"
    raw = torch.load(last, weights_only=True)
    assert raw["depthwise"] == impls
    if legacy:
        model = MNet(tiny_arch)
        set_depthwise_impls(model, impls)
        del raw["depthwise"]
        raw["dense"] = [isinstance(m, SepConv) and m.impl == "dense" for m in model.modules()]
        torch.save(raw, last)
    monkeypatch.setattr("mnet.search.train.select_depthwise", _never)
    train(colour_data, tiny_arch, tmp_path / "cut", cfg, resume=True)
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert b.raw["depthwise"] == impls
    for k in a.state_dict:
        torch.testing.assert_close(a.state_dict[k], b.state_dict[k], rtol=0, atol=0, msg=k)
