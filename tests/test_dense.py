import random

import pytest
import torch
import torch.nn.functional as F

from mnet.arch import PRESETS, cropped_kernel
from mnet.search.dense import dense_depthwise
from mnet.search.depthwise import select_depthwise, use_conv
from mnet.search.model import MNet


@pytest.mark.parametrize("k,d,h,w", [(39, 1, 6, 8), (39, 2, 6, 8), (23, 2, 12, 16), (7, 1, 5, 7), (3, 1, 4, 4),
                                     (11, 2, 3, 9)])
def test_dense_equals_conv2d_forward_and_backward(k, d, h, w):
    torch.manual_seed(0)
    kh, kw = cropped_kernel(k, d, h, w)
    x = torch.randn(3, 5, h, w, requires_grad=True)
    wt = torch.randn(5, 1, kh, kw, requires_grad=True)
    ref = F.conv2d(x, wt, None, 1, (d * (kh // 2), d * (kw // 2)), d, 5)
    got = dense_depthwise(x, wt, d)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, wt), g)
    gx, gw = torch.autograd.grad(got, (x, wt), g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-4)


def test_select_switches_layers_and_model_output_unchanged():
    torch.manual_seed(0)
    arch = PRESETS["tiny"].sample(random.Random(2))
    m = MNet(arch).eval()
    x = torch.randn(4, 3, 24, 32)
    ref = m(x)
    counts = select_depthwise(m, batch=4)
    assert sum(counts.values()) == arch.num_layers
    for layer in m.cells:
        layer.impl = "dense"
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
    use_conv(m)
    assert [c.impl for c in m.cells] == ["conv"] * arch.num_layers

