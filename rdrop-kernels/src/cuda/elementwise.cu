// Elementwise kernels: patches, embeddings, dropout (forward with Philox masks recorded as
// bytes, backward from the bytes), residual adds, exact GELU, casts, head layouts, class
// tokens and deterministic column sums. Shapes and formulas: the launchers in mod.rs.
#include "common.cuh"

/// The mask parameters of a site (rd::SiteKey) plus whether the site drops anything.
#define SITE_PARAMS uint32_t seed_lo, uint32_t seed_hi, uint32_t update, uint32_t site, uint32_t thr, float scale, int active
#define SITE_KEY rd::SiteKey{seed_lo, seed_hi, update, site, thr, scale}

// -------------------------------------------------------------------------------- im2col
template <class T>
__device__ void im2col_impl(T* out, const float* img, int b, int c, int s, int p) {
    long long idx = gtid();
    int g = s / p;
    long long n = (long long)b * g * g * c * p * p;
    if (idx >= n) return;
    out[idx] = rd::from_f32<T>(img[rd::im2col_src(idx, c, s, p)]);
}
#define K_IM2COL(SUF, T)                                                                   \
    extern "C" __global__ void im2col_##SUF(T* out, const float* img, int b, int c, int s, int p) { \
        im2col_impl<T>(out, img, b, c, s, p);                                              \
    }
RD_FOR_EACH_T(K_IM2COL)

// ---------------------------------------------------------------------------- embeddings
template <class T>
__device__ void embed_fwd_impl(float* x, uint8_t* keep, const T* tok, const float* cls, const float* pos,
                               const uint32_t* row_keys, rd::SiteKey k, int active, int b, int tokens, int d) {
    long long idx = gtid();
    int n = tokens * d, per = (n + 3) / 4;
    if (idx >= (long long)b * per) return;
    int r = (int)(idx / per), blk = (int)(idx % per);
    uint32_t w[4];
    if (active) rd::mask_block(k, row_keys[2 * r], row_keys[2 * r + 1], (uint32_t)blk, w);
    for (int q = 0; q < 4; ++q) {
        int e = 4 * blk + q;
        if (e >= n) break;
        int t = e / d, j = e % d;
        float v = t == 0 ? cls[j] + pos[j] : rd::to_f32(tok[((long long)r * (tokens - 1) + t - 1) * d + j]) + pos[e];
        long long o = (long long)r * n + e;
        if (active) {
            bool kept = rd::keep_of(w[q], k.thr);
            keep[o] = kept;
            v = rd::apply_keep(v, kept, k.scale);
        }
        x[o] = v;
    }
}
#define K_EMBED_FWD(SUF, T)                                                                              \
    extern "C" __global__ void embed_fwd_##SUF(float* x, uint8_t* keep, const T* tok, const float* cls,    \
                                               const float* pos, const uint32_t* row_keys, SITE_PARAMS,    \
                                               int b, int tokens, int d) {                                 \
        embed_fwd_impl<T>(x, keep, tok, cls, pos, row_keys, SITE_KEY, active, b, tokens, d);               \
    }
RD_FOR_EACH_T(K_EMBED_FWD)

/// `keep ? v·scale : 0`, or `v` without a mask.
__device__ __forceinline__ float masked(float v, const uint8_t* keep, long long i, int use_keep, float scale) {
    return use_keep ? rd::apply_keep(v, keep[i] != 0, scale) : v;
}

template <class T>
__device__ void embed_bwd_tok_impl(T* dtok, const float* dx, const uint8_t* keep, int use_keep, float scale, int b,
                                   int tokens, int d) {
    long long idx = gtid();
    long long per = (long long)(tokens - 1) * d;
    if (idx >= b * per) return;
    long long r = idx / per, rem = idx % per;
    long long src = r * tokens * d + d + rem;
    dtok[idx] = rd::from_f32<T>(masked(dx[src], keep, src, use_keep, scale));
}
#define K_EMBED_BWD_TOK(SUF, T)                                                                            \
    extern "C" __global__ void embed_bwd_tok_##SUF(T* dtok, const float* dx, const uint8_t* keep, int use_keep, \
                                                   float scale, int b, int tokens, int d) {                \
        embed_bwd_tok_impl<T>(dtok, dx, keep, use_keep, scale, b, tokens, d);                              \
    }
