"""The paper's margin constraint on hand-computed streams of gate logits."""

import math

import pytest
import torch

from dmoe_edu import ops
from dmoe_edu.balance import MarginConstraint
from dmoe_edu.moe import MixtureLayer


def constraint(num_experts, margin):
    c = MarginConstraint(num_experts, margin)
    c.enabled = True
    return c


def test_two_experts_hand_computed():
    # p = e^5 / (e^5 + 1) for expert 0 on each of three examples.
    p = math.exp(5) / (math.exp(5) + 1)
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0]])
    c = constraint(2, margin=0.25)

    masks = c.masks(logits)

    # Example 0: totals (0, 0), nobody ahead.  Totals become (p, 1 - p).
    # Example 1: mean 1/2, expert 0 is p - 1/2 = 0.493 > 0.25 ahead: masked,
    #            so its gate is (0, 1) and totals become (p, 2 - p).
    # Example 2: mean 1, expert 0 is p - 1 < 0: free again.
    assert masks.tolist() == [[True, True], [False, True], [True, True]]
    gate_probs = ops.softmax_gate(logits, masks)
    assert gate_probs[1].tolist() == [0.0, 1.0]
    torch.testing.assert_close(
        c.totals, torch.tensor([2 * p, 3 - 2 * p], dtype=torch.float64)
    )
    assert float(c.seen) == 3 and c.masked_examples == 1


def test_margin_counts_examples_ahead_of_the_mean():
    # Expert 0 takes (almost) everything; with E = 3 and m = 2 it is t - t/3 = 2t/3
    # examples ahead after t examples: allowed while 2t/3 <= 2, i.e. t <= 3.
    logits = torch.tensor([[100.0, 0.0, 0.0]]).repeat(7, 1)
    c = constraint(3, margin=2.0)

    masks = c.masks(logits)

    # Examples 0-3 pass (example 3 sits exactly at the margin: not strictly
    # above). Examples 4 and 5 are masked and split 1/2 - 1/2 between experts
    # 1 and 2, which brings the mean up to 2 = 5 - 3: example 6 passes again.
    assert masks[:, 0].tolist() == [True, True, True, True, False, False, True]
    assert masks[:, 1:].all()
    torch.testing.assert_close(
        c.totals, torch.tensor([5.0, 1.0, 1.0], dtype=torch.float64)
    )


def test_totals_persist_across_batches_and_reset():
    c = constraint(3, margin=2.0)
    logits = torch.tensor([[100.0, 0.0, 0.0]])
    per_example = torch.cat([c.masks(logits) for _ in range(7)])
    whole = constraint(3, margin=2.0).masks(logits.repeat(7, 1))
    assert torch.equal(per_example, whole)

    c.reset()
    assert c.totals.tolist() == [0.0, 0.0, 0.0] and float(c.seen) == 0


def test_never_every_expert_masked_even_with_rounding():
    # Three totals of 0.7 have a float64 mean of 0.6999999999999998, below every
    # total, so with m = 0 every expert looks "ahead" of the mean.
    c = constraint(3, margin=0.0)
    c.totals.fill_(0.7)
    totals = c.totals.numpy()
    assert (totals - totals.mean() > 0).all()

    masks = c.masks(torch.zeros(5, 3))

    assert masks.any(dim=1).all()


@pytest.mark.parametrize("margin", [0.0, 0.5, 3.0, 25.0])
def test_leader_never_runs_more_than_margin_plus_one_ahead(margin):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 4, generator=gen) * 3 + torch.tensor([4.0, 0, 0, -2])
    c = constraint(4, margin)
    for batch in logits.split(50):
        c.masks(batch)
        # Tested before adding a gate of at most 1: excess <= m + 1.
        assert float((c.totals - c.totals.mean()).max()) <= margin + 1 + 1e-9


def test_uniform_gates_are_never_masked():
    c = constraint(4, margin=0.0)
    assert c.masks(torch.zeros(20, 4)).all()


def test_mixture_layer_masks_only_in_training_while_enabled():
    torch.manual_seed(0)
    layer = MixtureLayer(in_dim=6, width=3, num_experts=2, margin=0.0)
    x = torch.randn(64, 6)

    # Off by default, and never in eval mode.
    assert layer.balance.enabled is False
    layer.train()
    layer(x)
    assert float(layer.balance.seen) == 0

    layer.balance.enabled = True
    layer.eval()
    layer(x)
    assert float(layer.balance.seen) == 0

    # In training with the constraint on, the layer's gates are the masked ones.
    layer.train()
    _, gate_probs = layer(x)
    assert float(layer.balance.seen) == 64
    loads = gate_probs.detach().double().sum(0)
    assert float((loads - loads.mean()).abs().max()) <= 0.0 + 1 + 1e-6


@pytest.mark.parametrize("margin", [-1, -0.5, float("nan"), "many"])
def test_bad_margin_is_rejected(margin):
    with pytest.raises(ValueError, match="margin"):
        MarginConstraint(4, margin)


def test_wrong_width_is_rejected():
    with pytest.raises(ValueError, match="E = 4 columns, got 3"):
        constraint(4, 1.0).masks(torch.zeros(2, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_are_refused_and_totals_kept(bad):
    c, twin = constraint(3, margin=2.0), constraint(3, margin=2.0)
    first = torch.tensor([[100.0, 0.0, 0.0]]).repeat(5, 1)
    c.masks(first)
    twin.masks(first)
    totals, seen, masked = c.totals.clone(), float(c.seen), c.masked_examples

    # Two of four rows hold a bad value: the batch is refused as a whole.
    logits = torch.zeros(4, 3)
    logits[1, 0] = bad
    logits[3, 2] = bad
    with pytest.raises(ValueError, match=r"2 of 4 rows.*inputs.*learning rate"):
        c.masks(logits)

    assert torch.equal(c.totals, totals) and torch.isfinite(c.totals).all()
    assert float(c.seen) == seen and c.masked_examples == masked
    # The next good batch is balanced as if the bad one never came.
    after = torch.tensor([[100.0, 0.0, 0.0]]).repeat(3, 1)
    assert torch.equal(c.masks(after), twin.masks(after))
    assert torch.equal(c.totals, twin.totals)


def test_num_experts_accepts_numpy_integers_only():
    import numpy as np

    c = MarginConstraint(np.int64(3))
    assert type(c.num_experts) is int and c.totals.shape == (3,)
    for bad in (True, 3.0, "3", 0):
        with pytest.raises(ValueError, match="num_experts must be an integer >= 1"):
            MarginConstraint(bad)
