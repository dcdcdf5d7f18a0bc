"""The meme strategy: the round's exchange with the clients, each job in its own module.

- who takes part and what they are sent: :mod:`server.sampling` (seeded by client key);
- admission: every reply is checked from its bytes by :mod:`server.validate`, which
  returns the checked arrays; a bad reply costs only itself (``rejections``);
- the aggregation rule: :mod:`server.aggregate`;
- the evaluation replies' checks, rows and means: :mod:`server.evaluation`;
- ``secure-aggregation``: :meth:`MemeStrategy.secure_exchange` is the round's train
  exchange (:mod:`server.secure`), and its result is what :meth:`MemeStrategy.collect`
  aggregates.

DP (:mod:`server.privacy`) works through three methods: :meth:`MemeStrategy.collect` (the
round's accepted memes, or SecAgg+'s sum), :meth:`MemeStrategy.reject` (a reply DP refuses
costs only itself, like any other) and :meth:`MemeStrategy.release` (record and return
what the round publishes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from logging import WARNING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from common.algorithms.base import SCORED
from common.compression import max_payload_bytes
from common.config import Aggregation, Config
from common.options import Compression
from common.records import record_bytes
from server.aggregate import State, aggregate, as_dtypes
from server.evaluation import (
    SCORES,
    admit_client_evaluation,
    client_row,
    peer_accuracies,
    weighted_means,
)
from server.identity import ClientRegistry, OrderedGrid, TooFewClients
from server.momentum import ServerMomentum
from server.results import RunLog
from server.sampling import downlink, messages, sample
from server.secure import SecureAggregationFailed, SecureResult, secure_round
from server.teachers import TeacherBank
from server.validate import (
    Rejected,
    Template,
    Update,
    admit_metrics,
    admit_update,
)

__all__ = ["Collected", "MemeStrategy", "TooFewClients", "build_strategy"]

#: with ``max-client-weight = 0`` a reply's weight is capped at this many times the
#: median train split reported at identification
WEIGHT_CAP_FACTOR = 10


@dataclass
class Collected:
    """What a round's aggregation works from, in client-key order."""

    reference: State  # the meme sent this round
    contents: list[Update]  # the accepted replies (metrics, weights)
    sampled: int  # train messages sent this round (DP's m)
    population: int  # clients connected when the round sampled
    memes: list[State] = field(default_factory=list)  # their memes
    nodes: list[int] = field(default_factory=list)  # their node ids (for messages)
    secure_mean: State | None = None  # SecAgg+: the unmasked mean of the float arrays


