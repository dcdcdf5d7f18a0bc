"""A hostile node against the real strategy: forged train and evaluate replies (declared vs
real dtype and shape, strings, complex, object, huge headers, truncated bytes, wrong record
names, non-finite and huge metrics) beside two honest replies. No exception escapes, nothing
non-finite is released, and the aggregate is the honest clients' own.

The suite counts what it tried and prints it at the end (docs/robustness.md quotes it).
"""

from __future__ import annotations

import io
import tempfile
import time
from collections import Counter

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.compression import encode
from common.config import load_config
from server.privacy import wrap_dp
from server.results import RunLog
from server.strategy import build_strategy
from server.validate import Rejected, read_array, template_of

TEMPLATE = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32),
            "n": np.array(0, np.int64)}
TALLY: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _print_tally(request):
    """Print what the suite tried (visible under -q too)."""
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if TALLY and capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\nhostile-node suite: {TALLY['tried']} forged train replies tried, "
                  f"{TALLY['rejected']} rejected; {TALLY['eval-tried']} random evaluation "
                  f"replies tried, {TALLY['eval-rejected']} rejected (the rest well-formed); "
                  f"{TALLY['crashes']} crashes, {TALLY['poisoned']} poisoned releases")


def _meta(node: int, kind: str = MessageType.TRAIN) -> Metadata:
    return Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=kind)


def _good(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), v, np.float32), "b": np.full(3, v, np.float32),
            "n": np.array(int(v), np.int64)}


def _reply(node: int, arrays: dict[str, Array], metrics: dict, kind=MessageType.TRAIN,
           ) -> Message:
    return Message(content=RecordDict({"arrays": ArrayRecord(arrays),
                                       "metrics": MetricRecord(metrics)}),
                   metadata=_meta(node, kind))


def _npy(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, values, allow_pickle=False)
    return buf.getvalue()


def _raw_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """An .npy header declaring anything (object dtypes, 10^12 elements), no data."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _labelled(key: str, data: bytes, stype: str = "numpy.ndarray") -> Array:
    """Bytes under the template's own declaration of ``key``: what validation used to read."""
    ref = TEMPLATE[key]
    return Array(dtype=str(ref.dtype), shape=tuple(ref.shape), stype=stype, data=data)


# ------------------------------------------------------------------ forged arrays
_forged_bytes = st.one_of(
    st.sampled_from([np.float16, np.float64, np.int32, np.int64, np.complex64, np.bool_,
                     ">f4", "<U3"]).flatmap(
        lambda dt: st.lists(st.integers(1, 4), min_size=0, max_size=3).map(
            lambda shape: _npy(np.ones(shape, dt)))),
    st.lists(st.integers(1, 4), min_size=1, max_size=3).filter(
        lambda shape: tuple(shape) not in ((2, 3), (3,))).map(
        lambda shape: _npy(np.full(shape, 1e6, np.float32))),
    st.sampled_from([np.nan, np.inf, -np.inf, 1e300]).map(
        lambda v: _npy(np.full((2, 3), v, np.float64 if v == 1e300 else np.float32))),
    st.just(_npy(np.array(["nan"] * 6).reshape(2, 3))),
    st.just(_npy(np.full((2, 3), complex(np.nan, 0), np.complex64))),
    st.sampled_from(["|O", "<f4", "|V8", "no-such-dtype"]).map(
        lambda d: _raw_header(d, (10**12,))),
    st.integers(1, 60).map(lambda n: _npy(np.ones((2, 3), np.float32))[:-n]),
    st.binary(max_size=64),
)


