"""The experiment runner and the report, on the digits-quick preset, through real runs."""

import json
import tomllib

import matplotlib.image as mpimg
import numpy as np
import pytest

from common.config import load_config
from common.privacy import Release, epsilon_spent
from simulations.grid import PRESETS, Job, load_preset, parse_args, run_grid
from simulations.privacy_report import plot_privacy, privacy_table
from simulations.report import seed_curves, table, write_report
from simulations.runs import load_runs


def test_seed_curves_plot_only_the_rounds_every_seed_evaluated():
    """evaluate-every=2 over 5 rounds evaluates rounds 2, 4, 5; a seed stopped after round 4
    leaves 2 and 4: the curve's x are those rounds, not 1, 2."""
    def run(values):
        return [{"round": r, "acc": v} for r, v in enumerate(values, start=1)]

    full = run([None, 0.5, None, 0.7, 0.8])
    stopped = run([None, 0.4, None, 0.9])
    x, arr = seed_curves([full, stopped, run([None] * 5)], "acc")
    assert x.tolist() == [2, 4]
    assert arr.tolist() == [[0.5, 0.7], [0.4, 0.9]]
    x, arr = seed_curves([run([None, None])], "acc")
    assert x.size == 0 and arr.size == 0


def test_grid_overrides_add_up_over_repeated_set_flags():
    _, extra = parse_args(["--presets", "p", "--set", 'precision="bf16"', "--set",
                           "evaluate-every=5", "torch-compile=true"])
    assert extra == {"precision": "bf16", "evaluate-every": 5, "torch-compile": True}
    # a script's pinned keys, then a cell's own: the later value wins
    _, extra = parse_args(["--presets", "p", "--set", 'distill-weighting="fixed"', "alpha=0.9",
                           "--set", 'distill-weighting="adaptive"'])
    assert extra == {"distill-weighting": "adaptive", "alpha": 0.9}
    with pytest.raises(SystemExit):
        parse_args(["--presets", "p", "--set", "precision=bf16"])  # unquoted TOML string


def test_overrides_are_typed_toml_values_shared_by_grid_and_bench_round():
    """The one KEY=VALUE parser (grid's --set, bench_round's --option): a comma inside a
    quoted value stays in it; a bare word or a missing '=' names the flag."""
    from simulations.grid import overrides

    assert overrides(["evaluate-every=5", 'precision="bf16"', "torch-compile=true",
                      "lr=0.05", 'local-models="mlp,cnn"'], "--option") == {
        "evaluate-every": 5, "precision": "bf16", "torch-compile": True, "lr": 0.05,
        "local-models": "mlp,cnn"}
    for bad in (["torch-compile"], ["precision=bf16"]):
        with pytest.raises(SystemExit, match="--option .*expected KEY=VALUE"):
            overrides(bad, "--option")


def test_every_variant_names_an_algorithm_and_valid_keys():
    from simulations.grid import VARIANTS, load_variant

    names = sorted(p.stem for p in VARIANTS.glob("*.toml"))
    assert {"codistill-e1", "codistill-e10", "fml-k2", "fml-k3"} <= set(names)
    for name in names:
        algorithm, keys = load_variant(name)
        cfg = load_config(keys)
        assert cfg.algorithm.value == algorithm == keys["algorithm"]
    assert load_variant("fml-k3")[1]["private-peers"] == 3
    assert load_variant("fedavg") == ("fedavg", {})
    with pytest.raises(SystemExit, match="'fml-k9'.*fml-k2"):
        load_variant("fml-k9")


def test_run_folders_of_hyphenated_algorithms_and_variants_are_read(tmp_path):
    from simulations.runs import load_runs

    for name in ("fedavg-ft-seed0", "codistill-e5-seed12", "fml-seed1"):
        run = tmp_path / "preset" / name
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps([{"round": 1}]))
        algorithm = name.split("-seed")[0].removesuffix("-e5")
        config = load_config({"num-server-rounds": 1, "algorithm": algorithm}).to_dict()
        (run / "config.json").write_text(json.dumps(config))
    runs = load_runs(tmp_path)["preset"]
    assert {a: [r["seed"] for r in rs] for a, rs in runs.items()} == {
        "fedavg-ft": [0], "codistill-e5": [12], "fml": [1]}


