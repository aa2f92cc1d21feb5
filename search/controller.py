"""The ENAS controller (paper §3.1): an autoregressive LSTM policy over the MNet macro space.

Per layer i (1-based) two decisions, each one LSTMCell step:
  op    softmax over the |ops| (kernel, dilation) pairs, input = the previous decision's embedding;
  skip  attention of the current state over the earlier nodes plus a learned "none" key — i+1 choices
        (ENAS macro: score_j = v·tanh(W1 h_j + W2 h_i)); input = the chosen op's embedding.
The state after layer i's skip step is node i's anchor h_i; the stem (node 0) has a learned anchor.
The chosen node's anchor (or a learned "none" embedding) is the input of the next op step, and a
learned empty embedding starts the sequence. Logits pass through tanh_constant·tanh(logits/T).

`Reinforce` trains it: loss = -(R - b)·log p(arch) - entropy_weight·H, Adam, moving-average baseline
b ← decay·b + (1 - decay)·R. The baseline starts at the first reward rather than 0: with rewards in
[0, 1] a zero start makes the first ~100 advantages all positive, reinforcing whatever was sampled.
An update may average that loss over a batch of B sampled architectures (`update_batch`; B = 1 is the
paper). With ``baseline="loo"`` and B ≥ 2 (the default) each architecture's advantage is its reward
minus the mean of the other B − 1, all scored on one minibatch (search.enas.train_controller), so
the minibatch's difficulty cancels; with ``"ema"`` every advantage is taken against the moving
average before the update. Either way the B rewards then enter the moving average one by one in
sample order (it is logged), so B = 1 with "ema" is exactly the one-sample rule above.

Sample k of a run (k = 0, 1, … counts scored architectures) is drawn with its own generator, seeded
from (seed, k) (`stream`), not from one running generator: whichever process draws it, and whatever
it drew before, sample k is the same function of the policy. This is what lets N ranks each draw
their share of a batch (search.distributed) and still sample what one process would.

Settings are chosen with a planted reward (search/planted.py): a known optimum under a supernet's two
noises, scored by how much of the optimum the final policy has found after the paper's 5000 scored
architectures (bench/controller_planted.py → bench/results/controller_planted.json; 3 seeds each).
The paper's setting (one architecture per update, moving average, lr 0.1) stays at chance there; 5
architectures per update on one minibatch, each against the mean of the others (leave-one-out),
Adam lr 0.03, eps 1e-3 found most (ENAS's beta1 = 0 no better than 0.9). `ControllerConfig.paper()`
keeps Table 1's 0.1 for replication.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mnet.arch import Arch, SearchSpace
from mnet.errors import ConfigError

if TYPE_CHECKING:
    from mnet.search.distributed import Dist

__all__ = ["ControllerConfig", "Controller", "Reinforce", "stream"]

_Mode = Literal["sample", "argmax", "force"]


@dataclass(frozen=True)
class ControllerConfig:
    hidden: int = 100
    lr: float = 0.03  # measured with the planted reward; Table 1 says 0.1 (see module docstring)
    steps: int = 5000  # Table 1
    tanh_constant: float = 2.5
    temperature: float = 5.0
    entropy_weight: float = 1e-4
    baseline_decay: float = 0.99
    optimizer: str = "adam"
    # eps 1e-3 as ENAS (bounds the step of a rarely-seen decision); ENAS's beta1 = 0 measured no better
    # than torch's 0.9 on the planted reward (module docstring)
    adam_beta1: float = 0.9
    adam_eps: float = 1e-3
    # "loo": each architecture of an update against the mean of the others, all scored on the same
    # minibatch (the minibatch's difficulty cancels); "ema": the paper's moving average
    baseline: str = "loo"

    def __post_init__(self) -> None:
        checks = [
            ("hidden", self.hidden >= 1, "expected >= 1"),
            ("lr", self.lr > 0, "expected > 0"),
            ("steps", self.steps >= 0, "expected >= 0"),
            ("tanh_constant", self.tanh_constant > 0, "expected > 0"),
            ("temperature", self.temperature > 0, "expected > 0"),
            ("entropy_weight", self.entropy_weight >= 0, "expected >= 0"),
            ("baseline_decay", 0 <= self.baseline_decay < 1, "expected in [0, 1)"),
            ("optimizer", self.optimizer == "adam", "expected adam (paper, Table 1)"),
            ("adam_beta1", 0 <= self.adam_beta1 < 1, "expected in [0, 1)"),
            ("adam_eps", self.adam_eps > 0, "expected > 0"),
            ("baseline", self.baseline in ("loo", "ema"), "expected loo or ema"),
        ]
        for name, ok, fix in checks:
            if not ok:
                raise ConfigError(f"controller option '{name}' = {getattr(self, name)!r}: {fix}")

    @classmethod
    def paper(cls, **overrides: Any) -> ControllerConfig:
        """Table 1 as printed: Adam lr 0.1, 5000 steps."""
        return cls(**{"lr": 0.1, "steps": 5000, **overrides})

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ControllerConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Controller(nn.Module):
    """LSTM policy; `sample()`, `log_prob(arch)` and `argmax()` all walk the same `_decode`."""

    def __init__(self, space: SearchSpace, cfg: ControllerConfig = ControllerConfig()):
        super().__init__()
        self.space, self.cfg = space, cfg
        h = cfg.hidden
        self.lstm = nn.LSTMCell(h, h)
        self.g_emb = nn.Parameter(torch.empty(1, h))  # the empty embedding that starts the sequence
        self.op_emb = nn.Embedding(space.num_ops, h)
        self.op_soft = nn.Linear(h, space.num_ops)
        self.stem_anchor = nn.Parameter(torch.empty(1, h))  # node 0 has no decision of its own
        self.none_emb = nn.Parameter(torch.empty(1, h))  # next input after choosing "no skip"
        self.none_key = nn.Parameter(torch.empty(1, h))  # attention key of "no skip"
        self.w_attn_1 = nn.Linear(h, h, bias=False)  # keys from node anchors
        self.w_attn_2 = nn.Linear(h, h, bias=False)  # query from the current state
        self.v_attn = nn.Linear(h, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # ENAS initialises every controller weight uniformly in [-0.1, 0.1]: small logits, a near
        # uniform first policy.
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)

    def _squash(self, logits: torch.Tensor) -> torch.Tensor:
        return self.cfg.tanh_constant * torch.tanh(logits / self.cfg.temperature)

    def _decode(self, mode: _Mode, arch: Arch | None = None, generator: torch.Generator | None = None
                ) -> tuple[Arch, torch.Tensor, torch.Tensor]:
        """Walk the 2L decisions: choose (sample / argmax) or take `arch`'s (force).

        Returns the arch, the summed log-probability of its decisions and the summed entropy of the
        decision distributions along the way (both differentiable).
        """
        dev = self.g_emb.device
        h = torch.zeros(1, self.cfg.hidden, device=dev)
        c = torch.zeros_like(h)
        x = self.g_emb
        anchors, keys = [self.stem_anchor], [self.w_attn_1(self.stem_anchor)]
        log_p = torch.zeros((), device=dev)
        entropy = torch.zeros((), device=dev)
        ops: list[int] = []
        skips: list[int | None] = []

        def decide(logits: torch.Tensor, forced: int) -> int:
            nonlocal log_p, entropy
            logp_all = F.log_softmax(self._squash(logits), dim=-1).view(-1)
            if mode == "sample":
                choice = int(torch.multinomial(logp_all.detach().exp(), 1, generator=generator))
            elif mode == "argmax":
                choice = int(logp_all.argmax())
            else:
                choice = forced
            log_p = log_p + logp_all[choice]
            entropy = entropy - (logp_all.exp() * logp_all).sum()
            return choice

        for i in range(1, self.space.num_layers + 1):
            layer = arch.layers[i - 1] if arch is not None else None
            # op decision
            h, c = self.lstm(x, (h, c))
            op = decide(self.op_soft(h), self.space.ops.index((layer.kernel, layer.dilation)) if layer else -1)
            ops.append(op)
            # skip decision: choice 0 = none, choice j + 1 = node j
            h, c = self.lstm(self.op_emb.weight[op:op + 1], (h, c))
            query = self.w_attn_2(h)
            scores = self.v_attn(torch.tanh(torch.cat([self.none_key, *keys]) + query)).view(1, -1)
            choice = decide(scores, (0 if layer.skip is None else layer.skip + 1) if layer else -1)
            skips.append(None if choice == 0 else choice - 1)
            x = self.none_emb if choice == 0 else anchors[choice - 1]
            anchors.append(h)
            keys.append(self.w_attn_1(h))
        chosen = arch if mode == "force" else self.space.arch(ops, skips)
        return chosen, log_p, entropy

    def sample(self, generator: torch.Generator | None = None) -> tuple[Arch, torch.Tensor, torch.Tensor]:
        """One architecture from the policy: (arch, summed log-prob, summed entropy)."""
        return self._decode("sample", generator=generator)

    def log_prob(self, arch: Arch) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced (log p(arch), entropy along arch's decisions)."""
        if not self.space.contains(arch):
            raise ConfigError(f"arch is not in the controller's search space '{self.space.name}'")
        _, log_p, entropy = self._decode("force", arch=arch)
        return log_p, entropy

    def argmax(self) -> tuple[Arch, torch.Tensor]:
        """Greedy decoding: the most probable decision at each step, and its log-probability."""
        arch, log_p, _ = self._decode("argmax")
        return arch, log_p


