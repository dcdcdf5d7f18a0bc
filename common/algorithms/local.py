"""Local-only training: each client's private model on its own data, nothing sent, nothing
aggregated. The baseline every personalised method must beat."""

from __future__ import annotations

from common.algorithms.base import Algorithm, Slot


class Local(Algorithm):
    name = "local"
    summary = "the private model only, nothing sent or aggregated"
    slots = (Slot("local"),)

    def check(self, cfg) -> str | None:  # noqa: ANN001 - Config
        if cfg.aggregation.robust:
            return (f"run-config key 'aggregation' = {cfg.aggregation.value!r} needs a meme, "
                    "but algorithm 'local' aggregates nothing: expected 'weighted'")
        return None


ALGORITHM = Local()
