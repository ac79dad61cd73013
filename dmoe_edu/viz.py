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


TOP_EXAMPLES_TITLE = "Examples with the highest product gate g1_i(x) g2_j(z1)"
"""Default title of the paper's Fig. 3 (:func:`top_examples_figure`)."""


def top_examples_figure(images: Any, indices: Any,
                        title: str = TOP_EXAMPLES_TITLE) -> go.Figure:
    """The paper's Fig. 3: for each pair of experts, the images it likes best.

    The whole grid is one grayscale image (see :func:`compose_top_examples`)
    drawn by a single uint8 heatmap, so the figure stays small (about 280 kB
    for 4 x 4 pairs of 9 MNIST digits).

    Args:
        images: ``(N, h, w)`` uint8 images, e.g. ``record.images``.
        indices: ``(E1, E2, k)`` example indices from
            :func:`dmoe_edu.analysis.top_examples`.
        title: figure title. Default: :data:`TOP_EXAMPLES_TITLE`.

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


def _expert_colors(num_experts: int) -> list[str]:
    """One colour per expert from plotly's default palette, reused past 10."""
    from plotly.colors import qualitative

    return [qualitative.Plotly[e % len(qualitative.Plotly)] for e in range(num_experts)]


def _stream_mode(num_steps: int) -> str:
    """Markers on short streams, plain lines on long ones."""
    return "lines+markers" if num_steps <= 40 else "lines"


def gate_stream_figure(gate_probs: Any,
                       title: str = "Gate probability of each expert",
                       x_title: str = "example t") -> go.Figure:
    """Each expert's gate probability along a stream of examples or steps.

    Args:
        gate_probs: ``(T, E)`` gate probabilities, row ``t`` for step ``t``.
        title: figure title. Default: ``"Gate probability of each expert"``.
        x_title: title of the step axis. Default: ``"example t"``.

    Shape:
        - ``gate_probs``: ``(T, E)``.

    Returns:
        go.Figure: one line trace per expert, ``y`` its gate over the steps, and a
        dashed line at the uniform gate ``1 / E``.

    Example:
        >>> fig = gate_stream_figure(np.array([[0.5, 0.5], [0.9, 0.1]]))
        >>> [trace.name for trace in fig.data], fig.data[0].y.tolist()
        (['expert 0', 'expert 1'], [0.5, 0.9])
    """
    values = _float_array(gate_probs, "gate_probs", 2, "(T, E)")
    num_steps, num_experts = values.shape
    steps = np.arange(num_steps)

    # One line per expert, in the same colours as margin_trace_figure
    fig = go.Figure()
    for expert, color in enumerate(_expert_colors(num_experts)):
        fig.add_trace(go.Scatter(
            x=steps, y=values[:, expert], mode=_stream_mode(num_steps),
            name=f"expert {expert}", line=dict(color=color),
            hovertemplate=f"expert {expert}<br>{x_title} %{{x}}"
                          "<br>gate %{y:.3f}<extra></extra>",
        ))
    fig.add_hline(y=1.0 / num_experts, line_dash="dash", line_color="rgb(90,90,90)",
                  line_width=1)
    fig.update_layout(
        title=dict(text=title), xaxis_title=x_title, yaxis_title="gate probability",
        width=max(760, _title_width(title)), height=400, font=_FONT,
        margin=dict(l=70, r=30, t=70, b=60),
    )
    fig.update_yaxes(range=[-0.02, 1.02])
    return fig