def test_every_preset_is_a_valid_run_config_with_a_client_count():
    names = [p.stem for p in PRESETS.glob("*.toml") if p.stem != "supernodes"]
    assert {"fmnist-dir0.1", "fmnist-pathological", "fmnist-iid", "digits-quick"} <= set(names)
    for name in names:
        overrides, clients = load_preset(name)
        load_config(overrides)
        assert clients >= 2
    dir01 = tomllib.loads((PRESETS / "fmnist-dir0.1.toml").read_text())
    assert dir01["dirichlet-alpha"] == 0.1 and dir01["test-fraction"] == 0.25
    assert dir01["alpha"] == dir01["beta"] == 0.5 and dir01["lr"] == 0.01


@pytest.mark.parametrize("target", [8, 4, 1])
def test_dp_presets_spend_at_most_their_epsilon(target):
    """Each privacy/utility preset's σ keeps its whole run within the ε in its name."""
    overrides, clients = load_preset(f"fmnist-dir0.1-dp-eps{target}")
    base, _ = load_preset("fmnist-dir0.1")
    cfg = load_config(overrides)
    assert cfg.dp_mode.enabled and cfg.fraction_train == 1.0
    assert {k: v for k, v in overrides.items() if k in base} == base  # the base preset
    assert cfg.aggregation.value == "uniform"
    spent = epsilon_spent([Release(cfg.dp_noise_multiplier, clients, clients)]
                          * cfg.num_server_rounds, cfg.dp_delta, subsampled=False)
    assert target * 0.97 < spent <= target  # and not much more noise than needed


