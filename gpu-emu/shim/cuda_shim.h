// The CUDA device environment of a host-compiled kernel module: force-included (`g++ -include
// cuda_shim.h -I gpu-emu/shim`) before an unchanged rdrop `.cu` file, so that the file compiles
// as nvcc's device pass sees it (`__CUDACC__`, `__CUDA_ARCH__` = 900) into plain C++ functions
// that the emulated driver (gpu-emu/src/launch.rs) runs once per CUDA thread, each thread a
// fiber of one OS thread per block.
//
// - Thread indices, barriers, shuffles, votes and fences call the driver through `rdemu_api`
//   (rdemu_api.h), by way of the out-of-line `rdemu_rt_*` functions of asan_hooks.cpp, which
//   is compiled without instrumentation: reading the api table is no access of kernel code.
// - `__shared__` is `static thread_local`: all threads of a block share their OS thread, so a
//   thread-local variable is exactly a block's shared memory (the module's TLS block is its
//   shared memory, see `rdemu_module.shared_range`).
// - Memory accesses of kernel code are checked: the kernels are compiled with GCC's
//   -fsanitize=kernel-address, whose hooks (asan_hooks.cpp) forward to `rdemu_api.check`.
//
// Build modes: by default the module build; with RDEMU_SCAN (the build script's `g++ -E` scan
// of the kernels) `__global__` becomes the marker token RDEMU_KERNEL and `__shared__` the
// marker RDEMU_SHARED.
#pragma once

// The host headers first, compiled as host code.
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

#include "rdemu_api.h"

// Then the kernels see nvcc's device pass.
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#define RDEMU_SHIM 1

// ------------------------------------------------------------------------- driver services
// Defined in asan_hooks.cpp (not instrumented), hidden in the module.
extern "C" {
rdemu_dim3 rdemu_rt_thread_idx(void);
rdemu_dim3 rdemu_rt_block_idx(void);
rdemu_dim3 rdemu_rt_block_dim(void);
rdemu_dim3 rdemu_rt_grid_dim(void);
void rdemu_rt_syncthreads(void);
void rdemu_rt_syncwarp(unsigned mask);
uint64_t rdemu_rt_shfl(int kind, unsigned mask, uint64_t value, int size, int lane_or_delta, int width);
unsigned rdemu_rt_vote(int kind, unsigned mask, int pred);
void rdemu_rt_unsupported(const char* what);
void rdemu_rt_threadfence(void);
void rdemu_rt_set_api(const rdemu_api* api);
void rdemu_rt_shared_range(void** start, size_t* bytes);
}

// ------------------------------------------------------------------------------ qualifiers
#ifdef RDEMU_SCAN
#define __global__ RDEMU_KERNEL
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ __attribute__((always_inline)) inline
// After the standard headers above: libstdc++ spells `__attribute__((__noinline__))`.
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
#define __managed__ __managed__memory_is_not_supported_by_rdrop_gpu_emu
#define __constant__ __constant__memory_is_not_supported_by_rdrop_gpu_emu
// `extern __shared__` (dynamic shared memory) is not supported by rdrop-gpu-emu (rdrop's
// kernels use only static __shared__ arrays): the build script's scan, where `__shared__` is
// the marker RDEMU_SHARED, rejects it by name; the compiler would say "conflicting specifiers".
#ifdef RDEMU_SCAN
#define __shared__ RDEMU_SHARED
#else
#define __shared__ static thread_local
#endif
// `__restrict__` is a GCC keyword already.

// ----------------------------------------------------------------------- built-in variables
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

namespace rdemu_shim {
__attribute__((always_inline)) inline uint3 u3(rdemu_dim3 d) { return uint3{d.x, d.y, d.z}; }
__attribute__((always_inline)) inline dim3 d3(rdemu_dim3 d) { return dim3(d.x, d.y, d.z); }
template <class...>
constexpr bool always_false = false;
}  // namespace rdemu_shim

