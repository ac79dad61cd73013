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
# # 2. Gating networks
#
# The gate is the part of a mixture that decides:
# for every input it spreads one unit of trust over the `E` experts.
# Notebook 1 used the simplest gate, a linear map followed by a softmax.
# The paper uses a gate with a hidden layer of ReLU units.
# This notebook asks what each can carve out of the plane,
# what each costs in parameters,
# and how two numbers, the temperature and the entropy,
# describe how sure a gate is.
#
# **What you will learn**
#
# - the linear gate and the paper's two-layer ReLU gate, and how many
#   parameters each has;
# - why every region a linear gate gives an expert is convex,
#   and what the ReLU gate's hidden layer adds;
# - that training a mixture can get stuck, and why we restart it;
# - what dividing the logits by a temperature does to the gate;
# - how entropy measures a gate's indecision;
# - a dashboard that moves the logits and the temperature by hand.

# %% [markdown]
# The setup cell seeds everything and fixes PyTorch to one thread.

# %%
# NBVAL_IGNORE_OUTPUT
from dmoe_edu import course

print(course.setup(seed=0))

# %% [markdown]
# One knob sets the sizes.
# `"notebook"` gives the trained ReLU gate 8 hidden units;
# `"paper"` gives it the 50 of the paper's MNIST gates
# (the data stay the 2-D toy points of notebook 1, which we can draw).
# `RESTARTS` is how many times each gate is trained from a new start;
# the next sections explain why.

# %%
SCALE = "notebook"  # "paper": 50 hidden units in the ReLU gate

GATE_HIDDEN = {"notebook": 8, "paper": 50}[SCALE]
RESTARTS = 5  # training runs per gate; the best one is kept
STEPS = 500  # Adam steps per run
print(f"gate hidden units {GATE_HIDDEN}, {RESTARTS} runs of {STEPS} steps")

# %% [markdown]
# ## Two gates
#
# Both gates read an input `x` of width `D` and give `E` logits,
# one score per expert; the softmax comes afterwards.
#
# - The **linear gate**, `dmoe_edu.gating.LinearGate`, is one linear map:
#   `gate_logits = W x + b`, with `W` of shape `(E, D)`.
#   It has `D * E + E` parameters.
# - The **ReLU gate** of the paper, `dmoe_edu.gating.ReLUGate`,
#   puts a hidden layer of ReLU units in between, `gate_hidden` of them
#   (the name of this width in `dmoe_edu`, e.g. `LayerSpec.gate_hidden`):
#   `gate_logits = W2 max(0, W1 x + b1) + b2`,
#   with `W1` of shape `(gate_hidden, D)` and `W2` of shape
#   `(E, gate_hidden)`.
#   It has `D * gate_hidden + gate_hidden + gate_hidden * E + E`
#   parameters.
#
# We count both for our toy plane and for the two gates of the paper's
# 4x100-4x100 model on jittered MNIST
# (layer 1 reads a 36x36 image, layer 2 the 100 units of layer 1).

# %%
from dmoe_edu.gating import LinearGate, ReLUGate


def num_params(module):
    return sum(p.numel() for p in module.parameters())


sizes = {"toy plane": (2, 2), "paper, layer 1": (1296, 4),
         "paper, layer 2": (100, 4)}
counts = {}
for name, (D, E) in sizes.items():
    linear, relu = LinearGate(D, E), ReLUGate(D, E, hidden=50)
    counts[name] = (num_params(linear), num_params(relu))
    print(f"{name:15} D={D:5} E={E}: linear {counts[name][0]:6,}"
          f"   ReLU (gate_hidden=50) {counts[name][1]:6,}")

# %% [markdown]
# On MNIST's layer 1 the ReLU gate is about 12 times the size of the linear
# one, because `D * gate_hidden` dominates: the hidden layer reads every
# pixel.
# The check recomputes every count from the formulas above.

# %%
for name, (D, E) in sizes.items():
    gate_hidden = 50
    assert counts[name] == (
        D * E + E, D * gate_hidden + gate_hidden + gate_hidden * E + E), name
assert num_params(ReLUGate(2, 2, hidden=GATE_HIDDEN)) == (
    2 * GATE_HIDDEN + GATE_HIDDEN + GATE_HIDDEN * 2 + 2)

