"""Tests of what notebooks 5 and 6 add: the gate-map dashboard and its figures.

The dashboard is driven from Python as a student would drive it, and every
figure it shows is compared with a naive loop over the examples (and with
:mod:`dmoe_edu.analysis`). Data are tiny synthetic digits, so the file runs in
seconds.
"""

from __future__ import annotations

import base64
import io
import zlib

import ipywidgets
import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from dmoe_edu import analysis, viz, widgets
from dmoe_edu.data import JitteredMNIST, synthetic_digits
from dmoe_edu.dmoe import DeepMoE, LayerSpec
from dmoe_edu.train import TrainConfig, train

# ---------------------------------------------------------------------------
# Helpers and references
# ---------------------------------------------------------------------------


def as_array(value) -> np.ndarray:
    """A trace property as numpy: plotly keeps arrays, lists or typed-array dicts.

    After a redraw, :func:`dmoe_edu.widgets.update_figure` stores numeric
    arrays as plotly's base64 typed-array specs (``{"dtype", "bdata",
    "shape"}``); decode those.
    """
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        if shape is None:
            return flat.copy()
        return flat.reshape([int(s) for s in str(shape).split(",")])
    return np.asarray(value, dtype=float)


def naive_by_translation(gates: np.ndarray, shifts: np.ndarray, expert: int
                         ) -> np.ndarray:
    """Mean gate of one expert per (dy, dx) cell, by a plain loop."""
    sums = np.zeros((9, 9))
    counts = np.zeros((9, 9))
    for gate, (dx, dy) in zip(gates[:, expert], shifts):
        sums[dy + 4, dx + 4] += gate
        counts[dy + 4, dx + 4] += 1
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def naive_by_class(gates: np.ndarray, labels: np.ndarray, expert: int,
                   num_classes: int = 10) -> np.ndarray:
    """Mean gate of one expert per class, by a plain loop."""
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        rows = [g for g, label in zip(gates[:, expert], labels) if label == c]
        if rows:
            out[c] = sum(rows) / len(rows)
    return out


def decode_png(uri: str) -> np.ndarray:
    """Pixels of an 8-bit grayscale PNG data URI, decoded without PIL."""
    raw = base64.b64decode(uri.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, {}
    while position < len(raw):
        length = int.from_bytes(raw[position:position + 4], "big")
        kind = raw[position + 4:position + 8]
        body = raw[position + 8:position + 8 + length]
        crc = int.from_bytes(raw[position + 8 + length:position + 12 + length], "big")
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, kind
        chunks.setdefault(kind, b"")
        chunks[kind] += body
        position += 12 + length
    width = int.from_bytes(chunks[b"IHDR"][:4], "big")
    height = int.from_bytes(chunks[b"IHDR"][4:8], "big")
    assert chunks[b"IHDR"][8:10] == b"\x08\x00"  # 8 bits, grayscale
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8)
    rows = rows.reshape(height, width + 1)
    assert np.all(rows[:, 0] == 0)  # filter "none" on every row
    return rows[:, 1:]


@pytest.fixture(scope="module")
def records():
    """Test-set gates of a tiny two-layer DMoE (4 then 2 experts) at epochs 0-2.

    Collected exactly as notebook 5 does: once before training, then from
    ``train(..., on_epoch=...)``.
    """
    data = JitteredMNIST(synthetic_digits(200, 120, seed=1), seed=1)
    torch.manual_seed(0)
    model = DeepMoE(data.input_dim, [LayerSpec(4, 16, 8), LayerSpec(2, 16, 8)],
                    margin=5.0)
    kept = {0: analysis.collect_gates(model, data.test)}

    def keep(entry):
        kept[entry["epoch"]] = analysis.collect_gates(model, data.test)

    train(model, data, TrainConfig(epochs=2, constrained_epochs=1, margin=5.0,
                                   batch_size=50), on_epoch=keep)
    kept["final"] = analysis.collect_gates(model, data.test)
    return kept


def epochs_only(records):
    return {k: v for k, v in records.items() if k != "final"}


# ---------------------------------------------------------------------------
# The dashboard
# ---------------------------------------------------------------------------


