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
# # 7. Inside the kernels
#
# Every mixture layer of this course does two small things many times:
# it turns gate logits into gate probabilities (`softmax_gate`, with the
# balancing rule's mask), and it mixes the experts' outputs with those
# probabilities (`combine`).
# Until now they ran on plain PyTorch, the `reference` backend.
# The package also has them as CUDA kernels: small functions in CUDA C++
# that a GPU runs on thousands of threads at once.
# This notebook opens those kernels and reads them line by line.
# You do not need a GPU: the same source files compile for your CPU, where
# the threads run one after another.
#
# **What you will learn**
#
# - where the kernels live and how a launch is described: a grid of blocks
#   of threads;
# - the thread mapping of each kernel: which thread computes which output
#   element, and how it finds its row in memory;
# - the grid-stride loop, which lets any grid cover any amount of work;
# - to check a kernel against the reference backend and against a float64
#   loop written from scratch;
# - to write, compile and launch a kernel of your own;
# - why these kernels never let threads share data (no shared memory, no
#   atomics), and what the CPU emulation cannot show you;
# - how fast the emulation is at the paper's sizes, and what a GPU changes.
#
# Notation: `B` batch, `D` input width, `H` expert width, `E` experts.
# A kernel's threads are grouped in *blocks*; the blocks form the *grid*.

# %%
# NBVAL_IGNORE_OUTPUT
from dmoe_edu import course

print(course.setup(seed=0))

# %% [markdown]
# The imports of the whole notebook, in one place.
# `kernels` is the Python side of the CUDA code: it finds the `.cu` files,
# reads their signatures and checks every launch.

# %%
import math

import numpy as np
import torch
from torch.utils import benchmark

from dmoe_edu import ops, paper, viz
from dmoe_edu.dmoe import DeepMoE
from dmoe_edu.ops import cupy_backend, emulate, kernels

# %% [markdown]
# Where the kernels run.
# With an NVIDIA GPU and CuPy, the `cupy` backend compiles the kernels with
# NVRTC and launches them on the GPU, and tensors live on `cuda`.
# Without one (as on the machine that wrote this page), the `emulate`
# backend compiles the very same files with the system's C++ compiler and
# runs every thread in turn on the CPU.
# The rest of the notebook uses `KERNELS`, `DEVICE` and `RawModule` and
# works the same either way.

# %%
# NBVAL_IGNORE_OUTPUT
ON_GPU = ops.backend_status()["cupy"] is None
KERNELS = "cupy" if ON_GPU else "emulate"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
RawModule = cupy_backend.RawModule if ON_GPU else emulate.RawModule
for backend, reason in ops.backend_status().items():
    print(f"{backend:9s} {'can run here' if reason is None else reason}")
print(f"this notebook runs the kernels on {DEVICE} through {KERNELS!r}")

# %% [markdown]
# One knob scales the timing section at the end.
# The paper's layers are small (batch 100, four experts of 100 units), so
# the default `"notebook"` already times them at their real size: the
# ops of the 4x100-4x100 model of Table 1 and one training step of it.
# `"paper"` times every model of Table 1 and measures each figure for
# longer (about half a minute more here).

# %%
SCALE = "notebook"  # "paper": every model of Table 1, longer measurements
TIMED_ROWS = {"notebook": [1], "paper": sorted(paper.TABLE1)}[SCALE]
MIN_RUN_TIME = {"notebook": 0.1, "paper": 0.5}[SCALE]  # seconds a figure
BATCH = 100  # the batch size of this project's MNIST training
print(f"{SCALE}: Table 1 rows {TIMED_ROWS}, {MIN_RUN_TIME} s a measurement")

# %% [markdown]
# ## Where the kernels are
#
# The kernels are two files of CUDA C in the folder `kernels/`:
# `gating.cu` holds the softmax over experts, `combine.cu` the mixing.
# Python launches only the functions marked `extern "C" __global__`, the
# *entry points*.
# `kernels.package_kernels` reads their signatures from the files; every
# launch is checked against them before it reaches the hardware.
# Each op has a forward and a backward kernel, in float32 (`_f32`) and
# float64 (`_f64`).

# %%
print("folder:", kernels.kernel_dir().name)
for file in kernels.KERNEL_FILES:
    for name, params in kernels.package_kernels(file).items():
        args = ", ".join(param.describe() for param in params)
        print(f"{file}.cu: {name}({args})")

# %% [markdown]
# Every file opens with a comment that says what it computes, how threads
# map to outputs, the memory layout it expects and its limits.
# `kernels.kernel_header` cuts one section out of it, straight from the
# file, so what you read here is what the compiler reads.
# Here is what `gating.cu` computes:

# %%
print(kernels.kernel_header("gating", "What it computes"))

# %% [markdown]
# That is the stable softmax you met in the first notebooks, with the
# balancing rule's mask: a masked expert gets exactly 0 and takes no part in
# the row's maximum or sum.
#
# The check: both files are found, each entry point has a float32 and a
# float64 twin, and the printed header is the file's own text.

