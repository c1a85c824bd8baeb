// Exact (erf) GELU with dropout after the fc1 GEMM, its recomputation from the recorded mask
// and its backward. Shapes and formulas: the launchers in gelu.rs.
#include "common.cuh"

template <class T>
__device__ void gelu_dropout_fwd_impl(T* h, uint8_t* keep, const T* pre, const uint32_t* row_keys, rd::SiteKey k,
                                      int active, int rows, int n) {
    SAMPLE_BLOCK_PROLOGUE
    for (int q = 0; q < 4; ++q) {
        int e = 4 * blk + q;
        if (e >= n) break;
        long long o = (long long)r * n + e;
        float g = rd::gelu(rd::to_f32(pre[o]));
        if (active) {
            bool kept = rd::keep_of(w[q], k.thr);
            keep[o] = kept;
            g = rd::apply_keep(g, kept, k.scale);
        }
        h[o] = rd::from_f32<T>(g);
    }
}
#define K_GELU_FWD(SUF, T)                                                                               \
    extern "C" __global__ void gelu_dropout_fwd_##SUF(T* h, uint8_t* keep, const T* pre, const uint32_t* row_keys, \
                                                      SITE_PARAMS, int rows, int n) {                    \
        gelu_dropout_fwd_impl<T>(h, keep, pre, row_keys, SITE_KEY, active, rows, n);                     \
    }
RD_FOR_EACH_T(K_GELU_FWD)

/// `h = keep ? gelu(pre)·scale : 0` from a recorded mask (`h = gelu(pre)` without one): the
/// forward's GELU + dropout recomputed in the backward without regenerating the mask.
#define K_GELU_KEEP(SUF, T)                                                                            \
    extern "C" __global__ void gelu_apply_keep_##SUF(T* h, const T* pre, const uint8_t* keep, int use_keep, \
                                                     float scale, int n) {                             \
        long long i = gtid();                                                                          \
        if (i < n) h[i] = rd::from_f32<T>(masked(rd::gelu(rd::to_f32(pre[i])), keep, i, use_keep, scale)); \
    }
RD_FOR_EACH_T(K_GELU_KEEP)

/// `dpre = (keep ? dh·scale : 0) · gelu'(pre)` (crate::gelu::gelu_bwd_inplace after
/// crate::dropout::apply_keep). `dpre` may be `dh` (in place).
#define K_GELU_BWD(SUF, T)                                                                              \
    extern "C" __global__ void gelu_dropout_bwd_##SUF(T* dpre, const T* dh, const T* pre, const uint8_t* keep, \
                                                      int use_keep, float scale, int n) {               \
        long long i = gtid();                                                                           \
        if (i >= n) return;                                                                             \
        float g = masked(rd::to_f32(dh[i]), keep, i, use_keep, scale);                                  \
        dpre[i] = rd::from_f32<T>(g * rd::gelu_grad(rd::to_f32(pre[i])));                               \
    }
RD_FOR_EACH_T(K_GELU_BWD)
