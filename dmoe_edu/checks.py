"""Graders for the course assignments: run a student's answer, explain what is wrong.

Each ``check_*`` function takes what an exercise asks for (a function, or the CUDA
source of a kernel), runs it against the library's own implementation on fixed,
hand-made cases and on seeded random ones, and returns a :class:`Report`: a score
between 0 and 1, each failed case with what was expected and what came back, and a
hint when the answer matches a common mistake (no max subtraction before ``exp``,
gates transposed, the margin compared with the minimum instead of the mean, a kernel
without its grid-stride loop, ...). An answer that still raises
``NotImplementedError`` (or a kernel that still holds ``TODO``) is reported as
"not implemented yet" with a score of 0, so an unanswered assignment runs top to
bottom.

In a notebook, the report prints itself::

    from dmoe_edu import checks
    checks.check_softmax_gate(my_softmax_gate)

An autograder reads ``report.score`` or ``report.as_dict()``.

The exercises and the function each grader expects:

======================  ===========================================================
grader                  the student's answer
======================  ===========================================================
check_softmax_gate      ``f(gate_logits, mask=None) -> gate_probs``, ``(B, E)``
check_combine           ``f(gate_probs, expert_out) -> mixed``, ``(B, E, H) -> (B, H)``
check_margin_keep       ``f(totals, margin) -> keep``, ``(E,)`` float64 -> ``(E,)`` bool
check_balance_stream    ``f(gate_logits, margin) -> gate_probs``, ``(T, E)``, in order
check_gate_map          ``f(gate_probs, shifts) -> maps``, maps ``(E, 9, 9)``
check_factorisation     ``f(gate_probs, factor) -> score``, argmax ``I(F; Z) / H(Z)``
check_interpretation    a written answer (``str``): answered or not; a person grades it
check_combine_backward  CUDA source of ``combine_backward_experts`` (see its docstring)
======================  ===========================================================
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import analysis, balance, ops

__all__ = [
    "Case",
    "Report",
    "check_balance_stream",
    "check_combine",
    "check_combine_backward",
    "check_factorisation",
    "check_gate_map",
    "check_interpretation",
    "check_margin_keep",
    "check_softmax_gate",
]

NOT_IMPLEMENTED = "not implemented yet"


@dataclasses.dataclass
class Case:
    """One case a grader ran.

    Attributes:
        name: what the case tests, in words.
        passed: whether the answer matched the reference.
        expected: the reference's result, as text ("" for a passed case).
        got: the answer's result, as text ("" for a passed case).
        hint: the common mistake this answer matches, if any.
        candidates: every listed mistake this case's answer matches; when a case
            fits several, its hint is the one that fits the most cases.
    """

    name: str
    passed: bool
    expected: str = ""
    got: str = ""
    hint: str | None = None
    candidates: list[str] = dataclasses.field(default_factory=list, repr=False)


@dataclasses.dataclass
class Report:
    """What a grader found: a score, the cases, and hints for the failures.

    Attributes:
        exercise: the exercise's name.
        cases: every case run, in order.
        status: ``"passed"``, ``"failed"`` or ``"not implemented yet"``.
    """

    exercise: str
    cases: list[Case] = dataclasses.field(default_factory=list)
    status: str = "passed"

    @property
    def score(self) -> float:
        """The share of cases passed, 0 when not implemented."""
        if self.status == NOT_IMPLEMENTED or not self.cases:
            return 0.0
        return sum(c.passed for c in self.cases) / len(self.cases)

    @property
    def passed(self) -> bool:
        """Whether every case passed."""
        return self.status == "passed"

    @property
    def hints(self) -> list[str]:
        """The distinct hints of the failed cases, in order."""
        found = []
        for case in self.cases:
            if not case.passed and case.hint and case.hint not in found:
                found.append(case.hint)
        return found

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data (for an autograder's JSON)."""
        return {"exercise": self.exercise, "status": self.status,
                "score": self.score, "hints": self.hints,
                "cases": [dataclasses.asdict(c) for c in self.cases]}

    def __str__(self) -> str:
        if self.status == NOT_IMPLEMENTED:
            return (f"{self.exercise}: {NOT_IMPLEMENTED} (score 0). Write your answer "
                    f"where the exercise says, then run this check again.")
        done = sum(c.passed for c in self.cases)
        lines = [f"{self.exercise}: {done} of {len(self.cases)} cases passed "
                 f"(score {self.score:.2f})"]
        for case in self.cases:
            if case.passed:
                lines.append(f"  ok      {case.name}")
            else:
                lines.append(f"  FAILED  {case.name}")
                if case.expected or case.got:
                    lines.append(f"          expected {case.expected}")
                    lines.append(f"          got      {case.got}")
        for hint in self.hints:
            lines.append(f"  hint: {hint}")
        if self.passed:
            lines.append("  All cases pass.")
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows the text
        printer.text(str(self))


