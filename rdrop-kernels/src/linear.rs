//! Dense matrix products through the `gemm` crate (0.19, the one candle uses) and the
//! `nn.Linear` layer built on them: forward (optionally with exact GELU fused) and backward.
//!
//! ```text
//! matmul:      C (m×n) = α·op(A)·op(B) + β·C     op(A) m×k, op(B) k×n
//! linear_fwd:  y (rows×d_out) = x (rows×d_in) · Wᵀ + b          W is d_out×d_in
//! linear_bwd:  dx = dy·W,  dW += dyᵀ·x,  db += Σ_rows dy
//! ```
//! All matrices are row-major and dense (row stride = number of columns).
//!
//! Thread-count independence: inside one `gemm` call the reduction over `k` is ordered by the
//! shape alone (`gemm` picks its depth blocking from `m, n, k` and the cache sizes; its rayon
//! threads split the output into tiles, never the sum), and products with many rows are split
//! into blocks of rows of C whose size depends on the shape only. So the bits do not depend on
//! the thread count (tests compare 1, 2 and 3 threads, and gemm's threads with none).

use rayon::prelude::*;

use crate::gelu::bias_gelu_rows;

/// How a product is spread over threads (the bench compares them; the kernels use
/// [`Split::Auto`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// [`Split::Blocks`] when C has many rows (≥ [`BLOCKS_MIN_ROWS`]), else
    /// [`Split::GemmRayon`]: a function of the shape only.
    Auto,
    /// Fixed blocks of rows of C, one single-threaded `gemm` call each, run by rayon.
    Blocks,
    /// One `gemm` call with `Parallelism::Rayon(current_num_threads)`.
    GemmRayon,
    /// One single-threaded `gemm` call.
    Serial,
}

/// A strided view: element `(i, j)` of a matrix is at `i·rs + j·cs`.
#[derive(Debug, Clone, Copy)]
struct Strides {
    rs: usize,
    cs: usize,
}

/// The number of elements a `rows × cols` matrix with strides `s` spans.
fn span(rows: usize, cols: usize, s: Strides) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * s.rs + (cols - 1) * s.cs + 1
    }
}

/// `dst (m×n, row stride dst_rs, unit column stride) = alpha·lhs·rhs + beta·dst`, one `gemm`
/// call. `beta == 0` does not read `dst`.
///
/// # Panics
/// If a slice is shorter than the strided matrix it must hold.
#[allow(unsafe_code)]
#[allow(clippy::too_many_arguments)]
fn gemm_call(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    ls: Strides,
    rhs: &[f32],
    rs: Strides,
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    beta: f32,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst.len() >= span(m, n, Strides { rs: dst_rs, cs: 1 }),
        "matmul: C too short"
    );
    assert!(lhs.len() >= span(m, k, ls), "matmul: A too short");
    assert!(rhs.len() >= span(k, n, rs), "matmul: B too short");
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // gemm computes dst := α_gemm·dst + β_gemm·lhs·rhs: our beta is its α, our alpha its β.
    // SAFETY: the asserts above check that every index the strided m×n, m×k and k×n
    // matrices touch is inside `dst`, `lhs` and `rhs`; `dst` is an exclusive borrow so it
    // aliases neither input; strides fit in isize because they index real slices. With
    // read_dst = false gemm overwrites dst without reading it (test: C full of NaN).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            beta != 0.0,
            lhs.as_ptr(),
            ls.cs as isize,
            ls.rs as isize,
            rhs.as_ptr(),
            rs.cs as isize,
            rs.rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Rows of C from which [`Split::Auto`] runs blocks of rows itself. Measured with
/// `examples/kernels_bench.rs` (GFLOP per CPU-second, 2 threads, shared AMD EPYC with AVX-512):
/// with 8320 rows (x·Wᵀ and dy·W of the cpu-small ViT) blocks give 92–100 against 75–87 for
/// one rayon-parallel `gemm` call; with few rows (dyᵀ·x's 192–768 rows, ViT-B's 1576) every
/// block packs all of B again and the one call, which packs it once for all threads, wins
/// (84–97 against 69–86).
pub const BLOCKS_MIN_ROWS: usize = 4096;

