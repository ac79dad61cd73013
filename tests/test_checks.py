"""The assignment graders: right answers score 1, each listed mistake gets its hint.

Every wrong implementation here is written the way a student would get it wrong,
independently of the mistakes the graders simulate, so a grader that only
recognised its own code would fail these tests.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmoe_edu import checks

# ------------------------------------------------------------------- right answers


def softmax_right(gate_logits, mask=None):
    if mask is not None:
        gate_logits = gate_logits.masked_fill(~mask, -math.inf)
    shifted = gate_logits - gate_logits.max(dim=1, keepdim=True).values
    e = torch.exp(shifted)
    return e / e.sum(dim=1, keepdim=True)


def combine_right(gate_probs, expert_out):
    return (gate_probs[:, :, None] * expert_out).sum(dim=1)


def keep_right(totals, margin):
    keep = totals - totals.mean() <= margin
    keep[np.argmin(totals)] = True
    return keep


def stream_right(gate_logits, margin):
    T, E = gate_logits.shape
    totals = np.zeros(E)
    out = np.zeros((T, E))
    for t in range(T):
        keep = keep_right(totals, margin)
        p = np.exp(gate_logits[t].numpy() - gate_logits[t].max().item()) * keep
        out[t] = p / p.sum()
        totals += out[t]
    return out


def gate_map_right(gate_probs, shifts):
    E = gate_probs.shape[1]
    sums, counts = np.zeros((E, 9, 9)), np.zeros((9, 9))
    for p, (dx, dy) in zip(gate_probs, shifts):
        sums[:, dy + 4, dx + 4] += p
        counts[dy + 4, dx + 4] += 1
    return sums / np.maximum(counts, 1)


def score_right(gate_probs, factor):
    z = gate_probs.argmax(axis=1)
    joint = np.zeros((factor.max() + 1, gate_probs.shape[1]))
    for f, e in zip(factor, z):
        joint[f, e] += 1
    joint /= joint.sum()
    pf, pz = joint.sum(1), joint.sum(0)
    mi = sum(joint[i, j] * math.log(joint[i, j] / (pf[i] * pz[j]))
             for i in range(joint.shape[0]) for j in range(joint.shape[1])
             if joint[i, j] > 0)
    hz = -sum(p * math.log(p) for p in pz if p > 0)
    return mi / hz


KERNEL_RIGHT = """
extern "C" __global__ void combine_backward_experts(
    const float* gate_probs, const float* grad_out, float* grad_expert_out,
    long long B, long long E, long long H) {
    long long n = B * E * H;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += step) {
        long long h = i % H, e = (i / H) % E, b = i / (E * H);
        grad_expert_out[i] = gate_probs[b * E + e] * grad_out[b * H + h];
    }
}
"""


@pytest.mark.parametrize("grader, answer", [
    (checks.check_softmax_gate, softmax_right),
    (checks.check_combine, combine_right),
    (checks.check_margin_keep, keep_right),
    (checks.check_balance_stream, stream_right),
    (checks.check_gate_map, gate_map_right),
    (checks.check_factorisation, score_right),
])
def test_right_answers_score_one(grader, answer):
    report = grader(answer)
    assert report.passed and report.score == 1.0, str(report)
    assert "All cases pass." in str(report)
    assert report.as_dict()["score"] == 1.0


def test_right_kernel_scores_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    report = checks.check_combine_backward(KERNEL_RIGHT)
    assert report.passed and report.score == 1.0, str(report)


# ------------------------------------------------------------------ wrong answers


def softmax_no_max(gate_logits, mask=None):
    if mask is not None:
        gate_logits = gate_logits.masked_fill(~mask, -math.inf)
    e = gate_logits.exp()
    return e / e.sum(1, keepdim=True)


def softmax_log_space(gate_logits, mask=None):
    if mask is not None:
        gate_logits = gate_logits.masked_fill(~mask, -math.inf)
    m = gate_logits.max(1, keepdim=True).values
    return gate_logits - m - (gate_logits - m).exp().sum(1, keepdim=True).log()


def softmax_dim0(gate_logits, mask=None):
    if mask is not None:
        gate_logits = gate_logits.masked_fill(~mask, -math.inf)
    e = (gate_logits - gate_logits.max()).exp()
    return e / e.sum(0, keepdim=True)


def softmax_zero_after(gate_logits, mask=None):
    p = torch.softmax(gate_logits, 1)
    return p if mask is None else torch.where(mask, p, torch.zeros_like(p))


def combine_transposed(gate_probs, expert_out):
    # gate_probs read as (E, B): only runs when B == E, and is wrong there.
    return (gate_probs.T[:, :, None] * expert_out).sum(dim=1)


def combine_unweighted(gate_probs, expert_out):
    return expert_out.sum(1) / expert_out.shape[1]


def combine_log_space(gate_probs, expert_out):
    return torch.log((gate_probs[:, :, None] * expert_out.exp()).sum(1))


def keep_vs_min(totals, margin):
    return totals - totals.min() <= margin


def keep_strict(totals, margin):
    keep = (totals - totals.mean()) < margin
    keep[totals.argmin()] = True
    return keep


def keep_inverted(totals, margin):
    return totals - totals.mean() > margin


def stream_unmasked_totals(gate_logits, margin):
    T, E = gate_logits.shape
    totals, out = np.zeros(E), np.zeros((T, E))
    for t in range(T):
        p = torch.softmax(gate_logits[t], 0).numpy()
        keep = keep_right(totals, margin)
        out[t] = p * keep / (p * keep).sum()
        totals += p
    return out


def stream_one_test(gate_logits, margin):
    p = torch.softmax(gate_logits, 1).numpy()
    keep = keep_right(np.zeros(p.shape[1]), margin)
    return p * keep / (p * keep).sum(1, keepdims=True)


def gate_map_transposed(gate_probs, shifts):
    return gate_map_right(gate_probs, shifts[:, ::-1])


def gate_map_sum(gate_probs, shifts):
    maps = np.zeros((gate_probs.shape[1], 9, 9))
    for p, (dx, dy) in zip(gate_probs, shifts):
        maps[:, dy + 4, dx + 4] += p
    return maps


def score_over_factor(gate_probs, factor):
    z = gate_probs.argmax(axis=1)
    joint = np.zeros((factor.max() + 1, gate_probs.shape[1]))
    np.add.at(joint, (factor, z), 1)
    joint /= joint.sum()
    pf, pz = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * np.log(joint[nz] / np.outer(pf, pz)[nz])).sum()
    return mi / -(pf[pf > 0] * np.log(pf[pf > 0])).sum()


WRONG = [
    (checks.check_softmax_gate, softmax_no_max, "subtract each row's maximum"),
    (checks.check_softmax_gate, softmax_log_space, "log-probabilities"),
    (checks.check_softmax_gate, softmax_dim0, "over the batch (dim 0)"),
    (checks.check_softmax_gate, softmax_zero_after, "zeroed after the softmax"),
    (checks.check_combine, combine_transposed, "gates are transposed"),
    (checks.check_combine, combine_unweighted, "gates were not used"),
    (checks.check_combine, combine_log_space, "log space"),
    (checks.check_margin_keep, keep_vs_min, "not with the minimum"),
    (checks.check_margin_keep, keep_strict, "strictly greater"),
    (checks.check_margin_keep, keep_inverted, "mask is inverted"),
    (checks.check_balance_stream, stream_unmasked_totals, "gate each example "
                                                          "actually got"),
    (checks.check_balance_stream, stream_one_test, "after every example"),
    (checks.check_gate_map, gate_map_transposed, "maps are transposed"),
    (checks.check_gate_map, gate_map_sum, "these are sums"),
    (checks.check_factorisation, score_over_factor, "not of the factor"),
]


@pytest.mark.parametrize("grader, answer, words", WRONG,
                         ids=[a.__name__ for _, a, _ in WRONG])
def test_each_listed_mistake_gets_its_hint(grader, answer, words):
    report = grader(answer)
    assert report.status == "failed" and report.score < 1.0
    assert any(words in hint for hint in report.hints), str(report)
    text = str(report)
    assert "FAILED" in text and "expected" in text and "got" in text
    assert "hint: " in text


def test_a_crashing_answer_is_a_failed_case_not_a_crash():
    def broken(gate_logits, mask=None):
        return gate_logits @ torch.ones(3)  # wrong shape for most cases

    report = checks.check_softmax_gate(broken)
    assert report.status == "failed"
    assert any("RuntimeError" in case.got for case in report.cases)


KERNEL_NO_STRIDE = KERNEL_RIGHT.replace("i += step", "i += n")
KERNEL_NO_BOUNDS = """
extern "C" __global__ void combine_backward_experts(
    const float* gate_probs, const float* grad_out, float* grad_expert_out,
    long long B, long long E, long long H) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long h = i % H, e = (i / H) % E, b = i / (E * H);
    grad_expert_out[i] = gate_probs[b * E + e] * grad_out[b * H + h];
}
"""
KERNEL_TRANSPOSED = KERNEL_RIGHT.replace("gate_probs[b * E + e]",
                                         "gate_probs[e * B + b]")
KERNEL_TYPO = KERNEL_RIGHT.replace("long long h = i % H", "long long h = i % H;;x")


@pytest.mark.parametrize("code, words", [
    (KERNEL_NO_STRIDE, "grid-stride loop"),
    (KERNEL_NO_BOUNDS, "wrote past the end"),
    (KERNEL_TRANSPOSED, "read transposed"),
    (KERNEL_TYPO, "compiler's first error"),
], ids=["no-grid-stride", "no-bounds-check", "transposed", "does-not-compile"])
def test_kernel_mistakes_get_their_hints(code, words, tmp_path, monkeypatch):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    report = checks.check_combine_backward(code)
    assert report.status == "failed", str(report)
    assert any(words in hint for hint in report.hints), str(report)


@pytest.mark.parametrize("grader", [
    checks.check_softmax_gate, checks.check_combine, checks.check_margin_keep,
    checks.check_balance_stream, checks.check_gate_map, checks.check_factorisation,
])
def test_placeholders_are_not_implemented_yet(grader):
    def placeholder(*args):
        raise NotImplementedError("your code here")

    report = grader(placeholder)
    assert report.status == "not implemented yet" and report.score == 0.0
    assert "not implemented yet" in str(report)


def test_kernel_and_interpretation_placeholders():
    placeholder = KERNEL_RIGHT[:KERNEL_RIGHT.index("long long n")] + (
        "    // TODO: your code here\n}\n")
    assert checks.check_combine_backward(placeholder).status == "not implemented yet"
    assert checks.check_interpretation("*Your answer here.*").score == 0.0
    short = checks.check_interpretation("Layer 1 is where.")
    assert short.status == "failed" and "words" in short.cases[0].got
    long = checks.check_interpretation(" ".join(["word"] * 40))
    assert long.passed


def test_bad_backend_is_named():
    with pytest.raises(ValueError, match="backend must be 'emulate' or 'cupy'"):
        checks.check_combine_backward(KERNEL_RIGHT, backend="gpu")


def test_a_todo_comment_left_above_working_code_does_not_hide_it(tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    code = KERNEL_RIGHT.replace("long long n =", "// TODO: your code here\n"
                                                 "    long long n =")
    assert checks.check_combine_backward(code).passed


@pytest.mark.slow
def test_an_endless_kernel_is_stopped(tmp_path, monkeypatch):
    # i + step instead of i += step: every thread loops forever.
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    monkeypatch.setattr(checks, "LAUNCH_TIMEOUT_S", 20)
    report = checks.check_combine_backward(KERNEL_RIGHT.replace("i += step",
                                                                "i + step"))
    assert report.status == "failed"
    assert any("did not finish within 20 s" in hint for hint in report.hints)


def test_kernel_grader_names_its_input_problems(tmp_path, monkeypatch):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    with pytest.raises(TypeError, match="code must be the kernel's CUDA source"):
        checks.check_combine_backward(None)
    renamed = checks.check_combine_backward(
        KERNEL_RIGHT.replace("combine_backward_experts", "my_kernel"))
    assert any("must be called combine_backward_experts" in h for h in renamed.hints)
    included = checks.check_combine_backward("#include <math.h>\n" + KERNEL_RIGHT)
    assert any("need no #include" in h for h in included.hints), str(included)


def test_answers_that_are_not_functions_or_return_nothing():
    with pytest.raises(TypeError, match="must be your function, got NoneType"):
        checks.check_softmax_gate(None)
    report = checks.check_margin_keep(lambda totals, margin: None)
    assert report.status == "failed"
    assert any("returned None" in hint for hint in report.hints)


def test_masking_after_a_global_max_is_caught():
    # Subtracting the max over all logits, masked ones included, underflows to 0/0
    # when the masked expert holds the huge logit.
    def global_max(gate_logits, mask=None):
        e = torch.exp(gate_logits - gate_logits.max(dim=1, keepdim=True).values)
        if mask is not None:
            e = e * mask
        return e / e.sum(dim=1, keepdim=True)

    report = checks.check_softmax_gate(global_max)
    assert report.status == "failed"
    assert not report.cases[0].passed and "masked expert" in report.cases[0].name


def test_median_instead_of_mean_is_caught():
    def median(totals, margin):
        keep = totals - np.median(totals) <= margin
        keep[totals.argmin()] = True
        return keep

    assert checks.check_margin_keep(median).status == "failed"
