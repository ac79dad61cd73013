"""Jittered MNIST: each 28x28 digit placed at a random offset on a 36x36 canvas.

The paper (Eigen et al. 2013, section 4.1) translates every digit by up to
4 pixels in each direction, so *where* a digit sits and *which* digit it is
are two independent factors. Each example keeps its shift ``(dx, dy)`` so the
analysis can ask which experts respond to position and which to class.

Conventions: ``dx > 0`` moves the digit right, ``dy > 0`` moves it down; the
digit's top-left corner lands at row ``4 + dy``, column ``4 + dx``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .mnist import IMAGE_SIDE, NUM_CLASSES, Digits, MnistSplit

__all__ = [
    "CANVAS",
    "MAX_SHIFT",
    "NUM_SHIFTS",
    "draw_shifts",
    "jitter_images",
    "shift_index",
    "JitteredSet",
    "JitteredMNIST",
]

logger = logging.getLogger(__name__)

CANVAS = 36  # side of the jittered image: 28 + 2 * MAX_SHIFT
MAX_SHIFT = 4  # largest translation along each axis, in pixels
NUM_SHIFTS = 2 * MAX_SHIFT + 1  # values per axis (-4..4): 81 translations in all

# Seed-stream tags, so the test shifts, the per-epoch training shifts and the
# fixed training copy never share random numbers.
_TEST_STREAM, _EPOCH_STREAM, _FIXED_STREAM = 0, 1, 2


def check_shifts(shifts: np.ndarray, n: int | None = None) -> np.ndarray:
    """Validate ``(N, 2)`` integer shifts in ``[-4, 4]``; return them as int64."""
    shifts = np.asarray(shifts)
    wrong_n = n is not None and len(shifts) != n
    if shifts.ndim != 2 or shifts.shape[1] != 2 or wrong_n:
        want = f"({n}, 2)" if n is not None else "(N, 2)"
        raise ValueError(f"shifts must have shape {want}, got {shifts.shape}")
    if len(shifts) and not np.issubdtype(shifts.dtype, np.integer):
        raise ValueError(f"shifts must be integers, got dtype {shifts.dtype}")
    if len(shifts) and np.abs(shifts).max() > MAX_SHIFT:
        bad = shifts[np.abs(shifts).max(axis=1) > MAX_SHIFT][0]
        raise ValueError(
            f"shifts must lie in [-{MAX_SHIFT}, {MAX_SHIFT}], got (dx, dy) = "
            f"({bad[0]}, {bad[1]})"
        )
    return shifts.astype(np.int64, copy=False)


def draw_shifts(n: int, rng: np.random.Generator) -> np.ndarray:
    r"""Draw ``n`` translations uniformly from the 81 possible ``(dx, dy)``.

    Args:
        n: how many shifts to draw.
        rng: the generator to draw from.

    Shape:
        - Output: :math:`(n, 2)`; column 0 is ``dx`` (right is positive),
          column 1 is ``dy`` (down is positive).

    Returns:
        np.ndarray: int64 values in ``[-4, 4]``.

    Example::

        >>> draw_shifts(3, np.random.default_rng(0)).shape
        (3, 2)
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(n, 2), dtype=np.int64)


def shift_index(shifts: np.ndarray) -> np.ndarray:
    r"""Number each translation: ``(dy + 4) * 9 + (dx + 4)``.

    The index runs row-major over a 9x9 grid of shifts, so
    ``index.reshape(9, 9)`` lays results out with ``dy`` down and ``dx``
    across, like the image itself.

    Args:
        shifts: ``(dx, dy)`` pairs in ``[-4, 4]``.

    Shape:
        - shifts: :math:`(N, 2)`
        - Output: :math:`(N,)`

    Returns:
        np.ndarray: int64 indices in ``[0, 81)``.

    Example::

        >>> shift_index(np.array([[-4, -4], [0, 0], [4, 4]]))
        array([ 0, 40, 80])
    """
    shifts = check_shifts(shifts)
    dx, dy = shifts[:, 0], shifts[:, 1]
    return (dy + MAX_SHIFT) * NUM_SHIFTS + (dx + MAX_SHIFT)


