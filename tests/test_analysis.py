"""Tests of dmoe_edu.analysis against naive loops and hand-computed cases."""

from __future__ import annotations

import inspect
import json
import math
import re
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dmoe_edu import analysis
from dmoe_edu.analysis import (
    GateRecord,
    chance_score,
    collect_gates,
    expert_usage,
    factorisation_score,
    gate_by_class,
    gate_by_translation,
    joint_assignment,
    shift_index,
    top_examples,
    where_what_scores,
)


def random_gates(rng: np.random.Generator, n: int, e: int) -> np.ndarray:
    return rng.dirichlet(np.ones(e), size=n)


def random_shifts(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(-4, 5, size=(n, 2))


def entropy(probs) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


# ---------------------------------------------------------------------------
# Translation and class means
# ---------------------------------------------------------------------------


def test_shift_index_corners_and_centre():
    shifts = np.array([[-4, -4], [4, -4], [-4, 4], [0, 0], [4, 4]])
    assert shift_index(shifts).tolist() == [0, 8, 72, 40, 80]


def test_gate_by_translation_hand_built():
    gates = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    shifts = np.array([[0, 0], [0, 0], [-4, 4]])  # (dx, dy)
    maps = gate_by_translation(gates, shifts)
    assert maps.shape == (2, 9, 9)
    np.testing.assert_allclose(maps[:, 4, 4], [0.75, 0.25])
    # dy = 4 is the last row, dx = -4 the first column
    np.testing.assert_allclose(maps[:, 8, 0], [0.2, 0.8])
    assert np.isnan(maps).sum() == 2 * (81 - 2)


def test_gate_by_translation_matches_loop():
    rng = np.random.default_rng(0)
    gates, shifts = random_gates(rng, 300, 3), random_shifts(rng, 300)
    maps = gate_by_translation(torch.tensor(gates), torch.tensor(shifts))
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            rows = [n for n in range(300) if shifts[n, 0] == dx and shifts[n, 1] == dy]
            for e in range(3):
                expected = (sum(gates[n, e] for n in rows) / len(rows)
                            if rows else np.nan)
                np.testing.assert_allclose(maps[e, dy + 4, dx + 4], expected)


def test_gate_by_class_hand_built_and_empty_class():
    gates = np.array([[0.2, 0.8], [0.4, 0.6], [1.0, 0.0]])
    labels = np.array([1, 1, 3])
    matrix = gate_by_class(gates, labels, num_classes=4)
    assert matrix.shape == (2, 4)
    np.testing.assert_allclose(matrix[:, 1], [0.3, 0.7])
    np.testing.assert_allclose(matrix[:, 3], [1.0, 0.0])
    assert np.isnan(matrix[:, [0, 2]]).all()


def test_gate_by_class_matches_loop():
    rng = np.random.default_rng(1)
    gates, labels = random_gates(rng, 200, 5), rng.integers(0, 10, size=200)
    matrix = gate_by_class(gates, labels)
    for c in range(10):
        rows = [n for n in range(200) if labels[n] == c]
        for e in range(5):
            np.testing.assert_allclose(matrix[e, c],
                                       sum(gates[n, e] for n in rows) / len(rows))


# ---------------------------------------------------------------------------
# Joint assignment and top examples
# ---------------------------------------------------------------------------


def test_joint_assignment_matches_loop_and_rows_sum_to_one():
    rng = np.random.default_rng(2)
    p1, p2 = random_gates(rng, 50, 4), random_gates(rng, 50, 3)
    raw = joint_assignment(p1, p2, normalise_rows=False)
    for i in range(4):
        for j in range(3):
            expected = sum(p1[n, i] * p2[n, j] for n in range(50)) / 50
            np.testing.assert_allclose(raw[i, j], expected)
    joint = joint_assignment(p1, p2)
    np.testing.assert_allclose(joint.sum(axis=1), np.ones(4))
    np.testing.assert_allclose(joint, raw / raw.sum(axis=1, keepdims=True))


def test_joint_assignment_zero_row_stays_zero():
    p1 = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p2 = np.array([[0.5, 0.5], [0.1, 0.9]])
    joint = joint_assignment(p1, p2)
    np.testing.assert_allclose(joint, [[0.5, 0.5], [0.1, 0.9], [0.0, 0.0]])


def test_top_examples_matches_brute_force_with_ties():
    rng = np.random.default_rng(3)
    # Coarse gate values make many ties
    p1 = rng.integers(0, 3, size=(40, 3)) / 2.0
    p2 = rng.integers(0, 3, size=(40, 4)) / 2.0
    indices = top_examples(p1, p2, k=7)
    assert indices.shape == (3, 4, 7) and indices.dtype == np.int64
    for i in range(3):
        for j in range(4):
            ranked = sorted(range(40), key=lambda n: (-(p1[n, i] * p2[n, j]), n))
            assert indices[i, j].tolist() == ranked[:7]


def test_top_examples_rejects_k_above_n():
    with pytest.raises(ValueError, match="k must be"):
        top_examples(np.ones((3, 2)) / 2, np.ones((3, 2)) / 2, k=4)


# ---------------------------------------------------------------------------
# Factorisation score
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["argmax", "soft"])
def test_score_is_exactly_one_when_expert_is_a_function_of_the_factor(mode):
    rng = np.random.default_rng(4)
    factor = rng.integers(0, 81, size=500)
    expert = factor % 3  # several factor values share an expert
    gates = np.eye(3)[expert]
    assert factorisation_score(gates, factor, mode=mode) == 1.0


