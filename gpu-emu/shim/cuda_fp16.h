// `__half` of the host-compiled kernels (see cuda_shim.h): two bytes holding the IEEE binary16
// bits, with CUDA's conversions written in integer arithmetic (no F16C, no host FPU mode):
// `__float2half_rn` rounds to nearest even with subnormals, overflows to ±inf and gives the
// canonical NaN 0x7fff for every NaN; `__half2float` is exact (subnormals included) and gives
// the canonical NaN 0x7fffffff for every NaN (CUDA's own host implementation,
// `__internal_half2float`).
#pragma once
#include "cuda_shim.h"

__attribute__((always_inline)) inline uint16_t rdemu_f32_to_f16_bits(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fffu;                  // NaN
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // ≥ 65520 (and inf): ±inf
    if (a >= 0x38800000u) {                               // normal: ≥ 2^-14
        uint32_t m = a - 0x38000000u;                     // rebias 127 → 15
        m += 0xfffu + ((m >> 13) & 1u);                   // round to nearest even
        return (uint16_t)(sign | (m >> 13));
    }
    if (a <= 0x33000000u) return sign;                    // ≤ 2^-25: ±0 (2^-25 is a tie, to even)
    uint32_t e = a >> 23;                                 // 102 ..= 112
    uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;                            // 14 ..= 24: units of 2^-24
    uint32_t r = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;     // may carry into the smallest normal
    return (uint16_t)(sign | r);
}

__attribute__((always_inline)) inline float rdemu_f16_bits_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t e = ((uint32_t)h >> 10) & 0x1fu;
    uint32_t m = (uint32_t)h & 0x3ffu;
    uint32_t u;
    if (e == 0x1fu) {
        u = m != 0 ? 0x7fffffffu : (sign | 0x7f800000u);
    } else if (e == 0) {
        if (m == 0) {
            u = sign;
        } else {  // subnormal: m·2^-24, normalise
            int k = __builtin_clz(m) - 21;  // shifts that bring the leading 1 to bit 10
            m = (m << k) & 0x3ffu;
            u = sign | ((uint32_t)(113 - k) << 23) | (m << 13);
        }
    } else {
        u = sign | ((e + 112u) << 23) | (m << 13);
    }
    return __builtin_bit_cast(float, u);
}

struct __half_raw {
    unsigned short x;
};

struct __half {
    unsigned short __x;
    __half() = default;
    constexpr __half(__half_raw r) : __x(r.x) {}
    __half(float f) : __x(rdemu_f32_to_f16_bits(f)) {}
    __half(double f) : __x(rdemu_f32_to_f16_bits((float)f)) {}
    constexpr operator __half_raw() const { return __half_raw{__x}; }
    operator float() const { return rdemu_f16_bits_to_f32(__x); }
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half is 2 bytes");
static_assert(std::is_trivially_copyable<__half>::value, "__half is trivially copyable");

typedef __half half;

__attribute__((always_inline)) inline __half __float2half_rn(float f) { return __half_raw{rdemu_f32_to_f16_bits(f)}; }
__attribute__((always_inline)) inline __half __float2half(float f) { return __float2half_rn(f); }
__attribute__((always_inline)) inline float __half2float(__half h) { return rdemu_f16_bits_to_f32(h.__x); }
__attribute__((always_inline)) inline unsigned short __half_as_ushort(__half h) { return h.__x; }
__attribute__((always_inline)) inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }
__attribute__((always_inline)) inline short __half_as_short(__half h) { return (short)h.__x; }
__attribute__((always_inline)) inline __half __short_as_half(short u) { return __half_raw{(unsigned short)u}; }
