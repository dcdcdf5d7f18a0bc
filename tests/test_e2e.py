"""End to end: real ``flwr run`` simulations against a SuperLink of the test session's own."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from common.models import TaskSpec, build_model
from server.results import CLIENT_KEYS, METRIC_KEYS

pytestmark = pytest.mark.e2e
BASE = {"dataset": "digits", "meme-model": "mlp", "local-model": "mlp", "num-server-rounds": 2,
        "batch-size": 32}


def _run(simlink, tmp_path, name, **overrides):
    out = simlink.run({**BASE, "output-dir": str(tmp_path), "run-name": name, **overrides})
    return out, tmp_path / name


def _metrics(run_dir):
    assert (run_dir / "metrics.json").exists(), "run wrote no metrics.json"
    return json.loads((run_dir / "metrics.json").read_text())


def test_fml_simulation_writes_documented_results(simlink, tmp_path):
    out, run_dir = _run(simlink, tmp_path, "fml")
    records = _metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert tuple(r) == METRIC_KEYS
        dp_keys = [k for k in METRIC_KEYS
                   if k.startswith(("dp_", "update_norm"))
                   or k in ("mix_accuracy", "peers_accuracy", "peer_accuracies")]
        # the default FML's personalised model is the mixture of the private model and the
        # tuned meme (personal-model "mix"): both parts are reported beside it
        assert all(r[k] is not None for k in METRIC_KEYS if k not in dp_keys), r
        # no DP, no learnt mixture, no peers, no max-update-norm
        assert all(r[k] is None for k in dp_keys)
        assert r["num_clients"] == 3 and r["bytes_up"] > 0 and r["bytes_down"] > r["bytes_up"]
        assert 0 <= r["local_accuracy"] <= 1 and 0 <= r["central_meme_accuracy"] <= 1
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["dataset"] == "digits" and cfg["alpha"] == 0.5
    # pyproject.toml's "auto" reaches the run through Flower and is recorded resolved
    assert (cfg["personal-model"], cfg["meme-epochs"]) == ("mix", 2)
    # per client, by key: the round's sample-weighted means are made of exactly these
    clients = json.loads((run_dir / "clients.json").read_text())
    assert [c["round"] for c in clients] == [1, 2]
    for rec, rnd in zip(records, clients, strict=True):
        rows = rnd["clients"]
        assert [c["key"] for c in rows] == [0, 1, 2] and all(tuple(c) == CLIENT_KEYS for c in rows)
        assert all(c["num_train"] > 0 and c["num_test"] > 0 for c in rows)
        for model in ("local", "meme", "private", "tuned"):
            n = sum(c["num_test"] for c in rows)
            mean = sum(c[f"{model}_accuracy"] * c["num_test"] for c in rows) / n
            assert rec[f"{model}_accuracy"] == pytest.approx(mean, rel=1e-9)
            assert all(c[f"{model}_loss"] > 0 for c in rows)
    state = torch.load(run_dir / "meme_final.pt", weights_only=True)
    assert set(state) == {"1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"}
    assert "fedmutual summary: local accuracy best" in out
    # the same rounds for `tensorboard --logdir outputs` (the dev extra installs it)
    if importlib.util.find_spec("tensorboard"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir))
        events.Reload()
        tb = [(e.step, e.value) for e in events.Scalars("central_meme_accuracy")]
        assert tb == [(r["round"], pytest.approx(r["central_meme_accuracy"], rel=1e-6))
                      for r in records]


def test_heterogeneous_private_models(simlink, tmp_path):
    """Each client's private model, as its node holds it (the audit's snapshot), has the
    architecture assigned to its partition: three different sets of tensor shapes."""
    audit = tmp_path / "audit"
    _, run_dir = _run(simlink, tmp_path, "hetero", **{"local-models": "mlp,cnn,cnn-cifar",
                                                      "audit-dir": str(audit)})
    records = _metrics(run_dir)
    assert len(records) == 2 and all(r["local_accuracy"] is not None for r in records)
    shapes = {}
    for pid, name in enumerate(("mlp", "cnn", "cnn-cifar")):
        last = sorted((audit / f"client-{pid}").glob("*-train.npz"))[-1]
        with np.load(last, allow_pickle=False) as z:
            held = {k[len("private/"):]: z[k].shape for k in z.files if k.startswith("private/")}
        built = build_model(name, TaskSpec(1, 8, 10)).state_dict()
        assert held == {k: tuple(v.shape) for k, v in built.items()}, (pid, name)
        shapes[name] = tuple(sorted(held.items()))
    assert len(set(shapes.values())) == 3


def test_same_seed_same_metrics_with_partial_participation(simlink, tmp_path):
    """With the personal mixture on: it is reported per round and per client, and
    reproducible like the rest. The second run keeps its private models on disk only
    (``private-store="disk"``) and evaluates only in its last round (``evaluate-every=2``):
    neither may change what is trained, so every number it records is the first run's."""
    runs = []
    disk = {"private-store": "disk", "state-dir": str(tmp_path / "state"), "evaluate-every": 2}
    for name, store in (("rep-a", {}), ("rep-b", disk)):
        _, run_dir = _run(simlink, tmp_path, name, **{"fraction-train": 0.67, "seed": 5,
                                                      "personal-mix": True, **store})
        runs.append([{k: v for k, v in r.items() if k != "seconds"} for r in _metrics(run_dir)])
    evaluation = ("local_accuracy", "meme_accuracy", "central_meme_accuracy", "mix_accuracy")
    assert all(runs[1][0][k] is None for k in evaluation)  # round 1: not evaluated
    assert all(runs[0][0][k] is not None for k in evaluation)
    # round 1 sent the meme to the 2 clients that train, not to the 3 that evaluate
    assert runs[1][0]["bytes_down"] * 5 == runs[0][0]["bytes_down"] * 2
    assert runs[1][0] == {**runs[0][0], **dict.fromkeys(evaluation),  # trained the same
                          "bytes_down": runs[1][0]["bytes_down"]}
    assert runs[0][1] == runs[1][1]
    assert [r["round"] for r in json.loads((tmp_path / "rep-b" / "clients.json").read_text())
            ] == [2]
    from client.state_file import read_state_file

    saved = [read_state_file(p) for p in (tmp_path / "state").glob("private-*[0-9].pt")]
    assert sum(s["node_round"] for s in saved) == 2 * 2  # 2 rounds of 2 clients, all on disk
    assert all(r["num_clients"] == 2 for r in runs[0])
    assert all(0 < r["mix_accuracy"] <= 1 for r in runs[0])
    clients = json.loads((tmp_path / "rep-a" / "clients.json").read_text())
    for rnd in clients:
        assert all(0 <= c["mix_weight"] <= 1 and c["mix_accuracy"] is not None
                   for c in rnd["clients"])
    a = torch.load(tmp_path / "rep-a" / "meme_final.pt", weights_only=True)
    b = torch.load(tmp_path / "rep-b" / "meme_final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cyclic_sampling_trains_every_client_once_per_pass(simlink, tmp_path):
    """3 clients, 1 a round, 3 rounds, private models on disk only: each trained once."""
    from client.state_file import read_state_file

    state = tmp_path / "state"
    _, run_dir = _run(simlink, tmp_path, "cyclic", **{
        "num-server-rounds": 3, "fraction-train": 0.34, "fraction-evaluate": 0.34,
        "client-sampling": "cyclic", "min-clients": 1, "private-store": "disk",
        "state-dir": str(state)})
    records = _metrics(run_dir)
    assert [r["num_clients"] for r in records] == [1, 1, 1]
    saved = sorted((read_state_file(p)["server_round"], read_state_file(p)["node_round"])
                   for p in state.glob("private-*[0-9].pt"))
    assert saved == [(1, 1), (2, 1), (3, 1)]  # one client per round, each once
    clients = json.loads((run_dir / "clients.json").read_text())
    evaluated = [[c["key"] for c in rnd["clients"]] for rnd in clients]
    assert sorted(k for keys in evaluated for k in keys) == [0, 1, 2]


def test_bad_config_fails_before_training(simlink, tmp_path):
    out, run_dir = _run(simlink, tmp_path, "bad", alpha=1.5)
    assert "run-config key 'alpha' = 1.5 is invalid" in out
    assert not run_dir.exists()


def test_topk_compression_sends_a_fourteenth_of_the_bytes_and_still_learns(simlink, tmp_path):
    """compression="topk" at 10 %: each client sends the positions (a bitmap, or int32
    indices where fewer bytes) and int8 values of the largest tenth of its update; the
    server decodes, aggregates and evaluates as usual; the residual carries over. The meme
    goes down in half precision (``compression-down``), so half the bytes go down."""
    _, run_dir = _run(simlink, tmp_path, "topk", compression="topk",
                      **{"compression-ratio": 0.1, "num-server-rounds": 3,
                         "compression-down": "fp16"})
    records = _metrics(run_dir)
    meme = build_model("mlp", TaskSpec(1, 8, 10)).state_dict()
    floats = sum(v.numel() * 4 for v in meme.values())  # the float32 meme, 220,840 bytes
    # per array of n entries, k = ceil(n / 10): min(bitmap n/8, indices 4k) + k + 4 (scale):
    # 200x64: 1600+1280+4, 200x200: 5000+4000+4, 10x200: 250+200+4, biases 200: 25+20+4
    # (twice), 10: 2+1+4
    payload = 2884 + 9004 + 454 + 2 * 49 + 7
    for r in records:
        assert r["num_clients"] == 3 and r["rejected_updates"] == 0
        # the payload plus Flower's per-array headers (18 arrays of ~140 bytes): with them
        # a fourteenth of the float32 meme on this small model
        assert 3 * payload <= r["bytes_up"] < 3 * (payload + 18 * 200)
        assert r["bytes_up"] < 3 * floats / 14
        # train and evaluate messages to 3 clients, float16 arrays plus headers
        assert 6 * floats / 2 <= r["bytes_down"] < 6 * (floats / 2 + 6 * 200)
    assert records[-1]["central_meme_accuracy"] > 0.3  # chance is 0.1
