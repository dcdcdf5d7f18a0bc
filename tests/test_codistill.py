"""Co-distillation against hand-computed values: the exchange schedule, the loss toward
stale teachers' mean prediction, frozen teachers in the training loop, the server's
teacher bank (and its place in the checkpoint), and the keys it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.algorithms import get
from common.algorithms.base import Algorithm
from common.algorithms.codistill import exchanges
from common.config import ConfigError, load_config
from common.options import Distill, DistillWeighting
from common.training import Hyper, train_epochs
from server.checkpoint import load_checkpoint, save_checkpoint
from server.teachers import TeacherBank

CODISTILL = get("codistill")


@pytest.mark.parametrize(("burnin", "every", "rounds"), [
    (1, 2, [2, 4, 6, 8]),  # after one round on the labels, every other round
    (0, 1, [1, 2, 3, 4, 5, 6, 7, 8]),
    (2, 3, [3, 6]),
    (0, 5, [1, 6]),
])
def test_exchange_and_upload_rounds(burnin, every, rounds):
    cfg = load_config({"algorithm": "codistill", "codistill-burnin": burnin,
                       "codistill-every": every, "codistill-teachers": 2,
                       "num-server-rounds": 5})
    assert [r for r in range(1, 9) if exchanges(r, burnin, every)] == rounds
    assert [r for r in range(1, 9) if CODISTILL.teachers(cfg, r) == 2] == rounds
    # a client's model goes up in the round before each exchange, and only then; never
    # in the last round (num-server-rounds = 5 here): there is no exchange after it
    assert [r for r in range(1, 8) if CODISTILL.uploads(cfg, r) == "local"] == [
        r - 1 for r in rounds if 1 <= r - 1 < 5]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


OWN = np.array([[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]])
T1 = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
T2 = np.array([[3.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
Y = np.array([0, 2])


def _hand(weighting: str, alpha: float, teachers: list[np.ndarray]) -> float:
    """CE + (1-α)·KL(p̄ ‖ p) by numpy, p̄ the teachers' mean softmax."""
    p = _softmax(OWN)
    ce = -np.log(p[np.arange(2), Y]).mean()
    bar = np.mean([_softmax(t) for t in teachers], axis=0)
    kl = (bar * (np.log(bar) - np.log(p))).sum(1).mean()
    head = ce if weighting == "additive" else alpha * ce
    return head + (1 - alpha) * kl


@pytest.mark.parametrize("weighting", ["additive", "fixed"])
def test_the_loss_is_ce_plus_kl_toward_the_teachers_mean_prediction(weighting):
    hp = Hyper(alpha=0.3, distill=Distill(weighting=DistillWeighting(weighting)))
    out = {k: torch.tensor(v, dtype=torch.float64)
           for k, v in {"local": OWN, "teacher-1": T1, "teacher-2": T2}.items()}
    got = CODISTILL.losses(out, torch.tensor(Y), hp, None)
    assert set(got) == {"local"}  # teachers never train
    assert got["local"].item() == pytest.approx(_hand(weighting, 0.3, [T1, T2]), rel=1e-9)


def test_no_teacher_or_a_diverged_one_teaches_nothing():
    hp = Hyper(alpha=0.3, distill=Distill(weighting=DistillWeighting.ADDITIVE))
    y = torch.tensor(Y)
    own = torch.tensor(OWN)
    alone = CODISTILL.losses({"local": own}, y, hp, None)["local"].item()
    p = _softmax(OWN)
    assert alone == pytest.approx(-np.log(p[np.arange(2), Y]).mean(), rel=1e-9)
    nan = torch.full_like(own, float("nan"))
    one = CODISTILL.losses({"local": own, "teacher-1": torch.tensor(T1), "teacher-2": nan},
                           y, hp, None)["local"].item()
    assert one == pytest.approx(_hand("additive", 0.3, [T1]), rel=1e-9)


def test_a_model_without_an_optimizer_is_a_frozen_teacher():
    """The student steps; the teacher (with BatchNorm) keeps its weights and running
    statistics, and predicts in eval mode."""
    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    teacher = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = student.weight.detach().clone()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    stats = train_epochs({"local": student, "teacher-1": teacher},
                         {"local": torch.optim.SGD(student.parameters(), lr=0.1)},
                         CODISTILL, x, y, Hyper(alpha=0.5, batch_size=8),
                         torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(stats.losses) == {"local"}
    assert not torch.equal(student.weight, s_before)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # num_batches_tracked, running stats included
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


def test_a_loss_for_a_frozen_model_is_never_stepped_on():
    """The base algorithm computes a CE for every model it sees; one without an optimizer
    (a teacher) is neither stepped nor reported."""
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    stats = train_epochs({"local": a, "teacher-1": b},
                         {"local": torch.optim.SGD(a.parameters(), lr=0.1)}, Algorithm(),
                         torch.randn(8, 4), torch.randint(0, 3, (8,)), Hyper(batch_size=8),
                         torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(stats.losses) == {"local"}
    assert b.weight.grad is None and a.weight.grad is not None


def _state(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 2), v, np.float32), "b": np.full(2, v, np.float32)}


