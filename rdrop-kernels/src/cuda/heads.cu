// Attention's head layouts: rows (B, Tk, 3D) / (B, Tk, D) to heads (B, H, Tk, Dh) and back
// for the gradients. Shapes and formulas: the launchers in heads.rs.
#include "common.cuh"

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
