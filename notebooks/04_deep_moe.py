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
# # 4. Stacking: the Deep MoE
#
# One mixture layer chooses among `E` experts.
# The paper's idea is to stack mixture layers, each with its own gate that
# reads that layer's input, and to put a single linear layer and softmax on
# top:
#
# $$z^1 = \sum_{i=1}^{N} g^1_i(x)\, f^1_i(x), \qquad
#   z^2 = \sum_{j=1}^{M} g^2_j(z^1)\, f^2_j(z^1), \qquad
#   y = \mathrm{softmax}(W^3 z^2 + b^3).$$
#
# Every expert is a linear layer followed by a ReLU, and every gate is a
# small two-layer ReLU network followed by a softmax over its experts.
#
# **What you will learn**
#
# - the forward pass of a two-layer Deep MoE, computed by hand from the
#   weights of a `dmoe_edu.dmoe.DeepMoE`, with the shape of every tensor;
# - where the parameters of the paper's models sit, counted by hand;
# - why `N` experts below `M` experts give `N x M` paths, the paper's
#   "effective experts";
# - how to read the joint assignment table of a trained model, and what it
#   means when its rows are well mixed.
#
# Notation: `B` batch, `D` input width, `H` expert width, `E` experts in a
# layer (`N` in layer 1 and `M` in layer 2 when both appear), `L` layer,
# `C` classes.

# %%
# NBVAL_IGNORE_OUTPUT
from dmoe_edu import course

print(course.setup(seed=0))

# %% [markdown]
# The imports of the whole notebook, in one place.

# %%
import numpy as np
import torch

from dmoe_edu import analysis, paper, viz
from dmoe_edu.data import JitteredMNIST, load_bundled, shift_index
from dmoe_edu.dmoe import DeepMoE, LayerSpec
from dmoe_edu.train import TrainConfig, train

# %% [markdown]
# One knob scales the training run of the last section.
# `"notebook"` trains for 10 epochs (the first 5 with the balancing rule of
# notebook 3), a few seconds.
# `"paper"` trains for 100 epochs, the first 10 with the rule: the schedule
# of this project's full-scale runs, about half a minute here.

# %%
SCALE = "notebook"  # "paper": 100 epochs, 10 of them with the margin rule
EPOCHS, CONSTRAINED_EPOCHS = {"notebook": (10, 5), "paper": (100, 10)}[SCALE]
print(f"{SCALE}: {EPOCHS} epochs, {CONSTRAINED_EPOCHS} with the rule")

# %% [markdown]
# ## The model
#
# The paper's first MNIST model has two layers of four experts with 100
# hidden units each, and gates with 50 hidden units: `4x100-4x100`.
# It reads a jittered digit, a 28x28 MNIST digit placed at a random shift
# on a 36x36 canvas and flattened, so `D = 36 * 36 = 1296`.
# Each layer is a `LayerSpec(num_experts, width, gate_hidden)`.

# %%
torch.manual_seed(0)
model = DeepMoE(1296, [LayerSpec(4, 100, 50), LayerSpec(4, 100, 50)])
model.eval()  # no balancing rule, outside training
print(model)

# %% [markdown]
# Two `MixtureLayer`s, each with its `ExpertLayer` (all four experts'
# weights stacked in one tensor), its `ReLUGate` and its balancing rule
# (notebook 3), then the `head`, the final linear layer to the `C = 10`
# classes.
# Layer 2 reads the 100-wide output of layer 1.
#
# We take eight jittered test digits as a batch.

# %%
data = JitteredMNIST(load_bundled(seed=0), seed=0)
x = data.test.inputs()[:8]  # (B, D)
B, D = x.shape
print("x:", tuple(x.shape))
assert (B, D) == (8, 1296) and model.layers[1].in_dim == 100

# %% [markdown]
# ## The forward pass by hand
#
# **Layer-1 experts.**
# The expert layer stores the weights of its `E` experts as one `(E, H, D)`
# tensor and their biases as `(E, H)`.
# Expert `e` computes `relu(W_e x + b_e)`; an `einsum` does all four at
# once, giving one `H`-vector per example and expert.

# %%
layer1 = model.layers[0]
W1, b1 = layer1.experts.weight, layer1.experts.bias  # (E, H, D), (E, H)
expert_out1 = torch.relu(
    torch.einsum("bd,ehd->beh", x, W1) + b1)  # (B, E, H)
print("W1:", tuple(W1.shape), " expert_out1:", tuple(expert_out1.shape))

# %% [markdown]
# **Layer-1 gate.**
# The gate reads the same `x`.
# A hidden layer of 50 ReLU units, then a linear map to one score per
# expert, the `gate_logits`; a softmax over the experts turns them into
# `gate_probs`, which are positive and sum to 1 for each example.

