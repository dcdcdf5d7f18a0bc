"""Server checkpoints: written atomically after every round, checked hard before a resume.

``<run dir>/checkpoint.pt`` holds the meme, the last completed round, the metrics so far,
the resolved config, the strategy's own state and the RNG states, all as plain tensors and
Python values so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import Config, config_changes
from common.schema import RESUMABLE
from server.results import torch_save_atomic

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
# Keys a resumed run may change (how long it runs, where it writes, how long it waits):
# the schema's ``resumable`` keys.
MAY_DIFFER = RESUMABLE


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not belong to this run's config."""


@dataclass
class Checkpoint:
    """What a resumed run starts from."""

    path: Path
    round: int
    meme: dict[str, torch.Tensor]
    records: list[dict[str, Any]]
    config: dict[str, Any]
    strategy: dict[str, Any]
    rng: dict[str, Any]
    teachers: dict[str, dict[str, torch.Tensor]]  # co-distillation's bank, by client key
    velocity: dict[str, torch.Tensor]  # server momentum's (empty without it)


def save_checkpoint(run_dir: Path, server_round: int, meme: dict[str, torch.Tensor],
                    records: list[dict[str, Any]], cfg: Config,
                    strategy_state: dict[str, Any],
                    teachers: dict[str, dict[str, torch.Tensor]] | None = None,
                    velocity: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``checkpoint.pt`` for a completed round (temp file, fsync, rename); with
    ``teachers``, co-distillation's bank of the clients' latest models; with ``velocity``,
    server momentum's."""
    np_state = np.random.get_state()
    payload = {
        "format": FORMAT, "round": server_round,
        "meme": {k: v.detach().cpu() for k, v in meme.items()},
        "metrics_json": json.dumps(records), "config_json": json.dumps(cfg.to_dict()),
        "strategy_json": json.dumps(strategy_state),
        "teachers": teachers or {},
        "velocity": velocity or {},
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                          *np_state[2:]]},
    }
    path = run_dir / CHECKPOINT
    torch_save_atomic(path, payload)
    return path


def load_checkpoint(run_dir: Path, cfg: Config) -> Checkpoint:
    """Read and check a run folder's checkpoint against the current config.

    Refuses (naming the file and the mismatch) a missing, corrupt or truncated file, and
    one whose config differs in any key outside :data:`MAY_DIFFER`.
    """
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"run-config 'resume-from': no checkpoint at {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"expected a dict with format {FORMAT}")
        ckpt = Checkpoint(path, int(raw["round"]), dict(raw["meme"]),
                          json.loads(raw["metrics_json"]), json.loads(raw["config_json"]),
                          json.loads(raw["strategy_json"]), raw["rng"],
                          dict(raw.get("teachers", {})), dict(raw.get("velocity", {})))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated "
                              f"({type(exc).__name__}: {exc})") from None
    differ = config_changes(ckpt.config, cfg, "checkpoint", MAY_DIFFER)
    if differ:
        detail = ", ".join(differ)
        raise CheckpointError(f"checkpoint {path} is from a different config ({detail})")
    if len(ckpt.records) != ckpt.round:
        raise CheckpointError(f"checkpoint {path} is inconsistent: round {ckpt.round} but "
                              f"{len(ckpt.records)} metric records")
    return ckpt


def restore_rng(ckpt: Checkpoint) -> None:
    """Put python's, numpy's and torch's global RNGs back where the checkpoint left them."""
    py = ckpt.rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(ckpt.rng["torch"])
    name, keys, pos, has_gauss, gauss = ckpt.rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
