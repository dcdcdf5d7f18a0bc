"""ServerApp: validate the config, build (or resume) the meme, run the rounds
(:mod:`server.rounds`), write the results."""

from __future__ import annotations

from collections import Counter
from logging import ERROR, INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from torch import nn

from common.config import Config, ConfigError, load_config
from common.data import central_test_set, dataset_spec
from common.hidden import check_widths
from common.models import TaskSpec, build_model
from common.records import load_into, to_record
from common.runtime import derive_seed, resolve_device, seed_everything
from common.training import evaluate
from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from server.identity import ClientRegistry, TooFewClients
from server.privacy import wrap_dp
from server.results import RunLog, project_path, torch_save_atomic
from server.rounds import run_rounds
from server.secure import SecureAggregationFailed
from server.strategy import MemeStrategy, build_strategy
from server.validate import template_of

app = ServerApp()


def agreed_num_classes(reports: list[int]) -> int:
    """The class count of an ``npz`` federation without ``num-classes``: the largest count
    reported that is at most twice the median report. Honest non-IID nodes report one more
    than their own largest label (between about half the count and the count); a minority
    cannot move the median, so one node's typo or lie of 10^9 cannot size the meme."""
    bound = 2 * float(np.median(reports))
    return max(c for c in reports if c <= bound)


def _spec_from_clients(cfg: Config, clients: ClientRegistry, grid: Grid) -> TaskSpec:
    """With ``npz`` data only the clients know the task shape: they report it when identified.

    Asked once ``min-clients`` nodes are connected (a bounded wait). The most common image
    shape wins; clients with another shape are named in a warning and their replies will be
    errors (the round goes on without them). ``num-classes`` is the configured one, else
    :func:`agreed_num_classes` of what those nodes report: a node with a larger label is
    refused with an error that names it.
    """
    clients.ordered(grid)
    infos = list(clients.info.values())
    shapes = Counter((int(m["channels"]), int(m["size"])) for m in infos)
    if not shapes:
        raise RuntimeError("no client could describe its data (every identify reply failed): "
                           "see the client errors above")
    (channels, size), _ = shapes.most_common(1)[0]
    for m in infos:
        if (int(m["channels"]), int(m["size"])) != (channels, size):
            log(WARNING, "client %s has %sx%spx images, the federation uses %sx%spx: it will "
                "be left out", m["client-key"], m["channels"], m["size"], channels, size)
    classes = cfg.num_classes or agreed_num_classes([int(m["num-classes"]) for m in infos])
    if not cfg.num_classes:
        outliers = sorted(int(m["client-key"]) for m in infos if int(m["num-classes"]) > classes)
        log(INFO, "fedmutual: num-classes=%d agreed by the %d connected nodes' labels (set "
            "run-config 'num-classes' if later nodes hold more)%s", classes, len(infos),
            f"; clients {outliers[:5]} report more and will be refused" if outliers else "")
    return TaskSpec(channels, size, classes)


def _task_spec(cfg: Config, clients: ClientRegistry, grid: Grid) -> TaskSpec:
    """The task shape: the built-in dataset's, or what the ``npz`` nodes report."""
    spec = dataset_spec(cfg)
    if spec is None:
        return _spec_from_clients(cfg, clients, grid)
    if cfg.num_classes and cfg.num_classes != spec.num_classes:
        raise ConfigError(f"run-config key 'num-classes' = {cfg.num_classes}, but dataset "
                          f"'{cfg.dataset}' has {spec.num_classes}: expected 0 or "
                          f"{spec.num_classes}")
    return spec


def central_evaluation(cfg: Config, spec: TaskSpec, run_log: RunLog):
    """The meme on the dataset's central test set, recorded as ``central_meme_accuracy``
    (nothing for ``local`` or ``npz``, which have no meme or no central test set)."""
    test = central_test_set(cfg) if cfg.algorithm.trains_meme else None
    device = resolve_device(cfg.device)
    model = build_model(cfg.meme_model, spec).to(device) if test is not None else None

    def evaluate_central(arrays: ArrayRecord) -> None:
        if model is not None and len(arrays) > 0:
            load_into(model, arrays, what="aggregated meme")
            _, acc = evaluate(model, test[0], test[1], device)
            run_log.set(central_meme_accuracy=acc)

    return evaluate_central


