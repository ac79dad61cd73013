"""Course notebook 3's additions: trace_margin, its figures and the margin dashboard.

References are independent of the library: a stream worked out by hand, and a
naive pure-Python loop of the paper's rule with the choices documented in
:class:`dmoe_edu.balance.MarginConstraint`.
"""

from __future__ import annotations

import base64
import inspect
import math
import re

import numpy as np
import pytest
import torch

from dmoe_edu import viz, widgets
from dmoe_edu.balance import MarginConstraint, MarginTrace, trace_margin

# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------

#: Notebook 3's hand-worked stream: three experts; the gate leans to expert 0,
#: then, from example 3 on, to expert 1.
HAND_PROBS = np.array([
    [0.6, 0.3, 0.1],
    [0.6, 0.3, 0.1],
    [0.6, 0.3, 0.1],
    [0.4, 0.5, 0.1],
    [0.4, 0.5, 0.1],
    [0.4, 0.5, 0.1],
    [0.4, 0.5, 0.1],
])
HAND_MARGIN = 0.5

# Worked by hand: the totals before each example; the rule masks excess > 0.5.
HAND_TOTALS = np.array([
    [0.0, 0.0, 0.0],
    [0.6, 0.3, 0.1],
    [1.2, 0.6, 0.2],            # excess of expert 0: 1.2 - 2/3 = 0.533 > 0.5
    [1.2, 1.35, 0.45],
    [1.6, 1.85, 0.55],          # expert 1: 1.85 - 4/3 = 0.517 > 0.5
    [2.4, 1.85, 0.75],          # expert 0: 2.4 - 5/3 = 0.733
    [2.4, 1.85 + 5 / 6, 0.75 + 1 / 6],  # expert 1: 2.683 - 2 = 0.683
])
HAND_KEEP = np.array([
    [True, True, True],
    [True, True, True],
    [False, True, True],
    [True, True, True],
    [True, False, True],
    [False, True, True],
    [True, False, True],
])
HAND_GATES = np.array([
    [0.6, 0.3, 0.1],
    [0.6, 0.3, 0.1],
    [0.0, 0.75, 0.25],          # 0.3 / 0.4 and 0.1 / 0.4
    [0.4, 0.5, 0.1],
    [0.8, 0.0, 0.2],            # 0.4 / 0.5 and 0.1 / 0.5
    [0.0, 5 / 6, 1 / 6],        # 0.5 / 0.6 and 0.1 / 0.6
    [0.8, 0.0, 0.2],
])


def naive_trace(logits: np.ndarray, margin: float):
    """The rule in plain Python floats, one example at a time."""
    num_steps, num_experts = logits.shape
    totals = [0.0] * num_experts
    all_totals, all_keep, all_gates = [], [], []
    for t in range(num_steps):
        mean = sum(totals) / num_experts
        keep = [total - mean <= margin for total in totals]
        if not all(keep):
            keep[totals.index(min(totals))] = True
        top = max(logit for logit, k in zip(logits[t], keep) if k)
        weights = [math.exp(logit - top) if k else 0.0
                   for logit, k in zip(logits[t], keep)]
        gate = [w / sum(weights) for w in weights]
        all_totals.append(list(totals))
        all_keep.append(keep)
        all_gates.append(gate)
        totals = [total + g for total, g in zip(totals, gate)]
    return np.array(all_totals), np.array(all_keep), np.array(all_gates)


def leaning_stream(num_steps: int, num_experts: int, seed: int) -> torch.Tensor:
    """Random gate logits that favour the low-numbered experts."""
    generator = torch.Generator().manual_seed(seed)
    lean = torch.linspace(1.0, -1.0, num_experts)
    noise = torch.randn(num_steps, num_experts, generator=generator)
    return lean + noise  # (T, E)


def values(array) -> np.ndarray:
    """A figure's data as numpy, decoding plotly's base64 typed arrays."""
    if isinstance(array, dict) and "bdata" in array:
        flat = np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
        shape = array.get("shape")
        if shape is None:
            return flat
        if isinstance(shape, str):
            shape = [int(n) for n in shape.split(",")]
        return flat.reshape(shape)
    return np.asarray(array)


# ---------------------------------------------------------------------------
# trace_margin
# ---------------------------------------------------------------------------


