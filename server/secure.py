"""Secure aggregation of the meme: one round of Flower's SecAgg+ protocol, driven directly.

Flower's ``SecAggPlusWorkflow`` only exists for the legacy API (``LegacyContext`` + a
``flwr.server.strategy.Strategy`` + ``FitIns``/``FitRes`` records). Rather than running the
whole legacy ``DefaultWorkflow``, the meme strategy keeps its own Message-API loop and calls
:func:`secure_mean` in place of the plain train round: it hands the workflow the train
messages the strategy sampled (as ``FitIns``), lets the workflow run its four stages (setup,
share keys, collect masked vectors, unmask) and takes the unmasked sum from a small legacy
adapter. The workflow signals failure only by returning early and logging; here that
becomes :class:`SecureAggregationFailed`, which fails the run.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.compat.common import recorddict_compat as compat
from flwr.compat.common.parameter import parameters_to_ndarrays
from flwr.compat.common.typing import FitIns
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from common.compression import Template
from common.config import Config
from common.records import meme_record
from common.runtime import derive_seed


class SecureAggregationFailed(RuntimeError):
    """A round asked for secure aggregation and did not get it: the run must fail."""


@dataclass
class SecureResult:
    """The unmasked weighted mean of the memes and the replies' (unmasked) metrics."""

    mean: dict[str, np.ndarray]
    contents: list[tuple[int, RecordDict]]  # each completing node and its metrics (its
    # meme stays masked)
    failed: int  # sampled clients that dropped out (their masks were removed)


class _Adapter(LegacyStrategy):
    """The legacy strategy the workflow talks to: it hands out the sampled ``FitIns`` and
    keeps what ``aggregate_fit`` receives (the workflow has already unmasked the sum)."""

    def __init__(self, fitins: list) -> None:
        self.fitins = fitins
        self.results: list | None = None
        self.failures: list = []

    def initialize_parameters(self, client_manager):  # noqa: ANN001, D102
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, D102
        return self.fitins

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, D102
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, D102
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, D102
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001, D102
        return None


def to_fitins_content(msg: Message) -> tuple[ArrayRecord, ConfigRecord]:
    """The single ArrayRecord and ConfigRecord of a sampled train message."""
    content = msg.content
    return meme_record(content), content["config"]


def secure_mean(grid: Grid, msgs: Sequence[Message], keys: Sequence[str], server_round: int,
                *, num_shares: float, threshold: float, max_weight: float,
                clipping_range: float, timeout: float, seed: int) -> SecureResult:
    """Run SecAgg+ over the sampled train messages; the weighted mean of the replies' memes.

    ``keys`` is the meme's key order: legacy ``Parameters`` carry arrays by position only.
    Raises :class:`SecureAggregationFailed` when the protocol halted (too few clients left
    for the reconstruction threshold, fewer than two sampled, every client failed).
    """
    if len(msgs) < 2:
        raise SecureAggregationFailed(
            f"round {server_round}: secure aggregation needs at least 2 sampled clients, "
            f"got {len(msgs)}: the sum of one client is that client's meme")
    fitins = []
    for msg in msgs:
        arrays, config = to_fitins_content(msg)
        params = compat.arrayrecord_to_parameters(
            ArrayRecord({k: arrays[k] for k in keys}), keep_input=True)
        proxy = GridClientProxy(msg.metadata.dst_node_id, grid, msg.metadata.run_id)
        fitins.append((proxy, FitIns(parameters=params, config=dict(config))))
    adapter = _Adapter(fitins)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), strategy=adapter)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold,
                                  max_weight=max_weight, clipping_range=clipping_range,
                                  timeout=timeout)
    random.seed(seed)  # the workflow shuffles the clients into its neighbour rings
    workflow(grid, context)
    if not adapter.results:
        raise SecureAggregationFailed(
            f"round {server_round}: SecAgg+ halted before unmasking ({len(msgs)} sampled, "
            f"secagg-threshold={threshold:g} of secagg-num-shares={num_shares:g}; the log "
            "above names the stage): the meme of this round was not aggregated")
    mean = parameters_to_ndarrays(adapter.results[0][1].parameters)
    if len(mean) != len(keys):
        raise SecureAggregationFailed(f"round {server_round}: SecAgg+ returned {len(mean)} "
                                      f"arrays, the meme has {len(keys)}")
    contents = [(int(proxy.node_id), RecordDict({"metrics": MetricRecord(dict(fitres.metrics))}))
                for proxy, fitres in adapter.results]
    return SecureResult(dict(zip(keys, mean, strict=True)), contents,
                        failed=len(msgs) - len(adapter.results))


def secure_round(cfg: Config, template: Template, grid: Grid, msgs: Sequence[Message],
                 server_round: int, *, max_weight: float, timeout: float) -> SecureResult:
    """The round's train exchange under SecAgg+: :func:`secure_mean` over the meme's
    floating arrays, with the run's settings, checked against the meme's ``template``.
    Integer buffers (BatchNorm's ``num_batches_tracked``) are counters, not data: they stay
    out of the masked vector and keep the server's value."""
    floats = [k for k, (_, dtype) in template.items() if dtype.kind == "f"]
    result = secure_mean(
        grid, msgs, floats, server_round, num_shares=cfg.secagg_num_shares,
        threshold=cfg.secagg_threshold, max_weight=max_weight,
        clipping_range=cfg.secagg_clipping_range, timeout=timeout,
        seed=derive_seed(cfg.seed, "secagg", server_round))
    for k, v in result.mean.items():
        if tuple(v.shape) != template[k][0] or not np.all(np.isfinite(v)):
            raise SecureAggregationFailed(
                f"round {server_round}: the securely aggregated '{k}' is not a finite "
                f"array of shape {template[k][0]}")
    return result