# %% [markdown]
# ## What a linear gate can carve
#
# The softmax never changes which logit is largest,
# so the expert a gate trusts most at `x` is the argmax of its logits.
# With two experts, expert 1 wins where `l_1(x) - l_0(x) > 0`,
# and for a linear gate that difference is itself linear in `x`:
# `(w_1 - w_0) . x + (b_1 - b_0)`.
# So the border is a straight line.
# With more experts, expert `e` wins where its logit beats each of the
# others: an intersection of half-planes, which is always **convex**
# (the segment between two of its points stays inside it).
#
# Here is a freshly initialised linear gate with 4 experts,
# drawn with the regions figure of notebook 1.
# Its weights are scaled up so that the borders fall inside the square,
# and the seed, 34, is one at which all four experts win somewhere.
# The same seed then initialises a ReLU gate.

# %%
# NBVAL_IGNORE_OUTPUT
import torch

from dmoe_edu import data, ops, viz

grid = data.plane_grid(bound=2.0)  # points: (G * G, 2)
torch.manual_seed(34)
linear_gate = LinearGate(in_dim=2, num_experts=4)
with torch.no_grad():
    linear_gate.proj.weight.mul_(3.0)
    linear_logits = linear_gate(grid.points)  # (G*G, E)
viz.gate_regions_figure(grid.xs, grid.ys,
                        grid.to_grid(ops.softmax_gate(linear_logits)),
                        title="A random linear gate, E = 4: convex regions")

# %% [markdown]
# Every border is straight and every region is a convex polygon
# (cut off by the edge of the square).
# The ReLU gate's hidden units each bend the logits along one line,
# where their ReLU switches on;
# the logits are piecewise linear, and a region can be any shape made of
# pieces, concave, even in several parts.

# %%
# NBVAL_IGNORE_OUTPUT
torch.manual_seed(34)
relu_gate = ReLUGate(in_dim=2, num_experts=4, hidden=8)
with torch.no_grad():
    relu_gate.out.weight.mul_(6.0)
    relu_logits = relu_gate(grid.points)  # (G*G, E)
viz.gate_regions_figure(grid.xs, grid.ys,
                        grid.to_grid(ops.softmax_gate(relu_logits)),
                        title="A random ReLU gate, E = 4, 8 hidden units")

# %% [markdown]
# The borders now bend where a hidden unit switches on or off:
# one expert wins in two separate pieces,
# another's region wraps around a third one's island.
# The check makes the difference exact.
# A linear gate's logits are affine: at the midpoint of two points they are
# the mean of the logits at the two points.
# The ReLU gate's are not, for points on two sides of a bend.

# %%
first, second = grid.points[:1800], grid.points.flip(0)[:1800]
middle = (first + second) / 2
with torch.no_grad():
    gap_linear = (linear_gate(middle)
                  - (linear_gate(first) + linear_gate(second)) / 2)
    gap_relu = relu_gate(middle) - (relu_gate(first) + relu_gate(second)) / 2
assert gap_linear.abs().max() < 1e-4
assert gap_relu.abs().max() > 0.1

# %% [markdown]
# ## Training both gates on a stripe
#
# The toy data of notebook 1 has a second layout, `"stripe"`.
# The middle stripe `|x0| < 1` follows one rule (class 1 below `x1 = 0`)
# and the two outer strips the opposite one (class 1 above it).
# Two linear experts can learn the two rules,
# but the gate must send both outer strips to one expert
# and the stripe between them to the other:
# no straight line does that.
# Two ReLU units, one switching on at `x0 = 1` and one at `x0 = -1`,
# are enough.
# We also draw a separate test set, to measure on points not trained on.

# %%
plane = data.two_rule_plane(num_points=600, layout="stripe", seed=0)
test = data.two_rule_plane(num_points=2000, layout="stripe", seed=1)
shown = slice(0, 600)  # at most 600 points on a figure
print("train", tuple(plane.inputs.shape), "test", tuple(test.inputs.shape))
print("train points in the stripe:", int(plane.regions.sum()))

# %% [markdown]
# Training a mixture is not a convex problem.
# From some starts the experts settle on compromise rules
# and the gate on a split that only partly matches the regions,
# and no small step improves on it.
# The usual remedy is to train from several starts
# and keep the run with the lowest *training* loss
# (choosing on the test set would make the test meaningless).

