"""Course notebooks 1 and 2: the toy plane, the classic MoE, temperature and
entropy, their figures and the gate explorer.

References are independent of the library: the toy rules written point by
point in plain Python, softmax and entropy in Python floats, the classic
mixture as a loop over experts in float64, the best single line found by brute
force.
"""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
import torch

from dmoe_edu import data, viz, widgets
from dmoe_edu.classic import ClassicMoE
from dmoe_edu.dmoe import ModelOutput
from dmoe_edu.gating import LinearGate, ReLUGate, gate_entropy, tempered_gate
from dmoe_edu.train import fit_full_batch

# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------


def naive_region(x0: float, x1: float, layout: str, bound: float) -> int:
    """The region of one point, as the module docstring states it."""
    if layout == "halves":
        return 1 if x0 >= 0 else 0
    return 1 if abs(x0) < bound / 2 else 0


def naive_label(x0: float, x1: float, layout: str, bound: float) -> int:
    """The noise-free class of one point, rule by rule as documented."""
    region = naive_region(x0, x1, layout, bound)
    if layout == "halves":
        if region == 0:
            return 1 if x1 > x0 / 2 else 0  # above the rising line
        return 1 if x1 < -x0 / 2 else 0  # below the falling line
    if region == 0:
        return 1 if x1 > 0 else 0  # outer strips: above the axis
    return 1 if x1 < 0 else 0  # the stripe: below it


def naive_softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    total = sum(weights)
    return [w / total for w in weights]


