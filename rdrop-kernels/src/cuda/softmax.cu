// Attention's scale + softmax + dropout over materialised scores, forward and backward: 8 lanes
// per row (four rows a warp), the lane partials and the tail combined as
// crate::attention::softmax_row / `dot` do, so that a row equals the CPU's bit for bit in f32.
// Rows are `ld ≥ t` elements apart (padding columns untouched), so the attention GEMMs can use
// 16-byte aligned leading dimensions. Shapes and formulas: the launchers in softmax.rs.
#include "common.cuh"

/// Row `(bh, i)` of `rows = B·H·Tk`; P written in place over S, A = P ⊙ M into `attn` (only
/// with dropout), the mask
/// (element `h·Tk·Tk + i·Tk + j` of sample b's key) into `keep`.
template <class T>
__device__ void softmax_dropout_fwd_impl(T* probs, T* attn, uint8_t* keep, const uint32_t* row_keys, float scale,
                                         rd::SiteKey k, int active, int b, int heads, int t, int ld) {
    long long g = gtid();
    long long row = g >> 3;
    int l = (int)(g & 7);
    long long rows = (long long)b * heads * t;
    bool ok = row < rows;
    long long r0 = ok ? row : 0;
    T* s = probs + r0 * ld;
    float mx = max8(ok ? rd::sm_lane_max(s, t, l, scale) : rd::bits_to_float(0xff800000u));
    float part = ok ? rd::sm_lane_sum(s, t, l, scale, mx) : 0.0f;
    float lanes[8];
    gather8(part, lanes);
    if (!ok) return;
    float sum = rd::sm_tree(lanes) + rd::sm_tail_sum(s, t, scale, mx);
    float inv = rd::div32(1.0f, sum);
    // Elements of this row's mask stream: base .. base + t, base = h·t·t + i·t; lane l takes the
    // Philox blocks first + l, first + l + 8, ... (one call per 4 elements).
    long long bh = row / t;
    int i = (int)(row % t);
    int smp = (int)(bh / heads), h = (int)(bh % heads);
    uint32_t base = (uint32_t)h * t * t + (uint32_t)i * t;
    uint32_t sample = active ? row_keys[2 * smp] : 0, pass = active ? row_keys[2 * smp + 1] : 0;
    T* a = attn + row * ld;
    uint8_t* kr = keep + row * ld;
    uint32_t first = base >> 2, last = (base + t - 1) >> 2;
    // The row's group of 8 lanes has read all of S (lane sums, tail) before any lane overwrites
    // it; below, each element is read and written by the one lane that owns its Philox block.
    __syncwarp(0xffu << (threadIdx.x & 24));
    for (uint32_t blk = first + l; blk <= last; blk += 8) {
        uint32_t w[4];
        if (active) rd::mask_block(k, sample, pass, blk, w);
        for (int q = 0; q < 4; ++q) {
            uint32_t e = 4 * blk + q;
            if (e < base || e >= base + t) continue;
            int j = (int)(e - base);
            float p = rd::exp_sm(scale * rd::to_f32(s[j]) - mx) * inv;
            s[j] = rd::from_f32<T>(p);
            if (active) {  // without dropout A = P: `attn` is not touched
                bool kept = rd::keep_of(w[q], k.thr);
                kr[j] = kept;
                a[j] = rd::from_f32<T>(rd::apply_keep(p, kept, k.scale));
            }
        }
    }
}
#define K_SM_FWD(SUF, T)                                                                                      \
    extern "C" __global__ void softmax_dropout_fwd_##SUF(T* probs, T* attn, uint8_t* keep, float scale,             \
                                                         const uint32_t* row_keys, uint32_t seed_lo, uint32_t seed_hi,     \
                                                         uint32_t update, uint32_t site, uint32_t thr, float kscale, \
                                                         int active, int b, int heads, int t, int ld) {       \
        softmax_dropout_fwd_impl<T>(probs, attn, keep, row_keys, scale,                                       \
                                    rd::SiteKey{seed_lo, seed_hi, update, site, thr, kscale}, active, b, heads, t, ld); \
    }
RD_FOR_EACH_T(K_SM_FWD)

/// `dS = scale · P ⊙ (dP − Σ_j dP_j P_j)`, `dP = keep ⊙ dA · ks` (or dA), per row; `ds` may be
/// `da`.
template <class T>
__device__ void softmax_dropout_bwd_impl(T* ds, const T* da, const T* p, const uint8_t* keep, int use_keep, float ks,
                                         float scale, int rows, int t, int ld) {
    long long g = gtid();
    long long row = g >> 3;
    int l = (int)(g & 7);
    bool ok = row < rows;
    long long o = (ok ? row : 0) * ld;
    const T* dar = da + o;
    const T* pr = p + o;
    const uint8_t* kr = keep + (use_keep ? o : 0);
    float part = ok ? rd::sm_lane_dot(dar, pr, kr, use_keep != 0, ks, t, l) : 0.0f;
    float lanes[8];
    gather8(part, lanes);
    if (!ok) return;
    float dot = rd::sm_tree(lanes) + rd::sm_tail_dot(dar, pr, kr, use_keep != 0, ks, t);
    // `ds` may be `da` (in place): the group has read all of dA before any lane writes, and
    // each lane then reads only the elements it writes.
    __syncwarp(0xffu << (threadIdx.x & 24));
    T* dsr = ds + o;
    for (int j = l; j < t; j += rd::SM_LANES)
        dsr[j] = rd::from_f32<T>(rd::softmax_bwd_elem(rd::to_f32(pr[j]), rd::sm_dp(dar, kr, use_keep != 0, ks, j), dot, scale));
}
#define K_SM_BWD(SUF, T)                                                                                      \
    extern "C" __global__ void softmax_dropout_bwd_##SUF(T* ds, const T* da, const T* p, const uint8_t* keep,    \
                                                         int use_keep, float ks, float scale, int rows, int t, int ld) { \
        softmax_dropout_bwd_impl<T>(ds, da, p, keep, use_keep, ks, scale, rows, t, ld);                           \
    }
RD_FOR_EACH_T(K_SM_BWD)
