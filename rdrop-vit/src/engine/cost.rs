//! The work of each op of the engines, for the step profile (`rdrop_core::Profile`):
//! floating-point operations (a multiply-add is 2) and bytes moved (each operand read or
//! written once, at its element width). Both engines charge the same formulas, so their
//! profiles compare op for op; the bytes are a lower bound (caches are ignored, re-reads are
//! not counted).

/// `(flops, bytes)` of one op.
pub(crate) type Cost = (f64, f64);

/// `y (n, o) = x (n, i) · W (o, i)ᵀ + b`: `2·n·i·o` flops; x, W read and y written at
/// `e` bytes each.
pub(crate) fn gemm(n: usize, i: usize, o: usize, e: usize) -> Cost {
    let (n, i, o, e) = (n as f64, i as f64, o as f64, e as f64);
    (2.0 * n * i * o, e * (n * i + i * o + n * o))
}

/// The backward of [`gemm`]: `dx = dy·W` and `dW += dyᵀ·x` (and `db`), twice its flops.
/// `input_grad`: whether `dx` is computed (not for the patch embedding).
pub(crate) fn gemm_bwd(n: usize, i: usize, o: usize, e: usize, input_grad: bool) -> Cost {
    let (f, b) = gemm(n, i, o, e);
    if input_grad {
        (2.0 * f, 2.0 * b)
    } else {
        (f, b)
    }
}

/// LayerNorm of `n` rows of width `d` (f32 statistics): ~8 flops an element; reads x, writes
/// y (`e` bytes) and the two statistics.
pub(crate) fn layernorm(n: usize, d: usize, e: usize) -> Cost {
    let (n, d) = (n as f64, d as f64);
    (8.0 * n * d, n * d * (4.0 + e as f64) + 8.0 * n)
}

/// The backward of [`layernorm`] (with the recomputed forward): ~20 flops an element; reads
/// x and dy, writes dx, reads the statistics.
pub(crate) fn layernorm_bwd(n: usize, d: usize, e: usize) -> Cost {
    let (n, d) = (n as f64, d as f64);
    (20.0 * n * d, n * d * (8.0 + 2.0 * e as f64) + 8.0 * n)
}

/// Attention of `b` rows, `h` heads, `t` tokens of width `dh`: `QKᵀ` and `PV` (`4·b·h·t²·dh`)
/// and the softmax (~5 a score); reads q, k, v, writes the scores, the probabilities and the
/// output.
pub(crate) fn attention(b: usize, h: usize, t: usize, dh: usize, e: usize) -> Cost {
    let (bh, t, dh, e) = ((b * h) as f64, t as f64, dh as f64, e as f64);
    (
        bh * (4.0 * t * t * dh + 5.0 * t * t),
        bh * (4.0 * t * dh * e + 2.0 * t * t * e),
    )
}

/// The backward of [`attention`]: `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, the softmax backward, `dQ`, `dK`
/// (`8·b·h·t²·dh` and ~4 a score); reads q, k, v, P, dO and writes dq, dk, dv, dS.
pub(crate) fn attention_bwd(b: usize, h: usize, t: usize, dh: usize, e: usize) -> Cost {
    let (bh, t, dh, e) = ((b * h) as f64, t as f64, dh as f64, e as f64);
    (
        bh * (8.0 * t * t * dh + 4.0 * t * t),
        bh * (7.0 * t * dh * e + 3.0 * t * t * e),
    )
}

/// An element-wise op over `n` elements reading `reads` and writing `writes` arrays of `e`
/// bytes (plus one mask byte an element when `mask`), `flops` an element.
pub(crate) fn elementwise(
    n: usize,
    reads: usize,
    writes: usize,
    e: usize,
    flops: f64,
    mask: bool,
) -> Cost {
    let n = n as f64;
    (
        flops * n,
        n * ((reads + writes) * e) as f64 + if mask { n } else { 0.0 },
    )
}

/// The R-Drop loss over `2m` rows of `c` classes: two log-softmaxes, the cross-entropies and
/// both KL directions with their gradient (~20 flops a logit); reads the logits, writes their
/// gradient (f32).
pub(crate) fn loss(m: usize, c: usize) -> Cost {
    let n = (2 * m * c) as f64;
    (20.0 * n, 8.0 * n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_counts_multiply_adds_twice_and_each_operand_once() {
        assert_eq!(gemm(2, 3, 4, 4), (48.0, 4.0 * (6.0 + 12.0 + 8.0)));
        assert_eq!(gemm_bwd(2, 3, 4, 2, true).0, 96.0);
        assert_eq!(gemm_bwd(2, 3, 4, 2, false).0, 48.0);
        // ViT-B/16's QKV GEMM at 2·64 rows of 197 tokens: 2·N·D·3D.
        let n = 128 * 197;
        assert_eq!(gemm(n, 768, 2304, 2).0, 2.0 * n as f64 * 768.0 * 2304.0);
    }

    #[test]
    fn attention_is_dominated_by_its_two_batched_products() {
        let (f, _) = attention(2, 3, 10, 8, 4);
        let products = 2.0 * 2.0 * (2 * 3 * 10 * 10 * 8) as f64;
        assert!(f > products && f < 1.2 * products);
        assert_eq!(elementwise(10, 2, 1, 4, 1.0, true), (10.0, 130.0));
    }
}