def test_trace_matches_the_stream_worked_by_hand():
    trace = trace_margin(np.log(HAND_PROBS), HAND_MARGIN)
    assert isinstance(trace, MarginTrace)
    assert trace.margin == HAND_MARGIN
    np.testing.assert_allclose(trace.totals, HAND_TOTALS, atol=1e-12)
    np.testing.assert_allclose(
        trace.excess, HAND_TOTALS - HAND_TOTALS.mean(axis=1, keepdims=True),
        atol=1e-12,
    )
    np.testing.assert_array_equal(trace.keep, HAND_KEEP)
    np.testing.assert_array_equal(trace.masked, ~HAND_KEEP)
    assert trace.masked_examples.tolist() == [False, False, True, False, True,
                                              True, True]
    np.testing.assert_allclose(trace.gate_probs, HAND_GATES, atol=1e-12)
    np.testing.assert_allclose(trace.raw_probs, HAND_PROBS, atol=1e-12)


@pytest.mark.parametrize("num_steps, num_experts", [(1, 1), (1, 3), (37, 2),
                                                    (100, 5), (250, 4)])
@pytest.mark.parametrize("margin", [0.0, 0.3, 2.0, 17.0, math.inf])
def test_trace_matches_a_naive_loop(num_steps, num_experts, margin):
    logits = leaning_stream(num_steps, num_experts, seed=num_steps + num_experts)
    totals, keep, gates = naive_trace(logits.double().numpy(), margin)
    trace = trace_margin(logits, margin)
    np.testing.assert_array_equal(trace.keep, keep)
    np.testing.assert_allclose(trace.totals, totals, rtol=0, atol=1e-10)
    np.testing.assert_allclose(trace.gate_probs, gates, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        trace.raw_probs, torch.softmax(logits.double(), dim=1).numpy(), atol=1e-12
    )


def test_trace_equals_the_constraint_fed_one_batch():
    # The rule goes example by example, so one batch gives the same masks.
    logits = leaning_stream(120, 4, seed=3)
    trace = trace_margin(logits, margin=1.5)
    constraint = MarginConstraint(4, margin=1.5)
    constraint.enabled = True
    np.testing.assert_array_equal(constraint.masks(logits).numpy(), trace.keep)
    np.testing.assert_allclose(
        constraint.totals.numpy(), trace.totals[-1] + trace.gate_probs[-1], atol=1e-10
    )
    assert constraint.masked_examples == int(trace.masked_examples.sum()) > 0


def test_trace_rows_add_up():
    trace = trace_margin(leaning_stream(80, 3, seed=1), margin=0.7)
    np.testing.assert_allclose(trace.totals[1:],
                               np.cumsum(trace.gate_probs, axis=0)[:-1], atol=1e-10)
    np.testing.assert_allclose(trace.gate_probs.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(trace.gate_probs[trace.masked] == 0.0)
    np.testing.assert_allclose(trace.excess.sum(axis=1), 0.0, atol=1e-10)


@pytest.mark.parametrize("margin", [0.0, 0.5, 3.0])
def test_no_expert_runs_more_than_one_example_past_the_margin(margin):
    num_experts = 4
    trace = trace_margin(leaning_stream(400, num_experts, seed=7) * 3, margin)
    assert trace.masked.any()
    assert trace.excess.max() <= margin + 1 - 1 / num_experts + 1e-9


def test_infinite_margin_masks_nothing():
    logits = leaning_stream(50, 3, seed=2) * 10
    trace = trace_margin(logits, math.inf)
    assert trace.keep.all()
    np.testing.assert_array_equal(trace.gate_probs, trace.raw_probs)
    assert trace.excess[-1, 0] > 10  # expert 0 runs far ahead


def test_trace_accepts_lists_and_leaves_float32_inputs_alone():
    logits32 = leaning_stream(10, 2, seed=0)
    before = logits32.clone()
    from_list = trace_margin(logits32.tolist(), 0.2)
    from_tensor = trace_margin(logits32, 0.2)
    np.testing.assert_array_equal(from_list.keep, from_tensor.keep)
    assert torch.equal(logits32, before)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(3), r"shape \(T, E\)"),
    (torch.zeros(0, 3), r"shape \(T, E\)"),
    (torch.zeros(2, 2, 2), r"shape \(T, E\)"),
    ([["a", "b"]], "array of numbers"),
    (torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [0.0, float("inf")]]),
     r"NaN or inf in 2 of 3 examples \(first: example 1\)"),
])
def test_trace_refuses_bad_logits(bad, message):
    with pytest.raises(ValueError, match=message):
        trace_margin(bad, 1.0)


