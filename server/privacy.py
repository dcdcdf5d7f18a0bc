"""Client-level DP on the meme: Flower's fixed-clipping wrappers around the meme strategy.

``dp-mode=server`` wraps the strategy in Flower's ``DifferentialPrivacyServerSideFixedClipping``
(the server clips each update it receives), ``dp-mode=client`` in
``DifferentialPrivacyClientSideFixedClipping`` (its ``configure_train`` sends the clipping
norm; :func:`client.mods.dp_clip_mod` clips before sending). Both keep Flower's
configuration and logging; ``aggregate_train`` is replaced because Flower's

- skips the whole round when one sampled client fails, and otherwise divides by the number
  that answered while noising for the number sampled (too little noise);
- clips and noises integer buffers (and fails on them);
- validates nothing and accounts nothing for a strategy that is not plain FedAvg.

Here every reply passes the meme validator first; a client-clipped update larger than the
norm is rejected (it would void the guarantee); the mean uses the fixed denominator m (a
missing client counts as a zero update), noise ``N(0, (σC/m)²)`` is drawn from the OS's
secure random source (never from ``seed``: whoever knows the seed could subtract it), the
release is written to the run folder's ledger (:mod:`server.ledger`) before the meme is
returned, and (ε, δ) is recomputed from every release in it and written to ``metrics.json``.
With ``secure-aggregation`` the sum comes from SecAgg+ and the server adds the noise to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore import log
from flwr.supercore.differential_privacy import compute_stdv

from common.config import Config, DpMode
from common.privacy import Release, clip_update, epsilon_spent, noisy_mean_update
from server.ledger import ReleaseLedger
from server.results import RunLog
from server.strategy import MemeStrategy

_NORM_SLACK = 1e-5  # relative: float32 rounding of a client's clipped update


class _MemeDp:
    """The shared ``aggregate_train`` of both wrappers (mixed in front of Flower's); it
    talks to the meme strategy through ``collect``, ``reject`` and ``release`` only."""

    strategy: MemeStrategy
    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int
    clips_on_server: bool = True

    def __init__(self, strategy: MemeStrategy, ledger: ReleaseLedger) -> None:
        cfg = strategy.cfg
        super().__init__(strategy, cfg.dp_noise_multiplier, cfg.dp_clipping_norm,
                         cfg.min_clients)
        self.cfg: Config = cfg
        self.run_log: RunLog = strategy.run_log
        self.ledger = ledger

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, clip (or check the client's clipping), average over m, noise, account."""
        got = self.strategy.collect(server_round, replies)
        ref = got.reference
        norms: list[float] = []
        if got.secure_mean is not None:
            # SecAgg+ gives the mean over the n that completed: back to the sum, over m below
            n = len(got.contents)
            updates = [{k: ref[k] + n * (v - ref[k]) for k, v in got.secure_mean.items()}]
            contents = got.contents
        else:
            contents, updates = [], []
            for content, meme, node in zip(got.contents, got.memes, got.nodes, strict=True):
                clipped, norm = clip_update(meme, ref, self.clipping_norm)
                if not self.clips_on_server and norm > self.clipping_norm * (1 + _NORM_SLACK):
                    reason = (f"norm {norm:.4g} exceeds dp-clipping-norm="
                              f"{self.clipping_norm:g} (the client did not clip)")
                    self.strategy.reject("train", node, reason)
                    continue
                contents.append(content)
                updates.append(clipped)
                norms.append(norm)
        got = replace(got, contents=contents)
        if not contents:
            return self.strategy.release(None, got)
        sampled = max(got.sampled, len(contents))
        self.num_sampled_clients = sampled
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, sampled)
        noised = noisy_mean_update(ref, updates, sampled, std)
        # on disk before the meme is returned: returning it is what lets it leave the server
        self.ledger.append(server_round, Release(self.noise_multiplier, sampled,
                                                 max(got.population, sampled)))
        epsilon = self._account()
        self.run_log.set(dp_epsilon=epsilon, dp_delta=self.cfg.dp_delta, dp_noise_std=std,
                         dp_sampled=sampled, dp_population=got.population,
                         dp_clipped=sum(n > self.clipping_norm for n in norms) if norms
                         else None,
                         dp_update_norm=float(np.median(norms)) if norms else None)
        log(INFO, "dp: noise std %.4g (sigma %g x C %g / m %d); epsilon %.4g at delta %g",
            std, self.noise_multiplier, self.clipping_norm, sampled, epsilon,
            self.cfg.dp_delta)
        return self.strategy.release(noised, got)

    def _account(self) -> float:
        """ε after every release in the ledger: this one, and those of rounds that were
        released but never checkpointed (each run of a round counts)."""
        return epsilon_spent(self.ledger.releases, self.cfg.dp_delta,
                             subsampled=self.cfg.fraction_train < 1)


class MemeDpServerSide(_MemeDp, DifferentialPrivacyServerSideFixedClipping):
    """``dp-mode=server``: the server clips every update it receives."""

    clips_on_server = True


class MemeDpClientSide(_MemeDp, DifferentialPrivacyClientSideFixedClipping):
    """``dp-mode=client``: clients clip (``dp_clip_mod``); the server checks and noises."""

    clips_on_server = False


def wrap_dp(strategy: MemeStrategy) -> Strategy:
    """The strategy that runs the rounds: the meme strategy, or a DP wrapper around it."""
    cfg = strategy.cfg
    if not cfg.dp_mode.enabled:
        return strategy
    cls = MemeDpServerSide if cfg.dp_mode is DpMode.SERVER else MemeDpClientSide
    # the ledger is read now, so a corrupt one stops the run before any round
    return cls(strategy, ReleaseLedger.open(strategy.run_log.run_dir, strategy.run_log.records,
                                            cfg.dp_noise_multiplier))
