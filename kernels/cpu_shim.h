// cpu_shim.h: lets a C++ compiler build a kernels/*.cu file unchanged, for the CPU.
//
// The emulate backend of dmoe_edu.ops puts this header in front of a .cu file and compiles
// the pair with the system C++ compiler (g++ or clang++). It does four things:
//   1. spells CUDA's keywords (__global__, __device__, __launch_bounds__, ...) as plain C++;
//   2. declares the built-in indices (threadIdx, blockIdx, blockDim, gridDim) as read-only
//      names that the launcher sets before it runs each simulated thread;
//   3. declares what NVRTC gives a kernel without any #include: the math library (expf, exp,
//      with float overloads of exp, sqrt, ...), min/max, the intrinsics (rsqrtf, __expf,
//      __fdividef, __saturatef, __int_as_float, __ldg, __popc, __float2int_rn, ...), the
//      vector types (float4, make_float4, ...), warpSize, printf and assert;
//   4. provides emu::launch, which runs every thread of every block, one after another.
//
// This header includes no header itself, so a kernel sees what NVRTC shows it and nothing
// more: host-only names such as INFINITY, M_PI or std::exp fail here as they fail on NVRTC.
// The differences that remain are listed in dmoe_edu/ops/emulate.py and the README.
//
// Running threads one at a time gives exactly the GPU's results only for kernels whose threads
// never talk to each other. So the features that let them talk are compile errors here, each
// with the reason: __syncthreads(), __shared__ memory, atomics, warp shuffles and votes.

#pragma once

// --------------------------------------------------------------------- 0. types and keywords

typedef decltype(sizeof(0)) size_t;
typedef decltype((char*)0 - (char*)0) ptrdiff_t;
#define NULL __null

// CUDA keywords as plain C++ (g++ and clang++ already understand __restrict__).
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)

// ----------------------------------------------------------------------- 1. built-in indices

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
        : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

namespace emu {
// thread_local, so two Python threads may launch at once.
inline thread_local uint3 thread_index, block_index;
inline thread_local dim3 block_size, grid_size;
}  // namespace emu

// Read-only, as on a GPU: a kernel may read threadIdx.x but not assign it.
#define threadIdx (static_cast<const uint3&>(emu::thread_index))
#define blockIdx (static_cast<const uint3&>(emu::block_index))
#define blockDim (static_cast<const dim3&>(emu::block_size))
#define gridDim (static_cast<const dim3&>(emu::grid_size))
static constexpr int warpSize = 32;

// --------------------------------------------- 2. features that need threads to run together

#define __syncthreads()                                                                    \
    static_assert(sizeof(int) == 0,                                                        \
                  "__syncthreads(): the CPU emulation runs threads one at a time")
#define __shared__                                                                         \
    static_assert(sizeof(int) == 0, "__shared__: the CPU emulation has no shared memory");

namespace emu {
template <typename...>
constexpr bool refused = false;
}  // namespace emu

