"""Plotly figures of gates, training runs and scores, and a one-file HTML report.

Every figure function is pure: it takes numpy arrays (or a training history)
and returns a :class:`plotly.graph_objects.Figure`, and never displays it.
The arrays come from :mod:`dmoe_edu.analysis`:

- :func:`translation_maps_figure` and :func:`class_matrix_figure` draw the
  paper's Fig. 2 ("where" and "what" experts);
- :func:`top_examples_figure` draws Fig. 3 and :func:`joint_figure` Fig. 5;
- :func:`training_curves_figure`, :func:`expert_load_figure` and
  :func:`scores_figure` follow a run;
- :func:`write_report` puts headings, HTML and figures into a single
  self-contained HTML file (plotly.js embedded once, no network needed).

Axis titles use the package notation: ``E`` experts (``E1``, ``E2`` for the
two layers), ``C`` classes, ``L`` layers.
"""

from __future__ import annotations

import html
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ._atomic import atomic_write

GATE_COLORSCALE = "Viridis"
"""Sequential colour scale of every gate heatmap."""

_GRAY = [[0.0, "rgb(0,0,0)"], [1.0, "rgb(255,255,255)"]]
_SEPARATOR = 4  # pixels between the cells of Fig. 3
_FONT = dict(family="Helvetica, Arial, sans-serif", size=13)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _to_numpy(array: Any) -> np.ndarray:
    """Return ``array`` as numpy (torch tensors are detached to CPU)."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _float_array(array: Any, name: str, ndim: int, shape_text: str) -> np.ndarray:
    """Check the number of dimensions of a float array and return float64."""
    values = _to_numpy(array)
    if values.ndim != ndim or 0 in values.shape:
        raise ValueError(f"{name} must have shape {shape_text}, got {values.shape}")
    return values.astype(np.float64, copy=False)


def _color_range(values: np.ndarray) -> tuple[float, float]:
    """Finite min and max of ``values``; ``(0, 1)`` when none is finite."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        return low - 0.5, high + 0.5
    return low, high


def _title_width(text: str, font_size: float = _FONT["size"] * 1.4) -> int:
    """Figure width (pixels) at which a left-aligned title is not cut off.

    Plotly's default template starts the title at 5% of the width and draws it
    at 1.4 times the font size; this assumes an average glyph of 0.55 em, which
    over-estimates Helvetica a little. Tags such as ``<sup>`` are ignored and
    the longest ``<br>``-separated line counts.
    """
    lines = re.split(r"<br\s*/?>", text, flags=re.IGNORECASE)
    longest = max(len(re.sub(r"<[^>]*>", "", line)) for line in lines)
    return int(math.ceil((longest * 0.55 * font_size + 40) / 0.95))


def _axis_name(kind: str, index: int) -> str:
    """Layout key of the ``index``-th (1-based) x or y axis: xaxis, xaxis2, ..."""
    return f"{kind}axis" if index == 1 else f"{kind}axis{index}"


def _annotated_heatmap(values: np.ndarray, title: str, x_title: str, y_title: str,
                       row_name: str, col_name: str, value_name: str = "mean gate",
                       subtitle: str | None = None) -> go.Figure:
    """Matrix heatmap, row 0 on top, every cell labelled with its value."""
    num_rows, num_cols = values.shape
    low, high = _color_range(values)
    fig = go.Figure(go.Heatmap(
        z=values,
        x=np.arange(num_cols),
        y=np.arange(num_rows),
        colorscale=GATE_COLORSCALE,
        zmin=low,
        zmax=high,
        texttemplate="%{z:.2f}",
        colorbar=dict(title=dict(text=value_name)),
        hovertemplate=f"{row_name} %{{y}}<br>{col_name} %{{x}}"
                      f"<br>{value_name} %{{z:.3f}}<extra></extra>",
    ))

    # Wide enough for the title, a line more at the top for a subtitle
    text = title if subtitle is None else f"{title}<br><sup>{subtitle}</sup>"
    fig.update_layout(
        title=dict(text=text),
        width=int(min(1400, max(200 + 60 * num_cols, _title_width(title)))),
        height=int(min(1000, 170 + 45 * num_rows)),
        font=_FONT,
        margin=dict(l=80, r=30, t=70 if subtitle is None else 95, b=60),
    )
    fig.update_xaxes(title_text=x_title, tickmode="array",
                     tickvals=list(range(num_cols)),
                     ticktext=[str(c) for c in range(num_cols)])
    fig.update_yaxes(title_text=y_title, tickmode="array", autorange="reversed",
                     tickvals=list(range(num_rows)),
                     ticktext=[str(r) for r in range(num_rows)])
    return fig


