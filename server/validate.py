"""The one check every meme update passes before any aggregation mode sees it, and the
decoding of a compressed update into the meme it makes, which comes just before."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from common.compression import Codec, CompressionError, decode, payload_bytes

Template = dict[str, tuple[tuple[int, ...], np.dtype]]
State = dict[str, np.ndarray]


def template_of(record: ArrayRecord) -> Template:
    """Expected key -> (shape, dtype) of every update, taken from the server's meme."""
    return {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in record.items()}


def validate_update(content: RecordDict, template: Template, max_weight: float | None,
                    weight_key: str = "num-examples") -> str | None:
    """Why this reply must not be aggregated, or None if it may.

    Checks: exactly one ArrayRecord and one MetricRecord; the arrays have exactly the
    template's keys, shapes and dtypes and only finite values (a (1,)-shaped array would
    otherwise broadcast silently into the average, and NaN would reach every client); the
    weight is a positive number no larger than ``max_weight`` (None: no cap).
    """
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return (f"expected one ArrayRecord and one MetricRecord, got "
                f"{len(content.array_records)} and {len(content.metric_records)}")
    arrays = next(iter(content.array_records.values()))
    metrics = next(iter(content.metric_records.values()))
    missing = sorted(set(template) - set(arrays.keys()))
    extra = sorted(set(arrays.keys()) - set(template))
    if missing or extra:
        return f"array keys differ: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, (shape, dtype) in template.items():
        arr = arrays[key]
        if tuple(arr.shape) != shape:
            return f"'{key}' has shape {tuple(arr.shape)}, expected {shape}"
        if np.dtype(arr.dtype) != dtype:
            return f"'{key}' has dtype {arr.dtype}, expected {dtype}"
        values = arr.numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"'{key}' has non-finite values (NaN or Inf)"
    weight = metrics.get(weight_key)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return f"'{weight_key}' is missing or not a number: {weight!r}"
    if not math.isfinite(weight) or weight <= 0:
        return f"'{weight_key}' = {weight} is not a positive number"
    if max_weight is not None and weight > max_weight:
        return f"'{weight_key}' = {weight} exceeds the cap of {max_weight:g}"
    return None


def decode_reply(m: Message, reference: State, limit: int, template: Template,
                 codec: Codec) -> str | None:
    """With ``compression``: replace the reply's encoded update by the meme it makes
    (``reference``, the meme sent, + update), for :func:`validate_update` to check like any
    meme; why not, or None. ``limit``: the largest payload the mode can need."""
    if len(m.content.array_records) != 1:
        return None  # validate_update names what is wrong
    payload = {k: a.numpy() for k, a in next(iter(m.content.array_records.values())).items()}
    size = payload_bytes(payload)
    if size > limit:
        return (f"encoded update of {size} bytes exceeds the {limit} "
                f"that compression '{codec.mode.value}' can need")
    try:
        update = decode(payload, template, codec)
    except CompressionError as exc:
        return f"encoded update does not decode: {exc}"
    meme = {}
    for k, ref in reference.items():
        meme[k] = Array(np.asarray(
            (ref.astype(np.float64) + update[k]).astype(ref.dtype) if ref.dtype.kind == "f"
            else ref + update[k]))
    metrics = next(iter(m.content.metric_records.values()), MetricRecord())
    m.content = RecordDict({"arrays": ArrayRecord(meme), "metrics": metrics})
    return None
