// The update over the flat f32 buffers: global norm (f64, fixed order), clip coefficient on
// the device, SGD-momentum / AdamW elements (crate::optim bit for bit) that also write the
// compute-type copy of the parameters, and a scale (the f16 loss scaler's un-scaling).
// Shapes and formulas: the launchers in optim.rs.
#include "common.cuh"

/// Block partials of `Σ x²`: thread k of the grid sums elements k, k + G, ... (G = grid size)
/// in f64, then a butterfly per warp and the 8 warp sums in order.
extern "C" __global__ void sum_squares_partials(double* part, const float* x, int n) {
    __shared__ double warps[32];
    long long stride = (long long)gridDim.x * blockDim.x;
    double acc = 0.0;
    for (long long i = gtid(); i < n; i += stride) {
        double v = (double)x[i];
        acc += v * v;
    }
    acc = warp_sum64(acc);
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) warps[wid] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = warps[0];
        for (int k = 1; k < (int)(blockDim.x >> 5); ++k) s += warps[k];
        part[blockIdx.x] = s;
    }
}

/// One warp: `out[0] (+)= Σ part` (lane-strided, then a butterfly).
extern "C" __global__ void sum_squares_finish(double* out, const double* part, int nparts, int accumulate) {
    int lane = threadIdx.x & 31;
    double acc = 0.0;
    for (int i = lane; i < nparts; i += 32) acc += part[i];
    acc = warp_sum64(acc);
    if (lane == 0) out[0] = accumulate ? out[0] + acc : acc;
}

/// `norm = √sumsq`, `coef = clip_coef(norm, max_norm)` (max_norm < 0: infinite).
extern "C" __global__ void clip_coef(float* coef, double* norm, const double* sumsq, float max_norm) {
    if (gtid() != 0) return;
    double nn = sqrt(sumsq[0]);
    norm[0] = nn;
    coef[0] = rd::clip_coef(nn, max_norm);
}

#define K_SGD(SUF, T)                                                                                        \
    extern "C" __global__ void sgd_update_##SUF(float* p, T* pt, const float* g, float* mom, const float* coef, \
                                                float lr, float mu, float wd, int nesterov, int first, int n) { \
        long long i = gtid();                                                                                \
        if (i >= n) return;                                                                                  \
        float b = mu != 0.0f ? mom[i] : 0.0f;                                                                \
        float np = rd::sgd_elem(p[i], g[i], &b, coef[0], lr, mu, wd, nesterov != 0, first != 0);             \
        if (mu != 0.0f) mom[i] = b;                                                                          \
        p[i] = np;                                                                                           \
        if (pt) pt[i] = rd::from_f32<T>(np);                                                                 \
    }
RD_FOR_EACH_T(K_SGD)

#define K_ADAMW(SUF, T)                                                                                       \
    extern "C" __global__ void adamw_update_##SUF(float* p, T* pt, const float* g, float* m, float* v,          \
                                                  const float* coef, float decay, float one_m_b1, float b2,   \
                                                  float one_m_b2, float inv_bc2_sqrt, float eps, float step_size, \
                                                  int do_decay, int n) {                                      \
        long long i = gtid();                                                                                 \
        if (i >= n) return;                                                                                   \
        rd::AdamCoef k{decay, one_m_b1, b2, one_m_b2, inv_bc2_sqrt, eps, step_size};                          \
        float mm = m[i], vv = v[i];                                                                           \
        float np = rd::adamw_elem(p[i], coef[0] * g[i], &mm, &vv, k, do_decay != 0);                          \
        m[i] = mm;                                                                                            \
        v[i] = vv;                                                                                            \
        p[i] = np;                                                                                            \
        if (pt) pt[i] = rd::from_f32<T>(np);                                                                  \
    }
RD_FOR_EACH_T(K_ADAMW)

extern "C" __global__ void scale_inplace(float* x, float s, int n) {
    long long i = gtid();
    if (i < n) x[i] *= s;
}