def test_the_bank_forwards_others_latest_models_up_to_k():
    bank = TeacherBank()
    for key in (5, 1, 3):
        bank.keep(key, _state(float(key)))
    bank.keep(3, _state(30.0))  # the latest replaces the older
    sent = bank.pick(1, 3, seed=0)
    assert list(sent) == ["teacher-1", "teacher-2"]  # others in key order: 3, then 5
    assert [float(r["w"].numpy()[0, 0]) for r in sent.values()] == [30.0, 5.0]
    assert bank.pick(9, 3, seed=0).keys() == {"teacher-1", "teacher-2", "teacher-3"}
    for key in range(10, 20):
        bank.keep(key, _state(float(key)))
    drawn = [[float(r["b"].numpy()[0]) for r in bank.pick(1, 4, seed=s).values()]
             for s in range(6)]
    assert all(len(set(d)) == 4 and 1.0 not in d for d in drawn)  # 4 others, no repeat
    assert drawn[0] == [float(r["b"].numpy()[0]) for r in bank.pick(1, 4, seed=0).values()]
    assert len({tuple(d) for d in drawn}) > 1  # the seed draws


def test_the_bank_survives_a_checkpoint(tmp_path):
    cfg = load_config({"algorithm": "codistill"})
    bank = TeacherBank()
    bank.keep(2, _state(2.5))
    bank.keep(7, _state(-1.0))
    save_checkpoint(tmp_path, 3, {"w": torch.zeros(1)}, [{}, {}, {}], cfg, {}, bank.state())
    again = TeacherBank()
    again.restore(load_checkpoint(tmp_path, cfg).teachers)
    assert again.models.keys() == {2, 7}
    for key in (2, 7):
        for name, value in bank.models[key].items():
            np.testing.assert_array_equal(again.models[key][name], value)


@pytest.mark.parametrize(("key", "value"), [
    ("secure-aggregation", True), ("dp-mode", "server"), ("compression", "int8"),
    ("compression-down", "fp16")])
def test_codistill_refuses_what_hides_or_encodes_the_clients_models(key, value):
    with pytest.raises(ConfigError, match=f"'{key}"):
        load_config({"algorithm": "codistill", key: value})


@pytest.mark.parametrize(("key", "value"), [
    ("codistill-every", 0), ("codistill-burnin", -1), ("codistill-teachers", 17),
    ("codistill-teachers", 0)])
def test_codistill_keys_are_bounded(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config({"algorithm": "codistill", key: value})


def _codistill_strategy(run_dir, **overrides):
    """The real strategy for co-distillation (burn-in 1, an exchange every 3rd round:
    rounds 2 and 5; uploads in 1 and 4), nodes 101-103 identified as clients 1-3."""
    from flwr.app import Array, ArrayRecord

    from server.results import RunLog
    from server.strategy import build_strategy
    from server.validate import template_of
    from tests.test_hostile import TEMPLATE

    cfg = load_config({"algorithm": "codistill", "codistill-burnin": 1, "codistill-every": 3,
                       "codistill-teachers": 2, "num-server-rounds": 6,
                       "output-dir": str(run_dir), "run-name": "r", **overrides})
    log = RunLog.create(cfg)
    strat = build_strategy(cfg, log, template=template_of(
        ArrayRecord({k: Array(v) for k, v in TEMPLATE.items()})))
    strat.clients.keys.update({101: 1, 102: 2, 103: 3})
    return strat, log


def _teacher_values(records) -> list[float]:
    return [float(r["b"].numpy()[0]) for r in records.values()]


def test_an_exchange_reaches_every_client_once_even_one_that_missed_it(tmp_path):
    from tests.test_hostile import _good

    strat, _ = _codistill_strategy(tmp_path)
    for key in (1, 2, 3):
        strat.bank.keep(key, _good(float(key)))
    assert strat._teachers(1, [101, 102, 103]) == {}  # burn-in: no exchange yet
    got = strat._teachers(2, [101, 102])  # the exchange; client 3 not sampled
    assert {n: _teacher_values(r) for n, r in got.items()} == {101: [2.0, 3.0],
                                                               102: [1.0, 3.0]}
    late = strat._teachers(3, [101, 102, 103])  # only client 3 still lacks round 2's
    assert {n: _teacher_values(r) for n, r in late.items()} == {103: [1.0, 2.0]}
    assert strat._teachers(4, [101, 102, 103]) == {}
    resumed, _ = _codistill_strategy(tmp_path / "resumed")  # a new server process
    resumed.bank.models = strat.bank.models
    again = resumed._teachers(4, [101, 102, 103])  # the kept teachers went with the clients
    assert {n: _teacher_values(r) for n, r in again.items()} == {
        101: [2.0, 3.0], 102: [1.0, 3.0], 103: [1.0, 2.0]}
    strat.bank.keep(2, _good(20.0))  # uploaded in round 4
    assert {n: _teacher_values(r) for n, r in strat._teachers(5, [101]).items()} == {
        101: [20.0, 3.0]}


def test_models_are_admitted_and_kept_only_in_an_upload_round(tmp_path):
    from flwr.app import Array

    from tests.test_hostile import _good, _reply

    strat, log = _codistill_strategy(tmp_path)
    log.begin_round(1)  # an upload round: the models go into the bank
    model = {k: Array(v) for k, v in _good(7.0).items()}
    strat.aggregate_train(1, [_reply(101, model, {"num-examples": 5}),
                              _reply(102, {}, {"num-examples": 5})])
    assert list(strat.bank.models) == [1]
    assert float(strat.bank.models[1]["w"][0, 0]) == 7.0
    assert [r["node"] for r in log._current["rejections"]] == [102]  # no model: refused
    log.begin_round(2)  # no upload: a model is refused, metrics alone are accepted
    strat.aggregate_train(2, [_reply(101, model, {"num-examples": 5}),
                              _reply(103, {}, {"num-examples": 5})])
    assert [r["node"] for r in log._current["rejections"]] == [101]
    assert log._current["num_clients"] == 1 and list(strat.bank.models) == [1]
