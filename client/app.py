"""ClientApp: unpack the message, train or evaluate with ``common``, pack the reply.

The reply to a train message holds the meme's arrays and scalar metrics, nothing else:
the private model stays in ``context.state``. What wraps the train handler are mods
(``client/mods.py``, ``client/secure.py``): SecAgg+ and its legacy records, DP clipping,
injected faults, the wire audit.
"""

from __future__ import annotations

from functools import partial

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from client import private
from client.mods import audit_mod, compress_mod, dp_clip_mod, fault_mod, secure_mod
from client.secure import legacy_mod
from common.config import Config, load_config
from common.data import ClientData, load_client_data
from common.models import TaskSpec, build_model
from common.options import Precision
from common.profiling import phase
from common.records import load_into, to_record
from common.runtime import derive_seed, resolve_device
from common.training import (
    Hyper,
    TrainStats,
    evaluate,
    evaluate_mixture,
    make_optimizer,
    train_epochs,
)

app = ClientApp(mods=[audit_mod])

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


def _meme(cfg: Config, spec: TaskSpec, arrays: ArrayRecord, device: torch.device) -> nn.Module:
    """The meme as received from the server, strictly loaded."""
    meme = build_model(cfg.meme_model, spec)
    load_into(meme, arrays, what="meme received from the server")
    return meme.to(device)


def _hyper(cfg: Config, config: ConfigRecord, priv: private.PrivateModel | None) -> Hyper:
    """This update's hyper-parameters: distillation only for ``fml``, and not while the
    private model warms up on the labels alone."""
    algo = cfg.algorithm
    warming_up = priv is not None and priv.node_round < cfg.warmup_rounds
    return Hyper(alpha=cfg.alpha if algo.distills and not warming_up else 1.0,
                 beta=cfg.beta if algo.distills else 1.0, temperature=cfg.temperature,
                 proximal_mu=float(config.get("proximal-mu", 0.0)),
                 batch_size=cfg.batch_size, epochs=cfg.local_epochs, distill=cfg.distill,
                 mix=priv.mix if cfg.personal_mix and priv is not None else None,
                 mix_lr=cfg.lr,
                 autocast=torch.bfloat16 if cfg.precision is Precision.BF16 else None,
                 compile=cfg.torch_compile)


def _train_metrics(stats: TrainStats) -> dict[str, float | int]:
    """The reply's scalars: sample count, skipped steps, each trained model's loss/accuracy."""
    metrics: dict[str, float | int] = {"num-examples": stats.num_examples,
                                       "skipped-steps": stats.skipped_steps}
    if stats.loss_local is not None:
        metrics.update({"train-loss-local": stats.loss_local, "train-acc-local": stats.acc_local})
    if stats.loss_meme is not None:
        metrics.update({"train-loss-meme": stats.loss_meme, "train-acc-meme": stats.acc_meme})
    if stats.mix is not None:
        metrics["mix-weight"] = stats.mix
    return metrics


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


@app.train(mods=[secure_mod, legacy_mod, compress_mod, dp_clip_mod, fault_mod])
def train(msg: Message, context: Context) -> Message:
    """One local update: restore the private model, train it with the meme, reply the meme."""
    cfg = load_config(context.run_config)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    spec = _task_spec(config)
    node = private.node_info(cfg, context)
    step = partial(phase, "client", server_round=server_round, client=node.client_key)
    with step("train.data"):
        data = _client_data(cfg, node, spec)
    device = resolve_device(cfg.device)
    algo = cfg.algorithm
    lineage = str(config.get("lineage", ""))
    with step("train.models-in"):
        meme = _meme(cfg, spec, msg.content["arrays"], device) if algo.trains_meme else None
        opt_meme = make_optimizer(meme, cfg) if meme is not None else None  # fresh each round
        priv = (private.restore(context, cfg, node, spec, device, lineage, server_round - 1)
                if algo.trains_local else None)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "shuffle", node.client_key,
                                                    server_round))
    with step("train.sgd", device=str(device)):
        stats = train_epochs(priv.model if priv else None, meme,
                             priv.optimizer if priv else None, opt_meme, data.x_train,
                             data.y_train, _hyper(cfg, config, priv), gen, device)
    with step("train.models-out"):
        if priv is not None:
            priv.mix = stats.mix if stats.mix is not None else priv.mix
            priv.node_round += 1
            priv.server_round, priv.lineage = server_round, lineage
            private.store(context, cfg, priv, node)
        arrays = to_record(meme.state_dict()) if meme is not None else ArrayRecord()
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(_train_metrics(stats))}),
                   reply_to=msg)


@app.evaluate()
def evaluate_both(msg: Message, context: Context) -> Message:
    """Both models on this client's own held-out split (personalised accuracy)."""
    cfg = load_config(context.run_config)
    config = msg.content["config"]
    spec = _task_spec(config)
    node = private.node_info(cfg, context)
    device = resolve_device(cfg.device)
    server_round = int(config["server-round"])
    step = partial(phase, "client", server_round=server_round, client=node.client_key)
    with step("evaluate.data"):
        data = _client_data(cfg, node, spec)
    metrics: dict[str, float | int] = {"num-examples": len(data.y_test)}
    with step("evaluate.models-in"):
        priv = (private.restore(context, cfg, node, spec, device, str(config.get("lineage", "")),
                                server_round)
                if cfg.algorithm.trains_local else None)
        meme = (_meme(cfg, spec, msg.content["arrays"], device) if cfg.algorithm.trains_meme
                else None)
    with step("evaluate.forward"):
        for name, model in (("local", priv.model if priv else None), ("meme", meme)):
            if model is not None:
                loss, acc = evaluate(model, data.x_test, data.y_test, device)
                metrics.update({f"{name}-loss": loss, f"{name}-accuracy": acc})
        if cfg.personal_mix:  # the client's personalised model: its mixture of the two
            loss, acc = evaluate_mixture(priv.model, meme, priv.mix, data.x_test, data.y_test,
                                         device)
            metrics.update({"mix-loss": loss, "mix-accuracy": acc, "mix-weight": priv.mix})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