# %%
gate1 = layer1.gate
A1, a1 = gate1.hidden_layer.weight, gate1.hidden_layer.bias  # (50, D)
V1, v1 = gate1.out.weight, gate1.out.bias  # (E, 50), (E,)
gate_relu1 = torch.relu(x @ A1.T + a1)  # (B, 50)
gate_logits1 = gate_relu1 @ V1.T + v1  # (B, E)
gate_probs1 = torch.softmax(gate_logits1, dim=1)  # (B, E)
print("gate_probs1:", tuple(gate_probs1.shape))

# %% [markdown]
# **Combine.**
# The layer's output is the gate-weighted sum of its experts' outputs:
# for each example, `z1 = sum_e gate_probs1[e] * expert_out1[e]`.
# Every expert ran on every input; the gate only weights them.
# This is the paper's *dense* mixture: it saves no computation.

# %%
z1 = torch.einsum("be,beh->bh", gate_probs1, expert_out1)  # (B, H)
print("z1:", tuple(z1.shape))

# %% [markdown]
# **Layer 2** does the same three steps with `z1` as its input: its experts
# *and its gate* read `z1`, not `x`.
# So the steps go into a function, checked first on layer 1.

# %%
def mixture_by_hand(layer, inputs):  # inputs (B, D_in)
    W, b = layer.experts.weight, layer.experts.bias  # (E, H, D_in)
    expert_out = torch.relu(
        torch.einsum("bd,ehd->beh", inputs, W) + b)  # (B, E, H)
    hidden = torch.relu(inputs @ layer.gate.hidden_layer.weight.T
                        + layer.gate.hidden_layer.bias)  # (B, gate_hidden)
    gate_logits = hidden @ layer.gate.out.weight.T + layer.gate.out.bias
    gate_probs = torch.softmax(gate_logits, dim=1)  # (B, E)
    mixed = torch.einsum("be,beh->bh", gate_probs, expert_out)  # (B, H)
    return mixed, gate_probs


torch.testing.assert_close(mixture_by_hand(layer1, x)[0], z1)

# %% [markdown]
# **Layer 2, then the head.**
# The final linear layer maps the 100-wide `z2` to `C = 10` class scores,
# the `logits`; the softmax of the paper's `y` is left to the loss
# (cross-entropy takes logits).

# %%
z2, gate_probs2 = mixture_by_hand(model.layers[1], z1)  # (B, H), (B, E)
head = model.head
logits = z2 @ head.weight.T + head.bias  # (B, C)
print("z2:", tuple(z2.shape), " logits:", tuple(logits.shape))

# %% [markdown]
# The library returns the logits and every layer's gate probabilities
# (`ModelOutput(logits, gate_probs)`).
# Ours agree with it, up to float32 rounding.

# %%
out = model(x)
torch.testing.assert_close(logits, out.logits)
torch.testing.assert_close(gate_probs1, out.gate_probs[0])
torch.testing.assert_close(gate_probs2, out.gate_probs[1])
assert out.logits.shape == (B, 10)
assert [tuple(g.shape) for g in out.gate_probs] == [(B, 4), (B, 4)]

# %% [markdown]
# ## Counting parameters
#
# With the forward pass in hand, the parameters can be counted.
# For a layer of `E` experts of width `H` reading an input of width
# `D_in`, with a gate of `gate_hidden` hidden units (`LayerSpec.gate_hidden`):
#
# - experts: `E * (D_in * H + H)` (a weight matrix and a bias each);
# - gate: `D_in * gate_hidden + gate_hidden` for its hidden layer,
#   `gate_hidden * E + E` for its scores;
#
# and the head adds `H * C + C`.
# The count below covers the mixture layers of the paper's Table 1 (every
# layer there has four experts and a two-layer gate).

# %%
def count_by_hand(layers, input_dim=1296, num_classes=10):
    total, width = 0, input_dim
    for spec in layers:
        E, H, gate_hidden = spec.num_experts, spec.width, spec.gate_hidden
        total += E * (width * H + H)  # experts
        total += width * gate_hidden + gate_hidden  # gate: hidden layer
        total += gate_hidden * E + E  # gate: scores
        width = H  # the next layer reads this one
    return total + width * num_classes + num_classes  # head

# %% [markdown]
# The five models of Table 1, by hand and by the library.

# %%
print(f"{'model':28s} {'by hand':>9s} {'library':>9s}")
counts = {}
for number, row in paper.TABLE1.items():
    built = DeepMoE(paper.JITTERED_INPUT_DIM, row.layers)
    counts[number] = (count_by_hand(row.layers), built.num_parameters())
    print(f"{row.name:28s} {counts[number][0]:9,d} {counts[number][1]:9,d}")

# %% [markdown]
# Where do the 630,518 parameters of the first model sit?
# Almost all of them in layer 1's experts: each reads all 1296 pixels.

