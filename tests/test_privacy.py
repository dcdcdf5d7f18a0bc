"""Differential privacy on the meme: clipping, the noised fixed-denominator mean through the
real DP wrappers, the client clipping mod, and ε against independent reference values."""

import json
import math
import re
import time

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from scipy.stats import norm as normal

from client.mods import dp_clip_mod
from common.config import ConfigError, load_config
from common.privacy import (
    Release,
    clip_update,
    epsilon_spent,
    noise_for_epsilon,
    noisy_mean_update,
    secure_normal,
    update_norm,
)
from server.checkpoint import load_checkpoint, save_checkpoint
from server.ledger import LEDGER, LedgerError
from server.privacy import MemeDpClientSide, MemeDpServerSide, wrap_dp
from server.results import RunLog
from server.strategy import build_strategy
from server.validate import template_of
from tests.conftest import make_context, make_message

D = 50_000  # coordinates: enough for a tight statistical check of the noise scale


def _ref() -> dict[str, np.ndarray]:
    return {"w": np.zeros(D, np.float32), "n": np.array(7, np.int64)}


def _with_update(direction: np.ndarray, length: float) -> dict[str, np.ndarray]:
    return {"w": (direction / np.linalg.norm(direction) * length).astype(np.float32),
            "n": np.array(99, np.int64)}


def test_clip_update_bounds_the_norm_keeps_direction_and_integer_buffers():
    rng = np.random.default_rng(0)
    ref = {"w": rng.normal(size=1000).astype(np.float32), "n": np.array(3, np.int64)}
    new = {"w": ref["w"] + rng.normal(size=1000).astype(np.float32) * 5,
           "n": np.array(40, np.int64)}
    before = update_norm(new, ref)
    clipped, norm = clip_update(new, ref, 2.0)
    assert norm == pytest.approx(before) and before > 100
    assert update_norm(clipped, ref) == pytest.approx(2.0, rel=1e-5)
    d_new, d_clip = new["w"] - ref["w"], clipped["w"] - ref["w"]
    cos = d_new @ d_clip / np.linalg.norm(d_new) / np.linalg.norm(d_clip)
    assert cos == pytest.approx(1.0, abs=1e-6)
    assert clipped["n"] == 3 and clipped["n"].dtype == np.int64  # the server's value
    small = {"w": ref["w"] + 1e-3, "n": ref["n"]}
    assert np.array_equal(clip_update(small, ref, 2.0)[0]["w"], small["w"])  # inside: as is
    nan = {"w": np.full(1000, np.nan, np.float32), "n": ref["n"]}
    assert np.isnan(clip_update(nan, ref, 2.0)[0]["w"]).all()  # left for the validator


def test_noisy_mean_uses_the_fixed_denominator():
    ref = {"w": np.ones(4, np.float32), "n": np.array(1, np.int64)}
    ups = [{"w": np.ones(4, np.float32) * 3, "n": np.array(9, np.int64)},
           {"w": np.ones(4, np.float32) * 5, "n": np.array(9, np.int64)}]
    out = noisy_mean_update(ref, ups, 4, 0.0)
    assert np.allclose(out["w"], 1 + (2 + 4) / 4)  # a missing client counts as no update
    assert out["n"] == 1
    with pytest.raises(ValueError, match="num_sampled"):
        noisy_mean_update(ref, ups, 1, 0.0)


def _reply(node: int, arrays: dict, error: bool = False) -> Message:
    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=MessageType.TRAIN)
    if error:
        return Message(Error(code=0, reason="client crashed"), metadata=meta)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": 10, "train-loss-meme": 1.0})})
    return Message(content=content, metadata=meta)


def _dp_config(tmp_path, mode: str, sigma: float, clip: float = 1.0):
    return load_config({"algorithm": "fedavg", "aggregation": "uniform", "dp-mode": mode,
                        "dp-noise-multiplier": sigma, "dp-clipping-norm": clip,
                        "output-dir": str(tmp_path), "run-name": f"{mode}-{sigma}",
                        "min-clients": 1})


