"""Deployment on 127.0.0.1: a real SuperLink with TLS and node authentication, real
SuperNodes, kill -9 and restart, refused nodes. Every process is ended by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from client.private import read_state_file
from server.deploy import make_certs, make_node_key, write_connection
from tests.conftest import ROOT, _free_port, flwr_env

pytestmark = pytest.mark.e2e
DEPLOY = [sys.executable, "-m", "server.deploy"]
RUN = {"dataset": "digits", "meme-model": "mlp", "local-model": "mlp", "batch-size": 32,
       "min-clients": 1}


class Federation:
    """SuperLink + SuperNodes started through ``fedmutual-deploy`` with TLS and auth."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = flwr_env(root / "home")
        self.env["PYTHONPATH"] = str(ROOT)
        os.environ["FLWR_HOME"] = self.env["FLWR_HOME"]  # for write_connection below
        self.certs = make_certs(root / "certs", ["127.0.0.1", "localhost"])
        self.port = _free_port()
        write_connection("fm", f"127.0.0.1:{self.port}", self.certs["ca.crt"])
        self.procs: dict[str, subprocess.Popen] = {}
        self.start("superlink", [*DEPLOY, "superlink", "--certs", str(root / "certs"),
                                 "--state", str(root / "link"), "--host", "127.0.0.1",
                                 "--port", str(self.port)])
        self._wait_port(self.port)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "a")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        return proc

    def _wait_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"port {port} did not open")

    def key(self, name: str) -> tuple[Path, Path]:
        priv = self.root / "keys" / name
        return (priv, priv.with_suffix(".pub")) if priv.exists() else \
            make_node_key(self.root / "keys", name)

    def register(self, name: str) -> None:
        out = subprocess.run([*DEPLOY, "register", "fm", str(self.key(name)[1])], env=self.env,
                             capture_output=True, text=True, timeout=60, cwd=self.root)
        assert "registered successfully" in out.stdout + out.stderr, out.stdout + out.stderr

    def supernode(self, name: str, pid: int, nparts: int, ca: bool = True) -> subprocess.Popen:
        cmd = [*DEPLOY, "supernode", "--superlink", f"127.0.0.1:{self.port}",
               "--ca", str(self.certs["ca.crt"]),
               "--key", str(self.key(name)[0]), "--port", str(_free_port()), "--node-config",
               f'partition-id={pid} num-partitions={nparts} '
               f'state-dir="{self.root / "state" / name}"']
        if not ca:  # no CA: the node must not connect (fedmutual-deploy refuses; so call flwr)
            cmd = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
                   "--auth-supernode-private-key", str(self.key(name)[0]),
                   "--port", str(_free_port())]
        return self.start(name, cmd)

    def flwr(self, *args: str, timeout: float = 120) -> str:
        out = subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout, cwd=self.root)
        return out.stdout + out.stderr

    def run(self, run_config: dict) -> None:
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        out = self.flwr("run", str(ROOT), "fm", "--run-config", overrides)
        assert "Traceback" not in out and "rror" not in out, out

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    f = Federation(tmp_path_factory.mktemp("deploy"))
    yield f
    f.close()


def _wait_for(path: Path, n_rounds: int, timeout: float) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            records = json.loads(path.read_text())
            if len(records) >= n_rounds:
                return records
        time.sleep(1)
    raise AssertionError(f"{path} did not reach {n_rounds} rounds in {timeout} s")


def test_refused_nodes(fed):
    fed.key("stranger")  # never registered
    p = fed.supernode("stranger", 0, 2)
    assert p.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in (fed.root / "stranger.log").read_text()
    fed.procs.pop("stranger")
    fed.register("noca")
    p = fed.supernode("noca", 0, 2, ca=False)
    assert p.wait(timeout=60) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in (fed.root / "noca.log").read_text()
    fed.procs.pop("noca")


def test_tls_auth_run_and_kill9_restart(fed, tmp_path):
    for name, pid in (("n0", 0), ("n1", 1)):
        fed.register(name)
        fed.supernode(name, pid, 2)
    fed.run({**RUN, "num-server-rounds": 4, "round-timeout": 60.0, "output-dir": str(tmp_path),
             "run-name": "tls"})
    metrics = tmp_path / "tls" / "metrics.json"
    _wait_for(metrics, 1, timeout=180)
    state = fed.root / "state" / "n1" / "private-1.pt"
    before = read_state_file(state)["node_round"]
    fed.stop("n1", signal.SIGKILL)
    # the SuperLink still sees the killed node until its heartbeat lapses: retry the restart
    deadline = time.time() + 150
    while True:
        proc = fed.supernode("n1", 1, 2)
        time.sleep(8)
        if proc.poll() is None:
            break
        fed.procs.pop("n1")
        assert time.time() < deadline, (fed.root / "n1.log").read_text()[-2000:]
    records = _wait_for(metrics, 4, timeout=300)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    after = read_state_file(state)
    assert after["node_round"] > before >= 1
    # the restarted node's private model is a trained one, not a fresh initialisation
    from common.config import load_config
    from common.data import load_client_data
    from common.models import TaskSpec, build_model
    from common.mutual import evaluate

    cfg = load_config({k: v for k, v in RUN.items()})
    data = load_client_data(cfg, 1, 2)
    model = build_model("mlp", TaskSpec(1, 8, 10))
    model.load_state_dict(after["model"])
    assert evaluate(model, data.x_test, data.y_test, torch.device("cpu"))[1] > 0.5
    assert (tmp_path / "tls" / "meme_final.pt").exists()