# %%
gating_kernels = kernels.package_kernels("gating")
assert set(gating_kernels) == {f"softmax_gate_{step}_{kind}"
                               for step in ("fwd", "bwd")
                               for kind in ("f32", "f64")}
assert len(kernels.package_kernels("combine")) == 6
header = kernels.kernel_header("gating", "What it computes")
assert header in kernels.kernel_source("gating")

# %% [markdown]
# ## The gate's softmax, one thread per element
#
# A kernel is written from the point of view of *one* thread.
# The GPU starts a grid of `gridDim.x` blocks of `blockDim.x` threads each;
# every thread runs the same function and tells itself apart by its
# numbers `blockIdx.x` (its block) and `threadIdx.x` (its place in the
# block).
# Here is the body that both softmax entry points call, a C++ template
# over the float type `T`:

# %%
print(kernels.kernel_function("gating", "softmax_gate_forward"))

# %% [markdown]
# Read it in four steps.
#
# - **The layout.** `gate_logits` is a `(B, E)` tensor stored row-major:
#   element `(b, e)` sits at the flat index `i = b * E + e`.
#   The thread recovers its row and expert with one integer division,
#   `b = i / E`, and `e = i - b * E`.
# - **The thread mapping.** One thread per output element `(b, e)`.
#   Its first element is its global number,
#   `blockIdx.x * blockDim.x + threadIdx.x`.
# - **The grid-stride loop.** The `for` loop then jumps by the number of
#   threads in the whole grid, `gridDim.x * blockDim.x`.
#   A grid with one thread per element runs the loop body once per thread;
#   a smaller grid runs it several times.
#   The section on small grids tries both.
# - **The work.** Each thread reads its whole row twice, once for the
#   largest allowed logit and once for the sum of exponentials, then writes
#   its one probability.
#   The four threads of a row thus repeat the same max and sum.
#   That waste buys independence: no thread needs another's result.
#
# To see that this is all there is, we write the kernel again as plain
# Python in float64: every thread of a grid of `num_threads`, one after
# another, each running its grid-stride loop.

# %%
def softmax_as_threads(gate_logits, mask, num_threads):
    """The forward kernel, thread after thread, in float64 Python."""
    B, E = gate_logits.shape
    gate_probs = torch.zeros(B, E, dtype=torch.float64)
    for thread in range(num_threads):
        for i in range(thread, B * E, num_threads):  # grid-stride loop
            b, e = divmod(i, E)
            if not mask[b, e]:
                continue  # a masked expert stays exactly 0
            allowed = [float(gate_logits[b, j])
                       for j in range(E) if mask[b, j]]
            row_max = max(allowed)
            row_sum = sum(math.exp(logit - row_max) for logit in allowed)
            gate_probs[b, e] = math.exp(gate_logits[b, e] - row_max) / row_sum
    return gate_probs

# %% [markdown]
# Three rows of four experts to try it on.
# Row 0 masks expert 1, the one with the row's largest logit; row 1 has
# four equal logits; row 2 masks experts 1 and 2 and keeps logits of 1000
# and 1001, which would overflow `exp` without the subtraction of the
# maximum (`exp(1001)` is infinite even in float64).

# %%
hand_logits = torch.tensor([[1.0, 2.0, 0.5, -1.0],
                            [3.0, 3.0, 3.0, 3.0],
                            [1000.0, 0.0, -2.0, 1001.0]],
                           dtype=torch.float64)  # (B, E)
hand_mask = torch.tensor([[True, False, True, True],
                          [True, True, True, True],
                          [True, False, False, True]])  # (B, E)
loop_probs = softmax_as_threads(hand_logits, hand_mask, num_threads=5)
print(loop_probs.numpy().round(4))

# %% [markdown]
# Now the real kernel, through the library's `ops.softmax_gate` on the
# kernel backend, with the tensors on `DEVICE`.
# `ops.use_backend` switches the backend for one block of code.

# %%
with ops.use_backend(KERNELS):
    kernel_probs = ops.softmax_gate(hand_logits.to(DEVICE),
                                    hand_mask.to(DEVICE))  # (B, E)
with ops.use_backend("reference"):
    reference_probs = ops.softmax_gate(hand_logits, hand_mask)  # (B, E)
print(kernel_probs.cpu().numpy().round(4))

# %% [markdown]
# The same table.
# In row 0 the masked expert's logit of 2 took no part in the maximum.
# Row 1 is the uniform gate 1/4.
# Row 2 came out as if its logits were -1 and 0, in the ratio
# `exp(-1) : 1`: the huge logits did no harm.
#
# The check: the kernel agrees with our float64 loop and with the reference
# backend, in float64 and in float32, and the masked entries are exactly 0.

# %%
torch.testing.assert_close(kernel_probs.cpu(), loop_probs,
                           rtol=1e-12, atol=1e-12)
torch.testing.assert_close(kernel_probs.cpu(), reference_probs,
                           rtol=1e-12, atol=1e-12)
