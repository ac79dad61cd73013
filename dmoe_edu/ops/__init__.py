"""The two hot ops of every mixture layer, behind a backend seam.

``softmax_gate`` turns gate logits into gate probabilities (optionally with
some experts masked out) and ``combine`` mixes the experts' outputs with those
probabilities. Every mixture layer in the package calls these two functions, so
a faster backend (the CUDA kernels of ``kernels/``) plugs in here and nowhere
else.

Backends:

* ``"reference"``: plain PyTorch with a hand-written backward. The oracle, on any
  device.
* ``"cupy"``: the package's CUDA kernels (``kernels/*.cu``) on a GPU, through CuPy.
* ``"emulate"``: the same ``.cu`` files compiled for the CPU with the system C++
  compiler and run one thread at a time, so the kernels run (slowly) without a GPU.

By default (``"auto"``) CUDA tensors go to ``cupy`` when CuPy works here, and
everything else to ``reference``. Choose the process-wide default with
:func:`set_backend`, or a backend for one block of code with :func:`use_backend`
(context-local: it changes nothing in other threads); :func:`backend_status` says
which can run here and why not.

Every backend meets one contract, tested against ``reference``, and checks its
inputs the same way (:mod:`dmoe_edu.ops.contract`), also when called directly as
``dmoe_edu.ops.emulate.softmax_gate``. The kernel backends copy non-contiguous
inputs to contiguous ones and refuse tensors on a device they cannot reach
(``emulate``: CPU only; ``cupy``: CUDA only). Their backward is first-order only: a
second derivative through them raises a ``RuntimeError``. Under ``torch.compile``
they run eagerly (a graph break).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

from torch import Tensor

from . import cupy_backend, emulate, reference
from .kernels import warn_user

BACKENDS = ("reference", "emulate", "cupy")

_IMPLEMENTATIONS: dict[str, tuple[Callable, Callable]] = {
    "reference": (reference.softmax_gate, reference.combine),
    "emulate": (emulate.softmax_gate, emulate.combine),
    "cupy": (cupy_backend.softmax_gate, cupy_backend.combine),
}
# The process-wide default (set_backend), and the context-local choice of a
# use_backend block (None outside every block). _override_used stays False until the
# first use_backend, so that torch.compile can trace get_backend until then (Dynamo
# breaks the graph at ContextVar.get).
_default = "auto"
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dmoe_edu_ops_backend", default=None
)
_override_used = False
_warned_no_cupy = False


def backend_status() -> dict[str, str | None]:
    """For each backend, ``None`` if it can run here, else the reason it cannot.

    Example:
        >>> backend_status()["reference"] is None
        True
    """
    return {
        "reference": None,
        "emulate": emulate.status(),
        "cupy": cupy_backend.status(),
    }


def available_backends() -> list[str]:
    """Names of the backends that can run here, ``reference`` first."""
    return [name for name, reason in backend_status().items() if reason is None]


def get_backend() -> str:
    """The backend setting here: ``"auto"`` (the default) or a backend's name.

    Inside a :func:`use_backend` block, that block's backend; elsewhere the process
    default of :func:`set_backend`.
    """
    if _override_used:
        name = _override.get()
        if name is not None:
            return name
    return _default


def _check_backend(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"unknown ops backend {name!r}; expected 'auto' or one of {list(BACKENDS)}"
        )
    if name == "auto":
        return
    reason = {"reference": lambda: None, "emulate": emulate.status,
              "cupy": cupy_backend.status}[name]()
    if reason:
        raise RuntimeError(f"the {name} backend cannot run here: {reason}")


def set_backend(name: str) -> None:
    """Make ``name`` (or ``"auto"``) the backend of every later op call, process-wide.

    Every thread uses it, except inside a :func:`use_backend` block, whose choice
    wins for as long as the block runs.

    Raises:
        ValueError: if ``name`` is not ``"auto"`` or one of :data:`BACKENDS`.
        RuntimeError: if that backend cannot run here; the message says why.
    """
    global _default
    _check_backend(name)
    _default = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block of code on the backend ``name``, then restore the previous one.

    The choice is context-local (a :mod:`contextvars` variable): it holds in this
    thread (and asyncio task) only. Other threads, including threads started inside
    the block, keep the process default of :func:`set_backend`, and blocks in two
    threads never undo each other's choice.

    Raises:
        ValueError: if ``name`` is not ``"auto"`` or one of :data:`BACKENDS`.
        RuntimeError: if that backend cannot run here; the message says why.

    Example:
        >>> with use_backend("reference"):
        ...     probs = softmax_gate(torch.zeros(2, 4))
    """
    global _override_used
    _check_backend(name)
    _override_used = True
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def resolve_backend(tensor: Tensor) -> str:
    """The backend an op on ``tensor`` runs on under the current setting.

    Example:
        >>> resolve_backend(torch.zeros(1))
        'reference'
    """
    global _warned_no_cupy
    active = get_backend()
    if active != "auto":
        return active
    if isinstance(tensor, Tensor) and tensor.is_cuda:
        reason = cupy_backend.status()
        if reason is None:
            return "cupy"
        if not _warned_no_cupy:
            warn_user(
                f"CuPy unavailable ({reason}); the ops run on the torch reference",
                RuntimeWarning,
            )
            _warned_no_cupy = True
    return "reference"


def softmax_gate(gate_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Stable row softmax over experts, with an optional mask.

    Masked experts get a probability of exactly 0 and the others renormalise
    among themselves. The mask is applied to the logits (set to ``-inf``) before
    the softmax, never by dividing probabilities, so a saturated float32 row
    cannot produce ``0 / 0``.

    Args:
        gate_logits: gate scores before the softmax.
        mask: optional boolean tensor, ``True`` where an expert **may** be used.
            Every row must keep at least one expert. Default: ``None`` (all
            experts available).

    Shape:
        - gate_logits: ``(B, E)``, float32 or float64.
        - mask: ``(B, E)``, or ``(1, E)`` or ``(E,)`` (broadcast over the batch).
        - Output: ``(B, E)``, rows sum to 1. A row whose allowed logits are all
          ``-inf`` (or hold a NaN) is NaN on its allowed experts, 0 on the masked.

    Returns:
        The gate probabilities ``gate_probs``.

    Example:
        >>> softmax_gate(torch.tensor([[0.0, 0.0, 0.0]]),
        ...              mask=torch.tensor([True, False, True]))
        tensor([[0.5000, 0.0000, 0.5000]])
    """
    return _IMPLEMENTATIONS[resolve_backend(gate_logits)][0](gate_logits, mask)


def combine(gate_probs: Tensor, expert_out: Tensor) -> Tensor:
    """Gate-weighted sum of the experts' outputs.

    ``mixed[b] = sum_e gate_probs[b, e] * expert_out[b, e]``.

    Args:
        gate_probs: gate probabilities, one row per example.
        expert_out: every expert's output for every example.

    Shape:
        - gate_probs: ``(B, E)``.
        - expert_out: ``(B, E, H)``, same dtype and device as ``gate_probs``.
        - Output: ``(B, H)``.

    Returns:
        The mixed representation ``mixed``.

    Example:
        >>> combine(torch.tensor([[0.25, 0.75]]), torch.ones(1, 2, 3))
        tensor([[1., 1., 1.]])
    """
    return _IMPLEMENTATIONS[resolve_backend(gate_probs)][1](gate_probs, expert_out)


__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_status",
    "combine",
    "get_backend",
    "resolve_backend",
    "set_backend",
    "softmax_gate",
    "use_backend",
]
