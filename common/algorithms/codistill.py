"""Co-distillation (Anil et al., ICLR 2018): each client trains its own full model on its
shard; after ``codistill-burnin`` rounds on the labels alone, the server forwards, every
``codistill-every`` rounds, the latest models of up to ``codistill-teachers`` other
clients, and until the next exchange each client learns CE + (1-α)·KL(p̄ ‖ p_own), p̄ the
mean prediction of those stale teachers on its own batches. Nothing is averaged: the
forwarded models are the other clients' own (their mean prediction is the paper's
teacher; averaging the weights of models trained apart on non-IID shards would give a
poor model, and FedAvg is already here). A client that was not sampled at an exchange, or
whose run was resumed since, gets that exchange's teachers when next sampled. Each
client's model goes up only in the round before an exchange, which is what cuts the
traffic; but it does leave the device, and other clients receive it: nothing is private
here but the data. Each node keeps its teachers beside its private model (in memory by
default: ``codistill-teachers`` models a node)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from common.algorithms.base import Algorithm, Slot

if TYPE_CHECKING:
    import torch

    from common.config import Config
    from common.training import Hyper

#: the name of the k-th teacher, in messages and in the client's models
TEACHER = "teacher-{}"


def exchanges(server_round: int, burnin: int, every: int) -> bool:
    """Whether round ``server_round`` forwards teachers: rounds B+1, B+1+E, B+1+2E, …
    after the burn-in B, E = ``codistill-every``."""
    return server_round > burnin and (server_round - burnin - 1) % every == 0


def is_teacher(name: str) -> bool:
    """Whether a model of the update is a forwarded teacher (frozen), not the client's."""
    return name.startswith("teacher-")


class Codistill(Algorithm):
    name = "codistill"
    summary = ("each client's own model; every `codistill-every` rounds (after "
               "`codistill-burnin`) the server forwards other clients' latest models as "
               "stale teachers (Anil et al. 2018)")
    slots = (Slot("local", arch="meme"),)
    keeps_teachers = True

    def check(self, cfg: Config) -> str | None:
        """The server must see and forward each client's own model as it is."""
        if cfg.secure_aggregation:
            return ("run-config key 'secure-aggregation' = true hides each client's model "
                    "in a sum, but algorithm 'codistill' forwards the clients' own models: "
                    "expected false")
        if cfg.dp_mode.enabled:
            return (f"run-config key 'dp-mode' = {cfg.dp_mode.value!r} noises an average, "
                    "but algorithm 'codistill' averages nothing: expected 'none'")
        if cfg.compression.value != "none" or cfg.compression_down.value != "none":
            return ("run-config keys 'compression'/'compression-down' encode the meme's "
                    "update, but algorithm 'codistill' sends whole models: expected 'none'")
        return None

    def uploads(self, cfg: Config, server_round: int) -> str | None:
        """The client's model, in the round before each exchange (none in the last)."""
        return ("local" if server_round < cfg.num_server_rounds and exchanges(
            server_round + 1, cfg.codistill_burnin, cfg.codistill_every) else None)

    def teachers(self, cfg: Config, server_round: int) -> int:
        """Up to ``codistill-teachers`` forwarded models in an exchange round."""
        return (cfg.codistill_teachers
                if exchanges(server_round, cfg.codistill_burnin, cfg.codistill_every) else 0)

    def hyper(self, cfg: Config, config: Mapping[str, Any], node_round: int,
              mix: float = 0.5) -> Hyper:
        hp = super().hyper(cfg, config, node_round, mix)
        hp.alpha, hp.distill = cfg.alpha, cfg.distill
        return hp

    def losses(self, out: Mapping[str, torch.Tensor], y: torch.Tensor, hp: Hyper,
               state: Any) -> dict[str, torch.Tensor]:
        """CE, plus (1-α)·KL toward the teachers' mean prediction once there are teachers,
        weighted as in :func:`common.mutual.mutual_losses` (``additive``: CE at full
        weight; ``fixed``: α·CE; ``adaptive``: α·CE and the KL divided by the detached CE of
        the student plus that of the teachers' mean; the gates apply); a teacher whose
        logits are not finite teaches nothing."""
        import torch
        import torch.nn.functional as F

        from common.mutual import distill_term
        from common.options import DistillWeighting

        own = out["local"]
        ce = F.cross_entropy(own, y)
        teachers = [v for k, v in out.items() if is_teacher(k) and bool(v.isfinite().all())]
        if not teachers or hp.alpha >= 1:
            return {"local": ce}
        teacher = torch.stack([F.softmax(t.detach(), 1) for t in teachers]).mean(0)
        teacher = teacher.clamp_min(1e-12).log()  # log p̄: logits whose softmax is p̄
        weighting = hp.distill.weighting
        loss = ce if weighting is DistillWeighting.ADDITIVE else hp.alpha * ce
        weight = (1.0 / (ce + F.nll_loss(teacher, y)).detach().clamp_min(1e-8)
                  if weighting is DistillWeighting.ADAPTIVE else 1.0)
        return {"local": loss + (1 - hp.alpha) * weight * distill_term(
            own, teacher, y, hp.temperature, hp.distill)}


ALGORITHM = Codistill()