/// Rows of C per block: 16 blocks (enough to balance a few threads; each block packs B once,
/// so not more), a multiple of 16, at least 64. A function of the shape only.
fn block_rows(m: usize) -> usize {
    (m.div_ceil(16)).next_multiple_of(16).max(64)
}

/// The split [`Split::Auto`] resolves to for an m-row C.
fn resolve(split: Split, m: usize) -> Split {
    match split {
        Split::Auto if m >= BLOCKS_MIN_ROWS => Split::Blocks,
        Split::Auto => Split::GemmRayon,
        s => s,
    }
}

/// `C (m×n) = alpha·op(A)·op(B) + beta·C`: A is m×k (stored k×m when `trans_a`), B is k×n
/// (stored n×k when `trans_b`), all row-major and dense; C's row stride is `n`. `beta == 0`
/// does not read C (it may hold garbage or NaN). Parallel with rayon (the current pool):
/// over fixed blocks of rows of C from [`BLOCKS_MIN_ROWS`] rows, inside `gemm` below; the
/// result does not depend on the thread count.
///
/// # Panics
/// If `c`, `a` or `b` does not hold exactly m·n, m·k, k·n elements.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) {
    matmul_with(
        Split::Auto,
        c,
        a,
        b,
        m,
        k,
        n,
        trans_a,
        trans_b,
        alpha,
        beta,
        |_, _| {},
    );
}

/// [`matmul`] with a chosen [`Split`] and an epilogue run on each finished block of rows of C
/// (`epilogue(first_row, block)`, the block being whole rows of C) while it is still in cache.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_with<F>(
    split: Split,
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    beta: f32,
    epilogue: F,
) where
    F: Fn(usize, &mut [f32]) + Sync,
{
    assert_eq!(c.len(), m * n, "matmul: C is not m×n");
    assert_eq!(a.len(), m * k, "matmul: A is not m×k");
    assert_eq!(b.len(), k * n, "matmul: B is not k×n");
    let ls = if trans_a {
        Strides { rs: 1, cs: m }
    } else {
        Strides { rs: k, cs: 1 }
    };
    let rs = if trans_b {
        Strides { rs: 1, cs: k }
    } else {
        Strides { rs: n, cs: 1 }
    };
    if m == 0 || n == 0 {
        return;
    }
    let br = block_rows(m);
    match resolve(split, m) {
        Split::Blocks => {
            c.par_chunks_mut(br * n).enumerate().for_each(|(i, cb)| {
                let r0 = i * br;
                let mb = cb.len() / n;
                // Row r0 of op(A) starts at r0·k (row-major) or at column r0 (transposed).
                // (A is empty when k = 0.)
                let a0 = if trans_a { r0 } else { r0 * k };
                let ab = a.get(a0..).unwrap_or_default();
                gemm_call(cb, n, ab, ls, b, rs, (mb, k, n), alpha, beta, 1);
                epilogue(r0, cb);
            });
        }
        one_call => {
            let threads = if one_call == Split::Serial {
                1
            } else {
                rayon::current_num_threads()
            };
            gemm_call(c, n, a, ls, b, rs, (m, k, n), alpha, beta, threads);
            c.par_chunks_mut(br * n)
                .enumerate()
                .for_each(|(i, cb)| epilogue(i * br, cb));
        }
    }
}

/// Plain twin of [`matmul`]: three loops, f64 accumulation, no threads.
#[allow(clippy::too_many_arguments)]
pub fn matmul_reference(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) {
    assert_eq!(c.len(), m * n);
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), k * n);
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for l in 0..k {
                let av = if trans_a { a[l * m + i] } else { a[i * k + l] };
                let bv = if trans_b { b[j * k + l] } else { b[l * n + j] };
                s += av as f64 * bv as f64;
            }
            let prev = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c[i * n + j] as f64
            };
            c[i * n + j] = (alpha as f64 * s + prev) as f32;
        }
    }
}

