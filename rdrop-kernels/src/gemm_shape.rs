//! The shapes of the CUDA GEMMs (`cuda::gemm`): a row-major product and the column-major
//! problem cuBLASLt runs for it, with a plain reference of that problem on the host (pure,
//! compiled in every build, so that the plan's size is known without CUDA and CI tests the
//! mapping).
//!
//! `C (m, n) = op(A) (m, k) · op(B) (k, n)` row-major is, read column-major, `Cᵀ (n, m) =
//! op(B)ᵀ · op(A)ᵀ`: the operands swap, the transposition flags stay with their buffers.

/// Bytes of cuBLASLt's workspace (NVIDIA's recommendation for Hopper; enough for every earlier
/// GPU), allocated once per `cuda::gemm::Gemm`.
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// The shape of a row-major GEMM `C (m, n) = op(A) · op(B)`: `A` is stored `(m, k)` (`(k, m)`
/// when `trans_a`), `B` `(k, n)` (`(n, k)` when `trans_b`), `C` `(m, n)`, the rows of each
/// stored matrix `ld_*` elements apart (dense: its column count; more for a padded layout such
/// as the attention probabilities' `ld = ⌈T/8⌉·8`). With `batch > 1`, matrix `i` of each operand
/// starts `i · stride_*` elements in.
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
    /// Elements between rows of the stored `A`.
    pub ld_a: usize,
    /// Elements between rows of the stored `B`.
    pub ld_b: usize,
    /// Elements between rows of `C`.
    pub ld_c: usize,
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
            ld_a: if trans_a { m } else { k },
            ld_b: if trans_b { k } else { n },
            ld_c: n,
        }
    }

    /// `batch` products, each operand's matrices `stride_*` elements apart.
    pub fn batched(self, batch: usize, stride_a: usize, stride_b: usize, stride_c: usize) -> Self {
        Self {
            batch,
            stride_a,
            stride_b,
            stride_c,
            ..self
        }
    }

    /// The same product with rows `ld_*` elements apart.
    pub fn with_ld(self, ld_a: usize, ld_b: usize, ld_c: usize) -> Self {
        Self {
            ld_a,
            ld_b,
            ld_c,
            ..self
        }
    }

    /// `(rows, columns)` of the stored `A` and `B`.
    pub fn stored(&self) -> ((usize, usize), (usize, usize)) {
        (
            if self.trans_a {
                (self.k, self.m)
            } else {
                (self.m, self.k)
            },
            if self.trans_b {
                (self.n, self.k)
            } else {
                (self.k, self.n)
            },
        )
    }

    /// Whether every leading dimension covers its row (`ld ≥ columns`).
    pub fn is_valid(&self) -> bool {
        let ((_, ac), (_, bc)) = self.stored();
        self.ld_a >= ac && self.ld_b >= bc && self.ld_c >= self.n
    }

    /// Elements each operand must hold: `(A, B, C)` (the last matrix's last row ends there).
    pub fn lens(&self) -> (usize, usize, usize) {
        let last = self.batch.saturating_sub(1);
        let span = |(r, c): (usize, usize), ld: usize| r.saturating_sub(1) * ld + c;
        let (sa, sb) = self.stored();
        (
            last * self.stride_a + span(sa, self.ld_a),
            last * self.stride_b + span(sb, self.ld_b),
            last * self.stride_c + span((self.m, self.n), self.ld_c),
        )
    }
}

/// Element type of a GEMM operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dt {
    /// f32.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl Dt {
    /// Bytes an element.
    pub fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::Bf16 | Dt::F16 => 2,
        }
    }
}

impl RowGemm {
    /// `cuBLASLt matmul m×n×k [Aᵀ] [Bᵀ] [×batch] ab→cd`, for errors.
    pub fn describe(&self, ab: Dt, cd: Dt) -> String {
        let t = |on: bool, s: &'static str| if on { s } else { "" };
        let batch = if self.batch > 1 {
            format!(" ×{}", self.batch)
        } else {
            String::new()
        };
        let (m, n, k) = (self.m, self.n, self.k);
        let (ta, tb) = (t(self.trans_a, " Aᵀ"), t(self.trans_b, " Bᵀ"));
        format!("cuBLASLt matmul {m}×{n}×{k}{ta}{tb}{batch} {ab:?}→{cd:?}")
    }