def margin_trace_figure(excess: Any, keep: Any, gate_probs: Any, margin: float,
                        title: str = "The margin rule along a stream of examples"
                        ) -> go.Figure:
    """Running load of each expert against the margin, where masks fire, the gates.

    Draws a :class:`dmoe_edu.balance.MarginTrace`: on top, each expert's running
    gate mass minus the mean over experts (``excess``), the margin ``m`` as a
    dashed line and a cross wherever an expert was masked; below, a heatmap of
    the gate each example actually got (a masked expert's cell is 0), with the
    values written in the cells of a stream of at most 20 examples.

    Args:
        excess: ``(T, E)`` running totals minus their mean, before each example.
        keep: ``(T, E)`` bool, ``False`` where the rule masked the expert.
        gate_probs: ``(T, E)`` the masked, renormalised gates.
        margin: the margin ``m`` (``math.inf`` draws an empty margin line).
        title: figure title.
            Default: ``"The margin rule along a stream of examples"``.

    Shape:
        - ``excess``, ``keep``, ``gate_probs``: ``(T, E)``.

    Returns:
        go.Figure: ``E`` excess lines; the ``"margin m"`` line; the ``"masked"``
        markers (``x`` the example, ``y`` the masked expert's excess,
        ``customdata`` the expert); a heatmap whose ``z`` is ``gate_probs.T``,
        experts ``E`` down and examples ``t`` across.

    Example:
        >>> fig = margin_trace_figure(np.array([[0.0, 0.0], [0.5, -0.5]]),
        ...                           np.array([[True, True], [False, True]]),
        ...                           np.array([[0.9, 0.1], [0.0, 1.0]]), 0.25)
        >>> [trace.name for trace in fig.data]
        ['expert 0', 'expert 1', 'margin m', 'masked', 'gate used']
        >>> fig.data[3].x.tolist(), fig.data[3].customdata.tolist()
        ([1], [0])
    """
    excess_values = _float_array(excess, "excess", 2, "(T, E)")
    gates = _float_array(gate_probs, "gate_probs", 2, "(T, E)")
    keep_values = _to_numpy(keep)
    if keep_values.dtype != np.bool_:
        raise ValueError(f"keep must be a bool array, got dtype {keep_values.dtype}")
    shapes = {"excess": excess_values.shape, "keep": keep_values.shape,
              "gate_probs": gates.shape}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"excess, keep and gate_probs must share one (T, E) shape, "
                         f"got {shapes}")
    margin = float(margin)
    if math.isnan(margin) or margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    num_steps, num_experts = excess_values.shape
    steps = np.arange(num_steps)

    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
        row_heights=[0.62, 0.38],
        subplot_titles=["running gate mass minus the mean (what the rule tests)",
                        "gate each example got (a masked expert gets 0)"],
    )

    # Top: each expert's excess over the mean
    for expert, color in enumerate(_expert_colors(num_experts)):
        fig.add_trace(go.Scatter(
            x=steps, y=excess_values[:, expert], mode=_stream_mode(num_steps),
            name=f"expert {expert}", line=dict(color=color),
            hovertemplate=f"expert {expert}<br>example %{{x}}"
                          "<br>excess %{y:.3f}<extra></extra>",
        ), row=1, col=1)

    # The margin as a dashed line (empty for an infinite margin), crosses on masks
    ends = [steps[0], steps[-1]] if math.isfinite(margin) else []
    fig.add_trace(go.Scatter(
        x=ends, y=[margin] * len(ends), mode="lines", name="margin m",
        line=dict(color="rgb(176,0,32)", dash="dash", width=1.5),
        hovertemplate=f"margin m = {margin:g}<extra></extra>",
    ), row=1, col=1)
    rows, experts = np.nonzero(~keep_values)  # (masked entries,) each
    fig.add_trace(go.Scatter(
        x=rows, y=excess_values[rows, experts], customdata=experts, mode="markers",
        name="masked", marker=dict(symbol="x-thin", size=8, color="rgb(176,0,32)",
                                   line=dict(width=2, color="rgb(176,0,32)")),
        hovertemplate="example %{x}: expert %{customdata} masked"
                      "<br>excess %{y:.3f}<extra></extra>",
    ), row=1, col=1)

    # Bottom: the gates used, experts down and examples across
    fig.add_trace(go.Heatmap(
        z=gates.T, x=steps, y=np.arange(num_experts), zmin=0.0, zmax=1.0,
        colorscale=GATE_COLORSCALE, name="gate used",
        texttemplate="%{z:.2f}" if num_steps <= 20 else None,
        colorbar=dict(title=dict(text="gate"), len=0.36, y=0.19),
        hovertemplate="example %{x}<br>expert %{y}<br>gate %{z:.3f}<extra></extra>",
    ), row=2, col=1)

    fig.update_yaxes(title_text="G_e - mean G", row=1, col=1)
    fig.update_yaxes(title_text="expert (E)", autorange="reversed", tickmode="array",
                     tickvals=list(range(num_experts)), row=2, col=1)
    fig.update_xaxes(title_text="example t", row=2, col=1)
    fig.update_layout(
        title=dict(text=title), width=max(820, _title_width(title)), height=640,
        font=_FONT, margin=dict(l=70, r=30, t=90, b=60),
        legend=dict(y=1.0, yanchor="top"),
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
# Jittered digits, one expert's profile, our table beside the paper's
# ---------------------------------------------------------------------------


def jittered_digits_figure(images: Any, labels: Any, shifts: Any,
                           title: str = "Jittered digits and their shifts",
                           max_cols: int = 8) -> go.Figure:
    """A few jittered digits, each titled with its class and shift ``(dx, dy)``.

    A dashed box on each canvas marks where the 28x28 digit was pasted, so the
    shift can be read off the picture: the box of ``(dx, dy)`` spans columns
    ``4 + dx .. 31 + dx`` and rows ``4 + dy .. 31 + dy`` of the 36x36 canvas.

    Args:
        images: ``(N, 36, 36)`` uint8 canvases, e.g. ``data.test.images[:8]``.
        labels: ``(N,)`` integer classes.
        shifts: ``(N, 2)`` integer shifts, ``dx`` in column 0 and ``dy`` in
            column 1, each in ``-4..4``.
        title: figure title. Default: ``"Jittered digits and their shifts"``.
        max_cols: canvases per row before wrapping. Default: 8.

    Shape:
        - ``images``: ``(N, 36, 36)``; ``labels``: ``(N,)``; ``shifts``: ``(N, 2)``.

    Returns:
        go.Figure: ``N`` grayscale heatmaps, trace ``n`` holding ``images[n]``,
        and one rectangle shape per digit.

    Example:
        >>> fig = jittered_digits_figure(np.zeros((2, 36, 36), np.uint8),
        ...                              np.array([3, 7]), np.array([[1, -2], [0, 4]]))
        >>> len(fig.data), [shape.x0 for shape in fig.layout.shapes]
        (2, [4.5, 3.5])
    """
    from .data.jitter import CANVAS, MAX_SHIFT, check_shifts

    pixels = _to_numpy(images)
    if pixels.ndim != 3 or pixels.shape[1:] != (CANVAS, CANVAS) or len(pixels) == 0:
        raise ValueError(
            f"images must have shape (N, {CANVAS}, {CANVAS}) with N >= 1, "
            f"got {pixels.shape}"
        )
    num_images = len(pixels)
    classes = _to_numpy(labels).reshape(-1)
    if classes.shape != (num_images,):
        raise ValueError(f"labels must have shape ({num_images},), got {classes.shape}")
    offsets = check_shifts(_to_numpy(shifts), num_images)  # (N, 2)
    if max_cols < 1:
        raise ValueError(f"max_cols must be >= 1, got {max_cols}")
    digit_side = CANVAS - 2 * MAX_SHIFT

    # One small panel per canvas, titled with its class and shift
    num_cols = min(num_images, max_cols)
    num_rows = math.ceil(num_images / num_cols)
    fig = make_subplots(
        rows=num_rows, cols=num_cols,
        subplot_titles=[f"{int(c)}: dx {dx:+d}, dy {dy:+d}"
                        for c, (dx, dy) in zip(classes, offsets.tolist())],
        horizontal_spacing=0.1 / num_cols, vertical_spacing=0.25 / num_rows,
    )

    # The canvas as a grayscale heatmap, the pasted digit's box dashed on top
    for number in range(num_images):
        row, col = number // num_cols + 1, number % num_cols + 1
        fig.add_trace(go.Heatmap(
            z=pixels[number], colorscale=_GRAY, zmin=0, zmax=255, showscale=False,
            hovertemplate="row %{y}, column %{x}<br>pixel %{z}<extra></extra>",
        ), row=row, col=col)
        dx, dy = (int(v) for v in offsets[number])
        left, top = MAX_SHIFT + dx - 0.5, MAX_SHIFT + dy - 0.5
        fig.add_shape(type="rect", x0=left, x1=left + digit_side, y0=top,
                      y1=top + digit_side, line=dict(color="rgb(230,80,60)",
                                                     width=1, dash="dash"),
                      row=row, col=col)

    # Square pixels, row 0 on top, no ticks
    for number in range(num_images):
        axis = number + 1
        fig.layout[_axis_name("y", axis)].update(
            autorange="reversed", scaleanchor=f"x{'' if axis == 1 else axis}",
            constrain="domain", showticklabels=False, showgrid=False, zeroline=False,
        )
        fig.layout[_axis_name("x", axis)].update(
            constrain="domain", showticklabels=False, showgrid=False, zeroline=False,
        )
    fig.update_annotations(font_size=12)
    fig.update_layout(
        title=dict(text=title), width=int(60 + 130 * num_cols),
        height=int(90 + 150 * num_rows), font=_FONT,
        margin=dict(l=30, r=30, t=80, b=20), plot_bgcolor="white",
    )
    return fig


def expert_profile_figure(translation_map: Any, class_profile: Any,
                          num_experts: int | None = None,
                          title: str = "One expert: mean gate by translation "
                                       "and by class",
                          gate_range: tuple[float, float] = (0.0, 1.0)) -> go.Figure:
    """One expert's mean gate per translation (a map) beside its mean per class.

    The two halves of the paper's Fig. 2 for a single expert: on the left the
    ``S x S`` map of its mean gate per shift (columns ``dx``, rows ``dy``,
    ``dy = -m`` at the top), on the right a bar per class. Both use the fixed
    ``gate_range``, so figures of different experts or epochs compare by eye.
    With ``num_experts`` a dashed line marks ``1 / E``, the level of a gate that
    ignores the class.

    Args:
        translation_map: ``(S, S)`` mean gates, one expert's slice of
            :func:`dmoe_edu.analysis.gate_by_translation` (``S`` odd, 9 for
            jittered MNIST); NaN cells stay blank.
        class_profile: ``(C,)`` mean gates, one expert's row of
            :func:`dmoe_edu.analysis.gate_by_class`.
        num_experts: the layer's ``E``, for the ``1 / E`` line, or ``None`` for
            no line. Default: ``None``.
        title: figure title.
            Default: ``"One expert: mean gate by translation and by class"``.
        gate_range: colour range of the map and value range of the bars.
            Default: ``(0.0, 1.0)``.

    Shape:
        - ``translation_map``: ``(9, 9)``; ``class_profile``: ``(C,)``.

    Returns:
        go.Figure: a heatmap trace whose ``z`` is ``translation_map``, then a bar
        trace whose ``y`` is ``class_profile``.

    Example:
        >>> fig = expert_profile_figure(np.full((9, 9), 0.25), np.full(10, 0.25),
        ...                             num_experts=4)
        >>> [trace.type for trace in fig.data], fig.data[1].y.shape
        (['heatmap', 'bar'], (10,))
    """
    grid = _float_array(translation_map, "translation_map", 2, "(S, S)")
    side = grid.shape[0]
    if grid.shape != (side, side) or side % 2 == 0:
        raise ValueError(
            f"translation_map must have shape (S, S) with odd S, got {grid.shape}"
        )
    profile = _float_array(class_profile, "class_profile", 1, "(C,)")
    low, high = (float(v) for v in gate_range)
    if not low < high:
        raise ValueError(f"gate_range must be (low, high) with low < high, "
                         f"got {gate_range!r}")
    if num_experts is not None and num_experts < 1:
        raise ValueError(f"num_experts must be >= 1 or None, got {num_experts}")
    max_shift = side // 2
    shift_values = list(range(-max_shift, max_shift + 1))
    classes = np.arange(len(profile))

    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55],
                        horizontal_spacing=0.22,
                        subplot_titles=["by translation (dx, dy)", "by class"])

    # Left: the map, on the fixed colour range
    fig.add_trace(go.Heatmap(
        z=grid, x=shift_values, y=shift_values, colorscale=GATE_COLORSCALE,
        zmin=low, zmax=high,
        colorbar=dict(title=dict(text="mean gate"), x=0.37, xanchor="left",
                      len=0.9, thickness=15),
        hovertemplate="dx %{x}, dy %{y}<br>mean gate %{z:.3f}<extra></extra>",
    ), row=1, col=1)

    # Right: one bar per class, and the uniform level 1 / E
    fig.add_trace(go.Bar(
        x=classes, y=profile, marker_color="rgb(60,110,170)", showlegend=False,
        hovertemplate="class %{x}<br>mean gate %{y:.3f}<extra></extra>",
    ), row=1, col=2)
    if num_experts is not None:
        fig.add_hline(y=1.0 / num_experts, line_dash="dash",
                      line_color="rgb(90,90,90)", line_width=1,
                      annotation_text="1 / E", annotation_position="top right",
                      row=1, col=2)

    # Square map with dy growing downwards; classes as integer ticks
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain",
                     tickvals=shift_values[::2], title_text="dy", row=1, col=1)
    fig.update_xaxes(constrain="domain", tickvals=shift_values[::2],
                     title_text="dx", row=1, col=1)
    fig.update_xaxes(title_text="class (C)", tickmode="array",
                     tickvals=classes.tolist(), row=1, col=2)
    fig.update_yaxes(title_text="mean gate", range=[low, high], row=1, col=2)
    fig.update_layout(
        title=dict(text=title), width=max(900, _title_width(title)), height=420,
        font=_FONT, margin=dict(l=60, r=30, t=90, b=60),
    )
    return fig


