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
    # entries 1 and 2, as a bitmap (1 byte < two int32 indices): 0b0110_0000
    assert payload["w|mask"].tolist() == [0b01100000]
    # values in int8 steps of 3/127: -3 -> -127, 2 -> round(84.67) = 85
    assert payload["w|q"].tolist() == [-127, 85]
    np.testing.assert_allclose(payload["w|scale"], [3 / 127], rtol=1e-6)
    np.testing.assert_allclose(decode(payload, tmpl, codec)["w"],
                               [0.0, -3.0, 85 * 3 / 127, 0.0], rtol=1e-6)
    # left out: the small entries, and the rounding of 2 (2 - 2.00787)
    np.testing.assert_allclose(residual["w"], [0.1, 0.0, 2 - 85 * 3 / 127, 0.5], rtol=1e-5)
    # next round: 0.25 + 0.1 and 0.1 + 0.5 now beat the fresh zeros
    payload, residual = encode({"w": np.array([0.25, 0.0, 0.0, 0.1], np.float32)}, codec,
                               residual)
    assert payload["w|mask"].tolist() == [0b10010000]
    assert payload["w|q"].tolist() == [74, 127]  # 0.35 / (0.6 / 127) = 74.08
    np.testing.assert_allclose(decode(payload, tmpl, codec)["w"],
                               [74 * 0.6 / 127, 0.0, 0.0, 0.6], rtol=1e-5)
    np.testing.assert_allclose(residual["w"], [0.35 - 74 * 0.6 / 127, 0.0,
                                               2 - 85 * 3 / 127, 0.0], rtol=1e-4, atol=1e-7)
    assert payload_bytes(payload) == 1 + 2 + 4  # bitmap, two int8 values, the scale


def test_topk_sends_indices_where_they_are_smaller_than_the_bitmap():
    codec = Codec(Compression.TOPK, ratio=0.01)
    x = np.zeros(1000, np.float32)
    x[[7, 500, 999]] = [1.0, -2.0, 0.5]
    payload, _ = encode({"w": x}, codec)
    # 10 entries: 40 bytes of int32 indices against 125 of bitmap
    assert sorted(payload) == ["w|idx", "w|q", "w|scale"] and len(payload["w|idx"]) == 10
    assert payload_bytes(payload) == 10 * 4 + 10 + 4
    back = decode(payload, {"w": ((1000,), np.dtype(np.float32))}, codec)["w"]
    np.testing.assert_allclose(back[[7, 500, 999]], [round(63.5) * 2 / 127, -2.0, 0.5],
                               atol=2 / 127 / 2)  # within half an int8 step
    assert np.count_nonzero(back) == 3


def test_topk_sizes_and_bound():
    assert topk_count(1000, 0.1) == 100 and topk_count(5, 0.01) == 1 and topk_count(0, 0.5) == 0
    codec, payload, residual, out = _roundtrip(Compression.TOPK, ratio=0.1)
    assert np.count_nonzero(out["fc"]) == 120
    np.testing.assert_allclose(out["fc"] + residual["fc"], UPDATE["fc"], atol=1e-7)
    # bitmaps (600, 1200 and 30 bits) beat int32 indices here; int8 values, one scale each
    assert payload_bytes(payload) == (75 + 60 + 4) + (150 + 120 + 4) + (4 + 3 + 4) + 8
    assert payload_bytes(payload) == max_payload_bytes(TEMPLATE, codec)


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
    values = {"w|q": np.ones(2, np.int8), "w|scale": np.ones(1, np.float32)}
    for idx in ([1, 4], [2, 2], [-1, 0]):
        payload = {"w|idx": np.array(idx, np.int32), **values}
        with pytest.raises(CompressionError, match="out of range or repeated"):
            decode(payload, tmpl, codec)
    # a bitmap must mark exactly the entries sent, none past the array's end
    for mask in (0b11100000, 0b01000001, 0b00000011):
        payload = {"w|mask": np.array([mask], np.uint8), **values}
        with pytest.raises(CompressionError, match="marks"):
            decode(payload, tmpl, codec)
    ok = decode({"w|mask": np.array([0b00110000], np.uint8), **values}, tmpl, codec)["w"]
    assert ok.tolist() == [0.0, 0.0, 1.0, 1.0]


