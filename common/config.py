"""The validated run config: the schema's keys, typed, checked once, with the rules that
span several keys.

Flower hands the ServerApp and every ClientApp the same ``context.run_config``. Both call
:func:`load_config` before doing any work, so a bad value fails with one clear message
(naming the key, the value and what is allowed) before anything is trained. The keys
themselves are declared in ``common/schema.py``; importing this module imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any

from common.faults import Fault, parse_faults
from common.options import (
    Aggregation,
    Algorithm,
    ClientSampling,
    Codec,
    Compression,
    Distill,
    DistillGate,
    DistillPrior,
    DistillWeighting,
    DownCompression,
    DpMode,
    Partitioner,
    PersonalModel,
    Precision,
    PrivateInit,
    PrivateStore,
)
from common.schema import AUTO, BY_NAME, RESUMABLE, SCHEMA, Key, floats

__all__ = ["SCHEMA", "Aggregation", "Algorithm", "Config", "ConfigError", "DpMode",
           "Partitioner", "config_changes", "default_config", "load_config",
           "recorded_config"]


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""


@dataclass(frozen=True)
class Config:
    """The validated run config; attribute names are the keys in snake_case."""

    algorithm: Algorithm
    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    client_sampling: ClientSampling
    min_clients: int
    round_timeout: float
    node_authentication: bool
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    alpha: float
    beta: float
    temperature: float
    distill_weighting: DistillWeighting
    distill_gate: DistillGate
    distill_gate_threshold: float
    distill_prior: DistillPrior
    distill_hidden: float
    warmup_rounds: int
    private_peers: int
    peer_models: str
    personal_mix: bool
    personal_model: PersonalModel
    private_init: PrivateInit
    meme_epochs: int
    validation_fraction: float
    proximal_mu: float
    finetune_epochs: int
    ditto_lambda: float
    codistill_every: int
    codistill_burnin: int
    codistill_teachers: int
    aggregation: Aggregation
    server_lr: float
    server_momentum: float
    trimmed_mean_beta: float
    num_malicious: int
    max_client_weight: int
    max_update_norm: float
    meme_model: str
    local_model: str
    local_models: str
    dataset: str
    data_dir: str
    data_path: str
    npz_mean: str
    npz_std: str
    num_classes: int
    partitioner: Partitioner
    dirichlet_alpha: float
    classes_per_client: int
    test_fraction: float
    seed: int
    device: str
    precision: Precision
    torch_compile: bool
    evaluate_every: int
    state_dir: str
    private_store: PrivateStore
    reset_private: bool
    compression: Compression
    compression_ratio: float
    compression_energy: float
    compression_down: DownCompression
    resume_from: str
    faults: str
    dp_mode: DpMode
    dp_noise_multiplier: float
    dp_clipping_norm: float
    dp_delta: float
    secure_aggregation: bool
    secagg_num_shares: float
    secagg_threshold: float
    secagg_clipping_range: float
    audit_dir: str
    output_dir: str
    run_name: str

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case keys and plain values, as in ``[tool.flwr.app.config]``."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name.replace("_", "-")] = v.value if isinstance(v, Enum) else v
        return out

    @property
    def fault_list(self) -> tuple[Fault, ...]:
        """The parsed ``faults`` key."""
        return parse_faults(self.faults)

    @property
    def server_steps(self) -> bool:
        """Whether the server steps the meme (``server-lr`` != 1 or ``server-momentum`` != 0)
        instead of publishing the aggregate itself."""
        return self.server_lr != 1.0 or self.server_momentum != 0.0

    @property
    def distill(self) -> Distill:
        """The mutual-learning variant (the ``distill-*`` keys) for the loss."""
        return Distill(self.distill_weighting, self.distill_gate, self.distill_gate_threshold,
                       self.distill_prior, self.distill_hidden)

    @property
    def codec(self) -> Codec:
        """How the meme update is encoded on the way up (the ``compression*`` keys)."""
        return Codec(self.compression, self.compression_ratio, self.compression_energy)

    @property
    def npz_mean_values(self) -> tuple[float, ...]:
        """``npz-mean`` parsed: one value, or one per channel."""
        return floats(self.npz_mean)

    @property
    def npz_std_values(self) -> tuple[float, ...]:
        """``npz-std`` parsed: one value, or one per channel."""
        return floats(self.npz_std)

    @property
    def peer_archs(self) -> tuple[str, ...]:
        """``peer-models`` parsed: the architectures of private peers 2…K (empty: each
        is the node's ``local-model``)."""
        return tuple(n.strip() for n in self.peer_models.split(",") if n.strip())

    @property
    def local_model_names(self) -> tuple[str, ...]:
        """``local-models`` parsed (empty: ``local-model`` everywhere)."""
        return tuple(n.strip() for n in self.local_models.split(",") if n.strip())

    def local_model_for(self, partition_id: int | None) -> str:
        """The private model's architecture: ``local-models`` cycled by partition id."""
        names = self.local_model_names
        if names and partition_id is not None:
            return names[partition_id % len(names)]
        return self.local_model


_SINT64 = range(-(2**63), 2**63)


def _shown(value: Any) -> str:
    """``repr``, but a huge int by its size: ``repr`` of one over 4300 digits raises."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"<a {value.bit_length()}-bit integer>"
    return repr(value)


def _coerce(key: Key, value: Any) -> Any:
    """One key's value, typed and checked.

    Whatever a key's own check says, a float must be finite (``inf`` would be an unbounded
    wait or an all-inf meme) and an int must fit the sint64 Flower carries it in: Python's
    unbounded ints would otherwise pass here and overflow in torch or numpy much later.
    """
    def fail() -> ConfigError:
        return ConfigError(
            f"run-config key '{key.name}' = {_shown(value)} is invalid: expected "
            f"{key.describe()}"
        )

    if key.auto and value == AUTO:
        return AUTO
    if issubclass(key.type, Enum):
        try:
            return key.type(value)
        except ValueError:
            raise fail() from None
    accepted = (int, float) if key.type is float else (key.type,)
    if isinstance(value, bool) != (key.type is bool) or not isinstance(value, accepted):
        raise fail()
    try:
        typed = key.type(value)
    except OverflowError:  # float(10**400)
        raise fail() from None
    if key.type is float and not math.isfinite(typed):
        raise fail()
    if key.type is int and typed not in _SINT64:
        raise fail()
    if key.check is not None and not key.check(typed):
        raise fail()
    return typed


def load_config(run_config: Mapping[str, Any]) -> Config:
    """Validate a Flower run config (kebab-case keys) and return it typed.

    Missing keys take the schema default; unknown keys are refused, since a typo would
    otherwise be silently ignored. A run config is parsed once per process: every mod and
    handler of a message asks again, and gets the same frozen ``Config``.
    """
    try:  # typed: 1, 1.0 and True are equal keys of a cache, not equal run configs
        frozen = tuple(sorted((k, type(v), v) for k, v in run_config.items()))
        hash(frozen)
    except TypeError:  # unhashable or unorderable values: parse (and refuse) them as they are
        return _load(run_config)
    return _load_frozen(frozen)


@lru_cache(maxsize=16)
def _load_frozen(items: tuple[tuple[str, type, Any], ...]) -> Config:
    return _load({k: v for k, _, v in items})


def _load(run_config: Mapping[str, Any]) -> Config:
    """:func:`load_config`, uncached."""
    unknown = sorted(set(run_config) - set(BY_NAME))
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(BY_NAME)}"
        )
    given = {k.name: _coerce(k, run_config.get(k.name, k.default)) for k in SCHEMA}
    cfg = Config(**{name.replace("-", "_"): v for name, v in _resolve_auto(given).items()})
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
    return cfg


def _resolve_auto(given: dict[str, Any]) -> dict[str, Any]:
    """The keys left at ``auto`` set to what the algorithm chose for them, the others'
    neutral value where it chose nothing: a run's config (and its ``config.json``) records
    what ran, never ``auto``."""
    algorithm = given["algorithm"]
    chosen = algorithm.spec.defaults(given)
    out = dict(given)
    for key in SCHEMA:
        if key.auto and given[key.name] == AUTO:
            out[key.name] = _coerce(key, chosen.get(key.name, key.neutral))
    return out


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
                          f"bounds the meme's updates, but algorithm "
                          f"{cfg.algorithm.value!r} sends none: expected 0")
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


def recorded_config(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """A run's recorded config (``config.json``, a checkpoint's) with every key of today's
    schema: a key added since it was written ran at its default then, which for a key that
    now takes ``auto`` was its neutral value (``auto`` is newer than any of them)."""
    then = {k.name: k.neutral if k.auto else k.default for k in SCHEMA}
    then = {k: v.value if isinstance(v, Enum) else v for k, v in then.items()}
    return {**then, **recorded}


def config_changes(recorded: Mapping[str, Any], cfg: Config, label: str = "recorded",
                   may_differ: frozenset[str] = RESUMABLE) -> list[str]:
    """The keys outside ``may_differ`` (by default those a resumed run may change) in which
    a recorded run's config and ``cfg`` differ, each as "'key': <label> R, now N"."""
    then, now = recorded_config(recorded), cfg.to_dict()
    return [f"'{k}': {label} {then.get(k)!r}, now {now.get(k)!r}"
            for k in sorted(set(now) | set(then))
            if k not in may_differ and now.get(k) != then.get(k)]


def default_config() -> Config:
    """The schema defaults, validated."""
    return load_config({})
