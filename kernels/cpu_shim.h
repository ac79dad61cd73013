// cpu_shim.h: lets a C++ compiler build a kernels/*.cu file unchanged, for the CPU.
//
// The emulate backend of dmoe_edu.ops puts this header in front of a .cu file and compiles
// the pair with the system C++ compiler (g++ or clang++). It does three things:
//   1. spells CUDA's keywords (__global__, __device__, ...) as plain C++;
//   2. declares the built-in indices (threadIdx, blockIdx, blockDim, gridDim) as variables
//      that the launcher sets before it runs each simulated thread;
//   3. provides emu::launch, which runs every thread of every block, one after another.
//
// Running threads one at a time gives exactly the GPU's results only for kernels whose threads
// never talk to each other. So the features that let them talk are compile errors here:
// __syncthreads() and __shared__ memory. Warp shuffles and atomics are simply not declared,
// and using one fails to compile as an unknown name.

#pragma once

#include <math.h>

#include <cstddef>
#include <type_traits>
#include <utility>

// 1. CUDA keywords as plain C++ (g++ and clang++ already understand __restrict__).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

// 2. The built-in indices. thread_local, so two Python threads may launch at once.
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
static thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// Features that need threads to run together: refused at compile time, with the reason.
#define __syncthreads()                                                                    \
    static_assert(sizeof(int) == 0,                                                        \
                  "__syncthreads(): the CPU emulation runs threads one at a time")
#define __shared__                                                                         \
    static_assert(sizeof(int) == 0, "__shared__: the CPU emulation has no shared memory");

// 3. The launcher. Like cuLaunchKernel, it receives the arguments as an array of pointers,
// one per kernel parameter, each pointing at that parameter's value.
namespace emu {

template <typename... Params, std::size_t... I>
inline void run_thread(void (*kernel)(Params...), void** args, std::index_sequence<I...>)
{
    // Read parameter I from args[I], typed as the kernel declares it.
    kernel(*static_cast<typename std::remove_reference<Params>::type*>(args[I])...);
}

template <typename... Params>
void launch(void (*kernel)(Params...), unsigned int grid, unsigned int block, void** args)
{
    // A one-dimensional grid of one-dimensional blocks, run block by block, thread by thread.
    gridDim = dim3(grid);
    blockDim = dim3(block);
    for (unsigned int b = 0; b < grid; ++b) {
        for (unsigned int t = 0; t < block; ++t) {
            blockIdx = dim3(b);
            threadIdx = dim3(t);
            run_thread(kernel, args, std::index_sequence_for<Params...>{});
        }
    }
}

}  // namespace emu