# --------------------------------------------------------------------------- helpers


class _NotImplemented(Exception):
    """The answer is still the exercise's placeholder."""


def _show(value: Any, limit: int = 6) -> str:
    # A short, readable rendering of a result: shape and the first values.
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        flat = value.reshape(-1)
        head = np.array2string(flat[:limit], precision=4, separator=", ")
        more = ", ..." if flat.size > limit else ""
        return f"shape {tuple(value.shape)}, values {head[:-1]}{more}]"
    return repr(value)


def _compare(expected: Any, got: Any) -> tuple[str, str]:
    # Both results in words; with equal shapes, the first element that differs.
    e, g = _as_array(expected), _as_array(got)
    if e is None or g is None or e.shape != g.shape or e.ndim == 0:
        return _show(expected), _show(got)
    wrong = ~np.isclose(g, e, atol=1e-6, rtol=1e-5, equal_nan=True)
    if not wrong.any():
        return _show(expected), _show(got)
    at = tuple(int(i) for i in np.argwhere(wrong)[0])
    where = f"; first difference at {list(at)} ({int(wrong.sum())} of {e.size} differ)"
    return (f"{_show(expected)}{where}: {e[at]:.6g}",
            f"{_show(got)}; there: {g[at]:.6g}")


def _as_array(value: Any) -> np.ndarray | None:
    if isinstance(value, Tensor):
        return value.detach().cpu().to(torch.float64).numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _close(got: Any, expected: Any, atol: float = 1e-6, rtol: float = 1e-5) -> bool:
    got, expected = _as_array(got), _as_array(expected)
    return (got is not None and got.shape == expected.shape
            and bool(np.allclose(got, expected, atol=atol, rtol=rtol,
                                 equal_nan=True)))


def _call(answer: Callable, *args) -> Any:
    # Run the answer; its placeholder becomes _NotImplemented, anything else a value.
    try:
        return answer(*args)
    except NotImplementedError:
        raise _NotImplemented from None


Mistake = tuple[Callable[..., Any], str]


def _grade(report: Report, name: str, answer: Callable, args: tuple,
           expected: Any, mistakes: Sequence[Mistake] = (),
           generic: str | None = None, **tolerance) -> None:
    """Run one case into ``report``: pass, or fail with the matching hint."""
    try:
        got = _call(answer, *args)
    except _NotImplemented:
        raise
    except Exception as exc:  # the student's code failed: report it, go on
        report.cases.append(Case(name, False, _show(expected),
                                 f"{type(exc).__name__}: {exc}", generic))
        return
    if _close(got, expected, **tolerance):
        report.cases.append(Case(name, True))
        return
    if got is None:
        report.cases.append(Case(name, False, _show(expected), "None",
                                 "your function returned None: is its `return` "
                                 "missing?"))
        return
    candidates = []
    for mistake, words in mistakes:
        try:
            wrong = mistake(*args)
        except Exception:  # this mistake cannot even run on these inputs
            continue
        if not _close(wrong, expected, **tolerance) and _close(got, wrong, **tolerance):
            candidates.append(words)
    hint = candidates[0] if candidates else generic
    report.cases.append(Case(name, False, *_compare(expected, got), hint, candidates))


def _run(exercise: str, cases: Callable[[Report], None], answer: Any) -> Report:
    if not callable(answer):
        raise TypeError(f"the answer to check must be your function, got "
                        f"{type(answer).__name__}")
    report = Report(exercise)
    try:
        # The answer's and the simulated mistakes' numpy warnings (overflow in exp,
        # ...) belong to the report, not to the notebook's output.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            cases(report)
    except _NotImplemented:
        return Report(exercise, [], NOT_IMPLEMENTED)

    # A case that fits several mistakes gets the one that fits the most cases.
    counts: dict[str, int] = {}
    for case in report.cases:
        for words in case.candidates:
            counts[words] = counts.get(words, 0) + 1
    for case in report.cases:
        if len(case.candidates) > 1:
            case.hint = max(case.candidates, key=lambda w: counts[w])
    report.status = "passed" if all(c.passed for c in report.cases) else "failed"
    return report


# ----------------------------------------------------------------- 1. softmax gate


