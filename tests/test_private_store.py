"""``private-store = "disk"``: the private model (and top-k's residual) live only in the
state folder. The reference is the memory store, which the rest of the suite tests: the
same messages must give the same weights, replies and metrics, bit for bit."""


import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from client import app as client_app
from client import private
from client.mods import RESIDUAL, compress_mod
from client.state_file import read_state_file
from common.compression import decode
from common.config import load_config
from common.models import TaskSpec, build_model
from common.options import Codec, Compression
from common.records import to_record
from tests.conftest import make_context, make_message, task_config

RUN = {"dataset": "digits", "meme-model": "mlp", "local-model": "cnn", "batch-size": 16}
SPEC = TaskSpec(1, 8, 10)


def _config(server_round: int, lineage: str = "run-a") -> ConfigRecord:
    config = task_config(1, 8, 10, server_round)
    config["lineage"] = lineage
    return config


def _meme(seed: int) -> dict:
    torch.manual_seed(seed)
    return build_model("mlp", SPEC).state_dict()


def _rounds(ctx, rounds, lineage="run-a"):
    """Train then evaluate ``rounds`` times; the replies' arrays and metrics."""
    out = []
    for r in range(1, rounds + 1):
        meme = to_record(_meme(r))  # a different meme each round, as after aggregation
        train = client_app.train(make_message(RecordDict(
            {"arrays": meme, "config": _config(r, lineage)})), ctx)
        ev = client_app.evaluate_both(make_message(RecordDict(
            {"arrays": meme, "config": _config(r, lineage)}), MessageType.EVALUATE), ctx)
        out.append(({k: a.numpy().copy() for k, a in train.content["arrays"].items()},
                    dict(train.content["metrics"]), dict(ev.content["metrics"])))
    return out


def _kept(ctx):
    cfg = load_config(ctx.run_config)
    return private.stored_model(ctx, cfg, private.node_info(cfg, ctx))


def test_disk_store_trains_exactly_like_memory_and_keeps_nothing_in_memory(tmp_path):
    mem = make_context(RUN)
    disk = make_context({**RUN, "private-store": "disk", "state-dir": str(tmp_path)})
    ref, got = _rounds(mem, 3), _rounds(disk, 3)
    for (arr_m, train_m, ev_m), (arr_d, train_d, ev_d) in zip(ref, got, strict=True):
        assert train_m == train_d and ev_m == ev_d  # losses and accuracies, both models
        assert arr_m.keys() == arr_d.keys()
        assert all(np.array_equal(arr_m[k], arr_d[k]) for k in arr_m)
    assert 0 < ev_d["local-accuracy"] <= 1
    # the private model's weights agree, and they are not the meme's (a cnn vs an mlp)
    km, kd = _kept(mem), _kept(disk)
    assert km.keys() == kd.keys() and kd["0.0.weight"].ndim == 4
    assert all(np.array_equal(km[k], kd[k]) for k in km)
    # memory holds the model in the memory store, nothing of it in the disk store
    assert "private-model" in mem.state.array_records
    assert not disk.state.array_records and "private-meta" not in disk.state.config_records
    node = private.node_info(load_config(disk.run_config), disk)
    saved = read_state_file(tmp_path / f"private-{node.client_key}.pt")
    assert saved["node_round"] == 3 and saved["server_round"] == 3
    assert saved["lineage"] == "run-a"
    assert saved["models"]["local"]["optimizer"]["state"]  # momentum kept, as in memory


def test_disk_store_without_a_state_folder_names_both_keys():
    ctx = make_context({**RUN, "private-store": "disk"})
    cfg = load_config(ctx.run_config)
    with pytest.raises(private.PrivateStateError, match=r"'private-store' = 'disk'.*'state-dir'"):
        private.node_info(cfg, ctx)
    with pytest.raises(Exception, match="private-store"):  # identify fails the same way
        client_app.identify(make_message(RecordDict({}), MessageType.QUERY), ctx)


def test_reset_private_ignores_other_runs_but_keeps_this_one(tmp_path):
    run = {**RUN, "private-store": "disk", "state-dir": str(tmp_path)}
    _rounds(make_context(run), 2, lineage="old-run")
    ctx = make_context({**run, "reset-private": True})
    cfg = load_config(ctx.run_config)
    node = private.node_info(cfg, ctx)
    # the old run's model is there, but a reset run starts afresh ...
    assert read_state_file(node.state_file)["node_round"] == 2
    fresh = private.restore(ctx, cfg, node, SPEC, torch.device("cpu"), "new-run", 0)
    assert fresh.node_round == 0
    # ... equal to a node that never trained (same seed, same initialisation)
    never = private.restore(make_context(RUN), load_config(RUN), private.node_info(
        load_config(RUN), make_context(RUN)), SPEC, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(),
                                                   never.model.parameters(), strict=True))
    # and continues its own run's model from round to round
    _rounds(ctx, 2, lineage="new-run")
    assert read_state_file(node.state_file)["node_round"] == 2
    assert read_state_file(node.state_file)["lineage"] == "new-run"
    # an unreadable old file is replaced, not an error, when resetting
    node.state_file.write_bytes(b"not a state file")
    node.state_file.with_suffix(".prev.pt").unlink()
    assert private.restore(ctx, cfg, node, SPEC, torch.device("cpu"), "third-run",
                           0).node_round == 0
    # without reset the same file is refused, naming it
    plain_cfg = load_config(run)
    with pytest.raises(private.PrivateStateError, match=r"private-\d+\.pt is corrupt"):
        private.restore(make_context(run), plain_cfg, node, SPEC, torch.device("cpu"))


