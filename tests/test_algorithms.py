"""The algorithm plug-ins against hand-computed steps: Ditto's personal update, FedAvg-FT's
fine-tuned copy; and the registry's promises (one shared slot at most, keys validated)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.algorithms import REGISTRY, get
from common.algorithms.base import Evaluation
from common.config import ConfigError, load_config
from common.training import Hyper, train_epochs

CPU = torch.device("cpu")
X = np.array([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 1.0, 1.0]], np.float32)
Y = np.array([0, 1, 1])


def _linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    m = nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(weight))
        m.bias.copy_(torch.from_numpy(bias))
    return m


def _ce_grad(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d mean CE / d (W, b) of a linear layer on (X, Y), by hand: (softmax - onehot)/n."""
    logits = X @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - np.eye(2)[Y]) / len(Y)
    return g.T @ X, g.sum(0)


W_LOCAL, B_LOCAL = np.array([[0.2, -0.1, 0.3], [0.0, 0.4, -0.2]], np.float32), \
    np.array([0.1, -0.1], np.float32)
W_GLOBAL, B_GLOBAL = np.array([[-0.3, 0.2, 0.1], [0.5, 0.0, 0.2]], np.float32), \
    np.array([0.0, 0.2], np.float32)


def test_ditto_steps_the_personal_model_on_ce_plus_its_pull_to_the_received_global():
    lam, lr = 0.5, 0.1
    personal, meme = _linear(W_LOCAL, B_LOCAL), _linear(W_GLOBAL, B_GLOBAL)
    opts = {k: torch.optim.SGD(m.parameters(), lr=lr) for k, m in
            (("local", personal), ("meme", meme))}
    stats = train_epochs({"local": personal, "meme": meme}, opts, get("ditto"),
                         torch.from_numpy(X), torch.from_numpy(Y),
                         Hyper(proximal_mu=lam, batch_size=3), torch.Generator().manual_seed(0),
                         CPU)
    gw, gb = _ce_grad(W_LOCAL, B_LOCAL)  # v - lr·(∇CE(v) + λ·(v - w_global))
    np.testing.assert_allclose(personal.weight.detach().numpy(),
                               W_LOCAL - lr * (gw + lam * (W_LOCAL - W_GLOBAL)), rtol=1e-5)
    np.testing.assert_allclose(personal.bias.detach().numpy(),
                               B_LOCAL - lr * (gb + lam * (B_LOCAL - B_GLOBAL)), rtol=1e-5)
    gw, gb = _ce_grad(W_GLOBAL, B_GLOBAL)  # the global model: plain CE (FedAvg)
    np.testing.assert_allclose(meme.weight.detach().numpy(), W_GLOBAL - lr * gw, rtol=1e-5)
    np.testing.assert_allclose(meme.bias.detach().numpy(), B_GLOBAL - lr * gb, rtol=1e-5)
    assert set(stats.losses) == {"local", "meme"}


def test_ditto_personal_model_starts_as_the_global_one():
    personal, meme = _linear(W_LOCAL, B_LOCAL), _linear(W_GLOBAL, B_GLOBAL)
    get("ditto").warm_start(load_config({"algorithm": "ditto"}), {"local": personal},
                            {"meme": meme})
    assert torch.equal(personal.weight, meme.weight) and personal.weight is not meme.weight


def test_fml_private_init_meme_copies_the_meme_into_the_first_private_model_only():
    cfg = load_config({"algorithm": "fml", "private-peers": 2, "private-init": "meme"})
    first, peer, meme = (_linear(W_LOCAL, B_LOCAL), _linear(W_LOCAL, B_LOCAL),
                         _linear(W_GLOBAL, B_GLOBAL))
    get("fml").warm_start(cfg, {"local": first, "peer-2": peer}, {"meme": meme})
    np.testing.assert_array_equal(first.weight.detach().numpy(), W_GLOBAL)
    np.testing.assert_array_equal(first.bias.detach().numpy(), B_GLOBAL)
    with torch.no_grad():
        meme.weight.add_(1.0)  # a copy, not the meme's own tensors
    np.testing.assert_array_equal(first.weight.detach().numpy(), W_GLOBAL)
    np.testing.assert_array_equal(peer.weight.detach().numpy(), W_LOCAL)  # its own start
    untouched = _linear(W_LOCAL, B_LOCAL)  # private-init random: no copy
    get("fml").warm_start(load_config({"algorithm": "fml"}), {"local": untouched},
                          {"meme": meme})
    np.testing.assert_array_equal(untouched.weight.detach().numpy(), W_LOCAL)
    wider = nn.Linear(3, 4)  # another architecture: left as it was
    before = wider.weight.detach().clone()
    get("fml").warm_start(cfg, {"local": wider}, {"meme": meme})
    assert torch.equal(wider.weight, before)


def test_fedavg_ft_scores_a_fine_tuned_copy_and_leaves_the_global_model():
    cfg = load_config({"algorithm": "fedavg-ft", "lr": 0.2, "momentum": 0.0, "batch-size": 3,
                       "finetune-epochs": 2})
    meme = _linear(W_GLOBAL, B_GLOBAL)
    scored = get("fedavg-ft").evaluated(
        {"meme": meme}, Evaluation(cfg, torch.from_numpy(X), torch.from_numpy(Y), CPU, 5))
    w, b = W_GLOBAL.copy(), B_GLOBAL.copy()
    for _ in range(2):  # two full-batch SGD epochs by hand
        gw, gb = _ce_grad(w, b)
        w, b = w - 0.2 * gw, b - 0.2 * gb
    np.testing.assert_allclose(scored["local"].weight.detach().numpy(), w, rtol=1e-5)
    np.testing.assert_allclose(scored["local"].bias.detach().numpy(), b, rtol=1e-5)
    assert scored["meme"] is meme
    np.testing.assert_array_equal(meme.weight.detach().numpy(), W_GLOBAL)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_algorithm_declares_its_slots(name):
    algo = get(name)
    assert algo.name == name and algo.summary and algo.slots
    assert sum(s.shared for s in algo.slots) <= 1
    assert all(s.arch in ("local", "meme") for s in algo.slots)
    assert load_config({"algorithm": name}).algorithm.spec is algo


@pytest.mark.parametrize(("key", "value"), [("finetune-epochs", 0), ("ditto-lambda", -1.0),
                                            ("ditto-lambda", float("inf"))])
def test_the_plug_ins_keys_are_checked(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config({key: value})