with ops.use_backend(KERNELS):
    probs_f32 = ops.softmax_gate(hand_logits.float().to(DEVICE),
                                 hand_mask.to(DEVICE))
torch.testing.assert_close(probs_f32.cpu().double(), loop_probs,
                           rtol=1e-6, atol=1e-6)
assert (kernel_probs.cpu()[~hand_mask] == 0).all()

# %% [markdown]
# ## The softmax's backward
#
# Training needs the gradient of the loss with respect to the logits.
# If `p` is a row of probabilities and `g` the gradient arriving for them,
# the softmax's chain rule gives, for expert `e`,
#
# $$\frac{\partial L}{\partial z_e} = p_e \Big(g_e - \sum_j g_j p_j\Big).$$
#
# The backward kernel computes exactly that, one thread per `(b, e)`, with
# the same grid-stride loop.
# Each thread computes the row's dot product `sum_j g_j p_j` itself.
# A masked expert has `p_e = 0`, so its gradient is 0 with no special case.

# %%
print(kernels.kernel_function("gating", "softmax_gate_backward"))

# %% [markdown]
# Again in float64 Python, thread after thread:

# %%
def softmax_backward_as_threads(gate_probs, grad_probs, num_threads):
    """The backward kernel, thread after thread, in float64 Python."""
    B, E = gate_probs.shape
    grad_logits = torch.zeros(B, E, dtype=torch.float64)
    for thread in range(num_threads):
        for i in range(thread, B * E, num_threads):  # grid-stride loop
            b, e = divmod(i, E)
            dot = sum(float(grad_probs[b, j] * gate_probs[b, j])
                      for j in range(E))
            grad_logits[b, e] = gate_probs[b, e] * (grad_probs[b, e] - dot)
    return grad_logits

# %% [markdown]
# PyTorch's autograd calls the backward kernel when we ask for the gradient
# of the kernel's output.
# We send a fixed gradient `grad_probs` back through both backends.

# %%
grad_probs = torch.tensor([[1.0, -2.0, 0.5, 3.0],
                           [0.0, 1.0, 2.0, 3.0],
                           [-1.0, 4.0, 2.0, -1.0]],
                          dtype=torch.float64)  # (B, E)
grads = {}
for backend in (KERNELS, "reference"):
    logits = hand_logits.to(DEVICE, copy=True).requires_grad_(True)
    with ops.use_backend(backend):
        probs = ops.softmax_gate(logits, hand_mask.to(DEVICE))
        probs.backward(grad_probs.to(DEVICE))
    grads[backend] = logits.grad.cpu()  # (B, E)
print(grads[KERNELS].numpy().round(4))

# %% [markdown]
# Each row of the gradient sums to 0: adding the same number to every logit
# of a row does not change its softmax.
# The masked experts get exactly 0; a `-0.` is IEEE's negative zero, what
# `0 * (a negative number)` gives, and it equals 0.
#
# The check: the kernel's gradient equals our loop's and the reference
# backend's.

# %%
loop_grad = softmax_backward_as_threads(loop_probs, grad_probs, 7)
torch.testing.assert_close(grads[KERNELS], loop_grad,
                           rtol=1e-12, atol=1e-12)
torch.testing.assert_close(grads[KERNELS], grads["reference"],
                           rtol=1e-12, atol=1e-12)
torch.testing.assert_close(grads[KERNELS].sum(dim=1),
                           torch.zeros(3, dtype=torch.float64))
assert (grads[KERNELS][~hand_mask] == 0).all()

# %% [markdown]
# ## The combine, and how threads read memory
#
# The combine computes `mixed[b, h] = sum_e gate_probs[b, e] *
# expert_out[b, e, h]`.
# Its file has three kernels, each with its own thread mapping:

# %%
print(kernels.kernel_header("combine", "Thread mapping"))

# %% [markdown]
# The forward kernel, one thread per output `(b, h)`:

# %%
print(kernels.kernel_function("combine", "combine_forward"))

# %% [markdown]
# `expert_out` is a `(B, E, H)` tensor, row-major: element `(b, e, h)`
# sits at `(b * E + e) * H + h`.
# Why give a thread an `(b, h)` pair and loop over `e`, rather than the
# other way round?
# Because of how a GPU reads memory.
# It runs threads in groups of 32, a *warp*, in lockstep; when the 32
# threads of a warp read 32 neighbouring addresses, one wide memory
# transaction serves them all (the reads are *coalesced*).
# Neighbouring threads of `combine_fwd` have neighbouring `h`, so at each
# step of their loop they read neighbouring addresses.
#
# `combine_bwd_gates` is the opposite case: one thread per `(b, e)`, each
# summing over the `H` features of its own row, so neighbouring threads
# read addresses `H` apart.
# The index arithmetic of both kernels, for the paper's `E = 4`,
# `H = 100`, shows the addresses the first threads read at the first step
# of their loops:

# %%
E, H = 4, 100
print("thread   combine_fwd reads   combine_bwd_gates reads")
for i in range(6):
    b, h = divmod(i, H)  # combine_fwd: i = b * H + h, loop starts at e = 0
    forward_address = (b * E + 0) * H + h
    gates_address = i * H + 0  # combine_bwd_gates: i = b * E + e, h = 0
    print(f"{i:6d}   {forward_address:17d}   {gates_address:23d}")

# %% [markdown]
# The forward's threads read 0, 1, 2, ...: one transaction for a warp.
# The backward's read 0, 100, 200, ...: a transaction per thread.
# The file's "Limits" says so, and why the kernel stays that way: splitting
# each sum over several threads would need them to cooperate, which these
# kernels never do (more on that below).
#
# Now the check against a loop.
# The combine from scratch is three nested loops in float64:

# %%
def combine_as_loops(gate_probs, expert_out):
    """mixed[b, h] = sum_e gate_probs[b, e] * expert_out[b, e, h]."""
    B, E, H = expert_out.shape
    mixed = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            mixed[b, h] = sum(float(gate_probs[b, e] * expert_out[b, e, h])
                              for e in range(E))
    return mixed

# %% [markdown]
# Odd sizes catch indexing mistakes that round sizes hide: `B = 5`,
# `E = 3`, `H = 7`.
# Both inputs require gradients, so the backward kernels run too; the
# gradient arriving at `mixed` is random.

# %%
gen = torch.Generator().manual_seed(0)
small_gates = torch.rand(5, 3, generator=gen, dtype=torch.float64)  # (B, E)
small_out = torch.randn(5, 3, 7, generator=gen,
                        dtype=torch.float64)  # (B, E, H)
grad_mixed = torch.randn(5, 7, generator=gen, dtype=torch.float64)  # (B, H)
results = {}
for backend in (KERNELS, "reference"):
    gates = small_gates.to(DEVICE, copy=True).requires_grad_(True)
    outs = small_out.to(DEVICE, copy=True).requires_grad_(True)
    with ops.use_backend(backend):
        mixed = ops.combine(gates, outs)  # (B, H)
        mixed.backward(grad_mixed.to(DEVICE))
    results[backend] = [t.detach().cpu() for t in (mixed, gates.grad,
                                                   outs.grad)]

# %% [markdown]
# The check: forward and both gradients agree with the reference backend,
# and with the loop and the two closed forms in the file's header:
# `grad_expert[b, e, h] = gate_probs[b, e] * grad_mixed[b, h]` and
# `grad_gates[b, e] = sum_h expert_out[b, e, h] * grad_mixed[b, h]`.

# %%
mixed, grad_gates, grad_expert = results[KERNELS]
assert mixed.shape == (5, 7) and grad_expert.shape == (5, 3, 7)
exact = dict(rtol=1e-12, atol=1e-12)
torch.testing.assert_close(mixed, combine_as_loops(small_gates, small_out),
                           **exact)
torch.testing.assert_close(grad_expert,
                           small_gates[:, :, None] * grad_mixed[:, None, :],
                           **exact)
torch.testing.assert_close(grad_gates, (small_out * grad_mixed[:, None, :])
                           .sum(dim=2), **exact)
for got, want in zip(results[KERNELS], results["reference"]):
    torch.testing.assert_close(got, want, **exact)

# %% [markdown]
# ## A kernel of your own
#
# The kernels of the package are ordinary CUDA C, and you can write your
# own the same way.
# Here are two tiny ones.
# Each fills an array `owner` of `n` integers with the global number of
# the thread that wrote each element.
# `who_wrote` uses a grid-stride loop; `who_wrote_once` lets each thread
# write one element at most, its own index, and stops.
# (`long long` is a 64-bit integer: a `torch.int64` tensor.)

# %%
OWNER_CODE = r"""
extern "C" __global__ void who_wrote(long long* owner, long long n)
{
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = first; i < n; i += step) owner[i] = first;
}

extern "C" __global__ void who_wrote_once(long long* owner, long long n)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) owner[i] = i;
}
"""

# %% [markdown]
# `RawModule` compiles the source (for the CPU or, on a GPU, with NVRTC)
# and `get_function` gives one kernel, which shows the signature it read
# from the source.
# The first compile takes a second or two; the library is cached after.

# %%
owner_module = RawModule(OWNER_CODE, "owner.cu")
who_wrote = owner_module.get_function("who_wrote")
who_wrote_once = owner_module.get_function("who_wrote_once")
print(who_wrote)

# %% [markdown]
# A launch names the grid and the block, as tuples, then the arguments:
# `kernel((blocks,), (threads_per_block,), args)`.
# The work is a `(B, E) = (6, 4)` output: 24 elements.
# Three blocks of eight threads give exactly one thread per element.

# %%
B, E = 6, 4
owner = torch.full((B * E,), -1, dtype=torch.int64, device=DEVICE)
who_wrote((3,), (8,), (owner, np.int64(B * E)))
print(owner.view(B, E).cpu().numpy())  # (B, E)