fn check_linear(y_len: usize, x_len: usize, w_len: usize, rows: usize, d_in: usize, d_out: usize) {
    assert_eq!(y_len, rows * d_out, "linear: y is not rows×d_out");
    assert_eq!(x_len, rows * d_in, "linear: x is not rows×d_in");
    assert_eq!(w_len, d_out * d_in, "linear: W is not d_out×d_in");
}

/// `y (rows×d_out) = x (rows×d_in) · Wᵀ + bias`, W being `d_out×d_in` (nn.Linear's layout).
/// The bias is added to each block of y right after its product, while it is in cache.
///
/// # Panics
/// On mismatched lengths (`bias` must hold `d_out`).
pub fn linear_fwd(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    check_linear(y.len(), x.len(), w.len(), rows, d_in, d_out);
    if let Some(b) = bias {
        assert_eq!(b.len(), d_out, "linear: bias is not d_out");
    }
    matmul_with(
        Split::Auto,
        y,
        x,
        w,
        rows,
        d_in,
        d_out,
        false,
        true,
        1.0,
        0.0,
        |_, blk| {
            if let Some(b) = bias {
                for row in blk.chunks_exact_mut(d_out) {
                    for (v, &bv) in row.iter_mut().zip(b) {
                        *v += bv;
                    }
                }
            }
        },
    );
}

/// [`linear_fwd`] with exact GELU fused: `pre = x·Wᵀ + bias` is saved (the backward needs
/// it) and `y = gelu(pre)` ([`crate::gelu::gelu_fwd`]'s formula), both per block in cache.
///
/// # Panics
/// On mismatched lengths (`pre` and `y` hold rows×d_out, `bias` d_out).
#[allow(clippy::too_many_arguments)]
pub fn linear_gelu_fwd(
    pre: &mut [f32],
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    check_linear(pre.len(), x.len(), w.len(), rows, d_in, d_out);
    assert_eq!(y.len(), rows * d_out, "linear_gelu: y is not rows×d_out");
    assert_eq!(bias.len(), d_out, "linear_gelu: bias is not d_out");
    if rows == 0 || d_out == 0 {
        return;
    }
    let br = block_rows(rows);
    let finish = |pb: &mut [f32], yb: &mut [f32]| bias_gelu_rows(pb, yb, bias);
    let (xs, ws) = (Strides { rs: d_in, cs: 1 }, Strides { rs: 1, cs: d_in });
    if resolve(Split::Auto, rows) == Split::Blocks {
        pre.par_chunks_mut(br * d_out)
            .zip(y.par_chunks_mut(br * d_out))
            .enumerate()
            .for_each(|(i, (pb, yb))| {
                let (r0, mb) = (i * br, pb.len() / d_out);
                gemm_call(
                    pb,
                    d_out,
                    &x[r0 * d_in..],
                    xs,
                    w,
                    ws,
                    (mb, d_in, d_out),
                    1.0,
                    0.0,
                    1,
                );
                finish(pb, yb);
            });
    } else {
        let threads = rayon::current_num_threads();
        gemm_call(
            pre,
            d_out,
            x,
            xs,
            w,
            ws,
            (rows, d_in, d_out),
            1.0,
            0.0,
            threads,
        );
        pre.par_chunks_mut(br * d_out)
            .zip(y.par_chunks_mut(br * d_out))
            .for_each(|(pb, yb)| finish(pb, yb));
    }
}

/// Columns of dy per task in the bias-gradient reduction.
const DB_COLS: usize = 64;

/// `db += Σ_rows dy` (dy rows×d_out): parallel over fixed blocks of columns, each summed
/// down the rows in order, vectorised across its columns (one pass over dy, thread-count
/// independent).
fn bias_grad(db: &mut [f32], dy: &[f32], d_out: usize) {
    db.par_chunks_mut(DB_COLS)
        .enumerate()
        .for_each(|(blk, dbb)| {
            let c0 = blk * DB_COLS;
            let w = dbb.len();
            let mut acc = [0f32; DB_COLS];
            for row in dy.chunks_exact(d_out) {
                for (a, &g) in acc[..w].iter_mut().zip(&row[c0..c0 + w]) {
                    *a += g;
                }
            }
            for (d, a) in dbb.iter_mut().zip(acc) {
                *d += a;
            }
        });
}

