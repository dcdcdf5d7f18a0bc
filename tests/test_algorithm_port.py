"""The algorithms, end to end, against runs recorded before they moved onto the algorithm
seam (``tests/data/port/``, written by the code of commit 'port baselines'; never by the
code under test): same seed, the same ``metrics.json`` (apart from ``seconds``) and
``clients.json``: every count, accuracy and byte equal, every loss equal to a relative 1e-6.
(A loss is a sum of float32 products, whose last bits depend on the CPU's vector kernels;
one flipped prediction would move an accuracy by at least 1/359 here.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from simulations.grid import paper_keys

pytestmark = pytest.mark.e2e
RECORDED = Path(__file__).parent / "data" / "port"
#: small, but every moving part: sampling (2 of 3 train), both models, evaluation
#: (recorded before FML's keys took ``auto``: every algorithm ran them at these values)
PORT_CONFIG = {"dataset": "digits", "meme-model": "mlp", "local-model": "mlp",
               "num-server-rounds": 2, "batch-size": 32, "seed": 7, "fraction-train": 0.67,
               **paper_keys()}
ALGORITHMS = ("fml", "fedavg", "fedprox", "local")


def run_recorded(simlink, out: Path, algorithm: str) -> tuple[list, list]:
    """Run ``algorithm`` with the port's config: its metrics (without seconds), clients."""
    log = simlink.run({**PORT_CONFIG, "algorithm": algorithm, "output-dir": str(out),
                       "run-name": algorithm})
    run_dir = out / algorithm
    assert (run_dir / "metrics.json").exists(), log[-3000:]
    metrics = [{k: v for k, v in r.items() if k != "seconds"}
               for r in json.loads((run_dir / "metrics.json").read_text())]
    return metrics, json.loads((run_dir / "clients.json").read_text())


def _as_recorded(rows: list[dict], recorded: list[dict]) -> list[dict]:
    """``rows`` with the keys the recorded rows have; a key added since must be null (the
    new things these algorithms do not do), so nothing recorded can hide in it."""
    out = []
    for row, old in zip(rows, recorded, strict=True):
        assert all(row[k] is None for k in set(row) - set(old)), set(row) - set(old)
        out.append({k: row[k] for k in old if k in row})
    return out


def _same(new, old, where: str = "") -> None:
    """``new`` equals ``old``: structure, keys and exact values, except that a loss (a
    float whose key names a loss) may differ by a relative 1e-6."""
    assert type(new) is type(old) or {type(new), type(old)} == {int, float}, where
    if isinstance(old, dict):
        assert new.keys() == old.keys(), where
        for k in old:
            _same(new[k], old[k], f"{where}.{k}")
    elif isinstance(old, list):
        assert len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old, strict=True)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(old, float) and "loss" in where.rsplit(".", 1)[-1]:
        assert new == pytest.approx(old, rel=1e-6, abs=0), where
    else:
        assert new == old, where


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_ported_algorithm_equals_its_recorded_run(simlink, tmp_path, algorithm):
    metrics, clients = run_recorded(simlink, tmp_path, algorithm)
    recorded = json.loads((RECORDED / f"{algorithm}.json").read_text())
    _same(_as_recorded(metrics, recorded["metrics"]), recorded["metrics"], "metrics")
    _same([{**r, "clients": _as_recorded(r["clients"], old["clients"])}
           for r, old in zip(clients, recorded["clients"], strict=True)], recorded["clients"],
          "clients")
    for r in metrics:  # each fills only its own keys
        assert (r["local_accuracy"] is None) == (algorithm in ("fedavg", "fedprox"))
        assert (r["meme_accuracy"] is None) == (algorithm == "local")
        assert (r["bytes_up"] == 0) == (algorithm == "local")
    assert (tmp_path / algorithm / "meme_final.pt").exists() == (algorithm != "local")


if __name__ == "__main__":  # record: python -m tests.test_algorithm_port (old code only)
    import tempfile

    from common.flwr_local import SimLink

    with tempfile.TemporaryDirectory() as tmp, SimLink(Path(tmp) / "home") as link:
        for name in ALGORITHMS:
            m, c = run_recorded(link, Path(tmp) / "out", name)
            RECORDED.mkdir(parents=True, exist_ok=True)
            (RECORDED / f"{name}.json").write_text(
                json.dumps({"metrics": m, "clients": c}, indent=1) + "\n")
            print("recorded", name)


@pytest.mark.parametrize("algorithm", ["fedavg-ft", "ditto"])
def test_the_new_plug_ins_run_end_to_end(simlink, tmp_path, algorithm):
    """FedAvg+FT and Ditto in a real simulation: every round records the personalised
    model (``local_accuracy``: the fine-tuned copy, the personal model) beside the global
    one, only the meme goes up, and Ditto's personal models are kept on the clients."""
    metrics, clients = run_recorded(simlink, tmp_path, algorithm)
    assert [r["round"] for r in metrics] == [1, 2]
    for r in metrics:
        assert r["local_accuracy"] is not None and r["meme_accuracy"] is not None
        assert r["train_loss_meme"] is not None and r["bytes_up"] > 0
        assert (r["train_loss_local"] is not None) == (algorithm == "ditto")
    last = clients[-1]["clients"]
    assert len(last) == 3 and all(c["local_accuracy"] is not None for c in last)
    if algorithm == "fedavg-ft":  # fine-tuning touches a copy: the training is FedAvg's
        fedavg = json.loads((RECORDED / "fedavg.json").read_text())["metrics"]
        keys = ("meme_accuracy", "central_meme_accuracy", "train_loss_meme", "bytes_up")
        _same([{k: r[k] for k in keys} for r in metrics],
              [{k: r[k] for k in keys} for r in fedavg], "fedavg")
    # the personalised model is not the global one: it differs on some client
    assert any(c["local_accuracy"] != c["meme_accuracy"] for c in last)


