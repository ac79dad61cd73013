"""Gating networks: they score the experts for each input.

A gate maps an input ``x`` of width ``D`` to one score per expert, the
``gate_logits``. The mixture layer turns them into ``gate_probs`` with
:func:`dmoe_edu.ops.softmax_gate`, which is where the balancing mask applies.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn


class LinearGate(nn.Module):
    """A linear gate, ``gate_logits = W x + b``: the simplest teaching baseline.

    The paper never uses it; it is here to compare against :class:`ReLUGate`.

    Args:
        in_dim: input width ``D``.
        num_experts: number of experts ``E`` to score.

    Shape:
        - Input: ``(B, D)``.
        - Output: ``(B, E)`` gate logits.

    Example:
        >>> gate = LinearGate(in_dim=8, num_experts=4)
        >>> gate(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_dim: int, num_experts: int) -> None:
        super().__init__()
        in_dim, num_experts = _check_positive(in_dim=in_dim, num_experts=num_experts)
        self.in_dim = in_dim
        self.num_experts = num_experts
        self.proj = nn.Linear(in_dim, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class ReLUGate(nn.Module):
    """The paper's gate: two layers with a ReLU between them.

    ``gate_logits = B relu(A x + a) + b``; the softmax that follows lives in the
    mixture layer. The paper uses a hidden width of 50 or 20 on MNIST and 64 on
    speech.

    Args:
        in_dim: input width ``D``.
        num_experts: number of experts ``E`` to score.
        hidden: width of the gate's hidden layer. Default: 50.

    Shape:
        - Input: ``(B, D)``.
        - Output: ``(B, E)`` gate logits.

    Example:
        >>> gate = ReLUGate(in_dim=1296, num_experts=4, hidden=50)
        >>> sum(p.numel() for p in gate.parameters())  # 1296*50+50 + 50*4+4
        65054
    """

    def __init__(self, in_dim: int, num_experts: int, hidden: int = 50) -> None:
        super().__init__()
        in_dim, num_experts, hidden = _check_positive(
            in_dim=in_dim, num_experts=num_experts, hidden=hidden
        )
        self.in_dim = in_dim
        self.num_experts = num_experts
        self.hidden = hidden
        self.hidden_layer = nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden_layer(x)))


def make_gate(in_dim: int, num_experts: int, hidden: int | None) -> nn.Module:
    """A :class:`ReLUGate` with ``hidden`` units, or a :class:`LinearGate` if None."""
    if hidden is None:
        return LinearGate(in_dim, num_experts)
    return ReLUGate(in_dim, num_experts, hidden)


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as a plain ``int``, or raise ``ValueError`` naming ``name``.

    Any integer type is accepted (``int``, ``np.int64``, anything registered as
    :class:`numbers.Integral`); bools, floats and strings are refused, even
    ``2.0``, so a size never silently comes from a float.
    """
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
            or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(**sizes: object) -> tuple[int, ...]:
    """Check every keyword is an integer ``>= 1``; return them as plain ints."""
    return tuple(check_int(name, value) for name, value in sizes.items())
