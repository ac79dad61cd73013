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
# # 1. What a mixture of experts is
#
# A mixture of experts splits one problem between several small models,
# the *experts*,
# and adds one more model, the *gate*,
# that decides for every input how much to trust each expert.
# This course rebuilds the Deep Mixture of Experts of Eigen, Ranzato and
# Sutskever (2013) one piece at a time.
# This first notebook builds the oldest and simplest mixture,
# on a problem small enough to draw.
#
# **What you will learn**
#
# - the letters the whole course uses for sizes: B, D, H, E, K, L, C;
# - why a problem that no single line can solve is easy for two lines and a
#   gate;
# - how a softmax gate turns scores into a distribution over the experts,
#   and why it subtracts the largest score first;
# - how the *combine* step mixes the experts' outputs;
# - how the classic mixture (it mixes class distributions) differs from the
#   paper's Deep MoE (it mixes hidden representations).

# %% [markdown]
# Every notebook of the course starts with the same setup call.
# It seeds Python, NumPy and PyTorch, fixes PyTorch to one thread
# (the same seed gives other numbers with another thread count)
# and picks the backend of the two operations we write by hand below.

# %%
# NBVAL_IGNORE_OUTPUT
from dmoe_edu import course

print(course.setup(seed=0))

# %% [markdown]
# One knob sets the sizes.
# `"notebook"` runs in seconds on a laptop.
# `"paper"` gives the small shape demos the sizes of the paper's first
# mixture layer on MNIST (a batch of 100 digits of 36x36 = 1296 pixels,
# 4 experts of 100 units),
# and the toy problem as many points as MNIST has training digits.
# The toy problem stays two-dimensional: it is there to be drawn.

# %%
SCALE = "notebook"  # "paper": MNIST-sized demos, 60,000 toy points

SIZES = {
    "notebook": dict(B=8, D=5, E=3, H=4, num_points=600),
    "paper": dict(B=100, D=1296, E=4, H=100, num_points=60_000),
}[SCALE]
STEPS = 300  # Adam steps of every training run below
print(SIZES)

# %% [markdown]
# ## The notation
#
# Every module, shape comment and figure of the course uses the same letters:
#
# | letter | size of |
# |---|---|
# | `B` | the batch: examples processed at once |
# | `D` | the input of a layer: features per example |
# | `H` | one expert's output: its hidden units |
# | `E` | the experts of a layer |
# | `K` | the experts an input actually uses (sparse mixtures; ours are dense, `K = E`) |
# | `L` | a layer's place in a deep mixture: layer 1, layer 2 |
# | `C` | the classes |
#
# A mixture layer reads a batch `x` of shape `(B, D)`.
# Its gate gives one score per expert, `gate_logits` of shape `(B, E)`,
# and its experts give `expert_out` of shape `(B, E, H)`:
# every expert's output for every example.
# Names say what a tensor holds: *logits* are scores before a softmax,
# *probs* are probabilities after it.

# %%
import torch

B, D, E, H = SIZES["B"], SIZES["D"], SIZES["E"], SIZES["H"]
x = torch.randn(B, D)  # (B, D) a batch of inputs
gate_logits = torch.randn(B, E)  # (B, E) one score per expert
expert_out = torch.randn(B, E, H)  # (B, E, H) every expert's output
print("x          ", tuple(x.shape))
print("gate_logits", tuple(gate_logits.shape))
print("expert_out ", tuple(expert_out.shape))

# %% [markdown]
# Every section of the course ends with a small check like the next cell:
# if it passes silently, what the section claims holds.

# %%
assert x.shape == (B, D)
assert gate_logits.shape == (B, E)
assert expert_out.shape == (B, E, H)

# %% [markdown]
# ## A problem that no single line solves
#
# Points `(x0, x1)` fill the square `[-2, 2]^2`, so `D = 2`,
# and each has one of `C = 2` classes.
# The square is cut into two regions along `x0 = 0`,
# and each region labels its points with its own rule:
#
# - on the left (region 0), class 1 lies *above* the rising line
#   `x1 = x0 / 2`;
# - on the right (region 1), class 1 lies *below* the falling line
#   `x1 = -x0 / 2`.
#
# `dmoe_edu.data.two_rule_plane` draws such points
# (from a seeded NumPy generator, so they are the same on every machine).

