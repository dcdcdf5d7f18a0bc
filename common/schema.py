"""Every run-config key, declared once: its type, default, allowed range, group and meaning.

Everything else is generated from this tuple: the validation (``common/config.py``), the
``[tool.flwr.app.config]`` block of ``pyproject.toml`` and ``docs/configuration.md``
(``python -m common.config_doc``), and the keys a resumed run may change. Plain Python,
no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from common.faults import parse_faults
from common.options import (
    DATASET_NAMES,
    MAX_PEERS,
    MODEL_NAMES,
    Aggregation,
    Algorithm,
    ClientSampling,
    Compression,
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


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range, or a combination
    of keys that cannot run."""


AUTO = "auto"
"""The value of a key that takes its algorithm's default (a key with ``Key.neutral``)."""


@dataclass(frozen=True)
class Key:
    """One run-config key. ``allowed`` is the range in words (enums list their values);
    ``resumable`` keys may differ between a run and its ``resume-from``."""

    name: str
    type: type
    default: Any
    group: str
    doc: str
    check: Callable[[Any], bool] | None = None
    allowed: str = ""
    resumable: bool = False
    neutral: Any = None

    @property
    def auto(self) -> bool:
        """Whether the key also takes ``auto``, the algorithm's own default
        (``Algorithm.defaults``; ``neutral``, the value that switches the key off, where the
        algorithm names none). Its schema default is then ``auto``: Flower's run config
        carries every key of ``pyproject.toml``, so a key's absence cannot say "default"."""
        return self.neutral is not None

    def describe(self) -> str:
        """What the key accepts, as error messages and the reference page say it."""
        if issubclass(self.type, Enum):
            values = "one of " + ", ".join(m.value for m in self.type)
        else:
            values = self.allowed or f"a {self.type.__name__}"
        return f"'{AUTO}' or {values}" if self.auto else values


def _in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable:
    def check(v: float) -> bool:
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return check


def _positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


def _non_negative(v: float) -> bool:
    return math.isfinite(v) and v >= 0


INT_MAX = 2**31 - 1
"""The cap on every integer key but ``seed``: far above any real count, so a typo such as
10**30 is refused here instead of overflowing (or running forever) later."""
SEED_MAX = 2**63 - 1
"""``seed``'s cap: Flower carries run-config integers as sint64 (torch.manual_seed takes up
to 2**64 - 1, numpy's global seed is taken mod 2**32, ``derive_seed`` hashes any)."""
MAX_CLASSES = 100_000
"""The most classes a task may have: the cap on ``num-classes`` and, when it is 0, on every
npz label (one label typo of 10**9 would otherwise give the server a 10**9-way output)."""
MAX_ROUND_TIMEOUT = 7 * 24 * 3600.0
"""``round-timeout``'s cap (seconds, 7 days): a wait must end."""


def _ints(lo: int, hi: int = INT_MAX, note: str = "") -> tuple[Callable[[int], bool], str]:
    """An integer key's check and its words: every integer key is bounded on both sides."""
    return _in(lo, hi), f"an integer in [{lo}, {hi}]" + (f" {note}" if note else "")


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


def floats(v: str) -> tuple[float, ...]:
    """A comma list of numbers (``npz-mean``, ``npz-std``)."""
    return tuple(float(x) for x in v.split(","))


def _float_list(each: Callable[[float], bool]) -> Callable[[str], bool]:
    def check(v: str) -> bool:
        try:
            values = floats(v)
        except ValueError:
            return False
        return all(math.isfinite(x) and each(x) for x in values)

    return check


def _model_list(v: str) -> bool:
    names = [n.strip() for n in v.split(",")] if v.strip() else []
    return all(n in MODEL_NAMES for n in names)


_MODELS = ", ".join(MODEL_NAMES)
_RANGE_01 = "a number in [0, 1]"
GROUPS = ("training", "mutual learning", "data", "aggregation", "privacy", "deployment", "run")

