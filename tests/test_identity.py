"""Who a node is: unique client keys, duplicates left out, hostile identify replies
refused, keys bound to authenticated nodes, and every server wait bounded."""

import json
import math
import re
import time

import pytest
from flwr.app import ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import private
from common.config import load_config
from server.identity import ClientRegistry, TooFewClients
from server.results import RunLog
from server.sampling import cyclic_sample
from server.strategy import build_strategy
from tests.conftest import make_context

NPZ = {"dataset": "npz", "data-path": "/home/pi/data/mine.npz"}


def _ctx(state_dir: str = "", **node_config) -> tuple:
    ctx = make_context({**NPZ, "state-dir": state_dir})
    ctx.node_config.clear()
    ctx.node_config.update(node_config)
    return ctx, load_config(ctx.run_config)


def test_nodes_with_the_same_data_path_get_different_keys(tmp_path):
    keys = []
    for name in ("pi-a", "pi-b"):
        ctx, cfg = _ctx(str(tmp_path / name))
        node = private.node_info(cfg, ctx)
        keys.append(node.client_key)
        # stable: a restarted node (fresh context) reads the same key from its state folder
        again = private.node_info(cfg, _ctx(str(tmp_path / name))[0])
        assert again.client_key == node.client_key
        assert (tmp_path / name / "node-key").read_text().strip() == str(node.client_key)
        assert node.state_file.name == f"private-{node.client_key}.pt"
    assert keys[0] != keys[1]


def test_client_key_order_explicit_then_partition_then_state(tmp_path):
    ctx, cfg = _ctx(str(tmp_path), **{"client-key": 77, "partition-id": 3})
    assert private.node_info(cfg, ctx).client_key == 77
    ctx, cfg = _ctx(str(tmp_path), **{"partition-id": 3})
    assert private.node_info(cfg, ctx).client_key == 3
    assert not (tmp_path / "node-key").exists()  # a partition id needs no key file
    # no state folder: a random key kept in context.state for the run
    ctx, cfg = _ctx()
    first = private.node_info(cfg, ctx).client_key
    assert private.node_info(cfg, ctx).client_key == first
    assert private.node_info(cfg, _ctx()[0]).client_key != first


@pytest.mark.parametrize("bad", [-1, 2**53, "seven", 1.5, True])
def test_invalid_client_key_is_refused_with_the_key_name(bad):
    ctx, cfg = _ctx(**{"client-key": bad})
    with pytest.raises(ValueError, match="node-config key 'client-key'"):
        private.node_info(cfg, ctx)


def test_a_corrupt_node_key_file_is_refused_naming_it(tmp_path):
    (tmp_path / "node-key").write_text("not a number")
    ctx, cfg = _ctx(str(tmp_path))
    with pytest.raises(private.PrivateStateError, match=r"node key file .*node-key holds"):
        private.node_info(cfg, ctx)


def _honest(key: int, num_train: int = 10) -> RecordDict:
    """What client/app.py's identify sends."""
    return RecordDict({"metrics": MetricRecord({
        "client-key": key, "channels": 1, "size": 8, "num-classes": 10,
        "num-train": num_train, "num-test": 3})})


def _smuggled(values: dict, kind: type = MetricRecord) -> RecordDict:
    """A 'metrics' record holding any values: Flower's own type check (which a hostile
    node's serializer need not pass through) is bypassed, so bools and strings get in."""
    record = kind()
    record.__dict__["_data"].update(values)
    return RecordDict({"metrics": record})


class _Grid:
    """Connected nodes and what each answers when identified: a client key (an honest
    reply) or any content; ``drop_after_query`` leave once asked."""

    def __init__(self, keys: dict[int, int | RecordDict],
                 drop_after_query: tuple[int, ...] = ()) -> None:
        self.keys, self.drop = dict(keys), drop_after_query
        self.asked: list[list[int]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.keys)

    def send_and_receive(self, msgs, timeout):
        self.asked.append([m.metadata.dst_node_id for m in msgs])
        replies = []
        for m in msgs:
            node = m.metadata.dst_node_id
            meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                            reply_to_message_id="x", group_id="1", created_at=time.time(),
                            ttl=3600.0, message_type=MessageType.QUERY)
            answer = self.keys[node]
            content = answer if isinstance(answer, RecordDict) else _honest(answer)
            replies.append(Message(content=content, metadata=meta))
        for node in self.drop:
            self.keys.pop(node, None)
        return replies