def jitter_images(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    r"""Paste each digit onto a blank 36x36 canvas at its own offset.

    Digit ``i``'s top-left corner lands at row ``4 + dy[i]`` and column
    ``4 + dx[i]``; the rest of the canvas is 0. The work is grouped by the
    81 possible shifts, so it is 81 block copies rather than a loop over
    examples.

    Args:
        images: uint8 digits.
        shifts: integer ``(dx, dy)`` per digit, each in ``[-4, 4]``.

    Shape:
        - images: :math:`(N, 28, 28)`
        - shifts: :math:`(N, 2)`
        - Output: :math:`(N, 36, 36)`

    Returns:
        np.ndarray: the jittered uint8 images.

    Raises:
        ValueError: on a wrong shape or dtype, or a shift out of range.

    Example::

        >>> img = np.zeros((1, 28, 28), np.uint8); img[0, 0, 0] = 255
        >>> out = jitter_images(img, np.array([[2, -1]]))
        >>> np.argwhere(out[0])
        array([[3, 6]])
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"images must have shape (N, 28, 28), got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    shifts = check_shifts(shifts, n=len(images))

    out = np.zeros((len(images), CANVAS, CANVAS), dtype=np.uint8)  # (N, 36, 36)

    # Sort examples by shift once, then copy each group as one block.
    index = shift_index(shifts)
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(NUM_SHIFTS**2 + 1))
    for k in range(NUM_SHIFTS**2):
        rows = order[bounds[k]:bounds[k + 1]]
        if len(rows) == 0:
            continue
        top = k // NUM_SHIFTS  # = MAX_SHIFT + dy
        left = k % NUM_SHIFTS  # = MAX_SHIFT + dx
        out[rows, top:top + IMAGE_SIDE, left:left + IMAGE_SIDE] = images[rows]
    return out


@dataclass(frozen=True)
class JitteredSet:
    r"""Jittered digits with their labels and the shift each one received.

    Args:
        images: uint8 canvases.
        labels: int64 classes in ``[0, 9]``.
        shifts: int64 ``(dx, dy)`` per example, in ``[-4, 4]``.

    Shape:
        - images: :math:`(N, 36, 36)`
        - labels: :math:`(N,)`
        - shifts: :math:`(N, 2)`

    Example::

        >>> js = JitteredMNIST(synthetic_digits()).test
        >>> js.inputs().shape
        torch.Size([200, 1296])
    """

    images: np.ndarray  # (N, 36, 36) uint8
    labels: np.ndarray  # (N,) int64
    shifts: np.ndarray  # (N, 2) int64

    def __post_init__(self) -> None:
        images, labels, shifts = self.images, self.labels, self.shifts
        if images.ndim != 3 or images.shape[1:] != (CANVAS, CANVAS):
            raise ValueError(
                f"JitteredSet.images must have shape (N, 36, 36), got {images.shape}"
            )
        if images.dtype != np.uint8:
            raise ValueError(f"JitteredSet.images must be uint8, got {images.dtype}")
        n = len(images)
        if labels.shape != (n,) or labels.dtype != np.int64:
            raise ValueError(
                f"JitteredSet.labels must be int64 of shape ({n},), "
                f"got {labels.dtype} of shape {labels.shape}"
            )
        if shifts.shape != (n, 2) or shifts.dtype != np.int64:
            raise ValueError(
                f"JitteredSet.shifts must be int64 of shape ({n}, 2), "
                f"got {shifts.dtype} of shape {shifts.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        r"""The images as network inputs: flattened row-major, scaled to [0, 1].

        Args:
            dtype: a floating-point dtype. Default: ``torch.float32``.

        Shape:
            - Output: :math:`(N, D)` with :math:`D = 36 \cdot 36 = 1296`.

        Returns:
            torch.Tensor: a new tensor (pixel / 255).
        """
        if not dtype.is_floating_point:
            raise ValueError(f"inputs() needs a floating-point dtype, got {dtype}")
        flat = self.images.reshape(len(self), CANVAS * CANVAS)  # (N, D)
        # Copy into a writable array: torch refuses to share read-only memory
        # silently, and the result must not alias the cached images anyway.
        x = torch.from_numpy(np.array(flat, copy=True)).to(dtype)
        return x.div_(255.0)

    def targets(self) -> torch.Tensor:
        r"""The labels as a new ``torch.LongTensor``.

        Shape:
            - Output: :math:`(N,)`
        """
        return torch.from_numpy(np.array(self.labels, dtype=np.int64, copy=True))


class JitteredMNIST:
    r"""Jittered train and test sets built from an :class:`MnistSplit`.

    Three independent random streams, all derived from ``seed``:

    - ``test``: one fixed shift per test digit, the same for every run
      with this seed.
    - ``train_epoch(e)``: if ``redraw_train``, fresh shifts for epoch ``e``
      from ``np.random.default_rng([seed, 1, e])``, so an epoch can be
      rebuilt exactly; otherwise the single fixed copy ``train_fixed``.
    - ``train_fixed``: one fixed jittered copy of the training digits, for
      measuring training error on a stable set.

    Args:
        split: the digits to jitter.
        seed: non-negative base seed. Default: ``0``.
        redraw_train: redraw training shifts every epoch. The paper's setup
            needs this: a single fixed copy overfits badly. Default: ``True``.

    Attributes:
        input_dim: :math:`D = 1296` (a flattened 36x36 canvas).
        num_classes: :math:`C = 10`.

    Example::

        >>> data = JitteredMNIST(load_bundled(), seed=0)
        >>> batch = data.train_epoch(0)
        >>> batch.inputs().shape, batch.shifts.shape
        (torch.Size([4000, 1296]), (4000, 2))
    """

    input_dim = CANVAS * CANVAS
    num_classes = NUM_CLASSES

    def __init__(self, split: MnistSplit, seed: int = 0, redraw_train: bool = True):
        if not isinstance(split, MnistSplit):
            raise TypeError(f"split must be an MnistSplit, got {type(split).__name__}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.split = split
        self.seed = int(seed)
        self.redraw_train = bool(redraw_train)

    def __repr__(self) -> str:
        return (
            f"JitteredMNIST(source={self.split.source!r}, "
            f"train={len(self.split.train)}, test={len(self.split.test)}, "
            f"seed={self.seed}, redraw_train={self.redraw_train})"
        )

    def _jitter(self, digits: Digits, rng: np.random.Generator) -> JitteredSet:
        shifts = draw_shifts(len(digits), rng)
        images = jitter_images(digits.images, shifts)
        labels = digits.labels.copy()
        # Sets are cached and shared: freeze them so no caller edits another's.
        for arr in (images, labels, shifts):
            arr.flags.writeable = False
        return JitteredSet(images, labels, shifts)

    @cached_property
    def test(self) -> JitteredSet:
        """The jittered test set; shifts fixed by ``seed`` and cached."""
        rng = np.random.default_rng([self.seed, _TEST_STREAM])
        return self._jitter(self.split.test, rng)

    @cached_property
    def train_fixed(self) -> JitteredSet:
        """One fixed jittered copy of the training digits, cached."""
        rng = np.random.default_rng([self.seed, _FIXED_STREAM])
        return self._jitter(self.split.train, rng)

    def train_epoch(self, epoch: int) -> JitteredSet:
        r"""The jittered training set for one epoch.

        Args:
            epoch: non-negative epoch number.

        Shape:
            - images: :math:`(N_{train}, 36, 36)`

        Returns:
            JitteredSet: with ``redraw_train``, shifts drawn from
            ``np.random.default_rng([seed, 1, epoch])`` (the same for the same
            ``(seed, epoch)``); without, :attr:`train_fixed` for every epoch.
        """
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        if not self.redraw_train:
            return self.train_fixed
        rng = np.random.default_rng([self.seed, _EPOCH_STREAM, int(epoch)])
        return self._jitter(self.split.train, rng)
