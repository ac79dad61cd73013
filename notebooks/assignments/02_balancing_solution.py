# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Assignment 2: the paper's balancing constraint (solution)
#
# Left alone, a gate tends to send almost every example to the expert that
# happened to start best, and the other experts never learn ("collapse",
# notebook 3 of the course).
# Eigen, Ranzato and Sutskever prevent it with a rule on running totals:
# each expert's total gate mass so far is compared with the mean total,
# and an expert more than a margin `m` ahead is switched off for the next
# example.
# You will write the rule, run it over a stream of examples, and show that
# it stops a collapse.
#
# **What you hand in:** this notebook with the two functions written and
# your answer to the question at the end.
#
# **How it is graded:** each check cell prints a report with the cases
# that pass, for each failure what was expected and what you returned, a
# hint when your answer looks like a common mistake, and a score.
# Until you write a function its check says *not implemented yet*.

# %%
import math

import numpy as np
import torch

from dmoe_edu import checks, course, viz

print(course.setup(seed=0))

# %% [markdown]
# ## Exercise 1: the rule for one example
#
# Write `margin_keep(totals, margin)`.
#
# - `totals` is an `(E,)` float array: each expert's running total of gate
#   probability over the examples seen so far.
# - Return `keep`, an `(E,)` bool array, `True` where the expert **may** be
#   used: expert `e` is switched off when `totals[e] - mean(totals)` is
#   strictly greater than `margin`.
# - The expert with the smallest total is never switched off.

# %% tags=["solution"]
def margin_keep(totals, margin):
    """(E,) bool: True where an expert may be used for the next example."""
    # BEGIN SOLUTION
    keep = totals - totals.mean() <= margin
    keep[np.argmin(totals)] = True
    return keep
    # END SOLUTION


# %%
checks.check_margin_keep(margin_keep)

# %% tags=["solution-only"]
assert checks.check_margin_keep(margin_keep).passed

# %% [markdown]
# ## Exercise 2: the rule over a stream
#
# Write `balance_stream(gate_logits, margin)`.
#
# - `gate_logits` is a `(T, E)` tensor: the gate's scores for `T`
#   examples, which arrive one at a time, in order.
# - Start with all totals at 0. For each example `t` in order:
#   1. decide its `keep` mask with `margin_keep` from the totals of the
#      examples *before* it;
#   2. its gate is the softmax of its logits with the switched-off experts
#      removed and the rest renormalised;
#   3. add that gate (the one it actually got) to the totals.
# - Return the `(T, E)` array of the gates the examples got.

# %% tags=["solution"]
def balance_stream(gate_logits, margin):
    """(T, E) gates of a stream of examples under the margin rule."""
    # BEGIN SOLUTION
    logits = gate_logits.double().numpy()
    T, E = logits.shape
    totals = np.zeros(E)
    gates = np.zeros((T, E))
    for t in range(T):
        keep = margin_keep(totals, margin)
        weights = np.exp(logits[t] - logits[t].max()) * keep
        gates[t] = weights / weights.sum()
        totals += gates[t]
    return gates
    # END SOLUTION


# %%
checks.check_balance_stream(balance_stream)

# %% tags=["solution-only"]
assert checks.check_balance_stream(balance_stream).passed

# %% [markdown]
# ## Does it prevent collapse?
#
# A gate that has collapsed onto expert 0: its logits favour expert 0 by
# 3 on every example, with some noise.
# Without the rule (`margin = inf`) expert 0 takes most of the gate mass;
# with `margin = 2` the load spreads.
# This cell runs your `balance_stream` once both checks pass.

# %%
gen = torch.Generator().manual_seed(0)
stream = torch.randn(300, 4, generator=gen, dtype=torch.float64)
stream[:, 0] += 3.0

ready = (checks.check_margin_keep(margin_keep).passed
         and checks.check_balance_stream(balance_stream).passed)
if ready:
    # np.asarray: your function may return a tensor or an array.
    free = np.asarray(balance_stream(stream, math.inf), dtype=float)
    ruled = np.asarray(balance_stream(stream, 2.0), dtype=float)
    print("load share without the rule:", free.mean(axis=0).round(2))
    print("load share with margin 2:   ", ruled.mean(axis=0).round(2))
else:
    print("finish exercises 1 and 2 first")

# %% [markdown]
# The gates along the stream, with the rule (once your functions pass):

# %%
if ready:
    figure = viz.gate_stream_figure(
        ruled, title="Gates under the margin rule, margin 2")
else:
    figure = None
figure

# %% tags=["solution-only"]
assert free.mean(axis=0)[0] > 0.7
assert ruled.mean(axis=0).max() < free.mean(axis=0).max() - 0.3

# %% [markdown]
# ## Question
#
# In 30 to 80 words: with `margin = 2`, what happens to expert 0 along the
# stream, and why does the load not become exactly uniform?
# Replace the text of `answer` below.

# %% tags=["solution"]
answer = "Your answer here."
# BEGIN SOLUTION
answer = """
Expert 0 gets most of each example's gate until its total runs more than 2
ahead of the mean; it is then switched off for the next examples, which go
to the others, until they catch up. The rule only bounds the lead, so
expert 0 keeps a share a little above the others: the totals never drift
apart, but inside the margin the examples still follow the gate's
preference.
"""
# END SOLUTION

# %%
checks.check_interpretation(answer, min_words=30)

# %% [markdown]
# ## Summary
#
# - The margin rule compares each expert's running total with the *mean*
#   of the totals, and switches off any expert strictly more than `m`
#   ahead; the least used expert always stays.
# - Run over a stream, each example is tested against the totals before it,
#   and the totals grow by the gate the example actually got.
# - A collapsed gate's load spreads out under the rule, to within the
#   margin.
