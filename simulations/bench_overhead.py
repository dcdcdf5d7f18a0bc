"""Framework overhead: the same FML training as a plain PyTorch loop and through Flower.

    python -m simulations.bench_overhead [--dataset fashion-mnist] [--clients 10] [--rounds 5]

(a) runs FML in one process with no Flower: the same data, models, seeds, loss, local
training, client evaluation, aggregation and central evaluation as the app. (b) runs the
real Flower simulation. Printed: both wall times, Flower's start-up (Ray, app launch)
separately, and the ratio (b) without start-up / (a); target <= 1.15. Writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common.config import load_config
from common.data import central_test_set, dataset_spec, load_client_data
from common.flwr_local import ROOT, SimLink, save_benchmark
from common.models import build_model
from common.runtime import derive_seed, resolve_device, seed_everything
from common.training import evaluate, make_optimizer, train_epochs
from server.aggregate import weighted


def plain_loop(run_config: dict[str, Any], clients: int) -> dict[str, Any]:
    """FML with no framework at all: private models and optimizers simply kept in a dict."""
    t0 = time.perf_counter()
    cfg = load_config(run_config)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    spec = dataset_spec(cfg)
    datas = [load_client_data(cfg, pid, clients) for pid in range(clients)]
    test = central_test_set(cfg)
    torch.manual_seed(derive_seed(cfg.seed, "meme-init"))
    global_state = build_model(cfg.meme_model, spec).state_dict()
    private: dict[int, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    hp = cfg.algorithm.spec.hyper(cfg, {}, 0)
    per_round = []
    for rnd in range(1, cfg.num_server_rounds + 1):
        t_round = time.perf_counter()
        states, weights = [], []
        for pid, data in enumerate(datas):
            meme = build_model(cfg.meme_model, spec)
            meme.load_state_dict(global_state)
            meme.to(device)
            if pid not in private:
                torch.manual_seed(derive_seed(cfg.seed, "private-init", pid))
                local = build_model(cfg.local_model_for(pid), spec).to(device)
                private[pid] = (local, make_optimizer(local, cfg))
            local, opt_local = private[pid]
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "shuffle", pid, rnd))
            stats = train_epochs({"local": local, "meme": meme},
                                 {"local": opt_local, "meme": make_optimizer(meme, cfg)},
                                 cfg.algorithm.spec, data.x_train, data.y_train, hp, gen,
                                 device)
            states.append({k: v.detach().cpu().numpy() for k, v in meme.state_dict().items()})
            weights.append(stats.num_examples)
        avg = weighted(states, weights)
        global_state = {k: torch.from_numpy(v) for k, v in avg.items()}
        meme = build_model(cfg.meme_model, spec)
        meme.load_state_dict(global_state)
        meme.to(device)
        for pid, data in enumerate(datas):
            evaluate(private[pid][0], data.x_test, data.y_test, device)
            evaluate(meme, data.x_test, data.y_test, device)
        central = evaluate(meme, test[0], test[1], device)[1]
        per_round.append(time.perf_counter() - t_round)
    return {"seconds": time.perf_counter() - t0, "round_seconds": per_round,
            "final_central_accuracy": central}


def flower(run_config: dict[str, Any], clients: int, cpus: int, gpus: float,
           out: Path) -> dict[str, Any]:
    """The same job through ``flwr run`` on a simulation SuperLink of our own."""
    with tempfile.TemporaryDirectory(prefix="fedmutual-bench-") as home, \
            SimLink(Path(home)) as link:
        t0 = time.perf_counter()
        log = link.run({**run_config, "output-dir": str(out), "run-name": "flower"}, clients,
                       timeout=3600, cpus_per_client=cpus, gpus_per_client=gpus)
        wall = time.perf_counter() - t0
    metrics = out / "flower" / "metrics.json"
    if not metrics.exists():
        raise SystemExit(f"the Flower run wrote no metrics:\n{log[-3000:]}")
    records = json.loads(metrics.read_text())
    rounds = [r["seconds"] for r in records]
    return {"seconds": wall, "round_seconds": rounds, "startup_seconds": wall - sum(rounds),
            "final_central_accuracy": records[-1]["central_meme_accuracy"]}


def main() -> None:
    """Run both, print the comparison, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="cnn")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cpus-per-client", type=int, default=1,
                   help="whole CPUs per simulated client (Flower 1.42 takes integers only)")
    p.add_argument("--gpus-per-client", type=float, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "overhead.json")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still end our SuperLink
    run_config = {"dataset": a.dataset, "meme-model": a.model, "local-model": a.model,
                  "num-server-rounds": a.rounds, "seed": 0, "device": a.device,
                  "partitioner": "dirichlet", "dirichlet-alpha": 0.1}
    plain = plain_loop(run_config, a.clients)
    print(f"(a) plain PyTorch loop:   {plain['seconds']:.1f} s "
          f"(central accuracy {plain['final_central_accuracy']:.4f})", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedmutual-bench-out-") as out:
        fl = flower(run_config, a.clients, a.cpus_per_client, a.gpus_per_client, Path(out))
    no_start = sum(fl["round_seconds"])
    ratio = no_start / plain["seconds"]
    print(f"(b) Flower simulation:    {fl['seconds']:.1f} s = start-up "
          f"{fl['startup_seconds']:.1f} s + rounds {no_start:.1f} s "
          f"(central accuracy {fl['final_central_accuracy']:.4f})")
    print(f"ratio (b) without start-up / (a): {ratio:.3f} (target <= 1.15)")
    samples = sum(len(load_client_data(load_config(run_config), pid, a.clients).y_train)
                  for pid in range(a.clients)) * a.rounds
    result = {"benchmark": "overhead", "config": run_config, "clients": a.clients,
              "cpus_per_client": a.cpus_per_client, "gpus_per_client": a.gpus_per_client,
              "machine": platform.platform(), "torch_threads": torch.get_num_threads(),
              "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "plain": plain, "flower": fl, "ratio_without_startup": ratio,
              "train_samples_per_second_flower": samples / no_start,
              "train_samples_per_second_plain": samples / plain["seconds"]}
    save_benchmark(a.json, result)


if __name__ == "__main__":
    main()
