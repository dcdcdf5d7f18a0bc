"""The round profiler: phases land in files only when asked, and the table adds them up
as hand-computed here."""

import json

import pytest

from common.profiling import ENV, phase, read_phases
from simulations.bench_round import differences, profile_table, split_seconds


def test_phase_writes_nothing_unless_the_env_names_a_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with phase("client", "train.sgd", 1, client=3):
        pass
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(ENV, str(tmp_path / "prof"))
    with phase("client", "train.sgd", 2, client=3, device="cpu"):
        sum(range(10_000))
    try:
        with phase("server", "aggregate", 2):
            raise ValueError("a failing phase is still timed")
    except ValueError:
        pass
    lines = read_phases(tmp_path / "prof")
    assert sorted((x["role"], x["phase"], x["round"], x["client"]) for x in lines) == [
        ("client", "train.sgd", 2, 3), ("server", "aggregate", 2, None)]
    assert all(x["seconds"] > 0 for x in lines)
    assert [x.get("device") for x in lines if x["role"] == "client"] == ["cpu"]


def test_profile_table_against_hand_computed_seconds():
    rows = [{"role": "server", "phase": "train-exchange", "round": r, "client": None,
             "seconds": s} for r, s in ((1, 100.0), (2, 10.0), (3, 14.0))]
    rows += [{"role": "server", "phase": "evaluate-exchange", "round": 2, "client": None,
              "seconds": 3.0}]
    # round 2: two clients train 4 s + 6 s, round 3: 8 s + 2 s; round 1 is left out
    rows += [{"role": "client", "phase": "train.sgd", "round": r, "client": c, "seconds": s}
             for r, c, s in ((1, 0, 50.0), (2, 0, 4.0), (2, 1, 6.0), (3, 0, 8.0), (3, 1, 2.0))]
    rows += [{"role": "client", "phase": "evaluate.forward", "round": 2, "client": 0,
              "seconds": 2.0}]
    table = {name.strip(): secs for name, secs, _ in profile_table(rows, [2, 3], workers=2)}
    assert table["train-exchange"] == 12.0  # (10 + 14) / 2
    assert table["train.sgd"] == 5.0  # (10 + 10) / 2 rounds / 2 workers
    assert table["train-exchange: messaging, scheduling, idle workers"] == 7.0
    assert table["evaluate-exchange"] == 1.5  # 3 s in round 2, none in round 3
    assert table["evaluate.forward"] == 0.5  # 2 s / 2 rounds / 2 workers
    assert table["evaluate-exchange: messaging, scheduling, idle workers"] == 1.0
    assert table["aggregate"] == 0.0


def test_differences_ignore_seconds_only():
    a = {"records": [{"round": 1, "seconds": 5.0, "local_accuracy": 0.5}],
         "clients": [{"round": 1, "clients": [{"key": 0}]}]}
    same = json.loads(json.dumps(a))
    same["records"][0]["seconds"] = 2.0
    assert differences(a, same) == []
    other = json.loads(json.dumps(same))
    other["records"][0]["local_accuracy"] = 0.5000001
    other["clients"][0]["clients"][0]["key"] = 1
    assert differences(a, other) == ["round 1 local_accuracy: 0.5 vs 0.5000001",
                                     "clients.json differs"]


