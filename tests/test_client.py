"""The ClientApp driven through its real handlers with real Messages and Contexts."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

from client import app as client_app
from client import private
from client.mods import fault_mod
from client.secure import legacy_mod
from common.models import TaskSpec, build_model
from common.records import to_record
from tests.conftest import make_context, make_message, task_config

RUN = {"dataset": "digits", "meme-model": "mlp", "local-model": "cnn", "batch-size": 16}
SPEC = TaskSpec(1, 8, 10)


def _stored(ctx):
    """The private weights the node keeps, wherever ``private-store`` keeps them."""
    cfg = client_app.load_config(ctx.run_config)
    return private.stored_model(ctx, cfg, private.node_info(cfg, ctx))


def _train_message(meme_state, server_round=1):
    return make_message(RecordDict({"arrays": to_record(meme_state),
                                    "config": task_config(1, 8, 10, server_round)}))


def _meme_state(seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", SPEC).state_dict()


def test_reply_is_only_the_meme_and_metrics():
    ctx = make_context(RUN)
    meme = _meme_state()
    reply = client_app.train(_train_message(meme), ctx)
    content = reply.content
    assert list(content.array_records) == ["arrays"]
    assert not content.config_records
    arrays = content["arrays"]
    assert list(arrays.keys()) == list(meme.keys())
    for k, v in meme.items():
        assert arrays[k].numpy().shape == tuple(v.shape)
    metrics = content["metrics"]
    assert set(metrics) == {"num-examples", "skipped-steps", "train-loss-local", "train-acc-local",
                            "train-loss-meme", "train-acc-meme"}
    assert all(isinstance(v, int | float) for v in metrics.values())
    # no private tensor leaves: compare every reply array with every private tensor
    private_state = _stored(ctx)
    assert private_state is not None
    for sent in arrays.values():
        for kept in private_state.values():
            a, b = sent.numpy(), kept
            assert not (a.shape == b.shape and np.array_equal(a, b))


def test_second_round_starts_from_stored_private_model():
    ctx = make_context(RUN)
    client_app.train(_train_message(_meme_state()), ctx)
    after_first = {k: v.copy() for k, v in _stored(ctx).items()}
    restored = private.restore(ctx, client_app.load_config(RUN), private.node_info(
        client_app.load_config(RUN), ctx), SPEC, torch.device("cpu"))
    for k, v in restored.model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), after_first[k])
    # momentum buffers were kept too
    assert restored.optimizer.state_dict()["state"]
    client_app.train(_train_message(_meme_state(), server_round=2), ctx)
    assert int(ctx.state.config_records["private-meta"]["node-round"]) == 2
    fresh = private.restore(make_context(RUN), client_app.load_config(RUN), private.node_info(
        client_app.load_config(RUN), ctx), SPEC, torch.device("cpu"))
    second = _stored(ctx)
    # round 2 continued from round 1's weights, not from a fresh initialisation
    diffs_from_first = sum(np.abs(second[k] - after_first[k]).sum() for k in after_first)
    diffs_from_fresh = sum(np.abs(second[k] - v.numpy()).sum()
                           for k, v in fresh.model.state_dict().items())
    assert diffs_from_first < diffs_from_fresh


@pytest.mark.parametrize(("keys", "scored"), [
    ({"personal-model": "private"}, ("local", "meme")),
    # the default FML's personalised model is the mixture: both of its parts scored beside
    ({}, ("local", "meme", "private", "tuned")),
])
def test_evaluate_reports_both_models(keys, scored):
    ctx = make_context({**RUN, **keys})
    client_app.train(_train_message(_meme_state()), ctx)
    msg = make_message(RecordDict({"arrays": to_record(_meme_state()),
                                   "config": task_config(1, 8, 10)}), MessageType.EVALUATE)
    metrics = client_app.evaluate_both(msg, ctx).content["metrics"]
    assert set(metrics) == {"num-examples", *(f"{m}-{s}" for m in scored
                                              for s in ("loss", "accuracy"))}
    assert 0 <= metrics["local-accuracy"] <= 1 and metrics["num-examples"] > 0


def test_fedavg_and_local_send_what_they_train():
    ctx = make_context({**RUN, "algorithm": "fedavg"})
    reply = client_app.train(_train_message(_meme_state()), ctx)
    assert "train-acc-local" not in reply.content["metrics"]
    assert _stored(ctx) is None
    ctx = make_context({**RUN, "algorithm": "local"})
    msg = make_message(RecordDict({"arrays": ArrayRecord(), "config": task_config(1, 8, 10)}))
    reply = client_app.train(msg, ctx)
    assert len(reply.content["arrays"]) == 0
    assert "train-acc-meme" not in reply.content["metrics"]


def test_meme_of_wrong_architecture_is_refused():
    ctx = make_context(RUN)
    torch.manual_seed(0)
    wrong = build_model("cnn", SPEC).state_dict()
    with pytest.raises(ValueError, match="keys differ"):
        client_app.train(_train_message(wrong), ctx)


def test_identify_reports_partition():
    ctx = make_context(RUN, partition_id=2)
    msg = make_message(RecordDict({"config": ConfigRecord()}), MessageType.QUERY)
    assert client_app.identify(msg, ctx).content["metrics"]["client-key"] == 2


def test_secure_aggregation_sums_only_the_floating_arrays_of_a_batchnorm_meme():
    """SecAgg+ with a BatchNorm meme: the integer num_batches_tracked counters stay out of
    the masked vector (they failed the clipping-range check after 9 batches); the running
    statistics, as data-dependent as the weights, are in it."""
    from flwr.compat.common import recorddict_compat as compat
    from flwr.compat.common.parameter import parameters_to_ndarrays
    from flwr.compat.common.typing import FitIns

    run = {**RUN, "meme-model": "cnn-bn", "secure-aggregation": True, "batch-size": 8}
    torch.manual_seed(0)
    meme = build_model("cnn-bn", SPEC).state_dict()
    floats = [k for k, v in meme.items() if v.dtype == torch.float32]
    counters = [k for k in meme if k.endswith("num_batches_tracked")]
    assert len(counters) == 2 and len(floats) == len(meme) - 2
    params = compat.arrayrecord_to_parameters(
        ArrayRecord({str(i): to_record(meme)[k] for i, k in enumerate(floats)}), keep_input=True)
    msg = make_message(compat.fitins_to_recorddict(
        FitIns(params, dict(task_config(1, 8, 10))), keep_input=True))
    ctx = make_context(run)
    reply = compat.recorddict_to_fitres(legacy_mod(msg, ctx, client_app.train).content,
                                        keep_input=True)
    sent = parameters_to_ndarrays(reply.parameters)
    assert [a.shape for a in sent] == [tuple(meme[k].shape) for k in floats]
    assert all(a.dtype == np.float32 for a in sent)
    # trained: the running statistics moved away from BatchNorm's (0, 1) start
    running_var = sent[floats.index("0.1.running_var")]
    assert not np.allclose(running_var, 1.0)
    assert reply.num_examples > 9 * 8  # more than 9 batches: the old check failed here


def _private_after(run: dict, rounds: int) -> list[dict[str, np.ndarray]]:
    ctx = make_context(run)
    out = []
    for r in range(1, rounds + 1):
        client_app.train(_train_message(_meme_state(), server_round=r), ctx)
        out.append({k: v.copy() for k, v in _stored(ctx).items()})
    return out


def test_warmup_rounds_train_the_private_model_on_labels_only():
    """warmup-rounds=1: the first training equals α = 1 (labels only), bit for bit; the
    second distils again, and then differs from α = 1."""
    warm = _private_after({**RUN, "alpha": 0.5, "warmup-rounds": 1}, 2)
    labels_only = _private_after({**RUN, "alpha": 1.0}, 2)
    distilling = _private_after({**RUN, "alpha": 0.5}, 1)
    assert all(np.array_equal(warm[0][k], labels_only[0][k]) for k in warm[0])
    assert not all(np.array_equal(warm[0][k], distilling[0][k]) for k in warm[0])
    assert not all(np.array_equal(warm[1][k], labels_only[1][k]) for k in warm[1])


def test_precision_bf16_reaches_the_clients_training():
    """precision="bf16" through the real handler: the private model (float32) lands near,
    but not on, the float32 run's."""
    bf16 = _private_after({**RUN, "precision": "bf16"}, 1)[0]
    fp32 = _private_after(RUN, 1)[0]
    assert all(bf16[k].dtype == np.float32 for k in bf16)
    diff = max(float(np.abs(bf16[k] - fp32[k]).max()) for k in fp32)
    assert 1e-5 < diff < 0.05