def test_controls_are_standard_widgets(records):
    board = widgets.gate_map_explorer(epochs_only(records))
    assert list(board.controls) == ["layer", "expert", "epoch"]
    assert isinstance(board.controls["layer"], ipywidgets.ToggleButtons)
    assert isinstance(board.controls["expert"], ipywidgets.IntSlider)
    assert isinstance(board.controls["epoch"], ipywidgets.SelectionSlider)
    assert board.controls["layer"].options == (("layer 1", 1), ("layer 2", 2))
    assert board.controls["expert"].max == 3  # the larger layer has 4 experts
    assert [value for _, value in board.controls["epoch"].options] == [0, 1, 2]
    assert board.values == {"layer": 1, "expert": 0, "epoch": 2}
    assert isinstance(board.figure, go.FigureWidget)


def test_first_figure_matches_naive_loops(records):
    board = widgets.gate_map_explorer(epochs_only(records))
    record = records[2]
    gates = record.gate_probs[0]
    np.testing.assert_allclose(as_array(board.figure.data[0].z),
                               naive_by_translation(gates, record.shifts, 0))
    np.testing.assert_allclose(as_array(board.figure.data[1].y),
                               naive_by_class(gates, record.labels, 0))
    assert board.figure.layout.title.text.startswith("layer 1, expert 0, after "
                                                     "epoch 2 (test error ")


@pytest.mark.parametrize("layer, expert, epoch",
                         [(1, 3, 2), (2, 1, 0), (1, 2, 1), (2, 0, 2)])
def test_moving_the_controls_redraws_the_chosen_state(records, layer, expert, epoch):
    board = widgets.gate_map_explorer(epochs_only(records))
    board.controls["epoch"].value = epoch
    board.controls["layer"].value = layer
    board.controls["expert"].value = expert
    assert board.last_error is None and board.message.value == ""

    # The figure holds the library's numbers, which equal the naive loops
    record = records[epoch]
    gates = record.gate_probs[layer - 1]  # (N, E)
    maps = analysis.gate_by_translation(gates, record.shifts)[expert]
    profile = analysis.gate_by_class(gates, record.labels)[expert]
    np.testing.assert_allclose(as_array(board.figure.data[0].z), maps)
    np.testing.assert_allclose(as_array(board.figure.data[1].y), profile)
    np.testing.assert_allclose(maps, naive_by_translation(gates, record.shifts,
                                                          expert))
    np.testing.assert_allclose(profile, naive_by_class(gates, record.labels, expert))
    assert board.figure.layout.title.text.startswith(
        f"layer {layer}, expert {expert}, after epoch {epoch} "
        f"(test error {record.error:.1f}%)")

    # The static copy for the book shows the same state
    static = board.static_figure()
    np.testing.assert_allclose(as_array(static.data[0].z), maps)


def test_the_epoch_slider_changes_what_is_shown(records):
    board = widgets.gate_map_explorer(epochs_only(records))
    before = as_array(board.figure.data[0].z).copy()
    board.controls["epoch"].value = 0
    after = as_array(board.figure.data[0].z)
    assert not np.allclose(before, after)  # training moved the gates
    np.testing.assert_allclose(
        after, naive_by_translation(records[0].gate_probs[0], records[0].shifts, 0))


def test_an_expert_the_layer_lacks_is_shown_as_an_error(records):
    board = widgets.gate_map_explorer(epochs_only(records))
    board.controls["expert"].value = 3
    good = as_array(board.figure.data[0].z).copy()
    good_title = board.figure.layout.title.text

    # Layer 2 has 2 experts: expert 3 is an invalid state
    board.controls["layer"].value = 2
    assert isinstance(board.last_error, ValueError)
    assert "layer 2 has experts 0..1, got expert 3" in board.message.value
    assert "dmoe-error" in board.message.value
    np.testing.assert_allclose(as_array(board.figure.data[0].z), good)
    assert board.figure.layout.title.text == good_title

    # A valid expert clears the message
    board.controls["expert"].value = 1
    assert board.last_error is None and board.message.value == ""
    gates = records[2].gate_probs[1]
    np.testing.assert_allclose(as_array(board.figure.data[0].z),
                               naive_by_translation(gates, records[2].shifts, 1))


def test_first_state_can_be_chosen(records):
    board = widgets.gate_map_explorer(epochs_only(records), layer=2, expert=1,
                                      epoch=1)
    assert board.values == {"layer": 2, "expert": 1, "epoch": 1}
    gates = records[1].gate_probs[1]
    np.testing.assert_allclose(as_array(board.figure.data[0].z),
                               naive_by_translation(gates, records[1].shifts, 1))


