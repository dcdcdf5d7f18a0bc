"""Wall-clock phases of a round, for ``simulations/bench_round.py``.

Off unless the environment variable ``FEDMUTUAL_PROFILE`` names a folder: then every
process (the ServerApp, each simulated client) appends one JSON line per phase to
``<folder>/<role>-<pid>.jsonl``. It measures, it never changes what is computed, so it
is an environment variable of the tool and not a run-config key.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "FEDMUTUAL_PROFILE"


@contextmanager
def phase(role: str, name: str, server_round: int, client: int | None = None,
          **labels: str) -> Iterator[None]:
    """Time the enclosed block as ``name`` of ``server_round`` (and ``client``) if profiling;
    ``labels`` (e.g. the device a client trained on) go into its line."""
    folder = os.environ.get(ENV, "")
    if not folder:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        line = {"role": role, "phase": name, "round": server_round, "client": client,
                "seconds": seconds, "end": time.time(), "pid": os.getpid(), **labels}
        path = Path(folder) / f"{role}-{os.getpid()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:  # one small line per append: no torn records
            f.write(json.dumps(line) + "\n")


def read_phases(folder: Path) -> list[dict]:
    """Every phase line written under ``folder``."""
    return [json.loads(line) for p in sorted(Path(folder).glob("*.jsonl"))
            for line in p.read_text().splitlines() if line.strip()]