T, M, D, A, P, DEP, R = GROUPS
SCHEMA: tuple[Key, ...] = (
    # ---------------------------------------------------------------- training
    Key("algorithm", Algorithm, Algorithm.FML, T, "; ".join(
        f"`{a.value}`: {a.spec.summary}" for a in Algorithm)),
    Key("num-server-rounds", int, 5, T, "rounds", *_ints(1), resumable=True),
    Key("local-epochs", int, 1, T, "epochs of local training per round", *_ints(1)),
    Key("batch-size", int, 32, T, "local training batch size", *_ints(1)),
    Key("lr", float, 0.01, T, "SGD learning rate, both models", _positive, "a finite number > 0"),
    Key("momentum", float, 0.9, T, "SGD momentum, both models", _in(0, 1, hi_open=True),
        "a number in [0, 1)"),
    Key("weight-decay", float, 0.0, T, "SGD weight decay, both models", _non_negative,
        "a finite number >= 0"),
    Key("proximal-mu", float, 0.01, T, "FedProx's μ (`fedprox` only)", _non_negative,
        "a finite number >= 0"),
    Key("finetune-epochs", int, 1, T, "`fedavg-ft` (and FML's `personal-model`): epochs "
        "each client fine-tunes the global model on its training split before it is "
        "evaluated", *_ints(1)),
    Key("ditto-lambda", float, 0.1, T, "`ditto`: λ of the personal model's pull "
        "λ/2·‖v − w_global‖² toward the global model", _non_negative, "a finite number >= 0"),
    Key("codistill-every", int, 1, T, "`codistill`: forward teachers every k-th round "
        "after the burn-in (each client's model goes up in the round before)", *_ints(1)),
    Key("codistill-burnin", int, 1, T, "`codistill`: the first k rounds learn from the "
        "labels only; teachers are forwarded in rounds k+1, k+1+every, … (with 0 the "
        "first exchange, round 1, has nothing to forward yet)", *_ints(0)),
    Key("codistill-teachers", int, 3, T, "`codistill`: how many other clients' latest "
        "models each client receives at an exchange (drawn with the round's seed)",
        *_ints(1, 16)),
    Key("meme-model", str, "cnn", T,
        "the shared model: `cnn` (FedAvg/PFLlib 2-conv CNN), `cnn-bn` (the same with "
        "BatchNorm), `mlp` (2×200), `cnn-cifar` (FedAvg CIFAR CNN), `resnet18` "
        "(torchvision, 3×3 stem for 32 px)", lambda v: v in MODEL_NAMES, f"one of {_MODELS}"),
    Key("local-model", str, "cnn", T, "the private model's architecture (any of the "
        "models; a node's `--node-config local-model=…` wins)",
        lambda v: v in MODEL_NAMES, f"one of {_MODELS}"),
    Key("local-models", str, "", T, "private architectures assigned by partition id, "
        "cycled; empty: `local-model` everywhere", _model_list,
        f"empty or a comma list of {_MODELS}"),
    Key("device", str, "auto", T, "`auto`: CUDA when Ray gives the client a GPU, else the "
        "CPU", _device, "auto, cpu, cuda or cuda:N", resumable=True),
    Key("precision", Precision, Precision.FP32, T,
        "`bf16`: local training's forward passes and losses run under bfloat16 autocast "
        "(weights, gradients and SGD stay float32), for GPUs with bf16 units; on a CPU "
        "without them it is slower. Evaluation stays float32", resumable=True),
    Key("torch-compile", bool, False, T, "train both models through `torch.compile` "
        "(inductor; on the CPU it needs a C++ compiler): each worker process compiles once, "
        "then reuses the code for every client and round. Not bit-identical to eager",
        resumable=True),
    Key("evaluate-every", int, 1, T, "evaluate (clients' test splits and the central test "
        "set) every k-th round and in the last; training is the same as with 1, the other "
        "rounds' evaluation keys stay null", *_ints(1), resumable=True),
    # ---------------------------------------------------------------- mutual learning
    Key("alpha", float, 0.5, M, "CE weight of the private model's loss; (1-α) weighs its "
        "KL toward the meme", _in(0, 1), _RANGE_01),
    Key("beta", float, 0.5, M, "CE weight of the meme's loss; (1-β) weighs its KL toward "
        "the private model", _in(0, 1), _RANGE_01),
    Key("temperature", float, 1.0, M, "distillation temperature T (the KL is scaled by T²)",
        _positive, "a finite number > 0"),
    Key("distill-weighting", DistillWeighting, DistillWeighting.ADDITIVE, M,
        "`additive`: CE at full weight plus (1-α)·KL (resp. β), distillation as a "
        "regulariser on top of plain training (Hinton et al. 2015); `fixed`: the convex "
        "α·CE + (1-α)·KL of the FML paper (Shen et al. 2020), which halves the label "
        "gradient at α = 0.5; `adaptive`: each KL divided by the batch's detached "
        "CE_local + CE_meme, so a poor teacher pulls less (FedKD, Wu et al. 2022)"),
    Key("distill-gate", DistillGate, DistillGate.NONE, M,
        "which samples' KL toward a teacher counts: `correct` (the teacher predicts the "
        "label), `confident` (its top probability >= `distill-gate-threshold`); every "
        "sample keeps its CE (confidence-filtered distillation, as in FixMatch)"),
    Key("distill-gate-threshold", float, 0.5, M, "the teacher's top probability that "
        "`confident` needs", _in(0, 1), _RANGE_01),
    Key("distill-prior", DistillPrior, DistillPrior.NONE, M,
        "`client`: the meme teaches with its logits plus the log of the client's label "
        "prior (logit adjustment, Menon et al. 2021; FedLC, Zhang et al. 2022); `seen`: "
        "the meme renormalised over the client's own classes (FedRS, Li & Zhan 2021)"),
    Key("distill-hidden", float, 0.0, M, "`fml`: γ of FedKD's hidden-state loss (Wu et al. "
        "2022): each model also learns γ·MSE(h_self, h_other) / max(1, CE_self + CE_other), h the "
        "penultimate features (the input of its last linear layer), toward the other's "
        "detached ones (only a model that distils: not at α or β = 1, nor in the warm-up); "
        "every model needs one feature width; not with torch-compile. 0: off",
        _non_negative, "a finite number >= 0"),
    Key("warmup-rounds", int, 0, M, "a private model's first k trainings learn from the "
        "labels only (the meme still distils from it)", *_ints(0)),
    Key("private-peers", int, 1, M, "`fml`: K private models per client (deep mutual "
        "learning's students, the node's architecture), each learning CE + the mean KL toward "
        "all the others, the meme included; `local_accuracy` is the first, `peers_accuracy` "
        "their mean prediction, `peer_accuracies` each of the others alone. 1: the private "
        "model and the meme", *_ints(1, MAX_PEERS)),
    Key("peer-models", str, "", M, "`fml` with `private-peers` = K > 1: the architectures "
        "of peers 2…K, a comma list of K-1 models (heterogeneous students; the first peer "
        "is the node's `local-model`); empty: the node's `local-model` for every peer",
        _model_list, f"empty or a comma list of {_MODELS}"),
    Key("personal-model", PersonalModel, AUTO, M,
        "`fml`: the client's personalised model (`local_accuracy`): `private`; `tuned`, the "
        "meme it received after `finetune-epochs` of the mutual loss on its training split "
        "(the private model teaching, unchanged; FedAvg+FT's fine-tuning, Matsuda et al. "
        "2022, with FML's teacher); `choice`, the one of the two with the lower loss on a "
        "validation slice (`validation-fraction` of the training split, never trained on); "
        "`mix`, w·p_private + (1-w)·p_tuned with w in {0, 0.1, …, 1} chosen on that slice. "
        "Other than `private`, both are also reported (`private_accuracy`, "
        "`tuned_accuracy`). `auto`: `mix` for `fml` with one private model and no "
        "`personal-mix` (the payoff map's choice, docs/experiments.md), else `private` (every "
        "other algorithm's own personalised model)", neutral=PersonalModel.PRIVATE),
    Key("meme-epochs", int, AUTO, M, "`fml`: after the `local-epochs` of mutual learning, the "
        "meme trains this many more epochs of its own loss, the private models teaching "
        "frozen: a stronger meme to send up without more private training (the reply's train "
        "loss and accuracy are the mutual epochs'; its skipped steps count both). `auto`: 2 "
        "for `fml` (the payoff map's choice), 0 (off) for every other algorithm",
        *_ints(0, 100), neutral=0),
    Key("private-init", PrivateInit, PrivateInit.RANDOM, M,
        "`fml`: how the private model starts: `random` (its own seeded initialisation) or "
        "`meme`, a copy of the first meme the client receives where the two architectures "
        "match (as Ditto's personal model starts; the meme's features handed over before "
        "mutual learning begins). Peers 2…K keep their own initialisation"),
    Key("validation-fraction", float, 0.1, M, "`personal-model` = `choice` or `mix`: the "
        "share of each client's training split held out of training to choose on",
        _in(0.01, 0.5), "a number in [0.01, 0.5]"),
    Key("personal-mix", bool, False, M, "`fml` only: each client also learns w for its "
        "personalised prediction w·p_local + (1-w)·p_meme on its training data and is "
        "scored on it (`mix_accuracy`; APFL, Deng et al. 2020)"),
    # ---------------------------------------------------------------- data
    Key("dataset", str, "fashion-mnist", D,
        "`fashion-mnist`, `mnist`, `cifar10`, `cifar100` (torchvision layout under "
        "`data-dir`), `digits` (scikit-learn), `synthetic` (generated), `npz` (each "
        "node's own file)", lambda v: v in DATASET_NAMES,
        f"one of {', '.join(DATASET_NAMES)}"),
    Key("data-dir", str, "", D, "folder of the dataset files; empty: "
        "`~/.cache/fedmutual/data` (Fashion-MNIST also from Debian's package)"),
    Key("data-path", str, "", D, "`npz` only: a file with `x` (N,H,W / N,C,H,W / N,H,W,C) "
        "and integer `y`, optional `x_test`/`y_test`; `{partition-id}` is replaced per "
        "client; a node's `--node-config data-path=…` wins"),
    Key("npz-mean", str, "0", D, "`npz` only: every node maps uint8 to [0, 1], then "
        "(x - mean) / std, one value or one per channel: one input space for the meme",
        _float_list(lambda v: True), "a comma list of numbers"),
    Key("npz-std", str, "1", D, "`npz` only: see `npz-mean`",
        _float_list(lambda v: v > 0), "a comma list of numbers > 0"),
    Key("num-classes", int, 0, D, "`npz`: the federation's class count; built-in datasets "
        "take 0 or their own count", *_ints(
            0, MAX_CLASSES, "(0: for npz, agreed by the nodes identified when the run "
            "starts: the largest of their class counts that is at most twice the median)")),
    Key("partitioner", Partitioner, Partitioner.DIRICHLET, D,
        "how a built-in dataset is split across simulated clients (flwr-datasets)"),
    Key("dirichlet-alpha", float, 0.1, D, "`dirichlet`: concentration of each client's "
        "label mix", _positive, "a finite number > 0"),
    Key("classes-per-client", int, 2, D, "`pathological`: labels per client",
        *_ints(1, MAX_CLASSES)),
    Key("test-fraction", float, 0.25, D, "share of each client's partition held out as its "
        "personal test set", _in(0, 1, True, True), "a number in (0, 1)"),
    # ---------------------------------------------------------------- aggregation
    Key("fraction-train", float, 1.0, A, "share of the connected clients sampled to train "
        "each round", _in(0, 1, lo_open=True), "a number in (0, 1]"),
    Key("fraction-evaluate", float, 1.0, A, "share sampled to evaluate each round",
        _in(0, 1, lo_open=True), "a number in (0, 1]"),
    Key("client-sampling", ClientSampling, ClientSampling.RANDOM, A,
        "how a round picks its `fraction-train` / `fraction-evaluate` share: `random` (a "
        "seeded draw each round) or `cyclic` (passes over a seeded shuffle of the clients: "
        "each one trains once per pass, so a population of N is covered in N / sampled "
        "rounds)"),
    Key("aggregation", Aggregation, Aggregation.WEIGHTED, A,
        "`weighted` (by num-examples), `uniform` (as in the FML paper); robust, through "
        "Flower's strategies: `median`, `trimmed-mean` (`trimmed-mean-beta` per side), "
        "`krum` and `multi-krum` (tolerating `num-malicious`)"),
    Key("server-lr", float, 1.0, A, "the server's step along the round's averaged change of "
        "the meme (FedAvgM, Hsu et al. 2019): w_sent - server-lr·v; 1 with no momentum is "
        "the aggregate itself", _in(0, 10, lo_open=True), "a number in (0, 10]"),
    Key("server-momentum", float, 0.0, A, "μ of the server's velocity v <- μ·v + (w_sent - "
        "w_aggregate) (FedAvgM); applied after DP's noise and SecAgg+'s sum, kept in the "
        "checkpoint; not with `compression-down` (the velocity would gather its rounding)",
        _in(0, 1, hi_open=True), "a number in [0, 1)"),
    Key("trimmed-mean-beta", float, 0.2, A, "`trimmed-mean`: share cut on each side",
        _in(0, 0.5, hi_open=True), "a number in [0, 0.5)"),
    Key("num-malicious", int, 1, A, "`krum`, `multi-krum`: clients tolerated",
        *_ints(0)),
    Key("max-client-weight", int, 0, A, "`weighted`: cap on a reply's num-examples",
        *_ints(0, note="(0: 10 × the median train split the clients reported when "
               "identified)")),
    Key("max-update-norm", float, 0.0, A, "a train reply whose meme lies further than this "
        "from the meme sent (L2 norm of the change, floating arrays) is rejected: it would "
        "otherwise move a `weighted` or `uniform` mean as far as it likes (0: no bound); not "
        "with `secure-aggregation` (the server sees only the sum: `secagg-clipping-range` "
        "bounds it); the accepted replies' norms are recorded (`update_norm`); may change on "
        "`resume-from`", _non_negative, "a finite number >= 0", resumable=True),
    # ---------------------------------------------------------------- privacy
    Key("dp-mode", DpMode, DpMode.NONE, P,
        "client-level DP on the meme: `server` (the server clips each update), `client` "
        "(each client clips its own); needs `aggregation = \"uniform\"`"),
    Key("dp-noise-multiplier", float, 1.0, P, "σ: the noise std on the average is σ·C/m "
        "for m sampled clients", _non_negative, "a finite number >= 0"),
    Key("dp-clipping-norm", float, 1.0, P, "C: the L2 bound on each client's meme update",
        _positive, "a finite number > 0"),
    Key("dp-delta", float, 1e-5, P, "the δ at which ε is reported", _in(0, 1, True, True),
        "a number in (0, 1)"),
    Key("secure-aggregation", bool, False, P, "SecAgg+ (Flower's protocol): the server "
        "sees only the sum of the memes"),
    Key("secagg-num-shares", float, 1.0, P, "share of the sampled clients each one shares "
        "its keys with", _in(0, 1, lo_open=True), "a number in (0, 1]"),
    Key("secagg-threshold", float, 0.5, P, "share of those shares needed to unmask a "
        "dropped client", _in(0, 1, lo_open=True), "a number in (0, 1]"),
    Key("secagg-clipping-range", float, 8.0, P, "meme values must lie in ±this (the "
        "quantizer's range)", _positive, "a finite number > 0"),
    Key("audit-dir", str, "", P, "record every reply each client sends (and a snapshot of "
        "its private model) under this folder; empty: off", resumable=True),
    # ---------------------------------------------------------------- deployment
    Key("min-clients", int, 2, DEP, "clients that must be connected (and are sampled at "
        "least) before a round starts", *_ints(1), resumable=True),
    Key("node-authentication", bool, False, DEP, "the SuperLink authenticates its nodes "
        "(`--enable-supernode-auth`): each client key is bound, for the whole run, to the "
        "first authenticated node (Flower node id) that claims it; another node claiming it "
        "is refused, even after the first disconnects. Off: a node's claim of its key is "
        "trusted, first come first served among connected nodes", resumable=True),
    Key("round-timeout", float, 3600.0, DEP, "seconds a round (and the wait for clients) "
        "lasts at most", _in(0, MAX_ROUND_TIMEOUT, lo_open=True),
        "seconds in (0, 604800] (7 days)", resumable=True),
    Key("state-dir", str, "", DEP, "folder where each client keeps its private model "
        "between rounds and restarts; empty: in memory for the run; a node's "
        "`--node-config state-dir=…` wins", resumable=True),
    Key("private-store", PrivateStore, PrivateStore.MEMORY, DEP,
        "where each client keeps its private model between rounds: `memory` (the node's "
        "state, plus `state-dir` when set) or `disk` (only `state-dir`, read and written "
        "each round: a simulation's memory then grows with the clients of a round, not "
        "with the population)", resumable=True),
    Key("reset-private", bool, False, DEP, "ignore private models saved before this run and "
        "start fresh"),
    Key("compression", Compression, Compression.NONE, DEP,
        "what a client sends up: `none` (the meme, float32), or its update (meme - "
        "received) as `fp16`, `int8` (one scale per tensor), `topk` (the largest "
        "`compression-ratio` share, the rest fed back into the next update) or `svd` (each "
        "matrix at the rank keeping `compression-energy`, FedKD); the server decodes first"),
    Key("compression-ratio", float, 0.1, DEP, "`topk`: share of each array's entries sent",
        _in(0, 1, lo_open=True), "a number in (0, 1]"),
    Key("compression-energy", float, 0.95, DEP, "`svd`: share of the squared singular values "
        "kept", _in(0, 1, lo_open=True), "a number in (0, 1]"),
    Key("compression-down", DownCompression, DownCompression.NONE, DEP,
        "what the server sends down: `none` (the meme, float32) or `fp16` (its floating "
        "arrays in half precision, half the bytes; clients train from that rounded meme "
        "and the server decodes their updates against it)"),
    Key("faults", str, "", DEP, "inject faults (robustness experiments): `raise:P[@R]`, "
        "`nan:P[@R]`, `scaleK:P[@R]` (a poisoning client), `forge:P[@R]` (arrays whose bytes "
        "are not what they declare), `slowS:P[@R]` (a straggler), "
        "P the partition id, R a round (default every round)", _faults,
        "empty or a comma list of KIND:PARTITION[@ROUND], KIND raise, nan, scale<FACTOR>, "
        "forge or slow<SECONDS>"),
    # ---------------------------------------------------------------- run
    Key("seed", int, 42, R, "seeds python, numpy, torch, partitioning, initialisation, "
        "shuffling and sampling; never DP noise, the sample under DP or SecAgg+ masks "
        "(the OS's secure source)", *_ints(0, SEED_MAX)),
    Key("resume-from", str, "", R, "a run folder to continue after its last checkpoint",
        resumable=True),
    Key("output-dir", str, "", R, "results root; empty: `outputs/` in the project; relative "
        "paths are taken from the project folder", resumable=True),
    Key("run-name", str, "", R, "results folder; empty: "
        "`<algorithm>-<dataset>-seed<seed>-<UTC time>`",
        lambda v: "/" not in v and v not in (".", ".."), "a folder name without '/'",
        resumable=True),
)
BY_NAME: dict[str, Key] = {k.name: k for k in SCHEMA}
RESUMABLE: frozenset[str] = frozenset(k.name for k in SCHEMA if k.resumable)
