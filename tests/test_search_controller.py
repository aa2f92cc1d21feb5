"""The ENAS controller: valid samples, exact log-probabilities, REINFORCE moves the policy."""

import io
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from mnet.arch import PRESETS, SearchSpace
from mnet.errors import ConfigError
from mnet.search.controller import Controller, ControllerConfig, Reinforce, stream

TINY = PRESETS["tiny"]
# 2 layers x 3 ops: 3^2 x 3! = 54 architectures, few enough to enumerate
SMALL = SearchSpace("small", num_layers=2, width=4, input_hw=(8, 8), stem_stride=1, ops=((3, 1), (7, 2), (11, 1)))


def _controller(space, seed=0, **cfg):
    torch.manual_seed(seed)
    c = Controller(space, ControllerConfig(**cfg))
    # spread the weights so the distributions are far from uniform and mistakes show
    with torch.no_grad():
        for p in c.parameters():
            p.normal_(0, 1.0)
    return c


def _independent_steps(c: Controller, arch) -> list[tuple[torch.Tensor, int]]:
    """Each decision's log-distribution and `arch`'s choice, recomputed here from the parameters."""
    cfg = c.cfg
    def squash(z):
        return cfg.tanh_constant * torch.tanh(z / cfg.temperature)
    h = torch.zeros(1, cfg.hidden)
    cell = torch.zeros(1, cfg.hidden)
    inp = c.g_emb
    anchors = [c.stem_anchor]
    steps = []
    with torch.no_grad():
        for layer in arch.layers:
            h, cell = c.lstm(inp, (h, cell))
            op = c.space.ops.index((layer.kernel, layer.dilation))
            steps.append((F.log_softmax(squash(c.op_soft(h)), -1)[0], op))
            h, cell = c.lstm(c.op_emb.weight[op:op + 1], (h, cell))
            keys = [c.none_key] + [c.w_attn_1(a) for a in anchors]
            scores = torch.stack([c.v_attn(torch.tanh(k + c.w_attn_2(h))).view(()) for k in keys])
            choice = 0 if layer.skip is None else layer.skip + 1
            steps.append((F.log_softmax(squash(scores), -1), choice))
            inp = c.none_emb if choice == 0 else anchors[choice - 1]
            anchors.append(h)
    return steps


def _independent_log_prob(c: Controller, arch) -> float:
    return sum(dist[choice].item() for dist, choice in _independent_steps(c, arch))


def test_samples_are_valid_and_log_probs_exact():
    c = _controller(TINY)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        arch, log_p, entropy = c.sample(gen)
        assert TINY.contains(arch)
        for i, layer in enumerate(arch.layers, start=1):
            assert layer.skip is None or 0 <= layer.skip < i
        forced, _ = c.log_prob(arch)
        assert log_p.item() == pytest.approx(forced.item(), abs=1e-5)
        assert log_p.item() == pytest.approx(_independent_log_prob(c, arch), abs=1e-4)
        assert entropy.item() > 0
        seen.add(arch)
    assert len(seen) > 30  # a spread-out policy rarely repeats


def test_probabilities_sum_to_one_and_match_sampling():
    c = _controller(SMALL, seed=1)
    archs = [SMALL.arch(ops, skips) for ops in itertools.product(range(3), repeat=2)
             for skips in itertools.product([None, 0], [None, 0, 1])]
    assert len(archs) == 54 == SMALL.size()
    with torch.no_grad():
        probs = {a: math.exp(c.log_prob(a)[0].item()) for a in archs}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    # the sampler draws from that same distribution: most probable arch's frequency
    gen = torch.Generator().manual_seed(0)
    n = 1500
    with torch.no_grad():
        counts = {}
        for _ in range(n):
            a = c.sample(gen)[0]
            counts[a] = counts.get(a, 0) + 1
    top = max(probs, key=probs.get)
    sd = math.sqrt(probs[top] * (1 - probs[top]) / n)
    assert abs(counts.get(top, 0) / n - probs[top]) < 5 * sd


def test_argmax_takes_the_most_probable_decision_each_step():
    c = _controller(TINY, seed=2)
    arch, log_p = c.argmax()
    steps = _independent_steps(c, arch)
    assert len(steps) == 2 * TINY.num_layers
    for dist, choice in steps:
        assert choice == int(dist.argmax())
    assert log_p.item() == pytest.approx(_independent_log_prob(c, arch), abs=1e-4)


def test_reinforce_raises_probability_of_rewarded_op():
    favoured = 5
    agent = Reinforce(TINY, ControllerConfig(lr=0.02), seed=0)

    def p_first_op():
        with torch.no_grad():
            h, _ = agent.controller.lstm(agent.controller.g_emb)
            logits = agent.controller._squash(agent.controller.op_soft(h))
            return F.softmax(logits, -1)[0, favoured].item()

    before = p_first_op()
    assert before == pytest.approx(1 / 20, abs=0.02)  # near-uniform start
    for _ in range(100):
        arch, log_p, entropy = agent.sample()
        agent.update(log_p, entropy, 1.0 if arch.layers[0].op_index == favoured else 0.0)
    after = p_first_op()
    assert after > 0.5, (before, after)  # measured: ~0.88 for seeds 0-4
    assert agent.step == 100