@pytest.mark.e2e
def test_grid_resumes_and_report_writes_table_and_plots(tmp_path, simlink, capsys):
    preset, clients = load_preset("digits-quick")
    # an interrupted run: the same config, stopped after 2 of its 3 rounds
    job = Job("digits-quick", "fml", 0, tmp_path)
    simlink.run({**preset, "num-server-rounds": 2, "algorithm": "fml", "seed": 0,
                 "output-dir": str(tmp_path / "digits-quick"), "run-name": job.run_dir.name,
                 "state-dir": str(job.state_dir)}, supernodes=clients)
    assert job.rounds_done() == 2
    run_grid(["digits-quick"], ["fml", "local"], [0], tmp_path)
    out = capsys.readouterr().out
    assert "resuming" in out and "round" in out and "ETA" in out
    for algo in ("fml", "local"):
        assert Job("digits-quick", algo, 0, tmp_path).rounds_done() == 3
    resumed = json.loads((job.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in resumed] == [1, 2, 3]
    # the private models went on from round 2: every one trained 3 times in all
    from client.state_file import read_state_file

    states = sorted(job.state_dir.glob("private-*[0-9].pt"))
    assert len(states) == clients
    assert all(read_state_file(s)["node_round"] == 3 for s in states)
    run_grid(["digits-quick"], ["fml"], [0], tmp_path)  # everything done: skipped
    assert "done, skipped" in capsys.readouterr().out

    files = write_report(tmp_path, tmp_path / "report")
    md = (tmp_path / "report" / "results.md").read_text()
    main_table, per_client = md.split("## Per client (final round)")
    rows = [ln for ln in main_table.splitlines() if ln.startswith("| digits-quick")]
    client_rows = {ln.split("|")[2].strip(): ln for ln in per_client.splitlines()
                   if ln.startswith("| digits-quick")}
    assert set(client_rows) == {"fml", "local"}
    assert client_rows["fml"].split("|")[8].strip() not in ("", "–")  # gain over local
    assert "client-gains.png" in {p.name for p in files}
    assert [r.split("|")[2].strip() for r in rows] == ["fml", "local"]
    fml_cells = [c.strip() for c in rows[0].split("|")]
    assert float(fml_cells[4]) > 0  # personalised accuracy final, in %
    for png in (p for p in files if p.suffix == ".png"):
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert table(load_runs(tmp_path)) in md


def test_privacy_table_orders_runs_by_epsilon_and_plots(tmp_path):
    def run(eps, local, meme, dp="server"):
        cfg = {"aggregation": "uniform", "dp-mode": dp, "dp-noise-multiplier": 2.0,
               "dp-clipping-norm": 1.0}
        rec = {"local_accuracy": local, "meme_accuracy": meme, "central_meme_accuracy": meme,
               "dp_epsilon": eps}
        return {"seed": 0, "config": cfg, "records": [rec]}

    runs = {"p-inf": {"fml": [run(None, 0.95, 0.8, dp="none")], "fedavg": [run(None, None, 0.8,
                                                                               dp="none")]},
            "p-eps1": {"fml": [run(0.99, 0.9, 0.1)], "fedavg": [run(0.99, None, 0.1)]},
            "p-eps8": {"fml": [run(7.9, 0.93, 0.3)]},
            "plain": {"fml": [{"seed": 0, "config": {"aggregation": "weighted"},
                               "records": [{"local_accuracy": 0.9}]}]}}
    text = privacy_table(runs)
    rows = [line.split(" | ")[:3] for line in text.splitlines()[2:]]
    assert rows == [["| ∞", "p-inf", "fml"], ["| ∞", "p-inf", "fedavg"],
                    ["| 7.90", "p-eps8", "fml"], ["| 0.99", "p-eps1", "fml"],
                    ["| 0.99", "p-eps1", "fedavg"]]
    assert "| 90.00 | 90.00 | 10.00 | 10.00 |" in text  # FML at eps 0.99: private final
    # and best, meme, central
    assert plot_privacy(runs, tmp_path / "p.png")
    assert mpimg.imread(tmp_path / "p.png").shape[2] in (3, 4)
    assert not privacy_table({"plain": runs["plain"]})
    # uniform runs without any DP run beside them (the leaderboard presets) are no
    # privacy comparison
    assert not privacy_table({"p-inf": runs["p-inf"]})


def test_per_client_statistics_against_hand_computed_values(tmp_path):
    from simulations.clients_report import client_table, gain_summary, gains, plot_gains, summary

    def row(key, n_train, n_test, acc):
        return {"key": key, "num_train": n_train, "num_test": n_test, "local_accuracy": acc,
                "local_loss": 0.1, "meme_accuracy": 0.5, "meme_loss": 1.0}

    fml = [row(0, 100, 30, 0.9), row(1, 10, 5, 0.95), row(2, 50, 15, 0.8), row(3, 20, 10, 0.7)]
    local = [row(0, 100, 30, 0.92), row(1, 10, 5, 0.8), row(2, 50, 15, 0.8),
             row(3, 20, 10, 0.75), row(9, 5, 5, 0.1)]  # key 9: not in the FML run
    s = summary(fml, "local_accuracy")
    assert s["weighted"] == pytest.approx((27 + 4.75 + 12 + 7) / 60)
    assert s["unweighted"] == pytest.approx(3.35 / 4)
    assert s["worst25"] == pytest.approx(0.7)  # one client of four: the worst, key 3
    assert s["smallest25"] == pytest.approx(0.95)  # the least training data, key 1
    pairs = gains(fml, "local_accuracy", local)
    assert [n for n, _ in sorted(pairs)] == [10, 20, 50, 100]
    assert [g for _, g in sorted(pairs)] == pytest.approx([0.15, -0.05, 0.0, -0.02])
    g = gain_summary(pairs)
    assert g["gain"] == pytest.approx(0.02) and g["share"] == 0.25
    assert g["gain_smallest25"] == pytest.approx(0.15)

    def run(rows):
        return {"seed": 0, "config": {}, "records": [], "clients": [
            {"round": 1, "clients": [row(k, 1, 1, 0.0) for k in range(4)]},
            {"round": 2, "clients": rows}]}  # the final round counts

    runs = {"p": {"fml": [run(fml)], "local": [run(local)]}}
    text = client_table(runs, lambda algo, run: "local_accuracy")
    assert "| p | fml | 1 | 84.58 | 83.75 | 70.00 | 95.00 | +2.00 | 25.00 | +15.00 |" in text
    assert "| p | local | 1 |" in text
    assert plot_gains(runs, lambda algo, run: "local_accuracy", tmp_path / "g.png")
    assert mpimg.imread(tmp_path / "g.png").shape[2] in (3, 4)


def test_teacher_mass_on_unseen_classes_against_a_constant_teacher(tmp_path):
    """A meme whose last layer ignores its input predicts softmax(b) for every sample, so
    each client's unseen mass is the sum of softmax(b) over its missing classes."""
    import torch

    from common.data import load_client_data
    from common.models import TaskSpec, build_model
    from simulations.teacher_mass import unseen_mass

    run = {"dataset": "digits", "meme-model": "mlp", "partitioner": "pathological",
           "classes-per-client": 3, "seed": 1}
    (tmp_path / "config.json").write_text(json.dumps(run))
    meme = build_model("mlp", TaskSpec(1, 8, 10)).state_dict()
    bias = torch.linspace(-2, 2, 10)
    meme["5.weight"].zero_()
    meme["5.bias"].copy_(bias)
    torch.save(meme, tmp_path / "meme_final.pt")
    rows = unseen_mass(tmp_path, 4)
    p = np.exp(bias.numpy()) / np.exp(bias.numpy()).sum()
    for r in rows:
        y = load_client_data(load_config(run), r["client"], 4).y_train.numpy()
        counts = np.bincount(y, minlength=10)
        unseen = counts == 0
        assert r["classes_seen"] == 10 - unseen.sum() <= 3
        assert r["unseen_mass"] == pytest.approx(p[unseen].sum(), rel=1e-5)
        shifted = p * (counts + 1) / (counts + 1).sum()
        assert r["unseen_mass_corrected"] == pytest.approx(
            (shifted / shifted.sum())[unseen].sum(), rel=1e-5)
        assert r["unseen_mass_corrected"] < r["unseen_mass"]


def test_compression_table_against_hand_computed_values(tmp_path):
    from simulations.compression_report import plot, summarise, table

    def run(seed, mode, up, private, meme, **cfg):
        recs = [{"bytes_up": b, "bytes_down": 3e6, "local_accuracy": private - 0.1,
                 "meme_accuracy": 0.5,
                 "central_meme_accuracy": meme - 0.1} for b in up]
        recs[-1].update(local_accuracy=private, central_meme_accuracy=meme)
        return {"seed": seed, "config": {"compression": mode, **cfg}, "records": recs}

    modes = {"none": [run(0, "none", [100, 100], 0.90, 0.80),
                      run(1, "none", [100, 100], 0.92, 0.70)],
             "topk": [run(0, "topk", [12, 8], 0.895, 0.78, **{"compression-ratio": 0.05}),
                      run(1, "topk", [10, 10], 0.925, 0.66, **{"compression-ratio": 0.05})],
             "int8": [run(1, "int8", [25, 25], 0.91, 0.71),
                      run(2, "int8", [25, 25], 0.5, 0.5, **{"compression-down": "fp16"})]}
    rows = summarise(modes)
    # by falling bytes; the label of the first run names the mode (and a compressed downlink)
    assert [r["mode"] for r in rows] == ["none", "int8", "topk 5 %"]
    assert summarise({"x": modes["int8"][1:]})[0]["mode"] == "int8, fp16 down"
    none, int8, topk = rows
    assert topk["bytes_up"] == 10 and topk["factor"] == pytest.approx(10.0)
    assert topk["d_private"] == pytest.approx(100 * ((0.895 - 0.90) + (0.925 - 0.92)) / 2)
    assert topk["d_meme"] == pytest.approx(100 * ((0.78 - 0.80) + (0.66 - 0.70)) / 2)
    # int8 shares only seed 1 with none: compared there alone
    assert int8["factor"] == pytest.approx(4.0) and int8["seeds"] == [1, 2]
    assert int8["d_private"] == pytest.approx(-1.0) and int8["d_meme"] == pytest.approx(1.0)
    assert none["d_private"] == 0 and none["factor"] == 1
    text = table(rows)
    assert ("| topk 5 % | 0,1 | 0.00 | 10.0x | 3.00 | 91.00 ± 2.12 | +0.00 | 72.00 ± 8.49 | "
            "-3.00 |") in text
    plot(rows, tmp_path / "c.png")
    assert mpimg.imread(tmp_path / "c.png").shape[0] > 200


def test_a_fresh_start_sets_aside_state_left_by_an_attempt_without_checkpoint(tmp_path):
    """Killed during round 1: state files exist, no checkpoint. The restart must not meet
    them (clients refuse state newer than the server's round), and they are kept aside."""
    from simulations.grid import set_aside_unfinished_state

    job = Job("p", "fml", 2, tmp_path)
    assert set_aside_unfinished_state(job) is None  # nothing there: nothing to do
    job.state_dir.mkdir(parents=True)
    (job.state_dir / "private-0.pt").write_bytes(b"round 1 of a killed attempt")
    aside = set_aside_unfinished_state(job)
    assert not job.state_dir.exists()
    assert (aside / "private-0.pt").read_bytes() == b"round 1 of a killed attempt"
    job.state_dir.mkdir()
    (job.state_dir / "private-1.pt").write_bytes(b"a second killed attempt")
    assert set_aside_unfinished_state(job) == aside  # the older leftover is replaced
    assert sorted(p.name for p in aside.iterdir()) == ["private-1.pt"]


def _fake_run(root, preset, name, seed, personal, central=None, algorithm=None):
    """A finished 2-round run folder whose last round has these accuracies."""
    run = root / preset / f"{name}-seed{seed}"
    run.mkdir(parents=True)
    algo = algorithm or name
    key = "meme_accuracy" if algo == "fedavg" else "local_accuracy"
    rows = [{"round": 1, key: 0.1, "central_meme_accuracy": 0.1},
            {"round": 2, key: personal, "central_meme_accuracy": central}]
    (run / "metrics.json").write_text(json.dumps(rows))
    # as today's run of the algorithm records it (an `fml` of other keys reads as fml-paper)
    config = load_config({"num-server-rounds": 2, "algorithm": algo}).to_dict()
    (run / "config.json").write_text(json.dumps(config))


def test_payoff_map_pairs_gains_by_seed_and_judges_the_targets(tmp_path, capsys):
    from simulations.payoff_map import main

    scarce, control = "payoff-fmnist-100-dir0.5", "leaderboard-fmnist-dir0.1"
    for seed, (loc, fml, ft, central) in enumerate([(0.80, 0.865, 0.85, 0.74),
                                                   (0.82, 0.86, 0.87, 0.755)]):
        _fake_run(tmp_path, scarce, "local", seed, loc)
        _fake_run(tmp_path, scarce, "fml-mix", seed, fml, central=0.75, algorithm="fml")
        _fake_run(tmp_path, scarce, "fedavg-ft", seed, ft, central=0.74)
        _fake_run(tmp_path, scarce, "fedavg", seed, 0.7, central=central)
    _fake_run(tmp_path, control, "local", 0, 0.95)
    _fake_run(tmp_path, control, "fml-mix", 0, 0.9481, central=0.8, algorithm="fml")
    _fake_run(tmp_path, control, "fedavg-ft", 0, 0.96, central=0.81)  # no fedavg run here
    main([str(tmp_path), "--fml", "fml-mix"])
    out = capsys.readouterr().out
    md = (tmp_path / "map" / "map.md").read_text()
    rows = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in md.splitlines()
            if ln.startswith("| payoff") or ln.startswith("| leaderboard")}
    # fml-mix's gains over local are 6.5 and 4 points: 5.25 ± 1.77; fedavg-ft's 5 and 5
    assert rows[(scarce, "fml-mix")].split("|")[5].strip() == "+5.25 ± 1.77"
    assert rows[(scarce, "fedavg-ft")].split("|")[5].strip() == "+5.00 ± 0.00"
    assert rows[(control, "fml-mix")].split("|")[5].strip() == "-0.19"
    # at a glance, by hand: local 80, 82; FT 85, 87; fml-mix 86.5, 86 (over FT +1.5, -1);
    # central 75, 75 against FedAvg's 74, 75.5; the control on seed 0, FT's model as FedAvg's
    assert (f"| {scarce} | 2 | 81.00 ± 1.41 | 86.00 ± 1.41 | 86.25 ± 0.35 | +5.25 ± 1.77 | "
            "+0.25 ± 1.77 | 75.00 ± 0.00 / 74.75 ± 1.06 |") in md
    assert f"| {control} | 1 | 95.00 | 96.00 | 94.81 | -0.19 | -1.19 | 80.00 / 81.00 |" in md
    # means: fml-mix 86.25 >= local 81 + 5 and >= fedavg-ft 86
    assert f"{scarce}: fml-mix >= local + 5 points: met (2 seeds of the 3 asked)" in out
    assert f"{scarce}: fml-mix >= fedavg-ft: met" in out
    assert f"| {scarce} | fml-mix >= fedavg-ft | met (2 seeds of the 3 asked) |" in md
    # central: fml's meme 0.75 against fedavg's mean of 0.74 and 0.755
    assert f"{scarce}: fml-mix's meme >= fedavg's global model (central): met" in out
    assert f"{control}: fml-mix >= local - 0.2 points: met (1 seed of the 3 asked)" in out
    # FedAvg+FT's global model (0.81) stands in for FedAvg's: 0.80 falls short
    assert f"{control}: fml-mix's meme >= fedavg's global model (central): NOT met" in out
    assert (tmp_path / "map" / "map.png").exists()
    _fake_run(tmp_path, scarce, "fedavg3-ft", 0, 0.86, central=0.76, algorithm="fedavg-ft")
    main([str(tmp_path), "--fml", "fml-mix"])
    out = capsys.readouterr().out
    # fair baseline, seed 0 only: fml-mix 0.865 >= 0.86, its meme 0.75 < 0.76
    assert f"{scarce}: fml-mix >= fedavg3-ft (fair baseline): met" in out
    assert (f"{scarce}: fml-mix's meme >= fedavg3-ft's global model (central; fair "
            "baseline): NOT met") in out
    assert "fedavg-ft (fair baseline)" not in out  # the plain one is a target, not this
    _fake_run(tmp_path, scarce, "local", 2, 0.81)  # a third seed: 86.5 against 81 + 5
    _fake_run(tmp_path, scarce, "fml-mix", 2, 0.87, central=0.75, algorithm="fml")
    main([str(tmp_path), "--fml", "fml-mix"])
    out = capsys.readouterr().out
    assert f"{scarce}: fml-mix >= local + 5 points: met (3 seeds)\n" in out
    # FedAvg+FT and FedAvg have no seed 2: their columns say so, the gain over FedAvg+FT
    # and the central pair keep to seeds 0-1
    assert (f"| {scarce} | 3 | 81.00 ± 1.00 | 86.00 ± 1.41 (2 of 3) | 86.50 ± 0.50 | "
            "+5.50 ± 1.32 | +0.25 ± 1.77 (2 of 3) | 75.00 ± 0.00 / 74.75 ± 1.06 (2 of 3) |"
            ) in out
    _fake_run(tmp_path, scarce, "local", 3, 0.10)  # a seed FML lacks: not in its row
    main([str(tmp_path), "--fml", "fml-mix"])
    assert f"| {scarce} | 3 | 81.00 ± 1.00 | 86.00 ± 1.41 (2 of 3) |" in capsys.readouterr().out
    assert f"{scarce}: fml-mix >= fedavg-ft: met (2 seeds of the 3 asked)" in out
    _fake_run(tmp_path, control, "fml", 0, 0.94, central=0.8)  # a point behind local
    main([str(tmp_path), "--fml", "fml"])
    out = capsys.readouterr().out
    assert f"{control}: fml >= local - 0.2 points: NOT met" in out
    assert f"{scarce}: fml" not in out  # no fml run there: nothing judged


