// The per-element and per-row math of rdrop's CUDA kernels, as `RD_HD` functions: compiled by
// nvcc for the GPU (`__host__ __device__`) and by the host C++ compiler for `twin.cpp`, which
// tests/cuda_twin.rs holds to the Rust kernels on every CI run (no GPU needed).
//
// Rows are reduced by `nl` lanes: lane `l` accumulates elements `l, l + nl, ...` in order, and
// the lanes are then combined in a fixed order. That order is the CPU kernels' own (LayerNorm:
// 16 lanes summed in lane order, as `layernorm::lane_sum`; softmax: 8 lanes, a tail and a fixed
// tree, as `attention::softmax_row`), so a GPU row equals the CPU row bit for bit when both
// round each operation the same way: nvcc runs with --fmad=false and the host twin with
// -ffp-contract=off, and only correctly rounded operations (+ − × ÷ √, fma) are used.
// The `*_lanes` functions give one lane's partial; a kernel combines them with shuffles and
// the host twin with a loop over lanes, in the same order.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define RD_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#include <cstring>
#define RD_HD inline
#endif

namespace rd {

// ------------------------------------------------------------- storage type <-> f32 (exact / RNE)
RD_HD float to_f32(float v) { return v; }
template <class T>
RD_HD T from_f32(float v);
template <>
RD_HD float from_f32<float>(float v) {
    return v;
}
#ifdef __CUDACC__
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
    return __float2half_rn(v);
}
#endif

// ---------------------------------------------------------------- bits and exactly rounded ops
RD_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

RD_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
#endif
}

/// `a·b + c` rounded once (Rust's `mul_add`).
RD_HD float fma32(float a, float b, float c) {
#ifdef __CUDA_ARCH__
    return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
}

RD_HD float sqrt32(float x) {
#ifdef __CUDA_ARCH__
    return __fsqrt_rn(x);
#else
    return std::sqrt(x);
#endif
}

RD_HD float div32(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

RD_HD double exp64(double x) {
#ifdef __CUDA_ARCH__
    return ::exp(x);
#else
    return std::exp(x);
#endif
}

RD_HD double log64(double x) {
#ifdef __CUDA_ARCH__
    return ::log(x);
#else
    return std::log(x);
#endif
}

/// Rust's `f32::max` (the non-NaN operand when one is NaN).
RD_HD float max32(float a, float b) { return a != a ? b : (b != b ? a : (a > b ? a : b)); }
RD_HD float min32(float a, float b) { return a != a ? b : (b != b ? a : (a < b ? a : b)); }
RD_HD float abs32(float a) { return bits_to_float(float_to_bits(a) & 0x7fffffffu); }
RD_HD float copysign32(float a, float s) {
    return bits_to_float((float_to_bits(a) & 0x7fffffffu) | (float_to_bits(s) & 0x80000000u));
}
RD_HD bool is_finite32(float x) { return (float_to_bits(x) & 0x7f800000u) != 0x7f800000u; }

// -------------------------------------------------------------------------------- layouts
/// Source index in `img (B, C, S, S)` of element `idx` of the patch rows `(B·g², C·p·p)`,
/// `g = S/p` (crate::patch::im2col: row `b·g² + gy·g + gx`, column `c·p·p + py·p + px`).
RD_HD long long im2col_src(long long idx, int c, int s, int p) {
    int g = s / p, w = c * p * p;
    long long row = idx / w;
    int col = (int)(idx % w);
    long long bi = row / ((long long)g * g);
    int gy = (int)(row / g % g), gx = (int)(row % g);
    int ci = col / (p * p), py = col / p % p, px = col % p;
    return ((bi * c + ci) * s + gy * p + py) * s + gx * p + px;
}

/// Position in a `(B, Tk, row)` tensor of element `idx` of a `(B, H, Tk, Dh)` one: head `h`'s
/// column block `h·Dh ..` of token `t` (`row` = D for attention outputs, 3D for qkv, whose k
/// and v blocks are then `+D`, `+2D`).
RD_HD long long heads_to_rows(long long idx, int tokens, int heads, int hd, int row) {
    int e = (int)(idx % hd);
    long long rest = idx / hd;
    int t = (int)(rest % tokens);
    rest /= tokens;
    int h = (int)(rest % heads);
    long long b = rest / heads;
    return (b * tokens + t) * row + (long long)h * hd + e;
}

// ------------------------------------------------------------------------ Philox and dropout
/// Philox4x32-10 (Random123): four words from counter `c` and key `(k0, k1)`
/// (crate::philox::philox4x32_10).
RD_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
    const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k0 += W0;
            k1 += W1;
        }
        uint64_t p0 = (uint64_t)M0 * c[0];
        uint64_t p1 = (uint64_t)M1 * c[2];
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0;
        uint32_t n1 = (uint32_t)p1;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1;
        uint32_t n3 = (uint32_t)p0;
        c[0] = n0;
        c[1] = n1;
        c[2] = n2;
        c[3] = n3;
    }
}