def naive_entropy(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def naive_classic(model: ClassicMoE, x: torch.Tensor) -> torch.Tensor:
    """F(x) = sum_e g_e(x) softmax(W_e x + b_e), one example and expert at a time."""
    weight = model.experts.weight.detach().double()  # (E*C, D)
    bias = model.experts.bias.detach().double()
    num_experts, num_classes = model.num_experts, model.num_classes
    rows = []
    for example in x.double():
        # The gate's logits, by its own formula
        if isinstance(model.gate, LinearGate):
            proj = model.gate.proj
            gate_logits = proj.weight.double() @ example + proj.bias.double()
        else:
            assert isinstance(model.gate, ReLUGate)
            first, second = model.gate.hidden_layer, model.gate.out
            hidden = torch.relu(first.weight.double() @ example + first.bias.double())
            gate_logits = second.weight.double() @ hidden + second.bias.double()
        gates = naive_softmax(gate_logits.tolist())
        mixed = [0.0] * num_classes
        for e in range(num_experts):
            rows_e = slice(e * num_classes, (e + 1) * num_classes)
            scores = (weight[rows_e] @ example + bias[rows_e]).tolist()
            for c, p in enumerate(naive_softmax(scores)):
                mixed[c] += gates[e] * p
        rows.append(mixed)
    return torch.tensor(rows, dtype=torch.float64)


def best_line_accuracy(points: np.ndarray, labels: np.ndarray) -> float:
    """The best accuracy of any line, by brute force over angles and offsets."""
    best = 0.0
    for angle in np.linspace(0, np.pi, 180, endpoint=False):
        projected = points @ np.array([np.cos(angle), np.sin(angle)])  # (B,)
        for offset in np.quantile(projected, np.linspace(0, 1, 101)):
            above = projected > offset
            right = (above == labels.astype(bool)).mean()
            best = max(best, right, 1 - right)
    return float(best)


# ---------------------------------------------------------------------------
# The toy plane
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", data.LAYOUTS)
def test_plane_follows_the_documented_rules(layout):
    plane = data.two_rule_plane(num_points=500, layout=layout, seed=3, bound=1.5)
    assert plane.inputs.shape == (500, 2) and plane.inputs.dtype == torch.float32
    assert plane.labels.shape == (500,) and plane.labels.dtype == torch.int64
    assert plane.regions.dtype == torch.int64 and len(plane) == 500
    assert plane.inputs.abs().max() <= 1.5
    for (x0, x1), label, region in zip(plane.inputs.tolist(), plane.labels.tolist(),
                                       plane.regions.tolist()):
        assert region == naive_region(x0, x1, layout, 1.5)
        assert label == naive_label(x0, x1, layout, 1.5)


@pytest.mark.parametrize("layout", data.LAYOUTS)
def test_no_line_solves_the_plane_but_the_two_rules_do(layout):
    plane = data.two_rule_plane(num_points=800, layout=layout, seed=0)
    points, labels = plane.inputs.numpy(), plane.labels.numpy()
    assert best_line_accuracy(points, labels) < 0.8
    assert 0.4 < labels.mean() < 0.6  # both classes well represented


def test_plane_is_seeded_and_noise_flips_labels_only():
    first = data.two_rule_plane(num_points=4000, seed=7)
    again = data.two_rule_plane(num_points=4000, seed=7)
    other = data.two_rule_plane(num_points=4000, seed=8)
    noisy = data.two_rule_plane(num_points=4000, seed=7, label_noise=0.2)
    torch.testing.assert_close(first.inputs, again.inputs, rtol=0, atol=0)
    assert torch.equal(first.labels, again.labels)
    assert not torch.equal(first.inputs, other.inputs)
    torch.testing.assert_close(noisy.inputs, first.inputs, rtol=0, atol=0)
    assert torch.equal(noisy.regions, first.regions)
    flipped = (noisy.labels != first.labels).float().mean().item()
    assert 0.17 < flipped < 0.23
    assert torch.equal(first.rule_of(first.inputs), first.labels)


@pytest.mark.parametrize("kwargs", [
    dict(num_points=0), dict(num_points=True), dict(num_points=2.0),
    dict(layout="rings"), dict(seed=-1), dict(bound=0.0), dict(bound=math.inf),
    dict(label_noise=0.6), dict(label_noise=-0.1),
])
def test_plane_refuses_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        data.two_rule_plane(**kwargs)


def test_region_of_checks_points():
    plane = data.two_rule_plane(num_points=4)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plane.region_of(torch.zeros(3, 3))
    with pytest.raises(TypeError):
        plane.region_of(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError):
        plane.rule_of(np.zeros((3, 2)))


def test_grid_points_are_row_by_row():
    grid = data.plane_grid(bound=1.0, steps=5)
    assert grid.xs.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert grid.points.shape == (25, 2) and grid.points.dtype == torch.float32
    for i in range(5):
        for j in range(5):
            assert grid.points[i * 5 + j].tolist() == [grid.xs[j].item(),
                                                       grid.ys[i].item()]
    values = torch.arange(50).reshape(25, 2)
    assert grid.to_grid(values)[3, 4].tolist() == values[3 * 5 + 4].tolist()
    with pytest.raises(ValueError, match="25 rows"):
        grid.to_grid(torch.zeros(24))
    with pytest.raises(ValueError):
        data.plane_grid(steps=1)
    with pytest.raises(ValueError):
        data.plane_grid(bound=-1.0)


# ---------------------------------------------------------------------------
# The classic mixture and its training
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,gate_hidden", [(1, None), (3, None), (2, 5)])
def test_classic_moe_matches_a_loop_over_experts(num_experts, gate_hidden):
    torch.manual_seed(0)
    model = ClassicMoE(in_dim=3, num_classes=4, num_experts=num_experts,
                       gate_hidden=gate_hidden).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    out = model(x)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (7, 4) and out.gate_probs[0].shape == (7, num_experts)
    torch.testing.assert_close(out.logits.exp(), naive_classic(model, x))
    assert model.expert_logits(x).shape == (7, num_experts, 4)


def test_classic_moe_gradients_and_finite_loss():
    torch.manual_seed(1)
    model = ClassicMoE(in_dim=2, num_classes=2, num_experts=2, gate_hidden=3).double()
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inputs: model(inputs).logits, (x,))

    # A mixture sure of the wrong class gives a large but finite loss
    with torch.no_grad():
        model.experts.weight.zero_()
        model.experts.bias.copy_(torch.tensor([1e4, -1e4, 1e4, -1e4]))
    loss = torch.nn.functional.cross_entropy(model(x.detach()).logits,
                                             torch.ones(4, dtype=torch.int64))
    assert torch.isfinite(loss) and loss > 100


def test_classic_moe_refuses_bad_sizes_and_inputs():
    with pytest.raises(ValueError, match="num_experts"):
        ClassicMoE(in_dim=2, num_classes=2, num_experts=0)
    model = ClassicMoE(in_dim=2, num_classes=2, num_experts=2)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        model(torch.zeros(3, 5))


def test_the_true_rules_as_a_mixture_classify_every_point():
    # Experts set to the two rules, a gate that knows the border x0 = 0
    plane = data.two_rule_plane(num_points=400, layout="halves", seed=2)
    model = ClassicMoE(in_dim=2, num_classes=2, num_experts=2)
    rules = torch.tensor(data.RULES["halves"])  # (2 regions, 2)
    with torch.no_grad():
        model.experts.weight.copy_(torch.stack([
            -rules[0], rules[0], -rules[1], rules[1]]) * 200)
        model.experts.bias.zero_()
        model.gate.proj.weight.copy_(torch.tensor([[-200.0, 0.0], [200.0, 0.0]]))
        model.gate.proj.bias.zero_()
        predicted = model(plane.inputs).logits.argmax(1)
    assert (predicted == plane.labels).float().mean() > 0.995


