"""Flower on 127.0.0.1 for the grid, the benchmarks and the tests: a simulation SuperLink of
our own and ``flwr run`` against it (real SuperNodes: :mod:`common.flwr_deploy`).

The grid runner, the benchmarks and the end-to-end tests use it, so they never depend on
(or disturb) the user's default local SuperLink, whose working directory and settings are
whatever they were when it first started.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.config_doc import toml_value

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
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
    """``flower-superlink --simulation`` on a free port, with its own FLWR_HOME; ``env``
    adds to its environment (``RAY_ADDRESS``: simulate on that Ray cluster)."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.env = {**flwr_env(home), **(env or {})}
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self._log = open(home / "superlink.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(self.port), "--disable-runtime-dependency-installation"],
            cwd=home, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"superlink exited: {(home / 'superlink.log').read_text()}")
            time.sleep(0.5)
        raise RuntimeError("superlink did not open its port in 60 s")

    def command(self, run_config: dict[str, Any], supernodes: int, cpus_per_client: int = 1,
                gpus_per_client: float = 0, app: Path = ROOT) -> list[str]:
        """The ``flwr run APP sim --stream`` command line for these overrides (``app``:
        this project, or another checkout of it)."""
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        federation = (f"num-supernodes={supernodes} client-resources-num-cpus={cpus_per_client}"
                      f" client-resources-num-gpus={gpus_per_client}")
        return [str(BIN / "flwr"), "run", str(app), "sim", "--stream",
                "--federation-config", federation, "--run-config", overrides]

    def last_status(self) -> tuple[str, str]:
        """``(status, details)`` of the newest run (``flwr ls``): ``flwr run --stream``
        exits 0 even when the run failed, so this is how a caller learns it."""
        out = subprocess.run([str(BIN / "flwr"), "ls", "sim", "--format", "json"],
                             env=self.env, capture_output=True, text=True, cwd=self.home)
        runs = json.loads(out.stdout).get("runs", [])
        if not runs:
            return "", ""
        last = max(runs, key=lambda r: r.get("pending-at", ""))
        return str(last.get("status", "")), str(last.get("status-details", ""))

    def run(self, run_config: dict[str, Any], supernodes: int = 3, timeout: float = 900,
            **resources: Any) -> str:
        """Run to the end; returns everything it printed."""
        out = subprocess.run(self.command(run_config, supernodes, **resources), env=self.env,
                             capture_output=True, text=True, timeout=timeout, cwd=self.home)
        return out.stdout + out.stderr

    def stop(self) -> None:
        """End the SuperLink and every process under it. Its SuperExec starts a session of
        its own, so a simulation (and its Ray) outlives the SuperLink's end, reparented to
        init, and would go on writing into a run folder a resumed grid writes too: the tree
        is listed first, then ended."""
        tree = descendants(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        end_processes(tree)
        self._log.close()

    def __enter__(self) -> SimLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, read from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")), "0")
        children.setdefault(int(ppid), []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, theirs, ...), parents before children."""
    children, out, stack = _children(), [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has ended; its parent just has not reaped it


def end_processes(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM each (a simulation then shuts its Ray down), SIGKILL what is left after
    ``grace`` seconds."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def tree_rss(root_pid: int, field: str = "Pss") -> int:
    """Memory (bytes) of a process and all its descendants, read from /proc.

    ``Pss`` (default) shares each shared page among the processes that map it, so the sum
    is what the tree really occupies; ``Rss`` counts shared pages (torch's libraries,
    mapped by every worker) once per process and overstates the total.
    """
    total = 0
    for pid in (root_pid, *descendants(root_pid)):
        entry = Path(f"/proc/{pid}")
        try:
            if field == "Rss":
                text, key = (entry / "status").read_text(), "VmRSS:"
            else:
                text, key = (entry / "smaps_rollup").read_text(), field + ":"
        except OSError:
            continue  # ended meanwhile
        line = next((ln for ln in text.splitlines() if ln.startswith(key)), "")
        total += int(line.split()[1]) * 1024 if line else 0
    return total


class PeakRSS:
    """Samples :func:`tree_rss` in a thread: ``peak`` (PSS) and ``peak_rss`` in bytes."""

    def __init__(self, root_pid: int, interval: float = 0.5) -> None:
        import threading

        self.root_pid, self.interval, self.peak, self.peak_rss = root_pid, interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.root_pid, "Pss"))
            self.peak_rss = max(self.peak_rss, tree_rss(self.root_pid, "Rss"))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def save_benchmark(path: Path, result: dict[str, Any]) -> None:
    """Write a benchmark's numbers as JSON beside what it printed, so runs can be compared."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
