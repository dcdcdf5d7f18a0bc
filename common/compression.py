"""Compressed meme updates: what a client sends is ``meme - received`` encoded, and the
server decodes it before anything else looks at it. Pure numpy; no Flower, no torch.

Each float array ``k`` of the update becomes named parts ``k|<part>``:

- ``fp16``: ``k|fp16`` (float16, the array's shape);
- ``int8``: ``k|q`` (int8, the shape) and ``k|scale`` (float32, one value): x ≈ q·scale,
  scale = max|x| / 127 per tensor;
- ``topk``: the ``ratio`` share of entries of largest magnitude (at least one), their
  positions as ``k|idx`` (int32) or, where smaller, as ``k|mask`` (a packed bitmap, one
  bit per entry), their values as ``k|q`` (int8) and ``k|scale`` (float32, one value) as
  in ``int8``; what is left out, and the values' rounding, is kept by the client (error
  feedback) and added to its next update (sparse, then quantised: as STC, Sattler et
  al. 2019, with int8 for ternary values);
- ``svd``: a 2-D or larger update, as a (rows, rest) matrix, becomes ``k|us`` (rows × r) and
  ``k|v`` (r × rest), the smallest rank r keeping ``energy`` of the squared singular values
  (FedKD); a 1-D one, or one whose factors would be larger, goes as ``k|full`` (float32).

Integer buffers (BatchNorm's counters) go as ``k|int``, their exact difference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from common.options import Codec, Compression

__all__ = ["Codec", "CompressionError", "State", "Template", "decode", "encode",
           "max_payload_bytes", "payload_bytes", "svd_rank", "topk_count"]

#: a model's arrays by state_dict key (a meme, an update); every module uses this one
State = dict[str, np.ndarray]
#: the meme's key -> (shape, dtype): what every update must match
Template = Mapping[str, tuple[tuple[int, ...], np.dtype]]


class CompressionError(ValueError):
    """A payload that does not decode into the template (names the array and the part)."""


def topk_count(size: int, ratio: float) -> int:
    """How many entries ``topk`` keeps of an array of ``size``: ceil(ratio·size), >= 1."""
    return max(1, math.ceil(ratio * size)) if size else 0


def svd_rank(singular: np.ndarray, energy: float) -> int:
    """The smallest r whose first r squared singular values hold ``energy`` of the total."""
    power = np.asarray(singular, np.float64) ** 2
    total = power.sum()
    if total <= 0:
        return 1
    return int(min(len(power), np.searchsorted(np.cumsum(power) / total, energy - 1e-12) + 1))


def _int8(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """x ≈ q·scale with q in [-127, 127], scale = max|x| / 127 (1 for an all-zero x)."""
    top = float(np.abs(x).max()) if x.size else 0.0
    scale = np.float32(top / 127.0 if top > 0 and math.isfinite(top) else 1.0)
    return np.clip(np.rint(x / scale), -127, 127).astype(np.int8), scale


def _mask_bytes(size: int) -> int:
    return (size + 7) // 8


def _positions(key: str, idx: np.ndarray, size: int) -> State:
    """Sorted positions as int32 indices, or as a packed bitmap where that is smaller."""
    if 4 * len(idx) <= _mask_bytes(size):
        return {f"{key}|idx": np.asarray(idx, np.int32)}
    bits = np.zeros(size, bool)
    bits[idx] = True
    return {f"{key}|mask": np.packbits(bits)}


def _encode_array(key: str, x: np.ndarray, codec: Codec) -> tuple[State, np.ndarray]:
    """The parts of one float update, and what they leave out (for error feedback)."""
    x = np.asarray(x, np.float32)
    mode = codec.mode
    if not np.isfinite(x).all():  # a broken update must stay visibly broken after decoding
        if mode is Compression.INT8:
            return ({f"{key}|q": np.zeros(x.shape, np.int8),
                     f"{key}|scale": np.array([np.nan], np.float32)}, np.zeros_like(x))
        if mode is Compression.TOPK:
            k = topk_count(x.size, codec.ratio)
            return ({**_positions(key, np.arange(k), x.size),
                     f"{key}|q": np.zeros(k, np.int8),
                     f"{key}|scale": np.array([np.nan], np.float32)}, np.zeros_like(x))
        if mode is Compression.SVD:
            return {f"{key}|full": x.copy()}, np.zeros_like(x)
    if mode is Compression.FP16:
        part = x.astype(np.float16)
        return {f"{key}|fp16": part}, x - part.astype(np.float32)
    if mode is Compression.INT8:
        q, scale = _int8(x)
        return ({f"{key}|q": q, f"{key}|scale": np.array([scale], np.float32)},
                x - q.astype(np.float32) * scale)
    if mode is Compression.TOPK:
        flat = x.ravel()
        k = topk_count(flat.size, codec.ratio)
        idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:])
        q, scale = _int8(flat[idx])
        kept = np.zeros_like(flat)
        kept[idx] = q.astype(np.float32) * scale
        return ({**_positions(key, idx, flat.size), f"{key}|q": q,
                 f"{key}|scale": np.array([scale], np.float32)}, (flat - kept).reshape(x.shape))
    # SVD
    if x.ndim >= 2:
        m = x.reshape(x.shape[0], -1)
        u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
        r = svd_rank(s, codec.energy)
        if r * (m.shape[0] + m.shape[1]) < m.size:
            us = (u[:, :r] * s[:r]).astype(np.float32)
            v = vt[:r].astype(np.float32)
            return {f"{key}|us": us, f"{key}|v": v}, x - (us @ v).reshape(x.shape)
    return {f"{key}|full": x.copy()}, np.zeros_like(x)


def encode(update: Mapping[str, np.ndarray], codec: Codec,
           residual: Mapping[str, np.ndarray] | None = None) -> tuple[State, State]:
    """``(payload, residual)``: the parts to send, and for ``topk`` what they left out of
    ``update + residual`` (error feedback: add it to the next update); else empty."""
    if codec.mode is Compression.NONE:
        raise ValueError("compression 'none' sends the meme itself, not an encoded update")
    payload: State = {}
    left: State = {}
    for key, x in update.items():
        x = np.asarray(x)
        if x.dtype.kind != "f":
            payload[f"{key}|int"] = x.copy()
            continue
        if codec.mode is Compression.TOPK and residual is not None and key in residual:
            x = x.astype(np.float32) + residual[key]
        parts, rest = _encode_array(key, x, codec)
        payload.update(parts)
        if codec.mode is Compression.TOPK:
            left[key] = rest.astype(np.float32)
    return payload, left


def _layout(shape: tuple[int, ...], dtype: np.dtype, codec: Codec) -> list[dict[str, tuple]]:
    """The part layouts one template array may arrive in: ``{part: (shape or None, dtype)}``
    (None: checked while decoding)."""
    if dtype.kind != "f":
        return [{"int": (shape, dtype)}]
    size = int(np.prod(shape))
    mode = codec.mode
    if mode is Compression.FP16:
        return [{"fp16": (shape, np.dtype(np.float16))}]
    if mode is Compression.INT8:
        return [{"q": (shape, np.dtype(np.int8)), "scale": ((1,), np.dtype(np.float32))}]
    if mode is Compression.TOPK:
        k = topk_count(size, codec.ratio)
        values = {"q": ((k,), np.dtype(np.int8)), "scale": ((1,), np.dtype(np.float32))}
        return [{"idx": ((k,), np.dtype(np.int32)), **values},
                {"mask": ((_mask_bytes(size),), np.dtype(np.uint8)), **values}]
    full = {"full": (shape, np.dtype(np.float32))}
    if len(shape) >= 2:
        return [{"us": (None, np.dtype(np.float32)), "v": (None, np.dtype(np.float32))}, full]
    return [full]


def max_payload_bytes(template: Template, codec: Codec) -> int:
    """The largest payload an honest client can send for this template (the server refuses
    anything larger before decoding)."""
    total = 0
    for shape, dtype in template.values():
        size = int(np.prod(shape))
        layouts = _layout(tuple(shape), np.dtype(dtype), codec)
        sizes = []
        for layout in layouts:
            if any(part_shape is None for part_shape, _ in layout.values()):
                sizes.append(size * 4)  # svd factors go only when smaller than the array
            else:
                sizes.append(sum(int(np.prod(ps)) * pd.itemsize for ps, pd in layout.values()))
        # top-k's positions go in the smaller of their two forms; svd's in either
        total += min(sizes) if codec.mode is Compression.TOPK else max(sizes)
    return total


def payload_bytes(payload: Mapping[str, np.ndarray]) -> int:
    """What the encoded arrays weigh (their data, without Flower's headers)."""
    return sum(int(np.asarray(a).nbytes) for a in payload.values())


def decode(payload: Mapping[str, np.ndarray], template: Template, codec: Codec) -> State:
    """The update the payload encodes, in the template's shapes and dtypes; a payload with
    other parts, shapes or dtypes, or indices out of range, raises CompressionError."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in payload.items():
        key, sep, part = name.rpartition("|")
        if not sep or key not in template:
            raise CompressionError(f"unexpected payload array '{name}'")
        parts.setdefault(key, {})[part] = np.asarray(arr)
    missing = sorted(set(template) - set(parts))
    if missing:
        raise CompressionError(f"payload misses the arrays {missing[:3]}")
    out: State = {}
    for key, (shape, dtype) in template.items():
        shape, dtype = tuple(shape), np.dtype(dtype)
        got = parts[key]
        layouts = _layout(shape, dtype, codec)
        layout = next((lay for lay in layouts if set(lay) == set(got)), None)
        if layout is None:
            wanted = " or ".join(str(sorted(lay)) for lay in layouts)
            raise CompressionError(f"'{key}' came as parts {sorted(got)}, expected {wanted}")
        for part, (part_shape, part_dtype) in layout.items():
            a = got[part]
            if a.dtype != part_dtype or (part_shape is not None and a.shape != part_shape):
                raise CompressionError(f"'{key}|{part}' is {a.dtype}{list(a.shape)}, expected "
                                       f"{part_dtype}{list(part_shape or ())}")
        out[key] = _decode_array(key, got, shape, dtype)
    return out


def _decode_array(key: str, got: Mapping[str, np.ndarray], shape: tuple[int, ...],
                  dtype: np.dtype) -> np.ndarray:
    size = int(np.prod(shape))
    if "int" in got:
        return got["int"].copy()
    if "fp16" in got:
        return got["fp16"].astype(dtype)
    if "idx" in got or "mask" in got:
        values = got["q"].astype(np.float32) * got["scale"][0]
        if "idx" in got:
            idx = got["idx"].astype(np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= size
                             or len(np.unique(idx)) != idx.size):
                raise CompressionError(f"'{key}|idx' holds indices out of range or repeated")
        else:
            bits = np.unpackbits(got["mask"])
            idx = np.flatnonzero(bits[:size])
            if bits[size:].any() or len(idx) != len(values):
                raise CompressionError(f"'{key}|mask' marks {int(bits.sum())} entries (or "
                                       f"bits past the array), expected {len(values)}")
        flat = np.zeros(size, dtype)
        flat[idx] = values
        return flat.reshape(shape)
    if "q" in got:
        return (got["q"].astype(np.float32) * got["scale"][0]).astype(dtype)
    if "full" in got:
        return got["full"].astype(dtype)
    us, v = got["us"], got["v"]
    rows, rest = shape[0], size // shape[0]
    if us.ndim != 2 or v.ndim != 2 or us.shape[0] != rows or v.shape[1] != rest \
            or us.shape[1] != v.shape[0] or us.shape[1] < 1:
        raise CompressionError(f"'{key}' factors {list(us.shape)} x {list(v.shape)} do not "
                               f"make a {rows} x {rest} matrix")
    return (us @ v).reshape(shape).astype(dtype)
