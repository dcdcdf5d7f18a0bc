"""The run-config schema: every key, its type, default and allowed range, validated once.

Flower hands the ServerApp and every ClientApp the same ``context.run_config``. Both call
:func:`load_config` before doing any work, so a bad value fails with one clear message
(naming the key, the value and what is allowed) before anything is trained.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from common.data import DATASET_NAMES
from common.faults import Fault, parse_faults
from common.models import MODEL_NAMES
from common.mutual import Distill, DistillGate, DistillPrior, DistillWeighting


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""


class Algorithm(StrEnum):
    """The training algorithms of the harness; the only place that maps names to behaviour."""

    FML = "fml"
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    LOCAL = "local"

    @property
    def trains_local(self) -> bool:
        """Whether clients train a private local model."""
        return self in (Algorithm.FML, Algorithm.LOCAL)

    @property
    def trains_meme(self) -> bool:
        """Whether clients train (and the server aggregates) the shared meme model."""
        return self is not Algorithm.LOCAL

    @property
    def distills(self) -> bool:
        """Whether local and meme distil from each other (deep mutual learning)."""
        return self is Algorithm.FML


class Aggregation(StrEnum):
    """How the server weighs the clients' memes."""

    WEIGHTED = "weighted"  # by num-examples (FedAvg)
    UNIFORM = "uniform"  # equal weights (as in the FML paper)
    MEDIAN = "median"  # coordinate-wise median (Flower's FedMedian)
    TRIMMED_MEAN = "trimmed-mean"  # Flower's FedTrimmedAvg, cutting trimmed-mean-beta per side
    KRUM = "krum"  # Flower's Krum, tolerating num-malicious clients
    MULTI_KRUM = "multi-krum"  # Flower's MultiKrum: the n - num-malicious best, averaged

    @property
    def robust(self) -> bool:
        """Whether Flower's robust aggregation strategy does the averaging."""
        return self not in (Aggregation.WEIGHTED, Aggregation.UNIFORM)


class DpMode(StrEnum):
    """Client-level differential privacy on the meme (Flower's fixed-clipping wrappers)."""

    NONE = "none"
    SERVER = "server"  # the server clips each meme update, then noises the average
    CLIENT = "client"  # each client clips its own update (a client mod); the server noises

    @property
    def enabled(self) -> bool:
        """Whether updates are clipped and the average noised."""
        return self is not DpMode.NONE