def _wrapped(cfg, log: RunLog, sent: int = 3):
    """The real meme strategy and DP wrapper over ``log``'s run folder, as the ServerApp
    builds them, with ``sent`` of ``sent`` clients sampled and the meme ``_ref()`` sent."""
    ref = ArrayRecord({k: Array(v) for k, v in _ref().items()})
    inner = build_strategy(cfg, log, template=template_of(ref))
    inner.current_arrays = inner.sent_arrays = ref
    inner.population, inner.sent_train = sent, sent
    return wrap_dp(inner), inner


def _dp_strategy(tmp_path, mode: str, sigma: float, clip: float = 1.0, sent: int = 3):
    cfg = _dp_config(tmp_path, mode, sigma, clip)
    log = RunLog.create(cfg)
    dp, inner = _wrapped(cfg, log, sent)
    log.begin_round(1)
    return dp, inner, log


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_server_side_dp_clips_every_update_and_noises_at_the_configured_scale(tmp_path,
                                                                               sigma):
    dp, inner, log = _dp_strategy(tmp_path, "server", sigma)
    assert isinstance(dp, MemeDpServerSide)
    rng = np.random.default_rng(1)
    dirs = [rng.normal(size=D) for _ in range(2)]
    lengths = [0.5, 10.0]  # one inside the norm, one clipped to it
    replies = [_reply(i + 1, _with_update(d, n))
               for i, (d, n) in enumerate(zip(dirs, lengths, strict=True))]
    replies.append(_reply(3, {}, error=True))  # a failed client: still m = 3
    arrays, _ = dp.aggregate_train(1, replies)
    w = arrays["w"].numpy().astype(np.float64)
    expected = sum(d / np.linalg.norm(d) * min(n, 1.0)
                   for d, n in zip(dirs, lengths, strict=True)) / 3
    residual = w - expected
    std = sigma * 1.0 / 3
    if sigma == 0:
        assert np.allclose(residual, 0, atol=1e-6)
    else:  # N(0, (σC/m)^2) per coordinate: the sample std within 1.5 % of it, mean ~ 0
        assert residual.std() == pytest.approx(std, rel=0.015)
        assert abs(residual.mean()) < 4 * std / math.sqrt(D)
    assert arrays["n"].numpy() == 7  # integer buffers: the server's, never noised
    log.end_round()
    rec = log.records[-1]
    assert rec["dp_sampled"] == 3 and rec["failed_clients"] == 1
    assert rec["dp_clipped"] == 1 and rec["dp_noise_std"] == pytest.approx(std)
    if sigma == 0:
        assert rec["dp_epsilon"] is None  # infinite: no privacy
    else:
        assert rec["dp_epsilon"] == pytest.approx(
            epsilon_spent([Release(sigma, 3, 3)], 1e-5, subsampled=False))


def test_client_side_dp_rejects_an_update_the_client_did_not_clip(tmp_path):
    dp, inner, log = _dp_strategy(tmp_path, "client", 1.0)
    assert isinstance(dp, MemeDpClientSide)
    rng = np.random.default_rng(2)
    good, bad = rng.normal(size=D), rng.normal(size=D)
    arrays, _ = dp.aggregate_train(1, [_reply(1, _with_update(good, 1.0)),
                                       _reply(2, _with_update(bad, 5.0))])
    log.end_round()
    assert log.records[-1]["rejected_updates"] == 1
    assert log.records[-1]["num_clients"] == 1
    [why] = log.records[-1]["rejections"]  # the reply of norm 5, with what it measured
    assert why["stage"] == "train" and why["node"] == 2
    assert why["reason"].startswith("norm 5 exceeds dp-clipping-norm=1 ")
    assert arrays is not None


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    eps = [epsilon_spent([Release(2.0, 20, 20)] * t, 1e-5, subsampled=False)
           for t in (1, 5, 10, 20)]
    assert eps == sorted(eps) and len(set(eps)) == 4
    by_noise = [epsilon_spent([Release(s, 20, 20)] * 10, 1e-5, subsampled=False)
                for s in (0.8, 1.5, 3.0, 6.0)]
    assert by_noise == sorted(by_noise, reverse=True)
    sub = [epsilon_spent([Release(2.0, m, 20)] * 10, 1e-5, subsampled=True) for m in (5, 10)]
    assert sub[0] < sub[1]  # fewer sampled: more amplification
    assert epsilon_spent([Release(0.0, 3, 3)], 1e-5, subsampled=False) == math.inf