def test_fit_full_batch_learns_the_halves_and_reports_losses():
    plane = data.two_rule_plane(num_points=300, layout="halves", seed=0)
    torch.manual_seed(0)
    model = ClassicMoE(in_dim=2, num_classes=2, num_experts=2)
    with torch.no_grad():
        start = naive_classic(model, plane.inputs)  # (B, C)
    first_loss = -start[torch.arange(300), plane.labels].log().mean().item()
    threads = torch.get_num_threads()
    losses = fit_full_batch(model, plane.inputs, plane.labels, steps=300, lr=0.05)
    assert torch.get_num_threads() == threads
    assert len(losses) == 300 and not model.training
    assert losses[0] == pytest.approx(first_loss, rel=1e-5)
    with torch.no_grad():
        right = (model(plane.inputs).logits.argmax(1) == plane.labels).float().mean()
    assert right > 0.9


class _NanModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return ModelOutput(x[:, :2] * self.weight * math.nan, ())


def test_fit_full_batch_refuses_bad_arguments_and_nan():
    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)
    model = ClassicMoE(in_dim=2, num_classes=2, num_experts=2)
    with pytest.raises(ValueError, match="steps"):
        fit_full_batch(model, x, y, steps=0)
    with pytest.raises(ValueError, match="lr"):
        fit_full_batch(model, x, y, lr=0.0)
    with pytest.raises(ValueError, match="labels"):
        fit_full_batch(model, x, y[:3])
    with pytest.raises(FloatingPointError, match="step 1"):
        fit_full_batch(_NanModel(), x, y, steps=3)


# ---------------------------------------------------------------------------
# Temperature and entropy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.01, 0.3, 1.0, 2.5, 1e3])
def test_tempered_gate_is_softmax_of_logits_over_t(temperature):
    logits = torch.tensor([[3.0, -1.0, 0.5, 0.0], [10.0, 10.0, -7.0, 2.0]],
                          dtype=torch.float64)
    expected = torch.tensor([naive_softmax([v / temperature for v in row])
                             for row in logits.tolist()], dtype=torch.float64)
    torch.testing.assert_close(tempered_gate(logits, temperature), expected)


def test_tempered_gate_keeps_the_mask_and_refuses_bad_temperatures():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    probs = tempered_gate(logits, 2.0, mask=torch.tensor([False, True, True]))
    assert probs[0, 0].item() == 0.0
    torch.testing.assert_close(probs[0, 1:], torch.tensor(naive_softmax([0.5, 0.0])))
    for bad in (0.0, -1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match="temperature"):
            tempered_gate(logits, bad)