class Partitioner(StrEnum):
    """How a built-in dataset is split across simulated clients."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    PATHOLOGICAL = "pathological"


def _in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable:
    def check(v: float) -> bool:
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return check


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _device(v: str) -> bool:
    if v in ("auto", "cpu", "cuda"):
        return True
    return v.startswith("cuda:") and v[5:].isdigit()


def _faults(v: str) -> bool:
    try:
        parse_faults(v)
    except ValueError:
        return False
    return True


def _floats(v: str) -> tuple[float, ...]:
    return tuple(float(x) for x in v.split(","))


def _float_list(each: Callable[[float], bool]) -> Callable[[str], bool]:
    def check(v: str) -> bool:
        try:
            values = _floats(v)
        except ValueError:
            return False
        return all(math.isfinite(x) and each(x) for x in values)

    return check


def _model_list(v: str) -> bool:
    names = [n.strip() for n in v.split(",")] if v.strip() else []
    return all(n in MODEL_NAMES for n in names)


@dataclass(frozen=True)
class _Key:
    name: str
    type: type
    default: Any
    check: Callable[[Any], bool] | None = None
    allowed: str = ""


_MODELS = ", ".join(MODEL_NAMES)
SCHEMA: tuple[_Key, ...] = (
    _Key("algorithm", Algorithm, Algorithm.FML),
    _Key("num-server-rounds", int, 5, _positive, "an integer >= 1"),
    _Key("fraction-train", float, 1.0, _in(0, 1, lo_open=True), "a number in (0, 1]"),
    _Key("fraction-evaluate", float, 1.0, _in(0, 1, lo_open=True), "a number in (0, 1]"),
    _Key("min-clients", int, 2, _positive, "an integer >= 1"),
    _Key("round-timeout", float, 3600.0, _positive, "seconds > 0"),
    _Key("local-epochs", int, 1, _positive, "an integer >= 1"),
    _Key("batch-size", int, 32, _positive, "an integer >= 1"),
    _Key("lr", float, 0.01, _positive, "a number > 0"),
    _Key("momentum", float, 0.9, _in(0, 1, hi_open=True), "a number in [0, 1)"),
    _Key("weight-decay", float, 0.0, _non_negative, "a number >= 0"),
    _Key("alpha", float, 0.5, _in(0, 1), "a number in [0, 1]"),
    _Key("beta", float, 0.5, _in(0, 1), "a number in [0, 1]"),
    _Key("temperature", float, 1.0, _positive, "a number > 0"),
    _Key("distill-weighting", DistillWeighting, DistillWeighting.FIXED),
    _Key("distill-gate", DistillGate, DistillGate.NONE),
    _Key("distill-gate-threshold", float, 0.5, _in(0, 1), "a number in [0, 1]"),
    _Key("distill-prior", DistillPrior, DistillPrior.NONE),
    _Key("warmup-rounds", int, 0, _non_negative, "an integer >= 0"),
    _Key("personal-mix", bool, False),
    _Key("proximal-mu", float, 0.01, _non_negative, "a number >= 0"),
    _Key("aggregation", Aggregation, Aggregation.WEIGHTED),
    _Key("trimmed-mean-beta", float, 0.2, _in(0, 0.5, hi_open=True), "a number in [0, 0.5)"),
    _Key("num-malicious", int, 1, _non_negative, "an integer >= 0"),
    _Key("max-client-weight", int, 0, _non_negative,
         "an integer >= 0 (0: the largest train split reported by the clients)"),
    _Key("meme-model", str, "cnn", lambda v: v in MODEL_NAMES, f"one of {_MODELS}"),
    _Key("local-model", str, "cnn", lambda v: v in MODEL_NAMES, f"one of {_MODELS}"),
    _Key("local-models", str, "", _model_list, f"empty or a comma list of {_MODELS}"),
    _Key(
        "dataset", str, "fashion-mnist", lambda v: v in DATASET_NAMES,
        f"one of {', '.join(DATASET_NAMES)}",
    ),
    _Key("data-dir", str, ""),
    _Key("data-path", str, ""),
    _Key("npz-mean", str, "0", _float_list(lambda v: True), "a comma list of numbers"),
    _Key("npz-std", str, "1", _float_list(lambda v: v > 0), "a comma list of numbers > 0"),
    _Key("num-classes", int, 0, _non_negative,
         "an integer >= 0 (0: for npz, one more than the largest label of the nodes "
         "identified when the run starts)"),
    _Key("partitioner", Partitioner, Partitioner.DIRICHLET),
    _Key("dirichlet-alpha", float, 0.1, _positive, "a number > 0"),
    _Key("classes-per-client", int, 2, _positive, "an integer >= 1"),
    _Key("test-fraction", float, 0.25, _in(0, 1, True, True), "a number in (0, 1)"),
    _Key("seed", int, 42, _non_negative, "an integer >= 0"),
    _Key("device", str, "auto", _device, "auto, cpu, cuda or cuda:N"),
    _Key("state-dir", str, ""),
    _Key("reset-private", bool, False),
    _Key("resume-from", str, ""),
    _Key("faults", str, "", _faults,
         "empty or a comma list of KIND:PARTITION[@ROUND], KIND raise, nan, scale<FACTOR> "
         "or slow<SECONDS>"),
    _Key("dp-mode", DpMode, DpMode.NONE),
    _Key("dp-noise-multiplier", float, 1.0, _non_negative, "a number >= 0"),
    _Key("dp-clipping-norm", float, 1.0, _positive, "a number > 0"),
    _Key("dp-delta", float, 1e-5, _in(0, 1, True, True), "a number in (0, 1)"),
    _Key("secure-aggregation", bool, False),
    _Key("secagg-num-shares", float, 1.0, _in(0, 1, lo_open=True), "a number in (0, 1]"),
    _Key("secagg-threshold", float, 0.5, _in(0, 1, lo_open=True), "a number in (0, 1]"),
    _Key("secagg-clipping-range", float, 8.0, _positive, "a number > 0"),
    _Key("audit-dir", str, ""),
    _Key("output-dir", str, ""),
    _Key("run-name", str, "", lambda v: "/" not in v and v not in (".", ".."),
         "a folder name without '/'"),
)
_BY_NAME = {k.name: k for k in SCHEMA}


@dataclass(frozen=True)
class Config:
    """The validated run config; attribute names are the keys in snake_case."""

    algorithm: Algorithm
    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_clients: int
    round_timeout: float
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
    warmup_rounds: int
    personal_mix: bool
    proximal_mu: float
    aggregation: Aggregation
    trimmed_mean_beta: float
    num_malicious: int
    max_client_weight: int
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
    state_dir: str
    reset_private: bool
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
    def distill(self) -> Distill:
        """The mutual-learning variant (the ``distill-*`` keys) for the loss."""
        return Distill(self.distill_weighting, self.distill_gate, self.distill_gate_threshold,
                       self.distill_prior)

    @property
    def npz_mean_values(self) -> tuple[float, ...]:
        """``npz-mean`` parsed: one value, or one per channel."""
        return _floats(self.npz_mean)

    @property
    def npz_std_values(self) -> tuple[float, ...]:
        """``npz-std`` parsed: one value, or one per channel."""
        return _floats(self.npz_std)

    def local_model_for(self, partition_id: int | None) -> str:
        """The private model's architecture: ``local-models`` cycled by partition id."""
        names = [n.strip() for n in self.local_models.split(",") if n.strip()]
        if names and partition_id is not None:
            return names[partition_id % len(names)]
        return self.local_model


