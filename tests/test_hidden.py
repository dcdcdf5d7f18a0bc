"""Feature-level distillation (``distill-hidden``, FedKD's hidden-state loss): the loss by
hand, the hooks that read the features, FML's losses with it, and its config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.algorithms import get
from common.config import ConfigError, load_config
from common.hidden import FeatureTap, check_widths, classifier, hidden_loss
from common.models import TaskSpec, build_model
from common.mutual import mutual_losses
from common.options import Distill, DistillWeighting
from common.training import Hyper, train_epochs


def test_hidden_loss_is_the_mse_over_both_ces_and_moves_only_the_student():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0], [0.0, 2.0]], requires_grad=True)
    loss = hidden_loss(student, teacher, torch.tensor(0.5), torch.tensor(1.0))
    # squared differences 1, 4, 0, 4: mean 2.25, over CE 0.5 + 1.0
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    # d/dh_s = 2·(h_s - h_t) / 4 / 1.5
    np.testing.assert_allclose(student.grad.numpy(), [[1 / 3, 2 / 3], [0.0, -2 / 3]],
                               rtol=1e-6)
    assert teacher.grad is None


def test_the_division_by_the_ces_only_attenuates_once_both_models_fit_the_batch():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    teacher = torch.zeros(2, 2)
    # both models fit the batch (CE 0.001 + 0.002) while their features still differ: the
    # pull is the plain MSE (1 + 4) / 4, not MSE / 0.003
    loss = hidden_loss(student, teacher, torch.tensor(0.001), torch.tensor(0.002))
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    np.testing.assert_allclose(student.grad.numpy(), [[0.5, 1.0], [0.0, 0.0]], rtol=1e-6)


def test_training_on_a_batch_both_models_fit_stays_bounded():
    """FedKD's unbounded division blew a meme up once both models fitted a client's few
    images (CE -> 0, features apart); bounded, the features converge instead."""
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    local, meme = _two_layer(1), _two_layer(2)
    models = {"local": local, "meme": meme}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.5) for k, m in models.items()}
    fit = Hyper(alpha=1.0, beta=1.0, epochs=1000, batch_size=32)  # labels alone, no pull
    train_epochs(models, opts, get("fml"), x, y, fit, torch.Generator().manual_seed(0),
                 torch.device("cpu"))
    (h_l, ce_l), (h_m, ce_m) = _by_hand(local, x, y), _by_hand(meme, x, y)
    gap = F.mse_loss(h_l, h_m).item()
    assert (ce_l + ce_m).item() < 0.01 and gap > 1.0  # both fit, features apart
    pull = Hyper(alpha=0.5, beta=0.5, epochs=30, batch_size=32,
                 distill=Distill(weighting=DistillWeighting.ADDITIVE, hidden=1.0))
    train_epochs(models, opts, get("fml"), x, y, pull, torch.Generator().manual_seed(0),
                 torch.device("cpu"))
    (h_l, _), (h_m, _) = _by_hand(local, x, y), _by_hand(meme, x, y)
    assert all(bool(p.isfinite().all()) for m in models.values() for p in m.parameters())
    # divided by the CE sum alone (~0.0025) the gap grew sixty-fold here; bounded, it closes
    assert F.mse_loss(h_l, h_m).item() < 0.1 * gap


@pytest.mark.parametrize("arch", ["lenet5", "cnn", "mlp", "cnn-bn"])
def test_the_tap_reads_what_the_classifier_reads_and_closes_cleanly(arch):
    torch.manual_seed(0)
    model = build_model(arch, TaskSpec(1, 28, 10))
    tap = FeatureTap({"local": model})
    x = torch.randn(5, 1, 28, 28)
    model.eval()
    logits = model(x)
    h = tap.features["local"]
    head = classifier(model)
    assert h.shape == (5, head.in_features)
    torch.testing.assert_close(head(h), logits)  # the classifier's input, whole
    tap.close()
    assert not head._forward_pre_hooks
    model(x)
    assert tap.features == {}  # closed: nothing is read any more


def test_models_of_two_feature_widths_are_refused_naming_the_key_and_widths():
    spec = TaskSpec(1, 28, 10)
    lenet, cnn = build_model("lenet5", spec), build_model("cnn", spec)
    w_lenet, w_cnn = classifier(lenet).in_features, classifier(cnn).in_features
    assert w_lenet != w_cnn
    with pytest.raises(ConfigError, match="distill-hidden") as err:
        FeatureTap({"local": lenet, "meme": cnn})
    assert f"local: {w_lenet}" in str(err.value) and f"meme: {w_cnn}" in str(err.value)
    assert not classifier(lenet)._forward_pre_hooks  # nothing left registered


def _two_layer(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _by_hand(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor):
    """Penultimate features and CE, computed from the weights directly."""
    w1, b1 = model[0].weight.detach(), model[0].bias.detach()
    h = (x @ w1.T + b1).clamp_min(0)
    logits = h @ model[2].weight.detach().T + model[2].bias.detach()
    ce = -(logits - logits.exp().sum(1, keepdim=True).log())[torch.arange(len(y)), y].mean()
    return h, ce


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_fml_adds_gamma_times_the_hidden_loss_to_each_model_that_distils(alpha):
    local, meme = _two_layer(1), _two_layer(2)
    x, y = torch.randn(6, 3, generator=torch.Generator().manual_seed(3)), \
        torch.tensor([0, 1, 1, 0, 1, 0])
    hp = Hyper(alpha=alpha, beta=0.5,
               distill=Distill(weighting=DistillWeighting.ADDITIVE, hidden=0.7))
    fml = get("fml")
    state = fml.begin({"local": local, "meme": meme}, y, hp)
    out = {"local": local(x), "meme": meme(x)}
    losses = fml.losses(out, y, hp, state)
    fml.end(state)
    base_l, base_m = mutual_losses(out["local"], out["meme"], y, alpha, 0.5,
                                   distill=Distill(weighting=DistillWeighting.ADDITIVE))
    (h_l, ce_l), (h_m, ce_m) = _by_hand(local, x, y), _by_hand(meme, x, y)
    term = 0.7 * ((h_l - h_m) ** 2).mean() / max(1.0, (ce_l + ce_m).item())
    assert term.item() > 1e-3  # the check below is not vacuous
    expected_local = base_l.item() + (term.item() if alpha < 1 else 0.0)
    assert losses["local"].item() == pytest.approx(expected_local, rel=1e-5)
    assert losses["meme"].item() == pytest.approx(base_m.item() + term.item(), rel=1e-5)
    losses["local"].backward()
    assert all(p.grad is None for p in meme.parameters())  # the teacher is detached
    assert not classifier(local)._forward_pre_hooks  # end() removed the hooks


def test_training_with_the_hidden_loss_draws_the_two_models_features_together():
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()

    def feature_gap(gamma: float) -> float:
        local, meme = _two_layer(1), _two_layer(2)
        models = {"local": local, "meme": meme}
        opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
        hp = Hyper(alpha=0.5, beta=0.5, epochs=20, batch_size=16,
                   distill=Distill(weighting=DistillWeighting.ADDITIVE, hidden=gamma))
        train_epochs(models, opts, get("fml"), x, y, hp, torch.Generator().manual_seed(0),
                     torch.device("cpu"))
        assert not classifier(local)._forward_pre_hooks
        return F.mse_loss(_by_hand(local, x, y)[0], _by_hand(meme, x, y)[0]).item()

    assert feature_gap(5.0) < 0.5 * feature_gap(0.0)


@pytest.mark.parametrize("extra, names", [
    ({"distill-hidden": -0.1}, "distill-hidden"),
    ({"distill-hidden": 1.0, "algorithm": "fedavg"}, "'fedavg'"),
    ({"distill-hidden": 1.0, "torch-compile": True}, "torch-compile = false"),
])
def test_distill_hidden_config_errors_name_the_key(extra, names):
    with pytest.raises(ConfigError, match="distill-hidden") as err:
        load_config(extra)
    assert names in str(err.value)


def test_distill_hidden_reaches_the_loss_through_the_config():
    cfg = load_config({"algorithm": "fml", "distill-hidden": 0.25})
    assert cfg.distill.hidden == 0.25


def test_a_frozen_teacher_lends_its_features_and_stays_as_it_was():
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()

    def run(gamma: float) -> tuple[float, bool]:
        private, meme = _two_layer(1), _two_layer(2)
        before = [p.detach().clone() for p in private.parameters()]
        hp = Hyper(alpha=0.5, beta=0.5, epochs=20, batch_size=16,
                   distill=Distill(weighting=DistillWeighting.ADDITIVE, hidden=gamma))
        train_epochs({"local": private, "meme": meme},
                     {"meme": torch.optim.SGD(meme.parameters(), lr=0.1)}, get("fml"), x, y,
                     hp, torch.Generator().manual_seed(0), torch.device("cpu"))
        unchanged = all(torch.equal(b, p) for b, p in zip(before, private.parameters(),
                                                           strict=True))
        assert not classifier(private)._forward_pre_hooks
        assert not classifier(meme)._forward_pre_hooks
        gap = F.mse_loss(_by_hand(meme, x, y)[0], _by_hand(private, x, y)[0]).item()
        return gap, unchanged

    (gap_on, frozen_on), (gap_off, frozen_off) = run(5.0), run(0.0)
    assert frozen_on and frozen_off
    assert gap_on < 0.5 * gap_off  # the meme moved toward the frozen private features


def test_the_hooks_come_off_when_a_step_raises():
    local, meme = _two_layer(1), _two_layer(2)
    x, y = torch.randn(8, 3), torch.full((8,), 5)  # label 5 of 2 classes: CE raises
    hp = Hyper(alpha=0.5, beta=0.5, distill=Distill(hidden=1.0))
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in
            {"local": local, "meme": meme}.items()}
    with pytest.raises((IndexError, RuntimeError)):
        train_epochs({"local": local, "meme": meme}, opts, get("fml"), x, y, hp,
                     torch.Generator().manual_seed(0), torch.device("cpu"))
    assert not classifier(local)._forward_pre_hooks
    assert not classifier(meme)._forward_pre_hooks


@pytest.mark.parametrize("archs", [("lenet5", "cnn"), ("cnn", "cnn-bn", "cnn"),
                                   ("mlp", "cnn")])
def test_the_server_refuses_architectures_of_two_feature_widths_before_any_round(archs):
    spec = TaskSpec(1, 28, 10)
    widths = {a: classifier(build_model(a, spec)).in_features for a in archs}
    if len(set(widths.values())) > 1:
        with pytest.raises(ConfigError, match="distill-hidden") as err:
            check_widths(archs, spec)
        assert all(f"{a}: {w}" in str(err.value) for a, w in widths.items())
    else:
        check_widths(archs, spec)  # one width: accepted
