"""A toy problem on the plane: two regions, a different linear rule in each.

The first course notebooks need a problem small enough to draw. Points ``x``
are drawn uniformly from the square ``[-bound, bound]^2`` (``D = 2``), the
square is cut into two regions, and each region labels its points with its own
linear rule (``C = 2`` classes). Two layouts:

- ``"halves"``: region 1 is the right half, ``x0 >= 0``, and region 0 the
  left half. Region 0 gives class 1 above the rising line ``x1 = x0 / 2``,
  region 1 below the falling line ``x1 = -x0 / 2``. The border between the
  regions is a line, so a linear gate can find it.
- ``"stripe"``: region 1 is the vertical stripe ``|x0| < bound / 2`` and
  region 0 the two outer strips. The outer strips give class 1 above the
  axis ``x1 = 0``, the stripe below it. No single line cuts the stripe from
  both outer strips, so a linear gate with two experts cannot find it.

In both layouts no single line separates the classes, while two linear experts
and a gate that knows the regions classify every point.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np
import torch
from torch import Tensor

__all__ = ["LAYOUTS", "RULES", "PlaneGrid", "TwoRulePlane", "plane_grid",
           "two_rule_plane"]

LAYOUTS = ("halves", "stripe")
"""The ways :func:`two_rule_plane` cuts the square into its two regions."""

RULES = {
    "halves": ((-0.5, 1.0), (-0.5, -1.0)),
    "stripe": ((0.0, 1.0), (0.0, -1.0)),
}
"""Per layout, the weights ``(w0, w1)`` of region 0's and region 1's rules:
a point of region ``r`` is class 1 where ``w0 x0 + w1 x1 > 0``."""


@dataclasses.dataclass(frozen=True)
class TwoRulePlane:
    """Points of the plane, their labels and the region that labelled each.

    Attributes:
        inputs: ``(B, 2)`` float32 points ``(x0, x1)``.
        labels: ``(B,)`` int64 classes, 0 or 1 (after any label noise).
        regions: ``(B,)`` int64, the region (0 or 1) whose rule labelled the
            point: the expert an ideal gate would pick.
        layout: ``"halves"`` or ``"stripe"`` (see the module docstring).
        bound: points lie in ``[-bound, bound]^2``.

    Example:
        >>> plane = two_rule_plane(num_points=4, seed=0)
        >>> plane.inputs.shape, plane.labels.dtype
        (torch.Size([4, 2]), torch.int64)
        >>> bool((plane.region_of(plane.inputs) == plane.regions).all())
        True
    """

    inputs: Tensor
    labels: Tensor
    regions: Tensor
    layout: str
    bound: float

    def __len__(self) -> int:
        return len(self.labels)

    def region_of(self, points: Tensor) -> Tensor:
        """The region (0 or 1) of each point, by this plane's layout.

        Args:
            points: ``(N, 2)`` points, any floating dtype.

        Returns:
            Tensor: ``(N,)`` int64 regions.
        """
        points = _check_points(points)
        if self.layout == "halves":
            inside = points[:, 0] >= 0
        else:
            inside = points[:, 0].abs() < self.bound / 2
        return inside.long()

    def rule_of(self, points: Tensor) -> Tensor:
        """The noise-free label of each point: its region's rule applied to it.

        Args:
            points: ``(N, 2)`` points, any floating dtype.

        Returns:
            Tensor: ``(N,)`` int64 classes.
        """
        points = _check_points(points)
        weights = torch.tensor(RULES[self.layout], dtype=points.dtype)  # (2 regions, 2)
        scores = points @ weights.T  # (N, 2 regions): each rule's score
        region = self.region_of(points)  # (N,)
        chosen = scores.gather(1, region[:, None]).squeeze(1)  # (N,)
        return (chosen > 0).long()


def two_rule_plane(num_points: int = 600, layout: str = "halves", seed: int = 0,
                   bound: float = 2.0, label_noise: float = 0.0) -> TwoRulePlane:
    """Draw points of the square and label each by its region's linear rule.

    The points come from NumPy's ``default_rng(seed)``, so they are the same on
    every machine.

    Args:
        num_points: number of points ``B``. Default: 600.
        layout: ``"halves"`` (region 1 is ``x0 >= 0``) or ``"stripe"``
            (region 1 is ``|x0| < bound / 2``). Default: ``"halves"``.
        seed: seed of the points and of the label noise. Default: 0.
        bound: half the side of the square. Default: 2.0.
        label_noise: share of labels flipped at random, in ``[0, 0.5]``.
            Default: 0.0.

    Returns:
        TwoRulePlane: the points, labels and regions.

    Raises:
        ValueError: on a bad size, layout, seed, bound or noise level.

    Example:
        >>> plane = two_rule_plane(num_points=1000, seed=1)
        >>> round(plane.labels.float().mean().item(), 1)  # balanced classes
        0.5
    """
    num_points = _check_int("num_points", num_points)
    seed = _check_int("seed", seed, minimum=0)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    bound = float(bound)
    if not 0.0 < bound < float("inf"):
        raise ValueError(f"bound must be a finite number > 0, got {bound!r}")
    label_noise = float(label_noise)
    if not 0.0 <= label_noise <= 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5], got {label_noise!r}")
    rng = np.random.default_rng(seed)

    # Uniform points of the square, in float32 from the start
    points = rng.uniform(-bound, bound, size=(num_points, 2)).astype(np.float32)
    inputs = torch.from_numpy(points)  # (B, 2)

    # Each point's region, then its region's rule
    plane = TwoRulePlane(inputs, torch.zeros(num_points, dtype=torch.int64),
                         torch.zeros(num_points, dtype=torch.int64), layout, bound)
    regions = plane.region_of(inputs)  # (B,)
    labels = plane.rule_of(inputs)  # (B,)

    # Flip a share of the labels (drawn even at 0, so noise keeps the points)
    flip = torch.from_numpy(rng.random(num_points) < label_noise)  # (B,)
    labels = torch.where(flip, 1 - labels, labels)
    return dataclasses.replace(plane, labels=labels, regions=regions)


@dataclasses.dataclass(frozen=True)
class PlaneGrid:
    """A regular grid over the square, to draw what a model does everywhere.

    Attributes:
        xs: ``(G,)`` float32 values of ``x0``, the grid's columns.
        ys: ``(G,)`` float32 values of ``x1``, the grid's rows.
        points: ``(G * G, 2)`` float32 grid points, row by row: point
            ``i * G + j`` is ``(xs[j], ys[i])``.

    Example:
        >>> grid = plane_grid(bound=1.0, steps=3)
        >>> grid.points[:3].tolist()
        [[-1.0, -1.0], [0.0, -1.0], [1.0, -1.0]]
        >>> grid.to_grid(torch.arange(9)).tolist()
        [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    """

    xs: Tensor
    ys: Tensor
    points: Tensor

    def to_grid(self, values: Tensor) -> Tensor:
        """Reshape per-point values ``(G * G, ...)`` to ``(G, G, ...)`` (rows ``x1``).

        Raises:
            ValueError: if ``values`` does not hold one entry per grid point.
        """
        rows, cols = len(self.ys), len(self.xs)
        if values.dim() == 0 or values.shape[0] != rows * cols:
            raise ValueError(
                f"values must have {rows * cols} rows (one per grid point), got "
                f"shape {tuple(values.shape)}"
            )
        return values.reshape(rows, cols, *values.shape[1:])  # (G, G, ...)


def plane_grid(bound: float = 2.0, steps: int = 61) -> PlaneGrid:
    """A ``steps x steps`` grid over ``[-bound, bound]^2``, both ends included.

    Args:
        bound: half the side of the square. Default: 2.0.
        steps: grid points along each axis, at least 2. Default: 61.

    Returns:
        PlaneGrid: the axis values and the ``(steps * steps, 2)`` points.

    Raises:
        ValueError: if ``bound`` is not a finite number > 0 or ``steps`` < 2.
    """
    steps = _check_int("steps", steps, minimum=2)
    bound = float(bound)
    if not 0.0 < bound < float("inf"):
        raise ValueError(f"bound must be a finite number > 0, got {bound!r}")

    # Axis values in float64, then one float32 point per (row, column)
    axis = torch.linspace(-bound, bound, steps, dtype=torch.float64).float()  # (G,)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")  # (G, G) each
    points = torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=1)  # (G*G, 2)
    return PlaneGrid(axis, axis.clone(), points)


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integer ``>= minimum`` (not a bool).

    The data layer imports nothing from the model layer, so it keeps its own
    copy of :func:`dmoe_edu.gating.check_int`'s rule.
    """
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
            or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_points(points: Tensor) -> Tensor:
    """Check ``(N, 2)`` floating points; return them unchanged."""
    if not isinstance(points, Tensor):
        raise TypeError(f"points must be a torch.Tensor, got {type(points).__name__}")
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise TypeError(f"points must be a floating tensor, got {points.dtype}")
    return points
