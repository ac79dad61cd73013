"""Training: the two phases, determinism, checkpoints and resuming."""

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
        ({"lr": 0.0}, "lr must be > 0"),
        ({"momentum": 1.0}, "momentum"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_config_is_named(changes, words):
    with pytest.raises(ValueError, match=words):
        config(**changes)
