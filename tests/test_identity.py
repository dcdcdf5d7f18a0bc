"""Who a node is: unique client keys, duplicates left out, and every server wait bounded."""

import time

import pytest
from flwr.app import Message, MessageType, Metadata, MetricRecord, RecordDict

from client import private
from common.config import load_config
from server.identity import TooFewClients, cyclic_sample
from server.results import RunLog
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


class _Grid:
    """Connected nodes and the key each reports; ``drop_after_query`` leave once asked."""

    def __init__(self, keys: dict[int, int], drop_after_query: tuple[int, ...] = ()) -> None:
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
            replies.append(Message(content=RecordDict({"metrics": MetricRecord(
                {"client-key": self.keys[node], "num-train": 10})}), metadata=meta))
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
