"""The classic mixture of experts, the model the paper starts from.

Each of ``E`` experts is a linear classifier with its own class distribution,
and the gate mixes those *distributions*::

    F(x) = sum_e gate_probs_e(x) * softmax(W_e x + b_e)      # (C,) per input

The Deep MoE of :mod:`dmoe_edu.dmoe` mixes hidden representations instead and
applies one softmax at the end. This small model is what the first course
notebooks train on the 2-D toy problem of :mod:`dmoe_edu.data.toy`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops
from .dmoe import ModelOutput, check_input
from .gating import _check_positive, make_gate

__all__ = ["ClassicMoE"]


class ClassicMoE(nn.Module):
    """``E`` linear experts over ``C`` classes, their class distributions mixed.

    The output's ``logits`` are the log of the mixed class distribution, so
    ``softmax(logits)`` gives the mixture back and cross-entropy on them is the
    mixture's negative log-likelihood, ``-log F_y(x)``. The mixed probabilities
    are clamped at float32's smallest normal number before the log, so a
    confidently wrong mixture gives a large, finite loss.

    Args:
        in_dim: input width ``D``.
        num_classes: classes ``C``.
        num_experts: experts ``E``.
        gate_hidden: hidden width of the paper's two-layer ReLU gate, or
            ``None`` for a linear gate. Default: ``None``.

    Shape:
        - Input: ``(B, D)``.
        - Output: :class:`~dmoe_edu.dmoe.ModelOutput` with ``logits`` of shape
          ``(B, C)`` and ``gate_probs`` a 1-tuple holding the ``(B, E)`` gate.

    Attributes:
        experts: one ``nn.Linear(D, E * C)``: expert ``e``'s class scores are
            columns ``e * C .. e * C + C - 1`` of its output.
        gate: a :class:`~dmoe_edu.gating.LinearGate` or
            :class:`~dmoe_edu.gating.ReLUGate` scoring the ``E`` experts.

    Example:
        >>> model = ClassicMoE(in_dim=2, num_classes=2, num_experts=2)
        >>> out = model(torch.randn(5, 2))
        >>> out.logits.shape, out.gate_probs[0].shape
        (torch.Size([5, 2]), torch.Size([5, 2]))
        >>> torch.allclose(out.logits.exp().sum(1), torch.ones(5))
        True
    """

    def __init__(self, in_dim: int, num_classes: int, num_experts: int,
                 gate_hidden: int | None = None) -> None:
        super().__init__()
        in_dim, num_classes, num_experts = _check_positive(
            in_dim=in_dim, num_classes=num_classes, num_experts=num_experts
        )
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.num_experts = num_experts
        self.gate_hidden = gate_hidden
        self.experts = nn.Linear(in_dim, num_experts * num_classes)
        self.gate = make_gate(in_dim, num_experts, gate_hidden)

    def expert_logits(self, x: Tensor) -> Tensor:
        """Every expert's class scores for every input, ``(B, D) -> (B, E, C)``."""
        check_input(x, self.in_dim, self.experts.weight.dtype)
        B = x.shape[0]
        return self.experts(x).view(B, self.num_experts, self.num_classes)  # (B, E, C)

    def forward(self, x: Tensor) -> ModelOutput:
        # Each expert's class distribution
        expert_probs = torch.softmax(self.expert_logits(x), dim=2)  # (B, E, C)

        # The gate's distribution over the experts
        gate_probs = ops.softmax_gate(self.gate(x))  # (B, E)

        # Mix the distributions, then take the log for the cross-entropy
        mixed = ops.combine(gate_probs, expert_probs)  # (B, C)
        tiny = torch.finfo(mixed.dtype).tiny
        return ModelOutput(torch.log(mixed.clamp_min(tiny)), (gate_probs,))

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, num_classes={self.num_classes}, "
                f"num_experts={self.num_experts}, gate_hidden={self.gate_hidden}")