// Values (calls into the driver), never memory reads of the module.
#define threadIdx (::rdemu_shim::u3(::rdemu_rt_thread_idx()))
#define blockIdx (::rdemu_shim::u3(::rdemu_rt_block_idx()))
#define blockDim (::rdemu_shim::d3(::rdemu_rt_block_dim()))
#define gridDim (::rdemu_shim::d3(::rdemu_rt_grid_dim()))
static constexpr int warpSize = 32;

// ------------------------------------------------------------------ barriers, fences, trap
__attribute__((always_inline)) inline void __syncthreads() { rdemu_rt_syncthreads(); }
__attribute__((always_inline)) inline void __syncwarp(unsigned mask = 0xffffffffu) { rdemu_rt_syncwarp(mask); }
__attribute__((always_inline)) inline void __threadfence() { rdemu_rt_threadfence(); }
__attribute__((always_inline)) inline void __threadfence_block() { rdemu_rt_threadfence(); }
__attribute__((always_inline)) inline void __threadfence_system() { rdemu_rt_threadfence(); }
__attribute__((always_inline)) inline void __trap() { rdemu_rt_unsupported("__trap"); }
__attribute__((always_inline)) inline void __brkpt() { rdemu_rt_unsupported("__brkpt"); }

#define RDEMU_UNSUPPORTED_FN(NAME, WHY)                                                        \
    template <class... A>                                                                      \
    inline int NAME(A...) {                                                                    \
        static_assert(::rdemu_shim::always_false<A...>, #NAME " is not supported by rdrop-gpu-emu (" WHY ")"); \
        return 0;                                                                              \
    }
RDEMU_UNSUPPORTED_FN(__syncthreads_count, "not used by rdrop")
RDEMU_UNSUPPORTED_FN(__syncthreads_and, "not used by rdrop")
RDEMU_UNSUPPORTED_FN(__syncthreads_or, "not used by rdrop")
RDEMU_UNSUPPORTED_FN(__activemask, "not used by rdrop")
RDEMU_UNSUPPORTED_FN(__match_any_sync, "not used by rdrop")
RDEMU_UNSUPPORTED_FN(__match_all_sync, "not used by rdrop")
RDEMU_UNSUPPORTED_FN(__reduce_add_sync, "not used by rdrop")
RDEMU_UNSUPPORTED_FN(__nanosleep, "not used by rdrop")
RDEMU_UNSUPPORTED_FN(clock64, "no device clock")
RDEMU_UNSUPPORTED_FN(__shfl, "the pre-Volta shuffles without _sync")
RDEMU_UNSUPPORTED_FN(__shfl_up, "the pre-Volta shuffles without _sync")
RDEMU_UNSUPPORTED_FN(__shfl_down, "the pre-Volta shuffles without _sync")
RDEMU_UNSUPPORTED_FN(__shfl_xor, "the pre-Volta shuffles without _sync")
RDEMU_UNSUPPORTED_FN(__ballot, "the pre-Volta votes without _sync")
RDEMU_UNSUPPORTED_FN(__any, "the pre-Volta votes without _sync")
RDEMU_UNSUPPORTED_FN(__all, "the pre-Volta votes without _sync")
#define RDEMU_NO_ATOMICS "rdrop's kernels use no atomics"
RDEMU_UNSUPPORTED_FN(atomicAdd, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicSub, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicExch, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicMin, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicMax, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicInc, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicDec, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicCAS, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicAnd, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicOr, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicXor, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicAdd_block, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicAdd_system, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicCAS_block, RDEMU_NO_ATOMICS)
RDEMU_UNSUPPORTED_FN(atomicExch_block, RDEMU_NO_ATOMICS)

// -------------------------------------------------------------------------- bit casts
template <class To, class From>
__attribute__((always_inline)) inline To rdemu_bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "rdemu_bit_cast: sizes differ");
    return __builtin_bit_cast(To, v);
}
__attribute__((always_inline)) inline float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
__attribute__((always_inline)) inline unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }
__attribute__((always_inline)) inline float __int_as_float(int u) { return __builtin_bit_cast(float, u); }
__attribute__((always_inline)) inline int __float_as_int(float f) { return __builtin_bit_cast(int, f); }
__attribute__((always_inline)) inline double __longlong_as_double(long long u) { return __builtin_bit_cast(double, u); }
__attribute__((always_inline)) inline long long __double_as_longlong(double f) { return __builtin_bit_cast(long long, f); }
__attribute__((always_inline)) inline int __double2hiint(double d) {
    return (int)(__builtin_bit_cast(unsigned long long, d) >> 32);
}
__attribute__((always_inline)) inline int __double2loint(double d) {
    return (int)(unsigned)__builtin_bit_cast(unsigned long long, d);
}

