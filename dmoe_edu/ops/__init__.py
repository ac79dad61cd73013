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
everything else to ``reference``. Choose one backend for every call with
:func:`set_backend`, or for a block of code with :func:`use_backend`;
:func:`backend_status` says which can run here and why not.

Every backend meets one contract, tested against ``reference``. The kernel backends
copy non-contiguous inputs to contiguous ones and refuse tensors on a device they
cannot reach (``emulate``: CPU only; ``cupy``: CUDA only). Their backward is
first-order only (no ``create_graph=True`` through them).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from . import cupy_backend, emulate, reference

BACKENDS = ("reference", "emulate", "cupy")

_IMPLEMENTATIONS: dict[str, tuple[Callable, Callable]] = {
    "reference": (reference.softmax_gate, reference.combine),
    "emulate": (emulate.softmax_gate, emulate.combine),
    "cupy": (cupy_backend.softmax_gate, cupy_backend.combine),
}
_active = "auto"
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
    """The backend setting now: ``"auto"`` (the default) or a backend's name."""
    return _active


def set_backend(name: str) -> None:
    """Send every later op call to the backend ``name`` (or ``"auto"``).

    Raises:
        ValueError: if ``name`` is not ``"auto"`` or one of :data:`BACKENDS`.
        RuntimeError: if that backend cannot run here; the message says why.
    """
    global _active
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"unknown ops backend {name!r}; expected 'auto' or one of {list(BACKENDS)}"
        )
    reason = backend_status()[name] if name != "auto" else None
    if reason:
        raise RuntimeError(f"the {name} backend cannot run here: {reason}")
    _active = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block of code on the backend ``name``, then restore the previous one.

    Example:
        >>> with use_backend("reference"):
        ...     probs = softmax_gate(torch.zeros(2, 4))
    """
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve_backend(tensor: Tensor) -> str:
    """The backend an op on ``tensor`` runs on under the current setting.

    Example:
        >>> resolve_backend(torch.zeros(1))
        'reference'
    """
    global _warned_no_cupy
    if _active != "auto":
        return _active
    if tensor.is_cuda:
        reason = cupy_backend.status()
        if reason is None:
            return "cupy"
        if not _warned_no_cupy:
            warnings.warn(
                f"CuPy unavailable ({reason}); the ops run on the torch reference",
                RuntimeWarning,
                stacklevel=3,
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
        - mask: ``(B, E)`` or ``(E,)`` (broadcast over the batch).
        - Output: ``(B, E)``, rows sum to 1.

    Returns:
        The gate probabilities ``gate_probs``.

    Example:
        >>> softmax_gate(torch.tensor([[0.0, 0.0, 0.0]]),
        ...              mask=torch.tensor([True, False, True]))
        tensor([[0.5000, 0.0000, 0.5000]])
    """
    _check_floating("gate_logits", gate_logits, ndim=2)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape not in (gate_logits.shape, gate_logits.shape[1:]):
            raise ValueError(
                f"mask shape must be (B, E) = {tuple(gate_logits.shape)} or (E,) = "
                f"{tuple(gate_logits.shape[1:])}, got {tuple(mask.shape)}"
            )
        mask = mask.expand_as(gate_logits).to(gate_logits.device)
        if gate_logits.shape[0] and not bool(mask.any(dim=1).all()):
            raise ValueError("mask leaves a row with no expert; keep at least one")
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
    _check_floating("gate_probs", gate_probs, ndim=2)
    _check_floating("expert_out", expert_out, ndim=3)
    if expert_out.shape[:2] != gate_probs.shape:
        raise ValueError(
            f"expert_out must be (B, E, H) with (B, E) = {tuple(gate_probs.shape)}, "
            f"got {tuple(expert_out.shape)}"
        )
    if expert_out.device != gate_probs.device:
        raise ValueError(
            f"gate_probs and expert_out must be on one device, got {gate_probs.device} "
            f"and {expert_out.device}"
        )
    if expert_out.dtype != gate_probs.dtype:
        raise TypeError(
            f"gate_probs and expert_out must share a dtype, got {gate_probs.dtype} "
            f"and {expert_out.dtype}"
        )
    return _IMPLEMENTATIONS[resolve_backend(gate_probs)][1](gate_probs, expert_out)


def _check_floating(name: str, tensor: Tensor, ndim: int) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {tensor.dtype}")


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