@st.composite
def hostile_train(draw) -> tuple[dict, dict, list[str]]:
    """(arrays, metrics, record names) with at least one defect."""
    arrays = {k: Array(v) for k, v in _good(draw(st.sampled_from([2.0, 7.0]))).items()}
    metrics: dict = {"num-examples": 10, "train-loss-meme": 1.0}
    names = ["arrays", "metrics"]
    defect = draw(st.sampled_from(["bytes", "stype", "metric", "weight", "records", "keys"]))
    if defect == "bytes":
        arrays["w"] = _labelled("w", draw(_forged_bytes))
    elif defect == "stype":
        arrays["b"] = _labelled("b", _npy(np.ones(3, np.float32)),
                                draw(st.sampled_from(["torch.tensor", "", "numpy"])))
    elif defect == "metric":
        key, value = draw(st.one_of(
            st.tuples(st.just("train-loss-meme"),
                      st.sampled_from([-float("inf"), -3.0, [1.0, 2.0]])),
            st.tuples(st.just("train-acc-meme"), st.sampled_from([7.5, -0.1, float("nan")])),
            st.tuples(st.sampled_from(["x", "m", "client-key"]), st.just(1.0))))
        metrics[key] = value
    elif defect == "weight":
        metrics["num-examples"] = draw(st.sampled_from(
            [0, -10, 10**12, 10**18, 2.5, float("nan"), [10], True]))
    elif defect == "records":
        names = draw(st.sampled_from([["arrays", "m"], ["a", "metrics"], ["arrays"],
                                      ["arrays", "metrics", "extra"], ["arrays", "config"]]))
    else:
        del arrays[draw(st.sampled_from(sorted(arrays)))]
    return arrays, metrics, names


def _content(arrays: dict, metrics: dict, names: list[str]) -> RecordDict:
    records = {}
    for name in names:
        if name == "metrics" or name == "m":
            try:
                records[name] = MetricRecord(metrics)
            except Exception:  # noqa: BLE001 - Flower refuses the value itself: send none
                records[name] = MetricRecord({})
        elif name == "config":
            records[name] = ConfigRecord({"num-examples": 10})
        elif name == "extra":
            records[name] = ArrayRecord({"z": Array(np.zeros(1, np.float32))})
        else:
            records[name] = ArrayRecord(arrays)
    return RecordDict(records)


def _strategy(run_dir: str, **overrides):
    cfg = load_config({"algorithm": "fedavg", "max-client-weight": 100, "output-dir": run_dir,
                       "run-name": "r", **overrides})
    log = RunLog.create(cfg)
    sent = ArrayRecord({k: Array(v) for k, v in TEMPLATE.items()})
    strat = build_strategy(cfg, log, template=template_of(sent))
    strat.current_arrays = strat.sent_arrays = sent
    log.begin_round(1)
    return strat, log


def _meme_reply(node: int, value: float, weight: int, codec_overrides: dict) -> Message:
    """A well-formed train reply of the meme ``_good(value)``, as a client's mods send it
    (an encoded update under compression)."""
    meme = _good(value)
    if codec_overrides:
        cfg = load_config(codec_overrides)
        update = {k: (v - TEMPLATE[k]) for k, v in meme.items()}
        payload, _ = encode(update, cfg.codec, None)
        arrays = {k: Array(np.asarray(v)) for k, v in payload.items()}
    else:
        arrays = {k: Array(v) for k, v in meme.items()}
    return _reply(node, arrays, {"num-examples": weight, "train-loss-meme": 0.5})


def _honest(codec_overrides: dict) -> list[Message]:
    """Clients 1 and 2: memes of 1.0 (weight 10) and 4.0 (weight 20)."""
    return [_meme_reply(node, value, weight, codec_overrides)
            for node, value, weight in ((1, 1.0, 10), (2, 4.0, 20))]


CONFIGS = {
    "plain": {},
    # above the honest 3 and 12 (see below) and the fuzzed memes' 6 and 21: a fuzzed reply
    # is rejected for its own defect, not its norm
    "bounded": {"max-update-norm": 25.0},
    "median": {"aggregation": "median"},
    "int8": {"compression": "int8"},
    "topk": {"compression": "topk", "compression-ratio": 0.5},
    "dp-server": {"aggregation": "uniform", "dp-mode": "server", "dp-noise-multiplier": 0.1},
}