def _check_history(history: Sequence[Mapping[str, Any]], keys: Sequence[str]
                   ) -> None:
    """Raise a clear error when a history is empty or misses a key."""
    if len(history) == 0:
        raise ValueError("history must hold at least one epoch, got an empty list")
    for position, entry in enumerate(history):
        missing = [key for key in keys if key not in entry]
        if missing:
            raise KeyError(f"history[{position}] misses key(s) {missing}")


def _constrained_spans(history: Sequence[Mapping[str, Any]]
                       ) -> list[tuple[float, float]]:
    """Epoch ranges ``(first - 0.5, last + 0.5)`` of each constrained stretch."""
    spans: list[tuple[float, float]] = []
    start = previous = None
    for entry in history:
        epoch = entry["epoch"]
        if entry.get("phase") == "constrained":
            if start is None:
                start = epoch
            previous = epoch
        elif start is not None:
            spans.append((start - 0.5, previous + 0.5))
            start = None
    if start is not None:
        spans.append((start - 0.5, previous + 0.5))
    return spans


def _shade_constrained(fig: go.Figure, history: Sequence[Mapping[str, Any]],
                       **where: Any) -> None:
    """Shade the epochs in which the balancing constraint was on."""
    for number, (x0, x1) in enumerate(_constrained_spans(history)):
        fig.add_vrect(
            x0=x0, x1=x1, fillcolor="rgb(120,120,120)", opacity=0.15,
            line_width=0, layer="below",
            annotation_text="constrained" if number == 0 else None,
            annotation_position="top left", **where,
        )


# ---------------------------------------------------------------------------
# Fig. 2: "where" and "what"
# ---------------------------------------------------------------------------


