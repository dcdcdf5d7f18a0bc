"""The algorithms: one module each, registered here with one line.

An algorithm says which models a client holds (its :class:`~common.algorithms.base.Slot`
s: private ones stay on the device, shared ones go up and are combined by the server), the
loss of one batch over all of their logits, what the server sends with the train message,
how it combines the shared models, and what the client evaluates as its personalised
model. The training loop, the private store and the results loop over the slots, so K
models are data. Importing this package imports no torch (the config validates the
algorithm's keys through it); the modules import torch inside the methods that train.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.algorithms.base import Algorithm

#: name -> module; the run-config key ``algorithm`` takes these names
REGISTRY: dict[str, str] = {
    "fml": "common.algorithms.fml",
    "fedavg": "common.algorithms.fedavg",
    "fedprox": "common.algorithms.fedprox",
    "local": "common.algorithms.local",
    "fedavg-ft": "common.algorithms.fedavg_ft",
    "ditto": "common.algorithms.ditto",
    "codistill": "common.algorithms.codistill",
}


@cache
def get(name: str) -> Algorithm:
    """The registered algorithm called ``name`` (its module's ``ALGORITHM``)."""
    return importlib.import_module(REGISTRY[str(name)]).ALGORITHM
