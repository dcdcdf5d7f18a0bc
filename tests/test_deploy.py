"""Deployment on 127.0.0.1: a real SuperLink with TLS and node authentication, real
SuperNodes started by ``fedmutual-deploy``, kill -9 and restart, refused nodes, a
spoofed client key."""

from __future__ import annotations

import json
import re
import signal
import time

import numpy as np
import pytest
import torch

from client.state_file import read_state_file
from common.config import load_config
from common.data import load_client_data
from common.flwr_deploy import Deployment, wait_for_rounds
from common.flwr_local import free_port
from common.models import TaskSpec, build_model
from common.training import evaluate

pytestmark = pytest.mark.e2e
RUN = {"dataset": "digits", "meme-model": "mlp", "local-model": "mlp", "batch-size": 32,
       "min-clients": 1}


def _node_config(dep: Deployment, name: str, pid: int | None) -> str:
    where = f'state-dir="{dep.root / "state" / name}"'
    return where if pid is None else f"partition-id={pid} num-partitions=2 {where}"


@pytest.fixture
def dep(tmp_path_factory):
    """A SuperLink of the test's own (TLS + node authentication): no test sees another's
    nodes, state files or runs, so each passes alone and in any order."""
    with Deployment(tmp_path_factory.mktemp("deploy"), tls=True) as d:
        yield d


def _wait_until_taken(dep: Deployment, name: str, proc, start: int, deadline: float) -> bool:
    """Whether the SuperLink took this SuperNode (it logged its node ID after offset
    ``start`` of its log) before it was refused or exited."""
    log = dep.root / f"{name}.log"
    while True:
        segment = log.read_text()[start:]
        if "SuperNode ID" in segment:
            return True
        if "Failed to activate" in segment or proc.poll() is not None:
            return False
        assert time.time() < deadline, segment[-2000:]
        time.sleep(0.5)


def _start(dep: Deployment, name: str, pid: int | None, deadline: float,
           extra: str = "") -> None:
    """Start the node until the SuperLink takes it (it refuses a killed node's key as
    long as it still sees that node online, until its heartbeat lapses)."""
    log = dep.root / f"{name}.log"
    while True:
        start = len(log.read_text()) if log.exists() else 0
        proc = dep.supernode(name, f"{_node_config(dep, name, pid)} {extra}".strip())
        if _wait_until_taken(dep, name, proc, start, deadline):
            return
        dep.stop(name)
        assert time.time() < deadline, log.read_text()[-2000:]
        time.sleep(2)


def test_unregistered_node_and_node_without_ca_are_refused(dep):
    p = dep.supernode("stranger", _node_config(dep, "stranger", 0))  # key never registered
    assert p.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in (dep.root / "stranger.log").read_text()
    dep.procs.pop("stranger")
    assert "registered successfully" in dep.register("noca")
    p = dep.start("noca", ["flower-supernode", "--superlink", f"127.0.0.1:{dep.port}",
                           "--auth-supernode-private-key", str(dep.key("noca")[0]),
                           "--port", str(free_port())])  # no --root-certificates
    assert p.wait(timeout=60) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in (dep.root / "noca.log").read_text()
    dep.procs.pop("noca")