/// One dropout site of one update, everything of a mask key but the row's (sample, pass)
/// (crate::dropout::Site; `thr` = drop_threshold(p), `scale` = keep_scale(p)).
struct SiteKey {
    uint32_t seed_lo, seed_hi, update, site, thr;
    float scale;
};

/// The four words of block `blk` (elements 4·blk .. 4·blk + 4) of row key (sample, pass):
/// counter `(blk, sample, site << 1 | pass, update)` (crate::philox::MaskKey::block).
RD_HD void mask_block(const SiteKey& k, uint32_t sample, uint32_t pass, uint32_t blk, uint32_t w[4]) {
    w[0] = blk;
    w[1] = sample;
    w[2] = (k.site << 1) | (pass & 1u);
    w[3] = k.update;
    philox4x32_10(w, k.seed_lo, k.seed_hi);
}

/// The word of element `e` (crate::philox::MaskKey::word).
RD_HD uint32_t mask_word(const SiteKey& k, uint32_t sample, uint32_t pass, uint32_t e) {
    uint32_t w[4];
    mask_block(k, sample, pass, e >> 2, w);
    return w[e & 3u];
}

/// Kept iff the word is at least the drop threshold.
RD_HD bool keep_of(uint32_t word, uint32_t thr) { return word >= thr; }

/// `keep ? x·scale : 0` (crate::dropout::apply_keep).
RD_HD float apply_keep(float x, bool keep, float scale) { return keep ? x * scale : 0.0f; }

/// The residual branch `res + m·y` with `m ∈ {0, scale}` (crate::dropout::residual_dropout_add:
/// the multiplier first, as the CPU does, so that a dropped NaN still gives 0·NaN = NaN).
RD_HD float residual_elem(float res, float y, bool keep, float scale) {
    return res + (keep ? scale : 0.0f) * y;
}

// --------------------------------------------------------------------------------- exact GELU
// crate::gelu, operation for operation (polynomials of scripts/fit_erf_f32.py).
RD_HD float horner_erf_p6(float u) {
    // ERF_P[..6], highest degree first
    float acc = 7.875875e-05f;
    acc = fma32(acc, u, -0.00080168643f);
    acc = fma32(acc, u, 0.0051890872f);
    acc = fma32(acc, u, -0.026854211f);
    acc = fma32(acc, u, 0.11283594f);
    acc = fma32(acc, u, -0.37612626f);
    return acc;
}

RD_HD float horner_erfc_r(float t) {
    const float c[12] = {-3.566418e-05f, 9.62912e-05f,  -0.00014741614f, 0.0003681511f,
                         -0.0010136625f, 0.002425639f,  -0.0055688377f,  0.012484123f,
                         -0.027005458f,  0.05611095f,   -0.11152102f,    0.21080635f};
    float acc = c[0];
    for (int i = 1; i < 12; ++i) acc = fma32(acc, t, c[i]);
    return acc;
}

/// `exp(v)` for `v ≤ 0`, clamped at −87 (crate::gelu::exp_nonpos).
RD_HD float exp_nonpos(float v) {
    const float LOG2E = 1.44269504f, LN2_HI = 0.69314575f, LN2_LO = 1.4286068e-6f;
    const float MAGIC = 12582912.0f;
    v = max32(v, -87.0f);
    float shifted = v * LOG2E + MAGIC;
    float n = shifted - MAGIC;
    int32_t ni = (int32_t)(float_to_bits(shifted) - float_to_bits(MAGIC));
    float r = (v - n * LN2_HI) - n * LN2_LO;
    float p = 1.0f / 5040.0f;
    p = fma32(p, r, 1.0f / 720.0f);
    p = fma32(p, r, 1.0f / 120.0f);
    p = fma32(p, r, 1.0f / 24.0f);
    p = fma32(p, r, 1.0f / 6.0f);
    p = fma32(p, r, 0.5f);
    p = fma32(p, r, 1.0f);
    p = fma32(p, r, 1.0f);
    return p * bits_to_float(((uint32_t)(ni + 127)) << 23);
}

