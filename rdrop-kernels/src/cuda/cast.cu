// f32 to the compute type (round to nearest even; a copy for f32). Shapes: the launcher in
// cast.rs.
#include "common.cuh"

#define K_CAST(SUF, T)                                                                   \
    extern "C" __global__ void cast_f32_to_##SUF(T* out, const float* x, int n) {        \
        long long i = gtid();                                                            \
        if (i < n) out[i] = rd::from_f32<T>(x[i]);                                       \
    }
RD_FOR_EACH_T(K_CAST)