def test_tls_auth_run_with_a_node_killed_and_restarted(dep, tmp_path):
    for name, pid in (("n0", 0), ("n1", 1)):
        assert "registered successfully" in dep.register(name)
        _start(dep, name, pid, deadline=time.time() + 120)  # both in from round 1
    # n1 is a straggler in round 2, so the kill lands while it holds round 2's message;
    # n0 one in round 3, so n1 is back (its old self's heartbeat lapsed) before round 4
    out = dep.run({**RUN, "num-server-rounds": 4, "round-timeout": 60.0,
                   "faults": "slow45:1@2,slow30:0@3", "output-dir": str(tmp_path),
                   "run-name": "tls"})
    assert "Traceback" not in out, out
    metrics = tmp_path / "tls" / "metrics.json"
    wait_for_rounds(metrics, 1, timeout=180)
    state = dep.root / "state" / "n1" / "private-1.pt"
    before = read_state_file(state)["node_round"]
    n1_log = dep.root / "n1.log"
    deadline = time.time() + 120
    while n1_log.read_text().count("Receiving: train message") < 2:  # round 2's
        assert time.time() < deadline, n1_log.read_text()[-2000:]
        time.sleep(0.5)
    dep.stop("n1", signal.SIGKILL)
    _start(dep, "n1", 1, deadline=time.time() + 150)
    records = wait_for_rounds(metrics, 4, timeout=300)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert records[1]["failed_clients"] == 1  # n1 never answered round 2
    assert records[3]["num_clients"] == 2  # the restarted n1 trained in round 4
    after = read_state_file(state)
    assert after["node_round"] > before >= 1  # its counter went on from the saved round
    # and its private model is a trained one, not a fresh initialisation
    data = load_client_data(load_config(RUN), 1, 2)
    model = build_model("mlp", TaskSpec(1, 8, 10))
    model.load_state_dict(after["models"]["local"]["model"])
    assert evaluate(model, data.x_test, data.y_test, torch.device("cpu"))[1] > 0.5
    assert (tmp_path / "tls" / "meme_final.pt").exists()
    assert dep.run_statuses(timeout=120) == ["finished:completed"]


def _start_registered(dep: Deployment, names: tuple[str, ...]) -> None:
    for pid, name in enumerate(names):
        assert "registered successfully" in dep.register(name)
        _start(dep, name, pid, deadline=time.time() + 120)