@pytest.mark.parametrize("name", list(CONFIGS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile=hostile_train())
def test_a_forged_train_reply_costs_only_itself(name, hostile):
    overrides = CONFIGS[name]
    codec = {k: v for k, v in overrides.items() if k.startswith("compression")}
    with tempfile.TemporaryDirectory() as tmp:
        strat, log = _strategy(tmp, **overrides)
        runner = wrap_dp(strat)
        replies = [*_honest(codec), Message(content=_content(*hostile), metadata=_meta(3))]
        TALLY["tried"] += 1
        try:
            agg, _ = runner.aggregate_train(1, replies)
        except Exception:
            TALLY["crashes"] += 1
            raise
        rejections = log._current["rejections"]
        TALLY["rejected"] += len(rejections)
        assert [(r["stage"], r["node"]) for r in rejections] == [("train", 3)], rejections
        assert agg is not None
        released = {k: a.numpy() for k, a in agg.items()}
        finite = all(np.isfinite(v).all() for v in released.values())
        # the honest clients' aggregate, by hand: (10·1 + 20·4) / 30 = 3; median of 1, 4: 2.5
        expected = {"plain": 3.0, "bounded": 3.0, "median": 2.5, "int8": 3.0}.get(name)
        honest = expected is None or np.allclose(released["w"], expected, rtol=1e-2)
        if name == "topk":  # half the entries go up: what the honest replies alone make
            alone, _ = _strategy(tmp + "/alone", **overrides)[0].aggregate_train(
                1, _honest(codec))
            honest = all(np.array_equal(released[k], alone[k].numpy()) for k in released)
        if name == "dp-server":
            # both honest updates (all ones, all fours over 9 float entries) clip to norm 1:
            # ones/3 each, so the mean is 1/3 everywhere, plus noise of std 0.1·1/2 = 0.05
            honest = np.abs(released["w"] - 1 / 3).max() < 0.3
        if not (finite and honest):
            TALLY["poisoned"] += 1
        assert finite and honest, released


_metric_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                           st.booleans(), st.text(max_size=3),
                           st.lists(st.floats(allow_nan=False), max_size=2))


@settings(max_examples=150, deadline=None)
@given(metrics=st.dictionaries(
    st.sampled_from(["num-examples", "local-accuracy", "meme-accuracy", "local-loss", "extra"]),
    _metric_values, min_size=1), name=st.sampled_from(["metrics", "m"]))
def test_a_forged_evaluation_reply_never_moves_the_honest_mean(metrics, name):
    with tempfile.TemporaryDirectory() as tmp:
        strat, log = _strategy(tmp)
        honest = [Message(content=RecordDict({"metrics": MetricRecord(
            {"num-examples": n, "local-accuracy": acc, "meme-accuracy": acc / 2})}),
            metadata=_meta(node, MessageType.EVALUATE))
            for node, n, acc in ((1, 10, 0.9), (2, 30, 0.5))]
        try:
            record = MetricRecord(metrics)
        except Exception:  # noqa: BLE001 - a value Flower cannot carry never reaches us
            return
        hostile = Message(content=RecordDict({name: record}),
                          metadata=_meta(3, MessageType.EVALUATE))
        TALLY["eval-tried"] += 1
        try:
            strat.aggregate_evaluate(1, [*honest, hostile])
        except Exception:
            TALLY["crashes"] += 1
            raise
        rec = log._current
        TALLY["eval-rejected"] += rec["rejected_updates"]
        acc = rec["local_accuracy"]
        assert acc is not None and np.isfinite(acc) and 0 <= acc <= 1
        accepted = rec["rejected_updates"] == 0
        if not accepted:  # the honest mean, by hand: (10·0.9 + 30·0.5) / 40 = 0.6
            assert acc == pytest.approx(0.6)
        else:  # accepted: a well-formed reply, which then counts like any client's
            n = int(metrics.get("num-examples", 0))
            got = metrics.get("local-accuracy")
            if n == 0 or got is None:
                assert acc == pytest.approx(0.6)
            else:
                assert acc == pytest.approx((9 + 15 + n * got) / (40 + n))


