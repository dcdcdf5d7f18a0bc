"""Admission: every reply a node sends is hostile until its bytes are checked.

A Flower ``Array`` declares dtype and shape beside its bytes, and ``Array.numpy()`` trusts
the bytes' own header: a reply can declare float32 (2, 3) and carry one float64 1e300, a
string, an object array or a header promising 10^12 elements. So nothing here reads the
declaration: :func:`read_array` parses the ``.npy`` header itself, bounds the byte length
by what the template allows before anything is allocated, and builds the array from
exactly those bytes. :func:`admit_update` returns the checked meme, weight and metrics
(the aggregate is built from them, never from the message again); :func:`admit_evaluation`
does the same for an evaluation reply. Each raises :class:`Rejected` with the reason.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from common.algorithms.base import PEER_SCORED, SCORED
from common.compression import Codec, CompressionError, State, Template, decode
from common.options import Compression
from common.privacy import update_norm

NUMPY_STYPE = "numpy.ndarray"
MAX_HEADER = 4096  # bytes of an .npy header we parse at most (honest ones are < 200)
ARRAYS, METRICS = "arrays", "metrics"  # the records' names in every reply
#: the metrics a train reply may carry (and each slot's ``train-loss-<slot>`` and
#: ``train-acc-<slot>``, :data:`SLOT_METRIC`); anything else is refused
TRAIN_METRICS = frozenset({"num-examples", "skipped-steps", "mix-weight"})
SLOT_METRIC = re.compile(r"train-(loss|acc)-[a-z][a-z0-9]{0,15}(-[a-z0-9]{1,15}){0,2}")
#: the metrics an evaluation reply may carry
EVALUATE_METRICS = frozenset({"num-examples", "mix-weight"} | {
    f"{name}-{what}" for name in (*SCORED, *PEER_SCORED) for what in ("accuracy", "loss")})
_UNIT = {"acc", "accuracy", "weight"}  # metrics named with these words lie in [0, 1]
MAX_COUNT = 10**9  # a num-examples at most, where the operator set no cap


class Rejected(ValueError):
    """A reply that must not be used; ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class Update:
    """A checked train reply: what aggregation and the results may use."""

    meme: State  # the template's keys, shapes and dtypes; finite
    weight: float  # num-examples, positive, capped
    metrics: dict[str, float]  # known keys, finite scalars
    nbytes: int  # payload bytes as sent (bytes_up)
    norm: float | None = None  # L2 distance from the meme sent, where max_norm was asked


@dataclass(frozen=True)
class Evaluation:
    """A checked evaluation reply."""

    num_examples: int  # 0: the client has no test data and is left out of the mean
    metrics: dict[str, float]


def template_of(record: ArrayRecord) -> Template:
    """Expected key -> (shape, dtype) of every update, taken from the server's meme."""
    return {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in record.items()}


def _header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """The ``.npy`` header's shape, order and dtype, and where the data starts."""
    fp = io.BytesIO(data[:MAX_HEADER + 16])
    try:
        version = np.lib.format.read_magic(fp)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise Rejected(f"npy format version {version} is not accepted")
        shape, fortran, dtype = read(fp, max_header_size=MAX_HEADER)
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is the sender's
        raise Rejected(f"not an .npy array ({type(exc).__name__}: {exc})") from None
    return tuple(int(s) for s in shape), bool(fortran), dtype, fp.tell()


