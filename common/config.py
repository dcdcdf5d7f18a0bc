"""The validated run config: the schema's keys, typed, checked once (the rules that span
several keys: ``common/config_rules.py``), and how a recorded config compares with today's.

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

from common.config_rules import check_rules
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
from common.schema import AUTO, BY_NAME, RESUMABLE, SCHEMA, ConfigError, Key, floats

__all__ = ["SCHEMA", "Aggregation", "Algorithm", "Config", "ConfigError", "DpMode",
           "Partitioner", "config_changes", "default_config", "load_config",
           "recorded_config"]


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
    check_rules(cfg)
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
