// LayerNorm forward and backward over rows of the f32 residual stream: 16 lanes per row (a
// half-warp), the lanes' partial sums added in lane order, so that every row equals
// crate::layernorm's bit for bit in f32; dγ/dβ by column partials of LN_BWD_ROWS rows added in
// block order (no atomics). Shapes and formulas: the launchers in layernorm.rs.
#include "common.cuh"

template <class T>
__device__ void layernorm_fwd_impl(T* y, float* mean, float* rstd, const float* x, const float* w, const float* b,
                                   float eps, int n, int d) {
    long long g = gtid();
    long long row = g >> 4;
    int l = (int)(g & 15);
    bool ok = row < n;  // rows past the end still take part in the shuffles
    const float* xr = x + (ok ? row : 0) * d;
    float s = ok ? rd::ln_lane_sum(xr, d, l) : 0.0f;
    float mu = rd::div32(sum16_in_order(s), (float)d);
    float v = ok ? rd::ln_lane_var(xr, d, l, mu) : 0.0f;
    float rs = rd::ln_rstd(sum16_in_order(v), d, eps);
    if (!ok) return;
    T* yr = y + row * d;
    for (int j = l; j < d; j += rd::LN_LANES) yr[j] = rd::from_f32<T>(rd::ln_fwd_elem(xr[j], mu, rs, w[j], b[j]));
    if (l == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}
#define K_LN_FWD(SUF, T)                                                                                    \
    extern "C" __global__ void layernorm_fwd_##SUF(T* y, float* mean, float* rstd, const float* x, const float* w, \
                                                   const float* b, float eps, int n, int d) {               \
        layernorm_fwd_impl<T>(y, mean, rstd, x, w, b, eps, n, d);                                           \
    }
RD_FOR_EACH_T(K_LN_FWD)

template <class T>
__device__ void layernorm_bwd_impl(float* dx, const T* dy, const float* x, const float* w, const float* mean,
                                   const float* rstd, int n, int d, int accumulate) {
    long long g = gtid();
    long long row = g >> 4;
    int l = (int)(g & 15);
    bool ok = row < n;
    long long r0 = ok ? row : 0;
    const float* xr = x + r0 * d;
    const T* dyr = dy + r0 * d;
    float mu = mean[r0], rs = rstd[r0];
    float sg = 0.0f, sgx = 0.0f;
    if (ok) rd::ln_bwd_lane(dyr, xr, w, d, l, mu, rs, &sg, &sgx);
    float inv_d = rd::div32(1.0f, (float)d);
    float mg = sum16_in_order(sg) * inv_d, mgx = sum16_in_order(sgx) * inv_d;
    if (!ok) return;
    float* dxr = dx + row * d;
    for (int j = l; j < d; j += rd::LN_LANES) {
        float v = rd::ln_bwd_elem(rd::to_f32(dyr[j]), xr[j], w[j], mu, rs, mg, mgx);
        dxr[j] = accumulate ? dxr[j] + v : v;
    }
}
#define K_LN_BWD(SUF, T)                                                                                      \
    extern "C" __global__ void layernorm_bwd_##SUF(float* dx, const T* dy, const float* x, const float* w,      \
                                                   const float* mean, const float* rstd, int n, int d,        \
                                                   int accumulate) {                                          \
        layernorm_bwd_impl<T>(dx, dy, x, w, mean, rstd, n, d, accumulate);                                    \
    }
RD_FOR_EACH_T(K_LN_BWD)

/// Column partials of block `blk` (rows blk·32 .. blk·32 + 32, in order):
/// `part[blk·2D + j] = Σ dy⊙x̂`, `part[blk·2D + D + j] = Σ dy` (crate::layernorm's scratch).
template <class T>
__device__ void layernorm_bwd_partials_impl(float* part, const T* dy, const float* x, const float* mean,
                                            const float* rstd, int n, int d) {
    long long i = gtid();
    int blocks = (n + rd::LN_BWD_ROWS - 1) / rd::LN_BWD_ROWS;
    if (i >= (long long)blocks * d) return;
    int blk = (int)(i / d), j = (int)(i % d);
    int r1 = min(n, (blk + 1) * rd::LN_BWD_ROWS);
    float pg = 0.0f, pb = 0.0f;
#pragma unroll 8
    for (int r = blk * rd::LN_BWD_ROWS; r < r1; ++r) {
        long long o = (long long)r * d + j;
        float dyv = rd::to_f32(dy[o]);
        float xh = (x[o] - mean[r]) * rstd[r];
        pg += dyv * xh;
        pb += dyv;
    }
    part[(long long)blk * 2 * d + j] = pg;
    part[(long long)blk * 2 * d + d + j] = pb;
}
#define K_LN_PART(SUF, T)                                                                                   \
    extern "C" __global__ void layernorm_bwd_partials_##SUF(float* part, const T* dy, const float* x,        \
                                                            const float* mean, const float* rstd, int n, int d) { \
        layernorm_bwd_partials_impl<T>(part, dy, x, mean, rstd, n, d);                                      \
    }
RD_FOR_EACH_T(K_LN_PART)
