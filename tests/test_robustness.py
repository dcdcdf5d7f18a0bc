"""Robustness: every rejection reason through the real aggregation path, robust modes,
checkpoints, private-state files, and fuzzing of both validators."""

import math
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from client import private
from common.config import ConfigError, load_config
from common.models import TaskSpec
from server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from server.identity import TooFewClients
from server.results import RunLog
from server.strategy import build_strategy
from server.validate import template_of, validate_update
from tests.conftest import make_context

TEMPLATE_ARRAYS = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32),
                   "n": np.array(0, np.int64)}


def _meta(node: int, message_type: str = MessageType.TRAIN) -> Metadata:
    """The metadata of a reply from ``node`` to the server."""
    return Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=message_type)


def _reply(node: int, arrays: dict, weight=10, **extra_metrics) -> Message:
    meta = _meta(node)
    metrics = {"num-examples": weight, "train-loss-meme": 1.0, **extra_metrics}
    if weight is None:
        del metrics["num-examples"]
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v))
                                                  for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, metadata=meta)


def _good(v: float) -> dict:
    return {"w": np.full((2, 3), v, np.float32), "b": np.full(3, v, np.float32),
            "n": np.array(int(v), np.int64)}


def _strategy(tmp_path, **cfg_overrides):
    cfg = load_config({"algorithm": "fedavg", "max-client-weight": 100,
                       "output-dir": str(tmp_path), "run-name": "r", **cfg_overrides})
    log = RunLog.create(cfg)
    strat = build_strategy(cfg, log, template=template_of(
        ArrayRecord({k: Array(v) for k, v in TEMPLATE_ARRAYS.items()})))
    log.begin_round(1)
    return strat, log