/// `1 + erf(z)` without cancellation for z ≤ −1 (crate::gelu::one_plus_erf).
RD_HD float one_plus_erf(float z) {
    const float C0_MINUS_1 = 0.12837917f;
    float u = z * z;
    float small = fma32(z, fma32(horner_erf_p6(u), u, C0_MINUS_1), z);
    float ac = min32(max32(abs32(z), 1.0f), 4.0f);
    float erfc = exp_nonpos(-(ac * ac)) * horner_erfc_r((ac - 2.5f) * (1.0f / 1.5f));
    float a = abs32(z);
    if (a < 1.0f) return 1.0f + small;
    if (z > 0.0f) return 2.0f - erfc;
    if (a <= 4.0f) return erfc;
    return 0.0f;
}

/// erf (crate::gelu::erf_f32).
RD_HD float erf32(float z) {
    const float C0_MINUS_1 = 0.12837917f;
    float u = z * z;
    float small = fma32(z, fma32(horner_erf_p6(u), u, C0_MINUS_1), z);
    float ac = min32(max32(abs32(z), 1.0f), 4.0f);
    float erfc = exp_nonpos(-(ac * ac)) * horner_erfc_r((ac - 2.5f) * (1.0f / 1.5f));
    return abs32(z) < 1.0f ? small : copysign32(1.0f - erfc, z);
}

/// `gelu(x) = x·Φ(x) = (1 + erf(x/√2))·½·x` (crate::gelu::gelu_scalar).
RD_HD float gelu(float x) { return one_plus_erf(x * 0.70710677f) * 0.5f * x; }

/// `gelu'(x) = Φ(x) + x·φ(x)` (crate::gelu::gelu_grad_scalar).
RD_HD float gelu_grad(float x) {
    float cdf = 0.5f * one_plus_erf(x * 0.70710677f);
    return cdf + x * 0.3989423f * exp_nonpos(-0.5f * x * x);
}

// ---------------------------------------------------------------------------------- LayerNorm
/// Lanes of a LayerNorm row (crate::layernorm::lane_sum's SUM_LANES): lane `l` sums elements
/// `l, l + 16, ...` in order; the 16 partials are then added in lane order.
constexpr int LN_LANES = 16;
/// Rows of one dγ/dβ partial (crate::layernorm::BWD_ROWS): partial sums in row order, the
/// partials added to dγ/dβ in block order.
constexpr int LN_BWD_ROWS = 32;

/// Lane `l`'s `Σ x_j` (j ≡ l mod 16).
RD_HD float ln_lane_sum(const float* x, int d, int l) {
    float acc = 0.0f;
    for (int j = l; j < d; j += LN_LANES) acc += x[j];
    return acc;
}

/// Lane `l`'s `Σ (x_j − μ)²`.
RD_HD float ln_lane_var(const float* x, int d, int l, float mu) {
    float acc = 0.0f;
    for (int j = l; j < d; j += LN_LANES) acc += (x[j] - mu) * (x[j] - mu);
    return acc;
}

/// `r = 1/√(σ² + eps)` from `Σ (x − μ)²`.
RD_HD float ln_rstd(float var_sum, int d, float eps) {
    return div32(1.0f, sqrt32(div32(var_sum, (float)d) + eps));
}

/// `y = (x − μ)·r·γ + β`.
RD_HD float ln_fwd_elem(float x, float mu, float rs, float g, float b) { return (x - mu) * rs * g + b; }

