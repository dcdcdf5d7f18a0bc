"""What every algorithm declares and the defaults it inherits.

An algorithm is a :class:`Algorithm` subclass in its own module, with one instance called
``ALGORITHM``. Its facts (slots, the keys it reads) are plain Python, so the config can
check them without torch; what trains imports torch when it runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.options import MAX_PEERS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from common.compression import State
    from common.config import Config
    from common.training import Hyper


#: what an evaluation reply may score, by result name (``<name>-accuracy``, ``<name>-loss``):
#: ``local`` the personalised model, ``meme`` the shared one, ``mix`` personal-mix's mixture,
#: ``peers`` the K private peers' mean, ``private`` and ``tuned`` FML's private model and
#: fine-tuned meme when ``personal-model`` picks another
SCORED = ("local", "meme", "mix", "peers", "private", "tuned")
#: FML's private peers after the first, each scored alone
PEER_SCORED = tuple(f"peer-{k}" for k in range(2, MAX_PEERS + 1))


@dataclass(frozen=True)
class Slot:
    """One model a client holds.

    ``shared``: it goes up after training and the server combines it (the meme); else it
    is private and never leaves the device. ``arch``: whose architecture it has, the
    node's ``local-model`` ("local"), the federation's ``meme-model`` ("meme"), or a model
    named outright (``peer-models``).
    """

    name: str
    shared: bool = False
    arch: str = "local"


@dataclass(frozen=True)
class Evaluation:
    """What an algorithm may use to build the models it evaluates."""

    cfg: Config
    x_train: torch.Tensor
    y_train: torch.Tensor
    device: torch.device
    seed: int  # this client's and round's seed for anything random (fine-tuning's order)
    x_val: torch.Tensor | None = None  # the slice held out of training (:meth:`holdout`)
    y_val: torch.Tensor | None = None


def fit_split(cfg: Config, client_key: int, x_train: torch.Tensor, y_train: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_fit, y_fit, x_val, y_val): a client's training split less the slice its algorithm
    holds out (``Algorithm.holdout``), the same slice every round, for training and
    evaluation alike, and for whoever rebuilds an evaluation offline."""
    from common.data import validation_split
    from common.runtime import derive_seed

    return validation_split(x_train, y_train, cfg.algorithm.spec.holdout(cfg),
                            derive_seed(cfg.seed, "validation", client_key))


def client_evaluation(cfg: Config, client_key: int, x_train: torch.Tensor,
                      y_train: torch.Tensor, device: torch.device, server_round: int,
                      ) -> Evaluation:
    """What a client's evaluation of ``server_round`` builds its models from: its fit split,
    its held-out slice, and the seed of anything random (fine-tuning's order)."""
    from common.runtime import derive_seed

    x, y, x_val, y_val = fit_split(cfg, client_key, x_train, y_train)
    return Evaluation(cfg, x, y, device, derive_seed(cfg.seed, "finetune", client_key,
                                                     server_round), x_val, y_val)


