"""Who takes part in a round and what they are sent: the seeded sample of the clients (in
client-key order, so the same seed samples the same clients although Flower's node ids
are random), the meme as it goes down, the messages. Pure functions of the config, the
round and the ordered node ids; nothing here touches a grid or records results.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common.config import Config
from common.options import ClientSampling, DownCompression
from common.records import MEME
from common.runtime import derive_seed


def sampling_seed(cfg: Config, kind: str, rnd: int) -> int:
    """The seed of this round's sample of ``kind``: from ``seed``, except under DP with
    sampling.

    DP's ε with ``fraction-train`` < 1 counts on amplification by subsampling, which holds
    only if nobody can predict who is sampled: then each round draws from the OS's secure
    source (and the run is no longer reproducible from ``seed``).
    """
    train = kind == MessageType.TRAIN
    if train and cfg.dp_mode.enabled and cfg.fraction_train < 1:
        return secrets.randbits(256)
    return derive_seed(cfg.seed, "sample-train" if train else "sample-evaluate", rnd)


def sample(cfg: Config, kind: str, rnd: int, ids: list[int]) -> list[int]:
    """Round ``rnd``'s clients of ``kind`` among ``ids`` (connected, in key order): the
    share ``fraction-train`` / ``fraction-evaluate`` (at least ``min-clients``), drawn at
    random with the round's seed or, under ``client-sampling = "cyclic"``, as the next
    stretch of the passes (:func:`cyclic_sample`). Training and evaluation walk the same
    cyclic sequence: with equal shares, a round evaluates the clients it trained."""
    share = cfg.fraction_train if kind == MessageType.TRAIN else cfg.fraction_evaluate
    k = min(max(int(len(ids) * share), cfg.min_clients), len(ids))
    if cfg.client_sampling is ClientSampling.CYCLIC:
        return cyclic_sample(ids, k, rnd, lambda p: derive_seed(cfg.seed, "cycle", p))
    return random.Random(sampling_seed(cfg, kind, rnd)).sample(ids, k)


def cyclic_sample(ids: list[int], k: int, server_round: int,
                  pass_seed: Callable[[int], int]) -> list[int]:
    """Round ``server_round``'s ``k`` clients under ``client-sampling = "cyclic"``.

    The clients (``ids``, in key order) are laid out as pass after pass, each pass a
    shuffle seeded by ``pass_seed(pass)``, and round r takes the next k of that sequence;
    so every client is sampled once per pass, and a round that straddles two passes skips
    the clients it already has.
    """
    n = len(ids)
    k = min(k, n)
    chosen: list[int] = []
    shuffles: dict[int, list[int]] = {}
    pos = (server_round - 1) * k
    while len(chosen) < k:
        pass_no, i = divmod(pos, n)
        if pass_no not in shuffles:
            shuffles[pass_no] = random.Random(pass_seed(pass_no)).sample(range(n), n)
        node = ids[shuffles[pass_no][i]]
        if node not in chosen:
            chosen.append(node)
        pos += 1
    return chosen


def downlink(cfg: Config, arrays: ArrayRecord) -> ArrayRecord:
    """The meme as it goes down: with ``compression-down = "fp16"`` its floating arrays in
    half precision (clients load them into their float32 models)."""
    if cfg.compression_down is DownCompression.NONE:
        return arrays
    half = {}
    for k, a in arrays.items():
        v = a.numpy()
        half[k] = Array(v.astype(np.float16)) if v.dtype.kind == "f" else a
    return ArrayRecord(half)


def messages(kind: str, rnd: int, arrays: ArrayRecord, config: ConfigRecord,
             nodes: list[int], extra: dict[int, dict[str, ArrayRecord]] | None = None,
             ) -> list[Message]:
    """One message of ``kind`` per node, each with the meme and the round's config, and
    the records ``extra`` holds for that node (co-distillation's teachers)."""
    config["server-round"] = rnd
    record = RecordDict({MEME: arrays, "config": config})
    return [Message(content=RecordDict({MEME: arrays, "config": config, **extra[n]})
                    if extra and n in extra else record, message_type=kind, dst_node_id=n)
            for n in nodes]