/// Lane `l`'s `Σ dy⊙γ` and `Σ dy⊙γ⊙x̂` (dy converted to f32 first).
template <class T>
RD_HD void ln_bwd_lane(const T* dy, const float* x, const float* g, int d, int l, float mu, float rs,
                       float* sg, float* sgx) {
    float a = 0.0f, b = 0.0f;
    for (int j = l; j < d; j += LN_LANES) {
        float dyj = to_f32(dy[j]);
        a += dyj * g[j];
        b += dyj * g[j] * ((x[j] - mu) * rs);
    }
    *sg = a;
    *sgx = b;
}

/// `dx = r·(dy⊙γ − mean(dy⊙γ) − x̂·mean(dy⊙γ⊙x̂))` of one element (`mg`, `mgx` = the sums × 1/d).
RD_HD float ln_bwd_elem(float dy, float x, float g, float mu, float rs, float mg, float mgx) {
    float xh = (x - mu) * rs;
    return rs * (dy * g - mg - xh * mgx);
}

// ------------------------------------------------------------------------------------ softmax
/// Lanes of a softmax row (crate::attention::softmax_row): elements below `8·⌊T/8⌋` go to lane
/// `j mod 8`, the rest to a tail summed in order; `Σ = tree(lanes) + tail`.
constexpr int SM_LANES = 8;

/// `e^x` (crate::attention::exp_f32, Cephes' expf), 0 below −87.
RD_HD float exp_sm(float x) {
    const float LOG2E = 1.44269504f, MAGIC = 12582912.0f;
    float xc = x > 88.0f ? 88.0f : x;
    xc = xc < -87.0f ? -87.0f : xc;
    float t = xc * LOG2E + MAGIC;
    float n = t - MAGIC;
    float r = xc - n * 0.6933594f - n * -2.1219444e-4f;
    float p = 1.9875692e-4f;
    p = p * r + 1.3981999e-3f;
    p = p * r + 8.333452e-3f;
    p = p * r + 4.1665796e-2f;
    p = p * r + 1.6666665e-1f;
    p = p * r + 0.5f;
    float y = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)(((int32_t)float_to_bits(t) - (int32_t)float_to_bits(MAGIC) + 127) << 23);
    float e = y * bits_to_float(bits);
    return x < -87.0f ? 0.0f : e;
}

/// The fixed tree of the eight lane sums.
RD_HD float sm_tree(const float a[8]) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }

/// `max(a, b)` as softmax_row takes it (`if v > m { v } else { m }`).
RD_HD float sm_max(float m, float v) { return v > m ? v : m; }

/// Lane `l`'s maximum of `scale·s_j` over `j ≡ l (mod 8)` (−∞ when it has none).
template <class T>
RD_HD float sm_lane_max(const T* s, int t, int l, float scale) {
    float m = bits_to_float(0xff800000u);  // −∞
    for (int j = l; j < t; j += SM_LANES) m = sm_max(m, scale * to_f32(s[j]));
    return m;
}

/// Lane `l`'s `Σ exp(scale·s_j − max)` over `j < 8·⌊t/8⌋`, `j ≡ l (mod 8)`.
template <class T>
RD_HD float sm_lane_sum(const T* s, int t, int l, float scale, float mx) {
    int full = t / SM_LANES * SM_LANES;
    float acc = 0.0f;
    for (int j = l; j < full; j += SM_LANES) acc += exp_sm(scale * to_f32(s[j]) - mx);
    return acc;
}

/// The tail `Σ_{j ≥ 8·⌊t/8⌋} exp(scale·s_j − max)`, in order.
template <class T>
RD_HD float sm_tail_sum(const T* s, int t, float scale, float mx) {
    float acc = 0.0f;
    for (int j = t / SM_LANES * SM_LANES; j < t; ++j) acc += exp_sm(scale * to_f32(s[j]) - mx);
    return acc;
}

/// `dP_j = keep_j ? dA_j·ks : 0` (`dA_j` without dropout).
template <class T>
RD_HD float sm_dp(const T* da, const uint8_t* keep, bool use_keep, float ks, int j) {
    float v = to_f32(da[j]);
    return use_keep ? apply_keep(v, keep[j] != 0, ks) : v;
}

/// Lane `l`'s `Σ dP_j·P_j` over `j < 8·⌊t/8⌋`, `j ≡ l (mod 8)` (crate::attention's `dot`).
template <class T>
RD_HD float sm_lane_dot(const T* da, const T* p, const uint8_t* keep, bool use_keep, float ks, int t, int l) {
    int full = t / SM_LANES * SM_LANES;
    float acc = 0.0f;
    for (int j = l; j < full; j += SM_LANES) acc += sm_dp(da, keep, use_keep, ks, j) * to_f32(p[j]);
    return acc;
}