# %%
from dmoe_edu.classic import ClassicMoE
from dmoe_edu.train import fit_full_batch


def best_of_restarts(gate_hidden):
    """Train RESTARTS mixtures from seeds 0, 1, ...; keep the best."""
    runs = []
    for seed in range(RESTARTS):
        torch.manual_seed(seed)
        model = ClassicMoE(2, 2, num_experts=2, gate_hidden=gate_hidden)
        losses = fit_full_batch(model, plane.inputs, plane.labels,
                                steps=STEPS)
        runs.append((losses[-1], seed, model))
    return min(runs, key=lambda run: run[0]), [run[0] for run in runs]


# %% [markdown]
# Now both gates, with the same linear experts:
# `gate_hidden=None` gives the linear gate,
# `gate_hidden=GATE_HIDDEN` the ReLU gate.

# %%
# NBVAL_IGNORE_OUTPUT
@torch.no_grad()
def accuracy(model, points):
    return (model(points.inputs).logits.argmax(1) == points.labels
            ).float().mean().item()


results = {}
for name, hidden in (("linear", None), ("ReLU", GATE_HIDDEN)):
    (loss, seed, model), all_losses = best_of_restarts(hidden)
    results[name] = model
    print(f"{name:6} gate: final losses {[round(v, 3) for v in all_losses]}"
          f"; best seed {seed}, test accuracy {accuracy(model, test):.1%}")

# %% [markdown]
# The ReLU gate classifies nearly every test point;
# the linear gate cannot,
# whichever of its runs we keep.
# Some ReLU runs end with a much higher loss than the best:
# those are the stuck ones.

# %%
linear_acc = accuracy(results["linear"], test)
relu_acc = accuracy(results["ReLU"], test)
assert relu_acc > 0.95, relu_acc
assert linear_acc < 0.9, linear_acc

# %% [markdown]
# The linear gate's regions show why.

# %%
# NBVAL_IGNORE_OUTPUT
def regions_figure(model, title):
    with torch.no_grad():
        gates = model(grid.points).gate_probs[0]  # (G*G, E)
        scores = model.expert_logits(grid.points)  # (G*G, E, C)
    margins = (scores[:, :, 1] - scores[:, :, 0]).T  # (E, G*G)
    return viz.gate_regions_figure(
        grid.xs, grid.ys, grid.to_grid(gates),  # (G, G, E)
        points=plane.inputs[shown], labels=plane.labels[shown],
        expert_scores=margins.reshape(2, len(grid.ys), len(grid.xs)),
        title=title)


regions_figure(results["linear"], "The linear gate on the stripe")

# %% [markdown]
# One straight border.
# Whichever way it runs, it cannot put both outer strips on one side and
# the stripe on the other,
# so a large part of the plane goes to the expert with the wrong rule.
# Now the ReLU gate.

# %%
# NBVAL_IGNORE_OUTPUT
regions_figure(results["ReLU"], f"The ReLU gate on the stripe "
                                f"({GATE_HIDDEN} hidden units)")

# %% [markdown]
# Two borders, close to `x0 = -1` and `x0 = 1`:
# the outer strips share one expert, the stripe has the other.
# Each expert's dashed line is close to `x1 = 0`:
# the two experts learnt the same line with opposite classes.
#
# The check compares both trained gates with the true regions on the grid
# (allowing the experts to be swapped).

# %%
def region_agreement(model):
    with torch.no_grad():
        chosen = model(grid.points).gate_probs[0].argmax(1)  # (G*G,)
    agree = (chosen == plane.region_of(grid.points)).float().mean().item()
    return max(agree, 1 - agree)


assert region_agreement(results["ReLU"]) > 0.9
assert region_agreement(results["linear"]) < 0.85

# %% [markdown]
# ## Temperature
#
# A gate's softmax can be given a **temperature** `T`:
# divide the logits by `T` before the softmax,
# `gate_probs = softmax(gate_logits / T)`.
#
# - `T = 1` is the plain gate (the paper always uses it).
# - `T > 1` shrinks the gaps between logits: the gate moves towards the
#   uniform `1 / E`.
# - `T < 1` widens them: the gate moves towards putting everything on the
#   largest logit (the argmax, reached as `T -> 0`).
# - The order of the experts never changes.
#
# By hand, on one row of four logits:

