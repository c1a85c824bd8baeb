// Deterministic column sums (bias gradients, LayerNorm's dγ/dβ): partials of LN_BWD_ROWS rows
// in row order, then added in block order, no atomics. Shapes: the launcher in columns.rs.
#include "common.cuh"

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

/// `out[j] += part[offset + blk·stride + j]` for blk = 0, 1, ... in order.
extern "C" __global__ void column_reduce(float* out, const float* part, int offset, int blocks, int c, int stride) {
    long long j = gtid();
    if (j >= c) return;
    float acc = out[j];
    // in block order (deterministic); unrolled so that the loads overlap
#pragma unroll 8
    for (int blk = 0; blk < blocks; ++blk) acc += part[offset + (long long)blk * stride + j];
    out[j] = acc;
}