@pytest.fixture
def server_process(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # as the ServerApp process has them
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _strategy(tmp_path, **overrides):
    cfg = load_config({"algorithm": "fedavg", "output-dir": str(tmp_path), "run-name": "r",
                       **overrides})
    return build_strategy(cfg, RunLog.create(cfg))


def test_a_node_reporting_a_taken_key_is_left_out_until_the_key_is_free(
        tmp_path, server_process, caplog):
    strat = _strategy(tmp_path, **{"min-clients": 1})
    grid = _Grid({11: 5, 22: 5, 33: 6})
    assert strat.ordered(grid).get_node_ids() == [11, 33]
    assert "node 22 reports client key 5, which node 11 already has" in caplog.text
    assert strat.ordered(grid).get_node_ids() == [11, 33]
    assert grid.asked[-1] == [22]  # asked again, still a duplicate
    del grid.keys[11]  # the holder left: the key is free
    assert strat.ordered(grid).get_node_ids() == [22, 33]
    assert strat.clients.keys[22] == 5


def test_waiting_for_clients_is_bounded_by_round_timeout(tmp_path, server_process):
    strat = _strategy(tmp_path, **{"min-clients": 3, "round-timeout": 2.0})
    start = time.monotonic()
    with pytest.raises(TooFewClients, match="only 2 client"):
        strat.ordered(_Grid({11: 0, 22: 1}))
    assert time.monotonic() - start < 10


def test_nodes_lost_during_identification_never_reach_flowers_endless_sampler(
        tmp_path, server_process):
    """Three connected at first, one leaves while identified: fewer than min-clients remain.
    Flower's sampler would loop forever on that list; the strategy gives up at the timeout."""
    strat = _strategy(tmp_path, **{"min-clients": 3, "round-timeout": 2.0})
    grid = _Grid({11: 0, 22: 1, 33: 2}, drop_after_query=(33,))
    start = time.monotonic()
    with pytest.raises(TooFewClients, match=r"only 2 (identified )?client"):
        strat.ordered(grid)
    assert time.monotonic() - start < 10


class _FailingGrid(_Grid):
    """Every node answers the identify query with an error (e.g. its data cannot load)."""

    def send_and_receive(self, msgs, timeout):
        from flwr.app import Error

        replies = super().send_and_receive(msgs, timeout)
        out = []
        for r in replies:
            out.append(Message(error=Error(code=0, reason="ValueError: update the values "
                                           "of alpha"), metadata=r.metadata))
        return out


def test_when_every_client_fails_to_identify_the_run_stops_at_once_with_the_reason(
        tmp_path, server_process):
    strat = _strategy(tmp_path, **{"min-clients": 2, "round-timeout": 600.0})
    start = time.monotonic()
    with pytest.raises(TooFewClients, match="every connected client failed.*values of alpha"):
        strat.ordered(_FailingGrid({11: 0, 22: 1}))
    assert time.monotonic() - start < 10  # not after round-timeout (600 s)


def test_cyclic_sampling_covers_every_client_once_per_pass():
    ids = [107, 3, 55, 21, 9, 80]  # node ids, in client-key order

    def seeds(base):
        return lambda p: base * 1000 + p

    rounds = [cyclic_sample(ids, 2, r, seeds(1)) for r in range(1, 7)]
    assert all(len(r) == 2 and len(set(r)) == 2 for r in rounds)
    first, second = rounds[:3], rounds[3:]  # 6 clients, 2 a round: a pass is 3 rounds
    assert sorted(n for r in first for n in r) == sorted(ids)
    assert sorted(n for r in second for n in r) == sorted(ids)
    assert first != second  # each pass is shuffled anew
    assert rounds == [cyclic_sample(ids, 2, r, seeds(1)) for r in range(1, 7)]  # seeded
    assert rounds != [cyclic_sample(ids, 2, r, seeds(2)) for r in range(1, 7)]
    # 4 of 6 a round: round 2 takes the pass's last 2 and 2 of the next pass, never one twice
    straddle = [cyclic_sample(ids, 4, r, seeds(1)) for r in (1, 2)]
    assert all(len(set(r)) == 4 for r in straddle)
    assert set(straddle[0]) | set(straddle[1]) == set(ids)
    assert cyclic_sample(ids, 10, 1, seeds(1)) == cyclic_sample(ids, 6, 1, seeds(1))  # capped


_FULL = {"client-key": 4, "channels": 1, "size": 8, "num-classes": 10, "num-train": 10}
MALFORMED = {
    "no metrics record": (RecordDict({}), "no record named 'metrics'"),
    "a config record": (RecordDict({"metrics": ConfigRecord({**_FULL, "client-key": "4"})}),
                        "has type ConfigRecord"),
    "key nan": (RecordDict({"metrics": MetricRecord({**_FULL, "client-key": math.nan})}),
                "'client-key' = nan"),
    "key inf": (RecordDict({"metrics": MetricRecord({**_FULL, "client-key": math.inf})}),
                "'client-key' = inf"),
    "key a list": (RecordDict({"metrics": MetricRecord({**_FULL, "client-key": [1, 2]})}),
                   r"'client-key' = \[1, 2\]"),
    "key a float": (RecordDict({"metrics": MetricRecord({**_FULL, "client-key": 4.0})}),
                    "'client-key' = 4.0"),
    "key a bool": (_smuggled({**_FULL, "client-key": True}), "'client-key' = True"),
    "key a str": (_smuggled({**_FULL, "client-key": "4"}), "'client-key' = '4'"),
    "key negative": (RecordDict({"metrics": MetricRecord({**_FULL, "client-key": -1})}),
                     "'client-key' = -1"),
    "key huge": (RecordDict({"metrics": MetricRecord({**_FULL, "client-key": 2**62})}),
                 "'client-key' = 4611686018427387904"),
    "key missing": (RecordDict({"metrics": MetricRecord(
        {k: v for k, v in _FULL.items() if k != "client-key"})}), "'client-key' is missing"),
    "num-train missing": (RecordDict({"metrics": MetricRecord(
        {k: v for k, v in _FULL.items() if k != "num-train"})}), "'num-train' is missing"),
    "num-train 0": (RecordDict({"metrics": MetricRecord({**_FULL, "num-train": 0})}),
                    "'num-train' = 0"),
    "num-train 10**12": (RecordDict({"metrics": MetricRecord({**_FULL, "num-train": 10**12})}),
                         "'num-train' = 1000000000000"),
    "num-train nan": (RecordDict({"metrics": MetricRecord({**_FULL, "num-train": math.nan})}),
                      "'num-train' = nan"),
    "channels 65": (RecordDict({"metrics": MetricRecord({**_FULL, "channels": 65})}),
                    "'channels' = 65"),
    "size a list": (RecordDict({"metrics": MetricRecord({**_FULL, "size": [8.0]})}),
                    r"'size' = \[8.0\]"),
    "num-classes 10**6": (RecordDict({"metrics": MetricRecord({**_FULL, "num-classes": 10**6})}),
                          "'num-classes' = 1000000"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_identify_reply_is_refused_and_asked_again(
        name, tmp_path, server_process, caplog):
    bad, reason = MALFORMED[name]
    strat = _strategy(tmp_path, **{"min-clients": 2})
    grid = _Grid({11: 5, 22: bad, 33: 3})
    assert strat.ordered(grid).get_node_ids() == [33, 11]  # the honest ones, by key
    assert 22 not in strat.clients.keys and 22 not in strat.clients.info
    assert re.search(reason, strat.clients.errors[22])
    assert strat.clients.largest_train_split() == 10  # its num-train caps no weight
    assert strat.ordered(grid).get_node_ids() == [33, 11]
    assert grid.asked[-1] == [22]  # asked again next round
    assert caplog.text.count("node 22 is left out") == 1  # logged once, not every round
    grid.keys[22] = 4  # it answers properly now: taken in, by its key
    assert strat.ordered(grid).get_node_ids() == [33, 22, 11]
    assert 22 not in strat.clients.errors


def test_info_holds_only_the_checked_ints(tmp_path, server_process):
    strat = _strategy(tmp_path, **{"min-clients": 1})
    extra = RecordDict({"metrics": MetricRecord({**_FULL, "num-test": 3, "evil": [1e300]})})
    strat.ordered(_Grid({11: extra}))
    assert strat.clients.info == {11: {**_FULL, "num-test": 3}}  # "evil" is dropped
    assert all(type(v) is int for v in strat.clients.info[11].values())


def test_when_every_node_sends_a_malformed_reply_the_run_stops_at_once(
        tmp_path, server_process):
    strat = _strategy(tmp_path, **{"min-clients": 2, "round-timeout": 600.0})
    start = time.monotonic()
    with pytest.raises(TooFewClients, match="every connected client failed.*'client-key' = nan"):
        strat.ordered(_Grid({11: MALFORMED["key nan"][0], 22: MALFORMED["key nan"][0]}))
    assert time.monotonic() - start < 10


def test_with_node_authentication_a_key_belongs_to_its_first_node_for_the_run(
        tmp_path, server_process, caplog):
    strat = _strategy(tmp_path, **{"min-clients": 1, "node-authentication": True})
    grid = _Grid({11: 5, 22: 5, 33: 6})
    assert strat.ordered(grid).get_node_ids() == [11, 33]
    assert "node 22 claims client key 5, which is bound to node 11" in caplog.text
    asked = len(grid.asked)
    assert strat.ordered(grid).get_node_ids() == [11, 33]
    assert len(grid.asked) == asked  # the spoofer is not asked again
    del grid.keys[11]  # the owner leaves: its key stays its own
    assert strat.ordered(grid).get_node_ids() == [33]
    grid.keys[44] = 5  # a newcomer claiming it is refused too
    assert strat.ordered(grid).get_node_ids() == [33]
    assert "node 44 claims client key 5, which is bound to node 11" in caplog.text
    grid.keys[11] = 5  # the owner reconnects (same node id): its key back
    assert strat.ordered(grid).get_node_ids() == [11, 33]
    assert strat.clients.keys[11] == 5
    assert caplog.text.count("node 22 claims") == 1  # logged once for the whole run
    assert strat.clients.bindings() == {5: 11, 6: 33}


def test_bindings_survive_a_resume_through_json(tmp_path, server_process, caplog):
    first = _strategy(tmp_path, **{"min-clients": 1, "node-authentication": True})
    first.ordered(_Grid({11: 5, 33: 6}))
    saved = json.loads(json.dumps(first.clients.bindings()))  # as a checkpoint keeps them
    resumed = _strategy(tmp_path, **{"min-clients": 1, "node-authentication": True,
                                     "run-name": "r2"})
    resumed.clients.restore_bindings(saved)
    assert resumed.clients.bindings() == {5: 11, 6: 33}
    # the spoofer now answers first: the binding, not the order, decides
    assert resumed.ordered(_Grid({22: 5, 11: 5, 33: 6})).get_node_ids() == [11, 33]
    assert "node 22 claims client key 5, which is bound to node 11" in caplog.text


@pytest.mark.parametrize("saved", [{"x": 1}, {"-1": 3}, {"5": True}, {"5": "²"},
                                   {str(2**62): 1}, {"5": 2**64}])
def test_restoring_malformed_bindings_is_refused(saved, tmp_path):
    strat = _strategy(tmp_path, **{"node-authentication": True})
    with pytest.raises(ValueError, match="client-key binding"):
        strat.clients.restore_bindings(saved)


def test_without_node_authentication_no_key_is_bound(tmp_path, server_process):
    strat = _strategy(tmp_path, **{"min-clients": 1})
    grid = _Grid({11: 5, 22: 5})
    assert strat.ordered(grid).get_node_ids() == [11]
    del grid.keys[11]  # a connected node's claim is trusted once the key is free
    assert strat.ordered(grid).get_node_ids() == [22]
    assert strat.clients.bindings() == {}


_VALUES = st.one_of(
    st.integers(min_value=-2**64, max_value=2**64), st.floats(), st.booleans(), st.text(max_size=8),
    st.binary(max_size=4), st.lists(st.integers(), max_size=3), st.lists(st.floats(), max_size=3),
    st.lists(st.booleans(), max_size=2), st.none())
_NAMES = st.one_of(st.sampled_from(["client-key", "num-train", "channels", "size",
                                    "num-classes", "num-test"]), st.text(max_size=8))
_RECORDS = st.builds(lambda kind, values: _smuggled(values, kind)["metrics"],
                     st.sampled_from([MetricRecord, ConfigRecord]),
                     st.dictionaries(_NAMES, _VALUES, max_size=7))
_CONTENTS = st.one_of(
    st.builds(lambda name, record: RecordDict({name: record}),
              st.one_of(st.just("metrics"), st.text(min_size=1, max_size=8)), _RECORDS),
    st.builds(lambda values: _smuggled({**_FULL, **values}),  # one field off
              st.dictionaries(_NAMES, _VALUES, min_size=1, max_size=2)))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_CONTENTS, min_size=1, max_size=3), st.booleans())
def test_random_identify_replies_never_raise_and_never_displace_the_honest(
        server_process, contents, authenticated):
    reg = ClientRegistry(load_config({"min-clients": 2, "round-timeout": 5.0,
                                      "node-authentication": authenticated}))
    hostile = {100 + i: c for i, c in enumerate(contents)}
    grid = _Grid({11: 5, 22: 3, **hostile})
    for _ in range(2):
        ids = reg.ordered(grid).get_node_ids()
        assert {11, 22} <= set(ids)
        assert ids == sorted(ids, key=lambda n: (reg.keys[n], n))
        for node in hostile:
            assert (node in ids) == (node in reg.keys and node not in reg.errors)
        for info in reg.info.values():
            assert set(_FULL) <= set(info) <= {*_FULL, "num-test"}
            assert all(type(v) is int for v in info.values())
    assert reg.keys[11] == 5 and reg.keys[22] == 3
