"""What every backend of the two ops accepts: the input checks, written once.

Each backend's ``softmax_gate`` and ``combine`` (``reference``, ``emulate``, ``cupy``)
calls these first, so calling a backend module directly checks exactly what
:func:`dmoe_edu.ops.softmax_gate` and :func:`dmoe_edu.ops.combine` check. A kernel
backend needs them most: CuPy and the emulation read raw memory, and a mask of the
wrong length or a batch mismatch would be read past its end.
"""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float64)


def check_floating(name: str, tensor: Tensor, ndim: int) -> None:
    """Raise unless ``tensor`` is a float32 or float64 tensor with ``ndim`` dimensions.

    Example:
        >>> check_floating("gate_logits", torch.zeros(2, 3, dtype=torch.int64), 2)
        Traceback (most recent call last):
        ...
        TypeError: gate_logits must be float32 or float64, got torch.int64
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {tensor.dtype}")


def check_softmax_gate(gate_logits: Tensor, mask: Tensor | None) -> Tensor | None:
    """Check the arguments of ``softmax_gate``; return the mask as ``(B, E)``.

    Args:
        gate_logits: ``(B, E)``, float32 or float64.
        mask: ``None``, or a bool tensor of shape ``(B, E)``, ``(1, E)`` or ``(E,)``
            that keeps at least one expert in every row.

    Returns:
        ``None``, or the mask broadcast to ``(B, E)`` (a view where it can be) on the
        logits' device.

    Raises:
        TypeError: for a non-tensor, a wrong dtype or a non-bool mask.
        ValueError: for a wrong shape, or a mask that leaves a row with no expert
            (the message names the first such row and counts them).
    """
    check_floating("gate_logits", gate_logits, ndim=2)
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"mask must be a bool tensor or None, got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    B, E = gate_logits.shape
    if tuple(mask.shape) not in ((B, E), (1, E), (E,)):
        raise ValueError(
            f"mask shape must be (B, E) = {(B, E)}, (1, E) = {(1, E)} or (E,) = "
            f"{(E,)}, got {tuple(mask.shape)}"
        )
    if mask.device.type == "meta" and gate_logits.device.type != "meta":
        raise ValueError(
            f"mask is a meta tensor, which holds no values; expected a mask on "
            f"{gate_logits.device} (a mask on another real device is copied there)"
        )
    mask = mask.to(gate_logits.device).expand(B, E)

    # Every row keeps an expert (a meta tensor holds no values to check).
    if B and mask.device.type != "meta":
        empty_rows = (~mask.any(dim=1)).nonzero().flatten()
        if len(empty_rows):
            raise ValueError(
                f"mask leaves row {int(empty_rows[0])} with no expert "
                f"({len(empty_rows)} of {B} rows have none); keep at least one "
                f"expert in every row"
            )
    return mask


def check_combine(gate_probs: Tensor, expert_out: Tensor) -> None:
    """Check the arguments of ``combine``: ``(B, E)`` and ``(B, E, H)`` tensors of one
    float dtype on one device.

    Raises:
        TypeError: for a non-tensor or a wrong or mismatched dtype.
        ValueError: for wrong or mismatched shapes, or two devices.
    """
    check_floating("gate_probs", gate_probs, ndim=2)
    check_floating("expert_out", expert_out, ndim=3)
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
