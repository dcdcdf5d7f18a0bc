"""ClientApp: unpack the message, train or evaluate with ``common``, pack the reply.

The reply to a train message holds the meme's arrays and scalar metrics, nothing else:
the private model stays in ``context.state``. With ``secure-aggregation`` the train
messages come in Flower's legacy ``fitins.*`` format (the SecAgg+ workflow's) and the
reply goes out as ``fitres.*``, masked by the SecAgg+ mod before it leaves.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.compat.common import recorddict_compat as compat
from flwr.compat.common.typing import Code, FitRes, Status

from client import private
from client.mods import audit_mod, dp_clip_mod, secure_mod
from common.config import Aggregation, Config, load_config
from common.data import ClientData, load_client_data
from common.faults import apply_to_update
from common.models import TaskSpec, build_model
from common.records import load_into, to_record
from common.runtime import derive_seed, resolve_device
from common.training import Hyper, evaluate, evaluate_mixture, make_optimizer, train_epochs

app = ClientApp(mods=[audit_mod])

#: record names of the SecAgg+ workflow's (legacy FitIns) train messages
_FITINS_ARRAYS, _FITINS_CONFIG = "fitins.parameters", "fitins.config"


def _task_spec(config: ConfigRecord) -> TaskSpec:
    return TaskSpec(int(config["channels"]), int(config["size"]), int(config["num-classes"]))


def _client_data(cfg: Config, node: private.NodeInfo, spec: TaskSpec) -> ClientData:
    data = load_client_data(cfg, node.partition_id, node.num_partitions, node.data_path)
    if (data.spec.channels, data.spec.size) != (spec.channels, spec.size):
        raise ValueError(f"this client's images are {data.spec.channels}x{data.spec.size}px, "
                         f"the federation's are {spec.channels}x{spec.size}px")
    top = max(int(data.y_train.max()), int(data.y_test.max()) if len(data.y_test) else 0)
    if top >= spec.num_classes:
        raise ValueError(f"this client has label {top}, outside the federation's "
                         f"{spec.num_classes} classes")
    return data


def _meme(cfg: Config, spec: TaskSpec, arrays: ArrayRecord, device: torch.device,
          positional: bool = False):
    """The meme as received; ``positional``: the SecAgg+ (legacy) records key the meme's
    floating arrays "0", "1", ... (its integer counters stay out of the masked vector)."""
    meme = build_model(cfg.meme_model, spec)
    if positional:
        state = meme.state_dict()
        keys = _secure_keys(state)
        if len(arrays) != len(keys):
            raise ValueError(f"meme received from the server has {len(arrays)} arrays, the "
                             f"'{cfg.meme_model}' meme has {len(keys)} floating arrays")
        arrays = ArrayRecord({k: (arrays[str(keys.index(k))] if k in keys
                                  else Array(state[k].numpy())) for k in state})
    load_into(meme, arrays, what="meme received from the server")
    return meme.to(device)


def _secure_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """What SecAgg+ sums: the floating arrays (weights and BatchNorm statistics)."""
    return [k for k, v in state.items() if v.is_floating_point()]


def _secure_reply(cfg: Config, state: dict[str, torch.Tensor], num_examples: int,
                  metrics: dict) -> RecordDict:
    """The legacy ``fitres.*`` reply the SecAgg+ mod masks (positional arrays + weight)."""
    limit = cfg.secagg_clipping_range
    state = {k: state[k] for k in _secure_keys(state)}
    for k, v in state.items():
        top = float(v.detach().abs().max()) if v.numel() else 0.0
        if not np.isfinite(top) or top > limit:
            raise ValueError(f"meme array '{k}' reaches {top:.4g}, outside "
                             f"secagg-clipping-range={limit:g}: SecAgg+ would clip it; "
                             "raise secagg-clipping-range")
    weight = 1 if cfg.aggregation is Aggregation.UNIFORM else num_examples
    params = compat.arrayrecord_to_parameters(to_record(state), keep_input=True)
    fitres = FitRes(Status(Code.OK, ""), params, weight, dict(metrics))
    return compat.fitres_to_recorddict(fitres, keep_input=True)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server who this node is (a stable key) and the shape of its data.

    The server orders and samples clients by this key, so runs are reproducible although
    Flower's node ids are random; with ``npz`` data it also learns the task shape here.
    """
    cfg = load_config(context.run_config)
    node = private.node_info(cfg, context)
    data = load_client_data(cfg, node.partition_id, node.num_partitions, node.data_path)
    top = max(int(data.y_train.max()), int(data.y_test.max()) if len(data.y_test) else 0)
    metrics = {"client-key": node.client_key, "channels": data.spec.channels,
               "size": data.spec.size, "num-classes": top + 1,
               "num-train": len(data.y_train), "num-test": len(data.y_test)}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train(mods=[secure_mod, dp_clip_mod])