/// Backward of [`linear_fwd`] (and of [`linear_gelu_fwd`] once dy is the gradient of `pre`):
/// ```text
/// dx  = dy·W        (rows×d_in; overwritten, or `+=` when accumulate_dx; skipped when None)
/// dW += dyᵀ·x       (d_out×d_in)
/// db += Σ_rows dy   (d_out; skipped when None)
/// ```
///
/// # Panics
/// On mismatched lengths.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd(
    dx: Option<&mut [f32]>,
    accumulate_dx: bool,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    check_linear(dy.len(), x.len(), w.len(), rows, d_in, d_out);
    assert_eq!(dw.len(), d_out * d_in, "linear_bwd: dW is not d_out×d_in");
    if let Some(dx) = dx {
        assert_eq!(dx.len(), rows * d_in, "linear_bwd: dx is not rows×d_in");
        let beta = if accumulate_dx { 1.0 } else { 0.0 };
        matmul(dx, dy, w, rows, d_out, d_in, false, false, 1.0, beta);
    }
    matmul(dw, dy, x, d_out, rows, d_in, true, false, 1.0, 1.0);
    if let Some(db) = db {
        assert_eq!(db.len(), d_out, "linear_bwd: db is not d_out");
        bias_grad(db, dy, d_out);
    }
}

/// Plain twin of [`linear_fwd`] (f64 accumulation, no threads).
pub fn linear_fwd_reference(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    check_linear(y.len(), x.len(), w.len(), rows, d_in, d_out);
    for r in 0..rows {
        for o in 0..d_out {
            let mut s = bias.map_or(0.0, |b| b[o] as f64);
            for i in 0..d_in {
                s += x[r * d_in + i] as f64 * w[o * d_in + i] as f64;
            }
            y[r * d_out + o] = s as f32;
        }
    }
}

