"""ipywidgets dashboards: controls wired to the figures of :mod:`dmoe_edu.viz`.

Every dashboard is a :class:`Dashboard`: a row of controls, one plotly
``FigureWidget`` that is updated in place when a control moves, and a message
area. Each redraw calls a pure figure function of :mod:`dmoe_edu.viz` with the
controls' values, so what a dashboard shows is exactly what that function
returns for those values, and tests can check it from Python::

    board = gate_explorer()
    board.controls["temperature"].value = 2.0
    board.figure.data[0].y    # the gate probabilities at temperature 2

An exception inside a redraw is not swallowed: the message area shows it to
the student (and :attr:`Dashboard.last_error` keeps it), and the figure keeps
its last good state.

Widgets need a live kernel. A static page (the book) cannot run them, so every
notebook shows the figure of each dashboard's first state beside it.
"""

from __future__ import annotations

import html
import logging
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

logger = logging.getLogger(__name__)


class Dashboard(widgets.VBox):
    """Controls, one live figure and a message area, redrawn on every change.

    Args:
        controls: the controls by name, shown in this order. Every control's
            ``value`` is passed to ``draw`` under its name.
        draw: a function of the controls' values returning a ``go.Figure``
            (a :mod:`dmoe_edu.viz` function, or a small wrapper of one).
        title: an optional line of text above the controls. Default: ``""``.

    Attributes:
        controls: the controls by name.
        figure: the ``go.FigureWidget`` that shows ``draw``'s latest figure.
        message: the ``HTML`` widget where errors appear.
        last_error: the exception of the latest failed redraw, or ``None``
            once a redraw succeeds.

    Example:
        >>> import ipywidgets as widgets
        >>> board = Dashboard(
        ...     {"n": widgets.IntSlider(value=2, min=1, max=5)},
        ...     lambda n: go.Figure(go.Bar(y=list(range(n)))))
        >>> board.controls["n"].value = 4
        >>> list(board.figure.data[0].y)
        [0, 1, 2, 3]
    """

    def __init__(self, controls: Mapping[str, widgets.ValueWidget],
                 draw: Callable[..., go.Figure], title: str = "") -> None:
        if not controls:
            raise ValueError("a Dashboard needs at least one control, got none")
        self.controls = dict(controls)
        self._draw = draw
        self.last_error: BaseException | None = None
        self.message = widgets.HTML(value="")
        self.figure = go.FigureWidget(self._figure())

        # Redraw whenever a control's value changes.
        for control in self.controls.values():
            control.observe(self._on_change, names="value")

        header = [widgets.HTML(value=f"<b>{html.escape(title)}</b>")] if title else []
        control_box = widgets.HBox(list(self.controls.values()),
                                   layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__(children=[*header, control_box, self.message, self.figure])

    @property
    def values(self) -> dict[str, Any]:
        """The controls' current values, by name."""
        return {name: control.value for name, control in self.controls.items()}

    def _figure(self) -> go.Figure:
        """The figure for the current values (raises what ``draw`` raises)."""
        figure = self._draw(**self.values)
        if not isinstance(figure, go.Figure):
            raise TypeError(
                f"the draw function must return a plotly go.Figure, got "
                f"{type(figure).__name__}"
            )
        return figure

    def _on_change(self, change: Mapping[str, Any]) -> None:
        self.redraw()

    def redraw(self) -> None:
        """Redraw the figure for the current values, in place.

        On an exception the figure keeps its last good state and the message
        area shows the error; it is also logged and kept in :attr:`last_error`.
        """
        try:
            update_figure(self.figure, self._figure())
        except Exception as error:  # shown to the student, never swallowed
            self.last_error = error
            logger.warning("dashboard redraw failed: %s", error)
            text = "".join(traceback.format_exception_only(type(error), error))
            self.message.value = (
                "<pre style='color:#b00020;white-space:pre-wrap' "
                f"class='dmoe-error'>{html.escape(text.strip())}</pre>"
            )
            return
        self.last_error = None
        self.message.value = ""

    def static_figure(self) -> go.Figure:
        """A plain ``go.Figure`` copy of what the dashboard shows now.

        Notebooks display it beside the dashboard for readers without a
        kernel (the book).
        """
        return go.Figure(self.figure.to_dict())


def update_figure(target: go.FigureWidget, new: go.Figure) -> None:
    """Make ``target`` show ``new``, in place (the widget keeps its identity).

    Traces are updated one by one when ``new`` has traces of the same types in
    the same order (so the browser redraws without rebuilding the plot), and
    replaced otherwise; the layout is replaced.

    Args:
        target: the figure widget on screen.
        new: the figure to show.
    """
    # to_plotly_json keeps numpy arrays (to_dict would turn them into base64).
    new_traces = [trace.to_plotly_json() for trace in new.data]
    with target.batch_update():
        same_types = [t.type for t in target.data] == [t["type"] for t in new_traces]
        if same_types:
            for trace, values in zip(target.data, new_traces):
                # Clear what the new trace leaves unset, so nothing stale stays.
                stale = {key: None for key in trace.to_plotly_json()
                         if key not in values and key not in ("type", "uid")}
                trace.update({**stale, **values}, overwrite=True)
        else:
            target.data = []
            target.add_traces(list(new.data))
        target.layout = new.layout


def margin_explorer(gate_logits: Any, margin: float | None = None,
                    max_margin: float | None = None) -> Dashboard:
    """A margin slider over a fixed stream of gate logits: where the rule masks.

    Every redraw replays :class:`dmoe_edu.balance.MarginConstraint` over the
    stream with the slider's margin (:func:`dmoe_edu.balance.trace_margin`) and
    draws it with :func:`dmoe_edu.viz.margin_trace_figure`: each expert's running
    gate mass minus the mean, the margin line, a cross wherever an expert was
    masked, and the gates the examples got.

    Args:
        gate_logits: ``(T, E)`` gate logits of a stream of examples.
        margin: the slider's first margin ``m``, or ``None`` for 2.0, lowered to
            ``max_margin`` when that is smaller (a short stream). Default: ``None``.
        max_margin: the slider's upper end, or ``None`` for the largest excess
            the stream reaches with no constraint (rounded up, at least 1), so
            that nothing is masked at the top. Default: ``None``.

    Returns:
        Dashboard: one control, ``"margin"`` (a ``FloatSlider``).

    Raises:
        ValueError: if ``gate_logits`` is not a finite ``(T, E)`` array, or the
            margins are not ``0 <= margin <= max_margin`` with ``max_margin > 0``.

    Example:
        >>> board = margin_explorer(torch.tensor([[5.0, 0.0]] * 4), margin=0.25)
        >>> board.controls["margin"].value = 0.5
        >>> board.figure.layout.title.text
        'margin m = 0.5: 1 of 4 examples had an expert masked'
    """
    import math

    from . import balance, viz

    # One replay without any constraint checks the stream and sizes the slider.
    free = balance.trace_margin(gate_logits, math.inf)
    num_steps = len(free.excess)
    sized_by_stream = max_margin is None
    if max_margin is None:
        max_margin = max(1.0, float(math.ceil(free.excess.max())))
    max_margin = balance.check_margin(max_margin)
    if margin is None:
        margin = min(2.0, max_margin)
    margin = balance.check_margin(margin)
    if not 0.0 < max_margin < math.inf or margin > max_margin:
        where = (" (sized by the stream: its largest excess with no constraint, "
                 "rounded up, at least 1)") if sized_by_stream else ""
        raise ValueError(
            f"need 0 <= margin <= max_margin with a finite max_margin > 0, got "
            f"margin={margin!r}, max_margin={max_margin!r}{where}"
        )

    def draw(margin: float) -> go.Figure:
        trace = balance.trace_margin(gate_logits, margin)
        masked = int(trace.masked_examples.sum())
        return viz.margin_trace_figure(
            trace.excess, trace.keep, trace.gate_probs, margin,
            title=f"margin m = {margin:g}: {masked} of {num_steps} examples "
                  "had an expert masked",
        )

    slider = widgets.FloatSlider(
        value=margin, min=0.0, max=max_margin, step=max_margin / 200,
        description="margin m", continuous_update=False, readout_format=".2f",
    )
    return Dashboard({"margin": slider}, draw,
                     title="The margin rule over a fixed stream of gates")


def gate_map_explorer(records: Mapping[int, Any], layer: int = 1, expert: int = 0,
                      epoch: int | None = None, num_classes: int = 10) -> Dashboard:
    """Pick a gated layer, an expert and an epoch: that expert's Fig. 2 profile.

    ``records`` holds the test-set gates of one model at several epochs of its
    training (:func:`dmoe_edu.analysis.collect_gates`, e.g. from
    ``train(..., on_epoch=...)``). Every redraw computes, for the chosen epoch's
    record, :func:`dmoe_edu.analysis.gate_by_translation` and
    :func:`dmoe_edu.analysis.gate_by_class` of the chosen layer and draws the
    chosen expert's slice with :func:`dmoe_edu.viz.expert_profile_figure`, on a
    fixed 0..1 gate range so epochs compare by eye.

    The expert slider runs over the largest layer's experts; an expert that the
    chosen layer lacks is an error, shown in the message area.

    Args:
        records: epoch to :class:`~dmoe_edu.analysis.GateRecord`; every record
            must have the same gated layers (``L`` of them).
        layer: the first gated layer shown, counted from 1 as in
            :func:`~dmoe_edu.analysis.where_what_scores`. Default: 1.
        expert: the first expert shown, from 0. Default: 0.
        epoch: the first epoch shown, or ``None`` for the last. Default: ``None``.
        num_classes: classes ``C`` of the class profile. Default: 10.

    Returns:
        Dashboard: controls ``"layer"`` (``ToggleButtons``, values ``1..L``),
        ``"expert"`` (``IntSlider``) and ``"epoch"`` (``SelectionSlider`` over
        the epochs of ``records``). Trace 0 of its figure is the map, trace 1
        the class profile.

    Raises:
        ValueError: if ``records`` is empty, its keys are not integers >= 0,
            its records disagree on the gated layers or have none, or a first
            value is out of range.
        TypeError: if a value of ``records`` is not a ``GateRecord``.

    Example:
        >>> from dmoe_edu.analysis import GateRecord
        >>> rng = np.random.default_rng(0)
        >>> records = {e: GateRecord([rng.dirichlet(np.ones(4), 50)],
        ...                          rng.integers(0, 10, 50),
        ...                          rng.integers(-4, 5, (50, 2)),
        ...                          np.zeros(50, np.int64),
        ...                          np.zeros((50, 36, 36), np.uint8))
        ...            for e in (0, 5)}
        >>> board = gate_map_explorer(records)
        >>> board.figure.data[0].z.shape  # expert 0's map at epoch 5
        (9, 9)
        >>> board.controls["expert"].value = 3
        >>> board.figure.layout.title.text.split(" (")[0]
        'layer 1, expert 3, after epoch 5'
    """
    import numpy as np

    from . import analysis, viz

    # Check the records: integer epochs, the same gated layers in each
    if not records:
        raise ValueError("records must hold at least one epoch, got none")
    epochs = sorted(records)
    for key in epochs:
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
            raise ValueError(
                f"records keys must be epochs (integers >= 0), got {key!r}"
            )
        if not isinstance(records[key], analysis.GateRecord):
            raise TypeError(f"records[{key}] must be a GateRecord, got "
                            f"{type(records[key]).__name__}")
    layouts = {key: tuple(records[key].gated_layers) for key in epochs}
    gated = layouts[epochs[0]]
    if not gated:
        raise ValueError(f"records[{epochs[0]}] has no gated layer")
    for key, layout in layouts.items():
        if layout != gated:
            raise ValueError(
                f"every record must have the same gated layers: records[{epochs[0]}] "
                f"has model layers {list(gated)}, records[{key}] {list(layout)}"
            )
    widths = [records[epochs[0]].gate_probs[model_layer].shape[1]
              for model_layer in gated]  # E per gated layer

    # Check the first state
    epoch = epochs[-1] if epoch is None else epoch
    if epoch not in records:
        raise ValueError(f"epoch must be one of {epochs}, got {epoch!r}")
    if not 1 <= layer <= len(gated):
        raise ValueError(f"layer must be in [1, {len(gated)}], got {layer!r}")
    if not 0 <= expert < widths[layer - 1]:
        raise ValueError(f"layer {layer} has experts 0..{widths[layer - 1] - 1}, "
                         f"got expert {expert!r}")

    def draw(layer: int, expert: int, epoch: int) -> go.Figure:
        record = records[epoch]
        gate_probs = record.gate_probs[gated[layer - 1]]  # (N, E)
        num_experts = gate_probs.shape[1]
        if not 0 <= expert < num_experts:
            raise ValueError(f"layer {layer} has experts 0..{num_experts - 1}, "
                             f"got expert {expert}")
        maps = analysis.gate_by_translation(gate_probs, record.shifts)  # (E, 9, 9)
        profiles = analysis.gate_by_class(gate_probs, record.labels,
                                          num_classes=num_classes)  # (E, C)
        return viz.expert_profile_figure(
            maps[expert], profiles[expert], num_experts=num_experts,
            title=f"layer {layer}, expert {expert}, after epoch {epoch} "
                  f"(test error {record.error:.1f}%)",
        )

    controls = {
        "layer": widgets.ToggleButtons(
            options=[(f"layer {number}", number)
                     for number in range(1, len(gated) + 1)],
            value=layer, description="layer"),
        "expert": widgets.IntSlider(
            value=expert, min=0, max=max(widths) - 1, description="expert",
            continuous_update=False),
        "epoch": widgets.SelectionSlider(
            options=[(str(key), int(key)) for key in epochs], value=epoch,
            description="epoch", continuous_update=False),
    }
    return Dashboard(controls, draw,
                     title="One expert's mean gate by translation and by class")


def gate_explorer(gate_logits: Any = (2.0, 1.0, 0.0, -1.0), temperature: float = 1.0,
                  logit_limit: float = 5.0, max_temperature: float = 5.0
                  ) -> Dashboard:
    """A slider per expert logit and a temperature slider: the gate and its entropy.

    Every redraw divides the sliders' logits by the temperature ``T``, takes
    the softmax in float64 (:func:`dmoe_edu.gating.tempered_gate`) and draws
    the gate with :func:`dmoe_edu.viz.gate_distribution_figure`: a bar per
    expert, and the entropy against its ceiling ``log E``. The temperature
    slider reaches 0, where the softmax does not exist: there the message
    area says so and the figure keeps its last state.

    Args:
        gate_logits: the first logits, one slider per expert (``E`` from 2 to
            8). Default: ``(2.0, 1.0, 0.0, -1.0)``.
        temperature: the first ``T``, in ``(0, max_temperature]``.
            Default: 1.0.
        logit_limit: the logit sliders run over ``[-logit_limit,
            logit_limit]``. Default: 5.0.
        max_temperature: the temperature slider's upper end. Default: 5.0.

    Shape:
        - ``gate_logits``: ``(E,)``.

    Returns:
        Dashboard: controls ``"logit_0"`` .. ``"logit_{E-1}"`` and
        ``"temperature"`` (all ``FloatSlider``). Trace 0 of its figure holds
        the gate probabilities, trace 1 the entropy.

    Raises:
        ValueError: if ``gate_logits`` is not 2 to 8 finite numbers within
            ``logit_limit``, or ``temperature`` is not in ``(0,
            max_temperature]``.

    Example:
        >>> board = gate_explorer([1.0, 0.0, -1.0])
        >>> board.controls["temperature"].value = 2.0
        >>> [round(p, 3) for p in board.figure.data[0].y]
        [0.506, 0.307, 0.186]
    """
    import math

    import numpy as np
    import torch

    from . import viz
    from .gating import tempered_gate

    # Check the first state against the sliders' ranges
    logits = np.asarray(gate_logits, dtype=np.float64)
    limit, top = float(logit_limit), float(max_temperature)
    if not (math.isfinite(limit) and limit > 0 and math.isfinite(top) and top > 0):
        raise ValueError(f"logit_limit and max_temperature must be finite and > 0, "
                         f"got {logit_limit!r} and {max_temperature!r}")
    if (logits.ndim != 1 or not 2 <= len(logits) <= 8
            or not np.all(np.abs(logits) <= limit)):
        raise ValueError(
            f"gate_logits must be 2 to 8 finite numbers in [-{limit:g}, {limit:g}], "
            f"got {np.asarray(gate_logits).tolist()}"
        )
    if not 0.0 < float(temperature) <= top:
        raise ValueError(f"temperature must be in (0, {top:g}], got {temperature!r}")
    num_experts = len(logits)

    def draw(temperature: float, **slider_logits: float) -> go.Figure:
        values = [slider_logits[f"logit_{e}"] for e in range(num_experts)]
        row = torch.tensor([values], dtype=torch.float64)  # (1, E)
        gate_probs = tempered_gate(row, temperature)[0]  # (E,)
        return viz.gate_distribution_figure(gate_probs, gate_logits=values,
                                            temperature=temperature)

    controls: dict[str, widgets.ValueWidget] = {
        f"logit_{e}": widgets.FloatSlider(
            value=float(logits[e]), min=-limit, max=limit, step=0.1,
            description=f"logit {e}", continuous_update=False,
            readout_format=".1f")
        for e in range(num_experts)
    }
    controls["temperature"] = widgets.FloatSlider(
        value=float(temperature), min=0.0, max=top, step=0.05,
        description="temperature T", continuous_update=False, readout_format=".2f",
        style={"description_width": "initial"})
    return Dashboard(controls, draw,
                     title="Gate logits and temperature: the gate and its entropy")


__all__ = ["Dashboard", "gate_explorer", "gate_map_explorer", "margin_explorer",
           "update_figure"]
