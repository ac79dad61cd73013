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
# # Assignment 4: the combine's backward as a CUDA kernel (solution)
#
# **What you write.** One CUDA kernel, `combine_backward_experts`: the
# gradient of the combine with respect to the experts' outputs.
# You fill in its body; the signature is given.
# It runs on your CPU through the package's emulation (the same source a
# GPU would compile), and on a GPU too when there is one.
#
# **The math.** The combine mixes the experts' outputs with the gates:
#
# - forward: `mixed[b, h] = sum_e g[b, e] * x[b, e, h]`;
# - backward to the expert outputs:
#   `grad_x[b, e, h] = g[b, e] * grad_mixed[b, h]`.
#
# Each expert's output receives its gate's share of the gradient that
# arrives at the mixture. There is no sum: one multiply per element.
#
# **The layout.** Every tensor is row-major and contiguous:
# `g` is `(B, E)`, so `g[b, e]` sits at `b * E + e`; `grad_mixed` is
# `(B, H)`, so `grad_mixed[b, h]` sits at `b * H + h`; `grad_x` is
# `(B, E, H)`, so `grad_x[b, e, h]` sits at `i = (b * E + e) * H + h`.
#
# **The rule.** As in notebook 7: one thread per output element, and a
# grid-stride loop. A thread starts at its global number
# `blockIdx.x * blockDim.x + threadIdx.x` and jumps by the number of
# threads in the grid, `gridDim.x * blockDim.x`, while `i < B * E * H`.
# Use 64-bit indices (`long long`) throughout.
#
# **Grading.** `checks.check_combine_backward` compiles your source,
# launches it on four cases (one with a grid smaller than the work, one
# with more threads than elements), compares each result with
# `g[:, :, None] * grad_mixed[:, None, :]`, and prints a report: a score,
# each failed case with what was expected and what came back, and a hint
# for common mistakes (no grid-stride loop, no bounds check, gates read
# transposed). Your grade is the report's score.

# %%
# NBVAL_IGNORE_OUTPUT
from dmoe_edu import course

print(course.setup(seed=0))

# %% [markdown]
# The imports. `checks` holds the grader; `emulate.RawModule` compiles a
# CUDA source for the CPU and launches its kernels.

# %%
import numpy as np
import torch

from dmoe_edu import checks, ops
from dmoe_edu.ops import emulate, kernels

# %% [markdown]
# ## The forward, for reference
#
# The package's forward combine, from `kernels/combine.cu`: a `__device__`
# template over the float type, and the `extern "C" __global__` entry
# point that Python launches for float32. It has one thread per `(b, h)`
# and sums over the experts; yours has one thread per `(b, e, h)` and no
# sum, but the loop and the index arithmetic follow the same pattern.

# %%
print(kernels.kernel_function("combine", "combine_forward"))
print()
print(kernels.kernel_function("combine", "combine_fwd_f32"))

# %% [markdown]
# ## Your kernel
#
# Write the body of `combine_backward_experts`: loop over the flat
# indices `i` of `grad_expert_out` with a grid-stride loop, split each
# `i` into `b`, `e` and `h`, and write `g[b, e] * grad_mixed[b, h]`.
# Write every element exactly once, and nothing past the end.
# No `#include`: the source compiles without the standard headers.

# %% tags=["solution"]
KERNEL = r"""
extern "C" __global__ void combine_backward_experts(
    const float* gate_probs,   // (B, E)
    const float* grad_out,     // (B, H)
    float* grad_expert_out,    // (B, E, H), written in full
    long long B, long long E, long long H)
{
    // BEGIN SOLUTION
    const long long n = B * E * H;
    const long long step = (long long)gridDim.x * blockDim.x;

    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < n; i += step) {
        // Split i = (b * E + e) * H + h.
        const long long h = i % H;
        const long long e = (i / H) % E;
        const long long b = i / (E * H);

        // The gate's share of the gradient that reached the mixture.
        grad_expert_out[i] = gate_probs[b * E + e] * grad_out[b * H + h];
    }
    // END SOLUTION
}
"""

# %% [markdown]
# ## The check
#
# Run the grader. Until you have written the body, it says "not
# implemented yet"; once every case passes, it ends with
# "All cases pass."

# %%
report = checks.check_combine_backward(KERNEL)
report

# %% tags=["solution-only"]
assert checks.check_combine_backward(KERNEL).passed

# %% [markdown]
# ## On a GPU
#
# The emulation runs the threads one after another, so it checks your
# arithmetic and indexing. When a GPU (and CuPy) is present, the same
# source is compiled with NVRTC and graded on the GPU as well.

# %%
# NBVAL_IGNORE_OUTPUT
if ops.backend_status()["cupy"] is None:
    print(checks.check_combine_backward(KERNEL, backend="cupy"))
else:
    print("No GPU here: the check above ran on the CPU only.")

# %% [markdown]
# ## Your kernel against autograd
#
# Once the check passes, your kernel should give what PyTorch's autograd
# gives for the package's `combine` (on the `reference` backend). We
# launch it with a single block of 32 threads for 105 elements, so the
# grid-stride loop does most of the work.

# %%
if report.passed:
    B, E, H = 5, 3, 7
    gen = torch.Generator().manual_seed(0)
    gate_probs = torch.softmax(torch.randn(B, E, generator=gen), dim=1)
    expert_out = torch.randn(B, E, H, generator=gen, requires_grad=True)
    grad_mixed = torch.randn(B, H, generator=gen)  # (B, H)
    with ops.use_backend("reference"):
        mixed = ops.combine(gate_probs, expert_out)  # (B, H)
    mixed.backward(grad_mixed)

    mine = torch.zeros(B, E, H)
    kernel = emulate.RawModule(KERNEL, "mine.cu").get_function(
        "combine_backward_experts")
    kernel((1,), (32,), (gate_probs, grad_mixed, mine,
                         np.int64(B), np.int64(E), np.int64(H)))
    difference = (mine - expert_out.grad).abs().max().item()
    print(f"largest difference from autograd: {difference:.1e}")
else:
    print("finish the kernel first")

# %% [markdown]
# ## A question
#
# The backward to the *gates*,
# `grad_g[b, e] = sum_h x[b, e, h] * grad_mixed[b, h]`, needs a sum over
# `h`, while yours needs none. Why, from the forward formula? And how
# would you give that sum to threads without letting two threads write
# the same element? (`combine_bwd_gates` in `kernels/combine.cu` is one
# answer; read it after you have thought it through.)

# %% [markdown]
# ## Summary
#
# - The combine's backward to the expert outputs is one multiply per
#   element: `grad_x[b, e, h] = g[b, e] * grad_mixed[b, h]`.
# - A kernel for it has one thread per element of `grad_x`, found from the
#   flat row-major index `i = (b * E + e) * H + h`, and a grid-stride loop
#   so that any grid covers all `B * E * H` elements, and no more.
# - The emulation runs the same CUDA source on the CPU, so the grader can
#   check it anywhere; on a GPU the same source runs through CuPy.
# - Autograd of the reference `combine` agrees with the kernel.
