"""A SuperLink and SuperNodes on 127.0.0.1, started as users start them
(``fedmutual-deploy``): for the deployment tests and benchmark.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.config_doc import toml_value
from common.flwr_local import BIN, ROOT, flwr_env, free_port


class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1, started through ``fedmutual-deploy``.

    With ``tls=True``: a CA and server certificate, node authentication, registered keys.
    Every process runs in its own session and is ended by its process group.
    """

    DEPLOY = [sys.executable, "-m", "server.deploy"]

    def __init__(self, root: Path, tls: bool = True) -> None:
        self.root, self.tls = root, tls
        root.mkdir(parents=True, exist_ok=True)
        self.env = flwr_env(root / "home")
        self.env["PYTHONPATH"] = str(ROOT)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        address = f"127.0.0.1:{self.port}"
        if tls:
            certs = root / "certs"
            self._deploy("certs", str(certs), "--host", "127.0.0.1", "--host", "localhost")
            self.certs = {name: certs / name for name in ("ca.crt", "server.crt")}
            self._deploy("connection", "fm", address, "--ca", str(self.certs["ca.crt"]))
        else:
            self._deploy("connection", "fm", address, "--insecure")
        cmd = [*self.DEPLOY, "superlink", "--state", str(root / "link"), "--host", "127.0.0.1",
               "--port", str(self.port)]
        self.start("superlink", [*cmd, "--certs", str(root / "certs")] if tls
                   else [*cmd, "--insecure"])
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"SuperLink did not open port {self.port}: see {root}/superlink.log")

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        """Start a process in its own session, logging to ``<root>/<name>.log``."""
        log = open(self.root / f"{name}.log", "a")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        return proc

    def key(self, name: str) -> tuple[Path, Path]:
        """The node's key pair, made on first use."""
        priv = self.root / "keys" / name
        if not priv.exists():
            self._deploy("node-key", str(self.root / "keys"), name)
        return priv, priv.with_suffix(".pub")

    def _deploy(self, *args: str) -> str:
        """A one-shot ``fedmutual-deploy`` command (the CLI users run); fails loudly."""
        out = subprocess.run([*self.DEPLOY, *args], env=self.env, capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"fedmutual-deploy {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def register(self, name: str) -> str:
        """``fedmutual-deploy register`` the node's public key; returns what it printed."""
        out = subprocess.run([*self.DEPLOY, "register", "fm", str(self.key(name)[1])],
                             env=self.env, capture_output=True, text=True, timeout=60,
                             cwd=self.root)
        return out.stdout + out.stderr

    def supernode(self, name: str, node_config: str) -> subprocess.Popen:
        """Start a SuperNode (TLS + its key, or insecure) with this node config."""
        cmd = [*self.DEPLOY, "supernode", "--superlink", f"127.0.0.1:{self.port}",
               "--port", str(free_port()), "--node-config", node_config]
        if self.tls:
            cmd += ["--ca", str(self.certs["ca.crt"]), "--key", str(self.key(name)[0])]
        else:
            cmd += ["--insecure"]
        return self.start(name, cmd)

    def flwr(self, *args: str, timeout: float = 120) -> str:
        """A ``flwr`` CLI command against this deployment; returns what it printed."""
        out = subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True,
                             text=True, timeout=timeout, cwd=self.root)
        return out.stdout + out.stderr

    def run(self, run_config: dict[str, Any]) -> str:
        """Start a run (detached: it goes on in the SuperLink); returns what flwr printed."""
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        return self.flwr("run", str(ROOT), "fm", "--run-config", overrides)

    def run_statuses(self, timeout: float = 0, until: str = "finished") -> list[str]:
        """The status of every run (``flwr ls``); with ``timeout``, wait until all start
        with ``until``."""
        deadline = time.time() + timeout
        while True:
            out = self.flwr("ls", "fm", "--format", "json")
            try:
                statuses = [str(r.get("status", "")) for r in json.loads(out)["runs"]]
            except (ValueError, KeyError):
                statuses = []
            if statuses and all(s.startswith(until) for s in statuses) \
                    or time.time() >= deadline:
                return statuses
            time.sleep(2)

    def stop(self, name: str, sig: int = 15) -> None:
        """Signal a process group (default SIGTERM) and reap it."""

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
        """End every process this deployment started."""
        for name in list(self.procs):
            self.stop(name)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_rounds(metrics: Path, n_rounds: int, timeout: float) -> list[dict[str, Any]]:
    """Poll a run's metrics.json until it holds ``n_rounds`` records."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            records = json.loads(metrics.read_text())
            if len(records) >= n_rounds:
                return records
        except (OSError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"{metrics} did not reach {n_rounds} rounds in {timeout:.0f} s")