def test_an_option_variant_is_compared_on_what_it_recorded():
    """evaluate-every=2 over 3 rounds: round 2 left its evaluation null and sent fewer bytes
    down; that is not a difference, a changed training loss or a skipped round's clients are."""
    rec = [{"round": r, "seconds": s, "local_accuracy": 0.1 * r, "train_loss_local": 1.0 / r,
            "bytes_down": 500} for r, s in ((1, 9.0), (2, 4.0), (3, 6.0))]
    base = {"records": rec, "clients": [{"round": r, "clients": [{"key": 0, "acc": r}]}
                                        for r in (1, 2, 3)]}
    var = json.loads(json.dumps(base))
    var["records"][1].update(local_accuracy=None, bytes_down=200, seconds=3.0)
    var["clients"] = [c for c in var["clients"] if c["round"] != 2]
    assert differences(base, var, recorded_only=True) == []
    assert differences(base, var) == ["round 2 bytes_down: 500 vs 200",
                                      "round 2 local_accuracy: 0.2 vs None",
                                      "clients.json differs"]
    var["records"][2]["train_loss_local"] = 0.3
    var["clients"][1]["clients"][0]["acc"] = 4
    assert differences(base, var, recorded_only=True) == [
        "round 3 train_loss_local: 0.3333333333333333 vs 0.3", "clients.json differs"]
    # rounds after the first: round 3 evaluated (6 s), round 2 not (3 s)
    assert split_seconds(var) == {"evaluated": 6.0, "not_evaluated": 3.0}
    assert split_seconds(base) == {"evaluated": 5.0, "not_evaluated": None}




def test_export_commit_writes_that_commits_tree_and_refuses_a_bad_ref(tmp_path):
    import subprocess

    from common.flwr_local import ROOT
    from simulations.bench_round import export_commit

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert export_commit("HEAD", tmp_path / "tree") == head
    shown = subprocess.run(["git", "show", "HEAD:server/rounds.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert (tmp_path / "tree" / "server" / "rounds.py").read_text() == shown
    with pytest.raises(SystemExit, match="--baseline-ref 'no-such-ref' is not a commit"):
        export_commit("no-such-ref", tmp_path / "other")


def test_bench_device_measures_every_device_present(tmp_path, monkeypatch):
    import sys

    import torch

    from simulations import bench_device

    out = tmp_path / "device.json"
    monkeypatch.setattr(sys, "argv", ["bench_device", "--batch-sizes", "4", "--steps", "3",
                                      "--variants", "fp32", "bf16", "--json", str(out)])
    bench_device.main()
    result = json.loads(out.read_text())
    assert [(r["batch_size"], r["variant"]) for r in result["results"]] == [(4, "fp32"),
                                                                             (4, "bf16")]
    for row in result["results"]:
        assert row["samples_per_second"]["cpu"] > 0
        assert ("cuda" in row["samples_per_second"]) == torch.cuda.is_available()
    assert (row["gpu_over_cpu"] is None) == (not torch.cuda.is_available())


@pytest.mark.e2e
def test_a_real_simulation_profiles_every_phase_of_every_round(tmp_path):
    """FEDMUTUAL_PROFILE through a real ``flwr run``: the ServerApp's six steps per round,
    and each client's train and evaluate phases, on the CPU, inside the exchange."""
    from common.flwr_local import SimLink

    pytest.importorskip("ray")
    folder = tmp_path / "profile"
    with SimLink(tmp_path / "home", env={ENV: str(folder)}) as link:
        link.run({"dataset": "digits", "meme-model": "mlp", "local-model": "mlp",
                  "num-server-rounds": 2, "output-dir": str(tmp_path), "run-name": "p"}, 3)
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())[-1]["round"] == 2
    lines = read_phases(folder)
    server = [(x["round"], x["phase"]) for x in lines if x["role"] == "server"]
    steps = ["configure-train", "train-exchange", "aggregate", "evaluate-exchange",
             "central-evaluation", "results-and-checkpoint"]
    assert server == [(r, s) for r in (1, 2) for s in steps]
    for rnd in (1, 2):
        sgd = [x for x in lines if x["phase"] == "train.sgd" and x["round"] == rnd]
        assert sorted(x["client"] for x in sgd) == [0, 1, 2]
        assert {x["device"] for x in sgd} == {"cpu"}
        evaluated = [x["client"] for x in lines
                     if x["phase"] == "evaluate.forward" and x["round"] == rnd]
        assert sorted(evaluated) == [0, 1, 2]
        exchange = next(x for x in lines if x["role"] == "server" and x["round"] == rnd
                        and x["phase"] == "train-exchange")
        assert all(x["end"] <= exchange["end"] for x in sgd)  # timed inside the exchange
