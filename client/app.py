"""ClientApp: unpack the message, train or evaluate with ``common``, pack the reply.

The reply to a train message holds the meme's arrays and scalar metrics, nothing else:
the private model stays in ``context.state``. What wraps the train handler are mods
(``client/mods.py``, ``client/secure.py``): SecAgg+ and its legacy records, DP clipping,
injected faults, the wire audit.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from client import private
from client.mods import audit_mod, compress_mod, dp_clip_mod, fault_mod, secure_mod
from client.secure import legacy_mod
from client.teachers import teachers
from common.algorithms.base import PEER_SCORED, SCORED, client_evaluation, fit_split
from common.config import Config, load_config
from common.data import ClientData, load_client_data
from common.models import TaskSpec, build_model
from common.profiling import phase
from common.records import load_into, meme_record, to_record
from common.runtime import derive_seed, resolve_device
from common.training import TrainStats, evaluate, make_optimizer, train_epochs

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


def _received(cfg: Config, spec: TaskSpec, content: RecordDict,
              device: torch.device) -> dict[str, nn.Module]:
    """The shared models as received from the server, strictly loaded (by slot name)."""
    slot = cfg.algorithm.spec.shared
    if slot is None:
        return {}
    meme = build_model(cfg.meme_model, spec)
    load_into(meme, meme_record(content), what="meme received from the server")
    return {slot.name: meme.to(device)}


def _models(cfg: Config, context: Context, node: private.NodeInfo, spec: TaskSpec,
            content: RecordDict, device: torch.device, lineage: str, max_round: int,
            ) -> tuple[dict[str, nn.Module], private.PrivateModel | None]:
    """Every model of the algorithm's slots, in slot order: the shared ones as received,
    the private ones restored (a private model that never trained may start from what was
    received, as the algorithm says)."""
    algo = cfg.algorithm.spec
    received = _received(cfg, spec, content, device)
    own = algo.private_for(cfg)
    priv = (private.restore(context, cfg, node, spec, device, lineage, max_round, own)
            if own else None)
    if priv is not None and priv.node_round == 0 and received:
        algo.warm_start(cfg, priv.models, received)
    own = priv.models if priv is not None else {}
    return {s.name: own[s.name] if s.name in own else received[s.name]
            for s in algo.slots_for(cfg)}, priv


def _train_metrics(stats: TrainStats, mix: float | None) -> dict[str, float | int]:
    """The reply's scalars: sample count, skipped steps, each trained model's loss and
    accuracy (``train-loss-<slot>``, ``train-acc-<slot>``)."""
    metrics: dict[str, float | int] = {"num-examples": stats.num_examples,
                                       "skipped-steps": stats.skipped_steps}
    for name, loss in stats.losses.items():
        metrics.update({f"train-loss-{name}": loss,
                        f"train-acc-{name}": stats.accuracies[name]})
    if mix is not None:
        metrics["mix-weight"] = mix
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
    """One local update of the algorithm's models; reply the one it uploads (the meme)."""
    cfg = load_config(context.run_config)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    spec = _task_spec(config)
    node = private.node_info(cfg, context)
    algo = cfg.algorithm.spec
    step = partial(phase, "client", server_round=server_round, client=node.client_key)
    with step("train.data"):
        data = _client_data(cfg, node, spec)
    device = resolve_device(cfg.device)
    lineage = str(config.get("lineage", ""))
    with step("train.models-in"):
        models, priv = _models(cfg, context, node, spec, msg.content, device, lineage,
                               server_round - 1)
        optimizers = {name: priv.optimizers[name] if priv and name in priv.optimizers
                      else make_optimizer(model, cfg)  # shared: fresh each round
                      for name, model in models.items()}
        if algo.keeps_teachers:  # frozen: no optimizer (co-distillation)
            models.update(teachers(cfg, context, node, spec, msg.content, device, lineage))
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "shuffle", node.client_key,
                                                    server_round))
    hp = algo.hyper(cfg, config, priv.node_round if priv else 0, priv.mix if priv else 0.5)
    x, y, _, _ = fit_split(cfg, node.client_key, data.x_train, data.y_train)
    with step("train.sgd", device=str(device)):
        stats = train_epochs(models, optimizers, algo, x, y, hp, gen, device)
        solo = algo.solo_epochs(cfg)
        if solo and algo.shared is not None:  # the meme alone, the private models frozen
            name = algo.shared.name
            alone = train_epochs(models, {name: optimizers[name]}, algo, x, y,
                                 replace(hp, epochs=solo, mix=None), gen, device)
            stats = replace(stats, skipped_steps=stats.skipped_steps + alone.skipped_steps)
    with step("train.models-out"):
        if priv is not None:
            priv.mix = stats.mix if stats.mix is not None else priv.mix
            priv.node_round += 1
            priv.server_round, priv.lineage = server_round, lineage
            private.store(context, cfg, priv, node)
        up = algo.uploads(cfg, server_round)
        arrays = to_record(models[up].state_dict()) if up is not None else ArrayRecord()
    return Message(RecordDict({"arrays": arrays,
                               "metrics": MetricRecord(_train_metrics(stats, stats.mix))}),
                   reply_to=msg)


@app.evaluate()
def evaluate_both(msg: Message, context: Context) -> Message:
    """The algorithm's models on this client's own held-out split (personalised accuracy):
    ``local-*`` the client's own model, ``meme-*`` the shared one."""
    cfg = load_config(context.run_config)
    config = msg.content["config"]
    spec = _task_spec(config)
    node = private.node_info(cfg, context)
    device = resolve_device(cfg.device)
    server_round = int(config["server-round"])
    algo = cfg.algorithm.spec
    step = partial(phase, "client", server_round=server_round, client=node.client_key)
    with step("evaluate.data"):
        data = _client_data(cfg, node, spec)
    metrics: dict[str, float | int] = {"num-examples": len(data.y_test)}
    with step("evaluate.models-in"):
        models, priv = _models(cfg, context, node, spec, msg.content, device,
                               str(config.get("lineage", "")), server_round)
        ev = client_evaluation(cfg, node.client_key, data.x_train, data.y_train, device,
                               server_round)
        scored = algo.evaluated(models, ev)
    with step("evaluate.forward"):
        for name in (*SCORED, *PEER_SCORED):
            if name in scored:
                loss, acc = evaluate(scored[name], data.x_test, data.y_test, device)
                metrics.update({f"{name}-loss": loss, f"{name}-accuracy": acc})
        metrics.update(algo.extra_metrics(models, priv.mix if priv else None, data.x_test,
                                          data.y_test, ev))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
