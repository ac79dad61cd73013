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
# # Assignment 3: analysing a trained Deep MoE

# %% [markdown]
# Notebook 5 showed that the paper's two-layer DMoE splits jittered digits
# by **where** they are in its first layer and by **what** they are in its
# second.
# In this assignment you compute that evidence yourself and say what it
# means.
#
# **What you will do**
#
# 1. Write `gate_map`: the mean gate of each expert for each of the 81
#    translations (the top half of the paper's Fig. 2).
# 2. Write `factorisation_score`: the argmax score `I(F; Z) / H(Z)` that
#    measures how much of a layer's expert choice a factor explains.
# 3. Read the maps and the four scores of a trained model and write a
#    short interpretation of what each layer does.
#
# **What you hand in:** this notebook, run top to bottom, with your two
# functions and your written answer in `interpretation`.
#
# **How it is graded.**
# After each exercise a check cell runs your answer against the library's
# on fixed and random cases and prints a report: the cases passed, for
# each failure what was expected and what came back, a hint when your
# answer matches a common mistake, and a score from 0 to 1 (the share of
# cases passed).
# An exercise you have not answered yet reports "not implemented yet" and
# scores 0; the rest of the notebook still runs.
# The check of exercise 3 only confirms that an answer of at least 40
# words is there: the instructor reads your text and grades what it says.
#
# Do not call `analysis.gate_by_translation` or
# `analysis.factorisation_score` inside your answers: they are what the
# checks compare against.

# %% [markdown]
# ## Setup: a trained DMoE and its gates
#
# The paper's 4x100-4x100 DMoE, trained for 15 epochs (the first 5 with
# the balancing constraint) on the 4,000 bundled training digits:
# about 10 seconds on one CPU thread.

# %%
# NBVAL_IGNORE_OUTPUT
import numpy as np
import torch

from dmoe_edu import analysis, checks, course, viz
from dmoe_edu.data import JitteredMNIST, load_bundled, shift_index
from dmoe_edu.dmoe import DeepMoE, LayerSpec
from dmoe_edu.train import TrainConfig, train

print(course.setup(seed=0))

# %% [markdown]
# `collect_gates` runs the trained model over the 1,000 test digits and
# keeps each layer's `(N, E)` gate probabilities with the digits' labels
# and shifts: the raw material of every exercise below.

# %%
# NBVAL_IGNORE_OUTPUT
data = JitteredMNIST(load_bundled(seed=0), seed=0)
torch.manual_seed(0)
model = DeepMoE(data.input_dim, [LayerSpec(4, 100, gate_hidden=50),
                                 LayerSpec(4, 100, gate_hidden=50)])
config = TrainConfig(epochs=15, constrained_epochs=5, margin=100.0,
                     threads=1)
train(model, data, config)
record = analysis.collect_gates(model, data.test)
gates1, gates2 = record.gate_probs  # (N, E) each
print(f"test error after {config.epochs} epochs: {record.error:.1f}%")
print("gates", gates1.shape, gates2.shape, "shifts", record.shifts.shape)

# %% [markdown]
# ## Exercise 1: the mean gate by translation
#
# Write `gate_map(gate_probs, shifts)`.
# `gate_probs` is one layer's `(N, E)` gate probabilities and `shifts` the
# `(N, 2)` integer shifts, `dx = shifts[:, 0]` and `dy = shifts[:, 1]`,
# each from -4 to 4.
# Return an `(E, 9, 9)` array whose entry `maps[e, dy + 4, dx + 4]` is the
# mean of `gate_probs[:, e]` over the examples shifted by `(dx, dy)`
# (NaN where no example has that shift).
# Rows are `dy` and columns `dx`, as on the image.