BAD = {
    "missing key": (dict(list(_good(1).items())[:2]), 10, "missing"),
    "extra key": ({**_good(1), "x": np.zeros(1, np.float32)}, 10, "unexpected"),
    "(1,)-shaped array": ({**_good(1), "w": np.ones(1, np.float32)}, 10, "shape"),
    "wrong dtype": ({**_good(1), "b": np.ones(3, np.float64)}, 10, "dtype"),
    "NaN": ({**_good(1), "w": np.full((2, 3), np.nan, np.float32)}, 10, "non-finite"),
    "Inf": ({**_good(1), "b": np.array([1, np.inf, 1], np.float32)}, 10, "non-finite"),
    "zero weight": (_good(1), 0, "positive"),
    "negative weight": (_good(1), -5, "positive"),
    "missing weight": (_good(1), None, "missing"),
    "weight over cap": (_good(1), 1000, "exceeds the cap of 100"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_rejection_reason_and_exact_average_of_the_rest(tmp_path, case, caplog):
    strat, log = _strategy(tmp_path)
    arrays, weight, reason = BAD[case]
    replies = [_reply(1, _good(1.0), 10), _reply(2, _good(4.0), 20), _reply(3, arrays, weight)]
    assert reason in (validate_update(replies[2].content, strat.template, 100) or "")
    agg, _ = strat.aggregate_train(1, replies)
    # (10 * 1 + 20 * 4) / 30 = 3
    np.testing.assert_allclose(agg["w"].numpy(), np.full((2, 3), 3.0))
    assert agg["w"].numpy().dtype == np.float32 and agg["n"].numpy().dtype == np.int64
    assert int(agg["n"].numpy()) == 3
    log.end_round()
    assert log.records[-1]["rejected_updates"] == 1 and log.records[-1]["num_clients"] == 2
    assert "rejected the update of node 3" in caplog.text


def test_no_valid_reply_keeps_the_meme_and_marks_the_round(tmp_path):
    strat, log = _strategy(tmp_path, **{"min-clients": 1})
    agg, metrics = strat.aggregate_train(1, [_reply(1, BAD["NaN"][0])])
    assert agg is None and metrics is None
    log.end_round()
    assert log.records[-1]["skipped"] is True and log.records[-1]["rejected_updates"] == 1


def test_fewer_answers_than_min_clients_stops(tmp_path):
    strat, _ = _strategy(tmp_path, **{"min-clients": 3})
    with pytest.raises(TooFewClients, match="only 2 client"):
        strat.aggregate_train(1, [_reply(1, _good(1.0)), _reply(2, _good(2.0))])


def test_uniform_ignores_weights(tmp_path):
    strat, _ = _strategy(tmp_path, aggregation="uniform")
    agg, _ = strat.aggregate_train(1, [_reply(1, _good(1.0), 10), _reply(2, _good(4.0), 90)])
    np.testing.assert_allclose(agg["w"].numpy(), np.full((2, 3), 2.5))


def test_median_and_krum_resist_an_outlier(tmp_path):
    replies = lambda: [_reply(i, _good(v), 10) for i, v in  # noqa: E731
                       enumerate([1.0, 2.0, 3.0, 4.0, 500.0], start=1)]
    strat, _ = _strategy(tmp_path / "m", aggregation="median")
    agg, _ = strat.aggregate_train(1, replies())
    np.testing.assert_allclose(agg["w"].numpy(), np.full((2, 3), 3.0))
    assert agg["n"].numpy().dtype == np.int64
    strat, _ = _strategy(tmp_path / "k", aggregation="krum", **{"num-malicious": 1})
    agg, _ = strat.aggregate_train(1, replies())
    assert float(agg["w"].numpy()[0, 0]) in (2.0, 3.0)  # a central client, never the outlier
    strat, _ = _strategy(tmp_path / "mk", aggregation="multi-krum", **{"num-malicious": 1})
    agg, _ = strat.aggregate_train(1, replies())
    np.testing.assert_allclose(agg["w"].numpy(), np.full((2, 3), 2.5))  # mean of 1..4
    strat, _ = _strategy(tmp_path / "t", aggregation="trimmed-mean",
                         **{"trimmed-mean-beta": 0.2})
    agg, _ = strat.aggregate_train(1, replies())
    np.testing.assert_allclose(agg["w"].numpy(), np.full((2, 3), 3.0))  # mean of 2, 3, 4


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip_and_refusals(tmp_path):
    cfg = load_config({"dataset": "digits", "output-dir": str(tmp_path), "run-name": "c"})
    meme = {"w": torch.randn(3, 2)}
    records = [{"round": 1}, {"round": 2}]
    path = save_checkpoint(tmp_path, 2, meme, records, cfg, {"x": 1})
    ckpt = load_checkpoint(tmp_path, load_config({**cfg.to_dict(), "num-server-rounds": 9}))
    assert ckpt.round == 2 and torch.equal(ckpt.meme["w"], meme["w"]) and ckpt.records == records
    with pytest.raises(CheckpointError, match=r"different config \('alpha'"):
        load_checkpoint(tmp_path, load_config({**cfg.to_dict(), "alpha": 0.9}))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path, cfg)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere", cfg)


# ---------------------------------------------------------------- private state on disk
RUN = {"dataset": "digits", "local-model": "mlp", "meme-model": "mlp"}
SPEC = TaskSpec(1, 8, 10)


def _node(tmp_path, cfg, local_model="mlp"):
    ctx = make_context({**RUN, "state-dir": str(tmp_path)})
    ctx.node_config["local-model"] = local_model
    return ctx, private.node_info(cfg, ctx)


def _train_once(ctx, node, cfg, lineage, server_round):
    priv = private.restore(ctx, cfg, node, SPEC, torch.device("cpu"), lineage, server_round - 1)
    with torch.no_grad():
        for p in priv.model.parameters():
            p.add_(1.0)
    priv.node_round += 1
    priv.server_round, priv.lineage = server_round, lineage
    private.store(ctx, cfg, priv, node)
    return priv


def test_private_state_survives_a_restart_and_refuses_bad_files(tmp_path):
    cfg = load_config({**RUN, "state-dir": str(tmp_path)})
    ctx, node = _node(tmp_path, cfg)
    first = _train_once(ctx, node, cfg, "run-a", 1)
    second = _train_once(ctx, node, cfg, "run-a", 2)
    # a restarted node (empty context.state) continues from disk
    ctx2, _ = _node(tmp_path, cfg)
    back = private.restore(ctx2, cfg, node, SPEC, torch.device("cpu"), "run-b", 0)
    assert back.node_round == 2
    for a, b in zip(back.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # a resumed run replaying round 2 gets the version from before round 2
    replay = private.restore(make_context(RUN), cfg, node, SPEC, torch.device("cpu"), "run-a", 1)
    assert replay.node_round == 1 and replay.server_round == 1
    for a, b in zip(replay.model.parameters(), first.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # another architecture is refused, naming the file
    _, cnn_node = _node(tmp_path, cfg, local_model="cnn")
    with pytest.raises(private.PrivateStateError, match=r"private-0\.pt holds a 'mlp'"):
        private.restore(make_context(RUN), cfg, cnn_node, SPEC, torch.device("cpu"))
    # a truncated file is refused, and left in place
    node.state_file.write_bytes(node.state_file.read_bytes()[:50])
    with pytest.raises(private.PrivateStateError, match="corrupt or truncated"):
        private.restore(make_context(RUN), cfg, node, SPEC, torch.device("cpu"))
    assert node.state_file.stat().st_size == 50
    # reset-private starts afresh
    fresh_cfg = load_config({**RUN, "state-dir": str(tmp_path), "reset-private": True})
    assert private.restore(make_context(RUN), fresh_cfg, node, SPEC,
                           torch.device("cpu")).node_round == 0


# ---------------------------------------------------------------- fuzzing
_values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
_keys = st.sampled_from([k.name for k in __import__("common.config").config.SCHEMA]
                        + ["bogus", "", "ALPHA"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=6))
def test_config_validator_raises_only_config_errors(run_config):
    try:
        load_config(run_config)
    except ConfigError as err:
        assert str(err)


_arrays = st.dictionaries(
    st.sampled_from(["w", "b", "n", "zz"]),
    st.one_of(
        st.builds(lambda s, v: np.full(s, v, np.float32),
                  st.sampled_from([(2, 3), (3,), (1,), ()]),
                  st.floats(allow_nan=True, allow_infinity=True, width=32)),
        st.builds(lambda v: np.array(v, np.int64), st.integers(-5, 5)),
        st.builds(lambda v: np.full((2, 3), v, np.float64), st.floats(-1, 1)),
    ), max_size=4)


@settings(max_examples=300, deadline=None)
@given(_arrays, st.one_of(_values, st.integers()))
def test_update_validator_never_raises(arrays, weight):
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": weight}
                                                  if isinstance(weight, int | float)
                                                  and not isinstance(weight, bool) else {})})
    template = template_of(ArrayRecord({k: Array(v) for k, v in TEMPLATE_ARRAYS.items()}))
    reason = validate_update(content, template, 100)
    ok = (set(arrays) == set(TEMPLATE_ARRAYS)
          and all(arrays[k].shape == TEMPLATE_ARRAYS[k].shape
                  and arrays[k].dtype == TEMPLATE_ARRAYS[k].dtype
                  and np.isfinite(arrays[k]).all() for k in arrays)
          and isinstance(weight, int | float) and not isinstance(weight, bool)
          and math.isfinite(weight) and weight == int(weight) and 0 < weight <= 100)
    assert (reason is None) == ok, reason