@pytest.mark.parametrize("mode", ["argmax", "soft"])
def test_score_is_exactly_zero_on_a_balanced_cross_product(mode):
    # Every (factor, expert) pair appears twice: empirical MI is exactly 0
    factor, expert = np.meshgrid(np.arange(6), np.arange(4), indexing="ij")
    factor = np.tile(factor.ravel(), 2)
    gates = np.eye(4)[np.tile(expert.ravel(), 2)]
    assert factorisation_score(gates, factor, mode=mode) == 0.0


def test_score_hand_computed_intermediate_values():
    # argmax: f=0 -> experts 0,0,0,1 ; f=1 -> experts 1,1,1,0
    gates = np.eye(2)[[0, 0, 0, 1, 1, 1, 1, 0]]
    factor = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    expected = 1 - entropy([0.75, 0.25]) / math.log(2)  # 0.18872...
    assert factorisation_score(gates, factor) == pytest.approx(expected, abs=1e-12)

    # soft: gates 0.8/0.2 for f=0 and 0.2/0.8 for f=1
    soft = np.array([[0.8, 0.2]] * 3 + [[0.2, 0.8]] * 3)
    factor = np.array([0, 0, 0, 1, 1, 1])
    expected = 1 - entropy([0.8, 0.2]) / math.log(2)  # 0.27807...
    assert factorisation_score(soft, factor, mode="soft") == pytest.approx(
        expected, abs=1e-12)
    assert factorisation_score(soft, factor, mode="argmax") == 1.0


def naive_score(gates: np.ndarray, factor: np.ndarray, mode: str) -> float:
    """I(F; Z) / H(Z) from the textbook definition, with explicit loops."""
    n, e = gates.shape
    values = sorted(set(factor.tolist()))
    joint = {(f, z): 0.0 for f in values for z in range(e)}
    for x in range(n):
        for z in range(e):
            if mode == "soft":
                weight = gates[x, z]
            else:
                weight = 1.0 if z == int(np.argmax(gates[x])) else 0.0
            joint[factor[x], z] += weight / n
    p_f = {f: sum(joint[f, z] for z in range(e)) for f in values}
    p_z = [sum(joint[f, z] for f in values) for z in range(e)]
    mutual = sum(p * math.log(p / (p_f[f] * p_z[z]))
                 for (f, z), p in joint.items() if p > 0)
    return mutual / entropy(p_z)


@pytest.mark.parametrize("mode", ["argmax", "soft"])
def test_score_matches_textbook_definition(mode):
    rng = np.random.default_rng(5)
    gates = random_gates(rng, 120, 4) ** 3
    gates /= gates.sum(axis=1, keepdims=True)
    factor = rng.integers(0, 7, size=120)
    expected = naive_score(gates, factor, mode)
    assert factorisation_score(gates, factor, mode=mode) == pytest.approx(
        expected, abs=1e-10)


def test_score_is_zero_when_one_expert_takes_everything():
    factor = np.arange(10) % 3
    soft = np.tile([0.7, 0.2, 0.1], (10, 1))  # argmax always expert 0
    assert factorisation_score(soft, factor, mode="argmax") == 0.0
    one_hot = np.tile([1.0, 0.0, 0.0], (10, 1))
    assert factorisation_score(one_hot, factor, mode="soft") == 0.0


def test_score_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        factorisation_score(np.ones((2, 2)) / 2, np.array([0, 1]), mode="hard")
    with pytest.raises(ValueError, match=r"factor must have shape \(2,\)"):
        factorisation_score(np.ones((2, 2)) / 2, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\(N, E\)"):
        factorisation_score(np.ones(4), np.array([0, 1, 2, 3]))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), e=st.integers(1, 5), values=st.integers(1, 6),
       seed=st.integers(0, 2**16), mode=st.sampled_from(["argmax", "soft"]))
def test_score_lies_in_unit_interval(n, e, values, seed, mode):
    rng = np.random.default_rng(seed)
    score = factorisation_score(random_gates(rng, n, e),
                                rng.integers(0, values, size=n), mode=mode)
    assert 0.0 <= score <= 1.0


def test_chance_score_low_and_deterministic():
    rng = np.random.default_rng(6)
    factor = rng.integers(0, 81, size=1000)
    gates = np.eye(4)[factor % 4]  # perfectly factorised: score 1
    assert factorisation_score(gates, factor) == 1.0
    chance = chance_score(gates, factor, n_permutations=5, seed=0)
    assert 0.0 < chance < 0.2
    assert chance == chance_score(gates, factor, n_permutations=5, seed=0)
    assert chance != chance_score(gates, factor, n_permutations=5, seed=1)
    soft_chance = chance_score(gates, factor, mode="soft", n_permutations=5)
    assert soft_chance < 0.2


