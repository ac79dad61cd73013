"""The paper's balancing constraint: a hard margin on each expert's running load.

Without help, a mixture collapses: the experts that happen to do well early get
more gate mass, so they train more and get still more. Eigen et al. keep, for
every gated layer, the running total of gate mass each expert has received,

    G_e(t) = sum over examples t' < t of g_e(x_t'),

and while training early they switch off any expert that has run ahead of the
mean by more than a margin ``m``: if ``G_e(t) - mean(G(t)) > m``, then
``g_e(x_t) = 0`` and the other gates renormalise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import ops
from .gating import check_int

logger = logging.getLogger(__name__)


class MarginConstraint(nn.Module):
    """Running expert loads and the margin mask of one gated layer.

    The paper leaves several choices open. This implementation makes them once:

    * **Units of the margin.** ``margin`` is in *examples' worth of gate mass*:
      every gate vector sums to 1, so after ``t`` examples the mean total is
      ``t / E``, and ``margin=100`` lets an expert run 100 examples ahead of it.
    * **Order.** Examples are taken one at a time, in batch order. Example ``t``
      is tested against the totals of the examples *before* it (it does not count
      towards its own test); then its gate is added.
    * **What is added.** The gate actually used, i.e. the masked and renormalised
      one, so the totals measure the assignment the experts really received.
    * **Strictness.** An expert is masked when its excess is strictly greater
      than ``margin``. The expert with the smallest total is never masked, so a
      row always keeps an expert, even when float rounding makes every total
      look above the mean (``margin=0`` with equal totals).
    * **Gradients** flow through the masked, renormalised gate: the mask is
      applied to the logits (masked experts at ``-inf``) and masked experts get
      no gradient.
    * **Training only.** The mask applies only while the owning layer is in
      training mode *and* the constraint is switched on (:attr:`enabled`); the
      totals persist while it is on and are saved in checkpoints.

    The mask decisions are computed in float64 on the CPU from detached logits,
    one example at a time: a short Python loop over the batch, used only during
    the constrained phase.

    Args:
        num_experts: number of experts ``E`` of the layer.
        margin: the margin ``m`` (``>= 0``, may be ``math.inf``). Default: 100.

    Attributes:
        totals: ``(E,)`` float64 buffer, the running gate mass per expert.
        seen: float64 buffer, the number of examples added so far.
        enabled: whether the mask applies in training mode.
        masked_examples: examples that had at least one expert masked since the
            last :meth:`reset`.

    Example:
        >>> c = MarginConstraint(num_experts=2, margin=0.25)
        >>> c.enabled = True
        >>> c.masks(torch.tensor([[5.0, 0.0], [5.0, 0.0]]))  # expert 0 runs ahead
        tensor([[ True,  True],
                [False,  True]])
    """

    def __init__(self, num_experts: int, margin: float = 100.0) -> None:
        super().__init__()
        num_experts = check_int("num_experts", num_experts)
        self.num_experts = num_experts
        self.margin = check_margin(margin)
        self.enabled = False
        self.masked_examples = 0
        self.register_buffer("totals", torch.zeros(num_experts, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    def reset(self) -> None:
        """Forget the running totals (call when a constrained phase starts)."""
        self.totals.zero_()
        self.seen.zero_()
        self.masked_examples = 0

    @torch.no_grad()
    def masks(self, gate_logits: Tensor) -> Tensor:
        """Decide each example's mask in batch order and add its gate to the totals.

        Args:
            gate_logits: the layer's gate logits for this batch.

        Shape:
            - gate_logits: ``(B, E)``.
            - Output: ``(B, E)`` bool, ``True`` where the expert may be used.

        Returns:
            The mask to pass to :func:`dmoe_edu.ops.softmax_gate`.

        Raises:
            ValueError: if ``gate_logits`` has the wrong width, or holds a NaN
                or an infinity. The totals are then left unchanged: one bad
                batch would otherwise make them NaN for good, and every later
                example would be routed to expert 0.
        """
        B, E = gate_logits.shape
        if E != self.num_experts:
            raise ValueError(
                f"gate_logits must have E = {self.num_experts} columns, got {E}"
            )
        logits = gate_logits.detach().to("cpu", torch.float64).numpy()

        # Refuse NaN and inf before they reach the totals (they never recover).
        bad_rows = int((~np.isfinite(logits)).any(axis=1).sum())
        if bad_rows:
            raise ValueError(
                f"gate_logits must be finite, got NaN or inf in {bad_rows} of "
                f"{B} rows; the balancing totals were left unchanged. Check the "
                "inputs for NaN/inf, or lower the learning rate if training "
                "diverged"
            )

        # Unmasked probabilities once for the batch; a masked row renormalises them.
        raw = np.exp(logits - logits.max(axis=1, keepdims=True))
        raw /= raw.sum(axis=1, keepdims=True)

        totals = self.totals.numpy().copy()
        keep = np.ones((B, E), dtype=bool)
        masked = 0
        for b in range(B):
            # Test example b against the totals of the examples before it.
            row_keep = totals - totals.mean() <= self.margin
            if row_keep.all():
                totals += raw[b]
                continue

            # Mask the leaders, never the expert with the smallest total.
            row_keep[totals.argmin()] = True
            keep[b] = row_keep
            masked += 1
            totals += _renormalised(logits[b], raw[b], row_keep)

        self.totals.copy_(torch.from_numpy(totals))
        self.seen += B
        self.masked_examples += masked
        return torch.from_numpy(keep).to(gate_logits.device)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, margin={self.margin}"


def _renormalised(logits: np.ndarray, raw: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Gate of one example with the masked experts removed, in float64."""
    kept = raw * keep
    total = kept.sum()
    if total > 0.0:
        return kept / total

    # Every kept probability underflowed: redo the softmax over the kept logits.
    shifted = np.where(keep, logits, -np.inf)
    kept = np.exp(shifted - shifted.max())
    return kept / kept.sum()


