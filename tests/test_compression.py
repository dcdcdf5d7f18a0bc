"""Encoded meme updates: round trips within each mode's bound, error feedback, exact byte
counts, and payloads the server must refuse. Expected values are computed by hand."""

import numpy as np
import pytest

from common.compression import (
    Codec,
    CompressionError,
    decode,
    encode,
    max_payload_bytes,
    payload_bytes,
    svd_rank,
    topk_count,
)
from common.options import Compression

RNG = np.random.default_rng(0)
UPDATE = {"conv": RNG.normal(0, 0.05, (8, 3, 5, 5)).astype(np.float32),
          "fc": RNG.normal(0, 0.02, (40, 30)).astype(np.float32),
          "bias": RNG.normal(0, 0.1, 30).astype(np.float32),
          "count": np.array(3, np.int64)}
TEMPLATE = {k: (v.shape, v.dtype) for k, v in UPDATE.items()}


def _roundtrip(mode, **kw):
    codec = Codec(mode, **kw)
    payload, residual = encode(UPDATE, codec)
    return codec, payload, residual, decode(payload, TEMPLATE, codec)


def test_fp16_within_half_precision():
    codec, payload, _, out = _roundtrip(Compression.FP16)
    for k in ("conv", "fc", "bias"):
        assert out[k].dtype == np.float32 and out[k].shape == UPDATE[k].shape
        assert np.all(np.abs(out[k] - UPDATE[k]) <= np.abs(UPDATE[k]) * 2.0**-11 + 1e-7)
    assert int(out["count"]) == 3
    assert payload_bytes(payload) == 2 * (600 + 1200 + 30) + 8  # fp16 + the int64 counter


def test_int8_within_half_a_step_per_tensor():
    codec, payload, _, out = _roundtrip(Compression.INT8)
    for k in ("conv", "fc", "bias"):
        step = np.abs(UPDATE[k]).max() / 127
        assert np.abs(out[k] - UPDATE[k]).max() <= step / 2 + 1e-7
        assert payload[f"{k}|q"].dtype == np.int8
    # one byte per entry plus one float32 scale per tensor, plus the counter
    assert payload_bytes(payload) == (600 + 4) + (1200 + 4) + (30 + 4) + 8
    assert payload_bytes(payload) == max_payload_bytes(TEMPLATE, codec)


def test_topk_keeps_the_largest_and_feeds_the_rest_back():
    codec = Codec(Compression.TOPK, ratio=0.5)
    tmpl = {"w": ((4,), np.dtype(np.float32))}
    payload, residual = encode({"w": np.array([0.1, -3.0, 2.0, 0.5], np.float32)}, codec)
    assert payload["w|idx"].tolist() == [1, 2] and payload["w|val"].tolist() == [-3.0, 2.0]
    np.testing.assert_allclose(residual["w"], [0.1, 0.0, 0.0, 0.5])
    np.testing.assert_allclose(decode(payload, tmpl, codec)["w"], [0.0, -3.0, 2.0, 0.0])
    # next round: 0.2 + 0.1 and 0.1 + 0.5 now beat the fresh zeros
    payload, residual = encode({"w": np.array([0.2, 0.0, 0.0, 0.1], np.float32)}, codec,
                               residual)
    assert payload["w|idx"].tolist() == [0, 3]
    np.testing.assert_allclose(payload["w|val"], [0.3, 0.6], rtol=1e-6)
    np.testing.assert_allclose(residual["w"], [0.0, 0.0, 0.0, 0.0], atol=1e-7)
    assert payload_bytes(payload) == 2 * 4 + 2 * 4  # int32 index + float32 value each


def test_topk_sizes_and_bound():
    assert topk_count(1000, 0.1) == 100 and topk_count(5, 0.01) == 1 and topk_count(0, 0.5) == 0
    codec, payload, residual, out = _roundtrip(Compression.TOPK, ratio=0.1)
    assert np.count_nonzero(out["fc"]) == 120
    np.testing.assert_allclose(out["fc"] + residual["fc"], UPDATE["fc"], atol=1e-7)
    assert payload_bytes(payload) == 8 * (60 + 120 + 3) + 8 == max_payload_bytes(TEMPLATE, codec)


def test_svd_rank_by_energy_and_exact_low_rank():
    # singular values 3, 2, 1: energies 9, 4, 1 of 14 -> 0.643, 0.929, 1
    assert svd_rank(np.array([3.0, 2.0, 1.0]), 0.9) == 2
    assert svd_rank(np.array([3.0, 2.0, 1.0]), 0.6) == 1
    assert svd_rank(np.array([3.0, 2.0, 1.0]), 0.95) == 3
    codec = Codec(Compression.SVD, energy=0.9)
    m = np.diag(np.array([3, 2, 1, 0, 0, 0, 0, 0], np.float32))
    tmpl = {"m": ((8, 8), np.dtype(np.float32)), "b": ((8,), np.dtype(np.float32))}
    payload, _ = encode({"m": m, "b": np.ones(8, np.float32)}, codec)
    assert payload["m|us"].shape == (8, 2) and payload["m|v"].shape == (2, 8)
    out = decode(payload, tmpl, codec)
    np.testing.assert_allclose(out["m"], np.diag([3, 2, 0, 0, 0, 0, 0, 0]), atol=1e-6)
    np.testing.assert_array_equal(out["b"], np.ones(8))  # 1-D: sent whole
    assert payload_bytes(payload) == 4 * (16 + 16) + 4 * 8


def test_svd_on_noise_falls_back_to_the_whole_array_and_keeps_the_energy():
    codec, payload, _, out = _roundtrip(Compression.SVD, energy=0.95)
    assert payload_bytes(payload) <= max_payload_bytes(TEMPLATE, codec)
    for k in ("conv", "fc"):
        err = np.linalg.norm(out[k] - UPDATE[k]) ** 2
        assert err <= 0.05 * np.linalg.norm(UPDATE[k]) ** 2 + 1e-9


@pytest.mark.parametrize(("change", "needle"), [
    (lambda p: p.pop("fc|q"), "parts"),
    (lambda p: p.update({"fc|q": p["fc|q"].astype(np.int16)}), "int16"),
    (lambda p: p.update({"extra|q": p["fc|q"]}), "unexpected"),
    (lambda p: p.pop("bias|scale") and p.pop("bias|q"), "misses"),
])
def test_malformed_int8_payloads_are_refused(change, needle):
    codec = Codec(Compression.INT8)
    payload, _ = encode(UPDATE, codec)
    change(payload)
    with pytest.raises(CompressionError, match=needle):
        decode(payload, TEMPLATE, codec)


def test_topk_indices_out_of_range_or_repeated_are_refused():
    codec = Codec(Compression.TOPK, ratio=0.5)
    tmpl = {"w": ((4,), np.dtype(np.float32))}
    for idx in ([1, 4], [2, 2], [-1, 0]):
        payload = {"w|idx": np.array(idx, np.int32), "w|val": np.ones(2, np.float32)}
        with pytest.raises(CompressionError, match="out of range or repeated"):
            decode(payload, tmpl, codec)
