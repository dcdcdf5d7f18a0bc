"""The FML loss and training step: hand-computed values, gradient isolation, CE limit."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.mutual import Hyper, distillation_kl, evaluate, mutual_losses, train_epochs


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_kl_matches_hand_computation():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]])
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        ps, pt = _softmax(s_row), _softmax(t_row)
        expected += sum(t * math.log(t / s) for s, t in zip(ps, pt, strict=True))
    expected /= 2  # batchmean
    assert distillation_kl(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_temperature_scales_by_t_squared():
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0]])
    t = 3.0
    ps, pt = _softmax([v / t for v in student[0].tolist()]), _softmax(
        [v / t for v in teacher[0].tolist()])
    kl = sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
    assert distillation_kl(student, teacher, t).item() == pytest.approx(t * t * kl, rel=1e-6)


def test_mutual_losses_hand_computed():
    local = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    meme = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1])
    alpha, beta = 0.3, 0.8

    def ce(logits):
        return sum(-math.log(_softmax(r)[c]) for r, c in zip(logits.tolist(), y.tolist(),
                                                              strict=True)) / 2

    def kl(student, teacher):  # KL(p_teacher || p_student), batch mean
        total = 0.0
        for s, t in zip(student.tolist(), teacher.tolist(), strict=True):
            ps, pt = _softmax(s), _softmax(t)
            total += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
        return total / 2

    ll, lm = mutual_losses(local, meme, y, alpha, beta)
    assert ll.item() == pytest.approx(alpha * ce(local) + (1 - alpha) * kl(local, meme), rel=1e-6)
    assert lm.item() == pytest.approx(beta * ce(meme) + (1 - beta) * kl(meme, local), rel=1e-6)


def test_gradients_do_not_cross():
    torch.manual_seed(0)
    local, meme = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ll, lm = mutual_losses(local(x), meme(x), y, 0.5, 0.5, 2.0)
    ll.backward()
    assert all(p.grad is None for p in meme.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in local.parameters())
    local.zero_grad(set_to_none=True)
    lm.backward()
    assert all(p.grad is None for p in local.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in meme.parameters())


def test_alpha_beta_one_is_plain_cross_entropy():
    torch.manual_seed(1)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.randint(0, 4, (5,))
    ll, lm = mutual_losses(a, b, y, 1.0, 1.0, 4.0)
    assert torch.equal(ll, F.cross_entropy(a, y))
    assert torch.equal(lm, F.cross_entropy(b, y))


def test_alpha_one_training_equals_independent_ce_training():
    """With α=β=1 a mutual epoch updates each model exactly as CE training alone does."""
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))

    def fresh(seed):
        torch.manual_seed(seed)
        m = nn.Linear(6, 3)
        return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    hp = Hyper(alpha=1.0, beta=1.0, batch_size=8, epochs=2)
    local, ol = fresh(1)
    meme, om = fresh(2)
    train_epochs(local, meme, ol, om, x, y, hp, torch.Generator().manual_seed(7),
                 torch.device("cpu"))
    alone, oa = fresh(1)
    train_epochs(alone, None, oa, None, x, y, hp, torch.Generator().manual_seed(7),
                 torch.device("cpu"))
    for p, q in zip(local.parameters(), alone.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_mutual_training_learns_and_reports_both():
    torch.manual_seed(0)
    protos = torch.randn(3, 10) * 3
    y = torch.randint(0, 3, (300,))
    x = protos[y] + torch.randn(300, 10)
    local, meme = nn.Linear(10, 3), nn.Linear(10, 3)
    before = evaluate(meme, x, y, torch.device("cpu"))[1]
    stats = train_epochs(local, meme, torch.optim.SGD(local.parameters(), lr=0.1),
                         torch.optim.SGD(meme.parameters(), lr=0.1), x, y,
                         Hyper(batch_size=16, epochs=3), torch.Generator().manual_seed(0),
                         torch.device("cpu"))
    assert stats.num_examples == 300
    assert stats.loss_local is not None and stats.loss_meme is not None
    assert evaluate(meme, x, y, torch.device("cpu"))[1] > max(before, 0.9)
    assert evaluate(local, x, y, torch.device("cpu"))[1] > 0.9


def test_a_diverged_meme_never_teaches_the_private_model():
    """A meme with non-finite weights (a DP-noised meme that blew up) gives NaN logits: the
    private model must learn from the labels alone, exactly as with α = 1, and stay finite;
    the meme's NaN steps are skipped and counted."""
    torch.manual_seed(0)
    protos = torch.randn(3, 10) * 3
    y = torch.randint(0, 3, (120,))
    x = protos[y] + torch.randn(120, 10)

    def fresh():
        torch.manual_seed(1)
        m = nn.Linear(10, 3)
        return m, torch.optim.SGD(m.parameters(), lr=0.1)

    local, ol = fresh()
    meme = nn.Linear(10, 3)
    with torch.no_grad():
        meme.weight[0, 0] = float("inf")
    stats = train_epochs(local, meme, ol, torch.optim.SGD(meme.parameters(), lr=0.1), x, y,
                         Hyper(alpha=0.5, beta=0.5, batch_size=16, epochs=2),
                         torch.Generator().manual_seed(3), torch.device("cpu"))
    alone, oa = fresh()
    train_epochs(alone, None, oa, None, x, y, Hyper(batch_size=16, epochs=2),
                 torch.Generator().manual_seed(3), torch.device("cpu"))
    assert all(torch.isfinite(p).all() for p in local.parameters())
    for p, q in zip(local.parameters(), alone.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)  # = CE alone (α = 0.5 ignored for NaN)
    assert stats.skipped_steps == 2 * math.ceil(120 / 16)  # every meme step
    assert math.isnan(stats.loss_meme) and math.isfinite(stats.loss_local)


def test_proximal_term_pulls_towards_anchor():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 2, (64,))

    def drift(mu):
        torch.manual_seed(3)
        m = nn.Linear(5, 2)
        start = [p.detach().clone() for p in m.parameters()]
        train_epochs(None, m, None, torch.optim.SGD(m.parameters(), lr=0.5), x, y,
                     Hyper(proximal_mu=mu, batch_size=8, epochs=3),
                     torch.Generator().manual_seed(0), torch.device("cpu"))
        return sum((p - s).pow(2).sum().item() for p, s in zip(m.parameters(), start,
                                                               strict=True))

    assert drift(1.0) < drift(0.0)