# %%
from dmoe_edu import data, viz

plane = data.two_rule_plane(num_points=SIZES["num_points"], layout="halves")
print("inputs", tuple(plane.inputs.shape), plane.inputs.dtype)
print("labels", tuple(plane.labels.shape), plane.labels.dtype)
print("points in region 1:", int(plane.regions.sum()), "of", len(plane))

# %% [markdown]
# To draw what a model does everywhere on the plane,
# we evaluate it on a grid of 61 x 61 points.
# The figure colours each grid point by the expert a gate trusts there.
# Here the "gate" is the ideal one,
# which knows the regions: all of its trust goes to the region's own rule.

# %%
import torch.nn.functional as F

grid = data.plane_grid(bound=plane.bound)  # points: (G * G, 2)
ideal_gate = F.one_hot(plane.region_of(grid.points), 2).float()  # (G*G, E)
shown = slice(0, 600)  # at most 600 points on every figure
viz.gate_regions_figure(
    grid.xs, grid.ys, grid.to_grid(ideal_gate),  # (G, G, E)
    points=plane.inputs[shown], labels=plane.labels[shown],
    title="The two regions and the labels (the ideal gate)")

# %% [markdown]
# White points are class 0, dark points class 1.
# On the left the dark points sit above a gently rising line;
# on the right they sit below a gently falling one.
# Along the border `x0 = 0` the two rules disagree for every `x1 != 0`,
# and no single straight line puts all dark points on one side.
#
# Let us measure that, with the models and the training loop of the
# library, and one small helper of our own:
# the share of points a model gets right.

# %%
from dmoe_edu.classic import ClassicMoE
from dmoe_edu.train import fit_full_batch


@torch.no_grad()
def accuracy(model, inputs, labels):
    """Share of points whose most likely class is their label."""
    return (model(inputs).logits.argmax(1) == labels).float().mean().item()


# %% [markdown]
# A classic mixture (next section) with a single expert is a plain linear
# classifier: its gate has nobody else to trust.
# `dmoe_edu.train.fit_full_batch` trains it with Adam on all points at
# once, `STEPS` times.
# We seed the initialisation first, as before every training run.

# %%
# NBVAL_IGNORE_OUTPUT
torch.manual_seed(0)
one_line = ClassicMoE(in_dim=2, num_classes=2, num_experts=1)
fit_full_batch(one_line, plane.inputs, plane.labels, steps=STEPS)
one_line_acc = accuracy(one_line, plane.inputs, plane.labels)
print(f"one linear classifier: {one_line_acc:.1%} of the points right")

# %% [markdown]
# About two points in three: better than a coin, far from all.
# The check leaves room for another CPU's slightly different run.

# %%
assert 0.55 < one_line_acc < 0.8
single_gate = one_line(plane.inputs).gate_probs[0]  # (num_points, 1)
assert (single_gate == 1).all()

# %% [markdown]
# ## Two experts and a gate
#
# The classic mixture of experts (Jacobs, Jordan, Nowlan and Hinton, 1991)
# gives each expert `e` its own linear classifier with scores
# `f_e(x) = W_e x + b_e` (`C` of them),
# and lets a gate `g(x)` spread one unit of trust over the experts.
# Its prediction mixes the experts' class distributions:
#
# `F(x) = sum_e g_e(x) * softmax(f_e(x))`.
#
# `dmoe_edu.classic.ClassicMoE` is that model.
# With `gate_hidden=None` its gate is linear: `gate_logits = W x + b`.

