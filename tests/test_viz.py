"""Tests of dmoe_edu.viz: figures hold their inputs, the report stands alone."""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from dmoe_edu import viz
from dmoe_edu.viz import (
    class_matrix_figure,
    compose_top_examples,
    expert_load_figure,
    html_table,
    joint_figure,
    scores_figure,
    top_examples_figure,
    training_curves_figure,
    translation_maps_figure,
    write_report,
)


def make_history(epochs: int = 6, constrained: int = 2) -> list[dict]:
    rng = np.random.default_rng(0)
    history = []
    for epoch in range(1, epochs + 1):
        history.append({
            "epoch": epoch,
            "phase": "constrained" if epoch <= constrained else "free",
            "lr": 0.1,
            "loss": 1.0 / epoch,
            "train_error": float(10 / epoch),
            "test_error": float(12 / epoch),
            "load": [rng.dirichlet(np.ones(4)).tolist(), None,
                     rng.dirichlet(np.ones(3)).tolist()],
        })
    return history


def make_scores() -> dict:
    return {
        "layer1": {"model_layer": 0,
                   "translation": {"soft": 0.2, "argmax": 0.5, "chance": 0.1},
                   "class": {"soft": 0.01, "argmax": 0.03, "chance": 0.01},
                   "usage": {"soft": [0.25] * 4, "argmax": [0.25] * 4}},
        "layer2": {"model_layer": 1,
                   "translation": {"soft": 0.02, "argmax": 0.05, "chance": 0.11},
                   "class": {"soft": 0.15, "argmax": 0.4, "chance": 0.012},
                   "usage": {"soft": [0.25] * 4, "argmax": [0.25] * 4}},
    }


# ---------------------------------------------------------------------------
# Heatmaps
# ---------------------------------------------------------------------------


def test_translation_maps_hold_the_maps_with_a_shared_colour_range():
    rng = np.random.default_rng(0)
    maps = rng.random((4, 9, 9))
    maps[1, 0, 0] = np.nan
    fig = translation_maps_figure(maps, title="layer 1")
    assert isinstance(fig, go.Figure) and len(fig.data) == 4
    for expert, trace in enumerate(fig.data):
        np.testing.assert_array_equal(np.asarray(trace.z, dtype=float), maps[expert])
        assert list(trace.x) == list(range(-4, 5)) == list(trace.y)
        assert trace.coloraxis == "coloraxis"
    assert fig.layout.coloraxis.cmin == np.nanmin(maps)
    assert fig.layout.coloraxis.cmax == np.nanmax(maps)
    assert fig.layout.yaxis.autorange == "reversed"
    assert fig.layout.title.text == "layer 1"


def test_translation_maps_wrap_many_experts():
    fig = translation_maps_figure(np.zeros((16, 9, 9)), max_cols=8)
    assert len(fig.data) == 16
    assert fig.layout.yaxis16.autorange == "reversed"


def test_translation_maps_reject_bad_shape():
    with pytest.raises(ValueError, match=r"\(E, S, S\)"):
        translation_maps_figure(np.zeros((4, 9, 8)))


def test_class_and_joint_matrices():
    rng = np.random.default_rng(1)
    matrix = rng.random((4, 10))
    fig = class_matrix_figure(matrix)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), matrix)
    assert fig.data[0].texttemplate
    assert "C" in fig.layout.xaxis.title.text and "E" in fig.layout.yaxis.title.text

    joint = rng.random((4, 16))
    joint /= joint.sum(axis=1, keepdims=True)
    fig = joint_figure(joint)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), joint)
    assert "E2" in fig.layout.xaxis.title.text
    assert "E1" in fig.layout.yaxis.title.text


def test_joint_figure_says_rows_sum_to_one():
    joint = np.array([[0.25, 0.75], [0.0, 0.0], [0.5, 0.5]])
    fig = joint_figure(joint)
    assert fig.data[0].colorbar.title.text == "share of row"
    assert "share of row" in fig.data[0].hovertemplate
    assert "each row sums to 1" in fig.layout.title.text
    assert "mean gate" not in fig.to_json()

    # Raw mean product gates: no claim about the rows.
    raw = joint_figure(joint / 4, normalise_rows=False)
    assert raw.data[0].colorbar.title.text == "mean product gate"
    assert "sums to 1" not in raw.layout.title.text
    with pytest.raises(ValueError, match=r"rows must each sum to 1.*0\.25"):
        joint_figure(joint / 4)


