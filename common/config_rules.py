"""The rules that span several run-config keys: a combination that would not do what it
claims (a meme option for an algorithm without a meme, DP noise that sample weights would
void, compression SecAgg+ cannot sum) fails at load, naming every key involved.

:func:`check_rules` runs on a :class:`~common.config.Config` whose keys are each valid
alone (``common/config.py``); the algorithm's own rules come first (``Algorithm.check``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.options import (
    Aggregation,
    Algorithm,
    ClientSampling,
    Compression,
    DownCompression,
    DpMode,
    PersonalModel,
    PrivateInit,
)
from common.schema import ConfigError

if TYPE_CHECKING:
    from common.config import Config


def check_rules(cfg: Config) -> None:
    """Raise :class:`ConfigError` for the first combination of keys that cannot run."""
    reason = cfg.algorithm.spec.check(cfg)
    if reason:
        raise ConfigError(reason)
    if cfg.personal_mix and cfg.algorithm is not Algorithm.FML:
        raise ConfigError(f"run-config key 'personal-mix' = true mixes the private model and "
                          f"the meme, but algorithm {cfg.algorithm.value!r} trains only one: "
                          "expected algorithm 'fml'")
    if cfg.personal_model is not PersonalModel.PRIVATE and (
            cfg.algorithm is not Algorithm.FML or cfg.personal_mix or cfg.private_peers > 1):
        raise ConfigError(f"run-config key 'personal-model' = {cfg.personal_model.value!r} "
                          "picks among FML's private model and its fine-tuned meme: expected "
                          "'private', or algorithm 'fml' with one private model (private-peers "
                          "= 1) and without personal-mix")
    if cfg.meme_epochs and cfg.algorithm is not Algorithm.FML:
        raise ConfigError(f"run-config key 'meme-epochs' = {cfg.meme_epochs} trains FML's meme "
                          f"alone after the mutual epochs, but algorithm "
                          f"{cfg.algorithm.value!r} has no private teacher: expected 0, or "
                          "algorithm 'fml'")
    if cfg.distill_hidden and (cfg.algorithm is not Algorithm.FML or cfg.torch_compile):
        raise ConfigError(f"run-config key 'distill-hidden' = {cfg.distill_hidden} matches the "
                          "private models' and the meme's features, read by hooks on eager "
                          f"modules: expected 0, or algorithm 'fml' (here "
                          f"{cfg.algorithm.value!r}) with torch-compile = false (here "
                          f"{str(cfg.torch_compile).lower()})")
    if cfg.private_init is not PrivateInit.RANDOM and cfg.algorithm is not Algorithm.FML:
        raise ConfigError(f"run-config key 'private-init' = {cfg.private_init.value!r} starts "
                          f"FML's private model from the meme, but algorithm "
                          f"{cfg.algorithm.value!r} has its own start: expected 'random', or "
                          "algorithm 'fml'")
    if cfg.server_steps and not cfg.algorithm.trains_meme:
        raise ConfigError(f"run-config keys 'server-lr' = {cfg.server_lr} and "
                          f"'server-momentum' = {cfg.server_momentum} step the meme, but "
                          f"algorithm {cfg.algorithm.value!r} has none: expected 1 and 0")
    if cfg.server_steps and cfg.compression_down is not DownCompression.NONE:
        raise ConfigError(f"run-config keys 'server-momentum' = {cfg.server_momentum} (or "
                          f"'server-lr' = {cfg.server_lr}) and 'compression-down' = "
                          f"{cfg.compression_down.value!r} cannot be combined: the velocity "
                          "would accumulate the downlink's rounding every round; expected "
                          "compression-down 'none'")
    if cfg.private_peers > 1 and cfg.algorithm is not Algorithm.FML:
        raise ConfigError(f"run-config key 'private-peers' = {cfg.private_peers} trains "
                          f"private peers by mutual learning, but algorithm "
                          f"{cfg.algorithm.value!r} has none: expected 1, or algorithm 'fml'")
    archs = cfg.peer_archs
    if archs and len(archs) != cfg.private_peers - 1:
        raise ConfigError(f"run-config key 'peer-models' = {cfg.peer_models!r} names "
                          f"{len(archs)} architecture(s), but 'private-peers' = "
                          f"{cfg.private_peers} has {cfg.private_peers - 1} peer(s) besides "
                          "the first: expected one per peer 2…K, or empty")
    _check_privacy(cfg)
    _check_compression(cfg)


def _check_compression(cfg: Config) -> None:
    """Compression encodes the meme's update: it needs a meme, and a server that sees it."""
    mode = cfg.compression.value
    down = cfg.compression_down.value
    if cfg.compression_down is not DownCompression.NONE and not cfg.algorithm.trains_meme:
        raise ConfigError(f"run-config key 'compression-down' = {down!r} encodes the meme, "
                          "but algorithm 'local' sends none: expected 'none'")
    if cfg.compression_down is not DownCompression.NONE and cfg.dp_mode is DpMode.CLIENT:
        raise ConfigError(f"run-config keys 'compression-down' = {down!r} and 'dp-mode' = "
                          "'client' cannot be combined: clients clip against the rounded meme "
                          "they received, the server checks the norm against its own; use "
                          "dp-mode 'server' or compression-down 'none'")
    if cfg.compression is Compression.NONE:
        return
    if not cfg.algorithm.trains_meme:
        raise ConfigError(f"run-config key 'compression' = {mode!r} encodes the meme, but "
                          "algorithm 'local' sends none: expected 'none'")
    if cfg.secure_aggregation:
        raise ConfigError(f"run-config keys 'compression' = {mode!r} and "
                          "'secure-aggregation' = true cannot be combined: SecAgg+ sums masked "
                          "float vectors, which encoded updates are not; expected "
                          "compression 'none'")
    if cfg.dp_mode is DpMode.CLIENT:
        raise ConfigError(f"run-config keys 'compression' = {mode!r} and 'dp-mode' = "
                          "'client' cannot be combined: encoding changes the clipped "
                          "update's norm, which the server must see bounded; use dp-mode "
                          "'server' or compression 'none'")