def test_gate_entropy_matches_the_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.25] * 4, [0.0, 1.0, 0.0, 0.0],
                          [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    expected = [naive_entropy(row) for row in probs.tolist()]
    torch.testing.assert_close(gate_entropy(probs),
                               torch.tensor(expected, dtype=torch.float64))
    one_hot = gate_entropy(probs[2:3]).item()
    assert one_hot == 0.0 and math.copysign(1.0, one_hot) == 1.0  # not -0.0
    assert gate_entropy(probs[1:2]).item() == pytest.approx(math.log(4))

    # Zeros give a finite gradient (0 log 0 is taken as 0)
    leaf = probs.clone().requires_grad_(True)
    gate_entropy(leaf).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    for bad in (probs[0], probs.long(), [[0.5, 0.5]]):
        with pytest.raises(ValueError, match="gate_probs"):
            gate_entropy(bad)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def test_gate_regions_figure_holds_winners_points_and_lines():
    rng = np.random.default_rng(0)
    xs, ys = np.linspace(-1, 1, 5), np.linspace(-2, 2, 4)
    gates = rng.dirichlet(np.ones(3), size=(4, 5))  # (Gy, Gx, E)
    points = rng.uniform(-1, 1, size=(9, 2))
    labels = np.array([0, 1, 1, 0, 2, 2, 2, 1, 0])
    scores = rng.normal(size=(3, 4, 5))
    fig = viz.gate_regions_figure(xs, ys, gates, points=points, labels=labels,
                                  expert_scores=scores)
    winners = [[max(range(3), key=lambda e: gates[i, j, e]) for j in range(5)]
               for i in range(4)]
    assert fig.data[0].z.tolist() == winners
    np.testing.assert_allclose(fig.data[0].customdata, gates.max(axis=2), rtol=1e-6)
    names = [trace.name for trace in fig.data]
    assert names[1:] == ["class 0", "class 1", "class 2", "expert 0 decides",
                         "expert 1 decides", "expert 2 decides"]
    for c in range(3):
        np.testing.assert_allclose(fig.data[1 + c].x, points[labels == c, 0])
        np.testing.assert_allclose(fig.data[1 + c].y, points[labels == c, 1])
    for e in range(3):
        np.testing.assert_allclose(fig.data[4 + e].z, scores[e], rtol=1e-6)
    assert "D = 2" in fig.layout.xaxis.title.text


def test_gate_regions_figure_refuses_mismatched_shapes():
    gates = np.full((4, 5, 2), 0.5)
    xs, ys = np.zeros(5), np.zeros(4)
    with pytest.raises(ValueError, match="gate_probs"):
        viz.gate_regions_figure(xs, ys, gates[:3])
    with pytest.raises(ValueError, match="labels"):
        viz.gate_regions_figure(xs, ys, gates, points=np.zeros((3, 2)),
                                labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="labels"):
        viz.gate_regions_figure(xs, ys, gates, points=np.zeros((2, 2)),
                                labels=np.array([-1, 0]))
    with pytest.raises(ValueError, match="expert_scores"):
        viz.gate_regions_figure(xs, ys, gates, expert_scores=np.zeros((3, 4, 5)))


def test_gate_distribution_figure_bars_and_entropy():
    probs = np.array([0.6, 0.3, 0.1, 0.0])
    fig = viz.gate_distribution_figure(probs, gate_logits=[2.0, 1.3, 0.2, -5.0],
                                       temperature=0.5)
    assert list(fig.data[0].y) == probs.tolist()
    assert list(fig.data[0].customdata) == [2.0, 1.3, 0.2, -5.0]
    assert fig.data[1].y[0] == pytest.approx(naive_entropy(probs.tolist()))
    assert "T = 0.5" in fig.layout.title.text
    assert f"{naive_entropy(probs.tolist()):.3f}" in fig.layout.title.text
    for bad in (np.array([0.5, 0.6]), np.array([1.5, -0.5]), np.array([np.nan, 1.0])):
        with pytest.raises(ValueError, match="gate_probs"):
            viz.gate_distribution_figure(bad)
    with pytest.raises(ValueError, match="gate_logits"):
        viz.gate_distribution_figure(probs, gate_logits=[0.0, 1.0])


# ---------------------------------------------------------------------------
# The gate explorer
# ---------------------------------------------------------------------------


def bars(board) -> list[float]:
    return [float(v) for v in board.figure.data[0].y]


def test_gate_explorer_bars_follow_the_sliders():
    board = widgets.gate_explorer(gate_logits=(2.0, 1.0, 0.0, -1.0))
    assert list(board.controls) == ["logit_0", "logit_1", "logit_2", "logit_3",
                                    "temperature"]
    assert bars(board) == pytest.approx(naive_softmax([2.0, 1.0, 0.0, -1.0]))

    board.controls["temperature"].value = 2.0
    assert bars(board) == pytest.approx(naive_softmax([1.0, 0.5, 0.0, -0.5]))
    board.controls["logit_2"].value = 4.0
    expected = naive_softmax([1.0, 0.5, 2.0, -0.5])
    assert bars(board) == pytest.approx(expected)
    assert float(board.figure.data[1].y[0]) == pytest.approx(naive_entropy(expected))
    static = board.static_figure()
    assert [float(v) for v in static.data[0].y] == pytest.approx(expected)


def test_gate_explorer_shows_an_invalid_temperature_without_raising():
    board = widgets.gate_explorer(gate_logits=[0.0, 1.0, 2.0])
    before = bars(board)
    board.controls["temperature"].value = 0.0  # no softmax at T = 0
    assert isinstance(board.last_error, ValueError)
    assert "temperature must be" in board.message.value
    assert "dmoe-error" in board.message.value
    assert bars(board) == before  # the last good state stays

    board.controls["temperature"].value = 0.5
    assert board.last_error is None and board.message.value == ""
    assert bars(board) == pytest.approx(naive_softmax([0.0, 2.0, 4.0]))


@pytest.mark.parametrize("kwargs", [
    dict(gate_logits=[1.0]), dict(gate_logits=[0.0] * 9),
    dict(gate_logits=[6.0, 0.0]), dict(gate_logits=[[0.0, 1.0]]),
    dict(gate_logits=[math.nan, 0.0]), dict(temperature=0.0),
    dict(temperature=6.0), dict(logit_limit=0.0), dict(max_temperature=-1.0),
])
def test_gate_explorer_refuses_a_bad_first_state(kwargs):
    with pytest.raises(ValueError):
        widgets.gate_explorer(**kwargs)


# ---------------------------------------------------------------------------
# Documentation stays in step with the code
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("function", [
    data.two_rule_plane, data.plane_grid, ClassicMoE, fit_full_batch,
    tempered_gate, gate_entropy, viz.gate_regions_figure,
    viz.gate_distribution_figure, widgets.gate_explorer,
])
def test_docstring_args_match_signature(function):
    match = re.search(r"\n\s*Args:\n(.*?)(\n\s*\n|\Z)", function.__doc__, re.S)
    documented = re.findall(r"^ {8}(\w+):", match.group(1), re.M)
    signature = inspect.signature(function)
    assert documented == [name for name in signature.parameters if name != "self"]
