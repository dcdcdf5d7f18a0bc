"""A node's files in its state folder: the private model's state file, kept atomically with
the previous version beside it, and plain arrays (numpy, no pickle) such as top-k's residual.

Everything here is read back with ``weights_only=True`` / ``allow_pickle=False``: a state
folder is a user path, and may have been written by something else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.atomic import atomic_write

FILE_FORMAT = 2  # 2: one entry per private model under "models"; 1 (one model) still loads


class PrivateStateError(RuntimeError):
    """A saved private model cannot be used as it is (corrupt, another model, out of step)."""


def cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cpu(v) for v in obj]
    return obj


def prev(path: Path) -> Path:
    return path.with_suffix(".prev.pt")


def write_atomic(path: Path, payload: dict) -> None:
    """The new version replaces the file; the one it replaces becomes ``.prev.pt``."""
    atomic_write(path, lambda f: torch.save(payload, f), keep_previous=prev(path))


def read_state_file(path: Path) -> dict:
    """Load and check one state file (``weights_only=True``); errors name the file."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise PrivateStateError(f"private state file {path} is corrupt or truncated "
                                f"({type(exc).__name__}: {exc}); fix or move it, or set "
                                "reset-private=true to start a fresh private model") from None
    if not isinstance(saved, dict) or saved.get("format") not in (1, FILE_FORMAT):
        got = saved.get("format") if isinstance(saved, dict) else None
        raise PrivateStateError(f"private state file {path} has format {got!r}, this version "
                                f"reads 1 and {FILE_FORMAT} (is it a fedmutual state file?)")
    if saved["format"] == 1:  # one private model, at the top level: the slot 'local'
        need = {"arch", "node_round", "server_round", "lineage", "model", "optimizer"}
        if not need <= set(saved):
            raise PrivateStateError(f"private state file {path} is not a fedmutual state "
                                    f"file (expected keys {sorted(need)})")
        saved = {**saved, "models": {"local": {k: saved.pop(k)
                                               for k in ("arch", "model", "optimizer")}}}
    need = {"node_round", "server_round", "lineage", "models"}
    models = saved.get("models")
    if not need <= set(saved) or not isinstance(models, dict) or not all(
            isinstance(m, dict) and {"arch", "model", "optimizer"} <= set(m)
            for m in models.values()):
        raise PrivateStateError(f"private state file {path} is not a fedmutual state file "
                                f"(expected keys {sorted(need)}, each model with arch, model "
                                "and optimizer)")
    return saved


def pick_saved(path: Path, lineage: str, max_round: int | None,
                this_run_only: bool = False) -> dict | None:
    """The newest saved version that the caller may see (see :func:`restore`); with
    ``this_run_only`` (``reset-private``) only what run ``lineage`` saved counts, and an
    unreadable file is one to replace, not an error."""
    ahead = None
    for p in (path, prev(path)):
        if not p.exists():
            continue
        try:
            saved = read_state_file(p)
        except PrivateStateError:
            if this_run_only:
                continue
            raise
        if this_run_only and saved["lineage"] != lineage:
            continue
        if (lineage and saved["lineage"] == lineage and max_round is not None
                and saved["server_round"] > max_round):
            ahead = saved
            continue
        return saved
    if ahead is not None:
        saved = ahead
        raise PrivateStateError(
            f"private state file {path} was trained in round {saved['server_round']} of run "
            f"'{lineage}', later than round {max_round} that the server is now at, and no "
            f"older version is kept; set reset-private=true to start afresh")
    return None


def save_arrays(path: Path, arrays: dict[str, np.ndarray], lineage: str) -> None:
    """Per-node arrays of run ``lineage`` (top-k's residual), atomically, as a plain ``.npz``."""
    atomic_write(path, lambda f: np.savez(f, **{**arrays, _LINEAGE: np.array(lineage)}))


def load_arrays(path: Path, lineage: str) -> dict[str, np.ndarray] | None:
    """What :func:`save_arrays` kept for run ``lineage``; None if absent or from another run."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise PrivateStateError(f"state file {path} is corrupt or truncated "
                                f"({type(exc).__name__}: {exc}); remove it") from None
    if str(arrays.pop(_LINEAGE, "")) != lineage:
        return None
    return arrays


_LINEAGE = "__lineage__"
