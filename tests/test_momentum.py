"""Server momentum (FedAvgM): the step by hand, through the real strategy, in checkpoints."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.config import ConfigError, load_config
from server.checkpoint import load_checkpoint, save_checkpoint
from server.momentum import ServerMomentum, momentum_step
from tests.test_robustness import _reply, _strategy


def test_two_steps_by_hand_and_integers_take_the_aggregate():
    sent = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}
    agg = {"w": np.array([0.0, 1.0], np.float32), "n": np.array(5, np.int64)}
    meme, v = momentum_step(sent, agg, {}, lr=0.5, momentum=0.9)
    # d = (1, 1), v = (1, 1), w = (1, 2) - 0.5·(1, 1)
    np.testing.assert_allclose(meme["w"], [0.5, 1.5])
    assert meme["w"].dtype == np.float32 and int(meme["n"]) == 5 and "n" not in v
    meme, v = momentum_step(meme, {"w": np.array([0.5, 0.5], np.float32), "n": agg["n"]}, v,
                            lr=0.5, momentum=0.9)
    # d = (0, 1), v = 0.9·(1, 1) + (0, 1) = (0.9, 1.9), w = (0.5, 1.5) - 0.5·v
    np.testing.assert_allclose(v["w"], [0.9, 1.9])
    np.testing.assert_allclose(meme["w"], [0.05, 0.55], rtol=1e-6)


def _sent(strat, value: float) -> None:
    """What configure_train records as the round's meme: every array at ``value``."""
    strat.current_arrays = ArrayRecord({
        "w": Array(np.full((2, 3), value, np.float32)), "b": Array(np.full(3, value, np.float32)),
        "n": Array(np.array(0, np.int64))})


def _good(v: float) -> dict:
    return {"w": np.full((2, 3), v, np.float32), "b": np.full(3, v, np.float32),
            "n": np.array(int(v), np.int64)}


def test_the_strategy_publishes_the_momentum_step_of_its_aggregate(tmp_path):
    strat, log = _strategy(tmp_path, **{"server-lr": 0.5, "server-momentum": 0.9})
    _sent(strat, 2.0)  # round 1: aggregate (10·1 + 30·3)/40 = 2.5 -> d = -0.5
    agg, _ = strat.aggregate_train(1, [_reply(1, _good(1.0), 10), _reply(2, _good(3.0), 30)])
    np.testing.assert_allclose(agg["w"].numpy(), np.full((2, 3), 2.25))  # 2 - 0.5·(-0.5)
    assert int(agg["n"].numpy()) == 2  # integers: the aggregate, (10·1 + 30·3)//40
    log.end_round()
    log.begin_round(2)
    _sent(strat, 2.25)  # round 2: aggregate 1 -> d = 1.25, v = 0.9·(-0.5) + 1.25 = 0.8
    agg, _ = strat.aggregate_train(2, [_reply(1, _good(1.0), 10), _reply(2, _good(1.0), 30)])
    np.testing.assert_allclose(agg["w"].numpy(), np.full((2, 3), 2.25 - 0.5 * 0.8), rtol=1e-6)
    plain, _ = _strategy(tmp_path / "plain")  # the defaults publish the aggregate itself
    _sent(plain, 2.0)
    agg, _ = plain.aggregate_train(1, [_reply(1, _good(1.0), 10), _reply(2, _good(3.0), 30)])
    np.testing.assert_allclose(agg["w"].numpy(), np.full((2, 3), 2.5))


def test_a_round_not_released_leaves_the_velocity_alone(tmp_path):
    strat, _ = _strategy(tmp_path, **{"server-lr": 10.0, "server-momentum": 0.5,
                                      "min-clients": 1})
    _sent(strat, 2.0)
    got = strat.collect(1, [_reply(1, _good(1.0))])
    strat.release(_good(1.0), got)  # released: v = 1 everywhere
    before = {k: v.copy() for k, v in strat.momentum.velocity.items()}
    np.testing.assert_array_equal(before["w"], np.ones((2, 3)))
    for aggregate in ({**_good(1.0), "w": np.full((2, 3), np.nan, np.float32)},  # NaN in
                      {**_good(1.0), "w": np.full((2, 3), -3e38, np.float32)}):  # overflows
        arrays, _ = strat.release(aggregate, got)
        assert arrays is None
        assert all(np.array_equal(before[k], strat.momentum.velocity[k]) for k in before)
    arrays, _ = strat.release(_good(1.0), got)  # released again: v = 0.5·1 + 1
    np.testing.assert_array_equal(strat.momentum.velocity["w"], np.full((2, 3), 1.5))
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 2.0 - 10 * 1.5))


def test_the_velocity_survives_a_checkpoint_and_a_misfit_is_refused(tmp_path):
    cfg = load_config({"dataset": "digits", "server-momentum": 0.9,
                       "output-dir": str(tmp_path), "run-name": "c"})
    sm = ServerMomentum(1.0, 0.9)
    sm.commit(sm.propose({"w": np.ones((2, 2), np.float32)},
                         {"w": np.zeros((2, 2), np.float32)})[1])
    meme = {"w": torch.zeros(2, 2)}
    save_checkpoint(tmp_path, 1, meme, [{"round": 1}], cfg, {}, velocity=sm.state())
    back = ServerMomentum(1.0, 0.9)
    back.restore(load_checkpoint(tmp_path, cfg).velocity, meme)
    np.testing.assert_array_equal(back.velocity["w"], np.ones((2, 2)))
    with pytest.raises(ValueError, match="velocity 'w' does not fit"):
        back.restore({"w": torch.zeros(3)}, meme)
    with pytest.raises(ValueError, match="velocity 'x' does not fit"):
        back.restore({"x": torch.zeros(2, 2)}, meme)


def test_a_checkpoint_from_before_a_key_existed_resumes_at_its_default(tmp_path):
    cfg = load_config({"dataset": "digits", "output-dir": str(tmp_path), "run-name": "c"})
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, [{"round": 1}], cfg, {})
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    old = json.loads(raw["config_json"])
    del old["server-momentum"], old["server-lr"]  # written before the keys existed
    raw["config_json"] = json.dumps(old)
    torch.save(raw, tmp_path / "checkpoint.pt")
    assert load_checkpoint(tmp_path, cfg).round == 1
    with pytest.raises(Exception, match="'server-momentum': checkpoint 0.0, now 0.5"):
        load_checkpoint(tmp_path, load_config({**cfg.to_dict(), "server-momentum": 0.5}))


def test_server_momentum_needs_a_meme_and_a_range():
    with pytest.raises(ConfigError, match="'server-momentum' = 0.9.*'local'"):
        load_config({"algorithm": "local", "server-momentum": 0.9})
    with pytest.raises(ConfigError, match=r"'server-momentum'.*\[0, 1\)"):
        load_config({"server-momentum": 1.0})
    with pytest.raises(ConfigError, match=r"'server-lr'.*\(0, 10\]"):
        load_config({"server-lr": 0.0})
    with pytest.raises(ConfigError, match="'server-momentum' = 0.5.*'compression-down'"):
        load_config({"server-momentum": 0.5, "compression-down": "fp16"})
