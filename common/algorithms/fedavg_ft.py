"""FedAvg with local fine-tuning (the baseline of Matsuda et al. 2022, pFL-Bench's
"FedAvg-FT"): training is FedAvg; before each evaluation a client fine-tunes a copy of the
global model it received on its own training split for ``finetune-epochs`` and is scored on
that copy (``local_accuracy``, its personalised model) beside the global one."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING

from common.algorithms.base import Evaluation
from common.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    from torch import nn


class FedAvgFt(FedAvg):
    name = "fedavg-ft"
    summary = ("FedAvg; each client's personalised model is the global one fine-tuned for "
               "`finetune-epochs` on its own training split (Matsuda et al. 2022)")

    def evaluated(self, models: Mapping[str, nn.Module], ev: Evaluation,
                  ) -> dict[str, nn.Module]:
        import torch

        from common.training import make_optimizer, train_epochs

        torch.manual_seed(ev.seed)  # whatever the fine-tuning draws is this client's and round's
        tuned = copy.deepcopy(models["meme"])
        hp = self.hyper(ev.cfg, {}, 0)
        hp.epochs = ev.cfg.finetune_epochs
        train_epochs({"local": tuned}, {"local": make_optimizer(tuned, ev.cfg)}, self,
                     ev.x_train, ev.y_train, hp, torch.Generator().manual_seed(ev.seed),
                     ev.device)
        return {"local": tuned, "meme": models["meme"]}


ALGORITHM = FedAvgFt()