def read_array(array: object, name: str, *, shape: tuple[int, ...] | None = None,
               dtype: np.dtype | None = None, max_bytes: int | None = None) -> np.ndarray:
    """The array that ``array``'s bytes hold, checked before it is built.

    Only plain numeric dtypes (bool, integers, floats) are read; ``shape`` and ``dtype``,
    when given, must match the bytes' own header exactly; the data must be exactly as long
    as the header says, and no longer than ``max_bytes``. Floats must be finite.
    """
    stype, data = getattr(array, "stype", None), getattr(array, "data", None)
    if stype != NUMPY_STYPE:
        raise Rejected(f"'{name}' has serialization type {stype!r}, expected {NUMPY_STYPE!r}")
    if not isinstance(data, bytes):
        raise Rejected(f"'{name}' carries no bytes")
    got_shape, fortran, got_dtype, start = _header(data)
    if got_dtype.hasobject or got_dtype.kind not in "biuf" or got_dtype.fields is not None:
        raise Rejected(f"'{name}' holds {got_dtype}, expected a numeric array")
    if dtype is not None and got_dtype != np.dtype(dtype):
        raise Rejected(f"'{name}' has dtype {got_dtype}, expected {np.dtype(dtype)}")
    if shape is not None and got_shape != tuple(shape):
        raise Rejected(f"'{name}' has shape {got_shape}, expected {tuple(shape)}")
    if any(s < 0 for s in got_shape):
        raise Rejected(f"'{name}' declares a negative dimension {got_shape}")
    count = math.prod(got_shape)
    nbytes = count * got_dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise Rejected(f"'{name}' declares {nbytes} bytes, more than the {max_bytes} allowed")
    if len(data) - start != nbytes:
        raise Rejected(f"'{name}' has {len(data) - start} data bytes, its header says {nbytes}")
    flat = np.frombuffer(data, dtype=got_dtype, count=count, offset=start)
    values = np.array(flat.reshape(got_shape, order="F" if fortran else "C"), order="C")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise Rejected(f"'{name}' has non-finite values (NaN or Inf)")
    return values


def _only_record(content: RecordDict, name: str, kind: str) -> object:
    """The record called ``name``, of ``kind``; records are found by name only."""
    if not isinstance(content, RecordDict):
        raise Rejected("the reply has no content")
    if name not in content:
        raise Rejected(f"no record named '{name}' (got {sorted(content.keys())[:4]})")
    record = content[name]
    if type(record).__name__ != kind:
        raise Rejected(f"record '{name}' is a {type(record).__name__}, expected a {kind}")
    return record


def _scalars(record: Mapping, allowed: frozenset[str]) -> dict[str, float]:
    """The metrics as finite Python numbers: known keys only; accuracies in [0, 1]."""
    out: dict[str, float] = {}
    for key in record.keys():
        if key not in allowed and not (allowed is TRAIN_METRICS and SLOT_METRIC.fullmatch(key)):
            raise Rejected(f"unexpected metric '{key}'")
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Rejected(f"metric '{key}' is {type(value).__name__}, expected a number")
        words = set(key.split("-"))
        if "loss" in words and (math.isnan(value) or value == math.inf):
            continue  # an honest diverged model's loss (DP noise): says nothing, dropped
        if not math.isfinite(value) or (abs(value) > 1e12 and "loss" not in words):
            raise Rejected(f"metric '{key}' = {value} is not a finite number")
        if words & _UNIT and not 0 <= value <= 1:
            raise Rejected(f"metric '{key}' = {value} is outside [0, 1]")
        if "loss" in words and value < 0:
            raise Rejected(f"metric '{key}' = {value} is negative")
        out[key] = value
    return out


def _count(metrics: dict[str, float], key: str, lo: int, cap: float | None) -> int:
    """``metrics[key]`` as an integer of at least ``lo`` and at most ``cap``."""
    value = metrics.get(key)
    if value is None:
        raise Rejected(f"'{key}' is missing")
    if value != int(value) or value < lo:
        raise Rejected(f"'{key}' = {value:g} is not {'a positive' if lo else 'an'} integer"
                       f"{'' if lo else ' >= 0'}")
    if value > (cap if cap is not None else MAX_COUNT):
        raise Rejected(f"'{key}' = {value:g} exceeds the cap of "
                       f"{cap if cap is not None else MAX_COUNT:g}")
    return int(value)


def payload(record: ArrayRecord, template: Template, codec: Codec, max_bytes: int) -> State:
    """A compressed update's parts, read from their bytes (their total bounded first)."""
    sizes = {k: len(getattr(a, "data", b"") or b"") for k, a in record.items()}
    if sum(sizes.values()) > max_bytes + MAX_HEADER * max(len(sizes), 1):
        raise Rejected(f"encoded update of {sum(sizes.values())} bytes exceeds the "
                       f"{max_bytes} that compression '{codec.mode.value}' can need")
    parts = {k: read_array(a, k, max_bytes=max_bytes) for k, a in record.items()}
    total = sum(int(v.nbytes) for v in parts.values())
    if total > max_bytes:
        raise Rejected(f"encoded update of {total} bytes exceeds the {max_bytes} "
                       f"that compression '{codec.mode.value}' can need")
    return parts