# %%
torch.manual_seed(0)
model = ClassicMoE(in_dim=2, num_classes=2, num_experts=2)
print(model)
expert_logits = model.expert_logits(plane.inputs[:B])  # (B, E, C)
gate_logits_toy = model.gate(plane.inputs[:B])  # (B, E)
print("expert_logits", tuple(expert_logits.shape))
print("gate_logits  ", tuple(gate_logits_toy.shape))

# %% [markdown]
# The model's output is the log of the mixed distribution,
# so its rows, exponentiated, sum to 1.
# The next two sections open up the two steps inside:
# the softmax that turns gate logits into gate probabilities,
# and the combine that mixes with them.

# %%
out = model(plane.inputs[:B])
assert out.logits.shape == (B, 2)
assert out.gate_probs[0].shape == (B, 2)
torch.testing.assert_close(out.logits.exp().sum(1), torch.ones(B))

# %% [markdown]
# ## The softmax gate, by hand
#
# The gate's probabilities are a softmax of its logits,
# `gate_probs_e = exp(l_e) / sum_j exp(l_j)`:
# positive, and summing to 1 over the experts.
# Written exactly like that, it breaks on large logits.
# In float32, `exp(89)` is already larger than the largest number
# (about `3.4e38`), so it becomes `inf`, and `inf / inf` is `nan`.
#
# The cure: subtract the row's largest logit `m` first.
# Every `exp(l_e - m)` then lies in `(0, 1]`, so nothing overflows,
# and the largest is exactly 1, so the sum is at least 1
# and never underflows to 0.
# The answer does not change, because the factor `exp(-m)`
# appears above and below the fraction and cancels.

# %%
def naive_softmax(gate_logits):
    weights = gate_logits.exp()
    return weights / weights.sum(dim=1, keepdim=True)


def softmax_by_hand(gate_logits):
    top = gate_logits.max(dim=1, keepdim=True).values  # (B, 1)
    weights = (gate_logits - top).exp()  # (B, E), the largest is 1
    return weights / weights.sum(dim=1, keepdim=True)


# %% [markdown]
# Both agree on small logits; only the shifted one survives large ones.

# %%
small = torch.tensor([[1.0, 0.0, -1.0]])
large = torch.tensor([[100.0, 99.0, 0.0]])
print("small, naive  ", naive_softmax(small).numpy().round(4))
print("small, by hand", softmax_by_hand(small).numpy().round(4))
print("large, naive  ", naive_softmax(large).numpy().round(4))
print("large, by hand", softmax_by_hand(large).numpy().round(4))

# %% [markdown]
# The library's gate softmax, `dmoe_edu.ops.softmax_gate`,
# is the op every mixture layer of the course calls
# (notebook 7 writes it as a CUDA kernel).
# Ours must give the same numbers, on the random logits of the notation
# section and on the large ones.

# %%
from dmoe_edu import ops

for logits in (gate_logits, large, 1000 * gate_logits):
    torch.testing.assert_close(softmax_by_hand(logits),
                               ops.softmax_gate(logits))
assert torch.isnan(naive_softmax(large)).any()

# %% [markdown]
# ## The combine, by hand
#
# With the gate probabilities in hand, the layer's output is the
# gate-weighted sum of the experts' outputs, example by example:
#
# `mixed[b] = sum_e gate_probs[b, e] * expert_out[b, e, :]`.
#
# First as a loop over experts, as the formula reads;
# then in one line, by broadcasting the gates over the last axis.

# %%
gate_probs = softmax_by_hand(gate_logits)  # (B, E)

mixed_loop = torch.zeros(B, H)
for e in range(E):
    mixed_loop += gate_probs[:, e:e + 1] * expert_out[:, e, :]  # (B, H)

mixed_by_hand = (gate_probs[:, :, None] * expert_out).sum(dim=1)  # (B, H)
print("mixed", tuple(mixed_by_hand.shape))

# %% [markdown]
# The library's `dmoe_edu.ops.combine` computes the same `(B, H)` mixture.
# In the classic mixture the experts' outputs are class distributions,
# so `H` is `C` and the mixture is again a distribution.

