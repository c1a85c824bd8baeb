// The patch rows of the patch-embedding GEMM (im2col), the embeddings with dropout (class
// token, positions; the mask recorded as bytes) and their backward, and the class tokens of the
// residual stream. Shapes and formulas: the launchers in embed.rs.
#include "common.cuh"

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