# %%
gate_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])  # (1, E)
temperatures = [0.25, 0.5, 1.0, 2.0, 4.0, 100.0]
by_hand = {}
for T in temperatures:
    by_hand[T] = torch.softmax(gate_logits / T, dim=1)  # (1, E)
    row = "  ".join(f"{p:.4f}" for p in by_hand[T][0].tolist())
    print(f"T = {T:6}:  {row}")

# %% [markdown]
# At `T = 0.25` the gate is almost one-hot; at `T = 100` almost uniform.
# `dmoe_edu.gating.tempered_gate` is the library's version
# (it refuses `T <= 0`, where there is no softmax to take).

# %%
from dmoe_edu.gating import gate_entropy, tempered_gate

for T in temperatures:
    torch.testing.assert_close(tempered_gate(gate_logits, T), by_hand[T])
    assert by_hand[T].argmax() == gate_logits.argmax()
assert by_hand[0.25].max() > 0.98
assert by_hand[100.0].max() - by_hand[100.0].min() < 0.04

# %% [markdown]
# ## Entropy
#
# How undecided is a gate?
# The **entropy** of its distribution,
# `H(p) = -sum_e p_e log p_e` (in nats, with the natural log),
# is 0 when the gate is sure of one expert,
# and largest, `log E`, when it trusts all `E` equally.
# An expert with `p_e = 0` adds nothing (`0 log 0` counts as 0).
# Written by hand, and applied to the rows above:

# %%
def entropy_by_hand(gate_probs):
    terms = gate_probs * gate_probs.log()  # (B, E), nan where p = 0
    terms = torch.where(gate_probs > 0, terms, torch.zeros_like(terms))
    return -terms.sum(dim=1)  # (B,)


for T in temperatures:
    print(f"T = {T:6}: entropy {entropy_by_hand(by_hand[T]).item():.4f}")

# %% [markdown]
# The entropy rises with the temperature towards `log 4 = 1.3863`.
# `dmoe_edu.gating.gate_entropy` must agree,
# including on a one-hot row and a uniform one.

# %%
import math

rows = torch.cat([by_hand[T] for T in temperatures])  # (6, E)
torch.testing.assert_close(gate_entropy(rows), entropy_by_hand(rows))
assert (entropy_by_hand(rows).diff() > 0).all()
one_hot, uniform = torch.tensor([[0.0, 1.0, 0.0]]), torch.full((1, 4), 0.25)
assert gate_entropy(one_hot).item() == 0.0
assert abs(gate_entropy(uniform).item() - math.log(4)) < 1e-6

# %% [markdown]
# A trained gate is sure of itself almost everywhere.
# Its entropy, averaged over the grid, is small,
# and it is high only near the borders,
# where the gate hands over from one expert to the other.

# %%
# NBVAL_IGNORE_OUTPUT
with torch.no_grad():
    grid_gates = results["ReLU"](grid.points).gate_probs[0]  # (G*G, E)
grid_entropy = gate_entropy(grid_gates)  # (G*G,)
print(f"mean entropy over the grid {grid_entropy.mean():.3f} nats "
      f"(at most log 2 = {math.log(2):.3f})")
print(f"share of the grid above half the maximum: "
      f"{(grid_entropy > math.log(2) / 2).float().mean():.1%}")

# %% [markdown]
# The check keeps a wide tolerance: the exact numbers depend on the run.

# %%
assert (grid_entropy >= 0).all()
assert (grid_entropy <= math.log(2) + 1e-6).all()
assert grid_entropy.mean() < 0.5 * math.log(2)

# %% [markdown]
# ## The gate explorer
#
# `dmoe_edu.widgets.gate_explorer` puts a slider on each of the four logits
# and one on the temperature,
# and redraws the gate (bars, with the uniform `1 / E` dashed)
# and its entropy (against `log E`) whenever a slider moves.
# Try it: raise one logit and watch the entropy fall;
# then raise the temperature and watch it come back.
# The temperature slider goes down to 0, where the softmax does not exist:
# the dashboard then shows the error above the figure
# and keeps the last good picture.

