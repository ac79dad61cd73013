"""Training: the two phases, determinism, checkpoints and resuming."""

import dataclasses

import numpy as np
import pytest
import torch

from dmoe_edu.data import JitteredMNIST, synthetic_digits
from dmoe_edu.dmoe import DNN, DeepMoE, LayerSpec
from dmoe_edu.train import (
    TrainConfig,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    train,
)

LAYERS = [LayerSpec(4, 16, 8), LayerSpec(3, 12, 8)]


@pytest.fixture(scope="module")
def data():
    return JitteredMNIST(synthetic_digits(n_train=300, n_test=100, seed=0), seed=0)


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return DeepMoE(1296, LAYERS)


def config(**changes):
    base = dict(epochs=4, constrained_epochs=2, margin=5.0, batch_size=50, lr=0.05)
    return TrainConfig(**{**base, **changes})


def test_two_phases_and_history(data):
    result = train(fresh_model(), data, config())
    history = result.history

    assert [h["phase"] for h in history] == ["constrained"] * 2 + ["free"] * 2
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # Constant rate while constrained, then a linear anneal towards 0.
    assert history[0]["lr"] == history[1]["lr"] == 0.05
    assert history[2]["lr"] == pytest.approx(0.05)
    assert history[3]["lr"] == pytest.approx(0.025)
    for h in history:
        assert len(h["load"]) == 2 and len(h["load"][0]) == 4
        assert sum(h["load"][1]) == pytest.approx(1.0, abs=1e-5)
        assert 0 <= h["test_error"] <= 100 and h["loss"] > 0
    # The constraint masks something in phase 1 and nothing afterwards.
    assert any(share > 0 for share in history[0]["masked"])
    assert history[3]["masked"] == [0.0, 0.0]
    # After training the constraint is off and the model learnt something.
    assert all(not c.enabled for c in result.model.constraints())
    assert history[-1]["loss"] < history[0]["loss"]


def test_constraint_keeps_loads_within_the_margin(data):
    model = fresh_model()
    train(model, data, config(epochs=1, constrained_epochs=1, margin=3.0))
    for constraint in model.constraints():
        excess = constraint.totals - constraint.totals.mean()
        assert float(excess.max()) <= 3.0 + 1.0
        assert float(constraint.seen) == 300


def test_seeded_runs_repeat_exactly(data):
    first = train(fresh_model(), data, config())
    second = train(fresh_model(), data, config())

    assert first.history == second.history
    for a, b in zip(first.model.state_dict().values(),
                    second.model.state_dict().values()):
        assert torch.equal(a, b)

    # A different seed changes the example order, and so the numbers.
    third = train(fresh_model(), data, config(seed=1))
    assert third.history[-1]["loss"] != first.history[-1]["loss"]


def test_checkpoint_round_trip_is_exact(tmp_path, data):
    result = train(fresh_model(), data, config(epochs=2))
    optimizer = torch.optim.SGD(result.model.parameters(), lr=0.1, momentum=0.9)
    path = save_checkpoint(tmp_path / "ckpt.pt", result.model, optimizer, 2,
                           result.history, result.config)

    state = load_checkpoint(path)
    model = state["model"]
    assert type(model) is DeepMoE and model.config == result.model.config
    for (name, a), b in zip(result.model.state_dict().items(),
                            model.state_dict().values()):
        assert torch.equal(a, b), name
    assert state["epoch"] == 2 and state["history"] == result.history
    assert state["train_config"] == result.config
    x = data.test.inputs()
    assert torch.equal(model.eval()(x).logits, result.model.eval()(x).logits)
    # The constraint's running totals travel with the weights.
    assert torch.equal(model.constraints()[0].totals,
                       result.model.constraints()[0].totals)
    assert not list(tmp_path.glob("*.tmp"))