# %%
torch.testing.assert_close(mixed_loop, mixed_by_hand)
torch.testing.assert_close(mixed_by_hand, ops.combine(gate_probs, expert_out))
assert mixed_by_hand.shape == (B, H)

# %% [markdown]
# ## Training the mixture
#
# Training maximises the probability the mixture gives each point's label,
# `F_y(x)`: the loss is its negative log, `-log F_y(x)`,
# averaged over the points.
# Gate and experts learn together, from the same loss.
# An expert gets gradient from a point only as far as the gate trusts it
# there, so each expert is pushed towards the points the gate sends it,
# and the gate towards the expert that does best on each point.

# %%
# NBVAL_IGNORE_OUTPUT
torch.manual_seed(0)
model = ClassicMoE(in_dim=2, num_classes=2, num_experts=2)
losses = fit_full_batch(model, plane.inputs, plane.labels, steps=STEPS)
mixture_acc = accuracy(model, plane.inputs, plane.labels)
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps")
print(f"two linear experts and a linear gate: {mixture_acc:.1%} right")

# %% [markdown]
# Two lines and a gate get nearly every point right,
# where one line got about two in three.

# %%
assert mixture_acc > 0.9
assert mixture_acc > one_line_acc + 0.15
assert losses[-1] < losses[0] / 4

# %% [markdown]
# ## Where the gate trusts each expert
#
# Now the same figure as before, with the trained gate in place of the
# ideal one.
# Each grid cell takes the colour of the expert with the larger gate
# probability there (hover to see it),
# and each expert's own decision line, where its two class scores are
# equal, is dashed in its colour across the whole plane.

# %%
# NBVAL_IGNORE_OUTPUT
with torch.no_grad():
    grid_gates = model(grid.points).gate_probs[0]  # (G*G, E)
    grid_scores = model.expert_logits(grid.points)  # (G*G, E, C)
expert_scores = grid_scores[:, :, 1] - grid_scores[:, :, 0]  # (G*G, E)
viz.gate_regions_figure(
    grid.xs, grid.ys, grid.to_grid(grid_gates),  # (G, G, E)
    points=plane.inputs[shown], labels=plane.labels[shown],
    expert_scores=grid.to_grid(expert_scores).permute(2, 0, 1),  # (E, G, G)
    title="The trained gate's regions and each expert's decision line")

# %% [markdown]
# What to notice:
#
# - the gate has found the border `x0 = 0` on its own,
#   from nothing but the labels;
# - each expert's dashed line follows its region's rule *inside the region
#   the gate gives it*, and is plainly wrong on the other side,
#   where the gate ignores it;
# - which expert took the left is an accident of the initialisation:
#   expert numbers carry no meaning.
#
# The check below compares the trained gate with the ideal one
# on the grid (allowing the two experts to be swapped),
# and asks each expert alone to classify all the points.

# %%
with torch.no_grad():
    # (num_points, E): each expert's class for every point of the plane
    expert_alone = model.expert_logits(plane.inputs).argmax(2)
alone_acc = (expert_alone == plane.labels[:, None]).float().mean(0)  # (E,)
chosen = grid_gates.argmax(1)  # (G*G,)
agree = (chosen == plane.region_of(grid.points)).float().mean().item()
assert max(agree, 1 - agree) > 0.9, agree
assert alone_acc.max() < 0.8, alone_acc

# %% [markdown]
# The gate matches the ideal regions on more than 90% of the plane,
# and neither expert on its own gets more than about two points in three:
# each is a specialist, good only where the gate sends it.

# %% [markdown]
# ## Mixing distributions or hidden representations
#
# The classic mixture mixes *class distributions*:
# each expert is a complete classifier, and the mixture is the prediction.
# The Deep Mixture of Experts of Eigen, Ranzato and Sutskever mixes
# *hidden representations* instead.
# Its experts are layers of `H` ReLU units, `f_e(x) = max(0, W_e x + b_e)`,
# the combine gives a hidden vector `z = sum_e g_e(x) f_e(x)` of width `H`,
# and only after the last of the stacked mixture layers does one linear
# layer and one softmax give the class distribution.
# That is what lets a second mixture layer build on the first:
# with `E` experts in each of two layers,
# every input takes one of `E * E` paths.
#
# `dmoe_edu.moe.MixtureLayer` is one such layer;
# it runs the same `softmax_gate` and `combine` we just wrote.