class Algorithm:
    """The defaults: slots trained on plain cross-entropy, evaluated as they are.

    Results name two slots: ``local`` (the client's own, personalised model; reported as
    ``local_accuracy``) and ``meme`` (the shared model; ``meme_accuracy``).
    """

    name: str = ""
    summary: str = ""  # one line for the reference page
    slots: tuple[Slot, ...] = ()
    keeps_teachers: bool = False  # distils from forwarded teachers (``teacher-*`` records)

    # ---------------------------------------------------------------- facts
    @property
    def shared(self) -> Slot | None:
        """The slot that goes on the wire (at most one: the meme), else None."""
        return next((s for s in self.slots if s.shared), None)

    @property
    def private(self) -> tuple[Slot, ...]:
        """The slots that never leave the device."""
        return tuple(s for s in self.slots if not s.shared)

    def slots_for(self, cfg: Config) -> tuple[Slot, ...]:
        """The slots of a run with this config (an algorithm may hold K models)."""
        return self.slots

    def private_for(self, cfg: Config) -> tuple[Slot, ...]:
        """The private slots of a run with this config."""
        return tuple(s for s in self.slots_for(cfg) if not s.shared)

    def defaults(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """This algorithm's values for the keys a run leaves at ``auto`` (kebab-case names;
        ``given`` is the run config, typed, ``auto`` where left so); a key not named here
        takes its neutral value, the one that switches it off. None here."""
        return {}

    def check(self, cfg: Config) -> str | None:
        """Why this config cannot run this algorithm (a rule across keys), or None."""
        return None

    def holdout(self, cfg: Config) -> float:
        """The share of a client's training split kept out of training, for the algorithm
        to choose on at evaluation (``Evaluation.x_val``); none here."""
        return 0.0

    def uploads(self, cfg: Config, server_round: int) -> str | None:
        """The slot whose weights a client's train reply carries in ``server_round``: the
        shared one (None: nothing goes up but metrics)."""
        shared = self.shared
        return shared.name if shared is not None else None

    def solo_epochs(self, cfg: Config) -> int:
        """Epochs the shared slot trains alone after the joint ones, the private slots
        teaching frozen; none here."""
        return 0

    def teachers(self, cfg: Config, server_round: int) -> int:
        """How many other clients' latest uploads the server forwards to each trained
        client in ``server_round`` as frozen teachers (``teacher-1`` …; co-distillation);
        none here."""
        return 0

    # ---------------------------------------------------------------- server
    def train_config(self, cfg: Config) -> dict[str, float | int | str]:
        """What the server adds to every train message (FedProx's μ, say)."""
        return {}

    def combine(self, memes: Sequence[State], weights: Sequence[float], cfg: Config,
                ) -> State | None:
        """The shared model from the clients' checked ones; None: the rule the run config
        names (``aggregation``, :mod:`server.aggregate`), which is what every algorithm
        here uses."""
        return None

    # ---------------------------------------------------------------- client
    def hyper(self, cfg: Config, config: Mapping[str, Any], node_round: int,
              mix: float = 0.5) -> Hyper:
        """This update's hyper-parameters: ``config`` is the train message's config,
        ``node_round`` how often this node's private models have trained before, ``mix``
        the weight personal-mix learnt so far."""
        import torch

        from common.options import Precision
        from common.training import Hyper

        return Hyper(alpha=1.0, beta=1.0, temperature=cfg.temperature,
                     batch_size=cfg.batch_size, epochs=cfg.local_epochs, mix_lr=cfg.lr,
                     autocast=torch.bfloat16 if cfg.precision is Precision.BF16 else None,
                     compile=cfg.torch_compile)

    def warm_start(self, cfg: Config, private: Mapping[str, nn.Module],
                   received: Mapping[str, nn.Module]) -> None:
        """Initialise private models that have never trained from what the client received
        (the shared slots); nothing here: they keep their seeded initialisation."""

    def begin(self, models: Mapping[str, nn.Module], y: torch.Tensor, hp: Hyper) -> Any:
        """State that one local update's batches share (anchors, priors); None here."""
        return None

    def losses(self, out: Mapping[str, torch.Tensor], y: torch.Tensor, hp: Hyper,
               state: Any) -> dict[str, torch.Tensor]:
        """Each trained slot's loss on one batch, from every slot's logits ``out``."""
        import torch.nn.functional as F

        return {name: F.cross_entropy(logits, y) for name, logits in out.items()}

    def end(self, state: Any) -> float | None:
        """What the update learnt besides the weights (personal-mix's weight), or None."""
        return None

    def evaluated(self, models: Mapping[str, nn.Module], ev: Evaluation,
                  ) -> dict[str, nn.Module]:
        """The models scored on the client's test split, by result name."""
        return dict(models)

    def extra_metrics(self, models: Mapping[str, nn.Module], mix: float | None,
                      x: torch.Tensor, y: torch.Tensor, ev: Evaluation) -> dict[str, float]:
        """Evaluation metrics beyond each model's loss and accuracy; none here."""
        return {}
