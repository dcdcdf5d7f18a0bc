"""Scale: 1,000 virtual clients with private state, at 1-10 % participation.

    python -m simulations.bench_scale [--clients 1000] [--fractions 0.01 0.05 0.1] [--rounds 5]

For each participation fraction, runs FML on the ``synthetic`` dataset (20,000 samples,
8x8) through the real Flower simulation and prints the peak resident memory of the whole
simulation (SuperLink, ServerApp, Ray and its workers: proportional set size, which counts
a library page shared by several processes once; the plain sum of RSS is printed beside
it) and the seconds per round. Target: peak memory <= 4 GB. Writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from common.config import load_config
from common.flwr_local import ROOT, PeakRSS, SimLink, save_benchmark
from common.models import TaskSpec, build_model


def private_state_bytes(model: str, spec: TaskSpec) -> int:
    """What one client's private state costs: weights plus SGD momentum, float32."""
    n = sum(p.numel() for p in build_model(model, spec).parameters())
    return 2 * 4 * n


def main() -> None:
    """Run each fraction, print, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", default="mlp")
    p.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "scale.json")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still end our SuperLink
    per_client = private_state_bytes(a.model, TaskSpec(1, 8, 10))
    print(f"private state per client ({a.model}, weights + momentum): {per_client / 1e3:.0f} kB")
    results = []
    for frac in a.fractions:
        run_config = {"dataset": "synthetic", "partitioner": "iid", "meme-model": a.model,
                      "local-model": a.model, "num-server-rounds": a.rounds,
                      "fraction-train": frac, "fraction-evaluate": frac, "seed": 0}
        load_config(run_config)
        with tempfile.TemporaryDirectory(prefix="fedmutual-scale-") as home, \
                SimLink(Path(home)) as link, PeakRSS(link.proc.pid) as peak:
            t0 = time.perf_counter()
            log = link.run({**run_config, "output-dir": home, "run-name": "scale"}, a.clients,
                           timeout=3600)
            wall = time.perf_counter() - t0
            metrics = Path(home) / "scale" / "metrics.json"
            if not metrics.exists():
                raise SystemExit(f"the run wrote no metrics:\n{log[-3000:]}")
            records = json.loads(metrics.read_text())
        rounds = [r["seconds"] for r in records]
        res = {"fraction": frac, "clients_per_round": records[-1]["num_clients"],
               "peak_pss_gb": peak.peak / 1e9, "peak_rss_sum_gb": peak.peak_rss / 1e9,
               "wall_seconds": wall,
               "round_seconds": rounds,
               "seconds_per_round_after_first": sum(rounds[1:]) / max(len(rounds) - 1, 1),
               "final_local_accuracy": records[-1]["local_accuracy"]}
        results.append(res)
        print(f"{a.clients} clients, {frac:.0%} per round ({res['clients_per_round']} clients):"
              f" peak memory {res['peak_pss_gb']:.2f} GB PSS ({res['peak_rss_sum_gb']:.2f} GB "
              f"summed RSS), round 1 {rounds[0]:.1f} s (identifies "
              f"every client), then {res['seconds_per_round_after_first']:.2f} s/round, "
              f"wall {wall:.0f} s", flush=True)
    out = {"benchmark": "scale", "clients": a.clients, "rounds": a.rounds, "model": a.model,
           "private_state_bytes_per_client": per_client, "results": results}
    save_benchmark(a.json, out)


if __name__ == "__main__":
    main()
