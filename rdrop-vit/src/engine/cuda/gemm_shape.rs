//! The shapes of the engine's GEMMs: a row-major product and the column-major problem cuBLASLt
//! runs for it (pure, compiled in every build so that CI tests the mapping).
//!
//! `C (m, n) = op(A) (m, k) · op(B) (k, n)` row-major is, read column-major, `Cᵀ (n, m) =
//! op(B)ᵀ · op(A)ᵀ`: the operands swap, the transposition flags stay with their buffers.

/// The shape of a row-major GEMM `C (m, n) = op(A) · op(B)`, dense operands: `A` is stored
/// `(m, k)` (`(k, m)` when `trans_a`), `B` `(k, n)` (`(n, k)` when `trans_b`), `C` `(m, n)`.
/// With `batch > 1`, matrix `i` of each operand starts `i · stride_*` elements in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowGemm {
    /// Rows of `C`.
    pub m: usize,
    /// Columns of `C`.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// `op(A) = Aᵀ`.
    pub trans_a: bool,
    /// `op(B) = Bᵀ`.
    pub trans_b: bool,
    /// Number of matrices (1: not batched).
    pub batch: usize,
    /// Elements between consecutive `A`s.
    pub stride_a: usize,
    /// Elements between consecutive `B`s.
    pub stride_b: usize,
    /// Elements between consecutive `C`s.
    pub stride_c: usize,
}

impl RowGemm {
    /// One `(m, n) = op(A)·op(B)` product.
    pub fn new(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Self {
        Self {
            m,
            n,
            k,
            trans_a,
            trans_b,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
        }
    }

    /// `batch` densely packed products.
    pub fn batched(self, batch: usize) -> Self {
        Self { batch, ..self }
    }

    /// Elements each operand must hold: `(A, B, C)`.
    pub fn lens(&self) -> (usize, usize, usize) {
        let last = self.batch.saturating_sub(1);
        (
            last * self.stride_a + self.m * self.k,
            last * self.stride_b + self.k * self.n,
            last * self.stride_c + self.m * self.n,
        )
    }
}

/// The column-major problem cuBLASLt runs for a [`RowGemm`]: `Cᵀ (n, m) = op(B)ᵀ · op(A)ᵀ`.
/// Each layout is the stored matrix `(rows, cols)` with leading dimension `rows` (a
/// row-major `(r, c)` buffer read column-major is `(c, r)`), before its transposition flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColMajor {
    /// cuBLASLt's `A`: our `B` buffer.
    pub first: (usize, usize),
    /// Whether cuBLASLt transposes it (`TRANSA`).
    pub trans_first: bool,
    /// cuBLASLt's `B`: our `A` buffer.
    pub second: (usize, usize),
    /// `TRANSB`.
    pub trans_second: bool,
    /// `C`/`D`: our `C` buffer, `(n, m)`.
    pub out: (usize, usize),
}

impl ColMajor {
    /// The column-major form of `g` (see the module doc).
    pub fn of(g: &RowGemm) -> Self {
        Self {
            first: if g.trans_b { (g.k, g.n) } else { (g.n, g.k) },
            trans_first: g.trans_b,
            second: if g.trans_a { (g.m, g.k) } else { (g.k, g.m) },
            trans_second: g.trans_a,
            out: (g.n, g.m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operand_lengths() {
        let g = RowGemm::new(4, 3, 2, false, true);
        assert_eq!(g.lens(), (8, 6, 12));
        let b = RowGemm::new(5, 5, 8, false, true).batched(6);
        assert_eq!(b.lens(), (5 * 40 + 40, 5 * 40 + 40, 5 * 25 + 25));
    }

    /// cuBLAS's column-major `D = op(A)·op(B)` over buffers with layouts `(rows, cols)`, ld =
    /// rows (the semantics cuBLASLt documents), batched with element strides.
    #[allow(clippy::too_many_arguments)]
    fn cublas_reference(
        cm: &ColMajor,
        a: &[f32],
        b: &[f32],
        batch: usize,
        sa: usize,
        sb: usize,
        sc: usize,
    ) -> Vec<f32> {
        let (ar, ac) = cm.first;
        let (br, bc) = cm.second;
        let (m, n) = cm.out;
        assert_eq!(m, if cm.trans_first { ac } else { ar }, "rows of op(A)");
        assert_eq!(n, if cm.trans_second { br } else { bc }, "columns of op(B)");
        let k = if cm.trans_first { ar } else { ac };
        assert_eq!(k, if cm.trans_second { bc } else { br }, "contracted dims");
        let at = |bi: usize, i: usize, l: usize| {
            // op(A)[i, l]
            let (r, c) = if cm.trans_first { (l, i) } else { (i, l) };
            a[bi * sa + c * ar + r]
        };
        let bt = |bi: usize, l: usize, j: usize| {
            let (r, c) = if cm.trans_second { (j, l) } else { (l, j) };
            b[bi * sb + c * br + r]
        };
        let mut d = vec![0f32; (batch - 1) * sc + m * n];
        for bi in 0..batch {
            for j in 0..n {
                for i in 0..m {
                    d[bi * sc + j * m + i] = (0..k).map(|l| at(bi, i, l) * bt(bi, l, j)).sum();
                }
            }
        }
        d
    }

    #[test]
    fn the_column_major_form_computes_the_row_major_product() {
        let (m, n, k, batch) = (3, 4, 5, 2);
        let val = |i: usize| ((i * 37 + 11) % 17) as f32 - 8.0;
        for ta in [false, true] {
            for tb in [false, true] {
                let g = RowGemm::new(m, n, k, ta, tb).batched(batch);
                let (la, lb, _) = g.lens();
                let a: Vec<f32> = (0..la).map(val).collect();
                let b: Vec<f32> = (0..lb).map(|i| val(i + 5)).collect();
                // Row-major op(A)[i, l] and op(B)[l, j].
                let ra = |bi: usize, i: usize, l: usize| {
                    a[bi * g.stride_a + if ta { l * m + i } else { i * k + l }]
                };
                let rb = |bi: usize, l: usize, j: usize| {
                    b[bi * g.stride_b + if tb { j * k + l } else { l * n + j }]
                };
                let cm = ColMajor::of(&g);
                // cuBLASLt's A is our B and its B our A.
                let d = cublas_reference(&cm, &b, &a, batch, g.stride_b, g.stride_a, g.stride_c);
                for bi in 0..batch {
                    for i in 0..m {
                        for j in 0..n {
                            let want: f32 = (0..k).map(|l| ra(bi, i, l) * rb(bi, l, j)).sum();
                            // D (n, m) column-major is C (m, n) row-major.
                            assert_eq!(d[bi * g.stride_c + i * n + j], want, "{ta} {tb}");
                        }
                    }
                }
            }
        }
    }
}