# %%
parts = {
    "layer-1 experts": 4 * (1296 * 100 + 100),
    "layer-1 gate": 1296 * 50 + 50 + 50 * 4 + 4,
    "layer-2 experts": 4 * (100 * 100 + 100),
    "layer-2 gate": 100 * 50 + 50 + 50 * 4 + 4,
    "head": 100 * 10 + 10,
}
for name, size in parts.items():
    print(f"{name:16s} {size:8,d}  {size / counts[1][0]:6.1%}")

# %% [markdown]
# Layer 1's experts hold 82% of the model and its gate another 10%.
# Layer 2, whose experts read only 100 numbers, costs about 7%, and the head
# under 0.2%.
# This is also why the paper's parameter-matched DNN baseline widens its
# *first* hidden layer.
#
# The check: the hand count equals the library's for every row.

# %%
for number, (by_hand, library) in counts.items():
    assert by_hand == library, (number, by_hand, library)
assert counts[1][0] == sum(parts.values()) == 630_518

# %% [markdown]
# ## N x M paths
#
# For one input, the pair of gates gives a weight to every pair `(i, j)` of
# a layer-1 expert and a layer-2 expert: the product `g1_i(x) * g2_j(z1)`.
# Over the `N * M = 16` pairs these products sum to 1, so they form a
# distribution over *paths* through the network.

# %%
# NBVAL_IGNORE_OUTPUT
path_probs = torch.einsum("bi,bj->bij", out.gate_probs[0],
                          out.gate_probs[1]).detach()  # (B, N, M)
flat = path_probs.flatten(1)  # (B, N*M)
print("path weights of the first digit, rows i, columns j:")
print(path_probs[0].numpy().round(3))

# %% [markdown]
# The model is untrained, so its gates barely look at the input: every path
# gets about 1/16 = 0.0625.
# Training will change that.
#
# If the gates were hard, putting all their weight on one expert each, an
# input that takes path `(i, j)` would be computed by exactly one small
# network, `head(f2_j(f1_i(x)))`.
# The paper calls these the *effective experts*: two layers of four experts
# act like sixteen experts.
# Their number multiplies with depth, while the parameters only add up.

# %%
for depth in (1, 2, 3, 4):
    print(f"L = {depth}: {4 * depth:2d} experts, {4 ** depth:3d} paths")
flat_16 = DeepMoE(1296, [LayerSpec(16, 100, 50)]).num_parameters()
print(f"one layer of 16 experts: {flat_16:,d} parameters,"
      f" against {counts[1][1]:,d} for 4x100-4x100")

# %% [markdown]
# A single layer of sixteen experts of the same width would cost 3.4 times
# as many parameters.
# The sixteen paths are not sixteen independent networks, though: the four
# paths `(i, 0) ... (i, 3)` share expert `f1_i`, so they can only differ in
# their second layer.
# And with soft gates every input is a blend of all paths, weighted by the
# products above.
# What the stack buys is a factored choice: layer 1 picks one of `N` ways to
# look at the input, layer 2 one of `M`, and the two choices combine.

# %%
torch.testing.assert_close(flat.sum(dim=1), torch.ones(B))
assert flat.shape == (B, 16) and flat_16 > 3 * counts[1][1]

# %% [markdown]
# ## The joint assignment of a trained model
#
# Do the two layers of a trained model really combine their choices?
# We train the model briefly, with the balancing rule on for the first
# epochs (notebook 3), and look at its gates on the 1,000 test digits.

# %%
# NBVAL_IGNORE_OUTPUT
result = train(model, data, TrainConfig(
    epochs=EPOCHS, constrained_epochs=CONSTRAINED_EPOCHS, margin=100))
print(f"test error after {EPOCHS} epochs: {result.final_test_error:.1f}%")

# %% [markdown]
# `analysis.collect_gates` runs the model over the test set and keeps both
# layers' gates; `analysis.joint_assignment` averages the product gate of
# each pair `(i, j)` over the test digits and normalises each row.
# Row `i` then says how the inputs that layer-1 expert `i` takes are shared
# among the layer-2 experts.

# %%
record = analysis.collect_gates(model, data.test)
p1, p2 = record.gate_probs  # (N_test, 4) each
joint = analysis.joint_assignment(p1, p2)  # (4, 4), rows sum to 1
usage2 = p2.mean(axis=0)  # (4,) layer 2's overall share per expert

# %% [markdown]
# The table as a heatmap, as in the paper's Fig. 5:

# %%
# NBVAL_IGNORE_OUTPUT
viz.joint_figure(joint)