def test_on_epoch_snapshots_equal_a_fresh_collection(records):
    # train() runs (and calls on_epoch) with one thread; the fresh collection
    # uses the session's thread count, so only float rounding may differ.
    last, fresh = records[2], records["final"]
    for kept, again in zip(last.gate_probs, fresh.gate_probs):
        np.testing.assert_allclose(kept, again, rtol=1e-5, atol=1e-7)
    assert np.mean(last.predictions == fresh.predictions) > 0.95


def test_bad_records_are_refused(records):
    good = records[2]
    one_layer = analysis.GateRecord([good.gate_probs[0], None], good.labels,
                                    good.shifts, good.predictions, good.images)
    no_gate = analysis.GateRecord([None, None], good.labels, good.shifts,
                                  good.predictions, good.images)
    with pytest.raises(ValueError, match="at least one epoch"):
        widgets.gate_map_explorer({})
    with pytest.raises(ValueError, match="integers >= 0"):
        widgets.gate_map_explorer({-1: good})
    with pytest.raises(TypeError, match="must be a GateRecord"):
        widgets.gate_map_explorer({0: "not a record"})
    with pytest.raises(ValueError, match="same gated layers"):
        widgets.gate_map_explorer({0: good, 1: one_layer})
    with pytest.raises(ValueError, match="no gated layer"):
        widgets.gate_map_explorer({0: no_gate})
    with pytest.raises(ValueError, match="epoch must be one of"):
        widgets.gate_map_explorer({0: good}, epoch=7)
    with pytest.raises(ValueError, match=r"layer must be in \[1, 2\]"):
        widgets.gate_map_explorer({0: good}, layer=3)
    with pytest.raises(ValueError, match="layer 2 has experts 0..1"):
        widgets.gate_map_explorer({0: good}, layer=2, expert=2)


# ---------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------


def test_expert_profile_figure_holds_its_inputs():
    rng = np.random.default_rng(0)
    grid = rng.random((9, 9))
    grid[0, 0] = np.nan
    profile = rng.random(10)
    fig = viz.expert_profile_figure(grid, profile, num_experts=4)
    assert [t.type for t in fig.data] == ["heatmap", "bar"]
    np.testing.assert_array_equal(fig.data[0].z, grid)
    np.testing.assert_array_equal(fig.data[1].y, profile)
    assert list(fig.data[0].x) == list(range(-4, 5))
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0.0, 1.0)
    assert fig.layout.yaxis2.range == (0.0, 1.0)
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(lines) == 1 and lines[0].y0 == lines[0].y1 == 0.25
    assert fig.layout.yaxis.autorange == "reversed"  # dy = -4 on top

    # No 1 / E line without E; another range
    plain = viz.expert_profile_figure(grid[:3, :3], profile[:3], gate_range=(0, 0.5))
    assert not plain.layout.shapes and plain.data[0].zmax == 0.5


@pytest.mark.parametrize("grid, profile, kwargs, message", [
    (np.zeros((8, 8)), np.zeros(10), {}, "odd S"),
    (np.zeros((9, 7)), np.zeros(10), {}, "odd S"),
    (np.zeros((9, 9)), np.zeros((2, 5)), {}, r"\(C,\)"),
    (np.zeros((9, 9)), np.zeros(10), {"gate_range": (1, 1)}, "low < high"),
    (np.zeros((9, 9)), np.zeros(10), {"num_experts": 0}, "num_experts"),
])
def test_expert_profile_figure_rejects_bad_input(grid, profile, kwargs, message):
    with pytest.raises(ValueError, match=message):
        viz.expert_profile_figure(grid, profile, **kwargs)


def test_jittered_digits_figure_boxes_each_digit_where_it_was_pasted():
    split = synthetic_digits(0, 5, seed=3)
    test = JitteredMNIST(split, seed=3).test
    fig = viz.jittered_digits_figure(test.images, test.labels, test.shifts,
                                     max_cols=3)
    assert len(fig.data) == 5
    for n, trace in enumerate(fig.data):
        np.testing.assert_array_equal(trace.z, test.images[n])
    titles = [a.text for a in fig.layout.annotations]
    for n in range(5):
        dx, dy = test.shifts[n]
        assert titles[n] == f"{test.labels[n]}: dx {dx:+d}, dy {dy:+d}"

        # The box covers exactly the 28x28 pixels that hold the digit
        box = fig.layout.shapes[n]
        assert (box.x0, box.x1) == (3.5 + dx, 31.5 + dx)
        assert (box.y0, box.y1) == (3.5 + dy, 31.5 + dy)
        window = test.images[n, 4 + dy:32 + dy, 4 + dx:32 + dx]
        np.testing.assert_array_equal(window, split.test.images[n])
    assert fig.layout.yaxis4.domain[1] < fig.layout.yaxis.domain[0]  # 2 rows