# %% tags=["exercise"]
def gate_map(gate_probs, shifts):
    """Mean gate of each expert for each translation, (N, E) -> (E, 9, 9).

    Args:
        gate_probs: (N, E) gate probabilities of one layer.
        shifts: (N, 2) integer shifts, dx in column 0 and dy in column 1,
            each in -4..4.

    Returns:
        np.ndarray: maps[e, dy + 4, dx + 4], the mean of gate_probs[:, e]
        over the examples shifted by (dx, dy); NaN for an unused shift.
    """
    raise NotImplementedError("your code here")


# %%
checks.check_gate_map(gate_map)

# %% [markdown]
# ## The maps of the trained model
#
# Here are the library's maps for layer 1 (they are what your `gate_map`
# should give on these gates).
# Look at how each expert's map changes from top to bottom (`dy`) and from
# left to right (`dx`).

# %%
# NBVAL_IGNORE_OUTPUT
maps1 = analysis.gate_by_translation(gates1, record.shifts)  # (E, 9, 9)
maps2 = analysis.gate_by_translation(gates2, record.shifts)  # (E, 9, 9)
viz.translation_maps_figure(maps1, title="Layer 1: mean gate per shift")

# %% [markdown]
# And layer 2 (each figure has its own colour scale: read the colour bar):

# %%
# NBVAL_IGNORE_OUTPUT
viz.translation_maps_figure(maps2, title="Layer 2: mean gate per shift")

# %% [markdown]
# ## Exercise 2: the factorisation score
#
# Write `factorisation_score(gate_probs, factor)`.
# Send each example to its top expert, `Z = argmax_e gate_probs[:, e]`
# (ties to the lower expert, as `argmax` does); `F` is the factor, an
# `(N,)` integer array (the class, or a translation index).
# Return the mutual information of `F` and `Z` divided by the entropy of
# `Z`, `I(F; Z) / H(Z)`, from the empirical joint distribution of the
# pairs `(F, Z)`, with natural logarithms.
# When one expert takes every example, `H(Z) = 0`: return 0.0.

# %% tags=["exercise"]
def factorisation_score(gate_probs, factor):
    """Argmax score I(F; Z) / H(Z) of a factor against a layer's experts.

    Args:
        gate_probs: (N, E) gate probabilities of one layer.
        factor: (N,) integer factor of each example.

    Returns:
        float: the score, 1 when the factor decides the expert and 0 when
        the two are independent; 0.0 when H(Z) = 0.
    """
    raise NotImplementedError("your code here")


# %%
checks.check_factorisation(factorisation_score)

# %% [markdown]
# ## The four scores of the trained model
#
# The library's scores for each layer against the translation (81 values,
# numbered by `shift_index`) and against the class (10 values).
# Beside each, its chance level: the same score with the factor shuffled
# over the digits, which a finite test set makes well above 0 for 81
# translations.

# %%
# NBVAL_IGNORE_OUTPUT
factors = {"translation": shift_index(record.shifts), "class": record.labels}
for layer, gates in (("layer 1", gates1), ("layer 2", gates2)):
    for name, factor in factors.items():
        score = analysis.factorisation_score(gates, factor)
        chance = analysis.chance_score(gates, factor)
        print(f"{layer} by {name:11s}: {score:.2f} (chance {chance:.2f})")

# %% [markdown]
# ## Exercise 3: what the model learned
#
# In 60 to 100 words, say what the maps and the scores show for each
# layer: which factor its experts follow, how you can see it in the maps,
# the numbers that back it up (against their chance levels), and what
# this means for the model as a whole.
# Replace the text of `interpretation` below.

# %% tags=["exercise"]
interpretation = "Your answer here."
# your answer here

# %%
checks.check_interpretation(interpretation)

# %% [markdown]
# ## Summary
#
# - You computed the mean gate of each expert per translation, the maps
#   of the paper's Fig. 2, from a layer's gates and the digits' shifts.
# - You turned the argmax expert choice into a score, `I(F; Z) / H(Z)`,
#   and read it against its chance level.
# - You interpreted a trained DMoE: a first layer of "where" experts and
#   a second layer of "what" experts.