@pytest.mark.parametrize("margin", [-1.0, float("nan"), "big"])
def test_trace_refuses_bad_margins(margin):
    with pytest.raises(ValueError, match="margin must be"):
        trace_margin(torch.zeros(2, 2), margin)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def test_margin_trace_figure_draws_the_trace():
    trace = trace_margin(np.log(HAND_PROBS), HAND_MARGIN)
    fig = viz.margin_trace_figure(trace.excess, trace.keep, trace.gate_probs,
                                  trace.margin)
    names = [t.name for t in fig.data]
    assert names == ["expert 0", "expert 1", "expert 2", "margin m", "masked",
                     "gate used"]
    for expert in range(3):
        np.testing.assert_array_equal(fig.data[expert].y, trace.excess[:, expert])
        assert fig.data[expert].x.tolist() == list(range(7))

    # The margin: a dashed line at y = m across the stream.
    line = fig.data[3]
    assert list(line.x) == [0, 6] and list(line.y) == [HAND_MARGIN] * 2
    assert line.line.dash == "dash"

    # A cross at each masked (example, expert), at that expert's excess.
    masked = fig.data[4]
    assert masked.x.tolist() == [2, 4, 5, 6]
    assert masked.customdata.tolist() == [0, 1, 0, 1]
    np.testing.assert_allclose(masked.y, [1.2 - 2 / 3, 1.85 - 4 / 3, 2.4 - 5 / 3,
                                          1.85 + 5 / 6 - 2], atol=1e-12)

    # The gates used: experts down, examples across.
    heatmap = fig.data[5]
    assert heatmap.type == "heatmap"
    np.testing.assert_allclose(heatmap.z, HAND_GATES.T, atol=1e-12)
    assert (heatmap.zmin, heatmap.zmax) == (0.0, 1.0)


def test_margin_trace_figure_with_an_infinite_margin_and_no_mask():
    trace = trace_margin(np.log(HAND_PROBS), math.inf)
    fig = viz.margin_trace_figure(trace.excess, trace.keep, trace.gate_probs,
                                  math.inf)
    assert len(fig.data[3].x) == 0  # no margin line
    assert len(fig.data[4].x) == 0  # no cross
    assert [t.type for t in fig.data] == ["scatter"] * 5 + ["heatmap"]


@pytest.mark.parametrize("change, message", [
    ({"keep": np.ones((6, 3))}, "keep must be a bool array"),
    ({"keep": np.ones((5, 3), dtype=bool)}, "must share one"),
    ({"gate_probs": np.ones((6, 2))}, "must share one"),
    ({"excess": np.ones(6)}, r"excess must have shape \(T, E\)"),
    ({"margin": -0.1}, "margin must be >= 0"),
])
def test_margin_trace_figure_refuses_bad_arrays(change, message):
    arguments = dict(excess=np.zeros((6, 3)), keep=np.ones((6, 3), dtype=bool),
                     gate_probs=np.full((6, 3), 1 / 3), margin=1.0)
    with pytest.raises(ValueError, match=message):
        viz.margin_trace_figure(**{**arguments, **change})


def test_gate_stream_figure_draws_each_expert():
    gate_probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    fig = viz.gate_stream_figure(gate_probs, x_title="step")
    assert [t.name for t in fig.data] == ["expert 0", "expert 1", "expert 2"]
    for expert in range(3):
        np.testing.assert_array_equal(fig.data[expert].y, gate_probs[:, expert])
        assert fig.data[expert].x.tolist() == [0, 1]
    assert fig.layout.xaxis.title.text == "step"
    assert [s.y0 for s in fig.layout.shapes] == [pytest.approx(1 / 3)]
    with pytest.raises(ValueError, match=r"shape \(T, E\)"):
        viz.gate_stream_figure(np.zeros(3))


@pytest.mark.parametrize("function", [viz.margin_trace_figure, viz.gate_stream_figure,
                                      widgets.margin_explorer, trace_margin])
def test_docstring_args_match_signature(function):
    match = re.search(r"\n\s*Args:\n(.*?)(\n\s*\n|\Z)", function.__doc__, re.S)
    documented = re.findall(r"^ {8}(\w+):", match.group(1), re.M)
    assert documented == list(inspect.signature(function).parameters)


