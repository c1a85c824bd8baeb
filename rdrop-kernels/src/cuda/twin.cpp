// Host build of the CUDA kernels' math (math.cuh), behind a C ABI for tests/cuda_twin.rs.
// Each function replays what one kernel does for one row or element, in the kernel's order:
// a loop over lanes stands for the lanes of a warp, and the shuffle reductions are replayed
// as the kernels do them (16 lanes in lane order for LayerNorm, 8 lanes + tail + fixed tree for
// the softmax, an xor butterfly for f64 warp sums). Compiled with -ffp-contract=off, as nvcc
// runs with --fmad=false, so each operation rounds as on the GPU.
#include "math.cuh"

namespace {

/// The kernels' f64 warp butterfly (`v += shfl_xor(v, o)`, o = 16, 8, 4, 2, 1).
double butterfly64(double v[32]) {
    for (int o = 16; o > 0; o >>= 1) {
        double nv[32];
        for (int l = 0; l < 32; ++l) nv[l] = v[l] + v[l ^ o];
        for (int l = 0; l < 32; ++l) v[l] = nv[l];
    }
    return v[0];
}

/// `sum16_in_order`: v_0 + v_1 + ... + v_15.
float sum16(const float v[16]) {
    float s = v[0];
    for (int l = 1; l < 16; ++l) s += v[l];
    return s;
}

rd::SiteKey site_key(uint32_t seed_lo, uint32_t seed_hi, uint32_t update, uint32_t site, uint32_t thr,
                     float scale) {
    return rd::SiteKey{seed_lo, seed_hi, update, site, thr, scale};
}

/// rdrop_kernels::dropout::KernelSite (`repr(C)`): a site as the kernels take it.
struct KernelSite {
    uint32_t seed_lo, seed_hi, update, site, thr;
    float scale;
    bool active;
};

rd::SiteKey key_of(const KernelSite* s) { return site_key(s->seed_lo, s->seed_hi, s->update, s->site, s->thr, s->scale); }

}  // namespace