def test_jittered_digits_figure_rejects_bad_input():
    images = np.zeros((2, 36, 36), np.uint8)
    with pytest.raises(ValueError, match=r"\(N, 36, 36\)"):
        viz.jittered_digits_figure(np.zeros((2, 28, 28), np.uint8), [0, 1],
                                   np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="labels"):
        viz.jittered_digits_figure(images, [0], np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError):
        viz.jittered_digits_figure(images, [0, 1], np.full((2, 2), 5))


def test_top_examples_png_figure_holds_the_same_pixels_as_the_heatmap():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 36, 36), dtype=np.uint8)
    top = rng.integers(0, 30, size=(4, 3, 5))
    heatmap = viz.top_examples_figure(images, top)
    png = viz.top_examples_png_figure(images, top, title="t")
    assert [t.type for t in png.data] == ["image"]
    np.testing.assert_array_equal(decode_png(png.data[0].source), heatmap.data[0].z)
    assert (png.data[0].x0, png.data[0].y0, png.data[0].dx) == (0, 0, 1)

    # Same axes as the heatmap version
    assert png.layout.xaxis.tickvals == heatmap.layout.xaxis.tickvals
    assert png.layout.yaxis.tickvals == heatmap.layout.yaxis.tickvals
    assert png.layout.yaxis.autorange == "reversed"
    assert png.layout.title.text == "t"


def test_top_examples_png_figure_is_small_and_decodes_with_pillow():
    data = JitteredMNIST(synthetic_digits(0, 200, seed=0), seed=0).test
    top = np.arange(4 * 4 * 9).reshape(4, 4, 9)
    heatmap = viz.top_examples_figure(data.images, top)
    png = viz.top_examples_png_figure(data.images, top)
    # Noisy synthetic digits compress worse than MNIST's black background
    assert len(png.to_json()) < 0.6 * len(heatmap.to_json())
    image = pytest.importorskip("PIL.Image")
    pixels = np.array(image.open(io.BytesIO(
        base64.b64decode(png.data[0].source.split(",", 1)[1]))))
    np.testing.assert_array_equal(pixels, heatmap.data[0].z)
    # The layer-2 gate reads the layer-1 output z1, not the image x.
    for fig in (heatmap, png):
        assert fig.layout.title.text.endswith("g1_i(x) g2_j(z1)")


def test_paper_comparison_figure_puts_ours_beside_the_papers():
    models = ["single", "dmoe", "concat", "dnn"]
    ours = {"test error (%)": [1.5, 1.2, 1.1, 1.2], "train error (%)": [0.8] * 4}
    paper = {"test error (%)": [1.33, 1.42, 1.30, None],
             "train error (%)": [0.85, 0.91, 0.77, 0.60]}
    spread = {"test error (%)": [0.1, 0.2, 0.3, 0.4]}
    fig = viz.paper_comparison_figure(models, ours, paper, spread=spread,
                                      names=("us", "them"))
    assert [t.name for t in fig.data] == ["us", "them", "us", "them"]
    assert [t.showlegend for t in fig.data] == [True, True, False, False]
    np.testing.assert_array_equal(fig.data[0].y, ours["test error (%)"])
    np.testing.assert_array_equal(fig.data[1].y, [1.33, 1.42, 1.30, np.nan])
    np.testing.assert_array_equal(fig.data[3].y, paper["train error (%)"])
    assert list(fig.data[0].x) == models
    np.testing.assert_array_equal(fig.data[0].error_y.array, spread["test error (%)"])
    assert fig.data[1].error_y.array is None and fig.data[2].error_y.array is None
    assert fig.data[0].xaxis == "x" and fig.data[2].xaxis == "x2"
    assert fig.layout.barmode == "group"
    assert [a.text for a in fig.layout.annotations] == list(ours)


@pytest.mark.parametrize("models, ours, paper, message", [
    ([], {"a": []}, {"a": []}, "at least one model"),
    (["m"], {}, {}, "at least one panel"),
    (["m"], {"a": [1.0]}, {"b": [1.0]}, "misses panel"),
    (["m", "n"], {"a": [1.0]}, {"a": [1.0, 2.0]}, "2 values"),
])
def test_paper_comparison_figure_rejects_bad_input(models, ours, paper, message):
    with pytest.raises((ValueError, KeyError), match=message):
        viz.paper_comparison_figure(models, ours, paper)