@pytest.mark.parametrize(("overrides", "label"), [
    ({"algorithm": "fml"}, "private + tuned meme"),  # today's default: personal-model mix
    ({"algorithm": "fml", "personal-model": "tuned"}, "tuned meme"),
    ({"algorithm": "fml", "personal-model": "private"}, "private model"),
    ({"algorithm": "fml", "personal-model": "private", "personal-mix": True}, "mixture"),
    ({"algorithm": "fedavg-ft"}, "fine-tuned model"),
    ({"algorithm": "fedavg"}, "global model"),
    ({"algorithm": "local"}, "private model"),
])
def test_the_legend_names_the_model_each_run_is_judged_by(overrides, label):
    """An `fml` run's local_accuracy is its personal-model's prediction, not necessarily the
    private model's; the plots' legend says which."""
    from simulations.runs import personal_label

    config = load_config(overrides).to_dict()
    assert personal_label(overrides["algorithm"], {"config": config}) == label


def test_an_fml_record_older_than_personal_model_is_labelled_by_its_private_model():
    from simulations.runs import personal_label

    assert personal_label("fml", {"config": {"algorithm": "fml"}}) == "private model"


def test_payoff_targets_count_a_gain_of_exactly_the_margin_as_met(tmp_path, capsys):
    """0.86 >= 0.81 + 0.05 is False in floating point; five points are five points."""
    from simulations.payoff_map import main

    scarce = "payoff-fmnist-100-dir0.5"
    _fake_run(tmp_path, scarce, "local", 0, 0.81)
    _fake_run(tmp_path, scarce, "fml-mix", 0, 0.86, central=0.8, algorithm="fml")
    _fake_run(tmp_path, scarce, "fedavg-ft", 0, 0.86, central=0.8)
    main([str(tmp_path), "--fml", "fml-mix"])
    out = capsys.readouterr().out
    assert f"{scarce}: fml-mix >= local + 5 points: met (1 seed of the 3 asked)" in out
    assert f"{scarce}: fml-mix >= fedavg-ft: met" in out
    _fake_run(tmp_path, scarce, "fedavg", 0, 0.7, central=0.8001)
    main([str(tmp_path), "--fml", "fml-mix"])  # a hundredth of a point short is short
    assert (f"{scarce}: fml-mix's meme >= fedavg's global model (central): NOT met"
            in capsys.readouterr().out)