extern "C" {

void rd_twin_philox(const uint32_t* ctr, uint32_t k0, uint32_t k1, uint32_t* out) {
    uint32_t c[4] = {ctr[0], ctr[1], ctr[2], ctr[3]};
    rd::philox4x32_10(c, k0, k1);
    for (int i = 0; i < 4; ++i) out[i] = c[i];
}

uint32_t rd_twin_mask_word(uint32_t seed_lo, uint32_t seed_hi, uint32_t update, uint32_t site, uint32_t sample,
                           uint32_t pass, uint32_t e) {
    rd::SiteKey k = site_key(seed_lo, seed_hi, update, site, 0, 1.0f);
    return rd::mask_word(k, sample, pass, e);
}

float rd_twin_erf(float z) { return rd::erf32(z); }
float rd_twin_gelu(float x) { return rd::gelu(x); }
float rd_twin_gelu_grad(float x) { return rd::gelu_grad(x); }

/// embed/residual/gelu kernels' sample row: thread per Philox block of 4 elements.
/// mode 0: dropout_fwd (x ← keep ? x·s : 0), 1: residual (out = res + m·y), 2: gelu + dropout.
/// `active == 0`: no mask (keep untouched).
void rd_twin_sample_row(int mode, float* out, uint8_t* keep, const float* a, const float* b, int n,
                        const KernelSite* s, uint32_t sample, uint32_t pass) {
    rd::SiteKey k = key_of(s);
    int active = s->active;
    int per = (n + 3) / 4;
    for (int blk = 0; blk < per; ++blk) {
        uint32_t w[4] = {0, 0, 0, 0};
        if (active) rd::mask_block(k, sample, pass, (uint32_t)blk, w);
        for (int q = 0; q < 4; ++q) {
            int e = 4 * blk + q;
            if (e >= n) break;
            bool kept = active ? rd::keep_of(w[q], k.thr) : true;
            if (active) keep[e] = kept;
            switch (mode) {
                case 0:
                    out[e] = active ? rd::apply_keep(a[e], kept, k.scale) : a[e];
                    break;
                case 1:
                    out[e] = active ? rd::residual_elem(a[e], b[e], kept, k.scale) : a[e] + b[e];
                    break;
                default: {
                    float g = rd::gelu(a[e]);
                    out[e] = active ? rd::apply_keep(g, kept, k.scale) : g;
                }
            }
        }
    }
}

/// gelu_dropout_bwd of one element: `(keep ? dh·s : 0)·gelu'(pre)`.
float rd_twin_gelu_dropout_bwd(float dh, float pre, int use_keep, int kept, float scale) {
    float g = use_keep ? rd::apply_keep(dh, kept != 0, scale) : dh;
    return g * rd::gelu_grad(pre);
}

/// layernorm_fwd over `n` rows (16 lanes a row).
void rd_twin_layernorm_fwd(float* y, float* mean, float* rstd, const float* x, const float* w, const float* b,
                           float eps, int n, int d) {
    for (int r = 0; r < n; ++r) {
        const float* xr = x + (long long)r * d;
        float part[16];
        for (int l = 0; l < 16; ++l) part[l] = rd::ln_lane_sum(xr, d, l);
        float mu = rd::div32(sum16(part), (float)d);
        for (int l = 0; l < 16; ++l) part[l] = rd::ln_lane_var(xr, d, l, mu);
        float rs = rd::ln_rstd(sum16(part), d, eps);
        for (int j = 0; j < d; ++j) y[(long long)r * d + j] = rd::ln_fwd_elem(xr[j], mu, rs, w[j], b[j]);
        mean[r] = mu;
        rstd[r] = rs;
    }
}

/// layernorm_bwd (dx +=) and its dγ/dβ partials + column reduction (+=), as the three kernels.
void rd_twin_layernorm_bwd(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w,
                           const float* mean, const float* rstd, int n, int d) {
    for (int r = 0; r < n; ++r) {
        long long o = (long long)r * d;
        float sg[16], sgx[16];
        for (int l = 0; l < 16; ++l) rd::ln_bwd_lane(dy + o, x + o, w, d, l, mean[r], rstd[r], &sg[l], &sgx[l]);
        float inv_d = rd::div32(1.0f, (float)d);
        float mg = sum16(sg) * inv_d, mgx = sum16(sgx) * inv_d;
        for (int j = 0; j < d; ++j) dx[o + j] += rd::ln_bwd_elem(dy[o + j], x[o + j], w[j], mean[r], rstd[r], mg, mgx);
    }
    int blocks = (n + rd::LN_BWD_ROWS - 1) / rd::LN_BWD_ROWS;
    for (int j = 0; j < d; ++j) {
        float aw = dw[j], ab = db[j];
        for (int blk = 0; blk < blocks; ++blk) {
            float pg = 0.0f, pb = 0.0f;
            int r1 = n < (blk + 1) * rd::LN_BWD_ROWS ? n : (blk + 1) * rd::LN_BWD_ROWS;
            for (int r = blk * rd::LN_BWD_ROWS; r < r1; ++r) {
                long long o = (long long)r * d + j;
                float xh = (x[o] - mean[r]) * rstd[r];
                pg += dy[o] * xh;
                pb += dy[o];
            }
            aw += pg;
            ab += pb;
        }
        dw[j] = aw;
        db[j] = ab;
    }
}

/// softmax_dropout_fwd of one row of `t` scores (P in place, A, keep); the row's mask elements
/// are `base .. base + t` of key (sample, pass).
void rd_twin_softmax_fwd_row(float* s, float* a, uint8_t* keep, int t, float scale, const KernelSite* site,
                             uint32_t sample, uint32_t pass, uint32_t base) {
    rd::SiteKey k = key_of(site);
    int active = site->active;
    float mx = rd::bits_to_float(0xff800000u);
    for (int l = 0; l < 8; ++l) mx = rd::sm_max(mx, rd::sm_lane_max(s, t, l, scale));
    float lanes[8];
    for (int l = 0; l < 8; ++l) lanes[l] = rd::sm_lane_sum(s, t, l, scale, mx);
    float sum = rd::sm_tree(lanes) + rd::sm_tail_sum(s, t, scale, mx);
    float inv = rd::div32(1.0f, sum);
    for (int j = 0; j < t; ++j) {  // each element read, then overwritten, as in the kernel
        float p = rd::exp_sm(scale * s[j] - mx) * inv;
        s[j] = p;
        if (active) {  // without dropout A = P: `a` and `keep` untouched, as in the kernel
            bool kept = rd::keep_of(rd::mask_word(k, sample, pass, base + (uint32_t)j), k.thr);
            keep[j] = kept;
            a[j] = rd::apply_keep(p, kept, k.scale);
        }
    }
}

/// softmax_dropout_bwd of one row.
void rd_twin_softmax_bwd_row(float* ds, const float* da, const float* p, const uint8_t* keep, int use_keep, float ks,
                             float scale, int t) {
    float lanes[8];
    for (int l = 0; l < 8; ++l) lanes[l] = rd::sm_lane_dot(da, p, keep, use_keep != 0, ks, t, l);
    float dot = rd::sm_tree(lanes) + rd::sm_tail_dot(da, p, keep, use_keep != 0, ks, t);
    for (int j = 0; j < t; ++j) ds[j] = rd::softmax_bwd_elem(p[j], rd::sm_dp(da, keep, use_keep != 0, ks, j), dot, scale);
}

/// rdrop_loss_rows + rdrop_loss_finish: `out` has 4 + 3m doubles.
void rd_twin_rdrop_loss(float* dl, double* out, const float* logits, const uint32_t* labels, int m, int c, double eps,
                        double ce_w, double kl_w, double alpha, double w) {
    for (int i = 0; i < m; ++i) {
        const float* p = logits + (long long)i * c;
        const float* q = logits + (long long)(m + i) * c;
        rd::LossRow r;
        double* mx[2] = {&r.pm, &r.qm};
        double* lse[2] = {&r.pl, &r.ql};
        const float* rows[2] = {p, q};
        for (int s = 0; s < 2; ++s) {
            float m32 = rd::bits_to_float(0xff800000u);
            for (int j = 0; j < c; ++j) m32 = rd::max32(m32, rows[s][j]);
            double md = (double)m32, z[32];
            for (int l = 0; l < 32; ++l) {
                z[l] = 0.0;
                for (int j = l; j < c; j += 32) z[l] += rd::exp64((double)rows[s][j] - md);
            }
            *mx[s] = md;
            *lse[s] = rd::log64(butterfly64(z));
        }
        double a[32], b[32], sp[32], sq[32];
        for (int l = 0; l < 32; ++l) {
            a[l] = b[l] = sp[l] = sq[l] = 0.0;
            for (int j = l; j < c; j += 32) {
                double lp = (double)p[j] - r.pm - r.pl;
                double lq = (double)q[j] - r.qm - r.ql;
                a[l] += rd::exp64(lp) * (lp - lq);
                b[l] += rd::exp64(lq) * (lq - lp);
                sp[l] += lp;
                sq[l] += lq;
            }
        }
        r.kl_pq = butterfly64(a);
        r.kl_qp = butterfly64(b);
        double sum_lp = butterfly64(sp), sum_lq = butterfly64(sq);
        uint32_t y = labels[i];
        double smooth = eps / (double)c;
        if (y >= (uint32_t)c) {
            out[4 + 3 * i] = out[4 + 3 * i + 1] = (double)rd::bits_to_float(0x7fc00000u);
            out[4 + 3 * i + 2] = 1.0;
            for (int j = 0; j < c; ++j) dl[(long long)i * c + j] = dl[(long long)(m + i) * c + j] = rd::bits_to_float(0x7fc00000u);
            continue;
        }
        for (int j = 0; j < c; ++j)
            rd::loss_grad_elem(r, p[j], q[j], j == (int)y, eps, smooth, ce_w, alpha * kl_w, w, &dl[(long long)i * c + j],
                               &dl[(long long)(m + i) * c + j]);
        double lp_y = (double)p[y] - r.pm - r.pl;
        double lq_y = (double)q[y] - r.qm - r.ql;
        out[4 + 3 * i] = (1.0 - eps) * -(lp_y + lq_y) - smooth * (sum_lp + sum_lq);
        out[4 + 3 * i + 1] = r.kl_pq + r.kl_qp;
        out[4 + 3 * i + 2] = 0.0;
    }
    double ce[32], kl[32], bad[32];
    for (int l = 0; l < 32; ++l) {
        ce[l] = kl[l] = bad[l] = 0.0;
        for (int i = l; i < m; i += 32) {
            ce[l] += out[4 + 3 * i];
            kl[l] += out[4 + 3 * i + 1];
            bad[l] += out[4 + 3 * i + 2];
        }
    }
    double cs = ce_w * butterfly64(ce), ks = kl_w * butterfly64(kl);
    out[0] = cs + alpha * ks;
    out[1] = cs;
    out[2] = ks;
    out[3] = butterfly64(bad);
}

/// sgd_update over n elements (`mom` unused when mu = 0).
void rd_twin_sgd(float* p, const float* g, float* mom, int n, float coef, float lr, float mu, float wd, int nesterov,
                 int first) {
    for (int i = 0; i < n; ++i) {
        float b = mu != 0.0f ? mom[i] : 0.0f;
        p[i] = rd::sgd_elem(p[i], g[i], &b, coef, lr, mu, wd, nesterov != 0, first != 0);
        if (mu != 0.0f) mom[i] = b;
    }
}

/// adamw_update over n elements, coefficients as derived on the host.
void rd_twin_adamw(float* p, const float* g, float* m, float* v, int n, float coef, const float* k7, int do_decay) {
    rd::AdamCoef k{k7[0], k7[1], k7[2], k7[3], k7[4], k7[5], k7[6]};
    for (int i = 0; i < n; ++i) p[i] = rd::adamw_elem(p[i], coef * g[i], &m[i], &v[i], k, do_decay != 0);
}

float rd_twin_clip_coef(double norm, float max_norm) { return rd::clip_coef(norm, max_norm); }

/// im2col: `out[idx] = img[im2col_src(idx)]` for every output element (f32).
void rd_twin_im2col(float* out, const float* img, int b, int c, int s, int p) {
    int g = s / p;
    long long n = (long long)b * g * g * c * p * p;
    for (long long i = 0; i < n; ++i) out[i] = img[rd::im2col_src(i, c, s, p)];
}

long long rd_twin_heads_to_rows(long long idx, int tokens, int heads, int hd, int row) {
    return rd::heads_to_rows(idx, tokens, heads, hd, row);
}

}  // extern "C"
