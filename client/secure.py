"""The SecAgg+ translation, as a mod: Flower's SecAgg+ workflow speaks the legacy
``fitins.*`` / ``fitres.*`` records; the train handler only ever sees the Message API.

In: the workflow's positional float arrays ("0", "1", ...) become the meme's keyed arrays
(integer counters, which stay out of the masked vector, take the model's own value).
Out: the reply's meme becomes positional float arrays plus the weight the SecAgg+ mod
masks, after checking that every value lies within ``secagg-clipping-range``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.compat.common import recorddict_compat as compat
from flwr.compat.common.typing import Code, FitRes, Status

from common.config import Aggregation, Config, load_config
from common.models import TaskSpec, build_model
from common.records import meme_record

#: record names of the SecAgg+ workflow's (legacy FitIns) train messages
FITINS_ARRAYS, FITINS_CONFIG = "fitins.parameters", "fitins.config"


def secure_keys(state: dict) -> list[str]:
    """What SecAgg+ sums: the floating arrays (weights and BatchNorm statistics)."""
    return [k for k, v in state.items() if np.asarray(v).dtype.kind == "f"]


def _keyed(cfg: Config, msg: Message) -> Message:
    """The workflow's train message as the handler expects it: "arrays" and "config"."""
    config = msg.content[FITINS_CONFIG]
    spec = TaskSpec(int(config["channels"]), int(config["size"]), int(config["num-classes"]))
    state = {k: v.numpy() for k, v in build_model(cfg.meme_model, spec).state_dict().items()}
    keys = secure_keys(state)
    arrays = msg.content[FITINS_ARRAYS]
    if len(arrays) != len(keys):
        raise ValueError(f"meme received from the server has {len(arrays)} arrays, the "
                         f"'{cfg.meme_model}' meme has {len(keys)} floating arrays")
    keyed = ArrayRecord({k: arrays[str(keys.index(k))] if k in keys else Array(state[k])
                         for k in state})
    return Message(content=RecordDict({"arrays": keyed, "config": config}),
                   metadata=msg.metadata)


def _fitres(cfg: Config, reply: Message, msg: Message) -> Message:
    """The handler's reply as the ``fitres.*`` records the SecAgg+ mod masks."""
    state = {k: a.numpy() for k, a in meme_record(reply.content).items()}
    state = {k: state[k] for k in secure_keys(state)}
    limit = cfg.secagg_clipping_range
    for k, v in state.items():
        top = float(np.abs(v).max()) if v.size else 0.0
        if not np.isfinite(top) or top > limit:
            raise ValueError(f"meme array '{k}' reaches {top:.4g}, outside "
                             f"secagg-clipping-range={limit:g}: SecAgg+ would clip it; "
                             "raise secagg-clipping-range")
    metrics = dict(reply.content["metrics"])
    weight = 1 if cfg.aggregation is Aggregation.UNIFORM else int(metrics["num-examples"])
    params = compat.arrayrecord_to_parameters(
        ArrayRecord({k: Array(v) for k, v in state.items()}), keep_input=True)
    fitres = FitRes(Status(Code.OK, ""), params, weight, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def legacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Translate a SecAgg+ train message for the handler, and its reply back; plain train
    messages pass untouched."""
    if FITINS_ARRAYS not in msg.content.array_records:
        return call_next(msg, context)
    cfg = load_config(context.run_config)
    reply = call_next(_keyed(cfg, msg), context)
    if reply.has_error():
        return reply
    return _fitres(cfg, reply, msg)
