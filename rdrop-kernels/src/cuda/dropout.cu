// Dropout on the residual branch (the Philox mask of each sample row recorded as bytes) and
// recorded masks applied again in the backward. Shapes and formulas: the launchers in
// dropout.rs.
#include "common.cuh"

template <class T>
__device__ void residual_dropout_add_impl(float* out, uint8_t* keep, const float* res, const T* y,
                                          const uint32_t* row_keys, rd::SiteKey k, int active, int rows, int n) {
    SAMPLE_BLOCK_PROLOGUE
    for (int q = 0; q < 4; ++q) {
        int e = 4 * blk + q;
        if (e >= n) break;
        long long o = (long long)r * n + e;
        float yv = rd::to_f32(y[o]);
        if (active) {
            bool kept = rd::keep_of(w[q], k.thr);
            keep[o] = kept;
            out[o] = rd::residual_elem(res[o], yv, kept, k.scale);
        } else {
            out[o] = res[o] + yv;
        }
    }
}
#define K_RESIDUAL(SUF, T)                                                                                 \
    extern "C" __global__ void residual_dropout_add_##SUF(float* out, uint8_t* keep, const float* res, const T* y, \
                                                          const uint32_t* row_keys, SITE_PARAMS, int rows, int n) { \
        residual_dropout_add_impl<T>(out, keep, res, y, row_keys, SITE_KEY, active, rows, n);              \
    }
RD_FOR_EACH_T(K_RESIDUAL)

#define K_APPLY_KEEP(SUF, T)                                                                           \
    extern "C" __global__ void apply_keep_##SUF(T* out, const T* x, const uint8_t* keep, int use_keep, \
                                                float scale, int n) {                                  \
        long long i = gtid();                                                                          \
        if (i < n) out[i] = rd::from_f32<T>(masked(rd::to_f32(x[i]), keep, i, use_keep, scale));       \
    }
RD_FOR_EACH_T(K_APPLY_KEEP)

#define K_DROPOUT_GRAD(SUF, T)                                                                            \
    extern "C" __global__ void dropout_grad_##SUF(T* dy, const float* dres, const uint8_t* keep, int use_keep, \
                                                  float scale, int n) {                                   \
        long long i = gtid();                                                                             \
        if (i < n) dy[i] = rd::from_f32<T>(masked(dres[i], keep, i, use_keep, scale));                    \
    }
RD_FOR_EACH_T(K_DROPOUT_GRAD)
