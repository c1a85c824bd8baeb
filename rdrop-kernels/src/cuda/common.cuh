// Device-only helpers of the kernels: lane-group shuffles and per-type instantiation.
#pragma once

#include "math.cuh"

typedef __nv_bfloat16 bf16;
typedef __half f16;

/// Global thread index.
__device__ __forceinline__ long long gtid() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }

/// `Σ_l v_l` over the 16 lanes of a half-warp in lane order (v_0 + v_1 + ... + v_15): every
/// lane gets the same sum (rd::ln_lane_sum's partials combined as crate::layernorm::lane_sum).
/// All 32 lanes of the warp must call it.
__device__ __forceinline__ float sum16_in_order(float v) {
    float s = __shfl_sync(0xffffffffu, v, 0, 16);
#pragma unroll
    for (int l = 1; l < 16; ++l) s += __shfl_sync(0xffffffffu, v, l, 16);
    return s;
}

/// The eight lane values of a group of 8 (`out[l]` = lane l's `v`), on every lane of the group.
__device__ __forceinline__ void gather8(float v, float out[8]) {
#pragma unroll
    for (int l = 0; l < 8; ++l) out[l] = __shfl_sync(0xffffffffu, v, l, 8);
}

/// Maximum over a group of 8 lanes (exact: any order gives the same result).
__device__ __forceinline__ float max8(float v) {
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) v = rd::sm_max(v, __shfl_xor_sync(0xffffffffu, v, o, 8));
    return v;
}

/// Butterfly sum over a warp in f64 (every lane gets the same value: a + b = b + a exactly).
__device__ __forceinline__ double warp_sum64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/// `M(suffix, type)` for each compute type: each kernel file defines a macro that writes the
/// extern "C" kernel `name_##suffix` calling its template, and expands it with this.
#define RD_FOR_EACH_T(M) M(f32, float) M(bf16, __nv_bfloat16) M(f16, __half)

/// The mask parameters of a site (rd::SiteKey) plus whether the site drops anything.
#define SITE_PARAMS uint32_t seed_lo, uint32_t seed_hi, uint32_t update, uint32_t site, uint32_t thr, float scale, int active
#define SITE_KEY rd::SiteKey{seed_lo, seed_hi, update, site, thr, scale}

/// `keep ? v·scale : 0`, or `v` without a mask.
__device__ __forceinline__ float masked(float v, const uint8_t* keep, long long i, int use_keep, float scale) {
    return use_keep ? rd::apply_keep(v, keep[i] != 0, scale) : v;
}

/// Thread `(r, blk)` of `rows` samples of `n` elements: elements 4·blk .. 4·blk + 4 of row r,
/// with the mask words of that Philox block (kernels with `row_keys`, `SITE_PARAMS`, `rows`, `n`).
#define SAMPLE_BLOCK_PROLOGUE                                   \
    long long idx = gtid();                                     \
    int per = (n + 3) / 4;                                      \
    if (idx >= (long long)rows * per) return;                   \
    int r = (int)(idx / per), blk = (int)(idx % per);           \
    uint32_t w[4];                                              \
    if (active) rd::mask_block(k, row_keys[2 * r], row_keys[2 * r + 1], (uint32_t)blk, w);
