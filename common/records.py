"""state_dict <-> Flower records, strictly: every key, shape and dtype must match the model.

Whole state_dicts are copied (parameters *and* buffers such as BatchNorm statistics),
never ``zip(model.parameters(), ...)``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A state_dict as an ArrayRecord (copied to CPU numpy)."""
    return ArrayRecord(OrderedDict((k, Array(v.detach().cpu().numpy())) for k, v in state.items()))


def load_into(model: nn.Module, record: ArrayRecord, what: str = "model") -> None:
    """Load an ArrayRecord into ``model`` strictly, keeping each tensor's own dtype.

    Raises ValueError naming the first key whose presence or shape differs, so a meme
    from another architecture is refused rather than half-loaded.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in record]
    extra = [k for k in record if k not in own]
    if missing or extra:
        raise ValueError(f"{what}: keys differ from the model (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    new = OrderedDict()
    for k, ref in own.items():
        arr = record[k].numpy()
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"{what}: '{k}' has shape {tuple(arr.shape)}, the model "
                             f"expects {tuple(ref.shape)}")
        new[k] = torch.from_numpy(np.asarray(arr)).to(ref.dtype)
    model.load_state_dict(new, strict=True)


MEME = "arrays"  # the record that carries the meme, in every message either way


def meme_record(content: RecordDict) -> ArrayRecord:
    """The meme's record of a message's content: the one named ``arrays``, or, in the
    legacy records of a SecAgg+ round, the message's only ArrayRecord."""
    if MEME in content:
        return content[MEME]
    records = list(content.array_records.values())
    if len(records) != 1:
        raise KeyError(f"no record named '{MEME}' and {len(records)} ArrayRecords")
    return records[0]


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of array payload in a record (what crosses the wire, headers included)."""
    return record.count_bytes()


def optimizer_to_records(opt: torch.optim.Optimizer) -> tuple[ArrayRecord, ConfigRecord]:
    """An optimizer's per-parameter state: tensors in an ArrayRecord, scalars in a ConfigRecord.

    Hyper-parameters (``param_groups``) are not stored: they come from the run config.
    """
    arrays, scalars = ArrayRecord(), ConfigRecord()
    for idx, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            key = f"{idx}.{name}"
            if isinstance(value, torch.Tensor):
                arrays[key] = Array(value.detach().cpu().numpy())
            elif isinstance(value, int | float | bool):
                scalars[key] = value
            else:
                raise TypeError(f"optimizer state '{key}' of type {type(value).__name__} "
                                "cannot be stored")
    return arrays, scalars


def optimizer_from_records(opt: torch.optim.Optimizer, arrays: ArrayRecord,
                           scalars: ConfigRecord) -> None:
    """Restore state saved by :func:`optimizer_to_records` into a freshly built optimizer."""
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key in list(arrays.keys()) + list(scalars.keys()):
        idx_s, name = key.split(".", 1)
        value = (torch.from_numpy(np.asarray(arrays[key].numpy())) if key in arrays
                 else scalars[key])
        state.setdefault(int(idx_s), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)
