import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnet.arch import PRESETS, Arch, Layer
from mnet.preprocess import Preprocess
from mnet.search.batches import DeviceData
from mnet.search.model import MNet
from mnet.search.ops import SepConv


@pytest.mark.parametrize("kernel,dilation,hw", [(39, 1, (6, 8)), (39, 2, (6, 8)), (23, 2, (12, 16)), (7, 1, (3, 5)),
                                                (11, 1, (24, 32))])
def test_crop_is_exact(kernel, dilation, hw):
    torch.manual_seed(0)
    op = SepConv(4, kernel, dilation, hw)
    kh, kw = op.dw.kernel_size
    full = torch.randn(4, 1, kernel, kernel)
    # the cropped kernel is the centre of the full one
    c = kernel // 2
    full_center = full[:, :, c - kh // 2:c + kh // 2 + 1, c - kw // 2:c + kw // 2 + 1]
    x = torch.randn(2, 4, *hw)
    ref = F.conv2d(x, full, padding=dilation * c, dilation=dilation, groups=4)
    got = F.conv2d(x, full_center, padding=op.dw.padding, dilation=dilation, groups=4)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "mnet-24-32"])
def test_param_count_matches_arch(preset):
    space = PRESETS[preset]
    if preset != "tiny":
        space = space.__class__(space.name, space.num_layers, 8, space.input_hw, space.stem_stride)
    for seed in range(3):
        a = space.sample(random.Random(seed))
        m = MNet(a)
        assert sum(p.numel() for p in m.parameters()) == a.num_params()


def test_skips_and_reductions_shapes():
    a = Arch((24, 32), 8, 1, (1, 2), 3, (Layer(3, 1), Layer(7, 2, 0), Layer(11, 1, 1), Layer(3, 1, 0)))
    m = MNet(a).eval()
    assert m(torch.randn(2, 3, 24, 32)).shape == (2, 3)
    # skip from the stem into layer 4 (two reductions away) pools it twice
    assert m.features(torch.randn(1, 3, 24, 32)).shape == (1, 8)


def test_device_data_matches_preprocess(colour_data):
    from mnet.data import Dataset

    pre = Preprocess((24, 32))
    split = Dataset(colour_data).load("dev", pre)
    x, y = next(DeviceData(split, pre).batches(8))
    np.testing.assert_allclose(x.numpy(), pre.normalize(split.images[:8]), rtol=1e-5, atol=1e-5)
    assert y.tolist() == split.labels[:8].tolist()