def _exact_gaussian_epsilon(sigma_eff: float, delta: float) -> float:
    """The tight (ε, δ) of one Gaussian mechanism (Balle & Wang 2018, Theorem 8), by bisection."""
    def delta_of(eps: float) -> float:
        return (normal.cdf(0.5 / sigma_eff - eps * sigma_eff)
                - math.exp(eps) * normal.cdf(-0.5 / sigma_eff - eps * sigma_eff))

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma,rounds", [(1.0, 10), (2.02, 10), (3.67, 10), (12.8, 10),
                                          (1.5, 50)])
def test_epsilon_matches_reference_values(sigma, rounds):
    """No sampling: T Gaussian releases of σ are one Gaussian of σ/√T, whose exact ε is known
    in closed form; RDP may only overstate it, and by little. The classic RDP conversion
    (Mironov 2017) is an upper bound."""
    ours = epsilon_spent([Release(sigma, 20, 20)] * rounds, 1e-5, subsampled=False)
    exact = _exact_gaussian_epsilon(sigma / math.sqrt(rounds), 1e-5)
    classic = min(rounds * a / (2 * sigma**2) + math.log(1e5) / (a - 1)
                  for a in np.linspace(1.01, 400, 40000))
    assert exact <= ours <= classic * (1 + 1e-9)
    assert ours <= exact * 1.25


def test_sampled_epsilon_agrees_with_flowers_accountant_at_half_the_noise():
    """Sampling m of N without replacement is accounted under replace-one neighbours, where
    the clipped sum moves by 2C: Flower's RDP accountant fed σ/2 must give our number."""
    cfg = PrivacyConfig(target_delta=1e-5, population_size=20,
                        neighboring_relation=NeighboringRelation.REPLACE_ONE,
                        sampling_method=SamplingMethod.WITHOUT_REPLACEMENT)
    acc = RdpAccountant(cfg)
    acc.compose(GaussianPrivacyEvent(noise_multiplier=1.5, sample_size=5,
                                     population_size=20), 10)
    ours = epsilon_spent([Release(3.0, 5, 20)] * 10, 1e-5, subsampled=True)
    assert ours == pytest.approx(acc.get_privacy_spent().epsilon, rel=1e-9)


def test_noise_for_epsilon_is_the_smallest_noise_within_the_budget():
    sigma = noise_for_epsilon(4.0, 10, 1e-5, sampled=20, population=20)
    assert epsilon_spent([Release(sigma, 20, 20)] * 10, 1e-5, subsampled=False) <= 4.0
    assert epsilon_spent([Release(sigma * 0.99, 20, 20)] * 10, 1e-5, subsampled=False) > 4.0