def paper_comparison_figure(models: Sequence[str],
                            ours: Mapping[str, Sequence[float | None]],
                            paper: Mapping[str, Sequence[float | None]],
                            spread: Mapping[str, Sequence[float]] | None = None,
                            title: str = "Our errors beside the paper's",
                            names: tuple[str, str] = ("ours", "paper")) -> go.Figure:
    """Grouped bars, ours beside the paper's, per model; one panel per measure.

    Each key of ``ours`` is a panel (e.g. ``"test error (%)"`` and
    ``"train error (%)"``) and must also be a key of ``paper``. In each panel
    every model gets two bars; a ``None`` (a number the paper does not report)
    leaves its bar out. ``spread`` adds symmetric error bars to our bars, e.g.
    one standard error of a test error measured on a finite test set.

    Args:
        models: the model names along the x axis (``M`` of them).
        ours: panel name to ``M`` of our values.
        paper: panel name to ``M`` of the paper's values, for the same panels.
        spread: panel name to ``M`` half-widths of our error bars, or ``None``.
            Default: ``None``.
        title: figure title. Default: ``"Our errors beside the paper's"``.
        names: legend names of the two bar series. Default: ``("ours", "paper")``.

    Shape:
        - every sequence: ``(M,)``.

    Returns:
        go.Figure: per panel, in order, a bar trace of ours then one of the
        paper's (``y`` with NaN for ``None``).

    Example:
        >>> fig = paper_comparison_figure(["dmoe", "dnn"], {"test": [1.2, 1.3]},
        ...                               {"test": [1.4, None]})
        >>> [trace.name for trace in fig.data], fig.data[1].y.tolist()
        (['ours', 'paper'], [1.4, nan])
    """
    labels = [str(model) for model in models]
    if not labels:
        raise ValueError("models must name at least one model, got none")
    if not ours:
        raise ValueError("ours must hold at least one panel, got an empty mapping")
    missing = [panel for panel in ours if panel not in paper]
    if missing:
        raise KeyError(f"paper misses panel(s) {missing} that ours has")

    def column(values: Sequence[float | None], what: str) -> np.ndarray:
        array = np.array([np.nan if v is None else float(v) for v in values])
        if array.shape != (len(labels),):
            raise ValueError(
                f"{what} must hold {len(labels)} values (one per model), "
                f"got {array.shape[0]}"
            )
        return array

    panels = list(ours)
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=panels,
                        horizontal_spacing=0.3 / len(panels))

    # Two bars per model in each panel; one legend entry per series
    colors = ("rgb(60,110,170)", "rgb(190,190,190)")
    text_colors = ("white", "rgb(40,40,40)")
    for number, panel in enumerate(panels, start=1):
        errors = None
        if spread is not None and panel in spread:
            errors = dict(type="data", array=column(spread[panel],
                                                    f"spread[{panel!r}]"),
                          visible=True, thickness=1.2)
        for series, values, color, text_color in (
                (names[0], ours[panel], colors[0], text_colors[0]),
                (names[1], paper[panel], colors[1], text_colors[1])):
            fig.add_trace(go.Bar(
                x=labels, y=column(values, f"{series}[{panel!r}]"), name=series,
                marker_color=color, legendgroup=series, showlegend=number == 1,
                error_y=errors if series == names[0] else None,
                texttemplate="%{y:.2f}", textposition="inside", textangle=0,
                insidetextanchor="start", textfont=dict(color=text_color),
                hovertemplate=f"{series}<br>%{{x}}: %{{y:.2f}}<extra></extra>",
            ), row=1, col=number)
        fig.update_yaxes(title_text=panel, rangemode="tozero", row=1, col=number)
        fig.update_xaxes(title_text="model", row=1, col=number)
    fig.update_layout(
        title=dict(text=title), barmode="group",
        width=max(int(180 + 380 * len(panels)), _title_width(title)), height=440,
        font=_FONT, margin=dict(l=70, r=30, t=80, b=60),
    )
    return fig