/// The dot's tail, in order.
template <class T>
RD_HD float sm_tail_dot(const T* da, const T* p, const uint8_t* keep, bool use_keep, float ks, int t) {
    float acc = 0.0f;
    for (int j = t / SM_LANES * SM_LANES; j < t; ++j) acc += sm_dp(da, keep, use_keep, ks, j) * to_f32(p[j]);
    return acc;
}

/// Softmax backward of one element, `dS = s·P⊙(dP − Σ_j dP_j P_j)` with `dP = keep·scale·dA`.
RD_HD float softmax_bwd_elem(float p, float dp, float dot, float scale) { return scale * (p * (dp - dot)); }

// ------------------------------------------------------------------------------- R-Drop loss
/// Lanes of a loss row (f64 partials, combined by the butterfly of `loss_combine`).
constexpr int LOSS_LANES = 32;

/// The gradient element of the R-Drop loss for logits `a` (pass 0) and `b` (pass 1) of class j
/// (crate::loss::rdrop_loss): `lp = a − max_p − lse_p`, `lq` likewise, target `t`, and
/// `w·(ce_w·(P − t) + α·kl_w·∂D/∂p)` for pass 0 (`which = 0`), the mirror for pass 1.
struct LossRow {
    double pm, pl, qm, ql, kl_pq, kl_qp;
};

RD_HD void loss_grad_elem(const LossRow& r, float a, float b, bool is_label, double eps, double smooth,
                          double ce_w, double alpha_kl_w, double w, float* gp, float* gq) {
    double lp = (double)a - r.pm - r.pl;
    double lq = (double)b - r.qm - r.ql;
    double pp = exp64(lp), qq = exp64(lq);
    double t = is_label ? 1.0 - eps + smooth : smooth;
    double dd_p = pp * (lp - lq - r.kl_pq) + pp - qq;
    double dd_q = qq * (lq - lp - r.kl_qp) + qq - pp;
    *gp = (float)(w * (ce_w * (pp - t) + alpha_kl_w * dd_p));
    *gq = (float)(w * (ce_w * (qq - t) + alpha_kl_w * dd_q));
}

// ---------------------------------------------------------------------------------- optimisers
/// SGD with momentum of one element (crate::optim::sgd_step; `mom` ignored when μ = 0).
RD_HD float sgd_elem(float p, float g, float* mom, float c, float lr, float mu, float wd, bool nesterov,
                     bool first) {
    float d = c * g;
    if (wd != 0.0f) d += p * wd;
    if (mu != 0.0f) {
        float b = first ? d : *mom * mu + d;
        *mom = b;
        d = nesterov ? d + b * mu : b;
    }
    return p - d * lr;
}

/// The f32 coefficients of one AdamW step (crate::optim::AdamCoef, derived on the host).
struct AdamCoef {
    float decay, one_m_b1, b2, one_m_b2, inv_bc2_sqrt, eps, step_size;
};

/// AdamW of one element, `g` already scaled (crate::optim::AdamCoef::update).
RD_HD float adamw_elem(float p, float g, float* m, float* v, const AdamCoef& k, bool decay) {
    if (decay) p *= k.decay;
    float mm = *m + (g - *m) * k.one_m_b1;
    float vv = *v * k.b2 + g * g * k.one_m_b2;
    *m = mm;
    *v = vv;
    float denom = sqrt32(vv) * k.inv_bc2_sqrt + k.eps;
    return p - div32(mm, denom) * k.step_size;
}

/// clip_grad_norm_'s coefficient `min(1, max_norm/(‖g‖ + 1e-6))` in f32 (crate::optim::clip_coef;
/// `max_norm < 0` stands for "infinite": 1).
RD_HD float clip_coef(double total_norm, float max_norm) {
    if (max_norm < 0.0f) return 1.0f;
    float denom = (float)total_norm * 1.0f + 1e-6f;
    float coef = div32(max_norm, denom);
    if (coef != coef) return coef;
    return coef < 1.0f ? coef : 1.0f;
}

}  // namespace rd
