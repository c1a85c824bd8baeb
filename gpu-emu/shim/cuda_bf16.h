// `__nv_bfloat16` of the host-compiled kernels (see cuda_shim.h): two bytes holding the upper
// half of an f32, with CUDA's conversions in integer arithmetic: `__float2bfloat16_rn` rounds
// to nearest even (overflow to ±inf) and gives the canonical NaN 0x7fff for every NaN;
// `__bfloat162float` is exact (the bits shifted up, NaN payloads kept).
#pragma once
#include "cuda_shim.h"

__attribute__((always_inline)) inline uint16_t rdemu_f32_to_bf16_bits(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);                       // round to nearest even
    return (uint16_t)(u >> 16);
}

__attribute__((always_inline)) inline float rdemu_bf16_bits_to_f32(uint16_t b) {
    return __builtin_bit_cast(float, (uint32_t)b << 16);
}

struct __nv_bfloat16_raw {
    unsigned short x;
};

struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(rdemu_f32_to_bf16_bits(f)) {}
    __nv_bfloat16(double f) : __x(rdemu_f32_to_bf16_bits((float)f)) {}
    constexpr operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
    operator float() const { return rdemu_bf16_bits_to_f32(__x); }
};
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "__nv_bfloat16 is 2 bytes");
static_assert(std::is_trivially_copyable<__nv_bfloat16>::value, "__nv_bfloat16 is trivially copyable");

typedef __nv_bfloat16 nv_bfloat16;

__attribute__((always_inline)) inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    return __nv_bfloat16_raw{rdemu_f32_to_bf16_bits(f)};
}
__attribute__((always_inline)) inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
__attribute__((always_inline)) inline float __bfloat162float(__nv_bfloat16 b) { return rdemu_bf16_bits_to_f32(b.__x); }
__attribute__((always_inline)) inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
__attribute__((always_inline)) inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    return __nv_bfloat16_raw{u};
}
