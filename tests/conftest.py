"""Shared test helpers: real Flower messages and contexts, and a real local SuperLink."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_message(content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    """A message as the SuperNode would hand it to a ClientApp handler."""
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7,
                    reply_to_message_id="", group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=message_type)
    return Message(content=content, metadata=meta)


def make_context(run_config: dict, partition_id: int = 0, num_partitions: int = 3) -> Context:
    """A node's context: its partition and an empty state."""
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition_id,
                                                      "num-partitions": num_partitions},
                   state=RecordDict(), run_config=run_config)


def task_config(channels: int, size: int, classes: int, server_round: int = 1) -> ConfigRecord:
    """The config the server sends: task shape and round."""
    return ConfigRecord({"channels": channels, "size": size, "num-classes": classes,
                         "server-round": server_round})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(home: Path) -> dict[str, str]:
    """Environment for flwr commands: own FLWR_HOME, no telemetry, no runtime installs."""
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1",
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


class SimLink:
    """A simulation SuperLink of the test session's own, on a free loopback port."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _free_port()
        self.env = flwr_env(home)
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.log = open(home / "superlink.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(self.port), "--disable-runtime-dependency-installation"],
            cwd=home, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"superlink exited: {(home / 'superlink.log').read_text()}")
            time.sleep(0.5)
        raise RuntimeError("superlink did not open its port in 60 s")

    def run(self, run_config: dict, supernodes: int = 3, timeout: float = 400) -> str:
        """``flwr run . test --stream`` with the given overrides; returns the output."""
        def toml(v):
            return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) \
                else str(v)
        overrides = " ".join(f"{k}={toml(v)}" for k, v in run_config.items())
        cmd = [str(BIN / "flwr"), "run", str(ROOT), "test", "--stream",
               "--federation-config",
               f"num-supernodes={supernodes} client-resources-num-cpus=1",
               "--run-config", overrides]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                             timeout=timeout, cwd=self.home)
        return out.stdout + out.stderr

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def simlink(tmp_path_factory):
    link = SimLink(tmp_path_factory.mktemp("flwr-home"))
    yield link
    link.stop()
