"""One mixture layer: ``E`` experts, a gate, and the combine.

    mixed(x) = sum_e gate_probs_e(x) * f_e(x)

The layer returns the gate probabilities beside its output, so analysis and
figures never reach into hidden state.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import ops
from .balance import MarginConstraint
from .experts import ExpertLayer
from .gating import make_gate


class MixtureLayer(nn.Module):
    """A dense mixture of ReLU experts mixed by a gating network.

    Every expert runs on every input (the paper's dense mixture); the gate only
    weights their outputs. With ``num_experts=1`` there is nothing to choose, so
    the layer has no gate and its single gate probability is the constant 1:
    that is the paper's "Single Expert" layer.

    Args:
        in_dim: input width ``D``.
        width: expert width ``H``.
        num_experts: number of experts ``E``.
        gate_hidden: hidden width of the paper's two-layer ReLU gate, or ``None``
            for a linear gate. Default: 50.
        margin: margin ``m`` of the balancing constraint (see
            :class:`~dmoe_edu.balance.MarginConstraint`). Default: 100. The
            constraint starts switched off; training switches it on.

    Shape:
        - Input: ``(B, D)``.
        - Output: a tuple ``(mixed, gate_probs)`` of shapes ``(B, H)`` and
          ``(B, E)``.

    Example:
        >>> layer = MixtureLayer(in_dim=1296, width=100, num_experts=4)
        >>> mixed, gate_probs = layer(torch.randn(8, 1296))
        >>> mixed.shape, gate_probs.shape
        (torch.Size([8, 100]), torch.Size([8, 4]))
    """

    def __init__(
        self,
        in_dim: int,
        width: int,
        num_experts: int,
        gate_hidden: int | None = 50,
        margin: float = 100.0,
    ) -> None:
        super().__init__()
        self.experts = ExpertLayer(in_dim, width, num_experts)
        # Plain ints from the expert layer's checks (NumPy integers are accepted).
        self.in_dim = self.experts.in_dim
        self.width = self.experts.width
        self.num_experts = self.experts.num_experts
        self.gate_hidden = gate_hidden
        self.out_dim = self.width
        if self.num_experts > 1:
            self.gate = make_gate(self.in_dim, self.num_experts, gate_hidden)
            self.balance = MarginConstraint(self.num_experts, margin)
        else:
            self.gate = None
            self.balance = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        expert_out = self.experts(x)  # (B, E, H)
        if self.gate is None:
            gate_probs = x.new_ones(x.shape[0], 1)  # (B, 1)
            return expert_out[:, 0], gate_probs

        # Score the experts; while balancing, mask those that ran ahead.
        gate_logits = self.gate(x)  # (B, E)
        mask = None
        if self.training and self.balance.enabled:
            mask = self.balance.masks(gate_logits)  # (B, E)
        gate_probs = ops.softmax_gate(gate_logits, mask)  # (B, E)

        # Weight each expert's output by its gate and sum over experts.
        mixed = ops.combine(gate_probs, expert_out)  # (B, H)
        return mixed, gate_probs


class ConcatLayer(nn.Module):
    """``E`` experts whose outputs are concatenated instead of mixed; no gate.

    The paper's "Concat Layer2" baseline: it keeps everything the experts
    compute, so it bounds what the mixture could gain from its experts.

    Args:
        in_dim: input width ``D``.
        width: expert width ``H``.
        num_experts: number of experts ``E``.

    Shape:
        - Input: ``(B, D)``.
        - Output: a tuple ``(concat, None)`` with ``concat`` of shape
          ``(B, E * H)``.
    """

    def __init__(self, in_dim: int, width: int, num_experts: int) -> None:
        super().__init__()
        self.experts = ExpertLayer(in_dim, width, num_experts)
        self.in_dim = self.experts.in_dim
        self.width = self.experts.width
        self.num_experts = self.experts.num_experts
        self.out_dim = self.width * self.num_experts

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        expert_out = self.experts(x)  # (B, E, H)
        return expert_out.flatten(1), None  # (B, E*H)


__all__ = ["ConcatLayer", "MixtureLayer"]
