"""A short self-check of an ops backend against an independent float64 computation.

Used by ``dmoe-edu kernels``; handy in a notebook too:

>>> checks = check_backend("reference")
>>> all(c.passed for c in checks), len(checks)
(True, 10)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import combine, softmax_gate, use_backend
from .kernels import launch_shape

# Odd sizes, more work than the capped grid below has threads, a row with one expert
# left, and logits large enough to overflow exp() without the max subtraction.
B, E, H = 301, 7, 129
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


@dataclass(frozen=True)
class Check:
    """One comparison: which op, in which dtype, its largest error and the verdict."""

    backend: str
    op: str
    dtype: torch.dtype
    max_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance


def _inputs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, E, generator=gen, dtype=torch.float64) * 4
    logits[0] = 1e4
    logits[1, :3] = -1e4
    mask = torch.rand(B, E, generator=gen) < 0.7
    mask[:, 0] = True
    mask[2] = False
    mask[2, E - 1] = True
    expert_out = torch.randn(B, E, H, generator=gen, dtype=torch.float64)
    grad_probs = torch.randn(B, E, generator=gen, dtype=torch.float64)
    grad_mixed = torch.randn(B, H, generator=gen, dtype=torch.float64)
    return logits, mask, expert_out, grad_probs, grad_mixed


def _expected_gating(logits, mask, grad_probs) -> dict[str, Tensor]:
    # Written out in float64, independently of every backend.
    shifted = logits.masked_fill(~mask, float("-inf"))
    shifted = shifted - shifted.max(dim=1, keepdim=True).values
    probs = shifted.exp() / shifted.exp().sum(dim=1, keepdim=True)
    dot = (grad_probs * probs).sum(dim=1, keepdim=True)
    return {
        "softmax_gate forward": probs,
        "softmax_gate backward": probs * (grad_probs - dot),
    }


def _expected_combine(gates, expert_out, grad_mixed) -> dict[str, Tensor]:
    return {
        "combine forward": torch.einsum("be,beh->bh", gates, expert_out),
        "combine backward (gates)": torch.einsum("beh,bh->be", expert_out, grad_mixed),
        "combine backward (experts)": gates[:, :, None] * grad_mixed[:, None, :],
    }


def check_backend(name: str, device: str | torch.device | None = None) -> list[Check]:
    """Run both ops, forward and backward, on ``name`` and compare with float64.

    Args:
        name: a backend of :data:`dmoe_edu.ops.BACKENDS`.
        device: where the tensors live. Default: ``cuda`` for ``cupy``, else ``cpu``.

    Returns:
        One :class:`Check` per op and dtype (float32 and float64); its error is
        the largest absolute difference divided by ``max(1, largest value)``.
    """
    device = torch.device(device or ("cuda" if name == "cupy" else "cpu"))
    results = []
    for dtype in (torch.float32, torch.float64):
        inputs = _inputs()
        logits, mask, expert_out, grad_probs, grad_mixed = (
            t.to(device, dtype) if t.is_floating_point() else t.to(device)
            for t in inputs
        )
        logits.requires_grad_(True)
        expert_out.requires_grad_(True)

        # A capped grid of small blocks: the grid-stride loops must cover the rest.
        with use_backend(name), launch_shape(block=64, max_blocks=3):
            probs = softmax_gate(logits, mask)
            (grad_logits,) = torch.autograd.grad(probs, logits, grad_probs)
            gates = probs.detach().requires_grad_(True)
            mixed = combine(gates, expert_out)
            grads = torch.autograd.grad(mixed, (gates, expert_out), grad_mixed)

        # The combine is checked against the gates this backend produced, so that
        # an error in one op does not show up as an error in the other.
        expected = _expected_gating(inputs[0], inputs[1], inputs[3])
        gates64 = gates.detach().double().cpu()
        expected.update(_expected_combine(gates64, inputs[2], inputs[4]))
        got = dict(zip(expected, (probs, grad_logits, mixed, *grads)))
        for op, want in expected.items():
            error = (got[op].detach().double().cpu() - want).abs().max().item()
            scale = max(1.0, want.abs().max().item())
            results.append(Check(name, op, dtype, error / scale, TOLERANCE[dtype]))
    return results
