"""Partitioning of a labelled dataset across clients, with flwr-datasets' partitioners.

The partitioners run on an in-memory ``datasets.Dataset`` of (index, label) pairs, so no
data hub is touched and the images themselves never pass through Arrow.
"""

from __future__ import annotations

import numpy as np

from common.options import Partitioner


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: Partitioner,
    seed: int,
    dirichlet_alpha: float = 0.1,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
    """Split sample indices into ``num_partitions`` disjoint, seeded partitions.

    Returns one sorted int64 index array per partition. IID shuffles with the seed first
    (flwr-datasets' IidPartitioner shards contiguously); Dirichlet draws each client's
    label mix from Dir(alpha); pathological gives each client ``classes_per_client`` labels.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    labels = np.asarray(labels, dtype=np.int64)
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions}")
    if num_partitions > len(labels):
        raise ValueError(
            f"cannot split {len(labels)} samples into {num_partitions} partitions"
        )
    idx = np.arange(len(labels), dtype=np.int64)
    if partitioner is Partitioner.IID:
        idx = np.random.default_rng(seed).permutation(idx)
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner is Partitioner.DIRICHLET:
        part = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=dirichlet_alpha,
            min_partition_size=min(10, len(labels) // num_partitions), seed=seed,
        )
    else:
        num_classes = len(np.unique(labels))
        if classes_per_client > num_classes:
            raise ValueError(
                f"classes-per-client = {classes_per_client} but the dataset has only "
                f"{num_classes} classes"
            )
        part = PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic", seed=seed,
        )
    part.dataset = Dataset.from_dict({"idx": idx, "label": labels[idx]})
    try:
        return [np.sort(np.asarray(part.load_partition(p)["idx"], dtype=np.int64))
                for p in range(num_partitions)]
    except ValueError as exc:  # flwr-datasets: "... update the values of alpha ..." and kin
        raise ValueError(
            f"{partitioner.value} partitioning of {len(labels)} samples into {num_partitions} "
            f"partitions cannot be satisfied ({exc}); change run-config 'partitioner', "
            f"'dirichlet-alpha' (now {dirichlet_alpha}) or 'classes-per-client' (now "
            f"{classes_per_client}), or use fewer clients (num-supernodes, num-partitions)"
        ) from None


def train_test_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (train, test) positions; both non-empty when n >= 2."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    if n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