def train(msg: Message, context: Context) -> Message:
    """One local update: restore the private model, train it with the meme, reply the meme."""
    cfg = load_config(context.run_config)
    secure = _FITINS_ARRAYS in msg.content.array_records
    config = msg.content[_FITINS_CONFIG if secure else "config"]
    received = msg.content[_FITINS_ARRAYS if secure else "arrays"]
    server_round = int(config["server-round"])
    spec = _task_spec(config)
    node = private.node_info(cfg, context)
    data = _client_data(cfg, node, spec)
    device = resolve_device(cfg.device)
    faults = [f for f in cfg.fault_list if f.applies(node.partition_id, server_round)]
    if any(f.kind == "raise" for f in faults):
        raise RuntimeError(f"injected fault: client {node.partition_id} raises in round "
                           f"{server_round} (run-config 'faults')")
    for fault in (f for f in faults if f.kind == "slow"):  # a straggler
        time.sleep(fault.seconds)

    algo = cfg.algorithm
    meme = _meme(cfg, spec, received, device, secure) if algo.trains_meme else None
    opt_meme = make_optimizer(meme, cfg) if meme is not None else None  # fresh every round
    lineage = str(config.get("lineage", ""))
    priv = (private.restore(context, cfg, node, spec, device, lineage, server_round - 1)
            if algo.trains_local else None)
    warming_up = priv is not None and priv.node_round < cfg.warmup_rounds
    hp = Hyper(alpha=cfg.alpha if algo.distills and not warming_up else 1.0,
               beta=cfg.beta if algo.distills else 1.0,
               temperature=cfg.temperature,
               proximal_mu=float(config.get("proximal-mu", 0.0)),
               batch_size=cfg.batch_size, epochs=cfg.local_epochs, distill=cfg.distill,
               mix=priv.mix if cfg.personal_mix and priv is not None else None, mix_lr=cfg.lr)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "shuffle", node.client_key,
                                                    server_round))
    stats = train_epochs(priv.model if priv else None, meme, priv.optimizer if priv else None,
                         opt_meme, data.x_train, data.y_train, hp, gen, device)
    if priv is not None:
        priv.mix = stats.mix if stats.mix is not None else priv.mix
        priv.node_round += 1
        priv.server_round, priv.lineage = server_round, lineage
        private.store(context, priv, node)

    metrics = {"num-examples": stats.num_examples, "skipped-steps": stats.skipped_steps}
    if priv is not None:
        metrics.update({"train-loss-local": stats.loss_local, "train-acc-local": stats.acc_local})
    if meme is not None:
        metrics.update({"train-loss-meme": stats.loss_meme, "train-acc-meme": stats.acc_meme})
    if stats.mix is not None:
        metrics["mix-weight"] = stats.mix
    if secure:
        return Message(_secure_reply(cfg, meme.state_dict(), stats.num_examples, metrics),
                       reply_to=msg)
    arrays = ArrayRecord()
    if meme is not None:
        state = meme.state_dict()
        for fault in faults:  # nan / scale: a broken or poisoning client (slow: no change)
            state = apply_to_update(fault, state, received.to_torch_state_dict())
        arrays = to_record(state)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


@app.evaluate()
def evaluate_both(msg: Message, context: Context) -> Message:
    """Both models on this client's own held-out split (personalised accuracy)."""
    cfg = load_config(context.run_config)
    config = msg.content["config"]
    spec = _task_spec(config)
    node = private.node_info(cfg, context)
    data = _client_data(cfg, node, spec)
    device = resolve_device(cfg.device)
    metrics: dict[str, float | int] = {"num-examples": len(data.y_test)}
    if cfg.algorithm.trains_local:
        priv = private.restore(context, cfg, node, spec, device, str(config.get("lineage", "")),
                               int(config["server-round"]))
        loss, acc = evaluate(priv.model, data.x_test, data.y_test, device)
        metrics.update({"local-loss": loss, "local-accuracy": acc})
    if cfg.algorithm.trains_meme:
        meme = _meme(cfg, spec, msg.content["arrays"], device)
        loss, acc = evaluate(meme, data.x_test, data.y_test, device)
        metrics.update({"meme-loss": loss, "meme-accuracy": acc})
    if cfg.personal_mix:  # the client's personalised model: its mixture of the two
        loss, acc = evaluate_mixture(priv.model, meme, priv.mix, data.x_test, data.y_test,
                                     device)
        metrics.update({"mix-loss": loss, "mix-accuracy": acc, "mix-weight": priv.mix})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