RD_FOR_EACH_T(K_EMBED_BWD_TOK)

/// `dpos[e] += Σ_b g[b, e]`, `dcls[j] += Σ_b g[b, j]`, samples in order (as the CPU engine).
extern "C" __global__ void embed_bwd_params(float* dcls, float* dpos, const float* dx, const uint8_t* keep,
                                            int use_keep, float scale, int b, int tokens, int d) {
    long long e = gtid();
    long long n = (long long)tokens * d;
    if (e >= n) return;
    float acc = dpos[e];
#pragma unroll 8
    for (int r = 0; r < b; ++r) acc += masked(dx[r * n + e], keep, r * n + e, use_keep, scale);
    dpos[e] = acc;
    if (e < d) {
        float c = dcls[e];
        for (int r = 0; r < b; ++r) c += masked(dx[r * n + e], keep, r * n + e, use_keep, scale);
        dcls[e] = c;
    }
}

// ------------------------------------------------------------------ dropout on sample rows
/// Thread `(r, blk)` of `rows` samples of `n` elements: elements 4·blk .. 4·blk + 4 of row r.
#define SAMPLE_BLOCK_PROLOGUE                                   \
    long long idx = gtid();                                     \
    int per = (n + 3) / 4;                                      \
    if (idx >= (long long)rows * per) return;                   \
    int r = (int)(idx / per), blk = (int)(idx % per);           \
    uint32_t w[4];                                              \
    if (active) rd::mask_block(k, row_keys[2 * r], row_keys[2 * r + 1], (uint32_t)blk, w);

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

template <class T>
__device__ void dropout_fwd_impl(T* x, uint8_t* keep, const T* src, const uint32_t* row_keys, rd::SiteKey k,
                                 int active, int rows, int n) {
    SAMPLE_BLOCK_PROLOGUE
    if (!active) return;
    for (int q = 0; q < 4; ++q) {
        int e = 4 * blk + q;
        if (e >= n) break;
        long long o = (long long)r * n + e;
        bool kept = rd::keep_of(w[q], k.thr);
        keep[o] = kept;
        x[o] = rd::from_f32<T>(rd::apply_keep(rd::to_f32(src[o]), kept, k.scale));
    }
}
#define K_DROPOUT_FWD(SUF, T)                                                                          \
    extern "C" __global__ void dropout_fwd_##SUF(T* x, uint8_t* keep, const T* src, const uint32_t* row_keys, \
                                                 SITE_PARAMS, int rows, int n) {                       \
        dropout_fwd_impl<T>(x, keep, src, row_keys, SITE_KEY, active, rows, n);                        \
    }
RD_FOR_EACH_T(K_DROPOUT_FWD)

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

// ------------------------------------------------------------------- recorded masks (bwd)
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

// ---------------------------------------------------------------------------------- casts
#define K_CASTS(SUF, T)                                                                  \
    extern "C" __global__ void cast_f32_to_##SUF(T* out, const float* x, int n) {        \
        long long i = gtid();                                                            \
        if (i < n) out[i] = rd::from_f32<T>(x[i]);                                       \
    }                                                                                    \
    extern "C" __global__ void cast_##SUF##_to_f32(float* out, const T* x, int n) {      \
        long long i = gtid();                                                            \
        if (i < n) out[i] = rd::to_f32(x[i]);                                            \
    }
K_CASTS(bf16, __nv_bfloat16)
K_CASTS(f16, __half)
/// For f32 both directions are this copy.
extern "C" __global__ void cast_f32_to_f32(float* out, const float* x, int n) {
    long long i = gtid();
    if (i < n) out[i] = x[i];
}

// --------------------------------------------------------------------------- head layouts
using rd::heads_to_rows;

