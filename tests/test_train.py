import json

import pytest
import torch
from conftest import train_cut_after_first_epoch

from mnet.errors import CheckpointError, ConfigError
from mnet.search.checkpoint import build_model, load_checkpoint
from mnet.search.train import TrainConfig, train

CFG = TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=1, lr_schedule="cosine")


def test_loss_decreases_and_checkpoints(colour_data, tiny_arch, tmp_path):
    r = train(colour_data, tiny_arch, tmp_path, TrainConfig(epochs=4, batch_size=32, lr=0.05))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 4]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt.arch == tiny_arch and ckpt.classes == ("A", "B", "C") and ckpt.epoch == r.best_epoch
    # weights_only loading is what load_checkpoint does; the payload must survive it
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "optimizer" in raw and raw["format"] == "mnet-checkpoint/1"
    model = build_model(ckpt)
    assert model(torch.zeros(1, 3, 24, 32)).shape == (1, 3)


def test_resume_equals_uninterrupted(colour_data, tiny_arch, tmp_path):
    train(colour_data, tiny_arch, tmp_path / "full", CFG)
    train_cut_after_first_epoch(colour_data, tiny_arch, tmp_path / "cut", CFG)
    train(colour_data, tiny_arch, tmp_path / "cut", CFG, resume=True)
    a = load_checkpoint(tmp_path / "full" / "last.pt").state_dict
    b = load_checkpoint(tmp_path / "cut" / "last.pt").state_dict
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    full_lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    cut_lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(cut_lines) == 2
    assert [json.loads(x)["train_loss"] for x in full_lines] == [json.loads(x)["train_loss"] for x in cut_lines]


def test_resume_refuses_other_options_and_missing(colour_data, tiny_arch, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        train(colour_data, tiny_arch, tmp_path / "none", CFG, resume=True)
    train(colour_data, tiny_arch, tmp_path / "r", TrainConfig(epochs=1, batch_size=32, lr=0.05))
    with pytest.raises(CheckpointError, match="options differ"):
        train(colour_data, tiny_arch, tmp_path / "r", TrainConfig(epochs=2, batch_size=16, lr=0.05), resume=True)


def test_config_validation_and_class_mismatch(colour_data, tiny_arch, tmp_path):
    with pytest.raises(ConfigError, match="'lr'"):
        TrainConfig(lr=0)
    from mnet.arch import Arch

    # an arch is the body: its head is sized by the data's 3 classes
    four = Arch.from_json({**tiny_arch.to_json(), "num_classes": 4})
    train(colour_data, four, tmp_path, TrainConfig(epochs=1, batch_size=32, lr=0.05))
    assert json.loads((tmp_path / "train.json").read_text())["arch"] == tiny_arch.to_json()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(p)
    torch.save({"hello": 1}, p)
    with pytest.raises(CheckpointError, match="not an mnet checkpoint"):
        load_checkpoint(p)
