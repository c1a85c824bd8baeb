// The R-Drop loss (CE of both passes + α·symmetric KL, label smoothing) and its gradient, in
// f64 as crate::loss::rdrop_loss: one warp per sample, lane partials combined by a butterfly;
// then one warp sums the samples' terms. Shapes and formulas: the launcher in loss.rs.
#include "common.cuh"

/// Maximum over a warp (exact in any order; rd::max32 as Rust's f32::max).
__device__ __forceinline__ float warp_max32(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = rd::max32(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/// `(max, log Σ exp(x − max))` of a row of `c` logits, every lane getting the same values.
__device__ __forceinline__ void max_lse(const float* x, int c, int lane, double* mx, double* lse) {
    float m = rd::bits_to_float(0xff800000u);
    for (int j = lane; j < c; j += 32) m = rd::max32(m, x[j]);
    double md = (double)warp_max32(m);
    double z = 0.0;
    for (int j = lane; j < c; j += 32) z += rd::exp64((double)x[j] - md);
    *mx = md;
    *lse = rd::log64(warp_sum64(z));
}

/// Warp `i` handles sample i: pass-0 logits row i, pass-1 row m + i; writes both gradient rows
/// and `out[4 + 3i ..] = (ce_i, D_i, bad_i)`.
extern "C" __global__ void rdrop_loss_rows(float* dl, double* out, const float* logits, const uint32_t* labels, int m,
                                           int c, double eps, double ce_w, double alpha_kl_w, double w) {
    long long g = gtid();
    long long i = g >> 5;
    int lane = (int)(g & 31);
    if (i >= m) return;  // whole warps leave together (m rows, 32 lanes each)
    const float* p = logits + i * c;
    const float* q = logits + (m + i) * c;
    rd::LossRow r;
    max_lse(p, c, lane, &r.pm, &r.pl);
    max_lse(q, c, lane, &r.qm, &r.ql);
    double kl_pq = 0.0, kl_qp = 0.0, sum_lp = 0.0, sum_lq = 0.0;
    for (int j = lane; j < c; j += 32) {
        double lp = (double)p[j] - r.pm - r.pl;
        double lq = (double)q[j] - r.qm - r.ql;
        kl_pq += rd::exp64(lp) * (lp - lq);
        kl_qp += rd::exp64(lq) * (lq - lp);
        sum_lp += lp;
        sum_lq += lq;
    }
    r.kl_pq = warp_sum64(kl_pq);
    r.kl_qp = warp_sum64(kl_qp);
    sum_lp = warp_sum64(sum_lp);
    sum_lq = warp_sum64(sum_lq);
    uint32_t y = labels[i];
    bool bad = y >= (uint32_t)c;
    double smooth = eps / (double)c;
    float* gp = dl + i * c;
    float* gq = dl + (m + i) * c;
    if (bad) {
        const float nan = rd::bits_to_float(0x7fc00000u);
        for (int j = lane; j < c; j += 32) gp[j] = gq[j] = nan;
        if (lane == 0) {
            out[4 + 3 * i] = (double)nan;
            out[4 + 3 * i + 1] = (double)nan;
            out[4 + 3 * i + 2] = 1.0;
        }
        return;
    }
    for (int j = lane; j < c; j += 32)
        rd::loss_grad_elem(r, p[j], q[j], j == (int)y, eps, smooth, ce_w, alpha_kl_w, w, &gp[j], &gq[j]);
    if (lane == 0) {
        double lp_y = (double)p[y] - r.pm - r.pl;
        double lq_y = (double)q[y] - r.qm - r.ql;
        out[4 + 3 * i] = (1.0 - eps) * -(lp_y + lq_y) - smooth * (sum_lp + sum_lq);
        out[4 + 3 * i + 1] = r.kl_pq + r.kl_qp;
        out[4 + 3 * i + 2] = 0.0;
    }
}

/// One warp: `out[0..4] = [ce + α·kl, ce, kl, bad]`, `ce = ce_w·Σ ce_i`, `kl = kl_w·Σ D_i`.
extern "C" __global__ void rdrop_loss_finish(double* out, int m, double ce_w, double kl_w, double alpha) {
    int lane = threadIdx.x & 31;
    double ce = 0.0, kl = 0.0, bad = 0.0;
    for (int i = lane; i < m; i += 32) {
        ce += out[4 + 3 * i];
        kl += out[4 + 3 * i + 1];
        bad += out[4 + 3 * i + 2];
    }
    ce = ce_w * warp_sum64(ce);
    kl = kl_w * warp_sum64(kl);
    bad = warp_sum64(bad);
    if (lane == 0) {
        out[0] = ce + alpha * kl;
        out[1] = ce;
        out[2] = kl;
        out[3] = bad;
    }
}
