"""Per-algorithm defaults (``auto``): what FML's keys mean when a run leaves them alone,
and that no recorded run is counted under a default it did not run with."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

from common.config import ConfigError, load_config
from server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from simulations.grid import VARIANTS, Job, load_preset, run_grid


def _variant(name: str) -> dict:
    return tomllib.loads((VARIANTS / f"{name}.toml").read_text())


def test_auto_takes_each_algorithms_own_default():
    fml = load_config({})
    assert (fml.personal_model.value, fml.meme_epochs) == ("mix", 2)
    for algorithm in ("fedavg", "fedavg-ft", "ditto", "local", "fedprox", "codistill"):
        cfg = load_config({"algorithm": algorithm})
        assert (cfg.personal_model.value, cfg.meme_epochs) == ("private", 0), algorithm
    # "mix" needs one private model and no learnt mixture: FML then predicts with the
    # private model, and the meme still trains its two extra epochs
    for keys in ({"private-peers": 2}, {"personal-mix": True}):
        cfg = load_config(keys)
        assert (cfg.personal_model.value, cfg.meme_epochs) == ("private", 2), keys
    # what a run sets wins, and the record says what ran, never "auto"
    cfg = load_config({"personal-model": "tuned", "meme-epochs": 0})
    assert (cfg.personal_model.value, cfg.meme_epochs) == ("tuned", 0)
    recorded = load_config({"algorithm": "fedavg"}).to_dict()
    assert (recorded["personal-model"], recorded["meme-epochs"]) == ("private", 0)


def test_the_default_fml_is_the_variant_the_payoff_map_measured():
    """The map's cells are named by their variant; ``fml`` alone must run the same config,
    or the results the default is chosen by would describe another configuration."""
    chosen = load_config(_variant("fml-mix-meme2"))
    assert load_config({"algorithm": "fml"}) == chosen
    paper = load_config(_variant("fml-paper"))
    assert (paper.personal_model.value, paper.meme_epochs) == ("private", 0)


def test_auto_is_refused_where_a_key_does_not_take_it_and_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="'meme-epochs' = 'two'.*'auto' or an integer"):
        load_config({"meme-epochs": "two"})
    with pytest.raises(ConfigError, match="'personal-model' = 'best'.*'auto' or one of"):
        load_config({"personal-model": "best"})
    with pytest.raises(ConfigError, match="'local-epochs' = 'auto'"):
        load_config({"local-epochs": "auto"})
    # the cross-key rules still hold for what is set outright
    with pytest.raises(ConfigError, match="'meme-epochs' = 2.*'fedavg'"):
        load_config({"algorithm": "fedavg", "meme-epochs": 2})
    with pytest.raises(ConfigError, match="'personal-model' = 'mix'"):
        load_config({"personal-model": "mix", "private-peers": 2})


def _checkpoint_without_the_auto_keys(tmp_path, cfg):
    """A checkpoint as a run wrote it before ``personal-model`` and ``meme-epochs`` existed."""
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, [{"round": 1}], cfg, {})
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    old = json.loads(raw["config_json"])
    del old["personal-model"], old["meme-epochs"]
    raw["config_json"] = json.dumps(old)
    torch.save(raw, tmp_path / "checkpoint.pt")


def test_an_old_checkpoint_resumes_as_what_it_ran_not_as_todays_default(tmp_path):
    paper = load_config({**_variant("fml-paper"), "dataset": "digits"})
    _checkpoint_without_the_auto_keys(tmp_path, paper)
    assert load_checkpoint(tmp_path, paper).round == 1
    with pytest.raises(CheckpointError, match="'meme-epochs': checkpoint 0, now 2.*"
                                              "'personal-model': checkpoint 'private', now 'mix'"):
        load_checkpoint(tmp_path, load_config({"dataset": "digits"}))
    fedavg = load_config({"algorithm": "fedavg", "dataset": "digits"})
    _checkpoint_without_the_auto_keys(tmp_path, fedavg)
    assert load_checkpoint(tmp_path, fedavg).round == 1


@pytest.mark.e2e  # its last call starts a real SuperLink (which has nothing to run)
@pytest.mark.parametrize("recorded_as", ["paper-keys", "before-the-keys"])
def test_the_grid_refuses_a_folder_whose_run_had_another_config(tmp_path, capsys,
                                                                 recorded_as):
    """A finished ``fml`` cell recorded with the paper's keys (or before they existed) must
    not be skipped as done under today's ``fml``: the grid stops before running anything,
    naming the folder and exactly the keys that differ."""
    preset, _ = load_preset("digits-quick")
    job = Job("digits-quick", "fml", 0, tmp_path)
    job.run_dir.mkdir(parents=True)
    where = {"output-dir": str(tmp_path / "digits-quick"), "run-name": job.run_dir.name,
             "seed": 0}
    ran = load_config({**preset, **where, **_variant("fml-paper")}).to_dict()
    if recorded_as == "before-the-keys":
        del ran["personal-model"], ran["meme-epochs"]
    (job.run_dir / "config.json").write_text(json.dumps(ran))
    (job.run_dir / "metrics.json").write_text(json.dumps([{"round": r} for r in (1, 2, 3)]))
    with pytest.raises(SystemExit) as stop:
        run_grid(["digits-quick"], ["local", "fml"], [0], tmp_path)
    message = str(stop.value)
    assert message.splitlines()[1:] == [
        f"  {job.run_dir}: 'meme-epochs': recorded 0, now 2, 'personal-model': recorded "
        "'private', now 'mix'"]
    assert not Job("digits-quick", "local", 0, tmp_path).run_dir.exists()  # nothing ran
    # recorded as the grid runs it now: done, skipped
    now = load_config({**preset, **where})
    (job.run_dir / "config.json").write_text(json.dumps(now.to_dict()))
    run_grid(["digits-quick"], ["fml"], [0], tmp_path)
    assert "done, skipped" in capsys.readouterr().out


def test_reports_name_an_fml_run_by_what_it_ran(tmp_path):
    """Runs recorded as ``fml`` before the switch (their config.json may lack the keys, or
    hold the paper's values) are reported as ``fml-paper``; today's ``fml`` stays ``fml``."""
    from simulations.runs import load_runs

    configs = {"old": {"algorithm": "fml", "num-server-rounds": 1},
               "paper": load_config({**_variant("fml-paper"), "num-server-rounds": 1}).to_dict(),
               "now": load_config({"num-server-rounds": 1}).to_dict(),
               "fedavg": load_config({"algorithm": "fedavg", "num-server-rounds": 1}).to_dict()}
    for preset, config in configs.items():
        run = tmp_path / preset / f"{config['algorithm']}-seed0"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(config))
        (run / "metrics.json").write_text(json.dumps([{"round": 1}]))
    runs = load_runs(tmp_path)
    assert {preset: sorted(algos) for preset, algos in runs.items()} == {
        "old": ["fml-paper"], "paper": ["fml-paper"], "now": ["fml"], "fedavg": ["fedavg"]}