def test_secure_aggregation_with_client_dp_over_tls(dep, tmp_path):
    """SecAgg+ (with client-side clipping) between real processes: both nodes' masked
    memes are summed, their private models trained each round."""
    _start_registered(dep, ("n0", "n1"))
    # one round: SecAgg+'s four stages each cross the SuperNodes' polling (the accounting
    # over rounds is tests/test_privacy.py's and test_e2e_privacy.py's)
    out = dep.run({**RUN, "num-server-rounds": 1, "round-timeout": 120.0, "min-clients": 2,
                   "secure-aggregation": True, "dp-mode": "client", "aggregation": "uniform",
                   "dp-noise-multiplier": 0.1, "output-dir": str(tmp_path),
                   "run-name": "secure"})
    assert "Traceback" not in out, out
    records = wait_for_rounds(tmp_path / "secure" / "metrics.json", 1, timeout=400)
    assert [(r["num_clients"], r["failed_clients"]) for r in records] == [(2, 0)]
    assert records[0]["dp_epsilon"] > 0 and records[0]["dp_sampled"] == 2
    assert dep.run_statuses(timeout=120) == ["finished:completed"]
    states = [dep.root / "state" / n / f"private-{i}.pt" for i, n in enumerate(("n0", "n1"))]
    assert [read_state_file(s)["node_round"] for s in states] == [1, 1]
    meme = torch.load(tmp_path / "secure" / "meme_final.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in meme.values())


def test_corrupt_state_file_is_refused_and_the_round_goes_on(dep, tmp_path):
    state = dep.root / "state" / "n0" / "private-0.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"\x80not a state file".ljust(64, b"\0"))
    _start_registered(dep, ("n0", "n1"))
    # both nodes are in before the run (min-clients 1: the refusing node leaves 1 answering)
    out = dep.run({**RUN, "num-server-rounds": 1, "round-timeout": 60.0,
                   "output-dir": str(tmp_path), "run-name": "corrupt"})
    run_id = re.search(r"\b(\d{6,})\b", out).group(1)
    records = wait_for_rounds(tmp_path / "corrupt" / "metrics.json", 1, timeout=180)
    assert records[0]["failed_clients"] == 1 and records[0]["num_clients"] == 1
    assert state.stat().st_size == 64  # refused, never silently replaced
    logs = (dep.root / "n0.log").read_text() + dep.flwr("log", run_id, "fm", "--show")
    assert "is corrupt or truncated" in logs


def test_nodes_sharing_a_data_path_started_after_the_server_keep_their_own_identity(
        dep, tmp_path):
    """Two devices with the same data-path string (as the README's example), no partition
    id, started after the run: the server waits for min-clients, learns the task from them,
    and each node gets its own key, private model and state file."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = tmp_path / "mine.npz"
    np.savez(data, x=(digits.images[:400] * 15).astype(np.uint8), y=digits.target[:400])
    out = dep.run({**RUN, "dataset": "npz", "data-path": str(data), "min-clients": 2,
                   "num-server-rounds": 2, "round-timeout": 400.0, "npz-mean": "0.3",
                   "npz-std": "0.4", "output-dir": str(tmp_path), "run-name": "late"})
    assert "Traceback" not in out, out
    run_id = re.search(r"\b(\d{6,})\b", out).group(1)
    deadline = time.time() + 120
    while "waiting for clients: 0 connected" not in (log := dep.flwr("log", run_id, "fm",
                                                                     "--show")):
        assert time.time() < deadline, log[-2000:]  # the ServerApp waits, no node in yet
        time.sleep(2)
    for name in ("pi-a", "pi-b"):
        assert "registered successfully" in dep.register(name)
        _start(dep, name, None, deadline=time.time() + 120)
    records = wait_for_rounds(tmp_path / "late" / "metrics.json", 2, timeout=400)
    assert [(r["num_clients"], r["failed_clients"]) for r in records] == [(2, 0), (2, 0)]
    assert dep.run_statuses(timeout=120) == ["finished:completed"]
    keys = [int((dep.root / "state" / n / "node-key").read_text()) for n in ("pi-a", "pi-b")]
    assert keys[0] != keys[1]
    for name, key in zip(("pi-a", "pi-b"), keys, strict=True):
        files = sorted(p.name for p in (dep.root / "state" / name).glob("private-*.pt"))
        assert files == [f"private-{key}.prev.pt", f"private-{key}.pt"]  # this round, the last
        assert read_state_file(dep.root / "state" / name / files[1])["node_round"] == 2


def test_a_node_claiming_another_nodes_client_key_is_refused_for_the_run(dep, tmp_path):
    """Two authenticated SuperNodes claim client key 7, a third its own (0): with
    node-authentication the key goes to the first claimant's node id; the other is refused
    once (never trained, never asked again) and the run completes with the two."""
    for name, pid, extra in (("honest", 0, ""), ("claim-a", 1, "client-key=7"),
                             ("claim-b", 1, "client-key=7")):
        assert "registered successfully" in dep.register(name)
        _start(dep, name, pid, deadline=time.time() + 120, extra=extra)
    ids = {name: int(re.search(r"SuperNode ID: (\d+)", (dep.root / f"{name}.log").read_text())
                     .group(1)) for name in ("claim-a", "claim-b")}
    out = dep.run({**RUN, "num-server-rounds": 1, "round-timeout": 60.0, "min-clients": 2,
                   "node-authentication": True, "output-dir": str(tmp_path),
                   "run-name": "spoof"})
    assert "Traceback" not in out, out
    run_id = re.search(r"\b(\d{6,})\b", out).group(1)
    records = wait_for_rounds(tmp_path / "spoof" / "metrics.json", 1, timeout=300)
    assert dep.run_statuses(timeout=120) == ["finished:completed"]
    assert (records[0]["num_clients"], records[0]["failed_clients"]) == (2, 0)
    server_log = dep.flwr("log", run_id, "fm", "--show")
    refusals = re.findall(r"node (\d+) claims client key 7, which is bound to node (\d+)",
                          server_log)
    assert len(refusals) == 1, server_log[-3000:]  # logged once, not every round
    refused, owner = (int(n) for n in refusals[0])
    assert {refused, owner} == set(ids.values())
    logs = {name: (dep.root / f"{name}.log").read_text() for name in ("honest", *ids)}
    by_id = {v: k for k, v in ids.items()}
    assert logs[by_id[refused]].count("Receiving: query message") == 1
    assert "Receiving: train message" not in logs[by_id[refused]]
    for name in ("honest", by_id[owner]):
        assert logs[name].count("Receiving: train message") == 1, name
    saved = json.loads((tmp_path / "spoof" / "clients.json").read_text())
    assert sorted(c["key"] for c in saved[-1]["clients"]) == [0, 7]
