"""FedProx (Li et al. 2020): FedAvg whose local loss adds μ/2·‖w − w_global‖², so a
client cannot wander far from the meme it received. μ travels in the train message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from common.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    import torch
    from torch import nn

    from common.config import Config
    from common.training import Hyper


class FedProx(FedAvg):
    name = "fedprox"
    summary = "FedAvg plus the proximal term μ/2·‖w − w_global‖² (`proximal-mu`; Li et al. 2020)"

    def check(self, cfg: Config) -> str | None:
        if cfg.proximal_mu == 0:
            return ("run-config key 'proximal-mu' = 0 with algorithm 'fedprox' is just "
                    "'fedavg': expected a number > 0")
        return None

    def train_config(self, cfg: Config) -> dict[str, float | int | str]:
        return {"proximal-mu": cfg.proximal_mu}

    def hyper(self, cfg: Config, config: Mapping[str, Any], node_round: int,
              mix: float = 0.5) -> Hyper:
        hp = super().hyper(cfg, config, node_round, mix)
        hp.proximal_mu = float(config.get("proximal-mu", 0.0))
        return hp

    def begin(self, models: Mapping[str, nn.Module], y: torch.Tensor, hp: Hyper) -> Any:
        """The meme and its weights as received: the anchor of the proximal term."""
        from common.mutual import anchor_of

        return models["meme"], anchor_of(models["meme"])

    def losses(self, out: Mapping[str, torch.Tensor], y: torch.Tensor, hp: Hyper,
               state: Any) -> dict[str, torch.Tensor]:
        import torch.nn.functional as F

        from common.mutual import proximal_term

        meme, anchor = state
        loss = F.cross_entropy(out["meme"], y)
        if hp.proximal_mu > 0:
            loss = loss + hp.proximal_mu * proximal_term(meme, anchor)
        return {"meme": loss}


ALGORITHM = FedProx()
