"""The plain PyTorch backend of the two hot ops: the oracle every backend meets.

Both ops come with a hand-written backward. On the CPU that is measurably
faster than autograd through ``einsum`` or broadcasting (see ``bench/``), and it
spells out the gradients a student will later write as CUDA kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import check_combine, check_softmax_gate


def _masked_logits(gate_logits: Tensor, mask: Tensor | None) -> Tensor:
    # Masked experts go to -inf *before* the softmax, so a saturated float32
    # softmax can never leave a row of zeros to renormalise (0/0).
    if mask is None:
        return gate_logits
    return gate_logits.masked_fill(~mask, float("-inf"))


class _SoftmaxGate(torch.autograd.Function):
    """Row softmax whose backward reuses the saved probabilities."""

    @staticmethod
    def forward(ctx, gate_logits: Tensor, mask: Tensor | None) -> Tensor:
        # Softmax over the expert axis, taken in the (E, B) layout: PyTorch's CPU
        # softmax over a short last dimension (E = 4) is several times slower.
        gate_probs = torch.softmax(_masked_logits(gate_logits, mask).t(), dim=0).t()
        gate_probs = gate_probs.contiguous()  # (B, E)

        # A row whose allowed logits are all -inf (or NaN) is NaN throughout; its
        # masked experts still get exactly 0, as in the kernels.
        if mask is not None:
            gate_probs = gate_probs.masked_fill_(~mask, 0.0)
        ctx.save_for_backward(gate_probs)
        return gate_probs

    @staticmethod
    def backward(ctx, grad_probs: Tensor):
        (gate_probs,) = ctx.saved_tensors

        # d logits = p * (dp - <dp, p>); masked experts have p = 0, so they get 0.
        dot = (grad_probs * gate_probs).sum(dim=1, keepdim=True)  # (B, 1)
        return gate_probs * (grad_probs - dot), None


class _Combine(torch.autograd.Function):
    """Gate-weighted sum over experts as one batched matrix product."""

    @staticmethod
    def forward(ctx, gate_probs: Tensor, expert_out: Tensor) -> Tensor:
        ctx.save_for_backward(gate_probs, expert_out)

        # (B, 1, E) @ (B, E, H) -> (B, 1, H)
        return torch.bmm(gate_probs.unsqueeze(1), expert_out).squeeze(1)

    @staticmethod
    def backward(ctx, grad_mixed: Tensor):
        gate_probs, expert_out = ctx.saved_tensors
        grad_gates = grad_expert = None

        # d gates[b, e] = <expert_out[b, e, :], grad_mixed[b, :]>
        if ctx.needs_input_grad[0]:
            grad_gates = torch.bmm(expert_out, grad_mixed.unsqueeze(2)).squeeze(2)

        # d expert_out[b, e, :] = gates[b, e] * grad_mixed[b, :]
        if ctx.needs_input_grad[1]:
            grad_expert = gate_probs.unsqueeze(2) * grad_mixed.unsqueeze(1)  # (B, E, H)
        return grad_gates, grad_expert


def softmax_gate(gate_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Reference backend of :func:`dmoe_edu.ops.softmax_gate` (inputs checked)."""
    mask = check_softmax_gate(gate_logits, mask)
    return _SoftmaxGate.apply(gate_logits, mask)


def combine(gate_probs: Tensor, expert_out: Tensor) -> Tensor:
    """Reference backend of :func:`dmoe_edu.ops.combine` (inputs checked)."""
    check_combine(gate_probs, expert_out)
    return _Combine.apply(gate_probs, expert_out)