def test_payoff_ranking_weighs_presets_once_and_refuses_a_loss_or_a_gap(tmp_path, capsys):
    from simulations.payoff_map import main

    scarce, control = "payoff-fmnist-100-dir0.5", "leaderboard-fmnist-dir0.1"
    for seed, loc in enumerate([0.80, 0.82]):
        _fake_run(tmp_path, scarce, "local", seed, loc)
        _fake_run(tmp_path, scarce, "fml-a", seed, 0.86, algorithm="fml")  # +6, +4
    _fake_run(tmp_path, scarce, "fml-b", 0, 0.90, algorithm="fml")  # +10
    _fake_run(tmp_path, scarce, "fml-c", 0, 0.84, algorithm="fml")  # +4, no control run
    _fake_run(tmp_path, scarce, "fml-d", 0, 0.799, algorithm="fml")  # -0.1 where data is scarce
    _fake_run(tmp_path, scarce, "fedavg-ft", 0, 0.95)  # not FML: never the default,
    _fake_run(tmp_path, control, "fedavg-ft", 0, 0.96)  # though it gains most everywhere
    _fake_run(tmp_path, control, "local", 0, 0.95)
    _fake_run(tmp_path, control, "fml-a", 0, 0.949, algorithm="fml")  # -0.1: within 0.2
    _fake_run(tmp_path, control, "fml-b", 0, 0.945, algorithm="fml")  # -0.5: a loss
    _fake_run(tmp_path, control, "fml-d", 0, 0.95, algorithm="fml")  # level
    main([str(tmp_path)])
    out = capsys.readouterr().out
    ranked = [ln.split("|")[1:-1] for ln in
              (tmp_path / "map" / "map.md").read_text().split("across presets:")[1]
              .split("The targets")[0].splitlines() if ln.startswith("| ")][1:]  # below the header
    # columns: configuration, control's gain, scarce's gain, mean, seeds, verdict
    assert [[c.strip() for c in r] for r in ranked] == [
        ["fml-a", "-0.10", "+5.00", "+2.45", "3", "eligible"],  # (5 - 0.1) / 2
        ["fml-b", "-0.50", "+10.00", "+4.75", "2", f"loses on {control}"],
        ["fml-c", "–", "+4.00", "+4.00", "1", "not measured on 1 preset(s)"],
        ["fml-d", "+0.00", "-0.10", "-0.05", "2", f"loses on {scarce}"],
    ]
    assert "default by the map: fml-a (+2.45 points, mean over presets)" in out