# %% [markdown]
# Thread `t` wrote element `t`: with enough threads, the loop body ran once
# in each thread.
#
# Notice the `np.int64(B * E)`.
# A GPU kernel receives its arguments as raw bytes, and a Python `int` has
# no fixed width: is it 4 bytes or 8?
# CuPy picks a width without looking at the kernel's signature, and a
# kernel that expects another reads garbage; so the library refuses plain
# numbers and names the type it wants:

# %%
try:
    who_wrote((3,), (8,), (owner, B * E))
except TypeError as error:
    print(error)

# %% [markdown]
# It checks tensors too: dtype, device and contiguity (a kernel indexes
# memory as if the tensor were contiguous, whatever its strides say).
#
# The check: one thread per element, each writing its own number, and a
# float tensor refused for a `long long*`.

# %%
np.testing.assert_array_equal(owner.cpu().numpy(), np.arange(B * E))
try:
    who_wrote((3,), (8,), (owner.double(), np.int64(B * E)))
    raise AssertionError("a float64 tensor was accepted for long long*")
except TypeError as error:
    assert "torch.int64" in str(error)

# %% [markdown]
# ## A grid smaller than the work
#
# Now launch both kernels with a grid that is too small: two blocks of four
# threads, eight threads for 24 elements.
# Every element starts at -1, meaning "no thread wrote here".

# %%
small_grid = {}
for kernel in (who_wrote, who_wrote_once):
    owner = torch.full((B * E,), -1, dtype=torch.int64, device=DEVICE)
    kernel((2,), (4,), (owner, np.int64(B * E)))
    small_grid[kernel.name] = owner.view(B, E).cpu().numpy()  # (B, E)
viz.thread_map_figure(
    {"who_wrote (grid-stride loop)": small_grid["who_wrote"],
     "who_wrote_once (no loop)": small_grid["who_wrote_once"]},
    title="8 threads (2 blocks of 4) for a (6, 4) output")

# %% [markdown]
# On the left, the grid-stride loop: thread 0 wrote elements 0, 8 and 16,
# thread 1 wrote 1, 9 and 17, and so on.
# Each thread went round its loop three times, and every element was
# written once.
# On the right, without the loop, the eight threads wrote the first two
# rows and stopped: the rest was never computed.
# On a GPU the kernel would not complain; the output would simply hold
# whatever the memory held before.
# This is why every kernel of the package has the loop: the Python side
# caps the number of blocks (the `cupy` backend launches at most 32 per
# multiprocessor, enough to keep a GPU busy), and the results must stay
# right whatever the cap.
#
# The package's own kernels, under a capped grid: `kernels.launch_shape`
# sets the block size and the largest number of blocks, and `grid_for`
# says what a launch will use.

# %%
gen = torch.Generator().manual_seed(1)
many_logits = torch.randn(37, 5, generator=gen).to(DEVICE)  # (B, E)
many_mask = (torch.rand(37, 5, generator=gen) < 0.7).to(DEVICE)  # (B, E)
many_mask[:, 0] = True  # every row keeps at least one expert
with ops.use_backend(KERNELS):
    default_probs = ops.softmax_gate(many_logits, many_mask)
    with kernels.launch_shape(block=4, max_blocks=2):
        capped = kernels.grid_for(37 * 5, default_max_blocks=4096)
        capped_probs = ops.softmax_gate(many_logits, many_mask)
print("default (grid, block):", kernels.grid_for(37 * 5, 4096))
print("capped (grid, block):", capped)

# %% [markdown]
# The default launch gave each of the 185 elements its own thread; the
# capped one ran 8 threads, each going round its loop about 23 times.
#
# The check: the loop kernel covered everything, the other did not, and the
# package's softmax gave the *same bits* with 8 threads as with 256.
# Bitwise equality is not luck: each element is computed by one thread, in
# the same order of operations, whichever thread that is.

# %%
np.testing.assert_array_equal(small_grid["who_wrote"].ravel() % 8,
                              np.arange(B * E) % 8)
assert (small_grid["who_wrote_once"].ravel()[8:] == -1).all()
np.testing.assert_array_equal(small_grid["who_wrote_once"].ravel()[:8],
                              np.arange(8))
assert torch.equal(default_probs, capped_probs)

# %% [markdown]
# ## Why the threads never cooperate
#
# Look back at the softmax: four threads of a row each compute the same
# maximum and the same sum.
# A faster kernel for many experts would let the threads of a row split
# that work: each computes part of the sum, writes it to the block's fast
# *shared memory*, waits at a barrier (`__syncthreads()`) until all have
# written, then one adds the parts.
# Or threads could add into one memory cell with *atomic* operations.
# The package's kernels do neither, on purpose.
#
# - **Shared memory and barriers need threads that run at the same time.**
#   The emulation runs one thread to the end before starting the next, so
#   a barrier could never be passed.
# - **Atomic float sums are not deterministic.** The order in which
#   threads add differs from run to run, and float addition is not
#   associative, so the last bits would change between runs.
#   Without them the kernels give the same bits every time (checked below).
#
# The emulation's shim header, `kernels/cpu_shim.h`, enforces the rule: it
# turns `__shared__`, `__syncthreads()`, atomics and warp shuffles into
# compile errors that say why, rather than give answers a GPU would not.
#
# With the paper's `E = 4` experts, a softmax thread repeats eight reads
# that its three neighbours also make: a cooperative kernel would save
# little, and lose the simplicity.
# Here, for contrast, is a sum over each block written the cooperative way
# (for blocks of at most 256 threads):

