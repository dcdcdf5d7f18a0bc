"""The private local model's life on a node: built once, kept in ``context.state``.

``context.state`` persists per node across the rounds of one run (in simulation and in
deployment). The private model and its optimizer state are stored there after every
training round and never put in a reply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import nn

from common.config import Config
from common.models import MODEL_NAMES, TaskSpec, build_model
from common.mutual import make_optimizer
from common.records import load_into, optimizer_from_records, optimizer_to_records, to_record
from common.runtime import derive_seed

_MODEL, _OPTIM, _OPTIM_SCALARS, _META = (
    "private-model", "private-optimizer", "private-optimizer-scalars", "private-meta",
)


@dataclass(frozen=True)
class NodeInfo:
    """What a node knows about itself: its partition (simulation), its model, its data."""

    partition_id: int | None
    num_partitions: int
    local_model: str
    data_path: str

    @property
    def client_key(self) -> int:
        """A run-independent identity used to order clients deterministically."""
        if self.partition_id is not None:
            return self.partition_id
        return derive_seed("data-path", self.data_path) % 2**53


def node_info(cfg: Config, context: Context) -> NodeInfo:
    """Read the node config; a node-config ``local-model`` overrides the run config."""
    nc = context.node_config
    pid = nc.get("partition-id")
    pid = int(pid) if pid is not None else None
    local_model = str(nc.get("local-model", "")) or cfg.local_model_for(pid)
    if local_model not in MODEL_NAMES:
        raise ValueError(f"node-config key 'local-model' = {local_model!r} is invalid: "
                         f"expected one of {', '.join(MODEL_NAMES)}")
    return NodeInfo(pid, int(nc.get("num-partitions", 1)), local_model,
                    str(nc.get("data-path", "")) or cfg.data_path)


@dataclass
class PrivateModel:
    """The private model with its optimizer, and the last round it was trained in."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    arch: str
    round: int


def restore(context: Context, cfg: Config, node: NodeInfo, spec: TaskSpec,
            device: torch.device) -> PrivateModel:
    """The private model from ``context.state``, or a fresh seeded one on first contact."""
    torch.manual_seed(derive_seed(cfg.seed, "private-init", node.client_key))
    model = build_model(node.local_model, spec).to(device)
    optimizer = make_optimizer(model, cfg)
    state = context.state
    if _MODEL not in state:
        return PrivateModel(model, optimizer, node.local_model, 0)
    meta = state.config_records[_META]
    if meta["arch"] != node.local_model:
        raise ValueError(f"the private model in this node's state is a '{meta['arch']}', but "
                         f"the node is configured for '{node.local_model}'")
    load_into(model, state.array_records[_MODEL], what="private model in context.state")
    optimizer_from_records(optimizer, state.array_records[_OPTIM],
                           state.config_records[_OPTIM_SCALARS])
    return PrivateModel(model, optimizer, node.local_model, int(meta["round"]))


def store(context: Context, private: PrivateModel, server_round: int) -> None:
    """Keep the trained private model and its optimizer state for the next round."""
    arrays, scalars = optimizer_to_records(private.optimizer)
    context.state[_MODEL] = to_record(private.model.state_dict())
    context.state[_OPTIM] = arrays
    context.state[_OPTIM_SCALARS] = scalars
    context.state[_META] = ConfigRecord({"arch": private.arch, "round": server_round})


def stored_model(context: Context) -> ArrayRecord | None:
    """The stored private weights (for tests and audits), or None before the first round."""
    return context.state.array_records.get(_MODEL)
