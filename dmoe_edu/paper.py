"""The paper's MNIST configurations and its Table 1, as data.

Eigen, Ranzato and Sutskever (2013), Table 1: jittered MNIST, error in percent.
Each row names the experts of each layer as ``E x H`` and the gates' hidden
widths. The columns are the DMoE and its baselines (see
:mod:`dmoe_edu.baselines`).
"""

from __future__ import annotations

import dataclasses

from .dmoe import LayerSpec

#: Input width of a 36x36 jittered digit, flattened.
JITTERED_INPUT_DIM = 36 * 36

#: Baseline columns of Table 1, in the paper's order.
COLUMNS = ("single", "dmoe", "concat", "dnn")


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One row of Table 1: a model size and the paper's errors for it.

    Attributes:
        number: the row's position in Table 1, from 1.
        name: the row's label, e.g. ``"4x100-4x100 (gates 50-50)"``.
        layers: the DMoE's layers.
        test_error: the paper's test error (%) per column; ``None`` where the
            paper reports none.
        train_error: the paper's training error (%) per column.
    """

    number: int
    name: str
    layers: tuple[LayerSpec, ...]
    test_error: dict[str, float | None]
    train_error: dict[str, float | None]


def _row(number, name, sizes, gates, test, train) -> PaperRow:
    layers = tuple(LayerSpec(e, h, g) for (e, h), g in zip(sizes, gates))
    return PaperRow(
        number, name, layers, dict(zip(COLUMNS, test)), dict(zip(COLUMNS, train))
    )


TABLE1: dict[int, PaperRow] = {
    row.number: row
    for row in (
        _row(1, "4x100-4x100 (gates 50-50)", [(4, 100), (4, 100)], [50, 50],
             (1.33, 1.42, 1.30, 1.30), (0.85, 0.91, 0.77, 0.60)),
        _row(2, "4x100-4x20 (gates 50-50)", [(4, 100), (4, 20)], [50, 50],
             (1.58, 1.50, 1.30, 1.41), (1.05, 0.96, 0.85, 0.90)),
        _row(3, "4x100-4x20 (gates 50-20)", [(4, 100), (4, 20)], [50, 20],
             (1.41, 1.39, 1.30, 1.40), (1.04, 0.98, 0.87, 0.87)),
        _row(4, "4x50-4x20 (gates 20-20)", [(4, 50), (4, 20)], [20, 20],
             (1.63, 1.77, 1.50, 1.67), (1.60, 1.41, 1.33, 1.32)),
        _row(5, "4x100 one layer (gate 50)", [(4, 100)], [50],
             (2.86, 1.72, 1.69, None), (2.99, 1.78, 1.59, None)),
    )
}