    /// Checks the shape, and operands of `a`, `b`, `c` elements (and a bias of `bias`) against
    /// it: the reason it cannot run, if any.
    pub fn check(&self, a: usize, b: usize, c: usize, bias: Option<usize>) -> Result<(), String> {
        let (la, lb, lc) = self.lens();
        if self.m == 0 || self.n == 0 || self.k == 0 || self.batch == 0 {
            Err("empty dimension".into())
        } else if !self.is_valid() {
            Err("a leading dimension is below its row length".into())
        } else if a < la || b < lb || c < lc {
            Err(format!(
                "operands of {a}, {b}, {c} elements; the shape needs {la}, {lb}, {lc}"
            ))
        } else if bias.is_some_and(|n| n < self.n) {
            Err(format!(
                "bias of {} elements for {} columns",
                bias.unwrap_or(0),
                self.n
            ))
        } else {
            Ok(())
        }
    }
}

/// The largest power of two (≤ 256) dividing a device address: cuBLASLt's heuristic assumes
/// 256-byte aligned operands unless told otherwise.
pub fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1 << ptr.trailing_zeros().min(8)
    }
}

/// The column-major problem cuBLASLt runs for a [`RowGemm`]: `Cᵀ (n, m) = op(B)ᵀ · op(A)ᵀ`.
/// Each layout is the stored matrix `(rows, cols, ld)` (a row-major `(r, c)` buffer with rows
/// `ld` apart read column-major is `(c, r)` with leading dimension `ld`), before its
/// transposition flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColMajor {
    /// cuBLASLt's `A`: our `B` buffer.
    pub first: (usize, usize, usize),
    /// Whether cuBLASLt transposes it (`TRANSA`).
    pub trans_first: bool,
    /// cuBLASLt's `B`: our `A` buffer.
    pub second: (usize, usize, usize),
    /// `TRANSB`.
    pub trans_second: bool,
    /// `C`/`D`: our `C` buffer, `(n, m, ld_c)`.
    pub out: (usize, usize, usize),
}

impl ColMajor {
    /// The column-major form of `g` (see the module doc).
    pub fn of(g: &RowGemm) -> Self {
        Self {
            first: if g.trans_b {
                (g.k, g.n, g.ld_b)
            } else {
                (g.n, g.k, g.ld_b)
            },
            trans_first: g.trans_b,
            second: if g.trans_a {
                (g.m, g.k, g.ld_a)
            } else {
                (g.k, g.m, g.ld_a)
            },
            trans_second: g.trans_a,
            out: (g.n, g.m, g.ld_c),
        }
    }
}

