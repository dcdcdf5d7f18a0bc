"""Client mods: what wraps the handlers on the way out.

- :func:`audit_mod` (whole ClientApp, outermost): with run-config ``audit-dir`` set, writes
  every reply this client sends, and a snapshot of its private model, to that folder, so a
  test (or a privacy auditor) can check what left the device. Off by default: it costs a
  file write per message.
- :func:`secure_mod` (train): Flower's ``secaggplus_mod`` for the messages of the SecAgg+
  protocol; plain train messages pass through untouched.
- :func:`client.secure.legacy_mod` (train): SecAgg+'s legacy records in and out.
- :func:`compress_mod` (train): with run-config ``compression``, replaces the meme in the
  reply by its encoded update (``common/compression.py``).
- :func:`dp_clip_mod` (train): with ``dp-mode=client``, clips the meme update to the norm
  the server's DP wrapper sent, before it is masked or sent.
- :func:`fault_mod` (train, innermost): the injected faults of run-config ``faults``
  (robustness experiments): raise, straggle, or send a NaN, scaled or forged meme.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import private
from common.atomic import atomic_write
from common.compression import encode
from common.config import load_config
from common.faults import apply_to_update
from common.options import Compression
from common.privacy import clip_update
from common.records import MEME, meme_record


def _record_summary(msg: Message) -> dict:
    """Every record of a message: its kind and, for config/metric records, the values."""
    out: dict = {}
    for name, record in msg.content.items():
        kind = type(record).__name__
        if isinstance(record, ArrayRecord):
            out[name] = {"kind": kind, "keys": list(record.keys())}
        else:
            out[name] = {"kind": kind, "values": {k: _jsonable(v) for k, v in record.items()}}
    return out


def _jsonable(v: object) -> object:
    if isinstance(v, bytes):
        return {"bytes": len(v)}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Record the reply (records, arrays) and every private model next to it
    (``audit-dir``)."""
    reply = call_next(msg, context)
    audit_dir = str(context.run_config.get("audit-dir", ""))
    if not audit_dir:
        return reply
    cfg = load_config(context.run_config)
    node = private.node_info(cfg, context)
    folder = Path(audit_dir) / f"client-{node.client_key}"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{time.time_ns()}-{msg.metadata.message_type.replace('.', '-')}"
    arrays = {}
    if not reply.has_error():
        for name, record in reply.content.array_records.items():
            for k, a in record.items():
                arrays[f"reply/{name}/{k}"] = a.numpy()
    for slot in cfg.algorithm.spec.private_for(cfg):  # every private model ("local" bare)
        stored = private.stored_model(context, cfg, node, slot.name)
        prefix = "private/" if slot.name == "local" else f"private/{slot.name}/"
        for k, a in (stored or {}).items():
            arrays[f"{prefix}{k}"] = a
    meta = {"message_type": msg.metadata.message_type, "error": reply.has_error(),
            "records": {} if reply.has_error() else _record_summary(reply)}
    atomic_write(folder / f"{stem}.npz", lambda f: np.savez(f, **arrays))
    atomic_write(folder / f"{stem}.json", lambda f: f.write(json.dumps(meta).encode()))
    return reply


def secure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ client for the protocol's messages; other train messages pass."""
    if (msg.metadata.message_type == MessageType.TRAIN
            and RECORD_KEY_CONFIGS in msg.content.config_records):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def dp_clip_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the meme update to the server's ``clipping_norm`` (``dp-mode=client``).

    Flower's ``fixedclipping_mod`` does the same for a plain message, but scales every
    array in place (which fails on integer buffers) and refuses the two config records of
    a SecAgg+ message; this clips the floating arrays, in either message format.
    """
    norm = None
    for record in msg.content.config_records.values():
        if KEY_CLIPPING_NORM in record:
            norm = float(record[KEY_CLIPPING_NORM])
    reply = call_next(msg, context)
    if norm is None or reply.has_error():
        return reply
    sent = meme_record(msg.content)
    record = meme_record(reply.content)
    name = MEME if MEME in reply.content else next(iter(reply.content.array_records))
    clipped, _ = clip_update({k: a.numpy() for k, a in record.items()},
                             {k: a.numpy() for k, a in sent.items()}, norm)
    reply.content.array_records[name] = ArrayRecord(
        {k: Array(clipped[k]) for k in record.keys()})
    return reply


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The faults that hit this client in this round: ``raise`` (an error reply), ``slow``
    (a straggler: sleeps first), ``nan`` and ``scale`` (a broken or poisoning meme),
    ``forge`` (arrays whose bytes are not what they declare)."""
    cfg = load_config(context.run_config)
    if not cfg.faults:
        return call_next(msg, context)
    node = private.node_info(cfg, context)
    server_round = int(msg.content["config"]["server-round"])
    faults = [f for f in cfg.fault_list if f.applies(node.partition_id, server_round)]
    if any(f.kind == "raise" for f in faults):
        raise RuntimeError(f"injected fault: client {node.partition_id} raises in round "
                           f"{server_round} (run-config 'faults')")
    for fault in (f for f in faults if f.kind == "slow"):
        time.sleep(fault.seconds)
    reply = call_next(msg, context)
    if reply.has_error() or not len(meme_record(reply.content)):
        return reply
    sent = {k: a.numpy() for k, a in meme_record(reply.content).items()}
    received = {k: a.numpy() for k, a in meme_record(msg.content).items()}
    for fault in faults:
        sent = apply_to_update(fault, sent, received)
    arrays = {k: Array(np.asarray(v)) for k, v in sent.items()}
    if any(f.kind == "forge" for f in faults):
        arrays = {k: forged(a) if a.dtype.startswith("float") else a for k, a in arrays.items()}
    reply.content[MEME] = ArrayRecord(arrays)
    return reply


def forged(array: Array) -> Array:
    """``array``'s declaration (dtype, shape) over the bytes of one float32 1e6: what a
    hostile node sends to a server that checks labels instead of bytes (a (1,) array
    broadcasts into the average)."""
    bad = Array(np.array([1e6], np.float32))
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=bad.stype, data=bad.data)


RESIDUAL = "compression-residual"  # what topk left out, fed into the next update


def compress_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Send the meme's update (meme - received) encoded as run-config ``compression`` says;
    ``topk`` keeps what it leaves out beside the private model and adds it to the next update
    (error feedback), so nothing is lost, only delayed."""
    cfg = load_config(context.run_config)
    reply = call_next(msg, context)
    if (cfg.compression is Compression.NONE or reply.has_error()
            or not len(meme_record(reply.content))):
        return reply
    received = {k: a.numpy() for k, a in meme_record(msg.content).items()}
    update = {}
    for k, a in meme_record(reply.content).items():
        v = a.numpy()
        update[k] = (v.astype(np.float32) - received[k].astype(np.float32)
                     if v.dtype.kind == "f" else v - received[k])
    node = private.node_info(cfg, context)
    lineage = str(msg.content["config"].get("lineage", ""))
    residual = private.kept_arrays(context, cfg, node, RESIDUAL, lineage)
    payload, left = encode(update, cfg.codec, residual)
    if cfg.compression is Compression.TOPK:
        private.keep_arrays(context, cfg, node, RESIDUAL, left, lineage)
    reply.content[MEME] = ArrayRecord({k: Array(np.asarray(v)) for k, v in payload.items()})
    return reply
