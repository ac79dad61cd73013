"""The ops contract: softmax_gate and combine against naive references."""

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmoe_edu import ops


def naive_softmax_gate(logits, mask=None):
    """Row by row, in float64: exp over the kept experts, divided by their sum."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for b in range(logits.shape[0]):
        keep = [e for e in range(logits.shape[1]) if mask is None or mask[b, e]]
        top = max(float(logits[b, e]) for e in keep)
        weights = {e: torch.exp(torch.tensor(float(logits[b, e]) - top,
                                             dtype=torch.float64)) for e in keep}
        total = sum(weights.values())
        for e, w in weights.items():
            out[b, e] = w / total
    return out


def naive_combine(gates, expert_out):
    B, E, H = expert_out.shape
    out = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        for e in range(E):
            out[b] += float(gates[b, e]) * expert_out[b, e].double()
    return out


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 40),
    E=st.integers(1, 9),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_softmax_gate_matches_naive_loop(B, E, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, E, generator=gen, dtype=torch.float64) * scale
    mask = torch.rand(B, E, generator=gen) > 0.4
    mask[torch.arange(B), torch.randint(0, E, (B,), generator=gen)] = True

    probs = ops.softmax_gate(logits, mask)

    torch.testing.assert_close(probs, naive_softmax_gate(logits, mask))
    assert torch.all(probs[~mask] == 0)
    torch.testing.assert_close(probs.sum(1), torch.ones(B, dtype=torch.float64))


def test_softmax_gate_saturated_float32_rows_stay_finite():
    # Expert 0 holds all the mass in float32; masking it must not give 0/0.
    logits = torch.tensor([[200.0, 0.0, -5.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True], [True, True, True]])

    probs = ops.softmax_gate(logits, mask)

    assert torch.isfinite(probs).all()
    expected = torch.softmax(torch.tensor([0.0, -5.0]), 0)
    torch.testing.assert_close(probs[0, 1:], expected)
    torch.testing.assert_close(probs[1], torch.full((3,), 1 / 3))


def test_softmax_gate_broadcasts_an_expert_mask():
    probs = ops.softmax_gate(torch.zeros(3, 4), torch.tensor([True, False, True, True]))
    expected = torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]).expand(3, 4)
    torch.testing.assert_close(probs, expected)

    # A (1, E) mask broadcasts the same way.
    logits = torch.randn(5, 4, dtype=torch.float64)
    row = torch.tensor([[True, False, True, True]])
    probs = ops.softmax_gate(logits, row)
    torch.testing.assert_close(probs, naive_softmax_gate(logits, row.expand(5, 4)))


def test_a_mask_that_empties_rows_names_the_first():
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[2] = mask[4] = False
    with pytest.raises(ValueError, match=r"leaves row 2 with no expert \(2 of 6 rows"):
        ops.softmax_gate(torch.zeros(6, 3), mask)


def test_masked_experts_stay_zero_in_a_row_without_finite_logits():
    # Every allowed logit -inf: the allowed experts are NaN (0/0), the masked ones
    # still exactly 0, as the contract says.
    logits = torch.tensor([[float("-inf"), float("-inf"), 2.0, 0.0]])
    mask = torch.tensor([True, True, False, False])
    probs = ops.softmax_gate(logits, mask)
    assert probs[0, :2].isnan().all()
    assert probs[0, 2:].tolist() == [0.0, 0.0]


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 30), E=st.integers(1, 8), H=st.integers(1, 50),
       seed=st.integers(0, 2**16))
def test_combine_matches_naive_loop(B, E, H, seed):
    gen = torch.Generator().manual_seed(seed)
    gates = torch.softmax(torch.randn(B, E, generator=gen), 1)
    expert_out = torch.randn(B, E, H, generator=gen)

    mixed = ops.combine(gates, expert_out)

    torch.testing.assert_close(mixed.double(), naive_combine(gates, expert_out),
                               rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(7, 5) > 0.3
    mask[:, 2] = True
    assert torch.autograd.gradcheck(lambda z: ops.softmax_gate(z, mask), (logits,))

    gates = torch.rand(7, 5, dtype=torch.float64, requires_grad=True)
    expert_out = torch.randn(7, 5, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.combine, (gates, expert_out))


def test_masked_experts_get_no_gradient():
    logits = torch.randn(4, 3, requires_grad=True)
    mask = torch.tensor([True, False, True])
    (ops.softmax_gate(logits, mask) * torch.randn(4, 3)).sum().backward()
    assert torch.all(logits.grad[:, 1] == 0)
    assert torch.any(logits.grad[:, 0] != 0)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: ops.softmax_gate(torch.zeros(2, 3, 4)), ValueError, "2 dimensions"),
        (lambda: ops.softmax_gate(torch.zeros(2, 3, dtype=torch.int64)), TypeError,
         "float32 or float64"),
        (lambda: ops.softmax_gate(torch.zeros(2, 3), torch.ones(2, 3)), TypeError,
         "bool"),
        (lambda: ops.softmax_gate(torch.zeros(2, 3), torch.ones(2, 4, dtype=bool)),
         ValueError, "got (2, 4)"),
        (lambda: ops.softmax_gate(torch.zeros(2, 3), torch.zeros(3, dtype=bool)),
         ValueError, "no expert"),
        (lambda: ops.combine(torch.zeros(2, 3), torch.zeros(2, 4, 5)), ValueError,
         "got (2, 4, 5)"),
        (lambda: ops.combine(torch.zeros(2, 3), torch.zeros(2, 3, 5).double()),
         TypeError, "share a dtype"),
        (lambda: ops.set_backend("nope"), ValueError, "expected 'auto' or one of"),
    ],
)
def test_bad_input_names_the_problem(call, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_use_backend_restores_the_previous_backend():
    before = ops.get_backend()
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == before
    assert "reference" in ops.available_backends()


def test_use_backend_changes_nothing_in_other_threads():
    # Thread a holds a use_backend block open; thread b, outside any block, must
    # still see the process default, and blocks that overlap in time restore each
    # thread's own previous choice.
    entered, done_b, seen = threading.Event(), threading.Event(), {}

    def a():
        with ops.use_backend("reference"):
            entered.set()
            done_b.wait(10)
            seen["a inside"] = ops.get_backend()
        seen["a after"] = ops.get_backend()

    def b():
        entered.wait(10)
        seen["b"] = ops.get_backend()
        with ops.use_backend("auto"):
            seen["b inside"] = ops.get_backend()
        done_b.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen == {"a inside": "reference", "a after": "auto", "b": "auto",
                    "b inside": "auto"}
    assert ops.get_backend() == "auto"


def test_a_meta_mask_is_refused_by_name():
    mask = torch.ones(4, 3, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="meta tensor.*expected a mask on cpu"):
        ops.softmax_gate(torch.randn(4, 3), mask)
