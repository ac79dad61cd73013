"""A layer of ``E`` ReLU experts that all read the same input.

Each expert is ``f_e(x) = relu(W_e x + b_e)``. The weights are stacked into
one ``(E, H, D)`` tensor so the whole layer runs as a single ``(B, D) x (D, E*H)``
matrix product: on a CPU that is much faster than a loop over experts, and it
is the layout the combine op expects.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .gating import _check_positive


class ExpertLayer(nn.Module):
    """``E`` experts, each a linear map of width ``H`` followed by ReLU.

    Args:
        in_dim: input width ``D``.
        width: expert width ``H`` (hidden units of one expert).
        num_experts: number of experts ``E``.

    Shape:
        - Input: ``(B, D)``.
        - Output: ``(B, E, H)``, expert ``e``'s output in ``[:, e, :]``.

    Attributes:
        weight: ``(E, H, D)``, initialised like ``nn.Linear`` for each expert.
        bias: ``(E, H)``.

    Example:
        >>> experts = ExpertLayer(in_dim=1296, width=100, num_experts=4)
        >>> experts(torch.randn(8, 1296)).shape
        torch.Size([8, 4, 100])
    """

    def __init__(self, in_dim: int, width: int, num_experts: int) -> None:
        super().__init__()
        in_dim, width, num_experts = _check_positive(
            in_dim=in_dim, width=width, num_experts=num_experts
        )
        self.in_dim = in_dim
        self.width = width
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, width, in_dim))
        self.bias = nn.Parameter(torch.empty(num_experts, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same uniform(-1/sqrt(D), 1/sqrt(D)) as nn.Linear, expert by expert.
        bound = 1.0 / math.sqrt(self.in_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        E, H, D = self.weight.shape

        # One wide product for all experts, then split the columns per expert.
        pre = nn.functional.linear(x, self.weight.view(E * H, D), self.bias.view(E * H))
        return torch.relu(pre).view(B, E, H)  # (B, E, H)

    def extra_repr(self) -> str:
        E, H, D = self.weight.shape
        return f"in_dim={D}, width={H}, num_experts={E}"
