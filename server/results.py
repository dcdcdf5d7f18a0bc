"""Where results go and how they are written: atomically, as JSON and weights-only .pt."""

from __future__ import annotations

import json
import math
import time
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch

from common.atomic import atomic_write
from common.config import Config
from server.tensorboard import TensorBoardLog

METRIC_KEYS = (
    "round", "local_accuracy", "meme_accuracy", "central_meme_accuracy", "train_loss_local",
    "train_loss_meme", "num_clients", "rejected_updates", "failed_clients", "skipped",
    "bytes_up", "bytes_down", "seconds", "dp_epsilon", "dp_delta", "dp_noise_std",
    "dp_sampled", "dp_population", "dp_clipped", "dp_update_norm", "mix_accuracy",
    "rejections", "peers_accuracy", "private_accuracy", "tuned_accuracy", "peer_accuracies",
    "update_norm", "update_norm_max",
)
#: per client and evaluated round, in ``clients.json``
CLIENT_KEYS = ("key", "num_train", "num_test", "local_accuracy", "local_loss",
               "meme_accuracy", "meme_loss", "mix_accuracy", "mix_loss", "mix_weight",
               "peers_accuracy", "peers_loss", "private_accuracy", "private_loss",
               "tuned_accuracy", "tuned_loss", "peer_accuracies")


def project_dir() -> Path:
    """The folder fedmutual was installed from (``pip install -e .``), else the cwd.

    Flower runs the ServerApp from a copy of the app under ``$FLWR_HOME`` with a working
    directory that is not the user's, so "outputs/ under the project" needs this.
    """
    try:
        info = json.loads(metadata.distribution("fedmutual").read_text("direct_url.json") or "{}")
        url = urlparse(info.get("url", ""))
        if url.scheme == "file" and (Path(unquote(url.path)) / "pyproject.toml").is_file():
            return Path(unquote(url.path)).resolve()
    except (metadata.PackageNotFoundError, ValueError, OSError):
        pass
    return Path.cwd().resolve()


def project_path(path: str) -> Path:
    """A user path as an absolute path; relative ones are taken from the project folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (project_dir() / p).resolve()


def output_root(cfg: Config) -> Path:
    """``output-dir`` (default ``outputs/``) as an absolute path."""
    return project_path(cfg.output_dir or "outputs")


def default_run_name(cfg: Config) -> str:
    """``<algorithm>-<dataset>-seed<seed>-<UTC time>`` unless ``run-name`` is set."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return cfg.run_name or f"{cfg.algorithm.value}-{cfg.dataset}-seed{cfg.seed}-{stamp}"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def torch_save_atomic(path: Path, state: dict[str, Any]) -> None:
    """torch.save of tensors and plain values (loads with ``weights_only=True``), atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


class RunLog:
    """The per-round records of ``metrics.json``, written after every round."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.records: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []  # {"round": R, "clients": [...]} per round
        self._current: dict[str, Any] | None = None
        self._current_clients: list[dict[str, Any]] = []
        self._t0 = 0.0
        self.tensorboard = TensorBoardLog(run_dir)

    @classmethod
    def create(cls, cfg: Config) -> RunLog:
        """Make ``<output-dir>/<run-name>/`` and write ``config.json``.

        A folder that already holds ``metrics.json`` is refused, never overwritten.
        """
        run_dir = output_root(cfg) / default_run_name(cfg)
        if (run_dir / "metrics.json").exists():
            raise FileExistsError(f"{run_dir} already holds results (metrics.json); choose "
                                  "another run-config 'run-name' or move that folder away")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", cfg.to_dict())
        return cls(run_dir)

    @classmethod
    def resume(cls, run_dir: Path, cfg: Config, records: list[dict[str, Any]]) -> RunLog:
        """Continue a run folder from a checkpoint's records (later ones are dropped)."""
        log = cls(run_dir)
        log.records = list(records)
        last = records[-1]["round"] if records else 0
        try:
            saved = json.loads((run_dir / "clients.json").read_text())
        except (OSError, ValueError):
            saved = []
        log.clients = [r for r in saved if isinstance(r, dict) and r.get("round", 0) <= last]
        write_json_atomic(run_dir / "config.json", cfg.to_dict())
        write_json_atomic(run_dir / "metrics.json", log.records)
        write_json_atomic(run_dir / "clients.json", log.clients)
        return log

    @property
    def last(self) -> dict[str, Any] | None:
        """The last closed round's record."""
        return self.records[-1] if self.records else None

    def begin_round(self, server_round: int) -> None:
        """Open the record of a round; every documented key starts as null."""
        self._current = {k: None for k in METRIC_KEYS}
        self._current.update(round=server_round, bytes_up=0, bytes_down=0, num_clients=0,
                             rejected_updates=0, failed_clients=0, skipped=False,
                             rejections=[])
        self._current_clients = []
        self._t0 = time.perf_counter()

    def set_clients(self, clients: list[dict[str, Any]]) -> None:
        """The open round's per-client evaluation (``CLIENT_KEYS`` each, by client key)."""
        self._current_clients = [{k: _clean(c.get(k)) for k in CLIENT_KEYS}
                                 for c in sorted(clients, key=lambda c: c["key"])]

    def set(self, **values: Any) -> None:
        """Set keys of the open round (ignored before the first round opens)."""
        if self._current is not None:
            self._current.update({k: _clean(v) for k, v in values.items()})

    def reject(self, stage: str, node: int, key: int | None, reason: str) -> None:
        """Count a rejected reply (``rejected_updates``) and keep why (``rejections``)."""
        if self._current is not None:
            self._current["rejected_updates"] += 1
            self._current["rejections"].append(
                {"stage": stage, "node": node, "key": key, "reason": reason[:300]})

    def add(self, key: str, amount: int) -> None:
        """Add to a counter of the open round (bytes)."""
        if self._current is not None:
            self._current[key] += amount

    def end_round(self) -> None:
        """Close the open round and rewrite ``metrics.json``."""
        if self._current is None:
            return
        self._current["seconds"] = round(time.perf_counter() - self._t0, 3)
        self.records.append(self._current)
        if self._current_clients:
            self.clients.append({"round": self._current["round"],
                                 "clients": self._current_clients})
            write_json_atomic(self.run_dir / "clients.json", self.clients)
        self._current = None
        write_json_atomic(self.run_dir / "metrics.json", self.records)
        self.tensorboard.write(self.records[-1])

    def summary(self) -> str:
        """One line: best and final local, meme and central accuracy."""
        parts = []
        for key, label in (("local_accuracy", "local"), ("meme_accuracy", "meme"),
                           ("central_meme_accuracy", "central meme")):
            vals = [(r[key], r["round"]) for r in self.records if r[key] is not None]
            if vals:
                best = max(vals)
                parts.append(f"{label} accuracy best {best[0]:.4f} (round {best[1]}) "
                             f"final {vals[-1][0]:.4f}")
        body = " | ".join(parts) or "no accuracy recorded"
        return f"fedmutual summary: {body} | results in {self.run_dir}"
