"""The named choices of a run: algorithms, aggregation rules, privacy modes, partitioners,
mutual-learning variants, and the dataset and model names.

Plain Python, no torch: the config (and anything that only validates one) imports this,
while the modules that do the work (``models``, ``data``, ``mutual``) import their names
from here, so the config never has to import them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from common.algorithms import REGISTRY
from common.algorithms import get as get_algorithm

if TYPE_CHECKING:
    from common.algorithms.base import Algorithm as _AlgorithmSpec

DATASET_NAMES: tuple[str, ...] = (
    "fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "synthetic", "npz",
)
# common.models registers one builder per name and refuses to import if the two differ.
MODEL_NAMES: tuple[str, ...] = ("cnn", "cnn-bn", "mlp", "cnn-cifar", "resnet18", "lenet5")
#: the most private models an FML client may hold (`private-peers`)
MAX_PEERS = 8


class _Algorithm(StrEnum):
    """The run-config key ``algorithm``: one member per registered algorithm
    (:mod:`common.algorithms`), whose module says what it does."""

    @property
    def spec(self) -> _AlgorithmSpec:
        """The algorithm's module object (slots, losses, evaluation)."""
        return get_algorithm(self.value)

    @property
    def trains_local(self) -> bool:
        """Whether clients keep private models (never sent)."""
        return bool(self.spec.private)

    @property
    def trains_meme(self) -> bool:
        """Whether clients train (and the server combines) the shared meme."""
        return self.spec.shared is not None


Algorithm = _Algorithm("Algorithm", {n.upper().replace("-", "_"): n for n in REGISTRY})


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


class DistillWeighting(StrEnum):
    """How strongly each KL term counts (run-config ``distill-weighting``)."""

    FIXED = "fixed"  # (1-α) and (1-β) as written
    ADAPTIVE = "adaptive"  # divided by the batch's detached CE_local + CE_meme (FedKD)
    ADDITIVE = "additive"  # CE at full weight plus (1-α)·KL: distillation as a regulariser


class DistillGate(StrEnum):
    """Which samples' KL toward a teacher counts (run-config ``distill-gate``)."""

    NONE = "none"
    CORRECT = "correct"  # only where the teacher predicts the true label
    CONFIDENT = "confident"  # only where the teacher's top probability >= the threshold


class DistillPrior(StrEnum):
    """Whether the meme, as a teacher, is first corrected by the client's label prior."""

    NONE = "none"
    CLIENT = "client"  # meme logits + log(client label prior): no mass on unseen classes
    SEEN = "seen"  # meme renormalised over the classes the client has, seen ones unchanged


class DownCompression(StrEnum):
    """How the server sends the meme down (run-config ``compression-down``)."""

    NONE = "none"  # float32, as it is
    FP16 = "fp16"  # floating arrays in half precision: half the bytes down


class ClientSampling(StrEnum):
    """How each round picks its share of the clients (run-config ``client-sampling``)."""

    RANDOM = "random"  # a fresh seeded draw every round (Flower's sampler)
    CYCLIC = "cyclic"  # passes over a seeded shuffle: every client once per pass


class PersonalModel(StrEnum):
    """FML's personalised prediction (run-config ``personal-model``)."""

    PRIVATE = "private"  # the private model
    TUNED = "tuned"  # the received meme after one local update of the mutual loss
    CHOICE = "choice"  # private or tuned, whichever has the lower loss on the validation slice
    MIX = "mix"  # w·p_private + (1-w)·p_tuned, w in {0, 0.1, …, 1} chosen on that slice


class PrivateInit(StrEnum):
    """How FML's private model starts (run-config ``private-init``)."""

    RANDOM = "random"  # its own seeded initialisation
    MEME = "meme"  # the first meme it receives, where the architectures match (Ditto's start)


class Precision(StrEnum):
    """The arithmetic of local training's forward passes (run-config ``precision``)."""

    FP32 = "fp32"  # float32 throughout
    BF16 = "bf16"  # forward and losses under bfloat16 autocast; weights, grads, SGD in float32


class PrivateStore(StrEnum):
    """Where a client keeps its private model between rounds (run-config ``private-store``)."""

    MEMORY = "memory"  # in context.state (and also in state-dir when one is set)
    DISK = "disk"  # only in state-dir: memory grows with a round's clients, not the population


class Compression(StrEnum):
    """How a client encodes its meme update (run-config ``compression``)."""

    NONE = "none"  # the meme itself, float32
    FP16 = "fp16"  # the update in half precision
    INT8 = "int8"  # the update quantised to int8 with one scale per tensor
    TOPK = "topk"  # the largest compression-ratio share of the update, with error feedback
    SVD = "svd"  # each matrix update at the rank that keeps compression-energy (FedKD)


@dataclass(frozen=True)
class Codec:
    """The run config's ``compression``, ``compression-ratio`` and ``compression-energy``
    (``common/compression.py`` does the encoding)."""

    mode: Compression = Compression.NONE
    ratio: float = 0.1
    energy: float = 0.95


@dataclass(frozen=True)
class Distill:
    """The mutual-learning variant: every option is a run-config key (``distill-*``).

    The defaults are the loss as written (``fixed``); the run config's default is the
    schema's (``common/schema.py``).
    """

    weighting: DistillWeighting = DistillWeighting.FIXED
    gate: DistillGate = DistillGate.NONE
    gate_threshold: float = 0.5
    prior: DistillPrior = DistillPrior.NONE
    hidden: float = 0.0  # FedKD's hidden-state loss weight (common/hidden.py); 0: off