// ------------------------------------------------------------------------------ shuffles
namespace rdemu_shim {
template <class T>
__attribute__((always_inline)) inline T shfl(int kind, unsigned mask, T v, int lane, int width) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "rdrop-gpu-emu shuffles 4- and 8-byte values");
    if constexpr (sizeof(T) == 4) {
        uint64_t r = rdemu_rt_shfl(kind, mask, (uint64_t)__builtin_bit_cast(uint32_t, v), 4, lane, width);
        return __builtin_bit_cast(T, (uint32_t)r);
    } else {
        uint64_t r = rdemu_rt_shfl(kind, mask, __builtin_bit_cast(uint64_t, v), 8, lane, width);
        return __builtin_bit_cast(T, r);
    }
}
}  // namespace rdemu_shim

#define RDEMU_SHFL_T(T)                                                                                    \
    __attribute__((always_inline)) inline T __shfl_sync(unsigned mask, T var, int lane, int width = 32) {    \
        return ::rdemu_shim::shfl<T>(RDEMU_SHFL_IDX, mask, var, lane, width);                               \
    }                                                                                                      \
    __attribute__((always_inline)) inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) { \
        return ::rdemu_shim::shfl<T>(RDEMU_SHFL_UP, mask, var, (int)delta, width);                          \
    }                                                                                                      \
    __attribute__((always_inline)) inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) { \
        return ::rdemu_shim::shfl<T>(RDEMU_SHFL_DOWN, mask, var, (int)delta, width);                        \
    }                                                                                                      \
    __attribute__((always_inline)) inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) { \
        return ::rdemu_shim::shfl<T>(RDEMU_SHFL_XOR, mask, var, lane_mask, width);                          \
    }
RDEMU_SHFL_T(int)
RDEMU_SHFL_T(unsigned)
RDEMU_SHFL_T(long)
RDEMU_SHFL_T(unsigned long)
RDEMU_SHFL_T(long long)
RDEMU_SHFL_T(unsigned long long)
RDEMU_SHFL_T(float)
RDEMU_SHFL_T(double)
#undef RDEMU_SHFL_T

__attribute__((always_inline)) inline unsigned __ballot_sync(unsigned mask, int pred) {
    return rdemu_rt_vote(RDEMU_VOTE_BALLOT, mask, pred);
}
__attribute__((always_inline)) inline int __any_sync(unsigned mask, int pred) {
    return (int)rdemu_rt_vote(RDEMU_VOTE_ANY, mask, pred);
}
__attribute__((always_inline)) inline int __all_sync(unsigned mask, int pred) {
    return (int)rdemu_rt_vote(RDEMU_VOTE_ALL, mask, pred);
}

