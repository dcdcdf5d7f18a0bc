"""Federated Mutual Learning (Shen et al. 2020): a private model and the shared meme train
on the same batches, each distilling from the other (deep mutual learning; the losses and
their variants are :func:`common.mutual.mutual_losses`); the server averages the meme.
With ``personal-mix`` the client also learns the weight of its mixture of the two (APFL)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.algorithms.base import Algorithm, Evaluation, Slot

if TYPE_CHECKING:
    import torch
    from torch import nn

    from common.config import Config
    from common.hidden import FeatureTap
    from common.training import Hyper


@dataclass
class _Batches:
    """What one update's batches share: the mixture weight, the label prior and, with
    ``distill-hidden``, the hooks that read the models' features."""

    mix: float | None
    labels: torch.Tensor  # the whole update's labels (the prior is the client's)
    log_prior: torch.Tensor | None = None
    tap: FeatureTap | None = None


class Fml(Algorithm):
    name = "fml"
    summary = "private model + meme, mutual distillation (Shen et al. 2020)"
    slots = (Slot("local"), Slot("meme", shared=True, arch="meme"))

    def hyper(self, cfg: Config, config: Mapping[str, Any], node_round: int,
              mix: float = 0.5) -> Hyper:
        """Distillation both ways, except toward the private model while it warms up on
        the labels alone (``warmup-rounds``)."""
        hp = super().hyper(cfg, config, node_round, mix)
        hp.alpha = cfg.alpha if node_round >= cfg.warmup_rounds else 1.0
        hp.beta = cfg.beta
        hp.distill = cfg.distill
        hp.mix = mix if cfg.personal_mix else None
        return hp

    def slots_for(self, cfg: Config) -> tuple[Slot, ...]:
        """``private-peers`` = K: the private peers ``local``, ``peer-2`` … ``peer-K``
        (deep mutual learning's students: the node's architecture, or ``peer-models``'),
        then the meme."""
        archs = cfg.peer_archs or ("local",) * (cfg.private_peers - 1)
        peers = tuple(Slot(f"peer-{i}", arch=a) for i, a in enumerate(archs, start=2))
        return (Slot("local"), *peers, Slot("meme", shared=True, arch="meme"))

    def defaults(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The configuration the payoff map chose (issue #24, docs/experiments.md): the meme
        trains two more epochs alone (``meme-epochs``), and the personalised prediction is
        the mixture of the private model and the tuned meme, weighed on a held-out slice
        (``personal-model`` = ``mix``), where one private model is the only other choice."""
        one = given["private-peers"] == 1 and not given["personal-mix"]
        return {"personal-model": "mix" if one else "private", "meme-epochs": 2}

    def solo_epochs(self, cfg: Config) -> int:
        """``meme-epochs``: a stronger meme without more private training."""
        return cfg.meme_epochs

    def warm_start(self, cfg: Config, private: Mapping[str, nn.Module],
                   received: Mapping[str, nn.Module]) -> None:
        """``private-init`` = ``meme``: the first private model starts as the meme it first
        receives, where the two have the same parameters and buffers (names and shapes);
        another architecture, and peers 2…K, keep their own initialisation."""
        from common.options import PrivateInit

        if cfg.private_init is not PrivateInit.MEME:
            return
        from logging import WARNING

        from flwr.supercore import log

        own, meme = private["local"].state_dict(), received["meme"].state_dict()
        if own.keys() == meme.keys() and all(own[k].shape == meme[k].shape for k in own):
            private["local"].load_state_dict(meme)
        else:
            log(WARNING, "private-init = 'meme': this node's private model is not the meme's "
                "architecture, so it keeps its own initialisation")

    def begin(self, models: Mapping[str, nn.Module], y: torch.Tensor, hp: Hyper) -> Any:
        """``distill-hidden``: hooks on every model's classifier (removed in :meth:`end`,
        which the training loop calls even when a step raises)."""
        from common.hidden import FeatureTap

        return _Batches(hp.mix, y, tap=FeatureTap(models) if hp.distill.hidden else None)

    def losses(self, out: Mapping[str, torch.Tensor], y: torch.Tensor, hp: Hyper,
               state: _Batches) -> dict[str, torch.Tensor]:
        """The mutual losses (:func:`common.mutual.peer_losses`); a diverged model
        (non-finite logits) is never a teacher, so a meme blown up by DP noise cannot turn
        the private models into NaNs."""
        from common.mutual import label_log_prior, mixture_step, peer_losses, seen_log_mask
        from common.options import DistillPrior

        out_l, out_m = out["local"], out["meme"]
        if (state.mix is not None and bool(out_l.isfinite().all())
                and bool(out_m.isfinite().all())):
            state.mix = mixture_step(out_l, out_m, y, state.mix, hp.mix_lr)
        prior = hp.distill.prior
        if prior is not DistillPrior.NONE and state.log_prior is None:
            state.log_prior = (label_log_prior(state.labels, out_m.shape[1])
                               if prior is DistillPrior.CLIENT
                               else seen_log_mask(state.labels, out_m.shape[1]))
        losses = peer_losses(dict(out), y, hp.alpha, hp.beta, hp.temperature, hp.distill,
                             state.log_prior)
        if state.tap is not None:  # FedKD's hidden-state loss, for each model that distils
            from common.hidden import hidden_terms

            students = [k for k in out if (hp.beta if k == "meme" else hp.alpha) < 1]
            terms = hidden_terms(state.tap.features, out, y, hp.distill.hidden, students)
            for k, term in terms.items():
                losses[k] = losses[k] + term
        return losses

    def end(self, state: _Batches) -> float | None:
        if state.tap is not None:
            state.tap.close()
        return state.mix

    def holdout(self, cfg: Config) -> float:
        """``personal-model`` = ``choice`` or ``mix`` choose on a held-out slice."""
        from common.options import PersonalModel

        return (cfg.validation_fraction
                if cfg.personal_model in (PersonalModel.CHOICE, PersonalModel.MIX) else 0.0)

    def evaluated(self, models: Mapping[str, nn.Module], ev: Evaluation,
                  ) -> dict[str, nn.Module]:
        """The personalised model ``personal-model`` names, as ``local``; other than the
        private one, the private model and the tuned meme are scored beside it."""
        from common.options import PersonalModel
        from common.personal import Mixture, tune_meme, validation_weight

        pm = ev.cfg.personal_model
        if pm is PersonalModel.PRIVATE:
            return dict(models)  # peer-2 … peer-K scored alone too
        private, meme = models["local"], models["meme"]
        tuned = tune_meme(self, private, meme, ev)
        if pm is PersonalModel.TUNED:
            weight = 0.0
        else:  # chosen on the held-out slice: one of the two, or a mixture
            grid = (0.0, 1.0) if pm is PersonalModel.CHOICE else tuple(i / 10 for i in range(11))
            weight = validation_weight(private, tuned, ev, grid)
        personal = (private if weight == 1.0 else tuned if weight == 0.0
                    else Mixture(private, tuned, weight))
        return {**models, "local": personal, "private": private, "tuned": tuned}

    def extra_metrics(self, models: Mapping[str, nn.Module], mix: float | None,
                      x: torch.Tensor, y: torch.Tensor, ev: Evaluation) -> dict[str, float]:
        """With personal-mix: the client's mixture ``w·p_local + (1-w)·p_meme``; with K > 1
        private peers: their mean prediction (``peers-*``; ``local-*`` is the first)."""
        from common.training import evaluate_ensemble, evaluate_mixture

        metrics: dict[str, float] = {}
        if ev.cfg.personal_mix and mix is not None:
            loss, acc = evaluate_mixture(models["local"], models["meme"], mix, x, y,
                                         ev.device)
            metrics.update({"mix-loss": loss, "mix-accuracy": acc, "mix-weight": mix})
        peers = [models[s.name] for s in self.private_for(ev.cfg)]
        if len(peers) > 1:
            loss, acc = evaluate_ensemble(peers, x, y, ev.device)
            metrics.update({"peers-loss": loss, "peers-accuracy": acc})
        return metrics


ALGORITHM = Fml()