#define K_HEADS(SUF, T)                                                                                     \
    extern "C" __global__ void qkv_split_##SUF(T* q, T* k, T* v, const T* qkv, int b, int tokens, int heads, \
                                               int hd) {                                                    \
        long long i = gtid();                                                                               \
        if (i >= (long long)b * tokens * heads * hd) return;                                                \
        int d = heads * hd;                                                                                 \
        long long s = heads_to_rows(i, tokens, heads, hd, 3 * d);                                           \
        q[i] = qkv[s];                                                                                      \
        k[i] = qkv[s + d];                                                                                  \
        v[i] = qkv[s + 2 * d];                                                                              \
    }                                                                                                       \
    extern "C" __global__ void qkv_merge_grad_##SUF(T* dqkv, const T* dq, const T* dk, const T* dv, int b,   \
                                                    int tokens, int heads, int hd) {                        \
        long long i = gtid();                                                                               \
        if (i >= (long long)b * tokens * heads * hd) return;                                                \
        int d = heads * hd;                                                                                 \
        long long s = heads_to_rows(i, tokens, heads, hd, 3 * d);                                           \
        dqkv[s] = dq[i];                                                                                    \
        dqkv[s + d] = dk[i];                                                                                \
        dqkv[s + 2 * d] = dv[i];                                                                            \
    }                                                                                                       \
    extern "C" __global__ void attn_merge_##SUF(T* out, const T* o, int b, int tokens, int heads, int hd) {  \
        long long i = gtid();                                                                               \
        if (i >= (long long)b * tokens * heads * hd) return;                                                \
        out[heads_to_rows(i, tokens, heads, hd, heads * hd)] = o[i];                                        \
    }                                                                                                       \
    extern "C" __global__ void attn_split_grad_##SUF(T* do_, const T* dout, int b, int tokens, int heads,    \
                                                     int hd) {                                              \
        long long i = gtid();                                                                               \
        if (i >= (long long)b * tokens * heads * hd) return;                                                \
        do_[i] = dout[heads_to_rows(i, tokens, heads, hd, heads * hd)];                                     \
    }
RD_FOR_EACH_T(K_HEADS)

// --------------------------------------------------------------------------- class tokens
extern "C" __global__ void cls_gather(float* cls, const float* x, int b, int tokens, int d) {
    long long i = gtid();
    if (i >= (long long)b * d) return;
    long long r = i / d;
    cls[i] = x[r * tokens * d + i % d];
}

extern "C" __global__ void cls_scatter_grad(float* dx, const float* dcls, int b, int tokens, int d) {
    long long i = gtid();
    long long n = (long long)tokens * d;
    if (i >= b * n) return;
    long long r = i / n, e = i % n;
    dx[i] = e < d ? dcls[r * d + e] : 0.0f;
}

// --------------------------------------------------------------------- deterministic sums
/// `part[blk, j] = Σ_{r in block blk} dy[r, j]` (rows in order; blocks of LN_BWD_ROWS rows).
#define K_COLUMN_PARTIALS(SUF, T)                                                           \
    extern "C" __global__ void column_partials_##SUF(float* part, const T* dy, int n, int c) { \
        long long i = gtid();                                                               \
        int blocks = (n + rd::LN_BWD_ROWS - 1) / rd::LN_BWD_ROWS;                           \
        if (i >= (long long)blocks * c) return;                                             \
        int blk = (int)(i / c), j = (int)(i % c);                                           \
        int r1 = min(n, (blk + 1) * rd::LN_BWD_ROWS);                                       \
        float acc = 0.0f;                                                                   \
        _Pragma("unroll 8") for (int r = blk * rd::LN_BWD_ROWS; r < r1; ++r) acc += rd::to_f32(dy[(long long)r * c + j]); \
        part[i] = acc;                                                                      \
    }
RD_FOR_EACH_T(K_COLUMN_PARTIALS)

/// `out[j] += part[blk·stride + j]` for blk = 0, 1, ... in order.
extern "C" __global__ void column_reduce(float* out, const float* part, int blocks, int c, int stride) {
    long long j = gtid();
    if (j >= c) return;
    float acc = out[j];
    // in block order (deterministic); unrolled so that the loads overlap
#pragma unroll 8
    for (int blk = 0; blk < blocks; ++blk) acc += part[(long long)blk * stride + j];
    out[j] = acc;
}