def translation_maps_figure(maps: Any,
                            title: str = "Mean gate probability by translation",
                            max_cols: int = 8) -> go.Figure:
    """One heatmap per expert of its mean gate for each translation (Fig. 2, top).

    Columns are ``dx`` and rows ``dy``, with ``dy = -4`` at the top, as on the
    image (a positive ``dy`` moves the digit down). All experts share one
    colour range and one colourbar, so maps can be compared by colour.

    Args:
        maps: ``(E, S, S)`` mean gates from
            :func:`dmoe_edu.analysis.gate_by_translation`, ``S = 2m + 1``
            (9 for jittered MNIST); NaN cells are left blank.
        title: figure title. Default: ``"Mean gate probability by translation"``.
        max_cols: experts per row before wrapping to a new row. Default: 8.

    Shape:
        - ``maps``: ``(E, 9, 9)``; row ``r`` is ``dy = r - 4``, column ``c`` is
          ``dx = c - 4``.

    Returns:
        go.Figure: ``E`` heatmap traces, trace ``e`` holding ``maps[e]``.

    Example:
        >>> fig = translation_maps_figure(np.random.rand(4, 9, 9))
        >>> len(fig.data)
        4
    """
    values = _float_array(maps, "maps", 3, "(E, S, S)")
    num_experts, side, side_x = values.shape
    if side != side_x or side % 2 == 0:
        raise ValueError(
            f"maps must have shape (E, S, S) with odd S, got {values.shape}"
        )
    if max_cols < 1:
        raise ValueError(f"max_cols must be >= 1, got {max_cols}")
    max_shift = side // 2
    shift_values = list(range(-max_shift, max_shift + 1))

    # A grid of subplots, one per expert
    num_cols = min(num_experts, max_cols)
    num_rows = math.ceil(num_experts / num_cols)
    fig = make_subplots(
        rows=num_rows, cols=num_cols,
        subplot_titles=[f"expert {e}" for e in range(num_experts)],
        horizontal_spacing=0.25 / num_cols, vertical_spacing=0.3 / num_rows,
    )

    # One heatmap per expert on a shared colour axis
    low, high = _color_range(values)
    for expert in range(num_experts):
        fig.add_trace(go.Heatmap(
            z=values[expert], x=shift_values, y=shift_values,
            coloraxis="coloraxis",
            hovertemplate=f"expert {expert}<br>dx %{{x}}, dy %{{y}}"
                          "<br>mean gate %{z:.3f}<extra></extra>",
        ), row=expert // num_cols + 1, col=expert % num_cols + 1)

    # Square cells, dy increasing downwards, axis titles on the outer panels
    for expert in range(num_experts):
        axis = expert + 1
        fig.layout[_axis_name("y", axis)].update(
            autorange="reversed", scaleanchor=f"x{'' if axis == 1 else axis}",
            constrain="domain", tickvals=shift_values[::2],
            title_text="dy" if expert % num_cols == 0 else None,
        )
        fig.layout[_axis_name("x", axis)].update(
            constrain="domain", tickvals=shift_values[::2],
            title_text="dx" if expert // num_cols == num_rows - 1 else None,
        )
    fig.update_layout(
        title=dict(text=title),
        coloraxis=dict(colorscale=GATE_COLORSCALE, cmin=low, cmax=high,
                       colorbar=dict(title=dict(text="mean gate"))),
        width=int(140 + 190 * num_cols),
        height=int(110 + 210 * num_rows),
        font=_FONT,
        margin=dict(l=60, r=40, t=80, b=50),
    )
    return fig


def class_matrix_figure(matrix: Any,
                        title: str = "Mean gate probability by class") -> go.Figure:
    """Experts-by-classes heatmap of mean gates, values written in the cells.

    Args:
        matrix: ``(E, C)`` mean gates from :func:`dmoe_edu.analysis.gate_by_class`.
        title: figure title. Default: ``"Mean gate probability by class"``.

    Shape:
        - ``matrix``: ``(E, C)``: expert rows (expert 0 on top), class columns.

    Returns:
        go.Figure: a single heatmap trace whose ``z`` is ``matrix``.

    Example:
        >>> class_matrix_figure(np.full((4, 10), 0.25)).data[0].z.shape
        (4, 10)
    """
    values = _float_array(matrix, "matrix", 2, "(E, C)")
    return _annotated_heatmap(values, title, x_title="class (C)",
                              y_title="expert (E)", row_name="expert",
                              col_name="class")


def joint_figure(joint: Any,
                 title: str = "Joint assignment of layer-1 and layer-2 experts",
                 normalise_rows: bool = True) -> go.Figure:
    """Layer-1 by layer-2 heatmap of the mean product gate (Fig. 5).

    Args:
        joint: ``(E1, E2)`` matrix from
            :func:`dmoe_edu.analysis.joint_assignment`.
        title: figure title.
            Default: ``"Joint assignment of layer-1 and layer-2 experts"``.
        normalise_rows: whether ``joint`` was made with
            ``joint_assignment(..., normalise_rows=True)``: each row then sums
            to 1 (or is all zero), the colour bar reads "share of row" and a
            subtitle says so. With ``False`` the values are mean product gates.
            Default: ``True``, as in :func:`~dmoe_edu.analysis.joint_assignment`.

    Shape:
        - ``joint``: ``(E1, E2)``: layer-1 expert rows, layer-2 expert columns.

    Returns:
        go.Figure: a single heatmap trace whose ``z`` is ``joint``.

    Raises:
        ValueError: if ``normalise_rows`` is True and a row sums to neither 1
            nor 0.

    Example:
        >>> joint_figure(np.full((4, 4), 0.25)).data[0].z.shape
        (4, 4)
    """
    values = _float_array(joint, "joint", 2, "(E1, E2)")
    names = dict(x_title="layer-2 expert (E2)", y_title="layer-1 expert (E1)",
                 row_name="layer-1 expert", col_name="layer-2 expert")
    if not normalise_rows:
        return _annotated_heatmap(values, title, value_name="mean product gate",
                                  **names)

    # A row-normalised matrix: every row is a layer-1 expert's split over E2
    sums = values.sum(axis=1)  # (E1,)
    if not np.all(np.isclose(sums, 1.0, atol=1e-6) | (sums == 0.0)):
        raise ValueError(
            "joint rows must each sum to 1 (or 0) when normalise_rows=True, got "
            f"row sums {np.round(sums, 4).tolist()}; pass normalise_rows=False "
            "for mean product gates"
        )
    return _annotated_heatmap(
        values, title, value_name="share of row",
        subtitle="each row sums to 1: how a layer-1 expert's inputs split "
                 "over the layer-2 experts",
        **names,
    )


# ---------------------------------------------------------------------------
# Fig. 3: the images each pair of experts likes best
# ---------------------------------------------------------------------------


def compose_top_examples(images: Any, indices: Any, gap: int = 1,
                         separator: int = 4, gap_value: int = 70,
                         separator_value: int = 170) -> np.ndarray:
    """Tile the chosen images of every pair of experts into one grayscale image.

    Cell ``(i, j)`` holds the ``k`` images ``indices[i, j]`` in a
    ``t x t`` tile, ``t = ceil(sqrt(k))``, filled row by row; slots beyond ``k``
    stay at ``gap_value``. Images in a tile are ``gap`` pixels apart and cells
    ``separator`` pixels apart. Cell ``(i, j)``, slot ``s`` starts at row
    ``i * (T_h + separator) + (s // t) * (h + gap)`` and column
    ``j * (T_w + separator) + (s % t) * (w + gap)``, with ``T_h = t h + (t-1) gap``.

    Args:
        images: ``(N, h, w)`` uint8 images (other integer dtypes in 0..255 are
            accepted).
        indices: ``(E1, E2, k)`` example indices from
            :func:`dmoe_edu.analysis.top_examples`.
        gap: pixels between images of one tile. Default: 1.
        separator: pixels between cells. Default: 4.
        gap_value: gray level of gaps and empty slots. Default: 70.
        separator_value: gray level of the separators between cells.
            Default: 170.

    Shape:
        - Output: ``(E1 T_h + (E1 - 1) separator, E2 T_w + (E2 - 1) separator)``.

    Returns:
        np.ndarray: the composite uint8 image.

    Example:
        >>> compose_top_examples(np.zeros((9, 36, 36), np.uint8),
        ...                      np.zeros((4, 4, 9), np.int64)).shape
        (452, 452)
    """
    pixels = _to_numpy(images)
    chosen = _to_numpy(indices)
    if pixels.ndim != 3 or 0 in pixels.shape:
        raise ValueError(f"images must have shape (N, h, w), got {pixels.shape}")
    if pixels.dtype != np.uint8:
        if not np.issubdtype(pixels.dtype, np.integer) or pixels.min() < 0 \
                or pixels.max() > 255:
            raise TypeError(
                f"images must be uint8 (or integers in 0..255), got {pixels.dtype}"
            )
        pixels = pixels.astype(np.uint8)
    if chosen.ndim != 3 or 0 in chosen.shape:
        raise ValueError(f"indices must have shape (E1, E2, k), got {chosen.shape}")
    if not np.issubdtype(chosen.dtype, np.integer):
        raise TypeError(f"indices must hold integers, got dtype {chosen.dtype}")
    if chosen.min() < 0 or chosen.max() >= len(pixels):
        raise ValueError(
            f"indices must lie in [0, N={len(pixels)}), got values from "
            f"{chosen.min()} to {chosen.max()}"
        )
    if min(gap, separator) < 0:
        raise ValueError(f"gap and separator must be >= 0, got {gap}, {separator}")

    # Sizes of one image, one tile and the whole composite
    num_rows, num_cols, k = chosen.shape
    height, width = pixels.shape[1:]
    tile_side = math.ceil(math.sqrt(k))
    tile_height = tile_side * height + (tile_side - 1) * gap
    tile_width = tile_side * width + (tile_side - 1) * gap
    composite = np.full(
        (num_rows * tile_height + (num_rows - 1) * separator,
         num_cols * tile_width + (num_cols - 1) * separator),
        separator_value, dtype=np.uint8,
    )  # (E1 T_h + ..., E2 T_w + ...)

    # Fill each cell: a gray tile, then its images slot by slot
    for row in range(num_rows):
        for col in range(num_cols):
            top = row * (tile_height + separator)
            left = col * (tile_width + separator)
            composite[top:top + tile_height, left:left + tile_width] = gap_value
            for slot, example in enumerate(chosen[row, col]):
                y = top + (slot // tile_side) * (height + gap)
                x = left + (slot % tile_side) * (width + gap)
                composite[y:y + height, x:x + width] = pixels[example]
    return composite


def top_examples_figure(images: Any, indices: Any,
                        title: str = "Examples with the highest product gate "
                                     "g1_i(x) g2_j(x)") -> go.Figure:
    """The paper's Fig. 3: for each pair of experts, the images it likes best.

    The whole grid is one grayscale image (see :func:`compose_top_examples`)
    drawn by a single uint8 heatmap, so the figure stays small (about 280 kB
    for 4 x 4 pairs of 9 MNIST digits).

    Args:
        images: ``(N, h, w)`` uint8 images, e.g. ``record.images``.
        indices: ``(E1, E2, k)`` example indices from
            :func:`dmoe_edu.analysis.top_examples`.
        title: figure title.
            Default: ``"Examples with the highest product gate g1_i(x) g2_j(x)"``.

    Shape:
        - ``images``: ``(N, 36, 36)``; ``indices``: ``(E1, E2, k)``.

    Returns:
        go.Figure: one heatmap whose ``z`` is the composite image.

    Example:
        >>> fig = top_examples_figure(np.zeros((9, 36, 36), np.uint8),
        ...                           np.zeros((4, 4, 9), np.int64))
        >>> fig.data[0].z.shape
        (452, 452)
    """
    composite = compose_top_examples(images, indices, separator=_SEPARATOR)
    num_rows, num_cols = _to_numpy(indices).shape[:2]
    total_height, total_width = composite.shape
    tile_height = (total_height - (num_rows - 1) * _SEPARATOR) // num_rows
    tile_width = (total_width - (num_cols - 1) * _SEPARATOR) // num_cols

    # A single grayscale trace; uint8 data keeps the figure small
    fig = go.Figure(go.Heatmap(
        z=composite, colorscale=_GRAY, zmin=0, zmax=255, showscale=False,
        hoverinfo="skip",
    ))

    # Ticks at cell centres, pixels square, row 0 on top
    scale = float(np.clip(640 / max(total_height, total_width), 0.4, 2.0))
    fig.update_xaxes(
        title_text="layer-2 expert (E2)", tickmode="array",
        tickvals=[c * (tile_width + _SEPARATOR) + (tile_width - 1) / 2
                  for c in range(num_cols)],
        ticktext=[str(c) for c in range(num_cols)], showgrid=False,
        zeroline=False, constrain="domain", side="top",
    )
    fig.update_yaxes(
        title_text="layer-1 expert (E1)", tickmode="array",
        tickvals=[r * (tile_height + _SEPARATOR) + (tile_height - 1) / 2
                  for r in range(num_rows)],
        ticktext=[str(r) for r in range(num_rows)], showgrid=False,
        zeroline=False, autorange="reversed", scaleanchor="x", constrain="domain",
    )
    fig.update_layout(
        title=dict(text=title, y=0.98),
        width=int(total_width * scale + 130),
        height=int(total_height * scale + 150),
        font=_FONT,
        margin=dict(l=80, r=30, t=110, b=30),
        plot_bgcolor="white",
    )
    return fig


# ---------------------------------------------------------------------------
# Training runs and scores
# ---------------------------------------------------------------------------


def training_curves_figure(history: Sequence[Mapping[str, Any]],
                           title: str = "Training and test error") -> go.Figure:
    """Train and test error per epoch, the constrained phase shaded.

    The training error is the one :func:`dmoe_edu.train.train` records: the
    running error over the epoch's jittered training examples, measured in
    training mode while the weights change, and with the balancing
    constraint's masks during the constrained phase. It is not the error of the
    trained model on the training set, so it can sit above the test error. Epochs
    whose ``test_error`` is ``None`` (not evaluated) are left out of the test
    line.

    Args:
        history: one dict per epoch with at least ``epoch``, ``phase``,
            ``train_error`` and ``test_error`` (percent; ``None`` for an epoch
            that was not evaluated).
        title: figure title. Default: ``"Training and test error"``.

    Returns:
        go.Figure: two line traces, ``train error (during the epoch)`` and
        ``test error``.

    Example:
        >>> history = [{"epoch": 1, "phase": "constrained", "train_error": 9.0,
        ...             "test_error": 10.0}]
        >>> [trace.name for trace in training_curves_figure(history).data]
        ['train error (during the epoch)', 'test error']
    """
    _check_history(history, ["epoch", "phase", "train_error", "test_error"])
    epochs = [entry["epoch"] for entry in history]

    # One line per error; epochs that skipped an evaluation hold None and are left out
    fig = go.Figure()
    for key, name in (("train_error", "train error (during the epoch)"),
                      ("test_error", "test error")):
        points = [(e, float(entry[key])) for e, entry in zip(epochs, history)
                  if entry[key] is not None]
        fig.add_trace(go.Scatter(
            x=[e for e, _ in points], y=[v for _, v in points], name=name,
            mode="lines+markers" if len(history) < 40 else "lines",
            hovertemplate=f"epoch %{{x}}<br>{name} %{{y:.2f}}%<extra></extra>",
        ))

    # The constrained phase as a gray band
    _shade_constrained(fig, history)
    fig.update_layout(
        title=dict(text=title), xaxis_title="epoch", yaxis_title="error (%)",
        width=760, height=420, font=_FONT, hovermode="x unified",
        margin=dict(l=70, r=30, t=70, b=60),
    )
    return fig


def expert_load_figure(history: Sequence[Mapping[str, Any]],
                       title: str = "Mean gate per expert during training"
                       ) -> go.Figure:
    """Mean gate of each expert over the epochs, one subplot per gated layer.

    A dashed line marks the uniform load ``1 / E``; the constrained phase is
    shaded. Gated layers are numbered from 1 in model order, as in
    :func:`dmoe_edu.analysis.where_what_scores`.

    Args:
        history: one dict per epoch with ``epoch``, ``phase`` and ``load``: a
            list with, per model layer, ``None`` or ``E`` mean gates.
        title: figure title. Default: ``"Mean gate per expert during training"``.

    Returns:
        go.Figure: per gated layer, one line trace per expert.

    Example:
        >>> history = [{"epoch": 1, "phase": "free", "load": [[0.5, 0.5], None]}]
        >>> len(expert_load_figure(history).data)
        2
    """
    _check_history(history, ["epoch", "phase", "load"])
    gated = [layer for layer, load in enumerate(history[0]["load"]) if load is not None]
    if not gated:
        raise ValueError("history has no gated layer: every load entry is None")
    epochs = [entry["epoch"] for entry in history]

    # One subplot per gated layer
    fig = make_subplots(
        rows=len(gated), cols=1, shared_xaxes=True, vertical_spacing=0.12 / len(gated),
        subplot_titles=[f"layer{k}" for k in range(1, len(gated) + 1)],
    )

    # One line per expert, plus the uniform load 1 / E
    for row, layer in enumerate(gated, start=1):
        try:
            loads = np.array([entry["load"][layer] for entry in history], dtype=float)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"history load of model layer {layer} must hold E floats in every "
                f"epoch"
            ) from error
        if loads.ndim != 2:
            raise ValueError(
                f"history load of model layer {layer} must have the same E in "
                f"every epoch, got shape {loads.shape}"
            )
        num_experts = loads.shape[1]  # (epochs, E)
        for expert in range(num_experts):
            fig.add_trace(go.Scatter(
                x=epochs, y=loads[:, expert], mode="lines",
                name=f"layer{row} expert {expert}", legendgroup=f"layer{row}",
                hovertemplate=f"layer{row} expert {expert}<br>epoch %{{x}}"
                              "<br>mean gate %{y:.3f}<extra></extra>",
            ), row=row, col=1)
        fig.add_hline(y=1.0 / num_experts, line_dash="dash",
                      line_color="rgb(90,90,90)", line_width=1, row=row, col=1)
        fig.update_yaxes(title_text="mean gate", rangemode="tozero", row=row, col=1)

    # The constrained phase shaded in every subplot
    _shade_constrained(fig, history, row="all", col=1)
    fig.update_xaxes(title_text="epoch", row=len(gated), col=1)
    fig.update_layout(
        title=dict(text=title), width=800, height=int(140 + 260 * len(gated)),
        font=_FONT, margin=dict(l=70, r=30, t=80, b=60),
    )
    return fig


def scores_figure(scores: Mapping[str, Mapping[str, Any]],
                  title: str = "Where and what: expert choice against "
                               "translation and class") -> go.Figure:
    """Grouped bars of the argmax scores per gated layer, with chance levels.

    For each layer, one bar for translation and one for class, each with a
    dashed segment at its chance level (the score with the factor shuffled).
    Hovering a bar also shows the soft score.

    Args:
        scores: the output of :func:`dmoe_edu.analysis.where_what_scores`.
        title: figure title.
            Default: ``"Where and what: expert choice against translation and
            class"``.

    Returns:
        go.Figure: traces ``translation``, ``class`` (bars) and ``chance``
        (segments).

    Example:
        >>> block = {"soft": 0.1, "argmax": 0.5, "chance": 0.1}
        >>> fig = scores_figure({"layer1": {"translation": block, "class": block}})
        >>> [trace.name for trace in fig.data]
        ['translation', 'class', 'chance']
    """
    if len(scores) == 0:
        raise ValueError("scores must hold at least one layer, got an empty dict")
    layers = list(scores)
    for layer in layers:
        for factor in ("translation", "class"):
            if factor not in scores[layer]:
                raise KeyError(f"scores[{layer!r}] misses key {factor!r}")
    offsets = {"translation": -0.2, "class": 0.2}
    bar_width = 0.38
    positions = np.arange(len(layers), dtype=float)

    # One bar trace per factor, at fixed offsets so the chance marks line up
    fig = go.Figure()
    chance_x: list[float | None] = []
    chance_y: list[float | None] = []
    for factor, offset in offsets.items():
        argmax = [float(scores[layer][factor]["argmax"]) for layer in layers]
        soft = [float(scores[layer][factor]["soft"]) for layer in layers]
        fig.add_trace(go.Bar(
            x=positions + offset, y=argmax, width=bar_width, name=factor,
            customdata=soft,
            hovertemplate=f"{factor}<br>argmax %{{y:.3f}}<br>soft "
                          "%{customdata:.3f}<extra></extra>",
        ))
        for position, layer in zip(positions, layers):
            chance = float(scores[layer][factor]["chance"])
            center = position + offset
            chance_x += [center - bar_width / 2, center + bar_width / 2, None]
            chance_y += [chance, chance, None]

    # Chance levels as short dashed segments over the bars
    fig.add_trace(go.Scatter(
        x=chance_x, y=chance_y, mode="lines", name="chance",
        line=dict(color="black", dash="dash", width=2),
        hovertemplate="chance %{y:.3f}<extra></extra>",
    ))

    # At least as wide as the title; automargin keeps the axis titles whole
    fig.update_layout(
        title=dict(text=title),
        xaxis=dict(title_text="gated layer (L)", tickmode="array",
                   tickvals=positions.tolist(), ticktext=layers, automargin=True),
        yaxis=dict(title_text="argmax score I(F; Z) / H(Z)", range=[0, 1],
                   automargin=True),
        width=max(int(320 + 170 * len(layers)), _title_width(title)),
        height=420, font=_FONT,
        margin=dict(l=80, r=30, t=70, b=60), bargap=0.1,
    )
    return fig


# ---------------------------------------------------------------------------
# A single self-contained HTML report
# ---------------------------------------------------------------------------

_REPORT_CSS = """
body { font-family: Helvetica, Arial, sans-serif; color: #222; margin: 0;
       background: #fafafa; line-height: 1.5; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em 4em; background: #fff; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: 0.3em; }
h2 { margin-top: 2em; color: #333; }
section { margin-bottom: 1.5em; overflow-x: auto; }
table.dmoe { border-collapse: collapse; margin: 0.8em 0; font-size: 0.95em; }
table.dmoe th, table.dmoe td { border: 1px solid #ccc; padding: 0.3em 0.7em; }
table.dmoe th { background: #f0f0f0; text-align: left; }
table.dmoe td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def write_report(path: str | os.PathLike, title: str,
                 sections: Sequence[tuple[str, str | go.Figure]]) -> pathlib.Path:
    """Write headings, HTML snippets and figures into one self-contained HTML file.

    plotly.js is embedded inline exactly once (with the first figure), so the
    file opens without a network. Headings and the title are escaped; string
    sections are inserted **as given** (the caller produces safe HTML, e.g.
    with :func:`html_table`). The file is written to a temporary file in the
    same directory and moved into place, so a reader never sees half a report.

    Args:
        path: where to write the ``.html`` file; missing parent directories
            are created.
        title: page title and top heading.
        sections: ``(heading, content)`` pairs; content is an HTML string or a
            figure.

    Returns:
        pathlib.Path: the path written.

    Example:
        >>> write_report("/tmp/report.html", "Run 1",
        ...              [("Notes", "<p>hello</p>")])  # doctest: +SKIP
        PosixPath('/tmp/report.html')
    """
    target = pathlib.Path(path)

    # Render the sections; the first figure carries plotly.js
    parts = []
    plotlyjs_done = False
    for number, section in enumerate(sections):
        if not isinstance(section, (tuple, list)) or len(section) != 2:
            raise TypeError(f"sections[{number}] must be a (heading, content) pair")
        heading, content = section
        if isinstance(content, go.Figure):
            body = content.to_html(
                full_html=False, include_plotlyjs=not plotlyjs_done,
                default_width="100%", default_height="480px",
            )
            plotlyjs_done = True
        elif isinstance(content, str):
            body = content
        else:
            raise TypeError(
                f"sections[{number}] content must be str or go.Figure, "
                f"got {type(content).__name__}"
            )
        parts.append(
            f"<section>\n<h2>{html.escape(str(heading))}</h2>\n{body}\n</section>"
        )

    # Assemble the page
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_REPORT_CSS}</style>\n"
        f"</head>\n<body>\n<main>\n<h1>{html.escape(title)}</h1>\n"
        + "\n".join(parts) + "\n</main>\n</body>\n</html>\n"
    )

    # Atomic write: a temporary file in the same directory, then a rename
    with atomic_write(target, "w", encoding="utf-8") as stream:
        stream.write(page)
    return target


def html_table(rows: Sequence[Any], header: Sequence[str] | None = None,
               float_format: str = "{:.4g}") -> str:
    """An HTML table whose cell text is escaped.

    Two forms: a list of dicts (columns are the keys in order of first
    appearance, or ``header`` when given; a missing key gives an empty cell),
    or ``header`` plus a list of sequences. ``html_table(header, rows)``, the
    header first, is also accepted. Floats are written with ``float_format``.

    Args:
        rows: a list of dicts, or a list of row sequences.
        header: column names. Default: ``None`` (the dict keys).
        float_format: format of float cells. Default: ``"{:.4g}"``.

    Returns:
        str: ``<table class="dmoe">...</table>``.

    Example:
        >>> table = html_table([{"model": "<DMoE>", "error": 1.234}])
        >>> "<td>&lt;DMoE&gt;</td>" in table, '<td class="num">1.234</td>' in table
        (True, True)
    """
    # Accept the header-first order: a list of plain strings is a header
    if (header is not None and len(rows) > 0 and all(isinstance(r, str) for r in rows)
            and not isinstance(header, str)
            and all(not isinstance(r, str) for r in header)):
        rows, header = header, rows
    rows = list(rows)

    # Columns and cells
    if rows and all(isinstance(row, Mapping) for row in rows):
        if header is None:
            header = list(dict.fromkeys(key for row in rows for key in row))
        cells = [[row.get(key, "") for key in header] for row in rows]
    else:
        if any(isinstance(row, Mapping) for row in rows):
            raise TypeError("rows must be all dicts or all sequences, not a mix")
        if header is None and rows:
            raise ValueError("header is required when rows are sequences")
        header = list(header or [])
        cells = [list(row) for row in rows]
        for number, row in enumerate(cells):
            if len(row) != len(header):
                raise ValueError(
                    f"row {number} has {len(row)} cells, expected {len(header)}"
                )

    # Escape every cell; numbers are right-aligned
    def render(value: Any) -> str:
        if value is None:
            return "<td></td>"
        if isinstance(value, (float, np.floating)):
            return f'<td class="num">{html.escape(float_format.format(value))}</td>'
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return f'<td class="num">{value}</td>'
        return f"<td>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(str(name))}</th>" for name in header)
    body = "\n".join("<tr>" + "".join(render(v) for v in row) + "</tr>"
                     for row in cells)
    return (f'<table class="dmoe">\n<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}\n</tbody>\n</table>")
