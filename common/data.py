"""Each client's data: its partition of a built-in dataset or its own ``npz`` file, split
into train and test; the central test set and the task shape for the server.
Nothing here is ever put in a message: clients load their own share, the server the test set.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from common.atomic import atomic_write
from common.datasets import CACHE_DIR, ArrayDataset, DataError, load_dataset, normalise
from common.models import TaskSpec
from common.options import Partitioner
from common.partition import partition_indices, train_test_split
from common.schema import MAX_CLASSES

if TYPE_CHECKING:
    from common.config import Config

__all__ = ["MAX_CLASSES", "ClientData", "DataError", "central_test_set",
           "client_partition_indices", "dataset_spec", "load_client_data", "load_dataset",
           "load_npz", "resolve_data_path", "validation_split"]


@dataclass(frozen=True)
class ClientData:
    """One client's train and held-out test tensors (on the CPU)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    spec: TaskSpec


def validation_split(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_fit, y_fit, x_val, y_val): ``round(fraction·n)`` training examples (at least one,
    and one left to fit, where n ≥ 2) drawn with ``seed`` and held out of training, for an
    algorithm to choose on; ``fraction`` 0 holds out nothing. The same seed holds out the
    same examples every round."""
    n = len(y)
    k = min(max(round(fraction * n), 1), n - 1) if fraction > 0 and n >= 2 else 0
    if k == 0:
        return x, y, x[:0], y[:0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, fit = order[:k].sort().values, order[k:].sort().values
    return x[fit], y[fit], x[val], y[val]


# --------------------------------------------------------------------------- npz (own data)
def load_npz(path: str | os.PathLike, mean: Sequence[float] = (0.0,),
             std: Sequence[float] = (1.0,), num_classes: int = 0) -> ArrayDataset:
    """A node's own data: ``x`` (N,H,W | N,C,H,W | N,H,W,C), int ``y``; optional test arrays.

    Every node maps its pixels the same way, so the shared meme sees one input space:
    uint8 images are divided by 255, then ``(x - mean) / std`` with the federation-wide
    ``npz-mean`` / ``npz-std`` (one value, or one per channel). Loaded with
    ``allow_pickle=False``: an .npz may come from anywhere. Labels must lie in
    ``[0, num_classes)`` (run-config ``num-classes``; when 0, ``[0, MAX_CLASSES)``): the
    class count is taken from them, and one typo must not size the federation's models.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise DataError(f"data file {p} does not exist (run-config key 'data-path')")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"data file {p} is not a readable .npz archive: {exc}") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"data file {p} has no array '{key}' (found: {sorted(arrays)})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"data file {p}: 'x_test' and 'y_test' must come together")
    out = {}
    for split, (xk, yk) in {"train": ("x", "y"), "test": ("x_test", "y_test")}.items():
        if xk not in arrays:
            continue
        x, y = arrays[xk], arrays[yk]
        if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        if x.ndim not in (3, 4) or x.shape[-1] != x.shape[-2]:
            raise DataError(f"data file {p}: '{xk}' has shape {x.shape}; expected square "
                            "images shaped (N, H, W), (N, C, H, W) or (N, H, W, C)")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x):
            raise DataError(f"data file {p}: '{yk}' must be 1-D integer labels, one per "
                            f"image in '{xk}' ({len(x)}); found shape {y.shape}, {y.dtype}")
        if len(y) == 0:
            raise DataError(f"data file {p}: '{xk}' is empty")
        _check_labels(p, yk, y, num_classes)
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    channels = out["x_train"].shape[1] if out["x_train"].ndim == 4 else 1
    for name, values in (("npz-mean", mean), ("npz-std", std)):
        if len(values) not in (1, channels):
            raise DataError(f"data file {p} has {channels}-channel images, but run-config key "
                            f"'{name}' has {len(values)} values: expected 1 or {channels}")
    return normalise(out, ([*mean] * (channels // len(mean)), [*std] * (channels // len(std))))


def _check_labels(p: Path, key: str, y: np.ndarray, num_classes: int) -> None:
    """Every label in ``[0, bound)``, compared in the array's own integer dtype: a uint64
    label of 2**63 would wrap negative in the int64 the labels become."""
    bound = num_classes or MAX_CLASSES
    info = np.iinfo(y.dtype)
    bad = np.zeros(len(y), dtype=bool)
    if info.min < 0:
        bad |= y < 0
    if bound <= info.max:
        bad |= y >= y.dtype.type(bound)
    if bad.any():
        i = int(np.argmax(bad))
        where = (f"run-config key 'num-classes' = {num_classes}" if num_classes else
                 f"num-classes = 0 allows at most MAX_CLASSES = {MAX_CLASSES} classes")
        raise DataError(f"data file {p}: '{key}'[{i}] = {y[i].item()} is not a label: "
                        f"expected an integer in [0, {bound}) ({where})")


def resolve_data_path(template: str, partition_id: int | None) -> str:
    """``{partition-id}`` in a data path becomes the client's partition id."""
    if "{partition-id}" in template:
        if partition_id is None:
            raise DataError(f"data-path {template!r} uses {{partition-id}} but this node "
                            "has no partition-id in its node config")
        template = template.replace("{partition-id}", str(partition_id))
    return template


# --------------------------------------------------------------------------- per client
def _to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Own, writable, contiguous tensors (a memory-mapped slice is copied)."""
    return (torch.from_numpy(np.require(x, requirements=["C", "W", "O"])),
            torch.from_numpy(np.require(y, requirements=["C", "W", "O"])))


@functools.lru_cache(maxsize=8)
def _partitions(name: str, data_dir: str, num_partitions: int, partitioner: str, seed: int,
                dirichlet_alpha: float, classes_per_client: int) -> list[np.ndarray]:
    """Partition indices, computed once and kept on disk.

    A deployed SuperNode runs every message in a fresh process: without the disk cache each
    one would import flwr-datasets and re-partition (about 4 s for Fashion-MNIST here).
    The key covers the labels themselves and the flwr-datasets version.
    """
    ds = load_dataset(name, data_dir)
    key = hashlib.sha256(repr((name, num_partitions, partitioner, seed, dirichlet_alpha,
                               classes_per_client, version("flwr-datasets"))).encode()
                         + ds.y_train.tobytes()).hexdigest()[:32]
    path = CACHE_DIR / "partitions" / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            return [z[f"p{i}"] for i in range(num_partitions)]
    except (OSError, KeyError, ValueError):
        pass
    parts = partition_indices(ds.y_train, num_partitions, Partitioner(partitioner), seed,
                              dirichlet_alpha, classes_per_client)
    try:
        atomic_write(path, lambda f: np.savez(f, **{f"p{i}": p for i, p in enumerate(parts)}))
    except OSError:  # a read-only home only costs speed
        pass
    return parts


def client_partition_indices(cfg: Config, num_partitions: int) -> list[np.ndarray]:
    """All partitions of the built-in dataset's train set (cached per process)."""
    return _partitions(cfg.dataset, cfg.data_dir, num_partitions, cfg.partitioner.value,
                       cfg.seed, cfg.dirichlet_alpha, cfg.classes_per_client)


@functools.lru_cache(maxsize=4)
def _client_data_cached(cfg: Config, partition_id: int | None, num_partitions: int,
                        data_path: str) -> ClientData:

    split_seed = cfg.seed * 100_003 + (partition_id or 0)
    if cfg.dataset == "npz":
        if not data_path:
            raise DataError("dataset 'npz' but no data file: set 'data-path' in the run config "
                            "or in this node's --node-config")
        ds = load_npz(resolve_data_path(data_path, partition_id), cfg.npz_mean_values,
                      cfg.npz_std_values, cfg.num_classes)
        if ds.x_test is not None:
            x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
        else:
            tr, te = train_test_split(len(ds.y_train), cfg.test_fraction, split_seed)
            x_tr, y_tr, x_te, y_te = ds.x_train[tr], ds.y_train[tr], ds.x_train[te], ds.y_train[te]
    else:
        if partition_id is None:
            raise DataError(f"dataset '{cfg.dataset}' is split by partition, but this node's "
                            "config has no 'partition-id' (set it with --node-config)")
        if not 0 <= partition_id < num_partitions:
            raise DataError(f"partition-id {partition_id} is outside [0, {num_partitions})")
        ds = load_dataset(cfg.dataset, cfg.data_dir)
        idx = client_partition_indices(cfg, num_partitions)[partition_id]
        tr, te = train_test_split(len(idx), cfg.test_fraction, split_seed)
        x_tr, y_tr = ds.x_train[idx[tr]], ds.y_train[idx[tr]]
        x_te, y_te = ds.x_train[idx[te]], ds.y_train[idx[te]]
    if len(y_tr) == 0:
        raise DataError(f"client {partition_id} has no training samples")
    return ClientData(*_to_tensors(x_tr, y_tr), *_to_tensors(x_te, y_te), ds.spec)


def load_client_data(cfg: Config, partition_id: int | None, num_partitions: int,
                     data_path: str = "") -> ClientData:
    """The client's train/test split of its partition (or of its own .npz), cached per process.

    The split is seeded by (seed, partition id), so personalised accuracy is measured on a
    fixed share of the client's own distribution.
    """
    return _client_data_cached(cfg, partition_id, num_partitions, data_path or cfg.data_path)


def central_test_set(cfg: Config) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The dataset's global test set for the server's evaluation; None for ``npz``."""
    if cfg.dataset == "npz":
        return None
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    assert ds.x_test is not None and ds.y_test is not None
    return _to_tensors(ds.x_test, ds.y_test)


def dataset_spec(cfg: Config) -> TaskSpec | None:
    """The task shape of a built-in dataset; None for ``npz`` (the clients report it)."""
    return None if cfg.dataset == "npz" else load_dataset(cfg.dataset, cfg.data_dir).spec