# %%
from dmoe_edu.moe import MixtureLayer

torch.manual_seed(0)
layer = MixtureLayer(in_dim=2, width=H, num_experts=2, gate_hidden=None)
hidden, layer_gates = layer(plane.inputs[:B])  # (B, H), (B, E)
class_probs = model(plane.inputs[:B]).logits.exp()  # (B, C)
print("DMoE layer: hidden", tuple(hidden.shape), "gates",
      tuple(layer_gates.shape))
print("classic:    class distribution", tuple(class_probs.shape))

# %% [markdown]
# Both have a gate over `E = 2` experts,
# but only the classic mixture's output is a distribution over classes.
# The mixture layer's output is `H` non-negative hidden units,
# ready for the next layer.

# %%
assert hidden.shape == (B, H) and layer_gates.shape == (B, 2)
assert (hidden >= 0).all()
torch.testing.assert_close(class_probs.sum(1), torch.ones(B))
torch.testing.assert_close(layer_gates.sum(1), torch.ones(B))

# %% [markdown]
# ## Summary
#
# - A mixture of experts has experts that each handle part of the input
#   space and a gate that says, for every input, how much to trust each.
# - On a plane where each half follows its own linear rule,
#   one linear classifier gets about two points in three,
#   while two linear experts and a linear gate get nearly all of them:
#   the gate learns the border between the halves from the labels alone.
# - The gate's probabilities are a softmax of its logits.
#   Subtracting the row's largest logit first changes nothing
#   mathematically and keeps `exp` from overflowing.
# - The combine is a gate-weighted sum over the experts,
#   `(B, E) x (B, E, H) -> (B, H)`.
# - The classic mixture mixes class distributions;
#   the Deep MoE mixes hidden representations and applies one softmax at
#   the end, so mixture layers can be stacked.
#
# Notebook 2 looks at the gate itself: what a linear gate can carve out of
# the plane, what the paper's two-layer gate adds,
# and how temperature and entropy describe how sure a gate is.

# %% [markdown]
# ## Exercises
#
# 1. Set `layout="stripe"` in the `two_rule_plane` call
#    (then a middle stripe, `|x0| < 1`, has one rule and the two outer
#    strips another) and rerun the notebook.
#    How far does the linear gate get, and why can its border not follow
#    the stripe?
# 2. Give the data `label_noise=0.1` and rerun the training.
#    Does the gate still find the border? What happens to the accuracy?
# 3. Train with `num_experts=3` in `ClassicMoE`.
#    Does the third expert get a region of its own,
#    or does the gate leave it unused?
# 4. Set `STEPS = 20` and redraw the trained gate's regions.
#    What have the gate and the experts learnt first?
# 5. In the softmax section, make the logits `large` float64
#    (`dtype=torch.float64`) and raise them to 1000.
#    At what size does `naive_softmax` fail in float64, and why there?
#    (Hint: the largest float64 is about `1.8e308`.)
# 6. Set `SCALE = "paper"` and rerun.
#    Do the by-hand softmax and combine still match the library
#    at the paper's layer sizes?

# %% [markdown]
# ## References
#
# 1. D. Eigen, M. Ranzato, I. Sutskever,
#    "Learning Factored Representations in a Deep Mixture of Experts",
#    arXiv:1312.4314, 2013.
# 2. R. A. Jacobs, M. I. Jordan, S. J. Nowlan, G. E. Hinton,
#    "Adaptive Mixtures of Local Experts",
#    Neural Computation 3(1), 79-87, 1991.
# 3. M. I. Jordan, R. A. Jacobs,
#    "Hierarchical Mixtures of Experts and the EM Algorithm",
#    Neural Computation 6(2), 181-214, 1994.