def _topk_round(ctx, trained, lineage="run-a"):
    received = np.ones(4, np.float32)
    msg = make_message(RecordDict({"arrays": ArrayRecord({"w": Array(received)}),
                                   "config": _config(1, lineage)}))

    def handler(m, c):
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(trained)}),
                                   "metrics": MetricRecord({"num-examples": 4})}), reply_to=m)

    arrays = compress_mod(msg, ctx, handler).content["arrays"]
    return decode({k: a.numpy() for k, a in arrays.items()}, {"w": ((4,), np.dtype(np.float32))},
                  Codec(Compression.TOPK, ratio=0.5))["w"]


def test_topk_residual_is_kept_on_disk_for_this_run_only(tmp_path):
    ctx = make_context({"compression": "topk", "compression-ratio": 0.5,
                        "private-store": "disk", "state-dir": str(tmp_path)})
    first = np.array([1.1, -2.0, 3.0, 1.5], np.float32)  # update .1, -3, 2, .5
    second = np.array([1.25, 1.0, 1.0, 1.1], np.float32)  # update .25, 0, 0, .1
    # -3 and 2 go, in int8 steps of 3/127 (2 -> 85 steps)
    np.testing.assert_allclose(_topk_round(ctx, first), [0, -3, 85 * 3 / 127, 0], rtol=1e-5)
    assert not ctx.state.array_records  # the residual went to disk
    (kept,) = tmp_path.glob(f"{RESIDUAL}-*.npz")
    with np.load(kept, allow_pickle=False) as z:
        np.testing.assert_allclose(z["w"], [0.1, 0.0, 2 - 85 * 3 / 127, 0.5], rtol=1e-4)
    # the next round adds it: .25 + .1 and .1 + .5, in steps of .6/127 (by hand)
    np.testing.assert_allclose(_topk_round(ctx, second), [74 * 0.6 / 127, 0, 0, 0.6],
                               rtol=1e-5)
    # another run does not inherit it: the plain top 2 of (.25, 0, 0, .1), steps of .25/127
    other = make_context(dict(ctx.run_config))
    np.testing.assert_allclose(_topk_round(other, second, lineage="run-b"),
                               [0.25, 0, 0, 51 * 0.25 / 127], rtol=1e-5)


def test_state_dir_from_the_node_config_serves_the_disk_store(tmp_path):
    ctx = make_context({**RUN, "private-store": "disk"})
    ctx.node_config["state-dir"] = str(tmp_path / "node")
    _rounds(ctx, 1)
    files = sorted(p.name for p in (tmp_path / "node").iterdir())
    assert any(n.startswith("private-") and n.endswith(".pt") for n in files)
    assert not any(n.endswith(".tmp") for n in files)


def test_a_state_file_of_format_1_still_loads(tmp_path):
    """What the store wrote before K models were data (one model at the top level, format
    1) loads as the slot 'local', weights, optimizer and counters intact."""
    cfg = load_config({**RUN, "state-dir": str(tmp_path)})
    ctx = make_context({**RUN, "state-dir": str(tmp_path)})
    node = private.node_info(cfg, ctx)
    torch.manual_seed(11)
    model = build_model("cnn", SPEC)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()  # momentum buffers to keep
    torch.save({"format": 1, "arch": "cnn", "node_round": 4, "server_round": 4,
                "lineage": "old-run", "mix": 0.25, "model": model.state_dict(),
                "optimizer": opt.state_dict()}, node.state_file)
    priv = private.restore(ctx, cfg, node, SPEC, torch.device("cpu"))
    assert (priv.node_round, priv.server_round, priv.lineage, priv.mix) == (4, 4, "old-run",
                                                                           0.25)
    for k, v in model.state_dict().items():
        assert torch.equal(priv.models["local"].state_dict()[k], v)
    assert priv.optimizer.state_dict()["state"]


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_two_private_slots_are_stored_and_restored_each_with_its_own_architecture(
        tmp_path, store):
    """K models are data: a second private slot (here of the meme's architecture) goes to
    the same store beside 'local', comes back equal, and is refused as another model."""
    from common.algorithms.base import Slot

    run = {**RUN, "private-store": store, "state-dir": str(tmp_path)}
    cfg, ctx = load_config(run), make_context(run)
    node = private.node_info(cfg, ctx)
    slots = (Slot("local"), Slot("peer", arch="meme"))
    priv = private.restore(ctx, cfg, node, SPEC, torch.device("cpu"), "run-a", 0, slots)
    assert priv.archs == {"local": "cnn", "peer": "mlp"}
    with torch.no_grad():
        for m in priv.models.values():
            next(m.parameters()).add_(1.0)
    priv.node_round = priv.server_round = 1
    priv.lineage = "run-a"
    private.store(ctx, cfg, priv, node)
    back = private.restore(ctx, cfg, node, SPEC, torch.device("cpu"), "run-a", 1, slots)
    for name in ("local", "peer"):
        for k, v in priv.models[name].state_dict().items():
            assert torch.equal(back.models[name].state_dict()[k], v)
    assert private.stored_model(ctx, cfg, node, "peer").keys() == \
        priv.models["peer"].state_dict().keys()
    other = (Slot("local"), Slot("peer", arch="local"))  # the peer as a cnn now: refused
    with pytest.raises(private.PrivateStateError, match="'peer'|configured for 'cnn'"):
        private.restore(ctx, cfg, node, SPEC, torch.device("cpu"), "run-a", 1, other)