impl RowGemm {
    /// `C = op(A)·op(B)` on the host through [`ColMajor::of`] and cuBLAS's documented
    /// column-major semantics, on row-major buffers `a`, `b` as the shape lays them out; the
    /// result in `C`'s layout (unwritten padding is NaN). The reference the GEMM mapping is held
    /// to.
    ///
    /// # Panics
    /// If the shape is invalid or `a`, `b` are shorter than [`Self::lens`] gives.
    pub fn reference(&self, a: &[f32], b: &[f32]) -> Vec<f32> {
        let (la, lb, _) = self.lens();
        assert!(self.is_valid() && a.len() >= la && b.len() >= lb);
        // cuBLASLt's A is our B and its B our A.
        let (sa, sb, sc) = (self.stride_b, self.stride_a, self.stride_c);
        let (cm, a, b, batch) = (ColMajor::of(self), b, a, self.batch);
        let (ar, ac, lda) = cm.first;
        let (br, bc, ldb) = cm.second;
        let (m, n, ldd) = cm.out;
        assert!(lda >= ar && ldb >= br && ldd >= m, "leading dimensions");
        assert_eq!(m, if cm.trans_first { ac } else { ar }, "rows of op(A)");
        assert_eq!(n, if cm.trans_second { br } else { bc }, "columns of op(B)");
        let k = if cm.trans_first { ar } else { ac };
        assert_eq!(k, if cm.trans_second { bc } else { br }, "contracted dims");
        let at = |bi: usize, i: usize, l: usize| {
            // op(A)[i, l]
            let (r, c) = if cm.trans_first { (l, i) } else { (i, l) };
            a[bi * sa + c * lda + r]
        };
        let bt = |bi: usize, l: usize, j: usize| {
            let (r, c) = if cm.trans_second { (j, l) } else { (l, j) };
            b[bi * sb + c * ldb + r]
        };
        let mut d = vec![f32::NAN; (batch - 1) * sc + (n - 1) * ldd + m];
        for bi in 0..batch {
            for j in 0..n {
                for i in 0..m {
                    d[bi * sc + j * ldd + i] = (0..k).map(|l| at(bi, i, l) * bt(bi, l, j)).sum();
                }
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operand_lengths() {
        let g = RowGemm::new(4, 3, 2, false, true);
        assert_eq!(g.lens(), (8, 6, 12));
        assert!(g.is_valid());
        let b = RowGemm::new(5, 5, 8, false, true).batched(6, 40, 40, 25);
        assert_eq!(b.lens(), (5 * 40 + 40, 5 * 40 + 40, 5 * 25 + 25));
        // C (5, 5) with rows 8 apart, matrices 40 apart: the last row ends at 4·8 + 5.
        let p = RowGemm::new(5, 5, 8, false, true)
            .with_ld(8, 8, 8)
            .batched(6, 40, 40, 40);
        assert_eq!(p.lens().2, 5 * 40 + 4 * 8 + 5);
        assert!(!RowGemm::new(5, 5, 8, false, false)
            .with_ld(8, 4, 5)
            .is_valid());
    }

    #[test]
    fn checks_and_alignment() {
        let g = RowGemm::new(4, 3, 2, false, true);
        assert_eq!(g.check(8, 6, 12, Some(3)), Ok(()));
        assert!(
            g.check(7, 6, 12, None).unwrap_err().contains("needs 8"),
            "short A"
        );
        assert!(g
            .check(8, 6, 12, Some(2))
            .unwrap_err()
            .contains("bias of 2"));
        assert!(RowGemm::new(0, 3, 2, false, false)
            .check(9, 9, 9, None)
            .is_err());
        assert_eq!(
            g.describe(Dt::Bf16, Dt::F32),
            "cuBLASLt matmul 4×3×2 Bᵀ Bf16→F32"
        );
        assert_eq!(
            g.batched(6, 8, 6, 12).describe(Dt::F32, Dt::F32),
            "cuBLASLt matmul 4×3×2 Bᵀ ×6 F32→F32"
        );
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1040), 64);
    }

    #[test]
    fn the_column_major_form_computes_the_row_major_product() {
        let (m, n, k, batch) = (3, 4, 5, 2);
        let val = |i: usize| ((i * 37 + 11) % 17) as f32 - 8.0;
        // Dense, and every stored matrix padded (rows 2 elements longer, matrices 7 apart more).
        for pad in [0, 2] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let d0 = RowGemm::new(m, n, k, ta, tb);
                    let (lda, ldb, ldc) = (d0.ld_a + pad, d0.ld_b + pad, d0.ld_c + pad);
                    let ((ar, _), (br, _)) = d0.stored();
                    let g = d0.with_ld(lda, ldb, ldc).batched(
                        batch,
                        ar * lda + 7 * pad,
                        br * ldb + 7 * pad,
                        m * ldc + 7 * pad,
                    );
                    assert!(g.is_valid());
                    let (la, lb, lc) = g.lens();
                    let a: Vec<f32> = (0..la).map(val).collect();
                    let b: Vec<f32> = (0..lb).map(|i| val(i + 5)).collect();
                    // Row-major op(A)[i, l] and op(B)[l, j].
                    let ra = |bi: usize, i: usize, l: usize| {
                        a[bi * g.stride_a + if ta { l * lda + i } else { i * lda + l }]
                    };
                    let rb = |bi: usize, l: usize, j: usize| {
                        b[bi * g.stride_b + if tb { j * ldb + l } else { l * ldb + j }]
                    };
                    let d = g.reference(&a, &b);
                    assert_eq!(d.len(), lc, "C's extent");
                    for bi in 0..batch {
                        for i in 0..m {
                            for j in 0..n {
                                let want: f32 = (0..k).map(|l| ra(bi, i, l) * rb(bi, l, j)).sum();
                                // D (n, m) column-major is C (m, n) row-major.
                                let got = d[bi * g.stride_c + i * ldc + j];
                                assert_eq!(got, want, "pad {pad} ta {ta} tb {tb}");
                            }
                        }
                    }
                }
            }
        }
    }
}
