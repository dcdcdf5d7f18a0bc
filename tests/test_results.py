"""Run records on disk: metrics.json and the TensorBoard event files beside it."""

from __future__ import annotations

import json

import pytest

from common.config import load_config
from server.results import RunLog


def test_each_closed_round_is_in_metrics_json_and_in_a_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config({"output-dir": str(tmp_path), "run-name": "run"})
    log = RunLog.create(cfg)
    for rnd, (acc, loss) in enumerate([(0.25, 2.0), (0.75, 0.5)], start=1):
        log.begin_round(rnd)
        log.set(local_accuracy=acc, train_loss_local=loss, dp_epsilon=None)
        log.add("bytes_up", 1000 * rnd)
        log.end_round()
    log.tensorboard.close()

    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["local_accuracy"] for r in saved] == [0.25, 0.75]
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "dp_epsilon" not in tags and "skipped" not in tags and "round" not in tags
    acc = [(e.step, e.value) for e in events.Scalars("local_accuracy")]
    assert acc == [(1, 0.25), (2, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("bytes_up")] == [(1, 1000.0), (2, 2000.0)]
    assert [e.value for e in events.Scalars("train_loss_local")] == [2.0, 0.5]