// ------------------------------------------------------------------------------ intrinsics
// Correctly rounded (nvcc --fmad=false; the modules are built with -ffp-contract=off).
__attribute__((always_inline)) inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
__attribute__((always_inline)) inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
__attribute__((always_inline)) inline float __fsqrt_rn(float x) { return std::sqrt(x); }
__attribute__((always_inline)) inline double __dsqrt_rn(double x) { return std::sqrt(x); }
__attribute__((always_inline)) inline float __fdiv_rn(float a, float b) { return a / b; }
__attribute__((always_inline)) inline float __fadd_rn(float a, float b) { return a + b; }
__attribute__((always_inline)) inline float __fsub_rn(float a, float b) { return a - b; }
__attribute__((always_inline)) inline float __fmul_rn(float a, float b) { return a * b; }
__attribute__((always_inline)) inline float __frcp_rn(float a) { return 1.0f / a; }
__attribute__((always_inline)) inline double __ddiv_rn(double a, double b) { return a / b; }
__attribute__((always_inline)) inline double __dadd_rn(double a, double b) { return a + b; }
__attribute__((always_inline)) inline double __dsub_rn(double a, double b) { return a - b; }
__attribute__((always_inline)) inline double __dmul_rn(double a, double b) { return a * b; }
__attribute__((always_inline)) inline double __drcp_rn(double a) { return 1.0 / a; }
// The fast approximations of the GPU, here the host's libm (results differ from a GPU's).
__attribute__((always_inline)) inline float __expf(float x) { return ::expf(x); }
__attribute__((always_inline)) inline float __logf(float x) { return ::logf(x); }
__attribute__((always_inline)) inline float __exp10f(float x) { return ::powf(10.0f, x); }
__attribute__((always_inline)) inline float __log2f(float x) { return ::log2f(x); }
__attribute__((always_inline)) inline float __powf(float x, float y) { return ::powf(x, y); }
__attribute__((always_inline)) inline float __sinf(float x) { return ::sinf(x); }
__attribute__((always_inline)) inline float __cosf(float x) { return ::cosf(x); }
__attribute__((always_inline)) inline float __tanf(float x) { return ::tanf(x); }
__attribute__((always_inline)) inline float __fdividef(float a, float b) { return a / b; }
__attribute__((always_inline)) inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
__attribute__((always_inline)) inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
__attribute__((always_inline)) inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }

// CUDA's overloaded min/max of the device math library.
#define RDEMU_MINMAX(T)                                                                   \
    __attribute__((always_inline)) inline T min(T a, T b) { return a < b ? a : b; }      \
    __attribute__((always_inline)) inline T max(T a, T b) { return a > b ? a : b; }
RDEMU_MINMAX(int)
RDEMU_MINMAX(unsigned)
RDEMU_MINMAX(long)
RDEMU_MINMAX(unsigned long)
RDEMU_MINMAX(long long)
RDEMU_MINMAX(unsigned long long)
#undef RDEMU_MINMAX
__attribute__((always_inline)) inline float min(float a, float b) { return ::fminf(a, b); }
__attribute__((always_inline)) inline float max(float a, float b) { return ::fmaxf(a, b); }
__attribute__((always_inline)) inline double min(double a, double b) { return ::fmin(a, b); }
__attribute__((always_inline)) inline double max(double a, double b) { return ::fmax(a, b); }
__attribute__((always_inline)) inline long long llmin(long long a, long long b) { return a < b ? a : b; }
__attribute__((always_inline)) inline long long llmax(long long a, long long b) { return a > b ? a : b; }
__attribute__((always_inline)) inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
__attribute__((always_inline)) inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }

__attribute__((always_inline)) inline int __popc(unsigned x) { return __builtin_popcount(x); }
__attribute__((always_inline)) inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
__attribute__((always_inline)) inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
__attribute__((always_inline)) inline int __clzll(long long x) {
    return x == 0 ? 64 : __builtin_clzll((unsigned long long)x);
}
__attribute__((always_inline)) inline int __ffs(int x) { return __builtin_ffs(x); }
__attribute__((always_inline)) inline int __ffsll(long long x) { return __builtin_ffsll(x); }
__attribute__((always_inline)) inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
__attribute__((always_inline)) inline int __mul24(int a, int b) {
    return (int)((long long)((a << 8) >> 8) * (long long)((b << 8) >> 8));
}
__attribute__((always_inline)) inline unsigned __umul24(unsigned a, unsigned b) {
    return (a & 0xffffffu) * (b & 0xffffffu);
}
__attribute__((always_inline)) inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
__attribute__((always_inline)) inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)(((unsigned long long)a * b) >> 32);
}
__attribute__((always_inline)) inline long long __mul64hi(long long a, long long b) {
    return (long long)(((__int128)a * b) >> 64);
}
__attribute__((always_inline)) inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

/// A read-only load: an ordinary (checked) load here.
template <class T>
__attribute__((always_inline)) inline T __ldg(const T* p) {
    return *p;
}

#include "cuda_fp16.h"
#include "cuda_bf16.h"
