"""The DP release ledger: every noised meme is on disk before it can leave the server.

Round R's meme reaches clients in R's evaluation (and as R+1's start) before R is closed
and checkpointed. A crash in between and a ``resume-from`` run R again with fresh noise:
two releases of R reached clients, and both must count. The metric records cannot say so
(a resume restores only the checkpoint's completed rounds), so ε is computed from
``<run dir>/dp-releases.json`` instead: one entry per release (round, σ, m sampled, N
connected, UTC time), appended by the DP wrapper (the whole file rewritten atomically,
fsynced) after the meme is noised and before it is returned. Nothing is ever removed: a
re-run round adds a second entry for the same round.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.supercore import log

from common.privacy import Release
from server.results import write_json_atomic

LEDGER = "dp-releases.json"
FORMAT = 1
_ABOUT = ("every noised meme this run folder released, in order; each one counts towards "
          "dp_epsilon (a round run again after a crash counts again)")


class LedgerError(RuntimeError):
    """The ledger is unreadable, malformed, or misses releases the checkpoint records."""


@dataclass(frozen=True)
class Entry:
    """One release: the round, what the accountant needs, and where the entry came from."""

    round: int
    release: Release
    time: str | None  # UTC, ISO 8601; None for entries rebuilt from metric records
    source: str = "release"  # or "metrics.json" (a run folder from before the ledger)

    def to_json(self) -> dict[str, Any]:
        out = {"round": self.round, "noise_multiplier": self.release.noise_multiplier,
               "sampled": self.release.sampled, "population": self.release.population,
               "time": self.time}
        if self.source != "release":
            out["source"] = self.source
        return out


class ReleaseLedger:
    """``<run dir>/dp-releases.json``: read once when the DP wrapper is built, then only
    appended to (:meth:`append`)."""

    def __init__(self, path: Path, entries: Sequence[Entry] = ()) -> None:
        self.path = path
        self.entries: list[Entry] = list(entries)

    @property
    def releases(self) -> list[Release]:
        """Every release so far, for :func:`common.privacy.epsilon_spent`."""
        return [e.release for e in self.entries]

    @classmethod
    def open(cls, run_dir: Path, records: Sequence[Mapping[str, Any]],
             noise_multiplier: float) -> ReleaseLedger:
        """The run folder's ledger, checked against the (checkpoint's) metric records.

        A corrupt ledger, or one that lacks a DP round the records hold, stops the run
        (:class:`LedgerError`, naming the file): counting too little is never the fallback.
        A missing ledger with DP rounds in the records is a folder from before the ledger:
        its entries are rebuilt from the records (σ from the config, which a resume cannot
        change), written, and a warning says releases of unfinished rounds are unknown.
        """
        path = run_dir / LEDGER
        released = [r for r in records if r.get("dp_sampled")]
        if not path.exists():
            ledger = cls(path)
            if released:
                log(WARNING, "dp: no release ledger %s; this run folder predates it: counting "
                    "the %d DP round(s) of the checkpoint's records (a release of a round "
                    "that never completed before this resume is not known)", path,
                    len(released))
                ledger.entries = [Entry(int(r["round"]), Release(
                    noise_multiplier, int(r["dp_sampled"]),
                    max(int(r.get("dp_population") or 0), int(r["dp_sampled"]))), None,
                    "metrics.json") for r in released]
                ledger._write()
            return ledger
        ledger = cls(path, _parse(path))
        have = {e.round for e in ledger.entries}
        missing = sorted({int(r["round"]) for r in released} - have)
        if missing:
            raise LedgerError(f"dp release ledger {path} lacks round(s) {missing} that the "
                              "checkpoint records as released: it does not belong to this "
                              "checkpoint or lost entries; ε cannot be accounted")
        done = max((int(r["round"]) for r in records), default=0)
        extra = [e.round for e in ledger.entries if e.round > done]
        if extra:
            log(WARNING, "dp: %d release(s) of round(s) %s reached clients but their rounds "
                "were never checkpointed (the run stopped in between): they count towards "
                "epsilon, and so will the rounds run again now", len(extra),
                sorted(set(extra)))
        return ledger

    def append(self, server_round: int, release: Release) -> None:
        """Record a release durably (atomic rewrite with fsync, then the folder's fsync).

        Call it before the meme can leave the server: if it raises, the meme must not go.
        """
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.entries.append(Entry(server_round, release, stamp))
        try:
            self._write()
        except BaseException:
            self.entries.pop()
            raise

    def _write(self) -> None:
        write_json_atomic(self.path, {"format": FORMAT, "about": _ABOUT,
                                      "releases": [e.to_json() for e in self.entries]})
        _fsync_dir(self.path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut after it keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the file itself is fsynced
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _int(value: Any, least: int) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
    return value if ok else None


def _parse(path: Path) -> list[Entry]:
    """The ledger's entries; :class:`LedgerError` naming the file for anything else."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LedgerError(f"dp release ledger {path} is unreadable or corrupt "
                          f"({type(exc).__name__}: {exc}); the run stops rather than "
                          "account ε without it") from None
    if (not isinstance(raw, dict) or raw.get("format") != FORMAT
            or not isinstance(raw.get("releases"), list)):
        raise LedgerError(f"dp release ledger {path} is corrupt: expected an object with "
                          f"format {FORMAT} and a 'releases' list")
    entries = []
    for i, item in enumerate(raw["releases"]):
        e = item if isinstance(item, dict) else {}
        sigma = e.get("noise_multiplier")
        rnd, sampled = _int(e.get("round"), 1), _int(e.get("sampled"), 1)
        population = _int(e.get("population"), sampled or 1)
        sigma_ok = (isinstance(sigma, int | float) and not isinstance(sigma, bool)
                    and math.isfinite(sigma) and sigma >= 0)
        if rnd is None or sampled is None or population is None or not sigma_ok:
            raise LedgerError(f"dp release ledger {path} is corrupt: release {i} is "
                              f"{json.dumps(item)[:200]}, expected round >= 1, noise_multiplier "
                              ">= 0, sampled >= 1, population >= sampled")
        stamp = e.get("time")
        entries.append(Entry(rnd, Release(float(sigma), sampled, population),
                             stamp if isinstance(stamp, str) else None,
                             str(e.get("source", "release"))))
    return entries
