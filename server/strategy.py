"""The meme strategy: Flower's strategies, made reproducible, meme-aware and defensive.

What it adds to Flower's FedAvg / FedProx / FedMedian / FedTrimmedAvg / Krum:
- clients are identified once (a QUERY message) by a stable key; sampling and aggregation
  follow that key's order, so the same seed gives the same run although Flower's node ids
  are random;
- every reply passes :func:`server.validate.validate_update` before any aggregation mode sees
  it; rejected and failed replies are counted, and a round with no valid reply keeps the meme;
- ``weighted`` and ``uniform`` averaging run in float64 and keep each array's dtype; the
  robust modes are Flower's own; ``local`` (no meme) aggregates nothing;
- a round offset, so a resumed run continues the round numbers (and their seeds);
- ``secure-aggregation``: the sampled train messages go through Flower's SecAgg+ protocol
  (:mod:`server.secure`) instead of a plain send-and-receive.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)
from flwr.supercore import log

from common.config import Aggregation, Algorithm, Config
from common.records import record_bytes
from common.runtime import derive_seed
from server.aggregate import weighted_average
from server.results import RunLog
from server.secure import SecureAggregationFailed, SecureResult, secure_mean
from server.validate import Template, validate_update

_UNKNOWN_KEY = 2**62  # nodes that failed to identify sort last, by node id


class TooFewClients(RuntimeError):
    """Fewer than ``min-clients`` connected or answered within ``round-timeout``."""


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
        self.template: Template = {}
        self.round_offset = 0
        self.sent_train = 0
        self.client_keys: dict[int, int] = {}
        self.client_info: dict[int, MetricRecord] = {}
        self.current_arrays = ArrayRecord()  # the meme sent in the open round
        self.population = 0  # clients connected when the open round sampled
        self._secure_round: tuple[Grid, list[Message]] | None = None
        self._unidentified: set[int] = set()  # silent at identification: asked again
        self._duplicates: set[int] = set()  # reported a key another node has: left out

    # ------------------------------------------------------------------ identification
    def identify(self, grid: Grid, timeout: float | None = None) -> None:
        """Ask every not-yet-known connected node for its client key (one QUERY each).

        A node that stays silent past ``round-timeout`` (a slow cold start) sorts last by
        node id this round, which is not reproducible, and is asked again next round. A node
        that reports the key of another connected node is left out (two nodes with one key
        would share shuffling, initialisation and state file) and asked again next round."""
        live = list(grid.get_node_ids())
        new = [n for n in live if n not in self.client_keys or n in self._unidentified
               or n in self._duplicates]
        if not new:
            return
        msgs = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in new]
        answered = set()
        connected = set(live)
        holders = {k: n for n, k in self.client_keys.items() if n in connected}  # key -> node
        wait = self.cfg.round_timeout if timeout is None else timeout
        for reply in grid.send_and_receive(msgs, timeout=wait):
            node = reply.metadata.src_node_id
            answered.add(node)
            self._unidentified.discard(node)
            if reply.has_error():
                log(WARNING, "node %d did not identify itself: %s", node, reply.error.reason)
                continue
            metrics = reply.content["metrics"]
            key = int(metrics["client-key"])
            holder = holders.get(key)
            if holder is not None and holder != node:
                if node not in self._duplicates:
                    log(ERROR, "node %d reports client key %d, which node %d already has: it "
                        "is left out until that key is free. Give each node its own "
                        "'client-key' in --node-config, or its own state-dir", node, key,
                        holder)
                self._duplicates.add(node)
                self.client_keys.pop(node, None)
                continue
            self._duplicates.discard(node)
            self.client_keys[node] = key
            holders[key] = node
            self.client_info[node] = metrics
        for node in new:
            if node in self._duplicates:
                continue
            if node not in answered and node not in self._unidentified:
                log(WARNING, "node %d did not identify itself within round-timeout=%g s: it "
                    "is sampled by node id (not reproducible) until it does", node,
                    self.cfg.round_timeout)
                self._unidentified.add(node)
            self.client_keys.setdefault(node, _UNKNOWN_KEY + node % 2**61)

    def max_weight(self) -> float | None:
        """The cap on ``num-examples``: configured, else the largest train split reported
        at identification (before any training); None where weights do not count."""
        if self.cfg.aggregation is not Aggregation.WEIGHTED:
            return None
        if self.cfg.max_client_weight > 0:
            return float(self.cfg.max_client_weight)
        sizes = [int(m["num-train"]) for m in self.client_info.values()]
        return float(max(sizes)) if sizes else None

    def _wait_for_clients(self, grid: Grid, deadline: float) -> None:
        """Wait until ``deadline`` for ``min-clients`` connected nodes (Flower's own sampler
        would wait forever)."""
        last_log = 0.0
        while (n := len(list(grid.get_node_ids()))) < self.cfg.min_clients:
            now = time.monotonic()
            if now >= deadline:
                raise TooFewClients(
                    f"only {n} client(s) connected after waiting round-timeout="
                    f"{self.cfg.round_timeout:g} s, fewer than min-clients={self.cfg.min_clients}")
            if now - last_log >= 10:
                log(INFO, "waiting for clients: %d connected, min-clients=%d", n,
                    self.cfg.min_clients)
                last_log = now
            time.sleep(1)

    def ordered(self, grid: Grid) -> _OrderedGrid:
        """The identified connected nodes, in key order, once at least ``min-clients`` are.

        One ``round-timeout`` bounds the waiting and the identification together: nodes
        that drop out (or turn out to be duplicates) during identification send it back to
        waiting, never into Flower's sampler, which would loop forever on the frozen list."""
        deadline = time.monotonic() + self.cfg.round_timeout
        while True:
            self._wait_for_clients(grid, deadline)
            self.identify(grid, timeout=max(1.0, deadline - time.monotonic()))
            ids = [n for n in grid.get_node_ids() if n in self.client_keys]
            if len(ids) >= self.cfg.min_clients:
                return _OrderedGrid(grid, sorted(ids, key=lambda n: (self.client_keys[n], n)))
            if time.monotonic() >= deadline:
                raise TooFewClients(
                    f"only {len(ids)} identified client(s) after waiting round-timeout="
                    f"{self.cfg.round_timeout:g} s, fewer than min-clients={self.cfg.min_clients}")
            time.sleep(1)

    def sort_replies(self, replies: Iterable[Message]) -> list[Message]:
        def key(m: Message) -> tuple[int, int]:
            node = m.metadata.src_node_id
            return self.client_keys.get(node, _UNKNOWN_KEY), node

        return sorted(replies, key=key)

    # ------------------------------------------------------------------ configure
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's sampling over clients ordered by key, with a per-round seed."""
        rnd = server_round + self.round_offset
        self.run_log.begin_round(rnd)
        log(INFO, "fedmutual: round %d of %d", rnd, self.cfg.num_server_rounds)
        ordered = self.ordered(grid)
        self.population = len(ordered.get_node_ids())
        random.seed(self._sampling_seed("sample-train", rnd))
        msgs = list(super().configure_train(rnd, arrays, config, ordered))
        self.run_log.add("bytes_down", len(msgs) * record_bytes(arrays))
        self.sent_train = len(msgs)
        self.current_arrays = arrays
        if self.cfg.secure_aggregation:  # sent by secure_round(), inside aggregate_train
            self._secure_round = (grid, msgs)
            return []
        return msgs

    def _sampling_seed(self, label: str, rnd: int) -> int:
        """The seed of this round's sampling: from ``seed``, except under DP with sampling.

        DP's ε with ``fraction-train`` < 1 counts on amplification by subsampling, which
        holds only if nobody can predict who is sampled: then each round draws from the OS's
        secure source (and the run is no longer reproducible from ``seed``).
        """
        if (label == "sample-train" and self.cfg.dp_mode.enabled
                and self.cfg.fraction_train < 1):
            return secrets.randbits(256)
        return derive_seed(self.cfg.seed, label, rnd)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """As :meth:`configure_train`, for the evaluation messages."""
        rnd = server_round + self.round_offset
        ordered = self.ordered(grid)
        random.seed(self._sampling_seed("sample-evaluate", rnd))
        msgs = list(super().configure_evaluate(rnd, arrays, config, ordered))
        self.run_log.add("bytes_down", len(msgs) * record_bytes(arrays))
        return msgs

    # ------------------------------------------------------------------ aggregate
    def accept(self, replies: list[Message]) -> list[Message]:
        """Validated replies; the others are logged with node and reason, and counted."""
        failed = [m for m in replies if m.has_error()]
        for m in failed:
            log(WARNING, "node %d failed this round: %s", m.metadata.src_node_id, m.error.reason)
        silent = max(self.sent_train - len(replies), 0)
        if silent:
            log(WARNING, "%d sampled client(s) did not answer within round-timeout", silent)
        answered = len(replies) - len(failed)
        if answered < self.cfg.min_clients:
            raise TooFewClients(f"only {answered} client(s) answered this round, fewer than "
                                f"min-clients={self.cfg.min_clients}")
        cap = self.max_weight()
        accepted, rejected = [], 0
        for m in (m for m in replies if not m.has_error()):
            reason = validate_update(m.content, self.template, cap, self.weighted_by_key)
            if reason is None:
                accepted.append(m)
            else:
                rejected += 1
                log(WARNING, "rejected the update of node %d (client %s): %s",
                    m.metadata.src_node_id, self.client_keys.get(m.metadata.src_node_id), reason)
        self.run_log.set(rejected_updates=rejected, failed_clients=len(failed) + silent)
        return accepted

    def note_accepted(self, contents: list[RecordDict]) -> MetricRecord | None:
        """Record the accepted replies (count, bytes, train losses); their mean metrics."""
        memes = [next(iter(c.array_records.values()), ArrayRecord()) for c in contents]
        self.run_log.add("bytes_up", sum(record_bytes(r) for r in memes))
        self.run_log.set(num_clients=len(contents))
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        if metrics is not None:
            self.run_log.set(train_loss_local=metrics.get("train-loss-local"),
                             train_loss_meme=metrics.get("train-loss-meme"))
        return metrics

    def skip_round(self) -> tuple[None, None]:
        """Keep the meme: nothing valid arrived this round."""
        log(WARNING, "no valid update this round: the meme stays as it was")
        self.run_log.set(skipped=True)
        return None, None

    def secure_round(self, server_round: int) -> SecureResult:
        """Run SecAgg+ over this round's sampled clients: the unmasked mean of their memes."""
        if self._secure_round is None:
            raise SecureAggregationFailed("secure aggregation was asked for, but no train "
                                          "round was configured")
        grid, msgs = self._secure_round
        self._secure_round = None
        rnd = server_round + self.round_offset
        weight = (1.0 if self.cfg.aggregation is Aggregation.UNIFORM
                  else self.max_weight() or 1000.0)
        # integer buffers (BatchNorm's num_batches_tracked) are counters, not data: they
        # stay out of the masked vector and keep the server's value
        floats = [k for k, (_, dtype) in self.template.items() if dtype.kind == "f"]
        result = secure_mean(
            grid, msgs, floats, rnd, num_shares=self.cfg.secagg_num_shares,
            threshold=self.cfg.secagg_threshold, max_weight=weight,
            clipping_range=self.cfg.secagg_clipping_range, timeout=self.cfg.round_timeout,
            seed=derive_seed(self.cfg.seed, "secagg", rnd))
        for k, v in result.mean.items():
            if tuple(v.shape) != self.template[k][0] or not np.all(np.isfinite(v)):
                raise SecureAggregationFailed(
                    f"round {rnd}: the securely aggregated '{k}' is not a finite array of "
                    f"shape {self.template[k][0]}")
        if result.failed:
            log(WARNING, "%d sampled client(s) dropped out of secure aggregation",
                result.failed)
        self.run_log.set(failed_clients=result.failed)
        # what went up was masked, but as large as the plain memes
        self.run_log.add("bytes_up", len(result.contents) * record_bytes(self.current_arrays))
        return result

    def _aggregate_secure(self, server_round: int,
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = self.secure_round(server_round)
        metrics = self.note_accepted(result.contents)
        mean = {k: result.mean.get(k, a.numpy()) for k, a in self.current_arrays.items()}
        arrays = ArrayRecord({k: Array(v) for k, v in mean.items()})
        return self._restore_dtypes(arrays), metrics

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, then aggregate the memes in client-key order; record the round."""
        if self.cfg.secure_aggregation:
            return self._aggregate_secure(server_round)
        accepted = self.accept(self.sort_replies(replies))
        if not accepted:
            return self.skip_round()
        contents = [m.content for m in accepted]
        memes = [next(iter(c.array_records.values())) for c in contents]
        metrics = self.note_accepted(contents)  # before Flower's FedMedian empties records
        if not self.cfg.algorithm.trains_meme:
            return None, metrics
        if self.cfg.aggregation.robust:  # Flower's FedMedian / FedTrimmedAvg / (Multi)Krum
            self._prepare_robust(len(accepted))
            arrays, _ = super().aggregate_train(server_round, accepted)
            return self._restore_dtypes(arrays), metrics
        weights = ([1.0] * len(contents) if self.cfg.aggregation is Aggregation.UNIFORM
                   else [float(c.metric_records["metrics"][self.weighted_by_key])
                         for c in contents])
        avg = weighted_average([{k: a.numpy() for k, a in r.items()} for r in memes], weights)
        return ArrayRecord({k: Array(v) for k, v in avg.items()}), metrics

    def _prepare_robust(self, n_accepted: int) -> None:
        """Hook before a robust aggregation sees ``n_accepted`` replies."""

    def _restore_dtypes(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """Robust aggregators return float arrays; cast back to the meme's own dtypes."""
        if arrays is None:
            return None
        out = {}
        for k, a in arrays.items():
            value, dtype = a.numpy(), self.template[k][1]
            out[k] = Array(np.asarray(np.rint(value)).astype(dtype) if dtype.kind in "iu"
                           else value.astype(dtype))
        return ArrayRecord(out)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        """Sample-weighted client accuracies, recorded as local/meme accuracy; and each
        client's own numbers, by client key (``clients.json``)."""
        replies = self.sort_replies(replies)
        clients = []
        for m in replies:
            if m.has_error() or "metrics" not in m.content.metric_records:
                continue
            got = m.content.metric_records["metrics"]
            node = m.metadata.src_node_id
            info = self.client_info.get(node, {})
            clients.append({
                "key": self.client_keys.get(node, _UNKNOWN_KEY), "num_test": got.get(
                    "num-examples"), "num_train": info.get("num-train"),
                **{k.replace("-", "_"): got.get(k) for k in (
                    "local-accuracy", "local-loss", "meme-accuracy", "meme-loss",
                    "mix-accuracy", "mix-loss", "mix-weight")}})
        self.run_log.set_clients(clients)
        metrics = super().aggregate_evaluate(server_round + self.round_offset, replies)
        if metrics is not None:
            self.run_log.set(local_accuracy=metrics.get("local-accuracy"),
                             meme_accuracy=metrics.get("meme-accuracy"),
                             mix_accuracy=metrics.get("mix-accuracy"))
        return metrics


class MemeFedAvg(MemeStrategyMixin, FedAvg):
    """FML, FedAvg and local-only with weighted or uniform averaging."""


class MemeFedProx(MemeStrategyMixin, FedProx):
    """FedProx: Flower's FedProx puts ``proximal-mu`` in every train config."""


class MemeFedMedian(MemeStrategyMixin, FedMedian):
    """Coordinate-wise median of the memes."""


class MemeFedTrimmedAvg(MemeStrategyMixin, FedTrimmedAvg):
    """Trimmed mean of the memes."""


class MemeKrum(MemeStrategyMixin, Krum):
    """Krum: the one meme closest to its neighbours."""


class MemeMultiKrum(MemeStrategyMixin, MultiKrum):
    """Multi-Krum: the n - f memes Krum scores best, averaged."""

    def _prepare_robust(self, n_accepted: int) -> None:
        self.num_nodes_to_select = max(1, n_accepted - self.num_malicious_nodes)


def build_strategy(cfg: Config, run_log: RunLog) -> MemeStrategyMixin:
    """The strategy for (algorithm, aggregation): the one place they map to classes.

    FedProx's proximal term is client-side; with a robust aggregation its ``proximal-mu``
    travels in the train config that the server app builds.
    """
    common = dict(
        cfg=cfg, run_log=run_log,
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_clients, min_evaluate_nodes=cfg.min_clients,
        min_available_nodes=cfg.min_clients,
    )
    if cfg.aggregation is Aggregation.MEDIAN:
        return MemeFedMedian(**common)
    if cfg.aggregation is Aggregation.TRIMMED_MEAN:
        return MemeFedTrimmedAvg(beta=cfg.trimmed_mean_beta, **common)
    if cfg.aggregation is Aggregation.KRUM:
        return MemeKrum(num_malicious_nodes=cfg.num_malicious, **common)
    if cfg.aggregation is Aggregation.MULTI_KRUM:
        return MemeMultiKrum(num_malicious_nodes=cfg.num_malicious, **common)
    if cfg.algorithm is Algorithm.FEDPROX:
        return MemeFedProx(proximal_mu=cfg.proximal_mu, **common)
    return MemeFedAvg(**common)