def test_dp_clip_mod_clips_the_reply_to_the_servers_norm():
    rng = np.random.default_rng(3)
    sent = ArrayRecord({"w": Array(np.zeros(100, np.float32)),
                        "n": Array(np.array(2, np.int64))})
    config = ConfigRecord({"server-round": 1, KEY_CLIPPING_NORM: 0.5})
    msg = make_message(RecordDict({"arrays": sent, "config": config}))
    big = rng.normal(size=100).astype(np.float32) * 10

    def handler(m, ctx):
        return Message(RecordDict({"arrays": ArrayRecord({
            "w": Array(big), "n": Array(np.array(5, np.int64))}),
            "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)

    out = dp_clip_mod(msg, make_context({}), handler)
    w = out.content["arrays"]["w"].numpy()
    assert np.linalg.norm(w) == pytest.approx(0.5, rel=1e-5)
    assert out.content["arrays"]["n"].numpy() == 2
    plain = make_message(RecordDict({"arrays": sent, "config": ConfigRecord(
        {"server-round": 1})}))
    assert np.array_equal(dp_clip_mod(plain, make_context({}), handler)
                          .content["arrays"]["w"].numpy(), big)  # no DP: untouched


@pytest.mark.parametrize("overrides,needle", [
    ({"dp-mode": "server"}, "needs aggregation 'uniform'"),
    ({"dp-mode": "client", "aggregation": "median"}, "needs aggregation 'uniform'"),
    ({"dp-mode": "server", "aggregation": "uniform", "algorithm": "local"}, "sends none"),
    ({"secure-aggregation": True, "aggregation": "krum"}, "needs to see each one"),
    ({"secure-aggregation": True, "dp-mode": "server", "aggregation": "uniform"},
     "cannot clip"),
    ({"secure-aggregation": True, "faults": "nan:1"}, "only 'raise' faults"),
    ({"secure-aggregation": True, "algorithm": "local"}, "sends none"),
    ({"secure-aggregation": True, "min-clients": 1}, "expected >= 2"),
])
def test_privacy_switches_that_would_not_protect_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides)


# ---------------------------------------------------------------- noise nobody can replay
def test_dp_noise_cannot_be_regenerated_from_the_run_config(tmp_path):
    """The attack of issue #10: rebuild the noise from the public seed and subtract it.
    Before the fix this recovered the exact clipped mean (max error 6e-8); now the residual
    is another draw of the noise, as large as the noise itself."""
    from common.runtime import derive_seed

    sigma = 2.0
    dp, inner, _ = _dp_strategy(tmp_path, "server", sigma, sent=2)
    rng = np.random.default_rng(5)
    dirs = [rng.normal(size=D) for _ in range(2)]
    replies = [_reply(i + 1, _with_update(d, 0.5)) for i, d in enumerate(dirs)]
    released = dp.aggregate_train(1, replies)[0]["w"].numpy().astype(np.float64)
    exact = sum(d / np.linalg.norm(d) * 0.5 for d in dirs) / 2
    std = sigma * 1.0 / 2
    replayed = np.random.default_rng(derive_seed(inner.cfg.seed, "dp-noise", 1)).normal(
        0.0, std, size=D)
    recovered = released - replayed
    # the attack recovered nothing: the residual is the sum of two independent draws, its
    # std sqrt(2) x the noise's (the seeded noise left a residual of 6e-8)
    assert (recovered - exact).std() == pytest.approx(math.sqrt(2) * std, rel=0.02)


def test_two_releases_from_the_same_config_draw_different_noise(tmp_path):
    sigma = 1.0
    out = []
    for i in range(2):
        dp, _, _ = _dp_strategy(tmp_path / str(i), "server", sigma, sent=1)
        out.append(dp.aggregate_train(1, [_reply(1, _with_update(np.ones(D), 0.5))])[0])
    diff = out[0]["w"].numpy().astype(np.float64) - out[1]["w"].numpy().astype(np.float64)
    assert diff.std() == pytest.approx(math.sqrt(2) * sigma, rel=0.02)


def test_secure_normal_is_standard_normal_and_never_repeats():
    a, b = secure_normal((200_000,), 1.0), secure_normal((200_000,), 1.0)
    assert a.dtype == np.float64 and np.isfinite(a).all()
    assert abs(a.mean()) < 4 / math.sqrt(len(a))
    assert a.std() == pytest.approx(1.0, rel=0.01)
    # the shape of N(0,1), not only its moments: mass within 1 and 2 standard deviations
    assert np.mean(np.abs(a) < 1) == pytest.approx(normal.cdf(1) - normal.cdf(-1), abs=0.005)
    assert np.mean(np.abs(a) < 2) == pytest.approx(normal.cdf(2) - normal.cdf(-2), abs=0.003)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.01  # two calls: independent draws
    assert secure_normal((3, 5), 0.5).shape == (3, 5)
    assert secure_normal((7,), 3.0).std() > 0


def test_noise_on_batchnorm_statistics_never_leaves_a_negative_variance():
    ref = {"bn.running_var": np.full(1000, 0.01, np.float32),
           "bn.running_mean": np.zeros(1000, np.float32),
           "bn.num_batches_tracked": np.array(4, np.int64)}
    up = {"bn.running_var": np.full(1000, 0.02, np.float32),
          "bn.running_mean": np.full(1000, 0.1, np.float32),
          "bn.num_batches_tracked": np.array(9, np.int64)}
    out = noisy_mean_update(ref, [up], 1, 1.0)  # noise far above the variance itself
    assert (out["bn.running_var"] >= 0).all()
    assert (out["bn.running_var"] == 0).mean() > 0.4  # the clamp did act (~half below 0)
    assert (out["bn.running_mean"] < 0).mean() > 0.4  # a mean may be negative: untouched
    assert out["bn.num_batches_tracked"] == 4  # the counter keeps the server's value


def _sampled(tmp_path, name: str, dp: str, rounds: int = 8) -> list[list[int]]:
    """Which of 6 nodes the strategy samples (fraction-train 0.5) in each of ``rounds``."""
    cfg = load_config({"algorithm": "fedavg", "aggregation": "uniform", "dp-mode": dp,
                       "fraction-train": 0.5, "min-clients": 1, "seed": 3,
                       "output-dir": str(tmp_path), "run-name": name})
    strat = build_strategy(cfg, RunLog.create(cfg))
    strat.clients.keys = {n: n for n in range(10, 16)}  # identified already
    grid = _StaticGrid(list(range(10, 16)))
    return [sorted(m.metadata.dst_node_id for m in strat.configure_train(
        r, ArrayRecord(), ConfigRecord(), grid)) for r in range(1, rounds + 1)]


class _StaticGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)


def test_sampling_under_dp_is_secret_and_without_dp_follows_the_seed(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # as the ServerApp process has them
        monkeypatch.setattr(TaskIdentity, attr, 1)
    plain = [_sampled(tmp_path, f"plain-{i}", "none") for i in range(2)]
    assert plain[0] == plain[1]  # reproducible from the seed
    secret = [_sampled(tmp_path, f"dp-{i}", "server") for i in range(2)]
    assert all(len(s) == 3 for s in secret[0] + secret[1])
    # 20 possible samples per round: 8 equal rounds by chance has probability 20^-8
    assert secret[0] != secret[1]
    assert secret[0] != plain[0]


# ------------------------------------------------ the release ledger (issue #21, item 5)
def _three_replies() -> list[Message]:
    rng = np.random.default_rng(7)
    return [_reply(i + 1, _with_update(rng.normal(size=D), 0.5)) for i in range(3)]


def _release_round(dp, log: RunLog, rnd: int, *, close: bool) -> None:
    """Round ``rnd``'s aggregation (the noised meme is released); ``close=False`` is a
    crash before the round is closed and checkpointed (server/rounds.py steps 6-7)."""
    log.begin_round(rnd)
    assert dp.aggregate_train(rnd, _three_replies())[0] is not None
    if close:
        log.end_round()


def _checkpoint(cfg, log: RunLog) -> None:
    save_checkpoint(log.run_dir, len(log.records), {"w": torch.zeros(D)}, log.records, cfg,
                    {})


def _resume(cfg, run_dir):
    """What server/app.py::_start does for ``resume-from``, then a fresh wrapper."""
    ckpt = load_checkpoint(run_dir, cfg)
    log = RunLog.resume(run_dir, cfg, ckpt.records)
    return _wrapped(cfg, log)[0], log, ckpt


def _ledger_rounds(run_dir) -> list[int]:
    return [e["round"] for e in json.loads((run_dir / LEDGER).read_text())["releases"]]


def test_a_round_released_then_lost_in_a_crash_counts_again_after_resume(tmp_path):
    """Round 2's meme is released (step 3; step 4 sends it to the clients' evaluation), then
    the server dies before step 7 checkpoints it. The resumed run releases round 2 again
    with fresh noise: both releases reached clients, so ε counts three releases, not the
    two the checkpoint's records alone would give."""
    sigma = 2.0
    cfg = _dp_config(tmp_path, "server", sigma)
    log = RunLog.create(cfg)
    dp, _ = _wrapped(cfg, log)
    _release_round(dp, log, 1, close=True)
    _checkpoint(cfg, log)
    _release_round(dp, log, 2, close=False)  # the crash
    dp, log, ckpt = _resume(cfg, log.run_dir)
    assert ckpt.round == 1
    _release_round(dp, log, 2, close=True)
    one = Release(sigma, 3, 3)  # σ, m sampled, N connected: independent of the wrapper
    expected = epsilon_spent([one, one, one], 1e-5, subsampled=False)
    assert expected > epsilon_spent([one, one], 1e-5, subsampled=False)
    on_disk = json.loads((log.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in on_disk] == [1, 2]
    assert on_disk[-1]["dp_epsilon"] == pytest.approx(expected, rel=1e-12)
    assert _ledger_rounds(log.run_dir) == [1, 2, 2]


def test_a_first_round_released_then_lost_counts_when_the_folder_is_run_again(tmp_path):
    """A crash before round 1 is checkpointed leaves nothing to resume: the run is started
    again in the same folder (no metrics.json yet, so it is allowed) and its round 1 is the
    second release of round 1."""
    sigma = 1.5
    cfg = _dp_config(tmp_path, "client", sigma)
    log = RunLog.create(cfg)
    dp, _ = _wrapped(cfg, log)
    _release_round(dp, log, 1, close=False)  # the crash
    log = RunLog.create(cfg)
    dp, _ = _wrapped(cfg, log)
    _release_round(dp, log, 1, close=True)
    one = Release(sigma, 3, 3)
    expected = epsilon_spent([one, one], 1e-5, subsampled=False)
    assert expected > epsilon_spent([one], 1e-5, subsampled=False)
    assert log.records[-1]["dp_epsilon"] == pytest.approx(expected, rel=1e-12)
    assert _ledger_rounds(log.run_dir) == [1, 1]


def test_the_release_is_on_disk_before_the_meme_is_returned(tmp_path):
    dp, inner, log = _dp_strategy(tmp_path, "server", 1.0)
    path = log.run_dir / LEDGER
    assert not path.exists()
    seen = []
    handing_out = inner.release  # the wrapper's last step: it returns the meme

    def watch(meme, got):
        seen.append(json.loads(path.read_text()) if path.exists() else None)
        return handing_out(meme, got)

    inner.release = watch
    arrays, _ = dp.aggregate_train(1, _three_replies())
    on_disk = json.loads(path.read_text())  # right after the call, before anything else
    assert arrays is not None and len(seen) == 1
    assert seen[0] == on_disk  # already written when the meme was handed out
    (entry,) = on_disk["releases"]
    assert {k: entry[k] for k in ("round", "noise_multiplier", "sampled", "population")} == {
        "round": 1, "noise_multiplier": 1.0, "sampled": 3, "population": 3}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["time"])


def test_a_release_that_cannot_be_recorded_is_not_released(tmp_path):
    dp, _, log = _dp_strategy(tmp_path, "server", 1.0)
    (log.run_dir / LEDGER).mkdir()  # the atomic rename onto it fails
    with pytest.raises(OSError):
        dp.aggregate_train(1, _three_replies())


@pytest.mark.parametrize("text", [
    "",
    '{"format": 1, "releases": [{"round": 1, "noise_multipl',  # torn
    "[]",
    '{"format": 1, "releases": [{"round": 1, "noise_multiplier": 2.0, "sampled": 0, '
    '"population": 3}]}',
    '{"format": 1, "releases": [{"round": 1, "noise_multiplier": "2", "sampled": 3, '
    '"population": 3}]}',
])
def test_a_corrupt_ledger_stops_the_resume_naming_the_file(tmp_path, text):
    cfg = _dp_config(tmp_path, "server", 2.0)
    log = RunLog.create(cfg)
    dp, _ = _wrapped(cfg, log)
    _release_round(dp, log, 1, close=True)
    _checkpoint(cfg, log)
    path = log.run_dir / LEDGER
    path.write_text(text)
    with pytest.raises(LedgerError, match=re.escape(str(path))):
        _resume(cfg, log.run_dir)


def test_a_ledger_without_a_checkpointed_round_stops_the_resume(tmp_path):
    cfg = _dp_config(tmp_path, "server", 2.0)
    log = RunLog.create(cfg)
    dp, _ = _wrapped(cfg, log)
    _release_round(dp, log, 1, close=True)
    _checkpoint(cfg, log)
    path = log.run_dir / LEDGER
    path.write_text(json.dumps({"format": 1, "releases": []}))
    with pytest.raises(LedgerError, match=r"lacks round\(s\) \[1\]"):
        _resume(cfg, log.run_dir)


def test_a_run_folder_from_before_the_ledger_is_accounted_from_its_records(tmp_path):
    sigma = 2.0
    cfg = _dp_config(tmp_path, "server", sigma)
    log = RunLog.create(cfg)
    dp, _ = _wrapped(cfg, log)
    _release_round(dp, log, 1, close=True)
    _checkpoint(cfg, log)
    (log.run_dir / LEDGER).unlink()  # as an older fedmutual left the folder
    dp, log, _ = _resume(cfg, log.run_dir)
    saved = json.loads((log.run_dir / LEDGER).read_text())["releases"]
    assert saved == [{"round": 1, "noise_multiplier": sigma, "sampled": 3, "population": 3,
                      "time": None, "source": "metrics.json"}]
    _release_round(dp, log, 2, close=True)
    one = Release(sigma, 3, 3)
    assert log.records[-1]["dp_epsilon"] == pytest.approx(
        epsilon_spent([one, one], 1e-5, subsampled=False), rel=1e-12)
    assert _ledger_rounds(log.run_dir) == [1, 2]


@pytest.mark.parametrize("bad", ["shape", "nan"])
def test_secure_round_masks_only_float_arrays_and_fails_on_a_broken_mean(tmp_path,
                                                                          monkeypatch, bad):
    """SecAgg+ itself runs in tests/test_e2e_privacy.py; here its result is replaced to
    check what the round does with it: the masked keys are the floating arrays (the
    integer counter keeps the server's value), and a mean of the wrong shape or not
    finite fails the run (SecureAggregationFailed) instead of becoming the meme."""
    import server.secure as secure
    from common.runtime import derive_seed

    cfg = load_config({"algorithm": "fedavg", "secure-aggregation": True, "min-clients": 2,
                       "output-dir": str(tmp_path)})
    template = template_of(ArrayRecord({k: Array(v) for k, v in _ref().items()}))
    asked = {}
    mean = {"w": np.full(D, 0.5, np.float32)}

    def protocol(grid, msgs, keys, server_round, **kw):
        asked.update(keys=list(keys), round=server_round, **kw)
        return secure.SecureResult(dict(mean), [(1, RecordDict()), (2, RecordDict())], 0)

    monkeypatch.setattr(secure, "secure_mean", protocol)
    got = secure.secure_round(cfg, template, None, [], 4, max_weight=9.0, timeout=5.0)
    assert got.mean["w"].tolist() == [0.5] * D
    assert asked["keys"] == ["w"] and asked["round"] == 4 and asked["max_weight"] == 9.0
    assert asked["seed"] == derive_seed(cfg.seed, "secagg", 4)
    mean["w"] = (np.zeros(D + 1, np.float32) if bad == "shape"
                 else np.full(D, np.nan, np.float32))
    with pytest.raises(secure.SecureAggregationFailed,
                       match=rf"round 4: the securely aggregated 'w' is not a finite array "
                             rf"of shape \({D},\)"):
        secure.secure_round(cfg, template, None, [], 4, max_weight=9.0, timeout=5.0)