# ---------------------------------------------------------------------------
# Fig. 3 composite
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 5])
def test_top_examples_composite_pixels(k):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(20, 36, 36), dtype=np.uint8)
    indices = rng.integers(0, 20, size=(2, 3, k))
    fig = top_examples_figure(images, indices)
    assert len(fig.data) == 1
    composite = np.asarray(fig.data[0].z)
    assert composite.dtype == np.uint8

    # Geometry written out independently of the implementation
    side, gap, separator = math.ceil(math.sqrt(k)), 1, 4
    tile = side * 36 + (side - 1) * gap
    assert composite.shape == (2 * tile + separator, 3 * tile + separator * 2)
    for slot in range(k):
        top = 1 * (tile + separator) + (slot // side) * (36 + gap)
        left = 2 * (tile + separator) + (slot % side) * (36 + gap)
        np.testing.assert_array_equal(composite[top:top + 36, left:left + 36],
                                      images[indices[1, 2, slot]])

    # A slot beyond k (k = 5 in a 3 x 3 tile) is padded, not an image
    if k == 5:
        top, left = (8 // side) * 37, (8 % side) * 37
        assert (composite[top:top + 36, left:left + 36] == 70).all()


def test_top_examples_figure_stays_small():
    images = np.zeros((100, 36, 36), np.uint8)
    fig = top_examples_figure(images, np.zeros((4, 4, 9), np.int64))
    pixels = np.asarray(fig.data[0].z).size
    # uint8 base64: about 4/3 bytes per pixel plus the layout
    assert len(fig.to_json()) < pixels * 4 / 3 + 20_000


def test_compose_rejects_bad_indices():
    with pytest.raises(ValueError, match=r"\[0, N=3\)"):
        compose_top_examples(np.zeros((3, 36, 36), np.uint8),
                             np.full((1, 1, 1), 3))
    with pytest.raises(TypeError, match="uint8"):
        compose_top_examples(np.zeros((3, 36, 36)), np.zeros((1, 1, 1), int))


# ---------------------------------------------------------------------------
# Training runs and scores
# ---------------------------------------------------------------------------


def test_training_curves_hold_errors_and_shade_constrained_phase():
    history = make_history(epochs=6, constrained=2)
    fig = training_curves_figure(history)
    train, test = fig.data
    assert list(train.x) == [1, 2, 3, 4, 5, 6]
    assert list(train.y) == [h["train_error"] for h in history]
    assert list(test.y) == [h["test_error"] for h in history]
    rects = [shape for shape in fig.layout.shapes if shape.type == "rect"]
    assert [(r.x0, r.x1) for r in rects] == [(0.5, 2.5)]


def test_training_curves_name_the_running_train_error():
    fig = training_curves_figure(make_history())
    assert [trace.name for trace in fig.data] == [
        "train error (during the epoch)", "test error"
    ]
    assert "running error" in training_curves_figure.__doc__


def test_training_curves_skip_epochs_without_a_test_error():
    history = make_history(epochs=5)
    for entry in history[:-1:2]:
        entry["test_error"] = None
    train, test = training_curves_figure(history).data
    assert list(train.x) == [1, 2, 3, 4, 5]
    assert list(test.x) == [2, 4, 5]
    assert list(test.y) == [history[i]["test_error"] for i in (1, 3, 4)]


def test_training_curves_reject_missing_key():
    with pytest.raises(KeyError, match="test_error"):
        training_curves_figure([{"epoch": 1, "phase": "free", "train_error": 1.0}])


def test_expert_load_one_line_per_expert_per_gated_layer():
    history = make_history()
    fig = expert_load_figure(history)
    assert len(fig.data) == 4 + 3
    for expert in range(4):
        np.testing.assert_allclose(fig.data[expert].y,
                                   [h["load"][0][expert] for h in history])
    for expert in range(3):
        np.testing.assert_allclose(fig.data[4 + expert].y,
                                   [h["load"][2][expert] for h in history])
    assert fig.data[4].yaxis == "y2"
    # Gated layers are numbered from 1 alone, with no 0-based model index.
    titles = [a.text for a in fig.layout.annotations if a.text != "constrained"]
    assert titles == ["layer1", "layer2"]


def test_scores_figure_bars_and_chance():
    scores = make_scores()
    fig = scores_figure(scores)
    translation, klass, chance = fig.data
    assert list(translation.y) == [0.5, 0.05]
    assert list(klass.y) == [0.03, 0.4]
    levels = [y for y in chance.y if y is not None]
    assert levels == [0.1, 0.1, 0.11, 0.11, 0.01, 0.01, 0.012, 0.012]
    assert list(fig.layout.xaxis.ticktext) == ["layer1", "layer2"]


def test_scores_figure_of_one_layer_fits_its_title_and_axis_title():
    scores = {"layer1": make_scores()["layer1"]}
    fig = scores_figure(scores)
    title = fig.layout.title.text
    # A title glyph is about half its font size wide; the title starts at 5%.
    title_size = fig.layout.font.size * 1.4
    assert fig.layout.width * 0.95 >= len(title) * 0.5 * title_size + 30
    assert fig.layout.yaxis.automargin and fig.layout.margin.l >= 80


# ---------------------------------------------------------------------------
# Report and table
# ---------------------------------------------------------------------------


def test_write_report_is_self_contained(tmp_path):
    maps_fig = translation_maps_figure(np.random.default_rng(0).random((4, 9, 9)))
    sections = [
        ("Where <experts>", maps_fig),
        ("Scores", scores_figure(make_scores())),
        ("Table", html_table([{"model": "DMoE", "error": 1.23}])),
    ]
    path = write_report(tmp_path / "report.html", "Run & report", sections)
    assert path == tmp_path / "report.html"
    text = path.read_text(encoding="utf-8")

    # plotly.js exactly once, nothing fetched from the network
    assert text.count(get_plotlyjs()[:300]) == 1
    assert not re.search(r"<script[^>]*\bsrc=", text)
    assert "Where &lt;experts&gt;" in text and "<h2>Scores</h2>" in text
    assert "<h1>Run &amp; report</h1>" in text
    assert text.count('class="plotly-graph-div"') == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_write_report_replaces_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "sub" / "r.html"
    write_report(target, "first", [("A", "<p>a</p>")])
    write_report(target, "second", [("B", "<p>b</p>")])
    assert "second" in target.read_text() and "first" not in target.read_text()
    with pytest.raises(TypeError, match=r"sections\[1\]"):
        write_report(target, "third", [("A", "<p>a</p>"), ("B", 3)])
    assert "second" in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["r.html"]


def test_write_report_removes_temp_file_when_the_move_fails(tmp_path, monkeypatch):
    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(viz.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path / "r.html", "t", [("A", "<p>a</p>")])
    assert list(tmp_path.iterdir()) == []


def test_html_table_escapes_and_accepts_both_forms():
    table = html_table([{"name": "<b>", "value": 0.123456}, {"name": "x & y"}])
    assert "<td>&lt;b&gt;</td>" in table and "<td>x &amp; y</td>" in table
    assert '<td class="num">0.1235</td>' in table
    assert table.count("<tr>") == 3

    rows = [["a", 1], ["b", 2]]
    assert html_table(rows, header=["k", "v"]) == html_table(["k", "v"], rows)
    with pytest.raises(ValueError, match="expected 2"):
        html_table([["a"]], header=["k", "v"])


# ---------------------------------------------------------------------------
# Documentation stays in step with the code
# ---------------------------------------------------------------------------


PUBLIC_FUNCTIONS = [
    "translation_maps_figure", "class_matrix_figure", "joint_figure",
    "compose_top_examples", "top_examples_figure", "training_curves_figure",
    "expert_load_figure", "scores_figure", "write_report", "html_table",
]


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_docstring_args_match_signature(name):
    function = getattr(viz, name)
    match = re.search(r"\n\s*Args:\n(.*?)(\n\s*\n|\Z)", function.__doc__, re.S)
    documented = re.findall(r"^ {8}(\w+):", match.group(1), re.M)
    assert documented == list(inspect.signature(function).parameters)