// A template whose body fails to compile only when a kernel calls it, with the reason.
#define EMU_REFUSE(name, why)                                                              \
    template <typename... A>                                                               \
    inline int name(A...)                                                                  \
    {                                                                                      \
        static_assert(emu::refused<A...>, #name ": " why);                                 \
        return 0;                                                                          \
    }
#define EMU_NO_ATOMICS "the CPU emulation runs threads one at a time; no two may share a write"
#define EMU_NO_WARPS "the CPU emulation runs threads one at a time, never a warp together"
EMU_REFUSE(atomicAdd, EMU_NO_ATOMICS)
EMU_REFUSE(atomicSub, EMU_NO_ATOMICS)
EMU_REFUSE(atomicExch, EMU_NO_ATOMICS)
EMU_REFUSE(atomicMin, EMU_NO_ATOMICS)
EMU_REFUSE(atomicMax, EMU_NO_ATOMICS)
EMU_REFUSE(atomicInc, EMU_NO_ATOMICS)
EMU_REFUSE(atomicDec, EMU_NO_ATOMICS)
EMU_REFUSE(atomicCAS, EMU_NO_ATOMICS)
EMU_REFUSE(atomicAnd, EMU_NO_ATOMICS)
EMU_REFUSE(atomicOr, EMU_NO_ATOMICS)
EMU_REFUSE(atomicXor, EMU_NO_ATOMICS)
EMU_REFUSE(__shfl_sync, EMU_NO_WARPS)
EMU_REFUSE(__shfl_up_sync, EMU_NO_WARPS)
EMU_REFUSE(__shfl_down_sync, EMU_NO_WARPS)
EMU_REFUSE(__shfl_xor_sync, EMU_NO_WARPS)
EMU_REFUSE(__ballot_sync, EMU_NO_WARPS)
EMU_REFUSE(__any_sync, EMU_NO_WARPS)
EMU_REFUSE(__all_sync, EMU_NO_WARPS)
EMU_REFUSE(__activemask, EMU_NO_WARPS)
EMU_REFUSE(__syncwarp, EMU_NO_WARPS)
EMU_REFUSE(__syncthreads_count, "the CPU emulation runs threads one at a time")
EMU_REFUSE(__syncthreads_and, "the CPU emulation runs threads one at a time")
EMU_REFUSE(__syncthreads_or, "the CPU emulation runs threads one at a time")

// Memory fences order one thread's writes as others see them: with one thread at a time,
// every write is already seen in order.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __nanosleep(unsigned int) {}

// ------------------------------------------------------------------------ 3. the math library

// The C library's functions (the system's libm), in float and double, with CUDA's float
// overloads of the double names: exp(1.0f) is a float, as on a GPU.
#define EMU_MATH1(name)                                                                    \
    extern "C" double name(double) noexcept;                                               \
    extern "C" float name##f(float) noexcept;                                              \
    inline float name(float x) noexcept { return name##f(x); }
#define EMU_MATH2(name)                                                                    \
    extern "C" double name(double, double) noexcept;                                       \
    extern "C" float name##f(float, float) noexcept;                                       \
    inline float name(float x, float y) noexcept { return name##f(x, y); }
EMU_MATH1(acos) EMU_MATH1(asin) EMU_MATH1(atan) EMU_MATH1(cos) EMU_MATH1(sin) EMU_MATH1(tan)
EMU_MATH1(acosh) EMU_MATH1(asinh) EMU_MATH1(atanh) EMU_MATH1(cosh) EMU_MATH1(sinh)
EMU_MATH1(tanh) EMU_MATH1(exp) EMU_MATH1(exp2) EMU_MATH1(expm1) EMU_MATH1(log)
EMU_MATH1(log10) EMU_MATH1(log1p) EMU_MATH1(log2) EMU_MATH1(logb) EMU_MATH1(sqrt)
EMU_MATH1(cbrt) EMU_MATH1(erf) EMU_MATH1(erfc) EMU_MATH1(lgamma) EMU_MATH1(tgamma)
EMU_MATH1(ceil) EMU_MATH1(floor) EMU_MATH1(trunc) EMU_MATH1(round) EMU_MATH1(rint)
EMU_MATH1(nearbyint) EMU_MATH1(fabs)
EMU_MATH2(atan2) EMU_MATH2(pow) EMU_MATH2(fmod) EMU_MATH2(remainder) EMU_MATH2(hypot)
EMU_MATH2(fmin) EMU_MATH2(fmax) EMU_MATH2(fdim) EMU_MATH2(copysign) EMU_MATH2(nextafter)
#undef EMU_MATH1
#undef EMU_MATH2

extern "C" double fma(double, double, double) noexcept;
extern "C" float fmaf(float, float, float) noexcept;
inline float fma(float x, float y, float z) noexcept { return fmaf(x, y, z); }
extern "C" double ldexp(double, int) noexcept;
extern "C" float ldexpf(float, int) noexcept;
inline float ldexp(float x, int e) noexcept { return ldexpf(x, e); }
extern "C" double scalbn(double, int) noexcept;
extern "C" float scalbnf(float, int) noexcept;
inline float scalbn(float x, int e) noexcept { return scalbnf(x, e); }
extern "C" double frexp(double, int*) noexcept;
extern "C" float frexpf(float, int*) noexcept;
inline float frexp(float x, int* e) noexcept { return frexpf(x, e); }
extern "C" double modf(double, double*) noexcept;
extern "C" float modff(float, float*) noexcept;
inline float modf(float x, float* i) noexcept { return modff(x, i); }
extern "C" double remquo(double, double, int*) noexcept;
extern "C" float remquof(float, float, int*) noexcept;
inline float remquo(float x, float y, int* q) noexcept { return remquof(x, y, q); }
extern "C" int ilogb(double) noexcept;
extern "C" int ilogbf(float) noexcept;
inline int ilogb(float x) noexcept { return ilogbf(x); }
extern "C" long lround(double) noexcept;
extern "C" long lroundf(float) noexcept;
inline long lround(float x) noexcept { return lroundf(x); }
extern "C" long long llround(double) noexcept;
extern "C" long long llroundf(float) noexcept;
inline long long llround(float x) noexcept { return llroundf(x); }
extern "C" long lrint(double) noexcept;
extern "C" long lrintf(float) noexcept;
inline long lrint(float x) noexcept { return lrintf(x); }
extern "C" long long llrint(double) noexcept;
extern "C" long long llrintf(float) noexcept;
inline long long llrint(float x) noexcept { return llrintf(x); }
inline float pow(float x, int n) noexcept { return powf(x, (float)n); }
inline double pow(double x, int n) noexcept { return pow(x, (double)n); }

extern "C" int abs(int) noexcept;
extern "C" long labs(long) noexcept;
extern "C" long long llabs(long long) noexcept;
inline long abs(long x) noexcept { return labs(x); }
inline long long abs(long long x) noexcept { return llabs(x); }
inline float abs(float x) noexcept { return fabsf(x); }
inline double abs(double x) noexcept { return fabs(x); }

// Classification, as overloads (CUDA has them as functions, C as macros).
#define EMU_CLASSIFY(T)                                                                    \
    inline bool isnan(T x) noexcept { return __builtin_isnan(x); }                         \
    inline bool isinf(T x) noexcept { return __builtin_isinf(x); }                         \
    inline bool isfinite(T x) noexcept { return __builtin_isfinite(x); }                   \
    inline bool signbit(T x) noexcept { return __builtin_signbit(x); }
EMU_CLASSIFY(float)
EMU_CLASSIFY(double)
#undef EMU_CLASSIFY
inline int __isnanf(float x) noexcept { return __builtin_isnan(x); }
inline int __isinff(float x) noexcept { return __builtin_isinf(x); }
inline int __finitef(float x) noexcept { return __builtin_isfinite(x); }

// CUDA's own functions, written with the C library's.
#define EMU_CUDA_MATH(T, S)                                                                \
    inline T rsqrt##S(T x) noexcept { return T(1) / sqrt##S(x); }                          \
    inline T rcbrt##S(T x) noexcept { return T(1) / cbrt##S(x); }                          \
    inline T exp10##S(T x) noexcept { return pow##S(T(10), x); }                           \
    inline T sinpi##S(T x) noexcept { return sin##S(T(3.14159265358979323846) * x); }      \
    inline T cospi##S(T x) noexcept { return cos##S(T(3.14159265358979323846) * x); }      \
    inline T normcdf##S(T x) noexcept { return T(0.5) * erfc##S(-x * T(0.70710678118654752)); } \
    inline void sincos##S(T x, T* s, T* c) noexcept { *s = sin##S(x); *c = cos##S(x); }
EMU_CUDA_MATH(float, f)
EMU_CUDA_MATH(double, )
#undef EMU_CUDA_MATH
inline float rsqrt(float x) noexcept { return rsqrtf(x); }
inline float rcbrt(float x) noexcept { return rcbrtf(x); }
inline float exp10(float x) noexcept { return exp10f(x); }

// The fast-math intrinsics. A GPU computes them approximately (a few ulp, flushing small
// values to zero); here they are the accurate functions, so the last bits can differ.
inline float __expf(float x) noexcept { return expf(x); }
inline float __exp10f(float x) noexcept { return exp10f(x); }
inline float __logf(float x) noexcept { return logf(x); }
inline float __log2f(float x) noexcept { return log2f(x); }
inline float __log10f(float x) noexcept { return log10f(x); }
inline float __sinf(float x) noexcept { return sinf(x); }
inline float __cosf(float x) noexcept { return cosf(x); }
inline float __tanf(float x) noexcept { return tanf(x); }
inline float __powf(float x, float y) noexcept { return powf(x, y); }
inline void __sincosf(float x, float* s, float* c) noexcept { sincosf(x, s, c); }
inline float __fdividef(float x, float y) noexcept { return x / y; }
inline float __saturatef(float x) noexcept { return x > 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }

// Arithmetic rounded to nearest (the default rounding of the CPU, with no contraction into
// fused multiply-adds: the emulation compiles with -ffp-contract=off).
inline float __fadd_rn(float x, float y) noexcept { return x + y; }
inline float __fsub_rn(float x, float y) noexcept { return x - y; }
inline float __fmul_rn(float x, float y) noexcept { return x * y; }
inline float __fdiv_rn(float x, float y) noexcept { return x / y; }
inline float __frcp_rn(float x) noexcept { return 1.0f / x; }
inline float __fsqrt_rn(float x) noexcept { return sqrtf(x); }
inline float __frsqrt_rn(float x) noexcept { return 1.0f / sqrtf(x); }
inline float __fmaf_rn(float x, float y, float z) noexcept { return fmaf(x, y, z); }
inline double __dadd_rn(double x, double y) noexcept { return x + y; }
inline double __dsub_rn(double x, double y) noexcept { return x - y; }
inline double __dmul_rn(double x, double y) noexcept { return x * y; }
inline double __ddiv_rn(double x, double y) noexcept { return x / y; }
inline double __drcp_rn(double x) noexcept { return 1.0 / x; }
inline double __dsqrt_rn(double x) noexcept { return sqrt(x); }
inline double __fma_rn(double x, double y, double z) noexcept { return fma(x, y, z); }

// min and max with CUDA's overloads (a signed and an unsigned argument compare as unsigned;
// a float and a double as double), and the named integer versions.
#define EMU_MINMAX(R, A, B)                                                                \
    inline R min(A a, B b) noexcept { return (R)a < (R)b ? (R)a : (R)b; }                  \
    inline R max(A a, B b) noexcept { return (R)a > (R)b ? (R)a : (R)b; }
EMU_MINMAX(int, int, int)
EMU_MINMAX(unsigned int, unsigned int, unsigned int)
EMU_MINMAX(unsigned int, int, unsigned int)
EMU_MINMAX(unsigned int, unsigned int, int)
EMU_MINMAX(long, long, long)
EMU_MINMAX(unsigned long, unsigned long, unsigned long)
EMU_MINMAX(unsigned long, long, unsigned long)
EMU_MINMAX(unsigned long, unsigned long, long)
EMU_MINMAX(long long, long long, long long)
EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
EMU_MINMAX(unsigned long long, long long, unsigned long long)
EMU_MINMAX(unsigned long long, unsigned long long, long long)
#undef EMU_MINMAX
// Floating-point min and max ignore a NaN argument, like fminf and fmaxf.
inline float min(float a, float b) noexcept { return fminf(a, b); }
inline float max(float a, float b) noexcept { return fmaxf(a, b); }
inline double min(double a, double b) noexcept { return fmin(a, b); }
inline double max(double a, double b) noexcept { return fmax(a, b); }
inline double min(float a, double b) noexcept { return fmin((double)a, b); }
inline double max(float a, double b) noexcept { return fmax((double)a, b); }
inline double min(double a, float b) noexcept { return fmin(a, (double)b); }
inline double max(double a, float b) noexcept { return fmax(a, (double)b); }
inline unsigned int umin(unsigned int a, unsigned int b) noexcept { return min(a, b); }
inline unsigned int umax(unsigned int a, unsigned int b) noexcept { return max(a, b); }
inline long long llmin(long long a, long long b) noexcept { return min(a, b); }
inline long long llmax(long long a, long long b) noexcept { return max(a, b); }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) noexcept
{
    return min(a, b);
}
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) noexcept
{
    return max(a, b);
}

// Reinterpreting bits, and the read-only cache load (an ordinary load on a CPU).
namespace emu {
template <typename To, typename From>
inline To bits(From from) noexcept
{
    static_assert(sizeof(To) == sizeof(From), "bits: sizes differ");
    To to;
    __builtin_memcpy(&to, &from, sizeof(To));
    return to;
}
}  // namespace emu
inline float __int_as_float(int x) noexcept { return emu::bits<float>(x); }
inline int __float_as_int(float x) noexcept { return emu::bits<int>(x); }
inline float __uint_as_float(unsigned int x) noexcept { return emu::bits<float>(x); }
inline unsigned int __float_as_uint(float x) noexcept { return emu::bits<unsigned int>(x); }
inline double __longlong_as_double(long long x) noexcept { return emu::bits<double>(x); }
inline long long __double_as_longlong(double x) noexcept { return emu::bits<long long>(x); }
template <typename T>
inline T __ldg(const T* p) noexcept
{
    return *p;
}

// Conversions with an explicit rounding: _rn to nearest even, _rz toward zero, _ru up, _rd
// down. Out-of-range values saturate and NaN gives 0, as on a GPU.
namespace emu {
// The integer type I's smallest and largest values, as integers and as doubles.
template <typename I>
struct range {
    static constexpr I lo = I(-1) < I(0) ? I(1ull << (8 * sizeof(I) - 1)) : I(0);
    static constexpr I hi = I(~lo);
    static constexpr double lo_f = (double)lo, hi_f = (double)hi;
};
template <typename I>
inline I saturate(double v) noexcept
{
    // hi_f may round up past hi (2^63 for long long): >= keeps the cast below in range.
    if (v != v) return I(0);
    if (v <= range<I>::lo_f) return range<I>::lo;
    return v >= range<I>::hi_f ? range<I>::hi : I(v);
}
}  // namespace emu
#define EMU_TO_INT(name, F, I)                                                             \
    inline I name##_rn(F x) noexcept { return emu::saturate<I>(rint(x)); }                 \
    inline I name##_rz(F x) noexcept { return emu::saturate<I>(trunc(x)); }                \
    inline I name##_ru(F x) noexcept { return emu::saturate<I>(ceil(x)); }                 \
    inline I name##_rd(F x) noexcept { return emu::saturate<I>(floor(x)); }
#define EMU_INT_LIMITS(T)                                                                  \
    EMU_TO_INT(__##T##2int, T, int)                                                        \
    EMU_TO_INT(__##T##2uint, T, unsigned int)                                              \
    EMU_TO_INT(__##T##2ll, T, long long)                                                   \
    EMU_TO_INT(__##T##2ull, T, unsigned long long)
EMU_INT_LIMITS(float)
EMU_INT_LIMITS(double)
#undef EMU_INT_LIMITS
#undef EMU_TO_INT
inline float __int2float_rn(int x) noexcept { return (float)x; }
inline float __uint2float_rn(unsigned int x) noexcept { return (float)x; }
inline float __ll2float_rn(long long x) noexcept { return (float)x; }
inline float __ull2float_rn(unsigned long long x) noexcept { return (float)x; }
inline double __int2double_rn(int x) noexcept { return (double)x; }
inline double __uint2double_rn(unsigned int x) noexcept { return (double)x; }
inline double __ll2double_rn(long long x) noexcept { return (double)x; }
inline double __ull2double_rn(unsigned long long x) noexcept { return (double)x; }
inline float __double2float_rn(double x) noexcept { return (float)x; }

// Integer intrinsics.
inline int __popc(unsigned int x) noexcept { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) noexcept { return __builtin_popcountll(x); }
inline int __clz(int x) noexcept { return x ? __builtin_clz((unsigned int)x) : 32; }
inline int __clzll(long long x) noexcept
{
    return x ? __builtin_clzll((unsigned long long)x) : 64;
}
inline int __ffs(int x) noexcept { return __builtin_ffs(x); }
inline int __ffsll(long long x) noexcept { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) noexcept
{
    unsigned int r = 0;
    for (int i = 0; i < 32; ++i, x >>= 1) r = (r << 1) | (x & 1u);
    return r;
}
inline unsigned long long __brevll(unsigned long long x) noexcept
{
    unsigned long long r = 0;
    for (int i = 0; i < 64; ++i, x >>= 1) r = (r << 1) | (x & 1ull);
    return r;
}
inline int __mulhi(int x, int y) noexcept { return (int)(((long long)x * y) >> 32); }
inline unsigned int __umulhi(unsigned int x, unsigned int y) noexcept
{
    return (unsigned int)(((unsigned long long)x * y) >> 32);
}
namespace emu {
__extension__ typedef __int128 int128;  // __extension__: allowed under -pedantic-errors
__extension__ typedef unsigned __int128 uint128;
}  // namespace emu
inline long long __mul64hi(long long x, long long y) noexcept
{
    return (long long)(((emu::int128)x * y) >> 64);
}
inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) noexcept
{
    return (unsigned long long)(((emu::uint128)x * y) >> 64);
}
inline int __mul24(int x, int y) noexcept
{
    return ((int)((unsigned int)x << 8) >> 8) * ((int)((unsigned int)y << 8) >> 8);
}
inline unsigned int __umul24(unsigned int x, unsigned int y) noexcept
{
    return (x & 0xffffffu) * (y & 0xffffffu);
}
inline unsigned int __sad(int x, int y, unsigned int z) noexcept
{
    return z + (unsigned int)(x > y ? x - y : y - x);
}
inline unsigned int __usad(unsigned int x, unsigned int y, unsigned int z) noexcept
{
    return z + (x > y ? x - y : y - x);
}

// ------------------------------------------------------------------------- 4. vector types

#define EMU_VECTOR(T, N, A2, A4)                                                           \
    struct N##1 { T x; };                                                                  \
    struct alignas(A2) N##2 { T x, y; };                                                   \
    struct N##3 { T x, y, z; };                                                            \
    struct alignas(A4) N##4 { T x, y, z, w; };                                             \
    inline N##1 make_##N##1(T x) { return N##1{x}; }                                       \
    inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }                               \
    inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }                       \
    inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
EMU_VECTOR(float, float, 8, 16)
EMU_VECTOR(double, double, 16, 16)
EMU_VECTOR(int, int, 8, 16)
EMU_VECTOR(long long, longlong, 16, 16)
EMU_VECTOR(unsigned long long, ulonglong, 16, 16)
EMU_VECTOR(signed char, char, 2, 4)
EMU_VECTOR(unsigned char, uchar, 2, 4)
EMU_VECTOR(short, short, 4, 8)
EMU_VECTOR(unsigned short, ushort, 4, 8)
#undef EMU_VECTOR
// uint3 is declared above, for threadIdx.
struct uint1 { unsigned int x; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline uint1 make_uint1(unsigned int x) { return uint1{x}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w)
{
    return uint4{x, y, z, w};
}

// ------------------------------------------------------------- 5. printf, assert and __trap

// printf writes to the process's standard output (in Jupyter: the terminal that runs the
// kernel server, or the cell when the kernel captures it), flushed after every launch.
extern "C" int printf(const char* format, ...);

namespace emu {
extern "C" int snprintf(char* buffer, size_t size, const char* format, ...);
extern "C" int fflush(void* stream);

// A failed assert or a __trap() stops the launch; Python raises it as a RuntimeError.
struct Trap {
    const char* what;
    const char* file;
    int line;
};
[[noreturn]] inline void trap(const char* what, const char* file, int line)
{
    throw Trap{what, file, line};
}
inline thread_local char last_error[1024];
}  // namespace emu

#ifdef NDEBUG
#define assert(condition) ((void)0)
#else
#define assert(condition)                                                                  \
    ((condition) ? (void)0 : emu::trap("assertion failed: " #condition, __FILE__, __LINE__))
#endif
#define __trap() emu::trap("__trap() called", __FILE__, __LINE__)

// ------------------------------------------------------------------------------ 6. launcher

// Like cuLaunchKernel, it receives the arguments as an array of pointers, one per kernel
// parameter, each pointing at that parameter's value.
namespace emu {

template <size_t... I>
struct index_sequence {};
template <size_t N, size_t... I>
struct make_index_sequence : make_index_sequence<N - 1, N - 1, I...> {};
template <size_t... I>
struct make_index_sequence<0, I...> {
    using type = index_sequence<I...>;
};

template <typename... Params, size_t... I>
inline void run_thread(void (*kernel)(Params...), void** args, index_sequence<I...>)
{
    // Read parameter I from args[I], typed as the kernel declares it.
    kernel(*static_cast<Params*>(args[I])...);
}

// Runs blocks first .. last - 1 of a grid of `grid` blocks: the launcher calls it chunk by
// chunk, so that Python can stop a long launch (Ctrl-C) between two chunks.
// Returns 0, or 1 after a failed assert or a __trap() (the reason in last_error).
template <typename... Params>
int launch(void (*kernel)(Params...), unsigned int grid, unsigned int block, unsigned int first,
           unsigned int last, void** args)
{
    // A one-dimensional grid of one-dimensional blocks, run block by block, thread by thread.
    using indices = typename make_index_sequence<sizeof...(Params)>::type;
    grid_size = dim3(grid);
    block_size = dim3(block);
    unsigned int b = 0, t = 0;
    try {
        for (b = first; b < last && b < grid; ++b) {
            for (t = 0; t < block; ++t) {
                block_index = uint3{b, 0, 0};
                thread_index = uint3{t, 0, 0};
                run_thread(kernel, args, indices{});
            }
        }
    } catch (const Trap& stop) {
        snprintf(last_error, sizeof last_error, "%s (%s:%d, block %u, thread %u)", stop.what,
                 stop.file, stop.line, b, t);
        fflush(nullptr);
        return 1;
    }
    fflush(nullptr);
    return 0;
}

}  // namespace emu