# %%
BLOCK_SUM_CODE = r"""
extern "C" __global__ void block_sum(const float* x, float* sums, long long n)
{
    __shared__ float partial[256];
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    partial[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (unsigned int t = 0; t < blockDim.x; ++t) total += partial[t];
        sums[blockIdx.x] = total;
    }
}
"""

# %% [markdown]
# A GPU runs it (every thread of a block stores its value, all wait, thread
# 0 adds).
# The emulation refuses it, and the compiler's message says why:

# %%
# NBVAL_IGNORE_OUTPUT
try:
    emulate.RawModule(BLOCK_SUM_CODE, "block_sum.cu")
    compile_message = ""
except emulate.KernelCompileError as error:
    compile_message = str(error)
print("\n".join(line for line in compile_message.splitlines()
                if "static assertion failed" in line or "error:" in line))

# %% [markdown]
# What the emulation cannot refuse is a *race*: two threads that update the
# same memory cell with plain reads and writes.
# In `count_racy`, every thread adds 1 to `count[0]` once per element.
# `count[0] += 1` is three steps: read, add, write.
# On a GPU thousands of threads interleave those steps: two read the same
# old value, both write old + 1, and one update is lost.
# The emulation runs the threads one by one, so it never interleaves them
# and always counts right, which hides the bug.

# %%
# NBVAL_IGNORE_OUTPUT
RACY_CODE = r"""
extern "C" __global__ void count_racy(long long* count, long long n)
{
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < n; i += step)
        count[0] += 1;
}
"""
count_racy = RawModule(RACY_CODE, "racy.cu").get_function("count_racy")
count = torch.zeros(1, dtype=torch.int64, device=DEVICE)
count_racy((64,), (256,), (count, np.int64(1_000_000)))
print(f"counted {count.item():,} of 1,000,000 on {DEVICE} ({KERNELS})")

# %% [markdown]
# On the CPU the count is exact.
# On a GPU it usually comes out far below a million, and different on
# every run.
# (The GPU's cure, `atomicAdd`, is one of the features the emulation
# refuses.)
# So the emulation checks a kernel's arithmetic and indexing, but a kernel
# in which threads share data can pass it and still be wrong on a GPU.
# The package's rule (no thread reads what another writes, no sum split
# between threads) is what makes the emulation's answer the GPU's answer.
#
# The check: the emulation refused shared memory by name; the racy count
# is never above the truth, and exact when the threads ran one by one; the
# package's kernels give identical bits on a second run.

# %%
assert "shared memory" in compile_message
assert 0 < count.item() <= 1_000_000
if KERNELS == "emulate":
    assert count.item() == 1_000_000
with ops.use_backend(KERNELS):
    assert torch.equal(ops.softmax_gate(many_logits, many_mask),
                       default_probs)

# %% [markdown]
# ## How fast is the emulation?
#
# The emulation exists so that the kernels run and can be checked without a
# GPU, not for speed.
# How slow is it?
# We time the ops at the paper's sizes, with PyTorch's `benchmark.Timer`
# (the median over repeated runs, after a warm-up; on a GPU it also waits
# for the GPU to finish).
# The timing is done on the CPU for `reference` and `emulate`, and, when a
# GPU is present, on the GPU for `reference` and `cupy`.