def _png_data_uri(gray: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URI of a ``(h, w)`` uint8 grayscale image.

    A plain PNG writer (one IDAT chunk, filter 0 on every row, zlib level 9):
    digit grids are mostly black, so the PNG is far smaller than the same
    pixels stored as a heatmap's numbers.
    """
    import base64
    import struct
    import zlib

    height, width = gray.shape

    # Each row is one filter byte (0: none) followed by its pixels
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # (h, 1 + w)
    rows[:, 1:] = gray

    # Chunks: length, type, data, CRC of type and data
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
           + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def top_examples_png_figure(images: Any, indices: Any,
                            title: str = TOP_EXAMPLES_TITLE) -> go.Figure:
    """The paper's Fig. 3 as :func:`top_examples_figure`, the grid stored as a PNG.

    Same layout, axes and ticks as :func:`top_examples_figure`, but the
    composite image is one ``go.Image`` trace holding a PNG, about 8 times
    smaller (about 36 kB instead of 300 kB for 4 x 4 pairs of 9 jittered
    digits): the figure to keep in a committed notebook. Hovering shows no
    pixel values.

    Args:
        images: ``(N, h, w)`` uint8 images, e.g. ``record.images``.
        indices: ``(E1, E2, k)`` example indices from
            :func:`dmoe_edu.analysis.top_examples`.
        title: figure title. Default: :data:`TOP_EXAMPLES_TITLE`.

    Shape:
        - ``images``: ``(N, 36, 36)``; ``indices``: ``(E1, E2, k)``.

    Returns:
        go.Figure: one image trace whose ``source`` is a PNG data URI of
        :func:`compose_top_examples` (with the figure's separators).

    Example:
        >>> fig = top_examples_png_figure(np.zeros((9, 36, 36), np.uint8),
        ...                               np.zeros((4, 4, 9), np.int64))
        >>> fig.data[0].type, fig.data[0].source[:22]
        ('image', 'data:image/png;base64,')
    """
    fig = top_examples_figure(images, indices, title=title)
    composite = np.asarray(fig.data[0].z, dtype=np.uint8)  # (H, W)

    # Swap the heatmap for an image trace on the same pixel coordinates
    fig.data = []
    fig.add_trace(go.Image(source=_png_data_uri(composite), x0=0, y0=0, dx=1, dy=1,
                           hoverinfo="skip"))
    return fig


# ---------------------------------------------------------------------------
# Gates on the plane and one gate distribution (course notebooks 1 and 2)
# ---------------------------------------------------------------------------


def _class_grays(num_classes: int) -> list[str]:
    """One gray per class, white for class 0 to near-black for the last."""
    if num_classes == 1:
        return ["rgb(255,255,255)"]
    levels = np.linspace(255, 25, num_classes).round().astype(int)
    return [f"rgb({level},{level},{level})" for level in levels]


def gate_regions_figure(grid_x: Any, grid_y: Any, gate_probs: Any,
                        points: Any = None, labels: Any = None,
                        expert_scores: Any = None,
                        title: str = "Which expert the gate trusts where"
                        ) -> go.Figure:
    """The plane coloured by the expert the gate trusts most, the points on top.

    Every grid cell takes the colour of the expert with the largest gate
    probability there (hover shows that probability). Points are drawn on top,
    one gray per class. With ``expert_scores``, each expert's decision line
    (the zero line of its score, drawn over the whole plane, even where the
    gate ignores it) is dashed in the expert's colour.

    Args:
        grid_x: ``(Gx,)`` values of ``x0``, the grid's columns.
        grid_y: ``(Gy,)`` values of ``x1``, the grid's rows.
        gate_probs: ``(Gy, Gx, E)`` gate probabilities at the grid points;
            ``gate_probs[i, j]`` belongs to ``(grid_x[j], grid_y[i])``.
        points: ``(B, 2)`` points to draw, or ``None``. Default: ``None``.
        labels: ``(B,)`` integer classes of ``points`` (needed with them).
            Default: ``None``.
        expert_scores: ``(E, Gy, Gx)`` one score per expert and grid point
            whose sign is the expert's decision (for two classes: class-1 score
            minus class-0 score), or ``None``. Default: ``None``.
        title: figure title. Default: ``"Which expert the gate trusts where"``.

    Shape:
        - ``grid_x``: ``(Gx,)``; ``grid_y``: ``(Gy,)``;
          ``gate_probs``: ``(Gy, Gx, E)``.
        - ``points``: ``(B, 2)``; ``labels``: ``(B,)``;
          ``expert_scores``: ``(E, Gy, Gx)``.

    Returns:
        go.Figure: trace 0 a heatmap whose ``z`` is the winning expert
        ``(Gy, Gx)`` and ``customdata`` its gate probability; then one scatter
        per class of ``labels`` (named ``"class c"``); then one contour per
        expert (named ``"expert e decides"``).

    Example:
        >>> gates = np.zeros((2, 3, 2)); gates[:, :2, 0] = 1; gates[:, 2:, 1] = 1
        >>> fig = gate_regions_figure([0.0, 1.0, 2.0], [0.0, 1.0], gates,
        ...                           points=[[0.5, 0.5]], labels=[1])
        >>> fig.data[0].z.tolist(), fig.data[1].name
        ([[0, 0, 1], [0, 0, 1]], 'class 1')
    """
    xs = _float_array(grid_x, "grid_x", 1, "(Gx,)")
    ys = _float_array(grid_y, "grid_y", 1, "(Gy,)")
    gates = _float_array(gate_probs, "gate_probs", 3, "(Gy, Gx, E)")
    if gates.shape[:2] != (len(ys), len(xs)):
        raise ValueError(
            f"gate_probs must have shape (Gy, Gx, E) = ({len(ys)}, {len(xs)}, E), "
            f"got {gates.shape}"
        )
    num_experts = gates.shape[2]
    colors = _expert_colors(num_experts)

    # The winning expert of every cell, a band of one colour per expert
    winner = gates.argmax(axis=2).astype(np.int16)  # (Gy, Gx)
    top_gate = gates.max(axis=2).astype(np.float32)  # (Gy, Gx)
    scale = [[edge, color] for expert, color in enumerate(colors)
             for edge in (expert / num_experts, (expert + 1) / num_experts)]
    fig = go.Figure(go.Heatmap(
        z=winner, x=xs, y=ys, customdata=top_gate, colorscale=scale,
        zmin=-0.5, zmax=num_experts - 0.5, opacity=0.45, name="gate",
        colorbar=dict(title=dict(text="expert (E)"),
                      tickvals=list(range(num_experts)), len=0.6),
        hovertemplate="x0 %{x:.2f}, x1 %{y:.2f}<br>expert %{z} "
                      "(gate %{customdata:.2f})<extra></extra>",
    ))

    # The points, one gray per class, outlined so white shows on any colour
    if points is not None or labels is not None:
        coords = _float_array(points, "points", 2, "(B, 2)")
        classes = _to_numpy(labels).reshape(-1)
        if coords.shape[1] != 2 or classes.shape != (len(coords),):
            raise ValueError(
                f"points must be (B, 2) and labels (B,), got {coords.shape} and "
                f"{classes.shape}"
            )
        if not np.issubdtype(classes.dtype, np.integer) or classes.min() < 0:
            raise ValueError(f"labels must be integers >= 0, got {classes[:5]}...")
        grays = _class_grays(int(classes.max()) + 1)
        for value in np.unique(classes).tolist():
            chosen = classes == value
            fig.add_trace(go.Scatter(
                x=coords[chosen, 0], y=coords[chosen, 1], mode="markers",
                name=f"class {value}",
                marker=dict(size=6, color=grays[value],
                            line=dict(width=1, color="rgb(60,60,60)")),
                hovertemplate=f"class {value}<br>x0 %{{x:.2f}}, "
                              "x1 %{y:.2f}<extra></extra>",
            ))

    # Each expert's decision line: the zero contour of its score
    if expert_scores is not None:
        scores = _float_array(expert_scores, "expert_scores", 3, "(E, Gy, Gx)")
        if scores.shape != (num_experts, len(ys), len(xs)):
            raise ValueError(
                f"expert_scores must have shape (E, Gy, Gx) = ({num_experts}, "
                f"{len(ys)}, {len(xs)}), got {scores.shape}"
            )
        for expert, color in enumerate(colors):
            fig.add_trace(go.Contour(
                z=scores[expert].astype(np.float32), x=xs, y=ys,
                name=f"expert {expert} decides", showlegend=True,
                contours=dict(start=0.0, end=0.0, size=1.0, coloring="lines"),
                colorscale=[[0.0, color], [1.0, color]], showscale=False,
                line=dict(width=3, dash="dash"), hoverinfo="skip",
            ))

    # Square axes over the grid, titles in the package notation
    fig.update_xaxes(title_text="x0 (input feature 0 of D = 2)",
                     range=[xs.min(), xs.max()], constrain="domain")
    fig.update_yaxes(title_text="x1 (input feature 1)", range=[ys.min(), ys.max()],
                     scaleanchor="x", constrain="domain")
    fig.update_layout(
        title=dict(text=title), width=max(640, _title_width(title)), height=540,
        font=_FONT, margin=dict(l=70, r=30, t=70, b=60), plot_bgcolor="white",
        legend=dict(x=1.02, y=0.0, yanchor="bottom"),
    )
    return fig


def gate_distribution_figure(gate_probs: Any, gate_logits: Any = None,
                             temperature: float | None = None,
                             title: str | None = None) -> go.Figure:
    """One gate distribution as bars, beside a bar of its entropy.

    The left panel has a bar per expert and a dashed line at the uniform gate
    ``1 / E``; the right panel has the entropy ``-sum_e p_e log p_e`` (nats,
    :func:`dmoe_edu.gating.gate_entropy`) against its largest value ``log E``,
    reached by the uniform gate.

    Args:
        gate_probs: ``(E,)`` gate probabilities summing to 1.
        gate_logits: ``(E,)`` the logits they came from, shown on hover, or
            ``None``. Default: ``None``.
        temperature: the temperature ``T`` they were divided by, for the title
            and hover, or ``None``. Default: ``None``.
        title: figure title, or ``None`` for one naming ``T`` and the entropy.
            Default: ``None``.

    Shape:
        - ``gate_probs``, ``gate_logits``: ``(E,)``.

    Returns:
        go.Figure: trace 0 the bars (``y`` is ``gate_probs`` as a list of
        floats), trace 1 the entropy bar (``y`` holds the entropy).

    Raises:
        ValueError: if ``gate_probs`` has a negative or non-finite entry or
            does not sum to 1, or ``gate_logits`` has another length.

    Example:
        >>> fig = gate_distribution_figure(np.array([0.5, 0.5]))
        >>> list(fig.data[0].y), round(fig.data[1].y[0], 4)
        ([0.5, 0.5], 0.6931)
    """
    from .gating import gate_entropy

    probs = _float_array(gate_probs, "gate_probs", 1, "(E,)")
    if not np.all(np.isfinite(probs)) or probs.min() < 0:
        raise ValueError(f"gate_probs must be finite and >= 0, got {probs.tolist()}")
    if abs(probs.sum() - 1.0) > 1e-6:
        raise ValueError(f"gate_probs must sum to 1, got sum {probs.sum():.6g}")
    num_experts = len(probs)
    logits = None
    if gate_logits is not None:
        logits = _float_array(gate_logits, "gate_logits", 1, "(E,)")
        if logits.shape != probs.shape:
            raise ValueError(f"gate_logits must have shape ({num_experts},), got "
                             f"{logits.shape}")

    # The entropy and its ceiling, log E
    entropy = float(gate_entropy(torch.from_numpy(probs)[None])[0])
    max_entropy = math.log(num_experts)
    if title is None:
        at = "" if temperature is None else f" at T = {temperature:g}"
        title = (f"Gate distribution{at}: entropy {entropy:.3f} nats "
                 f"(at most log E = {max_entropy:.3f})")

    fig = make_subplots(rows=1, cols=2, column_widths=[0.78, 0.22],
                        horizontal_spacing=0.12,
                        subplot_titles=["gate probability per expert",
                                        "entropy (nats)"])

    # Left: one bar per expert, its logit on hover (plain lists: E numbers)
    names = [f"expert {e}" for e in range(num_experts)]
    hover = "%{x}<br>gate %{y:.4f}"
    if logits is not None:
        hover += "<br>logit %{customdata:.3f}"
    fig.add_trace(go.Bar(
        x=names, y=probs.tolist(), marker_color=_expert_colors(num_experts),
        text=[f"{p:.3f}" for p in probs], textposition="outside", name="gate",
        customdata=None if logits is None else logits.tolist(),
        hovertemplate=hover + "<extra></extra>",
        showlegend=False,
    ), row=1, col=1)
    fig.add_hline(y=1.0 / num_experts, line_dash="dash", line_width=1,
                  line_color="rgb(90,90,90)", annotation_text="uniform 1/E",
                  annotation_position="top right", row=1, col=1)

    # Right: the entropy against log E
    fig.add_trace(go.Bar(
        x=["entropy"], y=[entropy], marker_color="rgb(120,120,120)",
        text=[f"{entropy:.3f}"], textposition="outside", name="entropy",
        hovertemplate="entropy %{y:.4f} nats<extra></extra>", showlegend=False,
    ), row=1, col=2)
    if num_experts > 1:
        fig.add_hline(y=max_entropy, line_dash="dash", line_width=1,
                      line_color="rgb(176,0,32)", annotation_text="log E",
                      annotation_position="top left", row=1, col=2)

    fig.update_xaxes(title_text="expert (E)", row=1, col=1)
    fig.update_yaxes(title_text="gate probability", range=[0.0, 1.12], row=1, col=1)
    fig.update_yaxes(range=[0.0, max(max_entropy, 0.1) * 1.15], row=1, col=2)
    fig.update_layout(
        title=dict(text=title), width=max(720, _title_width(title)), height=420,
        font=_FONT, margin=dict(l=70, r=30, t=90, b=60),
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


def thread_map_figure(owners: Mapping[str, Any],
                      title: str = "Which thread wrote each element",
                      x_title: str = "expert e",
                      y_title: str = "example b") -> go.Figure:
    """Which thread of a kernel launch wrote each element of an output, per launch.

    Each panel is one launch: every cell of the output matrix shows the global
    index ``blockIdx.x * blockDim.x + threadIdx.x`` of the thread that wrote it,
    coloured by that index; cells no thread wrote (marked ``-1``) stay blank and
    read "none". The colour range is shared, so one thread has one colour in
    every panel.

    Args:
        owners: panel title to a ``(R, C)`` integer array of thread indices, ``-1``
            where no thread wrote; row-major like the kernel's output (for the
            gate's softmax, ``R = B`` examples and ``C = E`` experts).
        title: figure title. Default: ``"Which thread wrote each element"``.
        x_title: title of the column axis. Default: ``"expert e"``.
        y_title: title of the row axis. Default: ``"example b"``.

    Shape:
        - each value of ``owners``: ``(R, C)``, the same for every panel.

    Returns:
        go.Figure: one heatmap trace per panel, in the order of ``owners``; its
        ``z`` holds the thread indices as floats, NaN where none wrote.

    Example:
        >>> owner = np.array([[0, 1], [2, -1]])
        >>> fig = thread_map_figure({"grid of 3 threads": owner})
        >>> fig.data[0].z.tolist()
        [[0.0, 1.0], [2.0, nan]]
    """
    if not owners:
        raise ValueError("owners must hold at least one panel, got none")
    panels = {}
    for name, owner in owners.items():
        values = _to_numpy(owner)
        if values.ndim != 2 or 0 in values.shape or values.dtype.kind not in "iu":
            raise ValueError(f"owners[{name!r}] must be a non-empty (R, C) integer "
                             f"array, got dtype {values.dtype} shape {values.shape}")
        if values.min() < -1:
            raise ValueError(f"owners[{name!r}] holds {values.min()}; thread indices "
                             "are >= 0, and -1 marks an element no thread wrote")
        panels[str(name)] = values
    shapes = {values.shape for values in panels.values()}
    if len(shapes) > 1:
        raise ValueError(f"every panel must have one shape, got {sorted(shapes)}")
    num_rows, num_cols = shapes.pop()
    top = max(1, max(int(values.max()) for values in panels.values()))

    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=list(panels),
                        horizontal_spacing=0.12)
    for column, values in enumerate(panels.values(), start=1):
        written = values >= 0
        text = np.where(written, values.astype(str), "none")

        # Blank (NaN) where no thread wrote; one colour bar for all panels
        fig.add_trace(go.Heatmap(
            z=np.where(written, values, np.nan).astype(np.float64),
            x=np.arange(num_cols), y=np.arange(num_rows),
            text=text, texttemplate="%{text}", colorscale=GATE_COLORSCALE,
            zmin=0, zmax=top, showscale=column == 1,
            colorbar=dict(title=dict(text="thread")),
            hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}"
                          "<br>thread %{text}<extra></extra>",
        ), row=1, col=column)
        fig.update_xaxes(title_text=x_title, tickvals=list(range(num_cols)),
                         row=1, col=column)
        fig.update_yaxes(title_text=y_title if column == 1 else None,
                         autorange="reversed", tickvals=list(range(num_rows)),
                         row=1, col=column)
    fig.update_layout(
        title=dict(text=title),
        width=int(min(1400, max(_title_width(title),
                                120 + len(panels) * (90 + 45 * num_cols)))),
        height=int(min(900, 190 + 34 * num_rows)),
        font=_FONT, margin=dict(l=80, r=30, t=90, b=60),
    )
    return fig


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