def test_expert_usage_hand_built():
    usage = expert_usage(np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1],
                                   [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]))
    np.testing.assert_allclose(usage["soft"], [0.35, 0.375, 0.275])
    np.testing.assert_allclose(usage["argmax"], [0.5, 0.25, 0.25])


# ---------------------------------------------------------------------------
# Records, collection from a model, where/what scores
# ---------------------------------------------------------------------------


class FakeOutput(NamedTuple):
    logits: torch.Tensor
    gate_probs: tuple


class StubModel(nn.Module):
    """A gated layer, an ungated layer and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(1296, 3)
        self.classifier = nn.Linear(1296, 10)
        self.modes_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> FakeOutput:
        self.modes_seen.append(self.training)
        gate_probs = torch.softmax(self.gate(x), dim=1)
        return FakeOutput(self.classifier(x), (gate_probs, None))


class StubDataset:
    def __init__(self, n: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 36, 36), dtype=torch.uint8,
                                    generator=generator)
        self.labels = torch.randint(0, 10, (n,), generator=generator)
        self.shifts = torch.randint(-4, 5, (n, 2), generator=generator)

    def inputs(self) -> torch.Tensor:
        return self.images.reshape(len(self.images), -1).float() / 255


def test_collect_gates_matches_model_and_restores_train_mode():
    torch.manual_seed(0)
    model, dataset = StubModel(), StubDataset(7)
    model.train()
    record = collect_gates(model, dataset, batch_size=3)
    assert model.training
    assert model.modes_seen == [False, False, False]
    assert record.gated_layers == [0] and record.gate_probs[1] is None

    # Same numbers as one direct forward pass
    with torch.no_grad():
        out = model(dataset.inputs())
    np.testing.assert_allclose(record.gate_probs[0], out.gate_probs[0].numpy(),
                               rtol=1e-6)
    assert record.gate_probs[0].dtype == np.float64
    np.testing.assert_array_equal(record.predictions, out.logits.argmax(1).numpy())
    np.testing.assert_array_equal(record.labels, dataset.labels.numpy())
    assert record.images.shape == (7, 36, 36) and record.images.dtype == np.uint8
    expected_error = 100 * np.mean(record.predictions != record.labels)
    assert record.error == pytest.approx(expected_error)


def test_collect_gates_keeps_eval_mode_and_restores_on_error():
    model = StubModel().eval()
    collect_gates(model, StubDataset(4))
    assert not model.training

    class Broken(StubModel):
        def forward(self, x):
            raise RuntimeError("boom")

    broken = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        collect_gates(broken, StubDataset(4))
    assert broken.training


def factorised_record() -> GateRecord:
    """Layer 0 picks its expert by translation, layer 2 by class."""
    n = 810
    index = np.arange(n)
    shifts = np.stack([index % 9 - 4, (index // 9) % 9 - 4], axis=1)
    labels = (index * 7) % 10
    where = np.eye(4)[shift_index(shifts) % 4]
    what = np.eye(4)[labels % 4]
    return GateRecord(gate_probs=[where, None, what], labels=labels, shifts=shifts,
                      predictions=labels.copy(),
                      images=np.zeros((n, 36, 36), np.uint8))


def test_where_what_scores_structure_and_values():
    record = factorised_record()
    scores = where_what_scores(record, n_permutations=3)
    assert list(scores) == ["layer1", "layer2"]
    assert scores["layer1"]["model_layer"] == 0
    assert scores["layer2"]["model_layer"] == 2
    assert scores["layer1"]["translation"]["argmax"] == 1.0
    assert scores["layer2"]["class"]["argmax"] == 1.0
    assert scores["layer1"]["class"]["argmax"] < 0.1
    assert scores["layer2"]["translation"]["argmax"] < 0.1
    for block in scores.values():
        for factor in ("translation", "class"):
            assert set(block[factor]) == {"soft", "argmax", "chance"}
            assert all(type(v) is float for v in block[factor].values())
        assert len(block["usage"]["soft"]) == 4
    json.dumps(scores)  # plain Python numbers only
    assert record.error == 0.0


# ---------------------------------------------------------------------------
# Documentation stays in step with the code
# ---------------------------------------------------------------------------


def documented_args(doc: str) -> list[str]:
    """Names listed in a docstring's Args section."""
    match = re.search(r"\n\s*Args:\n(.*?)(\n\s*\n|\Z)", doc, re.S)
    if not match:
        return []
    return re.findall(r"^ {8}(\w+):", match.group(1), re.M)


PUBLIC_FUNCTIONS = [
    "collect_gates", "shift_index", "gate_by_translation", "gate_by_class",
    "joint_assignment", "top_examples", "factorisation_score", "chance_score",
    "expert_usage", "where_what_scores",
]


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_docstring_args_match_signature(name):
    function = getattr(analysis, name)
    parameters = list(inspect.signature(function).parameters)
    assert documented_args(function.__doc__) == parameters