def test_forged_bytes_under_honest_labels_are_read_as_what_they_are():
    """The defects as reproduced: labels say float32 (2, 3), the bytes say otherwise."""
    cases = {
        _npy(np.full(1, 1e6, np.float32)): "shape (1,)",
        _npy(np.array(["nan"] * 6).reshape(2, 3)): "expected a numeric array",
        _npy(np.full((2, 3), complex(np.nan, 0), np.complex64)): "expected a numeric array",
        _npy(np.full((2, 3), 1e300)): "dtype float64",
        _npy(np.ones((4, 3), np.float32)): "shape (4, 3)",
        _raw_header("<f4", (10**12,)): "shape (1000000000000,)",
        _raw_header("|O", (2, 3)): "expected a numeric array",
        _npy(np.ones((2, 3), np.float32))[:-4]: "data bytes",
    }
    for data, reason in cases.items():
        with pytest.raises(Rejected, match=reason.replace("(", r"\(").replace(")", r"\)")):
            read_array(_labelled("w", data), "w", shape=(2, 3), dtype=np.dtype(np.float32),
                       max_bytes=24)
    # a compressed part has no template shape: its size is bounded before anything is read
    with pytest.raises(Rejected, match="declares 4000000000000 bytes, more than the 24"):
        read_array(_labelled("w", _raw_header("<f4", (10**12,))), "w", max_bytes=24)
    with pytest.raises(Rejected, match="serialization type 'torch.tensor'"):
        read_array(_labelled("w", _npy(np.ones((2, 3), np.float32)), "torch.tensor"), "w")
    honest = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(read_array(Array(honest), "w", shape=(2, 3),
                                             dtype=np.dtype(np.float32)), honest)
    fortran = np.asfortranarray(honest)
    np.testing.assert_array_equal(read_array(Array(fortran), "w", shape=(2, 3)), honest)


def test_unequal_metric_types_and_a_negative_weight_cost_only_their_reply(tmp_path):
    """Reproduced crashes: a loss sent as a list by one client and a float by another;
    num-examples = -10 beside an honest 10 (ZeroDivisionError)."""
    strat, log = _strategy(str(tmp_path))
    good = {k: Array(v) for k, v in _good(2.0).items()}
    replies = [_reply(1, good, {"num-examples": 10, "train-loss-meme": 0.5}),
               _reply(2, good, {"num-examples": -10, "train-loss-meme": 0.5}),
               Message(content=RecordDict({"arrays": ArrayRecord(good), "metrics": MetricRecord(
                   {"num-examples": 10, "train-loss-meme": [0.5, 0.1]})}), metadata=_meta(4))]
    agg, metrics = strat.aggregate_train(1, replies)
    np.testing.assert_array_equal(agg["w"].numpy(), np.full((2, 3), 2.0, np.float32))
    assert metrics["train-loss-meme"] == 0.5
    assert [r["node"] for r in log._current["rejections"]] == [2, 4]


def test_a_client_without_test_data_is_left_out_of_the_mean(tmp_path):
    strat, log = _strategy(str(tmp_path))
    replies = [Message(content=RecordDict({"metrics": MetricRecord(m)}),
                       metadata=_meta(node, MessageType.EVALUATE))
               for node, m in ((1, {"num-examples": 10, "local-accuracy": 0.8}),
                               (2, {"num-examples": 0, "local-accuracy": float("nan")}))]
    strat.aggregate_evaluate(1, replies)
    assert log._current["local_accuracy"] == pytest.approx(0.8)
    assert log._current["rejected_updates"] == 0
    assert [c["num_test"] for c in log._current_clients] == [10, 0]


def test_the_weight_cap_follows_the_median_report_not_the_largest(tmp_path):
    strat, _ = _strategy(str(tmp_path), **{"max-client-weight": 0})
    strat.clients.info = {1: {"num-train": 100}, 2: {"num-train": 300},
                          3: {"num-train": 10**12}}
    assert strat.max_weight() == 10 * 300  # WEIGHT_CAP_FACTOR x the median report