/// Plain twin of [`linear_bwd`] (f64 accumulation, no threads).
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_reference(
    dx: Option<&mut [f32]>,
    accumulate_dx: bool,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    check_linear(dy.len(), x.len(), w.len(), rows, d_in, d_out);
    if let Some(dx) = dx {
        for r in 0..rows {
            for i in 0..d_in {
                let mut s = if accumulate_dx {
                    dx[r * d_in + i] as f64
                } else {
                    0.0
                };
                for o in 0..d_out {
                    s += dy[r * d_out + o] as f64 * w[o * d_in + i] as f64;
                }
                dx[r * d_in + i] = s as f32;
            }
        }
    }
    for o in 0..d_out {
        for i in 0..d_in {
            let mut s = dw[o * d_in + i] as f64;
            for r in 0..rows {
                s += dy[r * d_out + o] as f64 * x[r * d_in + i] as f64;
            }
            dw[o * d_in + i] = s as f32;
        }
    }
    if let Some(db) = db {
        for o in 0..d_out {
            let mut s = db[o] as f64;
            for r in 0..rows {
                s += dy[r * d_out + o] as f64;
            }
            db[o] = s as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::test_util::{pools, randn};

    /// |got − want| ≤ tol·(Σ|terms| bound) per element: `scale[i]` is the magnitude bound.
    fn close(got: &[f32], want: &[f32], scale: &[f32], tol: f32, what: &str) {
        for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
            assert!(
                (g - w).abs() <= tol * (s + 1e-3),
                "{what}[{i}]: {g} vs {w} (scale {s})"
            );
        }
    }

    fn abs(v: &[f32]) -> Vec<f32> {
        v.iter().map(|x| x.abs()).collect()
    }

    #[test]
    fn matmul_matches_reference_in_all_transpositions() {
        // Shapes that are not multiples of any micro-kernel size, and m large enough for
        // several blocks.
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 3),
            (300, 37, 29),
            (130, 200, 65),
            (3, 70, 1),
        ] {
            for &(ta, tb) in &[(false, false), (false, true), (true, false), (true, true)] {
                let a = randn(m * k, 1);
                let b = randn(k * n, 2);
                let c0 = randn(m * n, 3);
                for &(alpha, beta) in &[(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)] {
                    let mut got = c0.clone();
                    matmul(&mut got, &a, &b, m, k, n, ta, tb, alpha, beta);
                    let mut want = c0.clone();
                    matmul_reference(&mut want, &a, &b, m, k, n, ta, tb, alpha, beta);
                    // Magnitude bound: |α|·|A|·|B| + |β|·|C|.
                    let mut bound = abs(&c0);
                    matmul_reference(
                        &mut bound,
                        &abs(&a),
                        &abs(&b),
                        m,
                        k,
                        n,
                        ta,
                        tb,
                        alpha.abs(),
                        beta.abs(),
                    );
                    close(&got, &want, &bound, 1e-5, "matmul");
                }
            }
        }
    }

    #[test]
    fn beta_zero_does_not_read_c() {
        let (m, k, n) = (150, 20, 33);
        let a = randn(m * k, 4);
        let b = randn(k * n, 5);
        let mut c = vec![f32::NAN; m * n];
        matmul(&mut c, &a, &b, m, k, n, false, false, 1.0, 0.0);
        assert!(c.iter().all(|v| v.is_finite()));
        let mut c = vec![f32::NAN; m * n];
        matmul_with(
            Split::GemmRayon,
            &mut c,
            &a,
            &b,
            m,
            k,
            n,
            true,
            true,
            1.0,
            0.0,
            |_, _| {},
        );
        assert!(c.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn empty_inner_dimension_scales_c() {
        let (m, n) = (70, 9);
        let c0 = randn(m * n, 30);
        for split in [Split::Blocks, Split::GemmRayon] {
            let mut c = vec![f32::NAN; m * n];
            matmul_with(
                split,
                &mut c,
                &[],
                &[],
                m,
                0,
                n,
                false,
                true,
                1.0,
                0.0,
                |_, _| {},
            );
            assert!(
                c.iter().all(|&v| v == 0.0),
                "{split:?}: beta = 0 gives zeros"
            );
            let mut c = c0.clone();
            matmul_with(
                split,
                &mut c,
                &[],
                &[],
                m,
                0,
                n,
                true,
                false,
                1.0,
                0.5,
                |_, _| {},
            );
            let want: Vec<f32> = c0.iter().map(|v| 0.5 * v).collect();
            assert_eq!(c, want, "{split:?}: beta·C");
        }
    }

    #[test]
    fn splits_agree_and_are_thread_independent() {
        // k = 1500 is above gemm's depth blocking (so partial sums over k are added to C).
        for &(m, k, n) in &[(1000, 96, 80), (300, 1500, 70)] {
            let a = randn(m * k, 6);
            let b = randn(k * n, 7);
            for &(ta, tb) in &[(false, true), (false, false), (true, false)] {
                let run = |split| {
                    let mut c = vec![0f32; m * n];
                    matmul_with(split, &mut c, &a, &b, m, k, n, ta, tb, 1.0, 0.0, |_, _| {});
                    c
                };
                let splits = [Split::Blocks, Split::GemmRayon, Split::Auto];
                let outs: Vec<Vec<_>> = pools()
                    .iter()
                    .map(|p| p.install(|| splits.iter().map(|&s| run(s)).collect()))
                    .collect();
                for o in &outs[1..] {
                    assert_eq!(o, &outs[0], "a split depends on the thread count");
                }
                let serial = run(Split::Serial);
                let (blocks, one_call) = (&outs[0][0], &outs[0][1]);
                close(blocks, &serial, &abs(&serial), 1e-5, "blocks vs serial");
                assert_eq!(
                    one_call, &serial,
                    "rayon inside gemm does not change the sums"
                );
            }
        }
    }

    #[test]
    fn linear_fwd_and_gelu_match_reference() {
        // Both sides of BLOCKS_MIN_ROWS.
        for rows in [150, BLOCKS_MIN_ROWS + 3] {
            linear_fwd_and_gelu_case(rows);
        }
    }

    fn linear_fwd_and_gelu_case(rows: usize) {
        let (d_in, d_out) = (48, 70);
        let x = randn(rows * d_in, 8);
        let w = randn(d_out * d_in, 9);
        let b = randn(d_out, 10);
        let bound = {
            let mut y = vec![0f32; rows * d_out];
            linear_fwd_reference(
                &mut y,
                &abs(&x),
                &abs(&w),
                Some(&abs(&b)),
                rows,
                d_in,
                d_out,
            );
            y
        };
        for bias in [None, Some(&b[..])] {
            let mut got = vec![f32::NAN; rows * d_out];
            linear_fwd(&mut got, &x, &w, bias, rows, d_in, d_out);
            let mut want = vec![0f32; rows * d_out];
            linear_fwd_reference(&mut want, &x, &w, bias, rows, d_in, d_out);
            close(&got, &want, &bound, 1e-5, "linear_fwd");
        }
        let mut pre = vec![f32::NAN; rows * d_out];
        let mut y = vec![f32::NAN; rows * d_out];
        linear_gelu_fwd(&mut pre, &mut y, &x, &w, &b, rows, d_in, d_out);
        let mut want = vec![0f32; rows * d_out];
        linear_fwd(&mut want, &x, &w, Some(&b), rows, d_in, d_out);
        assert_eq!(pre, want, "the fused pre-activation is linear_fwd's output");
        let mut g = vec![0f32; rows * d_out];
        crate::gelu::gelu_fwd(&mut g, &pre);
        assert_eq!(y, g, "the fused GELU is gelu_fwd");
    }

    #[test]
    fn linear_bwd_matches_reference_and_accumulates() {
        let (rows, d_in, d_out) = (140, 33, 70);
        let x = randn(rows * d_in, 11);
        let w = randn(d_out * d_in, 12);
        let dy = randn(rows * d_out, 13);
        let dx0 = randn(rows * d_in, 14);
        let dw0 = randn(d_out * d_in, 15);
        let db0 = randn(d_out, 16);
        for acc in [false, true] {
            let (mut dx, mut dw, mut db) = (dx0.clone(), dw0.clone(), db0.clone());
            linear_bwd(
                Some(&mut dx),
                acc,
                &mut dw,
                Some(&mut db),
                &dy,
                &x,
                &w,
                rows,
                d_in,
                d_out,
            );
            let (mut rx, mut rw, mut rb) = (dx0.clone(), dw0.clone(), db0.clone());
            linear_bwd_reference(
                Some(&mut rx),
                acc,
                &mut rw,
                Some(&mut rb),
                &dy,
                &x,
                &w,
                rows,
                d_in,
                d_out,
            );
            // Bounds: the same sums over absolute values.
            let (mut bx, mut bw, mut bb) = (abs(&dx0), abs(&dw0), abs(&db0));
            linear_bwd_reference(
                Some(&mut bx),
                true,
                &mut bw,
                Some(&mut bb),
                &abs(&dy),
                &abs(&x),
                &abs(&w),
                rows,
                d_in,
                d_out,
            );
            close(&dx, &rx, &bx, 1e-5, "dx");
            close(&dw, &rw, &bw, 1e-5, "dW");
            close(&db, &rb, &bb, 1e-5, "db");
        }
        // None skips dx and db.
        let mut dw = dw0.clone();
        linear_bwd(None, false, &mut dw, None, &dy, &x, &w, rows, d_in, d_out);
        let mut rw = dw0.clone();
        linear_bwd_reference(None, false, &mut rw, None, &dy, &x, &w, rows, d_in, d_out);
        let mut bw = abs(&dw0);
        linear_bwd_reference(
            None,
            false,
            &mut bw,
            None,
            &abs(&dy),
            &abs(&x),
            &abs(&w),
            rows,
            d_in,
            d_out,
        );
        close(&dw, &rw, &bw, 1e-5, "dW alone");
    }

    /// Central differences of L = Σ y⊙g through linear_fwd (f32; L is linear in x, W, b, so
    /// only rounding separates the difference quotient from the gradient).
    #[test]
    fn linear_bwd_matches_finite_differences() {
        let (rows, d_in, d_out) = (6, 5, 4);
        let x = randn(rows * d_in, 17);
        let w = randn(d_out * d_in, 18);
        let b = randn(d_out, 19);
        let g = randn(rows * d_out, 20);
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            let mut y = vec![0f32; rows * d_out];
            linear_fwd(&mut y, x, w, Some(b), rows, d_in, d_out);
            y.iter().zip(&g).map(|(&y, &g)| y as f64 * g as f64).sum()
        };
        let (mut dx, mut dw, mut db) =
            (vec![0f32; x.len()], vec![0f32; w.len()], vec![0f32; d_out]);
        linear_bwd(
            Some(&mut dx),
            false,
            &mut dw,
            Some(&mut db),
            &g,
            &x,
            &w,
            rows,
            d_in,
            d_out,
        );
        let h = 0.05f32;
        let fd = |v: &[f32], i: usize, f: &dyn Fn(&[f32]) -> f64| {
            let (mut p, mut m) = (v.to_vec(), v.to_vec());
            p[i] += h;
            m[i] -= h;
            ((f(&p) - f(&m)) / (p[i] - m[i]) as f64) as f32
        };
        for (i, &g) in dx.iter().enumerate() {
            let n = fd(&x, i, &|v| loss(v, &w, &b));
            assert!((n - g).abs() < 1e-3, "dx[{i}] {n} vs {g}");
        }
        for (i, &g) in dw.iter().enumerate() {
            let n = fd(&w, i, &|v| loss(&x, v, &b));
            assert!((n - g).abs() < 1e-3, "dW[{i}] {n} vs {g}");
        }
        for (i, &g) in db.iter().enumerate() {
            let n = fd(&b, i, &|v| loss(&x, &w, v));
            assert!((n - g).abs() < 1e-3, "db[{i}] {n} vs {g}");
        }
    }

    #[test]
    fn linear_is_thread_independent() {
        for rows in [1100, BLOCKS_MIN_ROWS + 5] {
            linear_thread_case(rows);
        }
    }

    fn linear_thread_case(rows: usize) {
        let (d_in, d_out) = (40, 130);
        let x = randn(rows * d_in, 21);
        let w = randn(d_out * d_in, 22);
        let b = randn(d_out, 23);
        let dy = randn(rows * d_out, 24);
        let outs: Vec<_> = pools()
            .iter()
            .map(|p| {
                p.install(|| {
                    let mut pre = vec![0f32; rows * d_out];
                    let mut y = vec![0f32; rows * d_out];
                    linear_gelu_fwd(&mut pre, &mut y, &x, &w, &b, rows, d_in, d_out);
                    let mut dx = vec![0f32; rows * d_in];
                    let mut dw = vec![0f32; d_out * d_in];
                    let mut db = vec![0f32; d_out];
                    linear_bwd(
                        Some(&mut dx),
                        false,
                        &mut dw,
                        Some(&mut db),
                        &dy,
                        &x,
                        &w,
                        rows,
                        d_in,
                        d_out,
                    );
                    (pre, y, dx, dw, db)
                })
            })
            .collect();
        for o in &outs[1..] {
            assert_eq!(o, &outs[0]);
        }
    }
}

/// Helpers shared by the crate's tests (kept here so that `lib.rs`'s module list is untouched).
#[cfg(test)]
pub(crate) mod test_util {
    use crate::philox::philox4x32_10;

    /// `len` values uniform in [−1, 1), a pure function of `seed` (Philox words).
    pub(crate) fn randn(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let w = philox4x32_10([i as u32, seed, 0x5eed, 0], [seed, 7])[0];
                (w as f64 / 2f64.powi(31) - 1.0) as f32
            })
            .collect()
    }

    /// Rayon pools of 1, 2 and 3 threads, to check thread-count independence.
    pub(crate) fn pools() -> Vec<rayon::ThreadPool> {
        [1, 2, 3]
            .iter()
            .map(|&t| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap()
            })
            .collect()
    }
}