# %%
# NBVAL_IGNORE_OUTPUT
from dmoe_edu import widgets

board = widgets.gate_explorer(gate_logits=(2.0, 1.0, 0.0, -1.0))
board

# %% [markdown]
# The same figure, for readers of the static book
# (who see the dashboard's first state: the logits above, `T = 1`).

# %%
# NBVAL_IGNORE_OUTPUT
first_state = board.static_figure()  # a plain go.Figure
first_state

# %% [markdown]
# The check drives the dashboard from Python, as a student would with the
# mouse, and compares its bars with a softmax worked out here.
# At `T = 0` the dashboard also logs its error,
# which is the warning printed under the cell in a running notebook.

# %%
board.controls["temperature"].value = 2.0
board.controls["logit_3"].value = 3.0
expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0, 3.0]) / 2.0, dim=0)
bars = board.static_figure().data[0].y
torch.testing.assert_close(torch.tensor(bars, dtype=torch.float32), expected)
board.controls["temperature"].value = 0.0
assert isinstance(board.last_error, ValueError)
assert "temperature" in board.message.value
board.controls["temperature"].value = 1.0
assert board.last_error is None and board.message.value == ""

# %% [markdown]
# ## Summary
#
# - A linear gate scores the experts with one linear map;
#   the paper's gate adds a hidden layer of ReLU units,
#   at a cost of about `D * gate_hidden` parameters.
# - The expert a gate trusts most is the argmax of its logits.
#   For a linear gate every expert's region is convex,
#   and with two experts it is a half-plane;
#   the ReLU gate's regions bend wherever a hidden unit switches.
# - On the stripe, two linear experts with a linear gate stay far from
#   perfect; with a ReLU gate they classify nearly every point.
# - Mixture training can get stuck in a partial split:
#   train from several starts and keep the lowest training loss.
# - Dividing the logits by a temperature `T` flattens (`T > 1`) or sharpens
#   (`T < 1`) the gate without reordering the experts.
# - The entropy of the gate, from 0 (sure) to `log E` (undecided),
#   measures how sure it is; a trained gate is unsure only near its
#   borders.
#
# Notebook 3 shows what goes wrong when every input's gate becomes sure of
# the *same* expert, and the paper's cure.

# %% [markdown]
# ## Exercises
#
# 1. Give the ReLU gate 1, 2 and then 4 hidden units: in the setup cell,
#    change the `"notebook"` entry of the dict that sets `GATE_HIDDEN`
#    (`{"notebook": 8, ...}`) and rerun the notebook.
#    What is the smallest hidden layer that carves the stripe?
#    Can you explain the answer from where each ReLU switches on?
# 2. Set `RESTARTS = 1` and try a few seeds in `best_of_restarts`
#    (change `range(RESTARTS)` to `range(s, s + 1)`).
#    How often does a single run get stuck?
# 3. Give the linear gate three experts (`num_experts=3` in
#    `best_of_restarts`). Three convex regions can be left strip, stripe,
#    right strip: does the linear gate now solve the stripe?
# 4. In the explorer, set all four logits equal. What is the entropy?
#    Then raise one logit in steps of 1 and note the entropy each time.
# 5. In the explorer, note the gate for some logits at `T = 1`.
#    Now double every logit and set `T = 2`. What do you see, and why?
# 6. Set `SCALE = "paper"` (50 hidden units, as in the paper's MNIST gates).
#    Does the wider gate get stuck more or less often than the narrow one?

# %% [markdown]
# ## References
#
# 1. D. Eigen, M. Ranzato, I. Sutskever,
#    "Learning Factored Representations in a Deep Mixture of Experts",
#    arXiv:1312.4314, 2013.
# 2. R. A. Jacobs, M. I. Jordan, S. J. Nowlan, G. E. Hinton,
#    "Adaptive Mixtures of Local Experts",
#    Neural Computation 3(1), 79-87, 1991.
# 3. G. Hinton, O. Vinyals, J. Dean,
#    "Distilling the Knowledge in a Neural Network", arXiv:1503.02531, 2015
#    (the softmax temperature).
# 4. C. E. Shannon, "A Mathematical Theory of Communication",
#    Bell System Technical Journal 27, 1948 (entropy).
