"""Scale: peak memory of a simulation whose every client trains a private ``cnn`` once.

    python -m simulations.bench_scale [--populations 1000 3000 10000] [--per-round 100]
        [--store disk] [--momentum 0.0] [--rounds R]

For each population N: FML on Fashion-MNIST (28x28, IID over the N clients), ``cnn`` as
meme and private model, ``per-round`` clients a round with ``client-sampling = "cyclic"``
for ceil(N / per-round) rounds, so every client trains (and is evaluated) exactly once,
through the real Flower simulation. Prints the peak memory of the whole simulation
(SuperLink, ServerApp, Ray and its workers: proportional set size, a shared library page
counted once; the plain sum of RSS beside it), the private state on disk, the number of
clients that trained, and the seconds per round. Target: <= 6 GB at 10,000 clients.

``--store memory`` is today's default for comparison (every trained client's private
model stays in the simulation's memory: weights + momentum, 4.7 MB per ``cnn``).
``--momentum 0`` keeps SGD without momentum state, halving the state on disk (10,000 cnn
states with momentum need 47 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import tempfile
import time
from pathlib import Path

from common.config import load_config
from common.flwr_local import ROOT, PeakRSS, SimLink, save_benchmark
from common.models import TaskSpec, build_model
from simulations.grid import paper_keys


def private_state_bytes(model: str, spec: TaskSpec, momentum: bool) -> int:
    """What one client's private state costs: weights (plus SGD momentum), float32."""
    n = sum(p.numel() for p in build_model(model, spec).parameters())
    return (2 if momentum else 1) * 4 * n


def run_config(population: int, per_round: int, rounds: int, store: str, state_dir: Path,
               momentum: float, model: str) -> dict:
    """The benchmark's run config for one population (validated)."""
    share = per_round / population
    cfg = {"dataset": "fashion-mnist", "partitioner": "iid", "meme-model": model,
           "local-model": model, "num-server-rounds": rounds, "fraction-train": share,
           "fraction-evaluate": share, "min-clients": per_round,
           "client-sampling": "cyclic", "private-store": store, "momentum": momentum,
           "seed": 0,
           # the paper's FML, as the committed numbers ran it: the default's mixture would
           # also fine-tune a meme per evaluated client
           **paper_keys()}
    if store == "disk":
        cfg["state-dir"] = str(state_dir)
    load_config(cfg)
    return cfg


def _du(folder: Path) -> tuple[int, int]:
    """Bytes and number of private state files under ``folder``."""
    files = list(folder.glob("private-*[0-9].pt")) if folder.exists() else []
    return sum(f.stat().st_size for f in files), len(files)


def main() -> None:
    """Run each population, print, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--populations", type=int, nargs="+", default=[1000, 3000, 10000])
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, help="default: ceil(population / per-round)")
    p.add_argument("--store", choices=["disk", "memory"], default="disk")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--model", default="cnn")
    p.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "scale.json")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still end our SuperLink
    per_client = private_state_bytes(a.model, TaskSpec(1, 28, 10), a.momentum > 0)
    print(f"private state per client ({a.model} on 28x28, weights"
          f"{' + momentum' if a.momentum > 0 else ''}): {per_client / 1e6:.2f} MB; "
          f"store: {a.store}", flush=True)
    results = []
    for n in a.populations:
        rounds = a.rounds or math.ceil(n / a.per_round)
        with tempfile.TemporaryDirectory(prefix="fedmutual-scale-") as home:
            state = Path(home) / "state"
            cfg = run_config(n, a.per_round, rounds, a.store, state, a.momentum, a.model)
            with SimLink(Path(home)) as link, PeakRSS(link.proc.pid, interval=1.0) as peak:
                t0 = time.perf_counter()
                log = link.run({**cfg, "output-dir": home, "run-name": "scale"}, n,
                               timeout=4 * 3600)
                wall = time.perf_counter() - t0
            metrics = Path(home) / "scale" / "metrics.json"
            if not metrics.exists():
                raise SystemExit(f"the run wrote no metrics:\n{log[-3000:]}")
            records = json.loads(metrics.read_text())
            disk, trained = _du(state)
        secs = [r["seconds"] for r in records]
        res = {"population": n, "per_round": a.per_round, "rounds": len(records),
               "trained_clients": trained if a.store == "disk" else None,
               "peak_pss_gb": peak.peak / 1e9, "peak_rss_sum_gb": peak.peak_rss / 1e9,
               "state_on_disk_gb": disk / 1e9, "wall_seconds": wall,
               "first_round_seconds": secs[0],
               "seconds_per_round_after_first": sum(secs[1:]) / max(len(secs) - 1, 1),
               "final_local_accuracy": records[-1]["local_accuracy"]}
        results.append(res)
        print(f"{n} clients, {a.per_round} a round, {len(records)} rounds: peak memory "
              f"{res['peak_pss_gb']:.2f} GB PSS ({res['peak_rss_sum_gb']:.2f} GB summed RSS); "
              f"private state on disk {res['state_on_disk_gb']:.1f} GB"
              f"{f' from {trained} clients' if a.store == 'disk' else ''}; round 1 "
              f"{secs[0]:.0f} s (identifies every client), then "
              f"{res['seconds_per_round_after_first']:.1f} s/round; wall {wall / 60:.1f} min",
              flush=True)
    out = {"benchmark": "scale", "model": a.model, "store": a.store, "momentum": a.momentum,
           "private_state_bytes_per_client": per_client, "results": results}
    save_benchmark(a.json, out)


if __name__ == "__main__":
    main()