def _softmax_no_max(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    e = torch.exp(logits)
    if mask is not None:
        e = e * mask
    return e / e.sum(dim=1, keepdim=True)


def _log_softmax(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    masked = logits if mask is None else logits.masked_fill(~mask, -math.inf)
    return torch.log_softmax(masked, dim=1)


def _softmax_over_batch(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    masked = logits if mask is None else logits.masked_fill(~mask, -math.inf)
    return torch.softmax(masked, dim=0)


def _softmax_mask_ignored(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    return torch.softmax(logits, dim=1)


def _softmax_mask_after(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    probs = torch.softmax(logits, dim=1)
    return probs if mask is None else probs * mask


SOFTMAX_MISTAKES: list[Mistake] = [
    (_softmax_no_max, "exp of a large logit overflows to inf (and inf / inf is NaN): "
                      "subtract each row's maximum logit before exp; the result does "
                      "not change, the overflow goes away"),
    (_log_softmax, "these are log-probabilities: the gate mixes with probabilities, "
                   "exp(logit - max) / sum, not their logarithm"),
    (_softmax_over_batch, "the softmax ran over the batch (dim 0): each example's row "
                          "of E gates must sum to 1, so normalise over dim 1"),
    (_softmax_mask_ignored, "the mask was ignored: set the masked experts' logits to "
                            "-inf before the softmax, so they get exactly 0"),
    (_softmax_mask_after, "the masked experts were zeroed after the softmax, so the "
                          "row no longer sums to 1: mask the logits (-inf) first, or "
                          "renormalise"),
]


def check_softmax_gate(answer: Callable, seed: int = 0) -> Report:
    """Grade a softmax gate ``answer(gate_logits, mask=None) -> gate_probs``.

    The reference is :func:`dmoe_edu.ops.softmax_gate`: rows sum to 1, masked
    experts (``mask`` False) get exactly 0, and logits of ``+-1e4`` do not overflow.

    Args:
        answer: the student's function; ``gate_logits`` is ``(B, E)`` float64,
            ``mask`` ``None`` or ``(B, E)`` bool.
        seed: seed of the random cases. Default: 0.

    Returns:
        Report: score, failed cases (expected against got) and hints.
    """
    gen = torch.Generator().manual_seed(seed)

    def cases(report: Report) -> None:
        fixed = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
        random = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 3
        huge = torch.tensor([[1e4, 0.0, -1e4], [5e3, 5e3, 0.0]], dtype=torch.float64)
        mask = torch.rand(7, 5, generator=gen) > 0.4
        mask[torch.arange(7), torch.randint(0, 5, (7,), generator=gen)] = True
        one_left = torch.zeros(3, 4, dtype=torch.bool)
        one_left[:, 2] = True
        leader = torch.tensor([[1e4, 0.0, 1.0], [0.0, 2e4, 1.0]], dtype=torch.float64)
        leader_masked = torch.tensor([[False, True, True], [True, False, True]])
        for name, logits, m in [
            ("a huge logit on a masked expert (the margin rule masks leaders)",
             leader, leader_masked),
            ("a hand-worked case: [0, 0] and [log 3, 0]", fixed, None),
            ("random logits, 7 examples x 5 experts", random, None),
            ("huge logits (+-1e4)", huge, None),
            ("a random mask", random, mask),
            ("a mask that leaves one expert", torch.randn(3, 4, dtype=torch.float64,
                                                          generator=gen), one_left),
        ]:
            args = (logits.clone(), m) if m is not None else (logits.clone(),)
            expected = ops.softmax_gate(logits, m)
            wrapped = [(lambda *a, f=f: f(*a), words) for f, words in SOFTMAX_MISTAKES]
            _grade(report, name, answer, args, expected, wrapped)

    return _run("softmax gate", cases, answer)


# ----------------------------------------------------------------------- 2. combine


COMBINE_MISTAKES: list[Mistake] = [
    (lambda g, x: (g.t()[:, :, None] * x).sum(dim=1),
     "the gates are transposed: gate_probs is (B, E), one row per example, so "
     "example b's weight for expert e is gate_probs[b, e]"),
    (lambda g, x: x.mean(dim=1),
     "the gates were not used: the combine weights each expert's output by its "
     "gate, sum_e gate_probs[b, e] * expert_out[b, e, :]"),
    (lambda g, x: torch.logsumexp(torch.log(g)[:, :, None] + x, dim=1),
     "this mixes in log space (logsumexp of log gate + output): the combine is a "
     "plain weighted sum of the expert outputs"),
    (lambda g, x: (torch.log(g)[:, :, None] + x).sum(dim=1),
     "this adds log gates to the outputs: the combine multiplies each output by "
     "its gate probability and sums over the experts"),
]


def check_combine(answer: Callable, seed: int = 0) -> Report:
    """Grade a combine ``answer(gate_probs, expert_out) -> mixed``.

    The reference is :func:`dmoe_edu.ops.combine`:
    ``mixed[b] = sum_e gate_probs[b, e] * expert_out[b, e]``.

    Args:
        answer: the student's function; ``gate_probs`` is ``(B, E)`` float64,
            ``expert_out`` ``(B, E, H)``; it returns ``(B, H)``.
        seed: seed of the random cases. Default: 0.

    Returns:
        Report: score, failed cases (expected against got) and hints.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(B: int, E: int, H: int) -> tuple[Tensor, Tensor]:
        gates = torch.softmax(torch.randn(B, E, generator=gen, dtype=torch.float64),
                              dim=1)
        return gates, torch.randn(B, E, H, generator=gen, dtype=torch.float64)

    def cases(report: Report) -> None:
        hand = (torch.tensor([[0.25, 0.75]], dtype=torch.float64),
                torch.tensor([[[4.0, 0.0], [0.0, 4.0]]], dtype=torch.float64))
        for name, (gates, outs) in [
            ("a hand-worked case: gates [0.25, 0.75]", hand),
            ("as many examples as experts (B = E = 4)", draw(4, 4, 3)),
            ("random, B=9, E=3, H=5", draw(9, 3, 5)),
            ("one expert (E = 1)", draw(6, 1, 4)),
        ]:
            expected = ops.combine(gates, outs)
            _grade(report, name, answer, (gates.clone(), outs.clone()), expected,
                   COMBINE_MISTAKES,
                   generic="the result must be (B, H): sum over the experts (dim 1) "
                           "of gate_probs[:, :, None] * expert_out")

    return _run("combine", cases, answer)


# ----------------------------------------------------------------- 3. margin rule


def _reference_keep(totals: np.ndarray, margin: float) -> np.ndarray:
    # The library's rule, run by a fresh constraint whose totals are set to these.
    constraint = balance.MarginConstraint(len(totals), margin)
    constraint.enabled = True
    constraint.totals.copy_(torch.as_tensor(totals, dtype=torch.float64))
    return constraint.masks(torch.zeros(1, len(totals), dtype=torch.float64))[0].numpy()


def _keep_vs_min(totals: np.ndarray, margin: float) -> np.ndarray:
    return totals - totals.min() <= margin


def _keep_strict(totals: np.ndarray, margin: float) -> np.ndarray:
    keep = totals - totals.mean() < margin
    keep[totals.argmin()] = True
    return keep


def _keep_raw(totals: np.ndarray, margin: float) -> np.ndarray:
    keep = totals <= margin
    keep[totals.argmin()] = True
    return keep


def _keep_inverted(totals: np.ndarray, margin: float) -> np.ndarray:
    return ~_reference_keep(totals, margin)


MARGIN_MISTAKES: list[Mistake] = [
    (_keep_vs_min, "the rule compares each expert with the mean of the totals, not "
                   "with the minimum: mask e when totals[e] - totals.mean() > margin"),
    (_keep_strict, "an expert exactly `margin` ahead of the mean may still be used: "
                   "the rule masks only when the excess is strictly greater"),
    (_keep_raw, "compare the excess over the mean (totals[e] - totals.mean()), not "
                "the raw total, with the margin"),
    (_keep_inverted, "the mask is inverted: True must mean the expert MAY be used"),
]


def check_margin_keep(answer: Callable) -> Report:
    """Grade the paper's margin rule ``answer(totals, margin) -> keep``.

    The rule (:class:`dmoe_edu.balance.MarginConstraint`): expert ``e`` may be
    used unless its running total is more than ``margin`` above the mean of
    the totals; the expert with the smallest total is never masked.

    Args:
        answer: the student's function; ``totals`` is an ``(E,)`` float64
            array, ``margin`` a float; it returns an ``(E,)`` bool array.

    Returns:
        Report: score, failed cases (expected against got) and hints.
    """
    def cases(report: Report) -> None:
        for name, totals, margin in [
            ("balanced totals: nothing masked", [5.0, 5.0, 5.0, 5.0], 1.0),
            ("one leader far ahead", [9.0, 1.0, 1.0, 1.0], 2.0),
            ("exactly `margin` above the mean", [5.0, 4.0, 0.0, 3.0], 2.0),
            ("above the minimum by more than the margin, not above the mean",
             [4.0, 4.0, 4.0, 1.0], 1.0),
            ("two leaders", [10.0, 9.5, 0.5, 0.0], 2.0),
            ("within the margin of the mean, not of the median",
             [4.0, 3.0, 0.0, 0.0], 2.4),
            ("margin 0", [2.0, 1.0, 1.0, 0.0], 0.0),
        ]:
            totals = np.array(totals)
            expected = _reference_keep(totals, margin)

            def wrapped(t, m, answer=answer):
                keep = _call(answer, t.copy(), m)
                return None if keep is None else np.asarray(keep, dtype=bool)

            _grade(report, f"{name}: totals {totals.tolist()}, margin {margin}",
                   wrapped, (totals, margin), expected, MARGIN_MISTAKES)

    return _run("margin rule", cases, answer)


def _stream_raw_totals(logits: Tensor, margin: float) -> np.ndarray:
    # Mistake: the totals grow by the unmasked gate instead of the one used.
    probs = torch.softmax(logits, dim=1).numpy()
    totals = np.zeros(logits.shape[1])
    out = np.zeros_like(probs)
    for t in range(len(probs)):
        keep = _reference_keep(totals, margin)
        out[t] = probs[t] * keep / (probs[t] * keep).sum()
        totals += probs[t]
    return out


def _stream_batched(logits: Tensor, margin: float) -> np.ndarray:
    # Mistake: every example tested against the totals before the whole stream.
    probs = torch.softmax(logits, dim=1).numpy()
    keep = _reference_keep(np.zeros(logits.shape[1]), margin)
    return probs * keep / (probs * keep).sum(axis=1, keepdims=True)


def _stream_add_first(logits: Tensor, margin: float) -> np.ndarray:
    # Mistake: an example's own gate is added to the totals before its test.
    probs = torch.softmax(logits, dim=1).numpy()
    totals = np.zeros(logits.shape[1])
    out = np.zeros_like(probs)
    for t in range(len(probs)):
        totals = totals + probs[t]
        keep = _reference_keep(totals, margin)
        out[t] = probs[t] * keep / (probs[t] * keep).sum()
    return out


STREAM_MISTAKES: list[Mistake] = [
    (_stream_raw_totals, "the totals must grow by the gate each example actually "
                         "got (masked and renormalised), not by its unmasked softmax"),
    (_stream_batched, "update the totals after every example, in order: each "
                      "example is tested against the totals of the examples before "
                      "it"),
    (_stream_add_first, "test an example against the totals *before* adding its "
                        "own gate"),
]


def check_balance_stream(answer: Callable, seed: int = 0) -> Report:
    """Grade the margin rule run over a stream, ``answer(gate_logits, margin)``.

    The reference is :func:`dmoe_edu.balance.trace_margin`: the examples are
    taken in order; each is tested against the running totals of the ones
    before it, gets its softmax gate with the masked experts removed and the
    rest renormalised, and that gate is added to the totals.

    Args:
        answer: the student's function; ``gate_logits`` is a ``(T, E)`` float64
            tensor, ``margin`` a float; it returns the ``(T, E)`` gates used.
        seed: seed of the random stream. Default: 0.

    Returns:
        Report: score, failed cases (expected against got) and hints.
    """
    gen = torch.Generator().manual_seed(seed)

    def cases(report: Report) -> None:
        favourite = torch.tensor([[3.0, 0.0, 0.0]] * 6, dtype=torch.float64)
        random = torch.randn(40, 4, generator=gen, dtype=torch.float64) * 2
        random[:, 1] += 2.0  # a favourite expert, so the rule has work to do
        for name, logits, margin in [
            ("six examples that all prefer expert 0, margin 1", favourite, 1.0),
            ("a random stream of 40 examples, margin 2", random, 2.0),
            ("the same stream, margin inf: plain softmax", random, math.inf),
        ]:
            expected = balance.trace_margin(logits, margin).gate_probs
            _grade(report, name, answer, (logits.clone(), margin), expected,
                   STREAM_MISTAKES)

    return _run("margin rule over a stream", cases, answer)


# ---------------------------------------------------------------------- 4. analysis


GATE_MAP_MISTAKES: list[Mistake] = [
    (lambda g, s: analysis.gate_by_translation(g, s).transpose(0, 2, 1),
     "the maps are transposed: rows are dy (shifts[:, 1]) and columns dx "
     "(shifts[:, 0]), each shifted by +4 to index 0..8"),
    (lambda g, s: _gate_map_sum(g, s),
     "these are sums: average the gate over the examples of each translation"),
]


def _gate_map_sum(gate_probs: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    maps = np.zeros((gate_probs.shape[1], 9, 9))
    for probs, (dx, dy) in zip(gate_probs, shifts):
        maps[:, dy + 4, dx + 4] += probs
    return maps


def check_gate_map(answer: Callable, seed: int = 0) -> Report:
    """Grade the mean gate by translation, ``answer(gate_probs, shifts) -> maps``.

    The reference is :func:`dmoe_edu.analysis.gate_by_translation` (Fig. 2 of the
    paper): ``maps[e, dy + 4, dx + 4]`` is the mean of ``gate_probs[:, e]`` over
    the examples shifted by ``(dx, dy)``.

    Args:
        answer: the student's function; ``gate_probs`` is an ``(N, E)`` array,
            ``shifts`` an ``(N, 2)`` int array of ``(dx, dy)`` in ``-4..4``.
        seed: seed of the random cases. Default: 0.

    Returns:
        Report: score, failed cases (expected against got) and hints.
    """
    rng = np.random.default_rng(seed)

    def draw(N: int, E: int) -> tuple[np.ndarray, np.ndarray]:
        shifts = np.array([(dx, dy) for dx in range(-4, 5) for dy in range(-4, 5)])
        shifts = np.concatenate([shifts, rng.integers(-4, 5, size=(N - 81, 2))])
        logits = rng.normal(size=(N, E)) + 0.5 * shifts[:, :1]  # depends on dx
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return probs, shifts

    def cases(report: Report) -> None:
        for name, (probs, shifts) in [("every translation once or more, E = 2",
                                       draw(200, 2)),
                                      ("E = 4, gates that follow dx", draw(500, 4))]:
            expected = analysis.gate_by_translation(probs, shifts)
            _grade(report, name, answer, (probs.copy(), shifts.copy()), expected,
                   GATE_MAP_MISTAKES)

    return _run("gate map by translation", cases, answer)


def _score_over_factor_entropy(gate_probs: np.ndarray, factor: np.ndarray) -> float:
    experts = np.asarray(gate_probs).argmax(axis=1)
    joint = np.zeros((int(factor.max()) + 1, gate_probs.shape[1]))
    np.add.at(joint, (factor, experts), 1.0)
    joint /= joint.sum()
    pf, pz = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pf, pz)[nz])).sum())
    hf = float(-(pf[pf > 0] * np.log(pf[pf > 0])).sum())
    return mi / hf


def check_factorisation(answer: Callable, seed: int = 0) -> Report:
    """Grade the where/what score, ``answer(gate_probs, factor) -> score``.

    The reference is :func:`dmoe_edu.analysis.factorisation_score` in its
    ``"argmax"`` mode: each example goes to its top expert ``Z``; the score is the
    mutual information ``I(F; Z)`` divided by the entropy ``H(Z)``.

    Args:
        answer: the student's function; ``gate_probs`` is ``(N, E)``, ``factor``
            an ``(N,)`` int array (class or translation index).
        seed: seed of the random cases. Default: 0.

    Returns:
        Report: score, failed cases (expected against got) and hints.
    """
    rng = np.random.default_rng(seed)
    mistakes = [(_score_over_factor_entropy,
                 "divide by the entropy of the experts, H(Z), not of the factor: the "
                 "score asks how much of the expert choice the factor explains")]

    def cases(report: Report) -> None:
        factor = rng.integers(0, 10, size=600)
        follows = np.eye(4)[factor % 4] + 0.1 * rng.random((600, 4))
        independent = rng.random((600, 4))
        partly = np.where(rng.random((600, 1)) < 0.6, follows, independent)
        for name, probs in [("experts that follow the factor", follows),
                            ("experts independent of the factor", independent),
                            ("experts that follow it 60% of the time", partly)]:
            expected = analysis.factorisation_score(probs, factor, mode="argmax")
            _grade(report, name, answer, (probs.copy(), factor.copy()), expected,
                   mistakes, atol=1e-6)

    return _run("factorisation score", cases, answer)


def check_interpretation(text: Any, min_words: int = 40) -> Report:
    """Check that a written answer is there; a person grades what it says.

    Args:
        text: the student's answer.
        min_words: the fewest words that count as an answer. Default: 40.

    Returns:
        Report: "not implemented yet" for an empty or placeholder answer, else one
        case on its length.
    """
    words = str(text or "").split()
    if not words or "TODO" in words or "Your answer here" in str(text):
        return Report("written interpretation", [], NOT_IMPLEMENTED)
    report = Report("written interpretation")
    long_enough = len(words) >= min_words
    report.cases.append(Case(
        f"at least {min_words} words (a person reads and grades the content)",
        long_enough, f">= {min_words} words", f"{len(words)} words",
        None if long_enough else "say what the maps and scores show for each "
                                 "layer, with the numbers, and what that means"))
    report.status = "passed" if long_enough else "failed"
    return report


# ------------------------------------------------------------- 5. a CUDA kernel


KERNEL_NAME = "combine_backward_experts"
"""The kernel :func:`check_combine_backward` grades."""

GUARD = 64
"""Elements of padding after every buffer the kernel gets, beyond one per thread of
the launch, so that writes and reads past the end land in memory the grader owns."""


LAUNCH_TIMEOUT_S = 120
"""Seconds the graded launches may take together before the grader stops them."""


def _launch(module_type, code: str, grid: int, block: int, gates: np.ndarray,
            grad_out: np.ndarray, E: int, H: int, device: str
            ) -> tuple[np.ndarray, np.ndarray]:
    # Every buffer is followed by a guard region, so a missing bounds check shows as
    # writes past the end instead of corrupting memory.
    B = gates.shape[0]
    pad = grid * block + GUARD  # a thread's own index, unchecked, stays inside
    padded_gates = torch.cat([torch.from_numpy(gates).reshape(-1),
                              torch.zeros(pad)]).to(device)
    padded_grad = torch.cat([torch.from_numpy(grad_out).reshape(-1),
                             torch.zeros(pad)]).to(device)
    out = torch.full((B * E * H + pad,), math.nan, device=device)
    kernel = module_type(code, "assignment.cu").get_function(KERNEL_NAME)
    kernel((grid,), (block,), (padded_gates[: B * E], padded_grad[: B * H],
                               out[: B * E * H], np.int64(B), np.int64(E),
                               np.int64(H)))
    out = out.cpu().numpy()
    return out[: B * E * H].reshape(B, E, H), out[B * E * H:]


def _launch_in_child(connection, backend: str, code: str, launches: list) -> None:
    """Run every launch of a grading (in a child process); send the results back."""
    if backend == "cupy":
        from .ops.cupy_backend import RawModule
        device = "cuda"
    else:
        from .ops.emulate import RawModule
        device = "cpu"
    results = []
    for grid, block, gates, grad_out, E, H in launches:
        try:
            results.append(_launch(RawModule, code, grid, block, gates, grad_out, E,
                                   H, device))
        except Exception as exc:
            results.append(f"{type(exc).__name__}: {exc}")
    connection.send(results)
    connection.close()


def _launch_isolated(backend: str, code: str, launches: list,
                     timeout: float) -> list | str:
    """The launches' results, run in a fresh process; or why there are none.

    A student's kernel runs in its own process, so an endless loop is stopped
    after ``timeout`` seconds and a stray memory access kills that process only.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_launch_in_child,
                            args=(sender, backend, code, launches), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            return (f"the launches did not finish within {timeout:.0f} s: a thread "
                    f"never ends (check the loop's condition and its increment, "
                    f"i += gridDim.x * blockDim.x)")
        return receiver.recv()
    except EOFError:
        child.join(10)
        return (f"the kernel crashed the process running it (exit code "
                f"{child.exitcode}): a read or write far outside the buffers? Check "
                f"every index against B * E * H, B * E and B * H")
    finally:
        if child.is_alive():
            child.kill()
        child.join(10)
        receiver.close()


_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def _kernel_body_is_empty(code: str) -> bool:
    # The exercise's placeholder: the kernel's braces hold nothing but comments.
    text = _COMMENTS.sub("", code)
    at = text.find(KERNEL_NAME)
    if at < 0:
        return False
    start = text.find("{", at)
    end = text.rfind("}")
    return start >= 0 and end > start and not text[start + 1:end].strip()


def check_combine_backward(code: str, seed: int = 0,
                           backend: str = "emulate") -> Report:
    """Grade a CUDA kernel for the combine's backward to the expert outputs.

    The kernel must be declared as::

        extern "C" __global__ void combine_backward_experts(
            const float* gate_probs,      // (B, E)
            const float* grad_out,        // (B, H)
            float* grad_expert_out,       // (B, E, H), written in full
            long long B, long long E, long long H)

    and compute ``grad_expert_out[b, e, h] = gate_probs[b, e] * grad_out[b, h]``
    for every element, whatever the launch's grid: with a grid smaller than the
    work, a grid-stride loop must cover the rest, and no thread may write past
    the end. It runs through :mod:`dmoe_edu.ops.emulate` on the CPU, or through
    CuPy with ``backend="cupy"``, in a child process: a kernel that never ends
    is stopped after :data:`LAUNCH_TIMEOUT_S` seconds, and one that crashes
    takes only that process down; both are reported. Every buffer is padded by
    one element per launched thread, so a missing bounds check shows as writes
    past the end.

    Args:
        code: the kernel's CUDA C source.
        seed: seed of the random cases. Default: 0.
        backend: ``"emulate"`` or ``"cupy"``. Default: ``"emulate"``.

    Returns:
        Report: compile errors, each launch's result against the reference, and
        hints (a missing grid-stride loop, a missing bounds check, gates read
        transposed).
    """
    if backend not in ("emulate", "cupy"):
        raise ValueError(f"backend must be 'emulate' or 'cupy', got {backend!r}")
    if not isinstance(code, str):
        raise TypeError(f"code must be the kernel's CUDA source as a str, got "
                        f"{type(code).__name__}")
    if backend == "cupy":
        from .ops.cupy_backend import RawModule
    else:
        from .ops.emulate import RawModule
    gen = torch.Generator().manual_seed(seed)
    report = Report("combine backward kernel")
    if not code.strip() or _kernel_body_is_empty(code):
        return Report(report.exercise, [], NOT_IMPLEMENTED)

    # It must compile and declare the kernel.
    compiles = "the source compiles and declares the kernel"
    try:
        module = RawModule(code, "assignment.cu")
    except Exception as exc:
        hint = ("read the compiler's first error" + (
            "; kernels need no #include here (as with NVRTC): remove it"
            if "#include" in code else ""))
        report.cases.append(Case(compiles, False, "a source that compiles",
                                 f"{type(exc).__name__}: {str(exc)[:1500]}", hint))
        report.status = "failed"
        return report
    if KERNEL_NAME not in module.signatures:
        report.cases.append(Case(
            compiles, False, f'extern "C" __global__ void {KERNEL_NAME}(...)',
            f"kernels {sorted(module.signatures)}",
            f"it compiles, but the kernel must be called {KERNEL_NAME} and declared "
            f'extern "C" __global__, exactly as the exercise shows'))
        report.status = "failed"
        return report
    report.cases.append(Case(compiles, True))

    # The launches run in a child process: an endless loop or a crash stays there.
    cases = []
    for name, (B, E, H), (grid, block) in [
        ("a hand-sized case, one thread per element", (2, 3, 4), (1, 32)),
        ("B=37, E=4, H=50, enough threads", (37, 4, 50), (64, 128)),
        ("the same work with a grid smaller than the work (2 x 32 threads)",
         (37, 4, 50), (2, 32)),
        ("more threads than elements", (3, 2, 5), (4, 64)),
    ]:
        gates = torch.softmax(torch.randn(B, E, generator=gen), dim=1)
        grad_out = torch.randn(B, H, generator=gen)
        cases.append((name, B, E, H, grid, block, gates, grad_out))
    results = _launch_isolated(backend, code, [
        (grid, block, gates.numpy(), grad_out.numpy(), E, H)
        for _, _, E, H, grid, block, gates, grad_out in cases], LAUNCH_TIMEOUT_S)
    if isinstance(results, str):
        report.cases.append(Case("the launches finish", False, "they finish",
                                 results.split(":")[0], results))
        report.status = "failed"
        return report

    for (name, B, E, _, _, _, gates, grad_out), result in zip(cases, results):
        expected = gates[:, :, None] * grad_out[:, None, :]  # (B, E, H)
        if isinstance(result, str):
            report.cases.append(Case(name, False, _show(expected), result))
            continue
        got, guard = (torch.from_numpy(a) for a in result)
        hint = None
        if not torch.isnan(guard).all():
            hint = ("a thread wrote past the end of grad_expert_out: check "
                    "`i < B * E * H` before every write")
        elif torch.isnan(got).any():
            missing = int(torch.isnan(got).sum())
            hint = (f"{missing} of {got.numel()} elements were never written: with "
                    f"fewer threads than elements, each thread must loop, i += "
                    f"gridDim.x * blockDim.x (a grid-stride loop)")
        elif torch.allclose(got, gates.reshape(E, B).t()[:, :, None]
                            * grad_out[:, None, :], atol=1e-6):
            hint = ("the gates are read transposed: gate_probs is (B, E), so "
                    "example b's gate for expert e is gate_probs[b * E + e]")
        passed = hint is None and torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
        if not passed and hint is None:
            hint = ("grad_expert_out[b, e, h] is at b * E * H + e * H + h; "
                    "it equals gate_probs[b * E + e] * grad_out[b * H + h]")
        shown = ("", "") if passed else _compare(expected, got)
        report.cases.append(Case(name, passed, *shown, hint))

    report.status = "passed" if all(c.passed for c in report.cases) else "failed"
    return report