def admit_update(content: RecordDict, template: Template, *, max_weight: float | None,
                 weight_key: str = "num-examples", codec: Codec | None = None,
                 reference: State | None = None, max_payload: int = 0,
                 max_norm: float = 0.0) -> Update:
    """The checked meme, weight and metrics of a train reply, or :class:`Rejected`.

    The reply holds exactly the records ``arrays`` and ``metrics``; the arrays have exactly
    the template's keys, and each one's bytes the template's shape and dtype, finite; with
    ``compression`` the payload (bounded by ``max_payload``) is decoded against
    ``reference`` (the meme sent) and the meme it makes is checked the same way. With
    ``max_norm`` > 0 the meme lies within that L2 distance of ``reference``: finite values
    can still be huge, and a mean follows them. The weight is an integer in [1,
    ``max_weight``] (None: no cap).
    """
    record = _only_record(content, ARRAYS, "ArrayRecord")
    metrics = _scalars(_only_record(content, METRICS, "MetricRecord"), TRAIN_METRICS)
    if len(content) != 2:
        raise Rejected(f"expected the records '{ARRAYS}' and '{METRICS}' only, got "
                       f"{sorted(content.keys())[:4]}")
    sent = record.count_bytes()  # what crosses the wire, Flower's headers included
    if codec is not None and codec.mode is not Compression.NONE:
        try:
            update = decode(payload(record, template, codec, max_payload), template, codec)
        except CompressionError as exc:
            raise Rejected(f"encoded update does not decode: {exc}") from None
        meme = {}
        for k, ref in (reference or {}).items():
            meme[k] = np.asarray((ref.astype(np.float64) + update[k]).astype(ref.dtype)
                                 if ref.dtype.kind == "f" else ref + update[k])
            if meme[k].dtype.kind == "f" and not np.isfinite(meme[k]).all():
                raise Rejected(f"'{k}' decodes to non-finite values")
    else:
        missing = sorted(set(template) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(template))
        if missing or extra:
            raise Rejected(f"array keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
        meme = {k: read_array(record[k], k, shape=shape, dtype=dtype)
                for k, (shape, dtype) in template.items()}
    norm = None
    if max_norm > 0 and meme:
        if reference is None:
            raise ValueError("max_norm needs the reference the update is measured from")
        norm = update_norm(meme, reference)
        if not norm <= max_norm:
            raise Rejected(f"update norm {norm:.4g} exceeds max-update-norm={max_norm:g}")
    weight = _count(metrics, weight_key, 1, max_weight)
    return Update(meme, float(weight), metrics, sent, norm)


def admit_metrics(content: RecordDict, *, max_weight: float | None,
                  weight_key: str = "num-examples") -> Update:
    """A SecAgg+ reply's checked metrics and weight (its meme stays masked: no arrays)."""
    metrics = _scalars(_only_record(content, METRICS, "MetricRecord"), TRAIN_METRICS)
    weight = _count(metrics, weight_key, 1, max_weight)
    return Update({}, float(weight), metrics, 0)


def validate_update(content: RecordDict, template: Template, max_weight: float | None,
                    weight_key: str = "num-examples") -> str | None:
    """Why this plain (uncompressed) train reply must not be aggregated, or None."""
    try:
        admit_update(content, template, max_weight=max_weight, weight_key=weight_key)
    except Rejected as exc:
        return str(exc)
    return None


def admit_evaluation(content: RecordDict) -> Evaluation:
    """The checked metrics of an evaluation reply, or :class:`Rejected`: the one record
    ``metrics``, known keys, finite values, accuracies in [0, 1], ``num-examples`` an
    integer in [0, ``MAX_COUNT``] (0: no test data, no accuracies expected)."""
    record = _only_record(content, METRICS, "MetricRecord")
    if len(content) != 1:
        raise Rejected(f"expected the record '{METRICS}' only, got {sorted(content.keys())[:4]}")
    n = _count(_scalars({"num-examples": record.get("num-examples")} if "num-examples" in record
                        else {}, EVALUATE_METRICS), "num-examples", 0, None)
    if n == 0:  # no test data: its (NaN) accuracies mean nothing and are not kept
        return Evaluation(0, {})
    metrics = _scalars(record, EVALUATE_METRICS)
    return Evaluation(n, {k: v for k, v in metrics.items() if k != "num-examples"})