# %% [markdown]
# The rows look alike: each column keeps about the same value from top to
# bottom (the colour scale spans only the range of the table, so read the
# numbers, not just the colours).
# Whichever layer-1 expert took a digit, layer 2 shares it among its
# experts in about the same proportions, its overall ones (`usage2`).
# That is what *well mixed* means.
# Layer 2's choice does not depend on layer 1's, so every combination of
# the two gets a share of the gate mass: all sixteen paths are in use.
# The opposite would be a table with one bright cell per row: layer 2
# repeating layer 1's decision, only four paths in use, and nothing gained
# from the second gate.
#
# Well-mixed rows do not mean that the gates are random.
# Independent choices can each carry a different meaning: the paper finds
# that layer 1 splits the digits by *where* they are (their shift) and
# layer 2 by *what* they are (their class), the subject of notebook 5.
# `analysis.factorisation_score` measures how much a factor tells about a
# layer's expert choice (0 for nothing, 1 for everything).

# %%
# NBVAL_IGNORE_OUTPUT
layer1_choice = p1.argmax(axis=1)  # (N_test,)
scores = {
    "layer 2 by layer-1 choice": analysis.factorisation_score(
        p2, layer1_choice),
    "layer 2 by class": analysis.factorisation_score(p2, record.labels),
    "layer 1 by shift": analysis.factorisation_score(
        p1, shift_index(record.shifts)),
}
for name, score in scores.items():
    print(f"{name:26s} {score:.2f}")
print("largest |row - usage2|:", np.abs(joint - usage2).max().round(3))
paths = layer1_choice * 4 + p2.argmax(axis=1)  # (N_test,) heaviest path
print("paths that are some digit's heaviest:", len(np.unique(paths)), "of 16")

# %% [markdown]
# Even after this short run, the class tells much more about layer 2's
# expert than layer 1's choice does, and the shift tells a good deal about
# layer 1's.
# (With 81 possible shifts and 1,000 digits, the shift score reaches about
# 0.10 by chance alone; the class score's chance level is near 0.01.)
# The last line counts the paths that carry the largest product gate of at
# least one test digit.
# After a short run it is usually fewer than 16: the gates are still soft,
# and a layer-2 expert can hold a fair share of the gate mass while rarely
# being any digit's first choice.
# The numbers vary a little between CPUs and seeds; the check below only
# asks for the pattern.

# %%
np.testing.assert_allclose(joint.sum(axis=1), 1.0)
assert np.abs(joint - usage2).max() < 0.15  # rows close to the marginal
assert scores["layer 2 by layer-1 choice"] < 0.15
assert scores["layer 2 by class"] > 2 * scores["layer 2 by layer-1 choice"]
assert result.final_test_error < 40

# %% [markdown]
# ## Summary
#
# - A Deep MoE stacks mixture layers; each layer's experts and gate read
#   that layer's input, and one linear layer and softmax sit on top.
# - One layer is three steps: all experts run (`(B, E, H)`), the gate's
#   softmax weights them (`(B, E)`), the combine sums (`(B, H)`).
#   Our hand-written forward pass matched `DeepMoE` exactly.
# - In the paper's `4x100-4x100` model, 82% of the 630,518 parameters are
#   layer 1's experts; the hand count matches `num_parameters()` for all
#   five models of Table 1.
# - `N` experts below `M` experts give `N x M` paths ("effective experts"):
#   the number of paths multiplies with depth while parameters add.
# - The joint assignment table shows whether the paths are used: well-mixed
#   rows mean layer 2 chooses independently of layer 1, so all combinations
#   occur.
#
# ## Exercises
#
# 1. Build `DeepMoE(1296, [LayerSpec(4, 100, 50), LayerSpec(16, 100, 50)])`
#    (the speech model's 4 and 16 experts) and run `mixture_by_hand` on it.
#    How many paths does it have, and how many more parameters than the
#    `4x100-4x100` model?
# 2. Extend `count_by_hand` to layers with one expert (no gate: a *Single
#    Expert* layer) and to linear gates (`gate_hidden=None`), and check it
#    against `num_parameters()`.
# 3. Add a third layer, `LayerSpec(4, 100, 50)`, to the model. Count the
#    paths and the parameters it adds.
# 4. Draw `viz.joint_figure(analysis.joint_assignment(p1, p1))`: the table
#    of a layer 2 that copied layer 1's choice. How does it differ from the
#    trained model's?
# 5. Train with `margin=None` in `TrainConfig` (no balancing rule) and draw
#    the joint table again. What do the rows of a collapsed layer look like?
# 6. Set `SCALE = "paper"` and compare the three scores after 100 epochs.
#
# ## References
#
# - D. Eigen, M. Ranzato, I. Sutskever, "Learning Factored Representations
#   in a Deep Mixture of Experts", arXiv:1312.4314, 2013 (the model, Table 1
#   and the joint assignment of Fig. 5).
# - R. A. Jacobs, M. I. Jordan, S. J. Nowlan, G. E. Hinton, "Adaptive
#   Mixtures of Local Experts", Neural Computation 3(1), 1991.
