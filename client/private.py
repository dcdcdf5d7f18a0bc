"""The private local model's life on a node: in ``context.state``, and on disk if asked.

``context.state`` persists per node across the rounds of one run. With ``state-dir`` set
(run config, or the node's own node config) the private model, its optimizer state and its
round counters are also written after every training round, atomically, to
``<state-dir>/private-<client key>.pt``; the previous version is kept beside it as
``.prev.pt``. A restarted node, a new run of the same federation, or a resumed server run
continues from there. A file that is corrupt or from another architecture is refused with
an error naming it; only ``reset-private=true`` starts afresh (it ignores what was saved
before this run, not what this run saved).

With ``private-store="disk"`` the file is the only copy: nothing of the private model stays
in ``context.state``, which a simulation keeps in memory for every node it has ever run, so
a simulation's memory grows with the clients of a round instead of the population.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from torch import nn

from client.state_file import (
    FILE_FORMAT,
    PrivateStateError,
    cpu,
    load_arrays,
    pick_saved,
    read_state_file,
    save_arrays,
    write_atomic,
)
from common.algorithms.base import Slot
from common.config import Config
from common.models import TaskSpec, build_model
from common.options import MODEL_NAMES, PrivateStore
from common.records import load_into, optimizer_from_records, optimizer_to_records, to_record
from common.runtime import derive_seed
from common.training import make_optimizer

_MODEL, _OPTIM, _OPTIM_SCALARS, _META = (
    "private-model", "private-optimizer", "private-optimizer-scalars", "private-meta",
)
_NODE_KEY = "node-key"  # the file in the state folder, and the record in context.state


@dataclass(frozen=True)
class NodeInfo:
    """What a node knows about itself: its identity, partition, model, data and state folder."""

    partition_id: int | None
    num_partitions: int
    local_model: str
    data_path: str
    state_dir: str
    client_key: int

    @property
    def state_file(self) -> Path | None:
        """Where the private model is kept on disk; None without a ``state-dir``."""
        if not self.state_dir:
            return None
        return Path(self.state_dir).expanduser().resolve() / f"private-{self.client_key}.pt"


def node_info(cfg: Config, context: Context) -> NodeInfo:
    """Read the node config; its ``local-model``, ``data-path`` and ``state-dir`` win."""
    nc = context.node_config
    pid = nc.get("partition-id")
    pid = int(pid) if pid is not None else None
    local_model = str(nc.get("local-model", "")) or cfg.local_model_for(pid)
    if local_model not in MODEL_NAMES:
        raise ValueError(f"node-config key 'local-model' = {local_model!r} is invalid: "
                         f"expected one of {', '.join(MODEL_NAMES)}")
    state_dir = str(nc.get("state-dir", "")) or cfg.state_dir
    if cfg.private_store is PrivateStore.DISK and not state_dir:
        raise PrivateStateError("run-config key 'private-store' = 'disk' keeps the private "
                                "models in 'state-dir', which is empty: expected a folder "
                                "every client can write (run config, or the node's "
                                "--node-config state-dir)")
    return NodeInfo(pid, int(nc.get("num-partitions", 1)), local_model,
                    str(nc.get("data-path", "")) or cfg.data_path, state_dir,
                    client_key(context, pid, state_dir))


def client_key(context: Context, partition_id: int | None, state_dir: str) -> int:
    """The node's identity, unique per node and stable across its runs where it can be.

    In order: the node config's ``client-key``; its ``partition-id`` (simulation); a random
    key created once and kept in ``<state-dir>/node-key``; else a random key kept in
    ``context.state`` for this run. Never derived from the data path: two devices with the
    same path would share shuffling, initialisation and state file.
    """
    explicit = context.node_config.get("client-key")
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, int) or not (
                0 <= explicit < 2**53):
            raise ValueError(f"node-config key 'client-key' = {explicit!r} is invalid: "
                             "expected an integer in [0, 2^53)")
        return explicit
    if partition_id is not None:
        return partition_id
    if state_dir:
        path = Path(state_dir).expanduser().resolve() / _NODE_KEY
        if not path.exists():
            _create_once(path, f"{secrets.randbits(53)}\n".encode())
        text = path.read_text().strip()
        if not text.isdigit() or int(text) >= 2**53:
            raise PrivateStateError(f"node key file {path} holds {text[:40]!r}, expected "
                                    "one integer in [0, 2^53); remove it for a new key")
        return int(text)
    if _NODE_KEY not in context.state.config_records:
        context.state[_NODE_KEY] = ConfigRecord({"key": secrets.randbits(53)})
    return int(context.state.config_records[_NODE_KEY]["key"])


def _create_once(path: Path, data: bytes) -> None:
    """Write ``path`` complete, unless it exists: of two processes racing, the first wins
    and both then read its content (a hard link never replaces an existing file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class PrivateModel:
    """A client's private models (one per private slot of its algorithm) with their
    optimizers and the counters they share.

    ``node_round`` counts training rounds over the models' whole life (it goes on across
    runs); ``server_round`` and ``lineage`` say which round of which run trained them.
    """

    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    archs: dict[str, str]
    node_round: int = 0
    server_round: int = 0
    lineage: str = ""
    mix: float = 0.5  # personal-mix: the private model's weight in the client's mixture

    @property
    def model(self) -> nn.Module:
        """The first private model (``local``: the one results call the client's own)."""
        return next(iter(self.models.values()))

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return next(iter(self.optimizers.values()))


LOCAL_SLOT = Slot("local")


def _name(record: str, slot: str) -> str:
    """A slot's record name in ``context.state`` (``local`` keeps the original names)."""
    return record if slot == "local" else f"{record}/{slot}"


def restore(context: Context, cfg: Config, node: NodeInfo, spec: TaskSpec,
            device: torch.device, lineage: str = "", max_round: int | None = None,
            slots: Sequence[Slot] = (LOCAL_SLOT,)) -> PrivateModel:
    """The private models of ``slots``: from ``context.state``, else from disk, else fresh
    and seeded (each slot with its own seed).

    ``max_round`` is the newest server round of run ``lineage`` whose training the caller
    may see (round R's training sees R-1, its evaluation R): after a server resume, a node
    that had already trained an interrupted round uses the version from before it.
    """
    models, optimizers, archs = {}, {}, {}
    for slot in slots:
        torch.manual_seed(derive_seed(cfg.seed, "private-init", node.client_key)
                          if slot.name == "local"
                          else derive_seed(cfg.seed, "private-init", node.client_key, slot.name))
        archs[slot.name] = {"local": node.local_model, "meme": cfg.meme_model}.get(
            slot.arch, slot.arch)
        models[slot.name] = build_model(archs[slot.name], spec).to(device)
        optimizers[slot.name] = make_optimizer(models[slot.name], cfg)
    priv = PrivateModel(models, optimizers, archs)
    if cfg.private_store is PrivateStore.MEMORY and _META in context.state:
        meta = context.state.config_records[_META]
        for name, model in models.items():
            arch = meta.get(_name("arch", name))
            if arch != archs[name]:
                raise PrivateStateError(f"the private model '{name}' in this node's state is "
                                        f"a '{arch}', the node is configured for "
                                        f"'{archs[name]}'")
            load_into(model, context.state.array_records[_name(_MODEL, name)],
                      what=f"private model '{name}' in state")
            optimizer_from_records(optimizers[name],
                                   context.state.array_records[_name(_OPTIM, name)],
                                   context.state.config_records[_name(_OPTIM_SCALARS, name)])
        priv.node_round, priv.server_round = int(meta["node-round"]), int(meta["server-round"])
        priv.lineage = str(meta["lineage"])
        priv.mix = float(meta.get("mix", 0.5))
        return priv
    path = node.state_file
    if path is not None and (lineage or not cfg.reset_private):
        saved = pick_saved(path, lineage, max_round, this_run_only=cfg.reset_private)
        if saved is not None:
            _load_saved(priv, saved, path)
    return priv


def store(context: Context, cfg: Config, priv: PrivateModel, node: NodeInfo) -> None:
    """Keep the trained private models for the next round: in the node's state unless
    ``private-store`` is ``disk``, and on disk when a state folder is set."""
    if cfg.private_store is PrivateStore.MEMORY:
        meta = {"node-round": priv.node_round, "server-round": priv.server_round,
                "lineage": priv.lineage, "mix": priv.mix}
        for name, model in priv.models.items():
            arrays, scalars = optimizer_to_records(priv.optimizers[name])
            context.state[_name(_MODEL, name)] = to_record(model.state_dict())
            context.state[_name(_OPTIM, name)] = arrays
            context.state[_name(_OPTIM_SCALARS, name)] = scalars
            meta[_name("arch", name)] = priv.archs[name]
        context.state[_META] = ConfigRecord(meta)
    if node.state_file is not None:
        write_atomic(node.state_file, {
            "format": FILE_FORMAT, "node_round": priv.node_round,
            "server_round": priv.server_round, "lineage": priv.lineage, "mix": priv.mix,
            "models": {name: {"arch": priv.archs[name],
                              "model": {k: v.detach().cpu()
                                        for k, v in model.state_dict().items()},
                              "optimizer": cpu(priv.optimizers[name].state_dict())}
                       for name, model in priv.models.items()}})


def stored_model(context: Context, cfg: Config, node: NodeInfo,
                 slot: str = "local") -> dict[str, np.ndarray] | None:
    """The private weights of ``slot`` this node keeps (tests and audits), or None."""
    if cfg.private_store is PrivateStore.MEMORY:
        record = context.state.array_records.get(_name(_MODEL, slot))
        return {k: a.numpy() for k, a in record.items()} if record is not None else None
    path = node.state_file
    if path is None or not path.exists():
        return None
    saved = read_state_file(path)["models"].get(slot)
    return {k: v.numpy() for k, v in saved["model"].items()} if saved is not None else None


def _arrays_file(node: NodeInfo, name: str) -> Path:
    return Path(node.state_dir).expanduser().resolve() / f"{name}-{node.client_key}.npz"


def keep_arrays(context: Context, cfg: Config, node: NodeInfo, name: str,
                arrays: dict[str, np.ndarray], lineage: str) -> None:
    """Other per-node arrays the next round needs (top-k's residual), kept where the
    private model is: in the node's state, or beside the state file with ``disk``."""
    if cfg.private_store is PrivateStore.DISK:
        save_arrays(_arrays_file(node, name), arrays, lineage)
    else:
        context.state[name] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def kept_arrays(context: Context, cfg: Config, node: NodeInfo, name: str,
                lineage: str) -> dict[str, np.ndarray] | None:
    """What :func:`keep_arrays` kept in this run, or None."""
    if cfg.private_store is PrivateStore.DISK:
        return load_arrays(_arrays_file(node, name), lineage)
    record = context.state.array_records.get(name)
    return {k: a.numpy() for k, a in record.items()} if record is not None else None


def _load_saved(priv: PrivateModel, saved: dict, path: Path) -> None:
    for name, model in priv.models.items():
        entry = saved["models"].get(name)
        if entry is None:
            raise PrivateStateError(f"private state file {path} holds the models "
                                    f"{sorted(saved['models'])}, this algorithm needs '{name}'")
        if entry["arch"] != priv.archs[name]:
            raise PrivateStateError(f"private state file {path} holds a '{entry['arch']}' "
                                    f"model, this node is configured for '{priv.archs[name]}'")
        own = model.state_dict()
        for k, v in entry["model"].items():
            if k in own and tuple(v.shape) != tuple(own[k].shape):
                raise PrivateStateError(f"private state file {path}: '{k}' has shape "
                                        f"{tuple(v.shape)}, the model expects "
                                        f"{tuple(own[k].shape)}")
        try:
            model.load_state_dict(entry["model"], strict=True)
            priv.optimizers[name].load_state_dict(entry["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise PrivateStateError(f"private state file {path} does not fit the model: "
                                    f"{exc}") from None
    priv.node_round, priv.server_round = int(saved["node_round"]), int(saved["server_round"])
    priv.lineage = str(saved["lineage"])
    priv.mix = float(saved.get("mix", 0.5))  # files from before personal-mix: the default
