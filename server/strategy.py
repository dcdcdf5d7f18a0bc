"""The meme strategy: Flower's FedAvg / FedProx, made reproducible and meme-aware.

What it adds to Flower's strategy:
- clients are identified once (a QUERY message) by a stable key, and both sampling and
  aggregation order follow that key, so the same seed gives the same run although
  Flower's node ids are random;
- aggregation is sample-weighted or uniform, in float64, keeping each array's dtype;
- ``local`` (no meme) aggregates nothing;
- each round's bytes, client count and aggregated metrics go into the run log.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.supercore import log

from common.config import Aggregation, Algorithm, Config
from common.records import record_bytes
from common.runtime import derive_seed
from server.aggregate import weighted_average
from server.results import RunLog

_UNKNOWN_KEY = 2**62  # nodes that failed to identify sort last, by node id


class _OrderedGrid:
    """A view of the grid whose node ids come sorted by client key (for seeded sampling)."""

    def __init__(self, grid: Grid, order: list[int]) -> None:
        self._grid, self._order = grid, order

    def get_node_ids(self) -> list[int]:
        return list(self._order)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class MemeStrategyMixin:
    """Mixed in front of a Flower strategy (``class X(MemeStrategyMixin, FedAvg)``)."""

    def __init__(self, *, cfg: Config, run_log: RunLog, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.run_log = run_log
        self.client_keys: dict[int, int] = {}
        self.client_info: dict[int, MetricRecord] = {}

    # ------------------------------------------------------------------ identification
    def identify(self, grid: Grid) -> None:
        """Ask every not-yet-known connected node for its client key (one QUERY each)."""
        new = [n for n in grid.get_node_ids() if n not in self.client_keys]
        if not new:
            return
        msgs = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in new]
        answered = set()
        for reply in grid.send_and_receive(msgs, timeout=self.cfg.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d did not identify itself: %s", node, reply.error.reason)
                continue
            metrics = reply.content["metrics"]
            self.client_keys[node] = int(metrics["client-key"])
            self.client_info[node] = metrics
            answered.add(node)
        for node in new:
            self.client_keys.setdefault(node, _UNKNOWN_KEY + node % 2**61)

    def _ordered(self, grid: Grid) -> _OrderedGrid:
        self.identify(grid)
        ids = [n for n in grid.get_node_ids() if n in self.client_keys]
        return _OrderedGrid(grid, sorted(ids, key=lambda n: (self.client_keys[n], n)))

    def _sort_replies(self, replies: Iterable[Message]) -> list[Message]:
        def key(m: Message) -> tuple[int, int]:
            node = m.metadata.src_node_id
            return self.client_keys.get(node, _UNKNOWN_KEY), node

        return sorted(replies, key=key)

    # ------------------------------------------------------------------ configure
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's sampling over clients ordered by key, with a per-round seed."""
        self.run_log.begin_round(server_round)
        ordered = self._ordered(grid)
        random.seed(derive_seed(self.cfg.seed, "sample-train", server_round))
        msgs = list(super().configure_train(server_round, arrays, config, ordered))
        self.run_log.add("bytes_down", len(msgs) * record_bytes(arrays))
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """As :meth:`configure_train`, for the evaluation messages."""
        ordered = self._ordered(grid)
        random.seed(derive_seed(self.cfg.seed, "sample-evaluate", server_round))
        msgs = list(super().configure_evaluate(server_round, arrays, config, ordered))
        self.run_log.add("bytes_down", len(msgs) * record_bytes(arrays))
        return msgs

    # ------------------------------------------------------------------ aggregate
    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the memes (weighted or uniform) in client-key order; record the round."""
        valid, _ = self._check_and_log_replies(self._sort_replies(replies), is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        memes = [next(iter(c.array_records.values())) for c in contents]
        self.run_log.add("bytes_up", sum(record_bytes(r) for r in memes))
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        self.run_log.set(num_clients=len(valid),
                         train_loss_local=metrics.get("train-loss-local"),
                         train_loss_meme=metrics.get("train-loss-meme"))
        if not self.cfg.algorithm.trains_meme:
            return None, metrics
        if self.cfg.aggregation is Aggregation.UNIFORM:
            weights = [1.0] * len(contents)
        else:
            weights = [float(c.metric_records["metrics"][self.weighted_by_key])
                       for c in contents]
        states = [{k: a.numpy() for k, a in r.items()} for r in memes]
        avg = weighted_average(states, weights)
        return ArrayRecord({k: Array(v) for k, v in avg.items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        """Sample-weighted client accuracies, recorded as local/meme accuracy."""
        metrics = super().aggregate_evaluate(server_round, self._sort_replies(replies))
        if metrics is not None:
            self.run_log.set(local_accuracy=metrics.get("local-accuracy"),
                             meme_accuracy=metrics.get("meme-accuracy"))
        return metrics


class MemeFedAvg(MemeStrategyMixin, FedAvg):
    """FML, FedAvg and local-only: Flower's FedAvg carrying the meme."""


class MemeFedProx(MemeStrategyMixin, FedProx):
    """FedProx: Flower's FedProx puts ``proximal-mu`` in every train config."""


def build_strategy(cfg: Config, run_log: RunLog) -> MemeStrategyMixin:
    """The strategy for ``cfg.algorithm`` (the one place algorithms map to strategies)."""
    common = dict(
        cfg=cfg, run_log=run_log,
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_clients, min_evaluate_nodes=cfg.min_clients,
        min_available_nodes=cfg.min_clients,
    )
    if cfg.algorithm is Algorithm.FEDPROX:
        return MemeFedProx(proximal_mu=cfg.proximal_mu, **common)
    return MemeFedAvg(**common)