# ---------------------------------------------------------------------------
# The margin dashboard, driven from Python
# ---------------------------------------------------------------------------


def _check_board_shows(board, logits, margin):
    trace = trace_margin(logits, margin)
    expected = viz.margin_trace_figure(trace.excess, trace.keep, trace.gate_probs,
                                       margin)
    assert len(board.figure.data) == len(expected.data)
    for shown, wanted in zip(board.figure.data, expected.data):
        assert (shown.type, shown.name) == (wanted.type, wanted.name)
        for key in ("x", "y", "z", "customdata"):
            if key in wanted and wanted[key] is not None:
                np.testing.assert_array_equal(values(shown[key]),
                                              values(wanted[key]))
    masked = int(trace.masked_examples.sum())
    assert board.figure.layout.title.text == (
        f"margin m = {margin:g}: {masked} of {len(logits)} examples had an "
        "expert masked"
    )


def test_margin_explorer_redraws_for_the_slider():
    logits = leaning_stream(150, 4, seed=0)
    board = widgets.margin_explorer(logits, margin=2.0)
    assert isinstance(board, widgets.Dashboard)
    assert list(board.controls) == ["margin"]
    _check_board_shows(board, logits, 2.0)

    shown = []
    for margin in (0.0, 0.5, 7.25, board.controls["margin"].max):
        board.controls["margin"].value = margin
        _check_board_shows(board, logits, margin)
        assert board.message.value == "" and board.last_error is None
        shown.append(len(values(board.figure.data[5].x)))  # crosses
    assert shown[0] > shown[1] > shown[2] > 0 == shown[3]  # fewer masks as m grows

    # The static copy for the book shows the same data.
    static = board.static_figure()
    np.testing.assert_array_equal(values(static.data[0].y),
                                  values(board.figure.data[0].y))


def test_margin_explorer_slider_reaches_no_mask_by_default():
    logits = leaning_stream(60, 3, seed=5)
    top = trace_margin(logits, math.inf).excess.max()
    board = widgets.margin_explorer(logits)
    slider = board.controls["margin"]
    assert slider.min == 0.0 and slider.max == max(1.0, math.ceil(top))
    assert slider.value == 2.0
    board = widgets.margin_explorer(logits, margin=1.0, max_margin=4.0)
    assert board.controls["margin"].max == 4.0


def test_margin_explorer_fits_its_default_margin_to_a_short_stream():
    logits = leaning_stream(4, 2, seed=0)
    assert trace_margin(logits, math.inf).excess.max() <= 1.0  # slider ends at 1
    board = widgets.margin_explorer(logits)
    slider = board.controls["margin"]
    assert slider.max == 1.0 and slider.value == 1.0
    _check_board_shows(board, logits, 1.0)
    # A margin passed on purpose is still checked, and the message says why.
    with pytest.raises(ValueError, match="margin=2.0, max_margin=1.0 .sized by"):
        widgets.margin_explorer(logits, margin=2.0)


def test_margin_explorer_shows_an_invalid_state_in_its_message_area():
    logits = leaning_stream(40, 3, seed=4)
    board = widgets.margin_explorer(logits, margin=1.0)
    good = values(board.figure.data[0].y).copy()

    # Let the slider go below 0: the redraw fails and says why.
    board.controls["margin"].min = -5.0
    board.controls["margin"].value = -1.0
    assert isinstance(board.last_error, ValueError)
    assert "dmoe-error" in board.message.value
    assert "margin must be &gt;= 0" in board.message.value
    np.testing.assert_array_equal(values(board.figure.data[0].y), good)

    # A valid margin clears the message.
    board.controls["margin"].value = 0.5
    assert board.message.value == "" and board.last_error is None
    _check_board_shows(board, logits, 0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(margin=5.0, max_margin=4.0), "margin <= max_margin"),
    (dict(margin=0.0, max_margin=0.0), "max_margin > 0"),
    (dict(margin=-1.0), "margin must be >= 0"),
])
def test_margin_explorer_refuses_bad_margins(kwargs, message):
    with pytest.raises(ValueError, match=message):
        widgets.margin_explorer(leaning_stream(10, 2, seed=0), **kwargs)


def test_margin_explorer_refuses_bad_logits():
    with pytest.raises(ValueError, match="NaN or inf"):
        widgets.margin_explorer(torch.tensor([[0.0, float("nan")]]))
