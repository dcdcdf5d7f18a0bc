"""The simulation SuperLink of the grid and the tests ends everything it started."""

import subprocess
import time
from pathlib import Path

import pytest

from common.flwr_local import SimLink, descendants

pytestmark = pytest.mark.e2e


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_stopping_the_superlink_ends_the_simulation_it_runs(tmp_path):
    """A simulation runs in a session its SuperExec starts, out of the SuperLink's process
    group: ``stop()`` must still end it and its Ray, mid-run (as a killed grid does)."""
    link = SimLink(tmp_path / "home")
    cmd = link.command({"dataset": "digits", "meme-model": "mlp", "local-model": "mlp",
                        "num-server-rounds": 1000, "output-dir": str(tmp_path / "out")}, 2)
    client = subprocess.Popen(cmd, env=link.env, cwd=link.home, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
    try:
        deadline, tree = time.time() + 180, []
        while time.time() < deadline and not any("ClientAppActor" in _cmdline(p) for p in tree):
            time.sleep(0.5)
            tree = descendants(link.proc.pid)
        sims = [p for p in tree if "flwr-simulation" in _cmdline(p)]
        assert sims and any("ClientAppActor" in _cmdline(p) for p in tree), tree
        link.stop()
        left = [(p, _cmdline(p)) for p in tree if _running(p)]
        assert not left, left
    finally:
        client.kill()
        if link.proc.poll() is None:
            link.stop()
