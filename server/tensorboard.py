"""Per-round metrics as TensorBoard event files, so ``tensorboard --logdir outputs`` shows
every run (``pip install -e ".[tensorboard]"``). Without the package this logs nothing:
``metrics.json`` stays the record of a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TensorBoardLog:
    """Writes each closed round's numeric metrics at step ``round`` in the run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._writer: Any = None  # opened at the first round: no empty event files

    @staticmethod
    def available() -> bool:
        """Whether the ``tensorboard`` package is installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            return False
        return True

    def write(self, record: dict[str, Any]) -> None:
        """Every number of a round's record (not ``round`` itself, not the null ones)."""
        if self._writer is None:
            if not self.available():
                return
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir))
        for key, value in record.items():
            if key != "round" and isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=int(record["round"]))
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (the next round opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
