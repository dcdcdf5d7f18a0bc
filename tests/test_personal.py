"""FML's personalised prediction (``personal-model``) against hand-computed values: the
held-out slice, the tuned meme's step, the weight chosen on the slice, the mixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.algorithms import get
from common.algorithms.base import Evaluation
from common.config import ConfigError, load_config
from common.data import validation_split
from common.personal import Mixture, tune_meme, validation_weight
from tests.test_algorithms import CPU, X, Y, _linear  # the tiny linear problem

FML = get("fml")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_the_validation_slice_is_held_out_the_same_way_every_time():
    x, y = torch.arange(40.0).reshape(20, 2), torch.arange(20)
    xf, yf, xv, yv = validation_split(x, y, 0.25, seed=3)
    assert len(yv) == 5 and len(yf) == 15
    assert sorted(yf.tolist() + yv.tolist()) == list(range(20))  # disjoint, complete
    assert torch.equal(xv[:, 0], 2.0 * yv)  # rows stay with their labels
    again = validation_split(x, y, 0.25, seed=3)
    assert torch.equal(again[3], yv)
    assert not torch.equal(validation_split(x, y, 0.25, seed=4)[3], yv)
    assert len(validation_split(x, y, 0.0, seed=3)[3]) == 0
    assert len(validation_split(x, y, 0.01, seed=3)[3]) == 1  # at least one
    assert len(validation_split(x[:1], y[:1], 0.5, seed=3)[3]) == 0  # one left to fit


@pytest.mark.parametrize("weighting", ["fixed", "additive"])
def test_the_tuned_meme_takes_one_step_of_the_meme_loss_with_the_private_model_teaching(
        weighting):
    """One full batch, plain SGD: W' = W - lr·gᵀX with g = [c·(p - onehot) + (1-β)(p - q)]/n,
    p the meme's softmax, q the private model's, c = β (fixed) or 1 (additive)."""
    cfg = load_config({"lr": 0.1, "momentum": 0.0, "batch-size": 32, "beta": 0.3,
                       "distill-weighting": weighting, "finetune-epochs": 1})
    w_p, b_p = np.array([[0.2, -0.1, 0.3], [0.0, 0.4, -0.2]], np.float32), np.zeros(2, np.float32)
    w_m = np.array([[-0.3, 0.2, 0.1], [0.5, 0.0, 0.2]], np.float32)
    b_m = np.array([0.1, -0.1], np.float32)
    private, meme = _linear(w_p, b_p), _linear(w_m, b_m)
    ev = Evaluation(cfg, torch.from_numpy(X), torch.from_numpy(Y), CPU, seed=0)
    tuned = tune_meme(FML, private, meme, ev)
    p, q = _softmax(X @ w_m.T + b_m), _softmax(X @ w_p.T + b_p)
    c = 0.3 if weighting == "fixed" else 1.0
    g = (c * (p - np.eye(2)[Y]) + 0.7 * (p - q)) / 3
    np.testing.assert_allclose(tuned.weight.detach().numpy(), w_m - 0.1 * g.T @ X, atol=1e-6)
    np.testing.assert_allclose(tuned.bias.detach().numpy(), b_m - 0.1 * g.sum(0), atol=1e-6)
    # neither the private model nor the received meme moved
    np.testing.assert_array_equal(private.weight.detach().numpy(), w_p)
    np.testing.assert_array_equal(meme.weight.detach().numpy(), w_m)


class _Constant(nn.Module):
    """The same logits for every input."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.logits.expand(len(x), -1)


A, B = [2.0, 0.0, 0.0], [0.0, 0.0, 1.5]  # the private model says class 0, the tuned one 2


@pytest.mark.parametrize("labels", [[0, 0, 0, 2], [2, 2, 2, 0], [0, 2, 1, 0, 2]])
def test_the_weight_is_the_grid_point_of_lowest_validation_log_loss(labels):
    cfg = load_config({})
    y = torch.tensor(labels)
    ev = Evaluation(cfg, torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), CPU, 0,
                    torch.zeros(len(labels), 3), y)
    grid = [i / 10 for i in range(11)]
    pa, pb = _softmax(np.array([A])), _softmax(np.array([B]))
    hand = {w: -np.mean(np.log((w * pa + (1 - w) * pb)[0, labels])) for w in grid}
    best = min(grid, key=lambda w: (hand[w], -w))
    assert validation_weight(_Constant(A), _Constant(B), ev, grid) == best
    assert 0 < best < 1 or labels == [0, 0, 0, 2] or labels == [2, 2, 2, 0]


def test_without_a_slice_the_private_model_is_kept():
    ev = Evaluation(load_config({}), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), CPU, 0)
    assert validation_weight(_Constant(A), _Constant(B), ev, [0.0, 1.0]) == 1.0


def test_the_mixture_scores_as_its_mixed_probabilities():
    mix = Mixture(_Constant(A), _Constant(B), 0.3)
    out = mix(torch.zeros(2, 3))
    hand = 0.3 * _softmax(np.array([A])) + 0.7 * _softmax(np.array([B]))
    np.testing.assert_allclose(torch.softmax(out, 1).numpy()[0], hand[0], rtol=1e-6)
    np.testing.assert_allclose(out.exp().numpy()[1], hand[0], rtol=1e-6)


@pytest.mark.parametrize(("mode", "expected"), [("tuned", "tuned"), ("choice", "private"),
                                                ("mix", "private")])
def test_fml_scores_the_personal_model_beside_both(mode, expected):
    """The private model is right on the held-out slice and the tuned meme wrong: choice and
    mix keep the private model (w = 1); tuned scores the tuned meme."""
    cfg = load_config({"personal-model": mode, "lr": 1e-9})  # a tuned meme stays put
    private, meme = _Constant([3.0, 0.0, 0.0]), _linear(np.zeros((2, 3), np.float32),
                                                          np.zeros(2, np.float32))
    meme = nn.Sequential(meme, nn.Linear(2, 3))
    with torch.no_grad():
        meme[1].weight.zero_()
        meme[1].bias.copy_(torch.tensor([0.0, 0.0, 3.0]))
    ev = Evaluation(cfg, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), CPU, 0,
                    torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))
    got = FML.evaluated({"local": private, "meme": meme}, ev)
    assert set(got) == {"local", "meme", "private", "tuned"}
    assert got["meme"] is meme and got["private"] is private and got["tuned"] is not meme
    assert got["local"] is got[expected]


def test_personal_model_belongs_to_fml_alone():
    for bad in ({"algorithm": "fedavg", "personal-model": "mix"},
                {"personal-model": "tuned", "personal-mix": True},
                {"personal-model": "choice", "private-peers": 2}):
        with pytest.raises(ConfigError, match="'personal-model'"):
            load_config(bad)
    with pytest.raises(ConfigError, match="'validation-fraction'"):
        load_config({"personal-model": "mix", "validation-fraction": 0.9})
    assert FML.holdout(load_config({"personal-model": "choice"})) == 0.1
    assert FML.holdout(load_config({"personal-model": "tuned"})) == 0.0