# %%
def microseconds(fn):
    """Median time of one call of fn(), in microseconds."""
    timer = benchmark.Timer("fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=MIN_RUN_TIME).median * 1e6


TIMED = [("cpu", "reference"), ("cpu", "emulate")]
if ON_GPU:
    TIMED += [("cuda", "reference"), ("cuda", "cupy")]

# %% [markdown]
# For one gated layer of `E` experts of width `H` and a batch of 100, we
# time three things: the softmax forward, the combine forward, and both ops
# forward and backward, as in a training step.

# %%
def time_layer(E, H, device, backend):
    """Microseconds of each op for a batch of BATCH on one backend."""
    logits = torch.randn(BATCH, E, device=device, requires_grad=True)
    expert_out = torch.randn(BATCH, E, H, device=device, requires_grad=True)

    def both_with_backward():
        mixed = ops.combine(ops.softmax_gate(logits), expert_out)  # (B, H)
        mixed.sum().backward()

    with ops.use_backend(backend):
        gate_probs = ops.softmax_gate(logits).detach()  # (B, E)
        return {"softmax fwd": microseconds(lambda: ops.softmax_gate(logits)),
                "combine fwd": microseconds(
                    lambda: ops.combine(gate_probs, expert_out)),
                "both fwd+bwd": microseconds(both_with_backward)}

# %% [markdown]
# Every distinct layer of the timed models of Table 1:

# %%
# NBVAL_IGNORE_OUTPUT
layer_sizes = sorted({(spec.num_experts, spec.width)
                      for row in TIMED_ROWS
                      for spec in paper.TABLE1[row].layers})
layer_times = {}
for E, H in layer_sizes:
    for device, backend in TIMED:
        times = layer_times[E, H, device, backend] = time_layer(
            E, H, device, backend)
        row = "  ".join(f"{op} {us:8.1f}" for op, us in times.items())
        print(f"B={BATCH} E={E} H={H:3d} {device:4s} {backend:9s} {row}  (us)")

# %% [markdown]
# And one whole training step (forward, cross-entropy, backward) of each
# timed model on 36x36 jittered digits (`D = 1296`), on each backend.
# Only the two ops change between backends; the experts' and gates'
# matrix products are the same PyTorch code.

# %%
def time_step(row, device, backend):
    """Milliseconds of one training step of the model of Table 1's row."""
    model = DeepMoE(1296, paper.TABLE1[row].layers).to(device)
    x = torch.rand(BATCH, 1296, device=device)  # (B, D)
    labels = torch.randint(10, (BATCH,), device=device)  # (B,)

    def step():
        logits = model(x).logits  # (B, C)
        torch.nn.functional.cross_entropy(logits, labels).backward()

    with ops.use_backend(backend):
        return microseconds(step) / 1000

# %% [markdown]
# Each timed model on each backend:

# %%
# NBVAL_IGNORE_OUTPUT
step_times = {}
for row in TIMED_ROWS:
    for device, backend in TIMED:
        step_times[row, device, backend] = time_step(row, device, backend)
        print(f"{paper.TABLE1[row].name:26s} {device:4s} {backend:9s} "
              f"{step_times[row, device, backend]:6.2f} ms a step")

# %% [markdown]
# Read the tables as rough ratios: the numbers depend on the machine and
# on what else it is running, and the same op can take two or three times
# as long in one run as in the next.
# At the paper's sizes the emulated forward ops are a few times (the
# softmax) to a few tens of times (the combine) slower than the reference,
# yet a whole training step slows far less: in a step, the experts' and
# gates' matrix products and their gradients cost more than the two ops.
#
# Where does the emulation's time go?
# Two costs add up.
# A fixed cost per launch: Python checks every argument against the
# signature, builds the `ctypes` argument array and calls into the
# compiled library; for the softmax at `B = 100`, only 400 threads, that
# is most of its time.
# Then a cost per simulated thread: a function call, the built-in indices
# set, 64-bit divisions to find the row, a few multiply-adds, all on one
# core and one thread after another.
# PyTorch's reference instead runs a few vectorised loops over whole rows.
# To see the per-thread cost, grow the batch of the combine forward: its
# `B * H` threads grow with it.
#
# The first line below times the same op at the same size as the
# "combine fwd" column above, and need not give the same number.
# Above, `expert_out` requires gradients, so each call also records the
# op for autograd; here no input does.
# That costs little; most of the gap between the two is the noise of
# timing on a shared machine, which is why the prose and the checks on
# this page lean only on large ratios.

# %%
# NBVAL_IGNORE_OUTPUT
growth = {}
for batch in (100, 1_000, 10_000):
    gate_probs = torch.rand(batch, 4)  # (B, E)
    expert_out = torch.randn(batch, 4, 100)  # (B, E, H)
    for backend in ("reference", "emulate"):
        with ops.use_backend(backend):
            growth[batch, backend] = microseconds(
                lambda: ops.combine(gate_probs, expert_out))
    threads = batch * 100
    print(f"B={batch:6d}: {threads:9,d} threads; reference "
          f"{growth[batch, 'reference']:8.1f} us, emulate "
          f"{growth[batch, 'emulate']:8.1f} us "
          f"({1000 * growth[batch, 'emulate'] / threads:5.1f} ns a thread)")

# %% [markdown]
# The emulation's time grows roughly in step with the threads: 100 times
# the threads cost it tens of times more, so the per-thread cost dominates.
# The fixed cost, some tens of microseconds, is already a minor part at
# `B = 100`, so on a quiet machine the time per simulated thread (the last
# column) stays at ten to a few tens of nanoseconds; on a busy one it
# wanders up and down from row to row.
# The reference grows too, and stays ahead at every size, by a factor that
# moves from run to run.
# The softmax is worse for many experts, since each of its `B * E` threads
# reads its row twice: the work grows as `B * E * E` (try exercise 5).
#
# **What a GPU changes.**
# A GPU runs its threads at the same time: an H100 (SXM) or an H200 has
# 132 multiprocessors, each holding up to 2048 resident threads, about
# 270,000 at once.
# The 10,000 threads of the paper's combine at batch 100 fill a few
# percent of one such wave, so the kernel finishes in microseconds, and
# the time is set by the cost of a launch (a few microseconds) and of the
# Python around it, not by the arithmetic.
# PyTorch's reference on a GPU is in the same position: each of its ops is
# one to three PyTorch kernels (for the softmax a mask fill, the softmax
# and a copy), each mostly launch cost at these sizes.
# So on a GPU the two backends should come out close, and neither is what
# a training step waits for; run this notebook on one to measure it.
#
# The check: the kernels gave the reference's numbers at the sizes we
# timed, every time is positive, and 100 times the threads cost the
# emulation at least 5 times more time (in practice tens of times), which
# is the per-thread cost at work.

# %%
for E, H in layer_sizes:
    logits = torch.randn(BATCH, E, device=DEVICE)  # (B, E)
    expert_out = torch.randn(BATCH, E, H, device=DEVICE)  # (B, E, H)
    outputs = {}
    for backend in (KERNELS, "reference"):
        with ops.use_backend(backend):
            probs = ops.softmax_gate(logits)  # (B, E)
            outputs[backend] = (probs, ops.combine(probs, expert_out))
    for got, want in zip(outputs[KERNELS], outputs["reference"]):
        torch.testing.assert_close(got, want)
    assert min(layer_times[E, H, "cpu", "emulate"].values()) > 0
assert all(value > 0 for value in step_times.values())
assert growth[10_000, "emulate"] > 5 * growth[100, "emulate"]

# %% [markdown]
# ## Summary
#
# - The package's two ops are CUDA kernels in `kernels/gating.cu` and
#   `kernels/combine.cu`; `dmoe_edu.ops.kernels` reads them, shows them
#   and checks every launch against their signatures.
# - Every kernel uses one thread per output element, found from the flat
#   row-major index (`i = b * E + e`, or `b * H + h`), and a grid-stride
#   loop, so a grid of any size computes every element, and the same bits.
# - The combine forward gives neighbouring threads neighbouring memory, so a
#   warp's reads are coalesced; its gates' backward does not, and says so.
# - No thread reads what another writes: no shared memory, no barrier, no
#   atomics.
#   Results are deterministic, and a CPU running the threads one by one
#   (`emulate`) gets exactly what a GPU gets.
# - The emulation checks arithmetic and indexing, but it cannot reveal a
#   race; the design rule is what makes it trustworthy.
# - The emulation pays a fixed cost per launch and then a steady cost per
#   simulated thread; at the paper's sizes the ops are a small part of a
#   training step either way.
#   A GPU runs all those threads at once, and its time at these sizes is
#   mostly launch overhead.
#
# ## Exercises
#
# 1. Change `launch_shape(block=4, max_blocks=2)` in the section on small
#    grids to `block=1, max_blocks=1`: one thread does everything.
#    Is the softmax still bitwise equal?
#    Time it with `microseconds`.
# 2. Launch `who_wrote_once` with a grid of 4 blocks of 8 threads for the
#    24 elements: what stops threads 24 to 31 from writing past the end of
#    `owner`?
#    What would happen without the `i < n` test in `OWNER_CODE`?
#    (Think it through rather than run it: on the CPU it overwrites memory
#    that belongs to something else.)
# 3. Write a kernel `relu_fwd(const float* x, float* y, long long n)` with a
#    grid-stride loop, launch it through `RawModule`, and check it against
#    `torch.relu` on a tensor of 1,001 elements with a grid of 3 blocks.
# 4. Write a row sum over a `(B, H)` tensor in two ways: one thread per row
#    (like `combine_bwd_gates`), and one thread per element doing
#    `out[b] += x[i]`.
#    Which one is correct on a GPU, and why does the emulation not tell?
# 5. Time the emulated `softmax_gate` at `B = 100` for `E` = 4, 16, 64 and
#    256 with `microseconds`.
#    How does the time grow with `E`, and which line of `gating.cu`
#    explains it?
# 6. Set `SCALE = "paper"` and compare the training steps of the five
#    models of Table 1: does the emulation's share of a step grow for the
#    small 4x20 layers?
# 7. On a machine with a GPU, rerun the notebook: what do `count_racy` and
#    the timing tables print now?
#    Launch `block_sum` from `BLOCK_SUM_CODE` through
#    `cupy_backend.RawModule` and check its block sums against `torch.sum`.
#
# ## References
#
# - D. Eigen, M. Ranzato, I. Sutskever, "Learning Factored Representations
#   in a Deep Mixture of Experts", arXiv:1312.4314, 2013.
# - NVIDIA, "CUDA C++ Programming Guide": the programming model (grids,
#   blocks, threads), shared memory and `__syncthreads`, atomic functions,
#   and coalesced access to global memory.
# - M. Harris, "CUDA Pro Tip: Write Flexible Kernels with Grid-Stride
#   Loops", NVIDIA Technical Blog, 2013.
# - CuPy documentation, "User-Defined Kernels" (`cupy.RawModule`,
#   `cupy.RawKernel`): how the `cupy` backend compiles and launches the
#   kernels.
# - This package: `kernels/gating.cu`, `kernels/combine.cu`,
#   `kernels/cpu_shim.h`, and the README section "The CUDA kernels".