def check_margin(margin: float) -> float:
    """Return ``margin`` as a float, or raise ``ValueError`` if it is not ``>= 0``."""
    try:
        value = float(margin)
    except (TypeError, ValueError):
        raise ValueError(f"margin must be a number >= 0, got {margin!r}") from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"margin must be >= 0 (examples of gate mass), got {margin!r}")
    return value


@dataclasses.dataclass(frozen=True)
class MarginTrace:
    """What the margin rule did along a stream of examples (see :func:`trace_margin`).

    Row ``t`` of every array describes example ``t`` of the stream.

    Attributes:
        margin: the margin ``m`` that was replayed.
        totals: ``(T, E)`` float64, each expert's running gate mass *before*
            example ``t`` was tested (row 0 is all zeros).
        excess: ``(T, E)`` float64, ``totals`` minus their mean over the experts:
            the number the rule compares with ``margin``.
        keep: ``(T, E)`` bool, ``True`` where example ``t`` may use the expert.
        raw_probs: ``(T, E)`` float64, the gate before the mask (plain softmax).
        gate_probs: ``(T, E)`` float64, the gate example ``t`` actually got: the
            masked experts at exactly 0, the others renormalised.
    """

    margin: float
    totals: np.ndarray
    excess: np.ndarray
    keep: np.ndarray
    raw_probs: np.ndarray
    gate_probs: np.ndarray

    @property
    def masked(self) -> np.ndarray:
        """``(T, E)`` bool, ``True`` where the rule switched the expert off."""
        return ~self.keep

    @property
    def masked_examples(self) -> np.ndarray:
        """``(T,)`` bool, ``True`` for the examples that had an expert masked."""
        return self.masked.any(axis=1)


def trace_margin(gate_logits: Any, margin: float) -> MarginTrace:
    """Replay the margin rule of :class:`MarginConstraint` over a stream of gates.

    A fresh :class:`MarginConstraint` with ``margin`` sees the examples one at a
    time, in order, exactly as a gated layer's constraint sees a training batch;
    its running totals are recorded before each example's test. The stream is
    fixed (nothing learns here), so this shows the rule alone: which expert it
    masks when, and what gate the example then gets.

    Args:
        gate_logits: gate scores of ``T`` examples, a tensor or array.
        margin: the margin ``m`` in examples of gate mass (``>= 0``, may be
            ``math.inf`` for no constraint at all).

    Shape:
        - gate_logits: ``(T, E)``.
        - Every array of the result: ``(T, E)``.

    Returns:
        MarginTrace: running totals, their excess over the mean, the masks and
        the gates before and after the mask, computed in float64.

    Raises:
        ValueError: if ``gate_logits`` is not a non-empty ``(T, E)`` array of
            finite numbers, or ``margin`` is not a number ``>= 0``.

    Example:
        >>> trace = trace_margin(torch.tensor([[5.0, 0.0], [5.0, 0.0]]), margin=0.25)
        >>> trace.excess.round(3).tolist()  # expert 0 ran 0.493 ahead of the mean
        [[0.0, 0.0], [0.493, -0.493]]
        >>> trace.keep.tolist()
        [[True, True], [False, True]]
        >>> trace.gate_probs[1].tolist()
        [0.0, 1.0]
    """
    margin = check_margin(margin)
    logits = _stream_logits(gate_logits)  # (T, E)
    T, E = logits.shape

    # A fresh constraint, switched on, fed one example at a time.
    constraint = MarginConstraint(E, margin)
    constraint.enabled = True
    totals = np.zeros((T, E))
    keep = np.ones((T, E), dtype=bool)
    for t in range(T):
        totals[t] = constraint.totals.numpy()
        keep[t] = constraint.masks(logits[t : t + 1])[0].numpy()

    # The gates before and after the mask, as the mixture layer computes them.
    raw_probs = ops.softmax_gate(logits)  # (T, E)
    gate_probs = ops.softmax_gate(logits, torch.from_numpy(keep))  # (T, E)
    excess = totals - totals.mean(axis=1, keepdims=True)  # (T, E)
    return MarginTrace(
        margin=margin,
        totals=totals,
        excess=excess,
        keep=keep,
        raw_probs=raw_probs.numpy(),
        gate_probs=gate_probs.numpy(),
    )


def _stream_logits(gate_logits: Any) -> Tensor:
    """``gate_logits`` as a float64 CPU tensor of shape ``(T, E)``, checked."""
    if isinstance(gate_logits, Tensor):
        logits = gate_logits.detach().to("cpu", torch.float64)
    else:
        try:
            logits = torch.as_tensor(np.asarray(gate_logits, dtype=np.float64))
        except (TypeError, ValueError):
            raise ValueError(
                f"gate_logits must be a (T, E) array of numbers, got "
                f"{type(gate_logits).__name__}"
            ) from None
    if logits.dim() != 2 or 0 in logits.shape:
        raise ValueError(
            f"gate_logits must have shape (T, E) with T, E >= 1, got "
            f"{tuple(logits.shape)}"
        )

    # Name the first bad example: the constraint would only say "1 of 1 rows".
    bad = (~torch.isfinite(logits)).any(dim=1).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"gate_logits must be finite, got NaN or inf in {len(bad)} of "
            f"{logits.shape[0]} examples (first: example {int(bad[0])})"
        )
    return logits.contiguous()