def _check_privacy(cfg: Config) -> None:
    """The combinations of the privacy switches that would not protect what they claim."""
    mode = cfg.dp_mode.value
    if cfg.dp_mode.enabled and not cfg.algorithm.trains_meme:
        raise ConfigError(f"run-config key 'dp-mode' = {mode!r} noises the meme, but "
                          "algorithm 'local' sends none: expected 'none'")
    if cfg.dp_mode.enabled and cfg.aggregation is not Aggregation.UNIFORM:
        raise ConfigError(
            f"run-config key 'dp-mode' = {mode!r} needs aggregation 'uniform', got "
            f"{cfg.aggregation.value!r}: the noise is calibrated to a clipped update "
            "counting 1/n of the average, which sample weights or robust rules break")
    if (cfg.dp_mode.enabled and cfg.fraction_train < 1
            and cfg.client_sampling is ClientSampling.CYCLIC):
        raise ConfigError(f"run-config keys 'client-sampling' = 'cyclic' and 'dp-mode' = "
                          f"{mode!r} with fraction-train < 1: DP's accounting counts on "
                          "sampling nobody can predict; expected client-sampling 'random'")
    if cfg.max_update_norm > 0 and not cfg.algorithm.trains_meme:
        raise ConfigError(f"run-config key 'max-update-norm' = {cfg.max_update_norm:g} "
                          "bounds how far a reply's meme moves from the one sent, but "
                          f"algorithm {cfg.algorithm.value!r} trains no shared meme: "
                          "expected 0")
    if not cfg.secure_aggregation:
        return
    if cfg.max_update_norm > 0:
        raise ConfigError(f"run-config key 'max-update-norm' = {cfg.max_update_norm:g} "
                          "with secure-aggregation = true: the server sees only the masked "
                          "sum, never one update's norm; expected 0 (secagg-clipping-range "
                          "bounds each value instead)")
    if not cfg.algorithm.trains_meme:
        raise ConfigError("run-config key 'secure-aggregation' = true needs a meme to "
                          "aggregate, but algorithm 'local' sends none")
    if cfg.aggregation.robust:
        raise ConfigError(
            f"run-config key 'secure-aggregation' = true only sums memes: aggregation "
            f"{cfg.aggregation.value!r} needs to see each one; expected 'weighted' or 'uniform'")
    if cfg.min_clients < 2:
        raise ConfigError(f"run-config key 'min-clients' = {cfg.min_clients} with "
                          "secure-aggregation = true: expected >= 2 (the sum of one client's "
                          "meme is that meme)")
    if cfg.dp_mode is DpMode.SERVER:
        raise ConfigError("run-config key 'dp-mode' = 'server' cannot clip updates that "
                          "secure aggregation hides from the server: use 'client'")
    if any(f.kind != "raise" for f in cfg.fault_list):
        raise ConfigError(f"run-config key 'faults' = {cfg.faults!r}: with "
                          "secure-aggregation = true only 'raise' faults (dropped clients) "
                          "apply; the server sees only the sum, not a broken update")
