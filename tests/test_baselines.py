import pytest
import torch

from mnet.errors import CheckpointError, ConfigError
from mnet.search.baselines import BASELINES, build_baseline, last_linear, pretrained_path, train_baseline
from mnet.search.checkpoint import build_model, load_checkpoint
from mnet.search.train import TrainConfig

from conftest import write_colour_dataset


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return write_colour_dataset(tmp_path_factory.mktemp("bl"), {"train": 6, "dev": 3, "test": 3})


def test_vgg16_one_step_and_export(tmp_path):
    # VGG16's 138 M parameters make `fit`'s two checkpoints (one with momentum) cost ~20 s here; the loop
    # is shared with the other baselines, so one SGD step and one checkpoint + export suffice
    from mnet.export.onnx import export_onnx
    from mnet.preprocess import Preprocess
    from mnet.search.checkpoint import save_checkpoint

    model = build_baseline("vgg16", 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.classifier[6].weight.detach().clone()
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2])).backward()
    opt.step()
    assert not torch.equal(before, model.classifier[6].weight)
    save_checkpoint(tmp_path / "best.pt", {"kind": "torchvision", "model_name": "vgg16", "classes": ["A", "B", "C"],
                                           "preprocess": Preprocess((32, 32)).to_json(), "config": {},
                                           "model": model.state_dict(), "epoch": 1})
    bundle = export_onnx(tmp_path / "best.pt", tmp_path / "bundle", parity_images=4)
    assert bundle.card.model_name == "vgg16" and bundle.card.metrics["parity"]["max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize("name", [b for b in BASELINES if b != "vgg16"])
def test_baseline_trains_one_step_and_reloads(name, small_data, tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=6, lr=0.01, fast_depthwise=False)
    before = {k: v.clone() for k, v in build_baseline(name, 3).state_dict().items()}
    torch.manual_seed(cfg.seed)
    r = train_baseline(small_data, name, tmp_path, cfg, input_size=64)
    assert r.epochs_run == 1
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt.kind == "torchvision" and ckpt.model_name == name and ckpt.preprocess.input_hw == (64, 64)
    model = build_model(ckpt)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    _, _, fc = last_linear(model)
    assert fc.out_features == 3
    # one SGD step changed the classifier
    changed = [k for k, v in ckpt.state_dict.items() if k in before and v.dtype.is_floating_point
               and not torch.equal(v, before[k])]
    assert changed
    # and the trained baseline exports to a verified ONNX bundle like an MNet
    from mnet.export.onnx import export_onnx

    bundle = export_onnx(tmp_path / "best.pt", tmp_path / "bundle", data_root=small_data, parity_images=6)
    assert bundle.card.model_name == name and bundle.onnx_path.is_file()


def test_unknown_model_and_missing_pretrained(small_data, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="choose one of"):
        build_baseline("resnet9000", 3)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    assert not pretrained_path("alexnet").exists()
    with pytest.raises(CheckpointError, match="not in the local torch cache"):
        train_baseline(small_data, "alexnet", tmp_path / "r", TrainConfig(epochs=1), input_size=32, pretrained=True)


def test_pretrained_from_local_cache(small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    path = pretrained_path("shufflenet_v2_x1_0")
    path.parent.mkdir(parents=True)
    imagenet = build_baseline("shufflenet_v2_x1_0", 1000)
    torch.save(imagenet.state_dict(), path)
    train_baseline(small_data, "shufflenet_v2_x1_0", tmp_path / "r", TrainConfig(epochs=1, lr=1e-9),
                   input_size=32, pretrained=True)
    ckpt = load_checkpoint(tmp_path / "r" / "last.pt")
    # backbone weights came from the cache (lr≈0 keeps them), the head was replaced
    w = "conv1.0.weight"
    torch.testing.assert_close(ckpt.state_dict[w], imagenet.state_dict()[w], rtol=1e-5, atol=1e-6)
    assert ckpt.state_dict["fc.weight"].shape == (3, 1024)
