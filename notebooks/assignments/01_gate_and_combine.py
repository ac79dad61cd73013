# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Assignment 1: the softmax gate and the combine, in PyTorch
#
# Every mixture layer does two things after its experts have run:
# the **gate** turns `E` scores per example into probabilities,
# and the **combine** mixes the experts' outputs with them.
# You will write both in plain PyTorch and check them against the
# library's versions, `dmoe_edu.ops.softmax_gate` and
# `dmoe_edu.ops.combine` (notebook 1 of the course explains them).
#
# **What you hand in:** this notebook with the two functions written.
#
# **How it is graded:** each check cell runs your function on fixed and
# random cases and prints a report: the cases that pass, for each one that
# fails what was expected and what you returned, a hint when your answer
# looks like a common mistake, and a score between 0 and 1.
# Until you write a function its check says *not implemented yet*.
#
# Notation: `B` examples in a batch, `E` experts, `H` the width of an
# expert's output.

# %%
import torch

from dmoe_edu import checks, course

print(course.setup(seed=0))

# %% [markdown]
# ## Exercise 1: the softmax gate
#
# Write `softmax_gate(gate_logits, mask=None)`.
#
# - `gate_logits` is a `(B, E)` tensor of scores, one row per example.
# - Return `gate_probs`, `(B, E)`: in each row,
#   `exp(logit_e) / sum_k exp(logit_k)`, so each row sums to 1.
# - `mask`, when given, is a `(B, E)` bool tensor: `False` means the expert
#   may not be used by that example. Those experts must get exactly 0 and
#   the others share the whole probability.
# - Logits as large as `1e4` must not give `inf` or `nan`.
#   (Adding the same number to every logit of a row does not change the
#   softmax. Which number keeps `exp` small?)
#
# Use only tensor operations: no `torch.softmax`, no library function.

# %% tags=["exercise"]
def softmax_gate(gate_logits, mask=None):
    """Gate probabilities of shape (B, E) from logits of shape (B, E)."""
    raise NotImplementedError("your code here")


# %%
checks.check_softmax_gate(softmax_gate)


# %% [markdown]
# ## Exercise 2: the combine
#
# Write `combine(gate_probs, expert_out)`.
#
# - `gate_probs` is `(B, E)`, as your gate returns it.
# - `expert_out` is `(B, E, H)`: what each expert computed for each example.
# - Return `mixed`, `(B, H)`:
#   `mixed[b] = sum_e gate_probs[b, e] * expert_out[b, e]`.
#
# One line of broadcasting does it; a loop over `b` and `e` is fine too.

# %% tags=["exercise"]
def combine(gate_probs, expert_out):
    """Mix expert outputs (B, E, H) with gates (B, E) into (B, H)."""
    raise NotImplementedError("your code here")


# %%
checks.check_combine(combine)

# %% [markdown]
# ## Your functions inside a mixture
#
# Once both checks pass, this cell mixes two experts with your functions
# and with the library's, on the same numbers.
# Until then it says what is missing.

# %%
from dmoe_edu import ops

gate_logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
expert_out = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]] * 3)  # (B, E, H)
ready = (checks.check_softmax_gate(softmax_gate).passed
         and checks.check_combine(combine).passed)
if ready:
    # torch.as_tensor: your functions may return arrays or lists.
    mine = torch.as_tensor(
        combine(torch.as_tensor(softmax_gate(gate_logits)), expert_out))
    library = ops.combine(ops.softmax_gate(gate_logits), expert_out)
    print("yours:  ", mine.double().numpy().round(3).tolist())
    print("library:", library.double().numpy().round(3).tolist())
else:
    print("finish exercises 1 and 2 first")

# %% [markdown]
# ## Summary
#
# - The gate is a softmax over each example's `E` logits; subtracting the
#   row maximum first keeps it finite for any logits, and masking the logits
#   with `-inf` gives masked experts exactly 0.
# - The combine is a gate-weighted sum over the experts' outputs,
#   `(B, E) x (B, E, H) -> (B, H)`.
