"""The FML loss and training step: hand-computed values, gradient isolation, CE limit."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.algorithms import get
from common.mutual import distillation_kl, mutual_losses
from common.training import Hyper, evaluate, train_epochs

FML, LOCAL_ONLY, FEDPROX = get("fml"), get("local"), get("fedprox")


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
    train_epochs({"local": local, "meme": meme}, {"local": ol, "meme": om}, FML, x, y, hp,
                 torch.Generator().manual_seed(7), torch.device("cpu"))
    alone, oa = fresh(1)
    train_epochs({"local": alone}, {"local": oa}, LOCAL_ONLY, x, y, hp,
                 torch.Generator().manual_seed(7), torch.device("cpu"))
    for p, q in zip(local.parameters(), alone.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_mutual_training_learns_and_reports_both():
    torch.manual_seed(0)
    protos = torch.randn(3, 10) * 3
    y = torch.randint(0, 3, (300,))
    x = protos[y] + torch.randn(300, 10)
    local, meme = nn.Linear(10, 3), nn.Linear(10, 3)
    before = evaluate(meme, x, y, torch.device("cpu"))[1]
    stats = train_epochs({"local": local, "meme": meme},
                         {"local": torch.optim.SGD(local.parameters(), lr=0.1),
                          "meme": torch.optim.SGD(meme.parameters(), lr=0.1)}, FML, x, y,
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
    stats = train_epochs({"local": local, "meme": meme},
                         {"local": ol, "meme": torch.optim.SGD(meme.parameters(), lr=0.1)},
                         FML, x, y,
                         Hyper(alpha=0.5, beta=0.5, batch_size=16, epochs=2),
                         torch.Generator().manual_seed(3), torch.device("cpu"))
    alone, oa = fresh()
    train_epochs({"local": alone}, {"local": oa}, LOCAL_ONLY, x, y, Hyper(batch_size=16, epochs=2),
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
        train_epochs({"meme": m}, {"meme": torch.optim.SGD(m.parameters(), lr=0.5)}, FEDPROX,
                     x, y,
                     Hyper(proximal_mu=mu, batch_size=8, epochs=3),
                     torch.Generator().manual_seed(0), torch.device("cpu"))
        return sum((p - s).pow(2).sum().item() for p, s in zip(m.parameters(), start,
                                                               strict=True))

    assert drift(1.0) < drift(0.0)


# ---------------------------------------------------------------- variants (distill-*)
from common.mutual import label_log_prior  # noqa: E402
from common.options import Distill, DistillGate, DistillPrior, DistillWeighting  # noqa: E402

LOCAL = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [0.3, 0.2, 0.1]])
MEME = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, -2.0], [3.0, 0.0, 0.0]])
Y = torch.tensor([0, 1, 0])


def _ce(row, c):
    return -math.log(_softmax(row)[c])


def _kl(student_row, teacher_row):  # KL(p_teacher || p_student) of one sample
    ps, pt = _softmax(student_row), _softmax(teacher_row)
    return sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))


def _rows(t):
    return t.tolist()


def _batch_terms() -> tuple[float, float, float, float]:
    """By hand, batch means on LOCAL/MEME/Y: CE of each model, KL into each."""
    ce_l = sum(_ce(r, c) for r, c in zip(_rows(LOCAL), Y.tolist(), strict=True)) / 3
    ce_m = sum(_ce(r, c) for r, c in zip(_rows(MEME), Y.tolist(), strict=True)) / 3
    kl_l = sum(_kl(s, t) for s, t in zip(_rows(LOCAL), _rows(MEME), strict=True)) / 3
    kl_m = sum(_kl(s, t) for s, t in zip(_rows(MEME), _rows(LOCAL), strict=True)) / 3
    return ce_l, ce_m, kl_l, kl_m


def test_adaptive_weighting_divides_each_kl_by_the_batch_task_losses():
    alpha, beta = 0.4, 0.7
    ce_l, ce_m, kl_l, kl_m = _batch_terms()
    ll, lm = mutual_losses(LOCAL, MEME, Y, alpha, beta,
                           distill=Distill(weighting=DistillWeighting.ADAPTIVE))
    assert ll.item() == pytest.approx(alpha * ce_l + (1 - alpha) * kl_l / (ce_l + ce_m), rel=1e-6)
    assert lm.item() == pytest.approx(beta * ce_m + (1 - beta) * kl_m / (ce_l + ce_m), rel=1e-6)


def test_correct_gate_counts_only_samples_the_teacher_gets_right():
    # meme argmax: [1, 0 (tie 0/1 -> first), 0] vs y [0, 1, 0]: right only on sample 2
    # local argmax: [0, 1, 0]: right on all three
    alpha, beta = 0.5, 0.5
    ll, lm = mutual_losses(LOCAL, MEME, Y, alpha, beta, distill=Distill(gate=DistillGate.CORRECT))
    ce_l = sum(_ce(r, c) for r, c in zip(_rows(LOCAL), Y.tolist(), strict=True)) / 3
    ce_m = sum(_ce(r, c) for r, c in zip(_rows(MEME), Y.tolist(), strict=True)) / 3
    kl_into_local = _kl(_rows(LOCAL)[2], _rows(MEME)[2]) / 3  # sample 2 only, batch mean
    kl_into_meme = sum(_kl(s, t) for s, t in zip(_rows(MEME), _rows(LOCAL), strict=True)) / 3
    assert ll.item() == pytest.approx(alpha * ce_l + (1 - alpha) * kl_into_local, rel=1e-6)
    assert lm.item() == pytest.approx(beta * ce_m + (1 - beta) * kl_into_meme, rel=1e-6)


def test_confident_gate_uses_the_teachers_top_probability():
    # meme's top probabilities: 0.576, 0.475, 0.909; threshold 0.5 keeps samples 0 and 2
    tops = [max(_softmax(r)) for r in _rows(MEME)]
    assert tops[0] > 0.5 > tops[1] and tops[2] > 0.5
    ll, _ = mutual_losses(LOCAL, MEME, Y, 0.2, 1.0,
                          distill=Distill(gate=DistillGate.CONFIDENT, gate_threshold=0.5))
    ce_l = sum(_ce(r, c) for r, c in zip(_rows(LOCAL), Y.tolist(), strict=True)) / 3
    kl = (_kl(_rows(LOCAL)[0], _rows(MEME)[0]) + _kl(_rows(LOCAL)[2], _rows(MEME)[2])) / 3
    assert ll.item() == pytest.approx(0.2 * ce_l + 0.8 * kl, rel=1e-6)


def test_prior_correction_shifts_the_memes_teaching_by_the_client_label_prior():
    y_train = torch.tensor([0, 0, 0, 1])  # class 2 never seen: add-one prior (4, 2, 1) / 7
    log_prior = label_log_prior(y_train, 3)
    assert log_prior.tolist() == pytest.approx([math.log(4 / 7), math.log(2 / 7),
                                                math.log(1 / 7)], rel=1e-6)
    ll, lm = mutual_losses(LOCAL, MEME, Y, 0.5, 0.5, log_prior=log_prior)
    shifted = [[v + p for v, p in zip(r, log_prior.tolist(), strict=True)] for r in _rows(MEME)]
    ce_l = sum(_ce(r, c) for r, c in zip(_rows(LOCAL), Y.tolist(), strict=True)) / 3
    ce_m = sum(_ce(r, c) for r, c in zip(_rows(MEME), Y.tolist(), strict=True)) / 3
    kl_l = sum(_kl(s, t) for s, t in zip(_rows(LOCAL), shifted, strict=True)) / 3
    kl_m = sum(_kl(s, t) for s, t in zip(_rows(MEME), _rows(LOCAL), strict=True)) / 3
    assert ll.item() == pytest.approx(0.5 * ce_l + 0.5 * kl_l, rel=1e-6)
    assert lm.item() == pytest.approx(0.5 * ce_m + 0.5 * kl_m, rel=1e-6)  # meme's own loss
    assert Distill().prior is DistillPrior.NONE


def test_gated_and_adaptive_losses_keep_the_gradients_apart():
    torch.manual_seed(2)
    local, meme = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ll, lm = mutual_losses(local(x), meme(x), y, 0.5, 0.5, 2.0, Distill(
        DistillWeighting.ADAPTIVE, DistillGate.CONFIDENT, 0.2), label_log_prior(y, 3))
    ll.backward()
    assert all(p.grad is None for p in meme.parameters())
    lm.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in meme.parameters())


# ---------------------------------------------------------------- personal mixture (APFL)
def test_mixture_step_descends_the_mixtures_cross_entropy_by_hand():
    from common.mutual import mixture_step

    local = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    meme = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1])
    w, lr = 0.3, 0.1
    pl = [_softmax(r)[c] for r, c in zip(local.tolist(), y.tolist(), strict=True)]
    pm = [_softmax(r)[c] for r, c in zip(meme.tolist(), y.tolist(), strict=True)]
    grad = -sum((a - b) / (w * a + (1 - w) * b) for a, b in zip(pl, pm, strict=True)) / 2
    assert grad < 0  # the private model is the better one here: w grows
    assert mixture_step(local, meme, y, w, lr) == pytest.approx(w - lr * grad, rel=1e-6)
    assert mixture_step(local, meme, y, 0.99, 10.0) == 1.0  # clamped to [0, 1]
    assert mixture_step(meme, local, y, 0.01, 10.0) == 0.0


def test_evaluate_mixture_by_hand():
    from common.training import evaluate_mixture

    local, meme = nn.Linear(2, 3), nn.Linear(2, 3)
    with torch.no_grad():
        for m, b in ((local, [1.0, 0.0, 0.0]), (meme, [0.0, 0.0, 2.0])):
            m.weight.zero_()
            m.bias.copy_(torch.tensor(b))
    x, y = torch.zeros(4, 2), torch.tensor([0, 2, 2, 1])
    w = 0.6
    p = [w * a + (1 - w) * b for a, b in zip(_softmax([1, 0, 0]), _softmax([0, 0, 2]),
                                             strict=True)]
    loss, acc = evaluate_mixture(local, meme, w, x, y, torch.device("cpu"))
    assert p.index(max(p)) == 2 and acc == pytest.approx(0.5)  # class 2 wins: 2 of 4 right
    assert loss == pytest.approx(-sum(math.log(p[c]) for c in y.tolist()) / 4, rel=1e-6)


def test_additive_weighting_keeps_the_full_cross_entropy():
    alpha, beta = 0.4, 0.7
    ce_l, ce_m, kl_l, kl_m = _batch_terms()
    ll, lm = mutual_losses(LOCAL, MEME, Y, alpha, beta,
                           distill=Distill(weighting=DistillWeighting.ADDITIVE))
    assert ll.item() == pytest.approx(ce_l + (1 - alpha) * kl_l, rel=1e-6)
    assert lm.item() == pytest.approx(ce_m + (1 - beta) * kl_m, rel=1e-6)
    # alpha = 1 is still plain cross-entropy
    ll1, _ = mutual_losses(LOCAL, MEME, Y, 1.0, beta,
                           distill=Distill(weighting=DistillWeighting.ADDITIVE))
    assert ll1.item() == pytest.approx(ce_l, rel=1e-6)


def test_seen_mask_renormalises_the_teacher_over_the_clients_classes():
    from common.mutual import seen_log_mask

    mask = seen_log_mask(torch.tensor([0, 0, 2]), 3)  # class 1 never seen
    assert mask.tolist() == [0.0, -30.0, 0.0]
    ll, _ = mutual_losses(LOCAL, MEME, Y, 0.5, 1.0, log_prior=mask)
    ce_l = sum(_ce(r, c) for r, c in zip(_rows(LOCAL), Y.tolist(), strict=True)) / 3
    kl = 0.0
    for s_row, t_row in zip(_rows(LOCAL), _rows(MEME), strict=True):
        pt = _softmax(t_row)
        pt = [pt[0] / (pt[0] + pt[2]), 0.0, pt[2] / (pt[0] + pt[2])]  # over classes 0, 2
        ps = _softmax(s_row)
        kl += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True) if b > 0)
    assert ll.item() == pytest.approx(0.5 * ce_l + 0.5 * kl / 3, rel=1e-5)


PEER = torch.tensor([[0.5, 0.5, 0.0], [-1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])


def _peer_expected(student, others, coef):
    """CE + (1-coef)·mean over the other models of the batch-mean KL(p_t ‖ p_s), by hand."""
    n = len(Y)
    ce = sum(_ce(row, int(c)) for row, c in zip(_rows(student), Y, strict=True)) / n
    kls = [sum(_kl(s, t) for s, t in zip(_rows(student), _rows(o), strict=True)) / n
           for o in others]
    return ce + (1 - coef) * sum(kls) / len(kls)


def test_three_models_learn_ce_plus_the_mean_kl_toward_the_two_others():
    from common.mutual import peer_losses
    from common.options import DistillWeighting

    additive = Distill(weighting=DistillWeighting.ADDITIVE)
    got = peer_losses({"local": LOCAL, "peer-2": PEER, "meme": MEME}, Y, alpha=0.3, beta=0.6,
                      distill=additive)
    assert got["local"].item() == pytest.approx(_peer_expected(LOCAL, [PEER, MEME], 0.3))
    assert got["peer-2"].item() == pytest.approx(_peer_expected(PEER, [LOCAL, MEME], 0.3))
    assert got["meme"].item() == pytest.approx(_peer_expected(MEME, [LOCAL, PEER], 0.6))
    # a diverged peer teaches nobody: the others' mean runs over the finite teachers only
    broken = PEER.clone()
    broken[0, 0] = float("nan")
    got = peer_losses({"local": LOCAL, "peer-2": broken, "meme": MEME}, Y, alpha=0.3,
                      beta=0.6, distill=additive)
    assert got["local"].item() == pytest.approx(_peer_expected(LOCAL, [MEME], 0.3))


def test_one_peer_is_the_two_model_loss_bit_for_bit():
    from common.mutual import peer_losses

    local = LOCAL.clone().requires_grad_()
    got = peer_losses({"local": local, "meme": MEME}, Y, alpha=0.5, beta=0.5)
    want = mutual_losses(local, MEME, Y, 0.5, 0.5)
    assert torch.equal(got["local"], want[0]) and torch.equal(got["meme"], want[1])