class MemeStrategy(FedAvg):
    """The round's exchange with the clients, one job a step: sampling and the downlink
    (:mod:`server.sampling`), admission of every reply (:mod:`server.validate`), the
    aggregation rule (:mod:`server.aggregate`); it records each round in ``run_log``."""

    def __init__(self, *, cfg: Config, run_log: RunLog, clients: ClientRegistry,
                 template: Template, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.run_log = run_log
        self.clients = clients
        self.template = template
        self.sent_train = 0  # train messages sent this round: DP's m
        self.population = 0  # clients connected when this round sampled
        self.current_arrays = ArrayRecord()  # the meme of the open round, as the server has it
        self.sent_arrays = ArrayRecord()  # ... and as it went down (compression-down)
        # co-distillation: each client's latest model, forwarded to others as a teacher
        self.bank = TeacherBank() if cfg.algorithm.spec.keeps_teachers else None
        self.momentum = ServerMomentum(cfg.server_lr, cfg.server_momentum)

    def ordered(self, grid: Grid) -> OrderedGrid:
        """The identified connected nodes in key order (see :class:`ClientRegistry`)."""
        return self.clients.ordered(grid)

    # ------------------------------------------------------------------ configure
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The sampled clients' train messages (see :meth:`_send`). Under SecAgg+ they
        go out through :meth:`secure_exchange`, a step of the round of its own."""
        self.current_arrays = arrays
        self.sent_arrays = downlink(self.cfg, arrays)
        msgs, self.population = self._send(MessageType.TRAIN, server_round,
                                           self.sent_arrays, config, grid)
        self.sent_train = len(msgs)
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The sampled clients' evaluate messages (see :meth:`_send`)."""
        return self._send(MessageType.EVALUATE, server_round, downlink(self.cfg, arrays),
                          config, grid)[0]

    def _send(self, kind: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
              grid: Grid) -> tuple[list[Message], int]:
        """The round's messages of ``kind`` to the clients :func:`sample` picks from the
        identified ones (in key order), and how many there were; counted in
        ``bytes_down``."""
        ids = self.ordered(grid).get_node_ids()
        nodes = sample(self.cfg, kind, server_round, ids)
        extra = (self._teachers(server_round, nodes) if kind == MessageType.TRAIN
                 else {})
        msgs = messages(kind, server_round, arrays, config, nodes, extra)
        self.run_log.add("bytes_down", len(msgs) * record_bytes(arrays) + sum(
            record_bytes(r) for records in extra.values() for r in records.values()))
        return msgs, len(ids)

    def _teachers(self, server_round: int, nodes: list[int],
                  ) -> dict[int, dict[str, ArrayRecord]]:
        """Co-distillation: the teachers due to the sampled nodes (:mod:`server.teachers`)."""
        if self.bank is None:
            return {}
        return self.bank.serve(self.cfg, server_round,
                               {n: self.clients.key_of(n) for n in nodes})

    def sent_reference(self) -> State:
        """The open round's meme as the clients received it, in the template's dtypes: what
        their compressed updates are decoded against."""
        return {k: a.numpy().astype(self.template[k][1]) if k in self.template else a.numpy()
                for k, a in self.sent_arrays.items()}

    # ------------------------------------------------------------------ aggregate
    def max_weight(self) -> float | None:
        """The cap on ``num-examples``: ``max-client-weight``, else ``WEIGHT_CAP_FACTOR``
        times the median train split the clients reported when identified (a minority
        cannot move a median, so no report sets its own bound); None where weights do not
        count."""
        if self.cfg.aggregation is not Aggregation.WEIGHTED:
            return None
        if self.cfg.max_client_weight > 0:
            return float(self.cfg.max_client_weight)
        sizes = [int(m["num-train"]) for m in self.clients.info.values() if "num-train" in m]
        return float(WEIGHT_CAP_FACTOR * np.median(sizes)) if sizes else None

    def reject(self, stage: str, node: int, reason: str) -> None:
        """Count a rejected reply and keep its reason (log and ``rejections``)."""
        key = self.clients.keys.get(node)
        what = {"train": "update", "evaluate": "evaluation"}.get(stage, stage)
        log(WARNING, "rejected the %s of node %d (client %s): %s", what, node, key, reason)
        self.run_log.reject(stage, node, key, reason)

    def accept(self, server_round: int, replies: list[Message]) -> list[tuple[int, Update]]:
        """The checked updates with their node ids; every other reply costs only itself:
        logged with node and reason, counted in ``rejected_updates``."""
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
        codec = self.cfg.codec
        compressed = codec.mode is not Compression.NONE
        uploads = self.cfg.algorithm.spec.uploads(self.cfg, server_round) is not None
        admit = partial(  # a round without an upload must carry no arrays
            admit_update, template=self.template if uploads else {},
            max_weight=self.max_weight(),
            weight_key=self.weighted_by_key, codec=codec,
            reference=(self.sent_reference()
                       if compressed or self.cfg.max_update_norm > 0 else None),
            max_payload=max_payload_bytes(self.template, codec) if compressed else 0,
            max_norm=self.cfg.max_update_norm)
        accepted = []
        for m in (m for m in replies if not m.has_error()):
            node = m.metadata.src_node_id
            try:
                accepted.append((node, admit(m.content)))
            except Rejected as exc:
                self.reject("train", node, str(exc))
            except Exception as exc:  # noqa: BLE001 - a hostile reply costs only itself
                self.reject("train", node, f"unreadable ({type(exc).__name__}: {exc})")
        self.run_log.set(failed_clients=len(failed) + silent)
        self.run_log.add("bytes_up", sum(u.nbytes for _, u in accepted))
        norms = [u.norm for _, u in accepted if u.norm is not None]
        if norms:  # what the honest replies measure: where to set max-update-norm
            self.run_log.set(update_norm=float(np.median(norms)), update_norm_max=max(norms))
        return accepted

    def collect(self, server_round: int, replies: Iterable[Message] | SecureResult,
                ) -> Collected:
        """The round's accepted memes (checked, in key order), or SecAgg+'s mean."""
        reference = {k: a.numpy() for k, a in self.current_arrays.items()}
        if isinstance(replies, SecureResult):
            return Collected(reference, self._secure_contents(replies), self.sent_train,
                             self.population, secure_mean=replies.mean)
        if self.cfg.secure_aggregation:
            raise SecureAggregationFailed(f"round {server_round}: secure aggregation was "
                                          "asked for, but the replies came in the clear")
        accepted = self.accept(server_round, self.clients.sort_replies(replies))
        return Collected(reference, [u for _, u in accepted], self.sent_train,
                         self.population, [u.meme for _, u in accepted],
                         [node for node, _ in accepted])

    def release(self, meme: State | None, collected: Collected,
                ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the round's accepted replies and return the meme it publishes (in the
        template's dtypes), after the server's momentum step (:mod:`server.momentum`); with
        no accepted reply, or a result that is not finite, the meme stays as it was (the
        velocity too) and the record says why."""
        if not collected.contents:
            log(WARNING, "no valid update this round: the meme stays as it was")
            self.run_log.set(skipped=True)
            return None, None
        self.run_log.set(num_clients=len(collected.contents))
        metrics = MetricRecord(weighted_means(collected.contents,
                                              ("train-loss-local", "train-loss-meme")))
        self.run_log.set(train_loss_local=metrics.get("train-loss-local"),
                         train_loss_meme=metrics.get("train-loss-meme"))
        if meme is None:
            return None, metrics
        cast = as_dtypes({k: meme[k] for k in self.template},
                         {k: dtype for k, (_, dtype) in self.template.items()})
        cast, velocity = self.momentum.propose(collected.reference, cast)
        broken = [k for k, v in cast.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        if broken:
            reason = f"the round's meme '{broken[0]}' is not finite: the meme stays as it was"
            log(WARNING, "round not released: %s", reason)
            self.run_log.set(skipped=True)
            self.run_log.reject("aggregate", -1, None, reason)
            return None, metrics
        self.momentum.commit(velocity)
        return ArrayRecord({k: Array(v) for k, v in cast.items()}), metrics

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Collect, aggregate by the configured rule, release."""
        got = self.collect(server_round, replies)
        if self.bank is not None:  # co-distillation keeps each upload as a teacher
            for node, meme in zip(got.nodes, got.memes, strict=True):
                if meme:
                    self.bank.keep(self.clients.key_of(node), meme)
        if not got.contents or not self.cfg.algorithm.trains_meme:
            return self.release(None, got)
        if got.secure_mean is not None:  # integer counters keep the server's value
            return self.release({**got.reference, **got.secure_mean}, got)
        weights = [u.weight for u in got.contents]
        meme = self.cfg.algorithm.spec.combine(got.memes, weights, self.cfg)
        if meme is None:
            meme = aggregate(self.cfg.aggregation, got.memes, weights,
                             trimmed_mean_beta=self.cfg.trimmed_mean_beta,
                             num_malicious=self.cfg.num_malicious)
        return self.release(meme, got)

    def secure_exchange(self, grid: Grid, server_round: int, msgs: list[Message],
                        timeout: float) -> SecureResult:
        """The train exchange under SecAgg+ (a step of :func:`server.rounds.run_rounds`):
        :func:`server.secure.secure_round`, each reply weighted up to the cap on
        ``num-examples`` (1 where weights do not count; 1000 while no client has
        reported its train split)."""
        weight = (1.0 if self.cfg.aggregation is Aggregation.UNIFORM
                  else self.max_weight() or 1000.0)
        return secure_round(self.cfg, self.template, grid, msgs, server_round,
                            max_weight=weight, timeout=timeout)

    def _secure_contents(self, result: SecureResult) -> list[Update]:
        """The completing clients' checked metrics; dropouts and bytes recorded."""
        if result.failed:
            log(WARNING, "%d sampled client(s) dropped out of secure aggregation",
                result.failed)
        self.run_log.set(failed_clients=result.failed)
        # what went up was masked, but as large as the plain memes
        self.run_log.add("bytes_up", len(result.contents) * record_bytes(self.current_arrays))
        contents = []
        for node, content in result.contents:
            try:
                contents.append(admit_metrics(content, max_weight=self.max_weight(),
                                              weight_key=self.weighted_by_key))
            except Rejected as exc:
                self.reject("train", node, str(exc))
        return contents

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        """Sample-weighted client accuracies of the checked replies, recorded as
        local/meme accuracy; and each client's own numbers, by client key
        (``clients.json``): :mod:`server.evaluation`. A bad reply costs only itself."""
        clients, checked = [], []
        for m in self.clients.sort_replies(replies):
            node = m.metadata.src_node_id
            try:
                if m.has_error():
                    continue
                info = self.clients.info.get(node, {})
                got = admit_client_evaluation(m.content, info)
            except Rejected as exc:
                self.reject("evaluate", node, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a hostile reply costs only itself
                self.reject("evaluate", node, f"unreadable ({type(exc).__name__}: {exc})")
                continue
            checked.append(got)
            clients.append(client_row(self.clients.key_of(node), got, info))
        self.run_log.set_clients(clients)
        means = weighted_means([c for c in checked if c.num_examples > 0], SCORES)
        if not means:
            return None
        self.run_log.set(**{f"{name}_accuracy": means.get(f"{name}-accuracy")
                            for name in SCORED}, peer_accuracies=peer_accuracies(means))
        return MetricRecord(means)


def build_strategy(cfg: Config, run_log: RunLog, clients: ClientRegistry | None = None,
                   template: Template | None = None) -> MemeStrategy:
    """The meme strategy for this config, the clients identified so far and the meme's
    template (what every update must match)."""
    return MemeStrategy(
        cfg=cfg, run_log=run_log, clients=clients or ClientRegistry(cfg),
        template=template or {},
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_clients, min_evaluate_nodes=cfg.min_clients,
        min_available_nodes=cfg.min_clients,
    )
