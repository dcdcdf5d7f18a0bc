"""The simulation on an existing multi-node Ray cluster: two Ray nodes on 127.0.0.1, a
SuperLink told where the cluster is (``RAY_ADDRESS``), a real ``flwr run``."""

import json
from pathlib import Path

import pytest

from common.flwr_local import SimLink

pytestmark = pytest.mark.e2e
ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")  # Ray writes it; other runs would join


def test_simulation_runs_clients_on_both_nodes_of_a_ray_cluster(tmp_path):
    from ray.cluster_utils import Cluster

    # each node's workers cache the dataset in their own folder: a folder that fills up
    # proves that clients ran on that node
    caches = {name: tmp_path / f"cache-{name}" for name in ("head", "worker")}
    had_address_file = ADDRESS_FILE.exists()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "env_vars": {"FEDMUTUAL_CACHE": str(caches["head"])}})
    try:
        if not had_address_file:
            ADDRESS_FILE.unlink(missing_ok=True)  # no other simulation may join ours
        cluster.add_node(num_cpus=1, env_vars={"FEDMUTUAL_CACHE": str(caches["worker"])})
        cluster.wait_for_nodes()
        assert len([n for n in cluster.list_all_nodes() if n]) == 2
        with SimLink(tmp_path / "home", env={"RAY_ADDRESS": cluster.address}) as link:
            out = link.run({"dataset": "digits", "meme-model": "mlp", "local-model": "mlp",
                            "num-server-rounds": 2, "output-dir": str(tmp_path),
                            "run-name": "ray"}, supernodes=4)
            status = link.last_status()
        metrics = tmp_path / "ray" / "metrics.json"
        assert metrics.exists(), f"{status}\n{out[-3000:]}"
        records = json.loads(metrics.read_text())
        assert [r["num_clients"] for r in records] == [4, 4]
        for name, cache in caches.items():
            assert cache.exists() and any(cache.rglob("*.npy")), f"no client ran on {name}"
    finally:
        cluster.shutdown()
        if not had_address_file:
            ADDRESS_FILE.unlink(missing_ok=True)
