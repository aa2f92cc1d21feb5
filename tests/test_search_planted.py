"""The controller learns a planted optimum under a supernet's noises; the paper's setting does not
(issue 13). Settings and figures: bench/controller_planted.py."""

import statistics

import pytest
import torch

from mnet.arch import PRESETS
from mnet.search.controller import ControllerConfig, Reinforce
from mnet.search.enas import SearchConfig, train_controller
from mnet.search.planted import PlantedEvaluator

TINY = PRESETS["tiny"]
PLANTED = (3, 11, 7, 16)


def _learnt(cfg: ControllerConfig, batch: int, delta: float = 0.03) -> tuple[float, float]:
    """(mean g of 200 archs from the final policy, g of its argmax) after the paper's 5000 samples."""
    agent = Reinforce(TINY, cfg, seed=0)
    ev = PlantedEvaluator(TINY, PLANTED, delta=delta)
    train_controller(agent, ev, cfg.steps, batch=batch)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mean_g = statistics.mean(ev.g(agent.controller.sample(gen)[0]) for _ in range(200))
        return mean_g, ev.g(agent.controller.argmax()[0])


def test_default_settings_find_the_planted_ops():
    # uniform: 0.2 of 4 planted ops; measured 1.8-3.0 over 3 seeds (bench/results/controller_planted.json)
    mean_g, argmax_g = _learnt(ControllerConfig(steps=5000), SearchConfig().controller_batch)
    assert mean_g >= 1.5 and argmax_g >= 2


def test_paper_setting_does_not_learn_under_minibatch_noise():
    """One architecture per update on its own minibatch, moving-average baseline, lr 0.1: the test can
    fail, and does for a setting that cannot learn (measured mean g 0.11, below uniform)."""
    mean_g, _ = _learnt(ControllerConfig(steps=5000, lr=0.1, baseline="ema"), 1)
    assert mean_g < 0.5


def test_leave_one_out_cancels_what_the_batch_shares():
    agent = Reinforce(TINY, ControllerConfig(steps=10), seed=0)
    local = [(i, *agent.sample(i)[1:]) for i in range(3)]
    stats = agent.update_batch([0.5, 0.6, 0.7], local)
    shifted = Reinforce(TINY, ControllerConfig(steps=10), seed=0)
    local = [(i, *shifted.sample(i)[1:]) for i in range(3)]
    assert stats["advantages"] == pytest.approx([-0.15, 0.0, 0.15])
    assert shifted.update_batch([0.9, 1.0, 1.1], local)["advantages"] == pytest.approx(stats["advantages"])