# ---------------------------------------------------------------- on the wire
def _int8_reply(node, received, trained, weight=10):
    """A client's reply as compress_mod sends it: the int8-encoded update."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from tests.test_robustness import _meta

    update = {k: trained[k] - received[k] for k in received}
    payload, _ = encode(update, Codec(Compression.INT8))
    return Message(content=RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in payload.items()}),
        "metrics": MetricRecord({"num-examples": weight})}), metadata=_meta(node))


def test_server_decodes_before_validating_and_counts_the_encoded_bytes(tmp_path, caplog):
    from flwr.app import Array, ArrayRecord

    from common.config import load_config
    from server.results import RunLog
    from server.strategy import build_strategy
    from server.validate import template_of

    received = {"w": np.zeros((2, 3), np.float32), "n": np.array(4, np.int64)}
    cfg = load_config({"algorithm": "fedavg", "compression": "int8", "max-client-weight": 100,
                       "output-dir": str(tmp_path), "run-name": "r"})
    log = RunLog.create(cfg)
    sent = ArrayRecord({k: Array(v) for k, v in received.items()})
    strat = build_strategy(cfg, log, template=template_of(sent))
    strat.current_arrays = strat.sent_arrays = sent
    log.begin_round(1)
    # updates +1.27 and +2.54 everywhere: exact in int8 (q = 127, scale 0.01 and 0.02)
    one = {"w": np.full((2, 3), 1.27, np.float32), "n": np.array(5, np.int64)}
    two = {"w": np.full((2, 3), 2.54, np.float32), "n": np.array(6, np.int64)}
    broken = _int8_reply(3, received, one)
    del broken.content["arrays"]["w|scale"]
    replies = [_int8_reply(1, received, one, 10), _int8_reply(2, received, two, 30), broken]
    # what the two valid clients sent, measured before the server decodes them
    encoded = sum(r.content["arrays"].count_bytes() for r in replies[:2])
    agg, _ = strat.aggregate_train(1, replies)
    # (10 * 1.27 + 30 * 2.54) / 40 = 2.2225; counters: (10 * 5 + 30 * 6) / 40 = 5.75 -> 6
    np.testing.assert_allclose(agg["w"].numpy(), np.full((2, 3), 2.2225), rtol=1e-6)
    assert agg["w"].numpy().dtype == np.float32 and int(agg["n"].numpy()) == 6
    log.end_round()
    rec = log.records[-1]
    assert rec["rejected_updates"] == 1 and "does not decode" in caplog.text
    assert rec["bytes_up"] == encoded  # the encoded payloads, not the decoded memes


def test_compress_mod_sends_the_encoded_update_and_keeps_the_residual():
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from client.mods import RESIDUAL, compress_mod
    from tests.conftest import make_context, make_message, task_config

    received = {"w": np.array([1.0, 1.0, 1.0, 1.0], np.float32)}
    msg = make_message(RecordDict({"arrays": ArrayRecord({"w": Array(received["w"])}),
                                   "config": task_config(1, 8, 10)}))
    trained = [np.array([1.1, -2.0, 3.0, 1.5], np.float32),  # update .1, -3, 2, .5
               np.array([1.25, 1.0, 1.0, 1.1], np.float32)]  # update .25, 0, 0, .1

    def handler(m, ctx, w):
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w)}),
                                   "metrics": MetricRecord({"num-examples": 4})}), reply_to=m)

    ctx = make_context({"compression": "topk", "compression-ratio": 0.5})
    sent = [compress_mod(msg, ctx, lambda m, c, w=w: handler(m, c, w)).content["arrays"]
            for w in trained]
    tmpl, codec = {"w": ((4,), np.dtype(np.float32))}, Codec(Compression.TOPK, ratio=0.5)
    got = [decode({k: a.numpy() for k, a in s.items()}, tmpl, codec)["w"] for s in sent]
    np.testing.assert_allclose(got[0], [0.0, -3.0, 85 * 3 / 127, 0.0], rtol=1e-5)
    # round 2 sends .25 + .1 and .1 + .5: the residual was kept in the node's state
    np.testing.assert_allclose(got[1], [74 * 0.6 / 127, 0.0, 0.0, 0.6], rtol=1e-5)
    assert RESIDUAL in ctx.state.array_records
    plain = compress_mod(msg, make_context({}), lambda m, c: handler(m, c, trained[0]))
    assert list(plain.content["arrays"].keys()) == ["w"]  # compression none: the meme


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"compression": "topk", "secure-aggregation": True}, "'secure-aggregation'"),
    ({"compression": "int8", "dp-mode": "client", "aggregation": "uniform"}, "'dp-mode'"),
    ({"compression": "svd", "algorithm": "local"}, "sends none"),
    ({"compression-ratio": 0.0}, r"\(0, 1\]"),
    ({"compression-down": "fp16", "dp-mode": "client", "aggregation": "uniform"},
     "'dp-mode'"),
    ({"compression-down": "fp16", "algorithm": "local"}, "sends none"),
])
def test_combinations_that_cannot_work_are_refused(overrides, needle):
    from common.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=needle) as err:
        load_config(overrides)
    assert "'compression" in str(err.value)


def test_fp16_downlink_halves_the_bytes_down_and_decodes_against_what_was_sent(
        tmp_path, monkeypatch):
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from common.config import load_config
    from server.results import RunLog
    from server.strategy import build_strategy
    from server.validate import template_of
    from tests.test_identity import _Grid

    for attr in ("_run_id", "_node_id", "_task_id"):  # as the ServerApp process has them
        monkeypatch.setattr(TaskIdentity, attr, 1)
    meme = {"w": np.full((2, 3), 0.1, np.float32), "n": np.array(4, np.int64)}
    cfg = load_config({"algorithm": "fedavg", "compression": "int8",
                       "compression-down": "fp16", "min-clients": 1,
                       "output-dir": str(tmp_path), "run-name": "r"})
    log = RunLog.create(cfg)
    arrays = ArrayRecord({k: Array(v) for k, v in meme.items()})
    strat = build_strategy(cfg, log, template=template_of(arrays))
    log.begin_round(1)
    msgs = list(strat.configure_train(1, arrays, ConfigRecord({}), _Grid({11: 0, 22: 1})))
    sent = msgs[0].content["arrays"]
    assert sent["w"].numpy().dtype == np.float16 and sent["n"].numpy().dtype == np.int64
    assert sent["w"].numpy()[0, 0] == np.float16(0.1) == 0.0999755859375  # rounded
    assert sent["w"].numpy().nbytes == 6 * 2  # half of float32's
    # each client trains from what it received (0.0999755859375) and sends +1.27 in int8
    received = {"w": sent["w"].numpy().astype(np.float32), "n": meme["n"]}
    trained = {"w": received["w"] + np.float32(1.27), "n": np.array(5, np.int64)}
    agg, _ = strat.aggregate_train(1, [_int8_reply(1, received, trained),
                                       _int8_reply(2, received, trained)])
    # decoded against the rounded meme, not the server's exact 0.1
    np.testing.assert_allclose(agg["w"].numpy(), np.full((2, 3), 0.0999755859375 + 1.27),
                               rtol=0, atol=1e-6)
    assert abs(float(agg["w"].numpy()[0, 0]) - 1.37) > 1e-5
    assert agg["w"].numpy().dtype == np.float32  # the server's meme stays float32
    log.end_round()
    assert log.records[-1]["bytes_down"] == 2 * sent.count_bytes()  # what went down


def _decoding_strategy(tmp_path, **overrides):
    from flwr.app import Array, ArrayRecord

    from common.config import load_config
    from server.results import RunLog
    from server.strategy import build_strategy
    from server.validate import template_of

    cfg = load_config({"algorithm": "fedavg", "compression": "int8", "min-clients": 1,
                       "output-dir": str(tmp_path), "run-name": "r", **overrides})
    log = RunLog.create(cfg)
    ref = {"w": np.full(4, 1.0, np.float32)}
    sent = ArrayRecord({k: Array(v) for k, v in ref.items()})
    strat = build_strategy(cfg, log, template=template_of(sent))
    strat.current_arrays = strat.sent_arrays = sent
    strat.population = strat.sent_train = 3
    log.begin_round(1)
    return strat, ref


def test_robust_aggregation_sees_the_decoded_memes(tmp_path):
    strat, ref = _decoding_strategy(tmp_path, aggregation="median")
    # updates +1, +2 and +100 on the first entry (each exact in int8: q = 127)
    replies = [_int8_reply(i + 1, ref, {"w": ref["w"] + np.array([u, 0, 0, 0], np.float32)})
               for i, u in enumerate((1.0, 2.0, 100.0))]
    agg, _ = strat.aggregate_train(1, replies)
    np.testing.assert_allclose(agg["w"].numpy(), [3.0, 1.0, 1.0, 1.0], rtol=1e-6)  # 1 + 2


def test_server_dp_clips_the_decoded_updates(tmp_path):
    from server.privacy import wrap_dp

    strat, ref = _decoding_strategy(tmp_path, aggregation="uniform", **{
        "dp-mode": "server", "dp-clipping-norm": 1.0, "dp-noise-multiplier": 0.0})
    strat.population = strat.sent_train = 2
    dp = wrap_dp(strat)
    # updates of norm 0.5 (kept) and 10 (clipped to 1), each exact in int8
    replies = [_int8_reply(1, ref, {"w": ref["w"] + np.array([0.5, 0, 0, 0], np.float32)}),
               _int8_reply(2, ref, {"w": ref["w"] + np.array([0, 10.0, 0, 0], np.float32)})]
    agg, _ = dp.aggregate_train(1, replies)
    # 1 + (0.5, 0) / 2 and 1 + (0, 1) / 2
    np.testing.assert_allclose(agg["w"].numpy(), [1.25, 1.5, 1.0, 1.0], rtol=1e-6)
