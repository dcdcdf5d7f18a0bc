"""The order of a round, written once: everything else the server does is a step here.

Flower's ``Strategy.start`` runs the same exchange, but hides the order and leaves
checkpointing to its evaluation callback; here each step is a line, and the round is
closed and checkpointed after its evaluation, as its own steps.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from common.profiling import phase
from server.results import RunLog


def run_rounds(strategy: Strategy, grid: Grid, meme: ArrayRecord, *, first: int, last: int,
               train_config: ConfigRecord, evaluate_config: ConfigRecord, timeout: float,
               run_log: RunLog, evaluate_central: Callable[[ArrayRecord], None],
               checkpoint: Callable[[int, ArrayRecord], None],
               evaluate_every: int = 1,
               secure_exchange: Callable[[Grid, int, list[Message], float], Any] | None = None,
               ) -> ArrayRecord:
    """Rounds ``first`` to ``last`` (absolute numbers: a resumed run goes on counting);
    returns the last meme. ``strategy`` is the meme strategy or its DP wrapper.

    ``secure_exchange`` (SecAgg+) replaces step 2's plain send-and-receive.
    Steps 4 and 5 run every ``evaluate_every``-th round and in the last. Nothing in them
    feeds training (sampling is seeded per round and kind), so skipping them changes no
    later round: an evaluated round's numbers are those of evaluating every round.
    """
    for rnd in range(first, last + 1):
        log(INFO, "fedmutual: round %d of %d", rnd, last)
        run_log.begin_round(rnd)
        step = partial(phase, "server", server_round=rnd)  # timed with FEDMUTUAL_PROFILE
        # 1. identify new nodes, sample by client key, the meme as it goes down
        with step("configure-train"):
            messages = list(strategy.configure_train(rnd, meme, train_config, grid))
        # 2. the sampled clients train their models and reply the meme; with SecAgg+ the
        #    protocol's exchange instead, which gives only the sum of the memes
        with step("train-exchange"):
            replies = (secure_exchange(grid, rnd, messages, timeout) if secure_exchange
                       else grid.send_and_receive(messages, timeout=timeout))
        # 3. admit each reply, aggregate by the configured rule (SecAgg+'s sum; DP: clip,
        #    noise, account), record the round's training numbers
        with step("aggregate"):
            aggregated, _ = strategy.aggregate_train(rnd, replies)
        meme = aggregated if aggregated is not None else meme
        if rnd % evaluate_every == 0 or rnd == last:
            # 4. the sampled clients evaluate both models on their own test split
            with step("evaluate-exchange"):
                messages = strategy.configure_evaluate(rnd, meme, evaluate_config, grid)
                strategy.aggregate_evaluate(rnd, grid.send_and_receive(messages,
                                                                       timeout=timeout))
            # 5. the meme on the central test set
            with step("central-evaluation"):
                evaluate_central(meme)
        # 6. close the round: metrics.json, clients.json, TensorBoard
        # 7. checkpoint: a resumed run continues after this round
        with step("results-and-checkpoint"):
            run_log.end_round()
            checkpoint(rnd, meme)
    return meme