def _describe(key: _Key) -> str:
    if isinstance(key.type, type) and issubclass(key.type, Enum):
        return "one of " + ", ".join(m.value for m in key.type)
    return key.allowed or f"a {key.type.__name__}"


def _coerce(key: _Key, value: Any) -> Any:
    def fail() -> ConfigError:
        return ConfigError(
            f"run-config key '{key.name}' = {value!r} is invalid: expected {_describe(key)}"
        )

    if issubclass(key.type, Enum):
        try:
            return key.type(value)
        except ValueError:
            raise fail() from None
    accepted = (int, float) if key.type is float else (key.type,)
    if isinstance(value, bool) != (key.type is bool) or not isinstance(value, accepted):
        raise fail()
    value = key.type(value)
    if key.check is not None and not key.check(value):
        raise fail()
    return value


def load_config(run_config: Mapping[str, Any]) -> Config:
    """Validate a Flower run config (kebab-case keys) and return it typed.

    Missing keys take the schema default; unknown keys are refused, since a typo would
    otherwise be silently ignored.
    """
    unknown = sorted(set(run_config) - set(_BY_NAME))
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(_BY_NAME)}"
        )
    values = {
        k.name.replace("-", "_"): _coerce(k, run_config.get(k.name, k.default)) for k in SCHEMA
    }
    cfg = Config(**values)
    if cfg.algorithm is Algorithm.FEDPROX and cfg.proximal_mu == 0:
        raise ConfigError(
            "run-config key 'proximal-mu' = 0 with algorithm 'fedprox' is just 'fedavg': "
            "expected a number > 0"
        )
    if cfg.aggregation.robust and cfg.algorithm is Algorithm.LOCAL:
        raise ConfigError(f"run-config key 'aggregation' = {cfg.aggregation.value!r} needs a "
                          "meme, but algorithm 'local' aggregates nothing: expected 'weighted'")
    if cfg.personal_mix and cfg.algorithm is not Algorithm.FML:
        raise ConfigError(f"run-config key 'personal-mix' = true mixes the private model and "
                          f"the meme, but algorithm {cfg.algorithm.value!r} trains only one: "
                          "expected algorithm 'fml'")
    _check_privacy(cfg)
    return cfg


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
    if not cfg.secure_aggregation:
        return
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


def default_config() -> Config:
    """The schema defaults, validated."""
    return load_config({})
