"""Ditto (Li et al., ICML 2021): the global model by FedAvg; beside it each client keeps a
personal model of the same architecture, trained on CE + λ/2·‖v − w_global‖²
(``ditto-lambda``) toward the global model it received, and evaluated as its personalised
model. The personal model starts as that global model and never leaves the device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from common.algorithms.base import Algorithm, Slot

if TYPE_CHECKING:
    import torch
    from torch import nn

    from common.config import Config
    from common.training import Hyper


class Ditto(Algorithm):
    name = "ditto"
    summary = ("the meme by FedAvg and a private personal model of the meme's architecture, "
               "pulled toward it by `ditto-lambda`/2·‖v − w‖² (Li et al. 2021)")
    slots = (Slot("local", arch="meme"), Slot("meme", shared=True, arch="meme"))

    def hyper(self, cfg: Config, config: Mapping[str, Any], node_round: int,
              mix: float = 0.5) -> Hyper:
        hp = super().hyper(cfg, config, node_round, mix)
        hp.proximal_mu = cfg.ditto_lambda
        return hp

    def warm_start(self, cfg: Config, private: Mapping[str, nn.Module],
                   received: Mapping[str, nn.Module]) -> None:
        """A personal model that has never trained starts as the global model."""
        private["local"].load_state_dict(received["meme"].state_dict())

    def begin(self, models: Mapping[str, nn.Module], y: torch.Tensor, hp: Hyper) -> Any:
        """The personal model and the global weights as received (the anchor)."""
        from common.mutual import anchor_of

        return models["local"], anchor_of(models["meme"])

    def losses(self, out: Mapping[str, torch.Tensor], y: torch.Tensor, hp: Hyper,
               state: Any) -> dict[str, torch.Tensor]:
        import torch.nn.functional as F

        from common.mutual import proximal_term

        personal, anchor = state
        return {"local": F.cross_entropy(out["local"], y)
                + hp.proximal_mu * proximal_term(personal, anchor),
                "meme": F.cross_entropy(out["meme"], y)}


ALGORITHM = Ditto()
