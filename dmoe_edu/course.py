"""What every course notebook does first, and where it finds the course's files.

A notebook's setup cell is one call::

    from dmoe_edu import course
    course.setup(seed=0)

It seeds Python, NumPy and torch, fixes torch's thread count (the same seed
gives different numbers with another thread count), picks the ops backend, and
keeps plotly's renderer small and stable for committed notebooks unless the
environment names another one (the book builds with
``PLOTLY_RENDERER=notebook`` so that figures are self-contained HTML).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from . import ops
from .gating import check_int

logger = logging.getLogger(__name__)

DEFAULT_RENDERER = "plotly_mimetype"
"""plotly renderer of committed notebooks: small outputs that JupyterLab draws."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What :func:`setup` chose, for the notebook to show.

    Attributes:
        seed: the seed given to Python, NumPy and torch.
        threads: torch's intra-op thread count.
        backend: the ops backend in use (see :func:`dmoe_edu.ops.get_backend`).
        device: ``"cuda"`` when PyTorch sees a GPU, else ``"cpu"``.
        renderer: plotly's default renderer.
    """

    seed: int
    threads: int
    backend: str
    device: str
    renderer: str

    def __str__(self) -> str:
        return (f"seed {self.seed}, torch {torch.__version__}, "
                f"{self.threads} thread(s), device {self.device}, "
                f"ops backend {self.backend!r}, plotly renderer {self.renderer!r}")


def setup(seed: int = 0, threads: int = 1, backend: str | None = None) -> Setup:
    """Seed everything, fix the thread count, choose the backend and renderer.

    Args:
        seed: seed of Python's ``random``, NumPy's global generator and torch.
            Default: 0.
        threads: torch's intra-op threads. Default: 1 (repeatable numbers).
        backend: an ops backend name (``"reference"``, ``"emulate"``,
            ``"cupy"``, ``"auto"``), or ``None`` to keep the current one.
            Default: ``None``.

    Returns:
        Setup: what was chosen; ``print`` it in the notebook.

    Example:
        >>> course.setup(seed=3).seed
        3
    """
    seed = check_int("seed", seed, minimum=0)
    threads = check_int("threads", threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    if backend is not None:
        ops.set_backend(backend)

    # The renderer: the environment's choice wins (the book sets it).
    import plotly.io as pio

    renderer = os.environ.get("PLOTLY_RENDERER") or DEFAULT_RENDERER
    pio.renderers.default = renderer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = Setup(seed, threads, ops.get_backend(), device, renderer)
    logger.info("course setup: %s", chosen)
    return chosen


def repository_root() -> Path | None:
    """The source checkout holding this package, or ``None`` for an install.

    The course's notebooks and the full-scale results in ``reproductions/``
    live in the repository, not in the wheel.
    """
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def reproduction_file(name: str) -> Path:
    """Path of a results file that ``dmoe-edu reproduce`` wrote, kept in the repo.

    Args:
        name: a file name in ``reproductions/``, e.g. ``"paper_row1_seed0.json"``.

    Raises:
        FileNotFoundError: if the package is not run from a source checkout, or
            the file is not there (the message says which command writes it).
    """
    root = repository_root()
    path = None if root is None else root / "reproductions" / name
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"reproductions/{name} not found (looked in "
            f"{root / 'reproductions' if root else 'no source checkout'}); it is "
            "written by `dmoe-edu reproduce --preset paper --data-dir <MNIST> "
            "--out <dir>` as <dir>/results.json"
        )
    return path


__all__ = ["DEFAULT_RENDERER", "Setup", "repository_root", "reproduction_file", "setup"]