class _Stop(Exception):
    """Stands for a job killed between two epochs."""


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, data):
    whole = train(fresh_model(), data, config())

    def die_after_epoch_3(record):
        if record["epoch"] == 3:
            raise _Stop

    # The checkpoint of epoch 3 is written before the job dies.
    path = tmp_path / "run.pt"
    with pytest.raises(_Stop):
        train(fresh_model(), data, config(), checkpoint_path=path,
              on_epoch=die_after_epoch_3)
    assert load_checkpoint(path)["epoch"] == 3

    # Resuming (into a model initialised differently) finishes the same run.
    resumed = train(fresh_model(seed=99), data, config(), checkpoint_path=path,
                    resume=True)

    assert resumed.history == whole.history
    for a, b in zip(whole.model.state_dict().values(),
                    resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_dnn_trains_without_gates(data):
    torch.manual_seed(0)
    result = train(DNN(1296, [20, 10]), data, config(epochs=2))
    assert result.history[0]["load"] == [None, None]
    assert 0 <= evaluate(result.model, data.test) <= 100


def test_loading_into_a_different_model_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", fresh_model())
    with pytest.raises(ValueError, match="differs"):
        load_checkpoint(path, model=DeepMoE(1296, [LayerSpec(2, 5, 3)]))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"constrained_epochs": 9}, r"constrained_epochs must be in \[0, epochs=4\]"),
        ({"margin": -1.0}, "margin must be >= 0"),
        ({"lr": 0.0}, "lr must be a number > 0, got 0.0"),
        ({"momentum": 1.0}, "momentum"),
        ({"batch_size": 0}, "batch_size"),
        ({"constrained_epochs": 1.5},
         "constrained_epochs must be an integer >= 0, got 1.5"),
        ({"threads": 1.5}, "threads must be an integer >= 1 or None, got 1.5"),
        ({"weight_decay": -1.0}, "weight_decay must be a number >= 0, got -1.0"),
        ({"lr": "a"}, "lr must be a number > 0, got 'a'"),
        ({"momentum": "a"}, r"momentum must be a number in \[0, 1\), got 'a'"),
        ({"weight_decay": "a"}, "weight_decay must be a number >= 0, got 'a'"),
        ({"lr": float("nan")}, "lr must be a number > 0, got nan"),
        ({"epochs": True}, "epochs must be an integer >= 1, got True"),
        ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
        ({"constrained_epochs": False}, "constrained_epochs must be an integer"),
        ({"eval_every": 2.0}, "eval_every must be an integer >= 1, got 2.0"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"anneal": "yes"}, "anneal must be True or False, got 'yes'"),
    ],
)
def test_bad_config_is_named(changes, words):
    with pytest.raises(ValueError, match=words):
        config(**changes)


def test_config_stores_plain_numbers():
    cfg = config(epochs=np.int64(4), batch_size=np.int32(50), threads=np.int64(2),
                 lr=np.float32(0.5), weight_decay=0)
    assert [type(v) for v in dataclasses.astuple(cfg)] == [
        int, int, float, float, float, int, float, bool, int, int, int
    ]


# ---------------------------------------------------------------------------
# NaN and inf
# ---------------------------------------------------------------------------


class _NaNSet:
    """A training set whose images are all NaN."""

    def __init__(self, inner):
        self.inner = inner

    def inputs(self):
        return torch.full_like(self.inner.inputs(), float("nan"))

    def targets(self):
        return self.inner.targets()


class _Poisoned:
    """``data`` with the training set of epoch ``bad_epoch`` turned to NaN."""

    def __init__(self, data, bad_epoch):
        self.data, self.bad_epoch, self.test = data, bad_epoch, data.test

    def train_epoch(self, epoch):
        inner = self.data.train_epoch(epoch)
        return _NaNSet(inner) if epoch == self.bad_epoch else inner


def test_non_finite_loss_stops_training_with_epoch_and_step(data):
    model = fresh_model()
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 1 of 6"):
        train(model, _Poisoned(data, bad_epoch=2), config(epochs=2, margin=None))
    # The bad step was not applied.
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_batch_in_the_constrained_phase_leaves_the_totals_finite(data):
    model = fresh_model()
    words = r"epoch 2, step 1 of 6: .*50 of 50 rows.*learning rate"
    with pytest.raises(ValueError, match=words):
        train(model, _Poisoned(data, bad_epoch=2), config(epochs=2))
    for constraint in model.constraints():
        assert torch.isfinite(constraint.totals).all()
        assert float(constraint.seen) == 300


# ---------------------------------------------------------------------------
# Checkpoints that are not ours, and resuming under other settings
# ---------------------------------------------------------------------------


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04 certainly not a pickle")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)

    for path, words in [(garbage, "torch.load failed"), (empty, "torch.load failed"),
                        (other, "misses the key"), (listed, "holds a list")]:
        with pytest.raises(ValueError, match="is not a dmoe_edu checkpoint") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value) and words in str(info.value)


def test_resume_refuses_a_different_config_before_touching_the_model(tmp_path,
                                                                    data):
    path = tmp_path / "run.pt"
    train(fresh_model(), data, config(epochs=2, constrained_epochs=1),
          checkpoint_path=path)

    model = fresh_model(seed=99)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError) as info:
        train(model, data, config(epochs=3, constrained_epochs=1, lr=0.1),
              checkpoint_path=path, resume=True)
    message = str(info.value)
    assert str(path) in message
    assert "epochs (stored 2, given 3)" in message
    assert "lr (stored 0.05, given 0.1)" in message
    assert "constrained_epochs" not in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_resume_refuses_a_checkpoint_without_a_config(tmp_path, data):
    path = save_checkpoint(tmp_path / "bare.pt", fresh_model())
    with pytest.raises(ValueError, match="holds no TrainConfig"):
        train(fresh_model(), data, config(), checkpoint_path=path, resume=True)


def test_resuming_a_finished_run_is_a_no_op(tmp_path, data):
    path = tmp_path / "done.pt"
    whole = train(fresh_model(), data, config(), checkpoint_path=path)

    seen = []
    again = train(fresh_model(seed=99), data, config(), checkpoint_path=path,
                  resume=True, on_epoch=seen.append)

    assert seen == [] and again.history == whole.history
    for a, b in zip(whole.model.state_dict().values(),
                    again.model.state_dict().values()):
        assert torch.equal(a, b)
    assert all(not c.enabled for c in again.model.constraints())