def test_dml_pairs_its_runs_and_resumes(tmp_path, capsys):
    """Mutual and independent training start from the same weights and see the same
    batches: with α = 1 (no KL) they end identical, model by model; with the default α
    they differ. A second call finds its cells done and only rewrites the report."""
    from simulations.dml import main

    main(["--models", "mlp,mlp", "--sizes", "120", "--seeds", "0", "--steps", "12",
          "--alpha", "1.0", "--out", str(tmp_path)])
    cell = json.loads((tmp_path / "mlp-mlp-alpha1.0" / "results.json").read_text())[0]
    assert cell["size"] == 120 and cell["epochs"] == 3  # 12 steps of batch 32 on 120
    assert cell["mutual"]["accuracy"] == cell["independent"]["accuracy"]
    main(["--models", "mlp,mlp", "--sizes", "120", "--seeds", "0", "--steps", "12",
          "--out", str(tmp_path)])
    cell = json.loads((tmp_path / "mlp-mlp" / "results.json").read_text())[0]
    assert cell["mutual"]["accuracy"] != cell["independent"]["accuracy"]
    capsys.readouterr()
    main(["--models", "mlp,mlp", "--sizes", "120", "--seeds", "0", "--steps", "12",
          "--out", str(tmp_path)])
    assert "size" not in capsys.readouterr().out.split("|")[0]  # nothing trained again
    assert "| 120 | 3 | 1 |" in (tmp_path / "mlp-mlp" / "report.md").read_text()
    assert (tmp_path / "mlp-mlp" / "dml.png").exists()
    with pytest.raises(SystemExit):
        main(["--models", "cnn", "--out", str(tmp_path)])  # one model is no study