def test_personal_mix_learns_a_weight_keeps_it_and_scores_the_mixture():
    run = {**RUN, "algorithm": "fml", "personal-mix": True}
    ctx = make_context(run)
    first = client_app.train(_train_message(_meme_state()), ctx).content["metrics"]
    w1 = first["mix-weight"]
    assert 0.0 <= w1 <= 1.0 and w1 != 0.5  # it learned from 0.5
    assert ctx.state.config_records["private-meta"]["mix"] == w1  # kept with the model
    second = client_app.train(_train_message(_meme_state(), 2), ctx).content["metrics"]
    assert second["mix-weight"] != w1  # went on from w1, not from 0.5 again
    msg = make_message(RecordDict({"arrays": to_record(_meme_state()),
                                   "config": task_config(1, 8, 10, 2)}), MessageType.EVALUATE)
    metrics = client_app.evaluate_both(msg, ctx).content["metrics"]
    assert metrics["mix-weight"] == second["mix-weight"]
    assert 0.0 <= metrics["mix-accuracy"] <= 1.0 and metrics["mix-loss"] > 0
    from common.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'personal-mix' = true .* expected algorithm 'fml'"):
        load_config({**RUN, "algorithm": "fedavg", "personal-mix": True})


def test_fault_mod_poisons_breaks_or_raises_only_where_the_config_says():
    """scale100 sends global + 100·(trained − global), nan sends NaN, counters stay, and a
    fault for another partition or round leaves the reply untouched."""
    from flwr.app import Array, Message, MetricRecord

    received = {"w": np.ones(3, np.float32), "n": np.array(4, np.int64)}
    msg = make_message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in
                                                          received.items()}),
                                   "config": task_config(1, 8, 10, server_round=2)}))

    def handler(m, ctx):  # a client that trained w from 1.0 to 1.5
        return Message(RecordDict({"arrays": ArrayRecord({
            "w": Array(np.full(3, 1.5, np.float32)), "n": Array(np.array(9, np.int64))}),
            "metrics": MetricRecord({"num-examples": 5})}), reply_to=m)

    def sent(faults, partition_id=1):
        out = fault_mod(msg, make_context({"faults": faults}, partition_id=partition_id),
                        handler)
        return {k: a.numpy() for k, a in out.content["arrays"].items()}

    scaled = sent("scale100:1@2")
    np.testing.assert_allclose(scaled["w"], np.full(3, 51.0))  # 1 + 100 * 0.5
    assert scaled["w"].dtype == np.float32 and int(scaled["n"]) == 9
    assert np.isnan(sent("nan:1")["w"]).all() and int(sent("nan:1")["n"]) == 9
    np.testing.assert_array_equal(sent("nan:0")["w"], np.full(3, 1.5))  # another client
    np.testing.assert_array_equal(sent("nan:1@3")["w"], np.full(3, 1.5))  # another round
    with pytest.raises(RuntimeError, match="client 1 raises in round 2"):
        sent("raise:1@2")


