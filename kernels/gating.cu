// gating.cu: the gate's softmax over experts, forward and backward.
//
// What it computes
//   forward   gate_probs[b, e] = exp(gate_logits[b, e] - m[b]) / s[b]   for an allowed expert,
//             gate_probs[b, e] = 0                                     for a masked one,
//             where m[b] is the largest allowed logit of row b (subtracted so that no exp()
//             can overflow) and s[b] = sum over allowed e' of exp(gate_logits[b, e'] - m[b]).
//   backward  grad_logits[b, e] = p[b, e] * (grad_probs[b, e] - sum_j grad_probs[b, j] p[b, j])
//             with p = gate_probs. A masked expert has p = 0, so its gradient is 0.
//
// Thread mapping
//   One thread per output element (b, e), at flat index i = b * E + e. A grid-stride loop lets
//   any grid cover any amount of work: thread t of the whole grid handles i = t, t + T,
//   t + 2T, ... where T = gridDim.x * blockDim.x. Each thread reads its whole row twice (2E
//   values: once for the max, once for the sum) and finds both itself. That repeats work
//   across a row, but it keeps every thread independent: no shared memory, no __syncthreads,
//   no atomics, so results are deterministic and a CPU can run the threads one after another
//   (the emulate backend).
//
// Layout
//   gate_logits, gate_probs, grad_probs, grad_logits: (B, E), row-major and contiguous.
//   mask: nullptr (every expert allowed), or bytes with 1 = allowed and 0 = masked, element
//   (b, e) at mask[b * mask_row_stride + e]. mask_row_stride is E for a (B, E) mask and 0 for
//   a single (E,) row shared by the whole batch. A torch.bool tensor stores exactly such
//   bytes, so it is passed as it is.
//
// Types
//   float32 (kernels ending in _f32) and float64 (_f64); indices are 64-bit (long long).
//
// Limits
//   - Every row must keep at least one allowed expert: the caller checks it before a launch.
//   - A thread reads 2E values, so the work is O(B E^2): cheap for the paper's E = 4 to 16,
//     wasteful for hundreds of experts, where a reduction in shared memory would win.
//   - No #include: NVRTC compiles this file without the standard headers.

// expf for float and exp for double, so that one template serves both types.
__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

template <typename T>
__device__ void softmax_gate_forward(const T* __restrict__ gate_logits,
                                     const unsigned char* __restrict__ mask,
                                     long long mask_row_stride,
                                     T* __restrict__ gate_probs,
                                     long long B,
                                     long long E)
{
    const long long n = B * E;
    const long long grid_threads = (long long)gridDim.x * blockDim.x;

    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += grid_threads) {
        // Which row and expert this element is; the row's logits and mask bytes.
        const long long b = i / E;
        const long long e = i - b * E;
        const T* row = gate_logits + b * E;
        const unsigned char* row_mask = mask ? mask + b * mask_row_stride : nullptr;

        // A masked expert gets exactly 0 and takes no part in the max or the sum.
        if (row_mask && !row_mask[e]) {
            gate_probs[i] = T(0);
            continue;
        }

        // Step 1: the largest allowed logit of the row (reads E logits). Starting from this
        // element's own logit avoids needing -infinity, which has no portable spelling here.
        T row_max = row[e];
        for (long long j = 0; j < E; ++j) {
            if ((!row_mask || row_mask[j]) && row[j] > row_max) row_max = row[j];
        }

        // Step 2: the normaliser s[b] (reads E logits again, E exponentials).
        T row_sum = T(0);
        for (long long j = 0; j < E; ++j) {
            if (!row_mask || row_mask[j]) row_sum += exp_of(row[j] - row_max);
        }

        // Step 3: this element's probability (writes one value).
        gate_probs[i] = exp_of(row[e] - row_max) / row_sum;
    }
}

template <typename T>
__device__ void softmax_gate_backward(const T* __restrict__ gate_probs,
                                      const T* __restrict__ grad_probs,
                                      T* __restrict__ grad_logits,
                                      long long B,
                                      long long E)
{
    const long long n = B * E;
    const long long grid_threads = (long long)gridDim.x * blockDim.x;

    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += grid_threads) {
        // The start of this element's row.
        const long long row = (i / E) * E;

        // Step 1: <grad_probs[b, :], gate_probs[b, :]>, shared by every expert of the row
        // (reads 2E values).
        T dot = T(0);
        for (long long j = 0; j < E; ++j) dot += grad_probs[row + j] * gate_probs[row + j];

        // Step 2: the softmax's chain rule for this element (writes one value).
        grad_logits[i] = gate_probs[i] * (grad_probs[i] - dot);
    }
}

// The entry points Python launches: extern "C" keeps their names unmangled, so the CUDA
// driver (through CuPy) and the CPU emulation both find them by these exact names.
extern "C" __global__ void softmax_gate_fwd_f32(const float* gate_logits,
                                                const unsigned char* mask,
                                                long long mask_row_stride,
                                                float* gate_probs,
                                                long long B,
                                                long long E)
{
    softmax_gate_forward<float>(gate_logits, mask, mask_row_stride, gate_probs, B, E);
}

extern "C" __global__ void softmax_gate_fwd_f64(const double* gate_logits,
                                                const unsigned char* mask,
                                                long long mask_row_stride,
                                                double* gate_probs,
                                                long long B,
                                                long long E)
{
    softmax_gate_forward<double>(gate_logits, mask, mask_row_stride, gate_probs, B, E);
}

extern "C" __global__ void softmax_gate_bwd_f32(const float* gate_probs,
                                                const float* grad_probs,
                                                float* grad_logits,
                                                long long B,
                                                long long E)
{
    softmax_gate_backward<float>(gate_probs, grad_probs, grad_logits, B, E);
}

extern "C" __global__ void softmax_gate_bwd_f64(const double* gate_probs,
                                                const double* grad_probs,
                                                double* grad_logits,
                                                long long B,
                                                long long E)
{
    softmax_gate_backward<double>(gate_probs, grad_probs, grad_logits, B, E);
}
