"""Gating networks: they score the experts for each input.

A gate maps an input ``x`` of width ``D`` to one score per expert, the
``gate_logits``. The mixture layer turns them into ``gate_probs`` with
:func:`dmoe_edu.ops.softmax_gate`, which is where the balancing mask applies.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from . import ops


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


def tempered_gate(gate_logits: Tensor, temperature: float = 1.0,
                  mask: Tensor | None = None) -> Tensor:
    """Gate probabilities at a temperature: ``softmax_gate(gate_logits / T)``.

    Dividing the logits by ``T > 1`` flattens the gate towards the uniform
    ``1 / E``; ``T < 1`` sharpens it towards the largest logit (``T -> 0`` is
    the argmax). ``T = 1`` is the plain gate. The paper trains at ``T = 1``.

    Args:
        gate_logits: gate scores before the softmax.
        temperature: ``T``, a finite number > 0. Default: 1.0.
        mask: optional bool mask of usable experts, as in
            :func:`dmoe_edu.ops.softmax_gate`. Default: ``None``.

    Shape:
        - gate_logits: ``(B, E)``; mask: ``(B, E)`` or ``(E,)``.
        - Output: ``(B, E)``, rows sum to 1.

    Returns:
        Tensor: the gate probabilities ``gate_probs``.

    Raises:
        ValueError: if ``temperature`` is not a finite number > 0.

    Example:
        >>> tempered_gate(torch.tensor([[2.0, 0.0]]), temperature=1e6)
        tensor([[0.5000, 0.5000]])
    """
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not 0.0 < float(temperature) < math.inf):
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r} "
            "(as T -> 0 the gate becomes the argmax, which has no softmax)"
        )
    return ops.softmax_gate(gate_logits / float(temperature), mask)


def gate_entropy(gate_probs: Tensor) -> Tensor:
    """Entropy in nats of each row's gate distribution, ``-sum_e p_e log p_e``.

    A gate sure of one expert has entropy 0; the uniform gate has the most,
    ``log E``. Experts with ``p_e = 0`` add nothing (``0 log 0 = 0``).

    Args:
        gate_probs: gate probabilities, each row summing to 1.

    Shape:
        - Input: ``(B, E)``.
        - Output: ``(B,)``.

    Returns:
        Tensor: the entropy of each row, in the input's dtype.

    Raises:
        ValueError: if ``gate_probs`` is not a floating ``(B, E)`` tensor.

    Example:
        >>> gate_entropy(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
        tensor([0.0000, 0.6931])
    """
    if (not isinstance(gate_probs, Tensor) or gate_probs.dim() != 2
            or not gate_probs.is_floating_point()):
        raise ValueError(
            "gate_probs must be a floating (B, E) tensor, got "
            f"{getattr(gate_probs, 'shape', type(gate_probs).__name__)}"
        )

    # p log p with 0 log 0 = 0: the log of 1 where p = 0 (its gradient stays 0)
    safe = torch.where(gate_probs > 0, gate_probs, torch.ones_like(gate_probs))
    plogp = (gate_probs * torch.log(safe)).sum(dim=1)  # (B,)

    # 0.0 - x rather than -x: a one-hot row gives 0.0, not -0.0
    return 0.0 - plogp


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
