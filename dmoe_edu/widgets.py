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
    new_traces = new.to_dict()["data"]
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


__all__ = ["Dashboard", "update_figure"]