def test_a_held_out_validation_slice_never_trains():
    """personal-model = "choice": the train reply counts the training split less the
    slice held out (round(10 %)); with the private model it counts all of it."""
    from common.config import load_config
    from common.data import load_client_data

    n = len(load_client_data(load_config(RUN), 0, 3).y_train)
    counts = {}
    for mode in ("private", "choice"):
        ctx = make_context({**RUN, "personal-model": mode})
        reply = client_app.train(_train_message(_meme_state()), ctx)
        counts[mode] = reply.content["metrics"]["num-examples"]
    assert counts == {"private": n, "choice": n - round(0.1 * n)}


def test_private_init_meme_starts_the_private_model_as_the_first_meme_only():
    # α = β = 1: no distillation, so a private model that starts as the meme trains exactly
    # like it on the same batches and ends equal to the meme the client sends up
    # no SGD momentum: the private optimizer's round-1 buffers would tell a re-warmed
    # private model apart from the fresh meme's anyway
    run = {**RUN, "local-model": "mlp", "alpha": 1.0, "beta": 1.0, "private-init": "meme",
           "momentum": 0.0, "meme-epochs": 0}
    ctx = make_context(run)
    reply = client_app.train(_train_message(_meme_state(0)), ctx)
    kept = _stored(ctx)
    for k, sent in reply.content["arrays"].items():
        np.testing.assert_array_equal(kept[k], sent.numpy())
    # round 2 is not re-warmed: the private model continues from its own round-1 weights
    reply = client_app.train(_train_message(_meme_state(1), server_round=2), ctx)
    kept = _stored(ctx)
    assert any(not np.array_equal(kept[k], v.numpy())
               for k, v in reply.content["arrays"].items())
    # with private-init random (the default), the same run does not start from the meme
    ctx = make_context({**run, "private-init": "random"})
    reply = client_app.train(_train_message(_meme_state(0)), ctx)
    kept = _stored(ctx)
    assert any(not np.array_equal(kept[k], v.numpy())
               for k, v in reply.content["arrays"].items())


def test_private_init_meme_leaves_a_private_model_of_another_architecture_alone():
    run = {**RUN, "private-init": "meme"}  # a cnn private model, an mlp meme
    first = _private_after(run, 1)[0]
    plain = _private_after({**RUN}, 1)[0]
    assert first.keys() == plain.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], plain[k])


def test_meme_epochs_train_the_meme_alone_after_the_joint_epochs():
    # α = β = 1: both models learn from the labels only, so one joint epoch plus one meme
    # epoch must give the meme of two joint epochs (the same shuffles, the same optimizer)
    # and leave the private model at one epoch's. (How a model without an optimizer
    # teaches, frozen, is tests/test_codistill.py's.)
    run = {**RUN, "local-model": "mlp", "alpha": 1.0, "beta": 1.0, "private-init": "meme",
           "meme-epochs": 0}

    def sent_and_kept(**keys):
        ctx = make_context({**run, **keys})
        reply = client_app.train(_train_message(_meme_state(0)), ctx)
        return {k: v.numpy() for k, v in reply.content["arrays"].items()}, _stored(ctx)

    solo_meme, solo_private = sent_and_kept(**{"meme-epochs": 1})
    two_meme, _ = sent_and_kept(**{"local-epochs": 2})
    one_meme, one_private = sent_and_kept()
    for k in solo_meme:
        np.testing.assert_array_equal(solo_meme[k], two_meme[k])
        np.testing.assert_array_equal(solo_private[k], one_private[k])
    assert any(not np.array_equal(solo_meme[k], one_meme[k]) for k in solo_meme)
