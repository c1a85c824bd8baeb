// The shim's bf16/f16 conversions, exported for tests/shim_conversions.rs (built by
// build/kernels.rs into OUT_DIR/kernels/shim_selftest.so with cuda_shim.h force-included, not
// instrumented).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define RDEMU_EXPORT extern "C" __attribute__((visibility("default")))

RDEMU_EXPORT uint16_t rdemu_f2bf(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
RDEMU_EXPORT float rdemu_bf2f(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
RDEMU_EXPORT uint16_t rdemu_f2h(float f) { return __half_as_ushort(__float2half_rn(f)); }
RDEMU_EXPORT float rdemu_h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