def test_baseline_is_a_moving_average_starting_at_first_reward():
    agent = Reinforce(TINY, ControllerConfig(baseline_decay=0.9), seed=0)
    _, lp, ent = agent.sample()
    s = agent.update(lp, ent, 0.5)
    assert s["advantage"] == 0.0 and s["baseline"] == pytest.approx(0.5)
    _, lp, ent = agent.sample()
    s = agent.update(lp, ent, 1.0)
    assert s["advantage"] == pytest.approx(0.5) and s["baseline"] == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)


def test_state_dict_round_trip_continues_identically():
    a = Reinforce(TINY, ControllerConfig(), seed=3)
    for r in (0.2, 0.6):
        _, lp, ent = a.sample()
        a.update(lp, ent, r)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as a checkpoint does: through bytes, loadable with weights_only
    buf.seek(0)
    b = Reinforce(TINY, ControllerConfig(), seed=99)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for agent in (a, b):
        _, lp, ent = agent.sample()
        agent.update(lp, ent, 0.9)
    assert a.sample()[0] == b.sample()[0]
    for k, v in a.controller.state_dict().items():
        assert torch.equal(v, b.controller.state_dict()[k]), k


def test_sample_k_depends_on_seed_and_k_only():
    """What lets N ranks draw their share of a batch and still sample what one process would."""
    a = Reinforce(TINY, ControllerConfig(), seed=3)
    with torch.no_grad():
        fifth = a.sample(5)[0]
        assert a.sample(5)[0] == fifth  # drawing does not advance anything
        assert [a.sample(k)[0] for k in range(8)][5] == fifth  # nor does what was drawn before
        assert a.sample()[0] == a.sample(0)[0]  # default: the next sample, index `step`
        assert len({a.sample(k)[0] for k in range(8)}) > 4  # different k, different draws
        b = Reinforce(TINY, ControllerConfig(), seed=4)
        b.controller.load_state_dict(a.controller.state_dict())
        assert [b.sample(k)[0] for k in range(8)] != [a.sample(k)[0] for k in range(8)]
    assert torch.equal(torch.rand(3, generator=stream(-1, "x", 0)), torch.rand(3, generator=stream(-1, "x", 0)))
    assert not torch.equal(torch.rand(3, generator=stream(0, "x", 0)), torch.rand(3, generator=stream(0, "y", 0)))


def test_batch_update_averages_over_the_batch_against_the_baseline_before_it():
    cfg = ControllerConfig(lr=0.05, baseline_decay=0.5, entropy_weight=0.01, baseline="ema")
    agent = Reinforce(TINY, cfg, seed=1)
    agent.baseline = 0.4
    ref = Reinforce(TINY, cfg, seed=1)
    rewards = [0.9, 0.1, 0.6]
    samples = [agent.sample(k) for k in range(3)]
    s = agent.update_batch(rewards, [(i, lp, ent) for i, (_, lp, ent) in enumerate(samples)])
    assert s["advantages"] == pytest.approx([0.5, -0.3, 0.2])  # all against b = 0.4
    assert s["baselines"] == pytest.approx([0.65, 0.375, 0.4875])  # then the rewards one by one, in order
    assert s["baseline"] == s["baselines"][-1] and agent.step == 3
    # the same step by hand: mean of the per-sample REINFORCE losses, one Adam step
    loss = 0
    for k, adv in enumerate(s["advantages"]):
        arch = samples[k][0]
        lp, ent = ref.controller.log_prob(arch)
        loss = loss + (-adv * lp - cfg.entropy_weight * ent) / 3
    ref.optimizer.zero_grad()
    loss.backward()
    ref.optimizer.step()
    for k, v in agent.controller.state_dict().items():
        assert torch.allclose(v, ref.controller.state_dict()[k], atol=1e-6), k
    # a batch of one is the paper's single-sample update
    one, single = Reinforce(TINY, cfg, seed=2), Reinforce(TINY, cfg, seed=2)
    _, lp, ent = one.sample()
    a = one.update_batch([0.7], [(0, lp, ent)])
    _, lp, ent = single.sample()
    b = single.update(lp, ent, 0.7)
    assert (a["advantages"][0], a["baseline"]) == (b["advantage"], b["baseline"])
    for k, v in one.controller.state_dict().items():
        assert torch.equal(v, single.controller.state_dict()[k]), k


def test_config_validation_names_the_option():
    with pytest.raises(ConfigError, match="'temperature'"):
        ControllerConfig(temperature=0)
    with pytest.raises(ConfigError, match="'optimizer'"):
        ControllerConfig(optimizer="sgd")
    assert ControllerConfig.paper().lr == 0.1 and ControllerConfig.paper().steps == 5000
    c = Controller(TINY)
    other = PRESETS["mnet-24-32"].sample(random.Random(0))
    with pytest.raises(ConfigError, match="search space"):
        c.log_prob(other)
