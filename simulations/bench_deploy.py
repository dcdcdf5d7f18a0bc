"""Per-round cost in deployment: real SuperLink and SuperNodes on 127.0.0.1.

    python -m simulations.bench_deploy [--nodes 2] [--rounds 3] [--dataset fashion-mnist]

In deployment every message runs in a fresh ``flwr-clientapp`` process, so whatever the
ClientApp does at start (imports, loading and partitioning data, building models) is paid
per message. Printed: seconds per round, and the start-up of a fresh process split into
Python + imports and data loading (first time and from the disk cache). Writes a JSON.
Uses the insecure loopback demo set-up: TLS would add the same handshake cost to any app.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common.flwr_deploy import Deployment, wait_for_rounds
from common.flwr_local import ROOT, save_benchmark

PROBE = """
import time, sys
t0 = time.perf_counter()
import client.app  # what flwr-clientapp imports
t1 = time.perf_counter()
from common.config import load_config
from common.data import load_client_data
cfg = load_config({"dataset": sys.argv[1]})
load_client_data(cfg, 0, int(sys.argv[2]))
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def fresh_process_costs(dataset: str, nodes: int, cache: Path) -> dict[str, float]:
    """Seconds for imports and for data loading in a new process (cold, then cached)."""
    out = {}
    for label in ("cold_cache", "warm_cache"):
        t = subprocess.run([sys.executable, "-X", "frozen_modules=on", "-c", PROBE, dataset,
                            str(nodes)], capture_output=True, text=True, check=True, cwd=ROOT,
                           env={"FEDMUTUAL_CACHE": str(cache), "PATH": "/usr/bin:/bin",
                                "HOME": str(Path.home())})
        imports, data = map(float, t.stdout.split())
        out[f"imports_{label}"], out[f"data_{label}"] = imports, data
    return out


def main() -> None:
    """Run the deployment, print, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="cnn")
    p.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "deploy.json")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still end our SuperLink
    with tempfile.TemporaryDirectory(prefix="fedmutual-deploy-bench-") as tmp:
        tmp = Path(tmp)
        costs = fresh_process_costs(a.dataset, a.nodes, tmp / "cache")
        print(f"fresh process: imports {costs['imports_cold_cache']:.2f} s; data "
              f"{costs['data_cold_cache']:.2f} s cold, {costs['data_warm_cache']:.2f} s "
              "from the partition cache", flush=True)
        with Deployment(tmp / "dep", tls=False) as dep:
            for i in range(a.nodes):
                dep.supernode(f"n{i}", f"partition-id={i} num-partitions={a.nodes}")
            dep.run({"dataset": a.dataset, "meme-model": a.model, "local-model": a.model,
                     "num-server-rounds": a.rounds, "min-clients": a.nodes,
                     "output-dir": str(tmp / "out"), "run-name": "bench"})
            records = wait_for_rounds(tmp / "out" / "bench" / "metrics.json", a.rounds,
                                      timeout=1800)
    rounds = [r["seconds"] for r in records]
    print(f"{a.nodes} SuperNodes, {a.dataset}/{a.model}: seconds per round "
          f"{', '.join(f'{s:.1f}' for s in rounds)}")
    result = {"benchmark": "deploy", "nodes": a.nodes, "dataset": a.dataset, "model": a.model,
              "round_seconds": rounds, "fresh_process": costs}
    save_benchmark(a.json, result)


if __name__ == "__main__":
    main()