def stream(seed: int, name: str, index: int) -> torch.Generator:
    """A generator for draw `index` of the random stream `name`: a function of (seed, name, index) alone.

    Hashing (rather than seed + index) keeps neighbouring seeds' streams unrelated, and any int works
    as a seed, negative ones included.
    """
    digest = hashlib.blake2b(f"{seed}:{name}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # manual_seed wants < 2**63


class Reinforce:
    """Controller + Adam + moving-average baseline; `state_dict` makes a search resumable.

    `step` counts the architectures scored so far (B per update); it is also the index of the next
    sample, so a checkpoint needs no generator state.
    """

    def __init__(self, space: SearchSpace, cfg: ControllerConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        # The controller lives on the CPU whatever trains the supernet: 2L sequential LSTMCell steps
        # of 100 units are launch-bound on a GPU, and CPU sampling is reproducible across machines.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # initial weights are part of the seeded run, global RNG untouched
            self.controller = Controller(space, cfg)
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, 0.999),
                                          eps=cfg.adam_eps)
        self.baseline: float | None = None
        self.step = 0

    def sample(self, index: int | None = None) -> tuple[Arch, torch.Tensor, torch.Tensor]:
        """Sample `index` of the run (default: the next one, `step`): (arch, log-prob, entropy)."""
        return self.controller.sample(stream(self.seed, "controller", self.step if index is None else index))

    def update(self, log_p: torch.Tensor, entropy: torch.Tensor, reward: float) -> dict[str, float]:
        """One REINFORCE step on one sampled arch (a batch of one); returns what to log."""
        stats = self.update_batch([float(reward)], [(0, log_p, entropy)])
        return {"advantage": stats["advantages"][0], "baseline": stats["baseline"], "loss": stats["loss"]}

    def update_batch(self, rewards: Sequence[float], local: Sequence[tuple[int, torch.Tensor, torch.Tensor]],
                     dist: Dist | None = None) -> dict[str, Any]:
        """One REINFORCE update averaged over a batch of B = len(rewards) sampled architectures.

        `rewards` are all B rewards in sample order; `local` holds (position in the batch, log_p,
        entropy) of the samples this process drew — all of them alone, its share under torchrun, where
        `dist` sums the gradients over ranks. Every rank then takes the same Adam step and updates the
        baseline from the same rewards in the same order, so the controllers stay identical.
        Returns per-sample advantages and baselines (after each reward entered the average), the final
        baseline and this process's share of the loss.
        """
        if self.baseline is None:
            self.baseline = float(rewards[0])
        before, n = self.baseline, len(rewards)
        if self.cfg.baseline == "loo" and n > 1:  # leave-one-out: the others of the same minibatch
            total = float(sum(rewards))
            advantages = [float(r) - (total - float(r)) / (n - 1) for r in rewards]
        else:
            advantages = [float(r) - before for r in rewards]
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        if local:  # a rank with no sample this update still joins the gradient sum (with zeros)
            # divided by the global B, so that summing the ranks' gradients gives the batch mean
            loss = sum(-advantages[i] * log_p - self.cfg.entropy_weight * entropy
                       for i, log_p, entropy in local) / len(rewards)
            loss.backward()
        if dist is not None:
            dist.all_reduce_gradients(self.controller.parameters(), keep_unused=True)
        self.optimizer.step()
        baselines = []
        for r in rewards:  # fixed (sample) order: the same float arithmetic on every rank
            self.baseline = self.cfg.baseline_decay * self.baseline + (1 - self.cfg.baseline_decay) * float(r)
            baselines.append(self.baseline)
        self.step += len(rewards)
        return {"advantages": advantages, "baselines": baselines, "baseline": self.baseline,
                "loss": float(loss.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.cfg),
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "seed": self.seed,
            "baseline": self.baseline,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        # checkpoints from before per-sample streams hold a "generator" and no seed: keep ours
        if "seed" not in state:
            logging.getLogger(__name__).warning(
                "controller checkpoint from an older mnet: the rest of the search draws its samples per "
                "(seed, step), so it will not match what that version would have drawn")
        self.seed = int(state.get("seed", self.seed))
        self.baseline = None if state["baseline"] is None else float(state["baseline"])
        self.step = int(state["step"])