def test_fml_with_three_private_peers_keeps_all_on_the_device(simlink, tmp_path):
    """K = 3 students per client (deep mutual learning) beside the meme, of two
    architectures (``peer-models``: peer-2 a CNN, the others MLPs): each round reports the
    first peer and the peers' mean prediction; the wire audit shows that only the meme
    went up while the client held all three peers, each of its own architecture."""
    audit = tmp_path / "audit"
    log = simlink.run({**PORT_CONFIG, "algorithm": "fml", "private-peers": 3,
                       "peer-models": "cnn,mlp", "audit-dir": str(audit),
                       "output-dir": str(tmp_path), "run-name": "k3"})
    path = tmp_path / "k3" / "metrics.json"
    assert path.exists(), log[-3000:]
    metrics = json.loads(path.read_text())
    for r in metrics:
        assert 0 <= r["local_accuracy"] <= 1 and 0 <= r["peers_accuracy"] <= 1
        assert r["train_loss_local"] is not None
    # each peer scored alone too: per client, and the round's test-size-weighted mean
    evaluated = json.loads((tmp_path / "k3" / "clients.json").read_text())
    for r, rnd in zip(metrics, evaluated, strict=True):
        rows = rnd["clients"]
        assert all(set(c["peer_accuracies"]) == {"peer-2", "peer-3"} for c in rows)
        for peer in ("peer-2", "peer-3"):
            mean = (sum(c["num_test"] * c["peer_accuracies"][peer] for c in rows)
                    / sum(c["num_test"] for c in rows))
            assert r["peer_accuracies"][peer] == pytest.approx(mean, rel=1e-12)
        assert r["peer_accuracies"] != {"peer-2": r["local_accuracy"],
                                        "peer-3": r["local_accuracy"]}
    trained = [f for f in audit.rglob("*.npz") if "train" in f.name]
    assert trained
    for f in trained:
        with np.load(f) as z:
            held = {k.split("/")[1] for k in z.files if k.startswith("private/")}
            convs = {k.split("/")[1] for k in z.files
                     if k.startswith("private/") and z[k].ndim == 4}  # conv kernels
            sent = {k for k in z.files if k.startswith("reply/")}
        assert {"peer-2", "peer-3"} <= held  # every peer kept (and "local"'s bare keys)
        assert convs == {"peer-2"}  # the CNN peer; "local" and peer-3 are MLPs
        assert all(k.startswith("reply/arrays/") for k in sent)
        assert not any("peer" in k for k in sent)


def test_codistill_forwards_stale_teachers_and_sends_models_only_before_an_exchange(
        simlink, tmp_path):
    """Co-distillation in a real simulation: 3 clients, burn-in 1, an exchange every 2nd
    round (rounds 2 and 4). Models go up only in rounds 1 and 3 (the round before an
    exchange), and each exchange sends every client the other two's: twice the bytes that
    went up. No meme: nothing goes down in the other rounds."""
    audit = tmp_path / "audit"
    log = simlink.run({**PORT_CONFIG, "algorithm": "codistill", "fraction-train": 1.0,
                       "num-server-rounds": 4, "codistill-burnin": 1, "codistill-every": 2,
                       "audit-dir": str(audit), "output-dir": str(tmp_path),
                       "run-name": "codistill"})
    path = tmp_path / "codistill" / "metrics.json"
    assert path.exists(), log[-3000:]
    rows = json.loads(path.read_text())
    assert [r["num_clients"] for r in rows] == [3, 3, 3, 3]
    assert [r["rejected_updates"] for r in rows] == [0, 0, 0, 0]
    up, down = [r["bytes_up"] for r in rows], [r["bytes_down"] for r in rows]
    assert up[0] > 0 and up[0] == up[2] and up[1] == up[3] == 0
    assert down[0] == 0 and down[2] == 0
    assert down[1] == 2 * up[0] and down[3] == 2 * up[2]
    assert all(r["local_accuracy"] is not None and r["meme_accuracy"] is None for r in rows)
    replies = sorted(f for f in audit.rglob("*train*.npz"))
    assert len(replies) == 12
    for f in replies:  # a model goes up, or nothing; never anything but its arrays
        with np.load(f) as z:
            sent = [k for k in z.files if k.startswith("reply/")]
        assert all(k.startswith("reply/arrays/") for k in sent)
    assert sum(1 for f in replies if any(k.startswith("reply/") for k in np.load(f).files)) == 6


def test_fml_personal_model_choice_scores_the_chosen_one_beside_both(simlink, tmp_path):
    """``personal-model = "choice"`` in a real simulation: every client's personalised
    score is exactly one of its two candidates' (the private model, the tuned meme),
    both of which are reported."""
    log = simlink.run({**PORT_CONFIG, "algorithm": "fml", "personal-model": "choice",
                       "output-dir": str(tmp_path), "run-name": "choice"})
    path = tmp_path / "choice" / "clients.json"
    assert path.exists(), log[-3000:]
    for row in json.loads((tmp_path / "choice" / "metrics.json").read_text()):
        assert row["private_accuracy"] is not None and row["tuned_accuracy"] is not None
    seen = set()
    for rnd in json.loads(path.read_text()):
        for c in rnd["clients"]:
            mine = (c["local_accuracy"], c["local_loss"])
            candidates = {"private": (c["private_accuracy"], c["private_loss"]),
                          "tuned": (c["tuned_accuracy"], c["tuned_loss"])}
            chosen = [k for k, v in candidates.items() if v == mine]
            assert chosen, (mine, candidates)
            seen.update(chosen)
    assert seen  # at least one client's choice was checked