def test_peer_table_reports_each_private_peer_and_their_mean():
    """K = 3 over two seeds: each peer's column is its own mean ± std over the seeds
    (hand-computed), runs without peers get no row, and no peers at all means no table."""
    from simulations.report import peer_table

    def run(seed, local, p2, p3, mean):
        last = {"round": 2, "local_accuracy": local, "peers_accuracy": mean,
                "peer_accuracies": {"peer-2": p2, "peer-3": p3}}
        return {"seed": seed, "config": {"algorithm": "fml"},
                "records": [{"round": 1, "peer_accuracies": None}, last]}

    plain = {"seed": 0, "config": {"algorithm": "fml"},
             "records": [{"round": 1, "local_accuracy": 0.5, "peer_accuracies": None}]}
    runs = {"p": {"fml-k3": [run(0, 0.80, 0.70, 0.60, 0.85), run(1, 0.82, 0.74, 0.60, 0.87)],
                  "fml": [plain]}}
    rows = [ln for ln in peer_table(runs).splitlines() if ln.startswith("| p ")]
    # local 81 ± 1.41, peer-2 72 ± 2.83, peer-3 60 ± 0, mean 86 ± 1.41
    assert rows == ["| p | fml-k3 | 2 | 81.00 ± 1.41 / 72.00 ± 2.83 / 60.00 ± 0.00 | "
                    "86.00 ± 1.41 |"]
    assert peer_table({"p": {"fml": [plain]}}) == ""