def test_an_evaluation_weight_above_the_identified_test_split_is_refused(tmp_path):
    """Reproduced: an evaluate weight of 10^18 made the reported accuracy 1000.0."""
    strat, log = _strategy(str(tmp_path))
    strat.clients.info = {1: {"num-test": 10}, 3: {"num-test": 30}}
    replies = [Message(content=RecordDict({"metrics": MetricRecord(m)}),
                       metadata=_meta(node, MessageType.EVALUATE))
               for node, m in ((1, {"num-examples": 10, "local-accuracy": 0.8}),
                               (3, {"num-examples": 10**6, "local-accuracy": 1.0}))]
    strat.aggregate_evaluate(1, replies)
    assert log._current["local_accuracy"] == pytest.approx(0.8)
    [why] = log._current["rejections"]
    assert why["node"] == 3 and "exceeds the 30 test examples" in why["reason"]


def test_a_diverged_models_nan_loss_is_dropped_not_held_against_the_reply(tmp_path):
    """DP noise can blow up the meme an honest client evaluates: its loss is NaN or inf,
    its accuracy still a number. The reply counts; only the loss is left out."""
    strat, log = _strategy(str(tmp_path))
    replies = [Message(content=RecordDict({"metrics": MetricRecord(m)}),
                       metadata=_meta(node, MessageType.EVALUATE))
               for node, m in ((1, {"num-examples": 10, "meme-accuracy": 0.2,
                                    "meme-loss": float("nan")}),
                               (2, {"num-examples": 30, "meme-accuracy": 0.6,
                                    "meme-loss": float("inf")}),
                               (3, {"num-examples": 5, "meme-accuracy": 0.1,
                                    "meme-loss": 1.25e12}))]
    strat.aggregate_evaluate(1, replies)
    assert log._current["rejected_updates"] == 0
    assert log._current["meme_accuracy"] == pytest.approx((2 + 18 + 0.5) / 45)
    assert [c["meme_loss"] for c in log._current_clients] == [None, None, 1.25e12]


@pytest.mark.parametrize("codec", [{}, {"compression": "int8"}], ids=["plain", "int8"])
def test_a_finite_scaled_update_passes_the_byte_checks_and_max_update_norm_stops_it(
        tmp_path, codec):
    """Node 3 sends the template's keys, shapes and dtypes, finite, a meme of 10^6: every
    byte check admits it, and the mean follows it, unless ``max-update-norm`` bounds how far
    a meme may move from the one sent. Norms by hand over the 9 float entries (the integer
    counter is not an update): the honest memes 1 and 4 lie 3 and 12 from the zeros sent,
    node 3's lies 3·10^6 away."""
    def run(bound: float) -> tuple[np.ndarray, list[tuple[int, str]], dict]:
        strat, log = _strategy(str(tmp_path / f"bound{bound}"), **codec,
                               **{"max-update-norm": bound})
        replies = [*_honest(codec), _meme_reply(3, 1e6, 10, codec)]
        agg, _ = strat.aggregate_train(1, replies)
        return (agg["w"].numpy(), [(r["node"], r["reason"]) for r in log._current["rejections"]],
                log._current)

    w, rejected, record = run(0.0)  # no bound: (10·1 + 20·4 + 10·10^6) / 40
    assert rejected == [] and np.allclose(w, (10 + 80 + 1e7) / 40, rtol=1e-2)
    assert record["update_norm"] is None  # measured only where a bound is set
    w, rejected, record = run(12.5)  # above both honest norms: their mean, (10·1 + 20·4) / 30
    assert np.allclose(w, 3.0, rtol=1e-2)
    assert [node for node, _ in rejected] == [3]
    assert "update norm 3e+06 exceeds max-update-norm=12.5" in rejected[0][1]
    # the accepted replies' norms on record: median of 3 and 12, and the largest
    assert record["update_norm"] == pytest.approx(7.5, rel=1e-2)
    assert record["update_norm_max"] == pytest.approx(12.0, rel=1e-2)
    w, rejected, _ = run(11.5)  # below client 2's 12: it goes too, client 1 alone is the mean
    assert np.allclose(w, 1.0, rtol=1e-2) and [node for node, _ in rejected] == [2, 3]
    assert "update norm 12 exceeds" in rejected[0][1]
