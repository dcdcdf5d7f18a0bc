"""ServerApp: validate the config, build the meme, run the strategy, write the results."""

from __future__ import annotations

from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common.config import Config, load_config
from common.data import central_test_set, dataset_spec
from common.models import TaskSpec, build_model
from common.mutual import evaluate
from common.records import load_into, to_record
from common.runtime import derive_seed, resolve_device, seed_everything
from server.results import RunLog, save_state_dict_atomic
from server.strategy import MemeStrategyMixin, build_strategy

app = ServerApp()


def _spec_from_clients(strategy: MemeStrategyMixin, grid: Grid) -> TaskSpec:
    """With ``npz`` data only the clients know the task shape: they report it when identified."""
    strategy.identify(grid)
    shapes = {(int(m["channels"]), int(m["size"])) for m in strategy.client_info.values()}
    if len(shapes) != 1:
        raise ValueError(f"clients report different image shapes {sorted(shapes)} (or none "
                         "identified): every client's npz must have the same (C, H, W)")
    (channels, size), = shapes
    classes = max(int(m["num-classes"]) for m in strategy.client_info.values())
    return TaskSpec(channels, size, classes)


def make_central_evaluator(cfg: Config, spec: TaskSpec, run_log: RunLog):
    """``evaluate_fn`` for Flower: the meme on the global test set; it also closes the round.

    Flower calls it after each round's training and client evaluation, so it is the place
    where the round's record is complete and ``metrics.json`` is written.
    """
    test = central_test_set(cfg) if cfg.algorithm.trains_meme else None
    device = resolve_device(cfg.device)
    model = build_model(cfg.meme_model, spec).to(device) if test is not None else None

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        result = None
        if model is not None and len(arrays) > 0:
            load_into(model, arrays, what="aggregated meme")
            loss, acc = evaluate(model, test[0], test[1], device)
            run_log.set(central_meme_accuracy=acc)
            result = MetricRecord({"central-accuracy": acc, "central-loss": loss})
        if server_round > 0:
            run_log.end_round()
        return result

    return evaluate_fn


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` of the configured algorithm and write the results."""
    cfg = load_config(context.run_config)
    seed_everything(cfg.seed)
    run_log = RunLog.create(cfg)
    log(INFO, "fedmutual: %s on %s, results in %s", cfg.algorithm.value, cfg.dataset,
        run_log.run_dir)
    strategy = build_strategy(cfg, run_log)
    spec = dataset_spec(cfg) or _spec_from_clients(strategy, grid)

    torch.manual_seed(derive_seed(cfg.seed, "meme-init"))
    meme = build_model(cfg.meme_model, spec)
    initial = to_record(meme.state_dict()) if cfg.algorithm.trains_meme else ArrayRecord()
    task = ConfigRecord({"channels": spec.channels, "size": spec.size,
                         "num-classes": spec.num_classes})
    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout, train_config=task, evaluate_config=ConfigRecord(dict(task)),
        evaluate_fn=make_central_evaluator(cfg, spec, run_log),
    )
    if cfg.algorithm.trains_meme and len(result.arrays) > 0:
        load_into(meme, result.arrays, what="final meme")
        save_state_dict_atomic(run_log.run_dir / "meme_final.pt", meme.state_dict())
    line = run_log.summary()
    print(line, flush=True)