@pytest.mark.e2e
def test_blend_rebuilds_what_each_client_scored(tmp_path, simlink):
    """The offline rebuild of a finished FML run (held-out slice and all): its w = 0 and
    w = 1 are the tuned meme and the private model each real client scored."""
    from simulations.blend import GRID, check, rebuild

    run_grid(["digits-quick"], ["fml-mix-meme2"], [0], tmp_path)
    run = Job("digits-quick", "fml-mix-meme2", 0, tmp_path).run_dir
    rows = rebuild(run)
    recorded = json.loads((run / "clients.json").read_text())[-1]["clients"]
    assert sorted(r["key"] for r in rows) == sorted(c["key"] for c in recorded)
    assert any(r["tuned"] != r["private"] for r in rows)  # w matters: not vacuous
    assert check(rows) < 1e-6
    assert all(len(r["accs"]) == len(GRID) for r in rows)


def test_blend_table_against_hand_computed_means():
    from simulations.blend import table

    accs_a = [0.5] * 5 + [0.6] * 6  # gains from w = 0.5 on
    accs_b = [0.9] * 3 + [0.8] * 8  # loses from w = 0.3 on
    md = table([{"n": 1, "accs": accs_a}, {"n": 3, "accs": accs_b}])
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:6]]
            for ln in md.splitlines()[2:]}
    assert rows["0.0"] == ["70.00", "80.00", "+0.00", "0 / 0"]
    assert rows["0.3"] == ["65.00", "72.50", "-5.00", "0 / 1"]  # (0.5 + 0.8) / 2; (0.5 + 2.4) / 4
    assert rows["1.0"] == ["70.00", "75.00", "+0.00", "1 / 1"]  # (0.6 + 0.8) / 2; (0.6 + 2.4) / 4


@pytest.mark.parametrize("files, config, names", [
    (("config.json", "clients.json"), {"algorithm": "fml", "personal-model": "tuned"},
     "no checkpoint.pt"),  # committed results keep only the JSON
    (("config.json", "clients.json", "checkpoint.pt"), {"algorithm": "fml"},
     "personal-model 'private'"),  # its clients never scored a tuned meme
    (("config.json", "clients.json", "checkpoint.pt"),
     {"algorithm": "fml", "personal-model": "mix", "fraction-evaluate": 0.5},
     "fraction-evaluate = 0.5"),
])
def test_blend_refuses_a_run_it_cannot_rebuild_naming_why(tmp_path, files, config, names):
    from simulations.blend import rebuild

    for f in files:
        (tmp_path / f).write_text(json.dumps(config) if f == "config.json" else "[]")
    with pytest.raises(SystemExit, match=names):
        rebuild(tmp_path)
