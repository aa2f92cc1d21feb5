"""Derivation re-scores the minibatch's best on the whole reward split (issue 13 item 2)."""

import random

import torch

from mnet.arch import PRESETS
from mnet.search.derive import Candidate, derive
from mnet.search.supernet import Score

TINY = PRESETS["tiny"]


class _Scores:
    """A stand-in evaluator: a minibatch score and a whole-split score per architecture, unrelated."""

    batch_size = 4

    def __init__(self):
        self.val_data = self
        self.rng = random.Random(0)
        self.batch_acc, self.split_acc, self.split_calls = {}, {}, 0

    def sample_batch(self, n, generator):
        return torch.zeros(n, 3, 24, 32), torch.zeros(n, dtype=torch.long)

    def __call__(self, arch, batch):
        acc = self.batch_acc.setdefault(arch, self.rng.random())
        return Score(acc, acc, {})

    def split_score(self, arch):
        self.split_calls += 1
        acc = self.split_acc.setdefault(arch, self.rng.random())
        return Score(acc, acc, {})


def test_the_pick_is_the_best_of_the_top_k_on_the_whole_split():
    ev = _Scores()
    cands = derive(TINY, ev, None, samples=40, seed=0, rescore_top=5)
    by_batch = sorted(ev.batch_acc, key=lambda a: -ev.batch_acc[a])[:5]
    assert ev.split_calls == 5 and {c.arch for c in cands[:5]} == set(by_batch)
    assert cands[0].arch == max(by_batch, key=lambda a: ev.split_acc[a])
    assert [c.accuracy for c in cands[:5]] == sorted((ev.split_acc[a] for a in by_batch), reverse=True)
    row = cands[0].to_json()
    assert row["scored_on"] == "reward split" and row["batch_accuracy"] == ev.batch_acc[cands[0].arch]
    assert cands[5].to_json()["scored_on"] == "minibatch"
    # rescore_top=0 keeps the minibatch's ranking (the paper's rule)
    plain = derive(TINY, _Scores(), None, samples=40, seed=0)
    assert isinstance(plain[0], Candidate) and plain[0].batch_accuracy is None
