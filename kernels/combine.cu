// combine.cu: the gate-weighted sum over experts, and its backward.
//
// What it computes
//   forward        mixed[b, h]           = sum_e gate_probs[b, e] * expert_out[b, e, h]
//   backward (x)   grad_expert[b, e, h]  = gate_probs[b, e] * grad_mixed[b, h]
//   backward (g)   grad_gates[b, e]      = sum_h expert_out[b, e, h] * grad_mixed[b, h]
//
// Thread mapping
//   One thread per output element, with a grid-stride loop (thread t of the grid handles
//   flat indices t, t + T, t + 2T, ... where T = gridDim.x * blockDim.x):
//   - combine_fwd:       one thread per (b, h); it sums over the E experts. Neighbouring
//                        threads read neighbouring h, so the reads of a warp are coalesced.
//   - combine_bwd_expert: one thread per (b, e, h); one multiply, no sum.
//   - combine_bwd_gates: one thread per (b, e); it sums over the H features of its row.
//   No thread writes what another reads, and no sum is split between threads: no shared
//   memory, no __syncthreads, no atomics, deterministic results, and a CPU can run the
//   threads one after another (the emulate backend).
//
// Layout
//   gate_probs, grad_gates: (B, E); expert_out, grad_expert: (B, E, H); mixed, grad_mixed:
//   (B, H). All row-major and contiguous.
//
// Types
//   float32 (kernels ending in _f32) and float64 (_f64); indices are 64-bit (long long).
//   Sums accumulate in the tensor's own type, as torch's reference does.
//
// Limits
//   - combine_bwd_gates gives each thread a whole row of H values: neighbouring threads read
//     addresses H apart, which a GPU serves less efficiently than the coalesced forward.
//     Splitting the sum across threads would need a reduction (shared memory or atomics),
//     which these teaching kernels leave out on purpose.
//   - No #include: NVRTC compiles this file without the standard headers.

template <typename T>
__device__ void combine_forward(const T* __restrict__ gate_probs,
                                const T* __restrict__ expert_out,
                                T* __restrict__ mixed,
                                long long B,
                                long long E,
                                long long H)
{
    const long long n = B * H;
    const long long grid_threads = (long long)gridDim.x * blockDim.x;

    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += grid_threads) {
        // Which example and feature this thread mixes.
        const long long b = i / H;
        const long long h = i - b * H;

        // Sum over experts: reads E gates and E expert outputs, H apart in memory.
        T acc = T(0);
        for (long long e = 0; e < E; ++e) {
            acc += gate_probs[b * E + e] * expert_out[(b * E + e) * H + h];
        }

        // One write per thread.
        mixed[i] = acc;
    }
}

template <typename T>
__device__ void combine_backward_expert(const T* __restrict__ gate_probs,
                                        const T* __restrict__ grad_mixed,
                                        T* __restrict__ grad_expert,
                                        long long B,
                                        long long E,
                                        long long H)
{
    const long long n = B * E * H;
    const long long grid_threads = (long long)gridDim.x * blockDim.x;

    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += grid_threads) {
        // Split i = (b * E + e) * H + h: be is the (b, e) pair, h the feature.
        const long long be = i / H;
        const long long h = i - be * H;
        const long long b = be / E;

        // Each expert's output received its gate's share of the incoming gradient.
        grad_expert[i] = gate_probs[be] * grad_mixed[b * H + h];
    }
}

template <typename T>
__device__ void combine_backward_gates(const T* __restrict__ expert_out,
                                       const T* __restrict__ grad_mixed,
                                       T* __restrict__ grad_gates,
                                       long long B,
                                       long long E,
                                       long long H)
{
    const long long n = B * E;
    const long long grid_threads = (long long)gridDim.x * blockDim.x;

    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += grid_threads) {
        // i is the (b, e) pair; its expert's output row and the example's gradient row.
        const long long b = i / E;
        const T* out_row = expert_out + i * H;
        const T* grad_row = grad_mixed + b * H;

        // Dot product over the H features: reads 2H values, writes one.
        T acc = T(0);
        for (long long h = 0; h < H; ++h) acc += out_row[h] * grad_row[h];
        grad_gates[i] = acc;
    }
}

// The entry points Python launches: extern "C" keeps their names unmangled, so the CUDA
// driver (through CuPy) and the CPU emulation both find them by these exact names.
extern "C" __global__ void combine_fwd_f32(const float* gate_probs, const float* expert_out,
                                           float* mixed, long long B, long long E, long long H)
{
    combine_forward<float>(gate_probs, expert_out, mixed, B, E, H);
}

extern "C" __global__ void combine_fwd_f64(const double* gate_probs, const double* expert_out,
                                           double* mixed, long long B, long long E, long long H)
{
    combine_forward<double>(gate_probs, expert_out, mixed, B, E, H);
}

extern "C" __global__ void combine_bwd_expert_f32(const float* gate_probs,
                                                  const float* grad_mixed,
                                                  float* grad_expert,
                                                  long long B, long long E, long long H)
{
    combine_backward_expert<float>(gate_probs, grad_mixed, grad_expert, B, E, H);
}

extern "C" __global__ void combine_bwd_expert_f64(const double* gate_probs,
                                                  const double* grad_mixed,
                                                  double* grad_expert,
                                                  long long B, long long E, long long H)
{
    combine_backward_expert<double>(gate_probs, grad_mixed, grad_expert, B, E, H);
}

extern "C" __global__ void combine_bwd_gates_f32(const float* expert_out,
                                                 const float* grad_mixed,
                                                 float* grad_gates,
                                                 long long B, long long E, long long H)
{
    combine_backward_gates<float>(expert_out, grad_mixed, grad_gates, B, E, H);
}

extern "C" __global__ void combine_bwd_gates_f64(const double* expert_out,
                                                 const double* grad_mixed,
                                                 double* grad_gates,
                                                 long long B, long long E, long long H)
{
    combine_backward_gates<double>(expert_out, grad_mixed, grad_gates, B, E, H);
}
