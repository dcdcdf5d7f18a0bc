"""Co-distillation's stale teachers on the client: the other clients' models that the
server forwarded at the last exchange, kept beside the private model until the next one.

A teacher is a frozen model of the federation's ``meme-model``: it is loaded strictly (keys
and shapes; a record that does not fit is refused, naming it), only ever run forward, and
never sent anywhere.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, RecordDict
from torch import nn

from client import private
from common.algorithms.codistill import is_teacher
from common.config import Config
from common.models import TaskSpec, build_model
from common.records import load_into

KEPT = "teachers"  # the name they are kept under (context.state or a file beside the state)


def teachers(cfg: Config, context: Context, node: private.NodeInfo, spec: TaskSpec,
             content: RecordDict, device: torch.device, lineage: str,
             ) -> dict[str, nn.Module]:
    """This update's teachers: those the message brings (then kept for the rounds until
    the next exchange), else those kept from the last exchange (none before the first)."""
    sent = {name: rec for name, rec in content.array_records.items() if is_teacher(name)}
    if len(sent) > cfg.codistill_teachers:
        raise ValueError(f"the server forwarded {len(sent)} teachers, more than "
                         f"codistill-teachers={cfg.codistill_teachers}")
    if sent:
        arrays = {f"{name}/{k}": a.numpy() for name, rec in sent.items() for k, a in rec.items()}
        private.keep_arrays(context, cfg, node, KEPT, arrays, lineage)
    else:
        arrays = private.kept_arrays(context, cfg, node, KEPT, lineage) or {}
    grouped: dict[str, dict[str, Array]] = {}
    for key, value in arrays.items():
        name, _, param = key.partition("/")
        grouped.setdefault(name, {})[param] = Array(value)
    out = {}
    for name in sorted(grouped):
        model = build_model(cfg.meme_model, spec)
        load_into(model, ArrayRecord(grouped[name]), what=f"{name} forwarded by the server")
        out[name] = model.to(device).eval()
    return out