class _ColdStartGrid:
    """Three connected nodes; only those in ``awake`` answer a query (the others are
    still starting, as a node whose ClientApp is slow to load)."""

    def __init__(self) -> None:
        self.awake: set[int] = {11}
        self.asked: list[list[int]] = []

    def get_node_ids(self) -> list[int]:
        return [33, 11, 22]

    def send_and_receive(self, msgs, timeout):
        self.asked.append([m.metadata.dst_node_id for m in msgs])
        for m in msgs:
            node = m.metadata.dst_node_id
            if node in self.awake:
                yield Message(content=RecordDict({"metrics": MetricRecord(
                    {"client-key": node // 11 - 1, "num-train": 10, "channels": 1,
                     "size": 8, "num-classes": 10})}),
                    metadata=_meta(node, MessageType.QUERY))


def test_a_node_silent_at_identification_is_asked_again_and_then_sorted_by_its_key(
        tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # as the ServerApp process has it
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    strat, _ = _strategy(tmp_path)
    grid = _ColdStartGrid()  # client keys: node 11 -> 0, 22 -> 1, 33 -> 2
    assert strat.ordered(grid).get_node_ids() == [11, 22, 33]  # silent: last, by node id
    assert grid.asked == [[33, 11, 22]]
    grid.awake = {11, 33}
    assert strat.ordered(grid).get_node_ids() == [11, 33, 22]  # 33 known now, 22 not
    assert grid.asked[1] == [33, 22]  # only the silent ones are asked again
    grid.awake = {11, 22, 33}
    assert strat.ordered(grid).get_node_ids() == [11, 22, 33]
    assert grid.asked[2] == [22]
    strat.ordered(grid)
    assert len(grid.asked) == 3  # everyone known: no more queries