def checkpointer(cfg: Config, meme: nn.Module, run_log: RunLog, strategy: MemeStrategy):
    """Write ``checkpoint.pt`` after a closed round (meme, records, config, RNG states)."""

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        if len(arrays) > 0:
            load_into(meme, arrays, what="aggregated meme")
        save_checkpoint(run_log.run_dir, server_round, meme.state_dict(), run_log.records, cfg,
                        {"client_keys_seen": len(strategy.clients.keys),
                         "bindings": strategy.clients.bindings()},
                        strategy.bank.state() if strategy.bank is not None else None,
                        strategy.momentum.state())

    return checkpoint


def _start(cfg: Config) -> tuple[RunLog, Checkpoint | None]:
    if not cfg.resume_from:
        return RunLog.create(cfg), None
    run_dir = project_path(cfg.resume_from)
    ckpt = load_checkpoint(run_dir, cfg)
    log(INFO, "fedmutual: resuming %s after round %d", run_dir, ckpt.round)
    return RunLog.resume(run_dir, cfg, ckpt.records), ckpt


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` of the configured algorithm and write the results."""
    cfg = load_config(context.run_config)
    seed_everything(cfg.seed)
    run_log, ckpt = _start(cfg)
    log(INFO, "fedmutual: %s on %s, results in %s", cfg.algorithm.value, cfg.dataset,
        run_log.run_dir)
    clients = ClientRegistry(cfg)
    if ckpt is not None:  # node-authentication: a key stays with the node that first had it
        clients.restore_bindings(ckpt.strategy.get("bindings", {}))
    try:
        spec = _task_spec(cfg, clients, grid)
        if cfg.distill_hidden:  # one feature width, refused before any round
            check_widths((cfg.meme_model, *(cfg.local_model_names or (cfg.local_model,)),
                          *cfg.peer_archs), spec)
        torch.manual_seed(derive_seed(cfg.seed, "meme-init"))
        meme = build_model(cfg.meme_model, spec)
        done = 0
        if ckpt is not None:
            load_into(meme, to_record(ckpt.meme), what=f"meme in {ckpt.path}")
            restore_rng(ckpt)
            done = ckpt.round
        initial = to_record(meme.state_dict()) if cfg.algorithm.trains_meme else ArrayRecord()
        # what an upload must match: the meme's architecture (co-distillation's models too)
        strategy = build_strategy(cfg, run_log, clients,
                                  template_of(to_record(meme.state_dict())))
        if ckpt is not None and strategy.bank is not None:
            strategy.bank.restore(ckpt.teachers)
        if ckpt is not None:
            try:
                strategy.momentum.restore(ckpt.velocity, meme.state_dict())
            except ValueError as exc:
                raise CheckpointError(f"checkpoint {ckpt.path}: {exc}") from None
        task = {"channels": spec.channels, "size": spec.size, "num-classes": spec.num_classes,
                "lineage": run_log.run_dir.name}
        task.update(cfg.algorithm.spec.train_config(cfg))
        run_rounds(wrap_dp(strategy), grid, initial, first=done + 1,
                   last=cfg.num_server_rounds, train_config=ConfigRecord(task),
                   evaluate_config=ConfigRecord(dict(task)), timeout=cfg.round_timeout,
                   run_log=run_log, evaluate_central=central_evaluation(cfg, spec, run_log),
                   checkpoint=checkpointer(cfg, meme, run_log, strategy),
                   evaluate_every=cfg.evaluate_every,
                   secure_exchange=strategy.secure_exchange if cfg.secure_aggregation
                   else None)
    except TooFewClients as exc:
        done = len(run_log.records)
        kept = (f"Rounds 1-{done} are kept in {run_log.run_dir} (checkpoint.pt); continue with "
                f"resume-from=\"{run_log.run_dir}\"" if done else "No round was completed")
        msg = f"fedmutual: stopping: {exc}. {kept}"
        log(ERROR, msg)
        print(run_log.summary(), flush=True)
        raise TooFewClients(msg) from None
    except SecureAggregationFailed as exc:
        done = len(run_log.records)
        kept = (f"rounds 1-{done} are kept in {run_log.run_dir} (checkpoint.pt)" if done
                else "no round was completed")
        msg = f"fedmutual: secure aggregation failed, the run stops: {exc}. {kept}"
        log(ERROR, msg)
        raise SecureAggregationFailed(msg) from None
    if cfg.algorithm.trains_meme:
        torch_save_atomic(run_log.run_dir / "meme_final.pt", meme.state_dict())
    run_log.tensorboard.close()
    print(run_log.summary(), flush=True)
