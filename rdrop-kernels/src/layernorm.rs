//! LayerNorm over rows of width `d` (biased variance), saving per-row statistics for the
//! backward:
//! ```text
//! μ = mean(x),  σ² = mean((x − μ)²),  r = (σ² + eps)^(−1/2),  x̂ = (x − μ)·r,  y = x̂·γ + β
//! g = dy⊙γ:  dx += r·(g − mean(g) − x̂·mean(g⊙x̂)),  dγ += Σ_rows dy⊙x̂,  dβ += Σ_rows dy
//! ```
//! Thread-count independence: rows are independent; the dγ/dβ sums over rows are split into
//! fixed blocks of [`BWD_ROWS`] rows whose partials are added in block order.

use rayon::prelude::*;

use crate::gelu::simd;

/// Rows per task in the forward.
const FWD_ROWS: usize = 16;
/// Rows per dγ/dβ partial in the backward.
pub const BWD_ROWS: usize = 32;

/// `y = LayerNorm(x)·γ + β` row by row; `mean` and `rstd` (one per row) are overwritten with
/// μ and r. x, y: rows×d; γ, β: d.
///
/// # Panics
/// On mismatched lengths (rows = x.len() / d).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd(
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    d: usize,
) {
    let rows = check(x.len(), d, "layernorm");
    assert_eq!(y.len(), x.len(), "layernorm: y and x differ in length");
    assert_eq!(mean.len(), rows, "layernorm: mean is not one per row");
    assert_eq!(rstd.len(), rows, "layernorm: rstd is not one per row");
    assert_eq!(gamma.len(), d, "layernorm: gamma is not d");
    assert_eq!(beta.len(), d, "layernorm: beta is not d");
    if rows == 0 {
        return;
    }
    y.par_chunks_mut(FWD_ROWS * d)
        .zip(x.par_chunks(FWD_ROWS * d))
        .zip(
            mean.par_chunks_mut(FWD_ROWS)
                .zip(rstd.par_chunks_mut(FWD_ROWS)),
        )
        .for_each(|((yb, xb), (mb, rb))| {
            simd(|| {
                for (((yr, xr), m), r) in yb
                    .chunks_exact_mut(d)
                    .zip(xb.chunks_exact(d))
                    .zip(mb.iter_mut())
                    .zip(rb.iter_mut())
                {
                    let mu = lane_sum(xr, xr, xr, |v, _, _| v) / d as f32;
                    let var = lane_sum(xr, xr, xr, |v, _, _| (v - mu) * (v - mu)) / d as f32;
                    let rs = 1.0 / (var + eps).sqrt();
                    for (((yv, &xv), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                        *yv = (xv - mu) * rs * g + b;
                    }
                    *m = mu;
                    *r = rs;
                }
            })
        });
}

/// Accumulators of [`lane_sum`]: one vector of partial sums.
const SUM_LANES: usize = 16;

/// `Σ_i f(a[i], b[i], c[i])` in f32 with [`SUM_LANES`] partial sums (element i goes to
/// partial i mod SUM_LANES; the partials are then added in order): vectorises, unlike one
/// running sum, and the order depends on the length only. The slices have equal lengths.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; SUM_LANES];
    let full = a.len() / SUM_LANES * SUM_LANES;
    fn chunks(v: &[f32], full: usize) -> std::slice::ChunksExact<'_, f32> {
        v[..full].chunks_exact(SUM_LANES)
    }
    for ((ca, cb), cc) in chunks(a, full).zip(chunks(b, full)).zip(chunks(c, full)) {
        for ((((acc, &x), &y), &z), _) in acc.iter_mut().zip(ca).zip(cb).zip(cc).zip(0..SUM_LANES) {
            *acc += f(x, y, z);
        }
    }
    for (((acc, &x), &y), &z) in acc
        .iter_mut()
        .zip(&a[full..])
        .zip(&b[full..])
        .zip(&c[full..])
    {
        *acc += f(x, y, z);
    }
    acc.iter().sum()
}

/// The rows of a rows×d buffer of `len` elements.
fn check(len: usize, d: usize, what: &str) -> usize {
    assert!(d > 0, "{what}: d = 0");
    assert_eq!(len % d, 0, "{what}: length is not a multiple of d");
    len / d
}

/// Scratch [`layernorm_bwd`] needs for `rows` rows of width `d`: one dγ and one dβ partial
/// per block of [`BWD_ROWS`] rows.
pub fn layernorm_bwd_scratch_len(rows: usize, d: usize) -> usize {
    rows.div_ceil(BWD_ROWS) * 2 * d
}

/// Backward of [`layernorm_fwd`] (see the module's formulas): dx **accumulates** (it is the
/// residual stream's gradient), dγ and dβ accumulate; x̂ is recomputed from x, μ and r.
/// `scratch` holds at least [`layernorm_bwd_scratch_len`] elements (contents ignored).
///
/// # Panics
/// On mismatched lengths or a short scratch.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd(
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    scratch: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    d: usize,
) {
    let rows = check(x.len(), d, "layernorm_bwd");
    assert_eq!(
        dx.len(),
        x.len(),
        "layernorm_bwd: dx and x differ in length"
    );
    assert_eq!(
        dy.len(),
        x.len(),
        "layernorm_bwd: dy and x differ in length"
    );
    assert_eq!(mean.len(), rows, "layernorm_bwd: mean is not one per row");
    assert_eq!(rstd.len(), rows, "layernorm_bwd: rstd is not one per row");
    assert_eq!(gamma.len(), d, "layernorm_bwd: gamma is not d");
    assert_eq!(dgamma.len(), d, "layernorm_bwd: dgamma is not d");
    assert_eq!(dbeta.len(), d, "layernorm_bwd: dbeta is not d");
    let need = layernorm_bwd_scratch_len(rows, d);
    assert!(
        scratch.len() >= need,
        "layernorm_bwd: scratch shorter than {need}"
    );
    let scratch = &mut scratch[..need];
    let inv_d = 1.0 / d as f32;
    let blk = BWD_ROWS * d;
    dx.par_chunks_mut(blk)
        .zip(dy.par_chunks(blk).zip(x.par_chunks(blk)))
        .zip(mean.par_chunks(BWD_ROWS).zip(rstd.par_chunks(BWD_ROWS)))
        .zip(scratch.par_chunks_mut(2 * d))
        .for_each(|(((dxb, (dyb, xb)), (mb, rb)), part)| {
            simd(|| {
                let (pg, pb) = part.split_at_mut(d);
                pg.fill(0.0);
                pb.fill(0.0);
                for ((dxr, (dyr, xr)), (&mu, &rs)) in dxb
                    .chunks_exact_mut(d)
                    .zip(dyb.chunks_exact(d).zip(xb.chunks_exact(d)))
                    .zip(mb.iter().zip(rb))
                {
                    let sg = lane_sum(dyr, gamma, xr, |dyv, g, _| dyv * g);
                    let sgx = lane_sum(dyr, gamma, xr, |dyv, g, xv| dyv * g * ((xv - mu) * rs));
                    let (mg, mgx) = (sg * inv_d, sgx * inv_d);
                    for (((((dxv, &dyv), &xv), &g), pgv), pbv) in dxr
                        .iter_mut()
                        .zip(dyr)
                        .zip(xr)
                        .zip(gamma)
                        .zip(pg.iter_mut())
                        .zip(pb.iter_mut())
                    {
                        let xh = (xv - mu) * rs;
                        *dxv += rs * (dyv * g - mg - xh * mgx);
                        *pgv += dyv * xh;
                        *pbv += dyv;
                    }
                }
            })
        });
    for part in scratch.chunks_exact(2 * d) {
        let (pg, pb) = part.split_at(d);
        for (a, &p) in dgamma.iter_mut().zip(pg) {
            *a += p;
        }
        for (a, &p) in dbeta.iter_mut().zip(pb) {
            *a += p;
        }
    }
}

/// Plain twin of [`layernorm_fwd`] (f64 arithmetic, no threads).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd_reference(
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    d: usize,
) {
    let rows = check(x.len(), d, "layernorm");
    for r in 0..rows {
        let xr = &x[r * d..(r + 1) * d];
        let mu = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = xr.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / d as f64;
        let rs = 1.0 / (var + eps as f64).sqrt();
        for i in 0..d {
            y[r * d + i] = ((xr[i] as f64 - mu) * rs * gamma[i] as f64 + beta[i] as f64) as f32;
        }
        mean[r] = mu as f32;
        rstd[r] = rs as f32;
    }
}

/// Plain twin of [`layernorm_bwd`] (f64 arithmetic, no threads, no scratch).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd_reference(
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    d: usize,
) {
    let rows = check(x.len(), d, "layernorm_bwd");
    let (mut dg, mut db) = (vec![0f64; d], vec![0f64; d]);
    for r in 0..rows {
        let (mu, rs) = (mean[r] as f64, rstd[r] as f64);
        let xh: Vec<f64> = (0..d).map(|i| (x[r * d + i] as f64 - mu) * rs).collect();
        let g: Vec<f64> = (0..d)
            .map(|i| dy[r * d + i] as f64 * gamma[i] as f64)
            .collect();
        let mg = g.iter().sum::<f64>() / d as f64;
        let mgx = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / d as f64;
        for i in 0..d {
            let v = dx[r * d + i] as f64 + rs * (g[i] - mg - xh[i] * mgx);
            dx[r * d + i] = v as f32;
            dg[i] += dy[r * d + i] as f64 * xh[i];
            db[i] += dy[r * d + i] as f64;
        }
    }
    for i in 0..d {
        dgamma[i] = (dgamma[i] as f64 + dg[i]) as f32;
        dbeta[i] = (dbeta[i] as f64 + db[i]) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::test_util::{pools, randn};

    struct Case {
        d: usize,
        x: Vec<f32>,
        gamma: Vec<f32>,
        beta: Vec<f32>,
        dy: Vec<f32>,
    }

    fn case(rows: usize, d: usize, seed: u32) -> Case {
        // Rows with an offset and a scale, as in a residual stream.
        let x = randn(rows * d, seed)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1.0 + (i / d % 5) as f32) + (i / d % 3) as f32)
            .collect();
        Case {
            d,
            x,
            gamma: randn(d, seed + 1).iter().map(|v| 1.0 + 0.5 * v).collect(),
            beta: randn(d, seed + 2),
            dy: randn(rows * d, seed + 3),
        }
    }

    fn fwd(c: &Case) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let rows = c.x.len() / c.d;
        let (mut y, mut m, mut r) = (vec![0.0; c.x.len()], vec![0.0; rows], vec![0.0; rows]);
        layernorm_fwd(&mut y, &mut m, &mut r, &c.x, &c.gamma, &c.beta, 1e-5, c.d);
        (y, m, r)
    }

    fn bwd(c: &Case, m: &[f32], r: &[f32], dx0: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let rows = c.x.len() / c.d;
        let (mut dx, mut dg, mut db) = (dx0.to_vec(), vec![0.5; c.d], vec![-0.25; c.d]);
        let mut s = vec![f32::NAN; layernorm_bwd_scratch_len(rows, c.d)];
        layernorm_bwd(
            &mut dx, &mut dg, &mut db, &mut s, &c.dy, &c.x, m, r, &c.gamma, c.d,
        );
        (dx, dg, db)
    }

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        for (i, (&a, &b)) in a.iter().zip(b).enumerate() {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }

    #[test]
    fn forward_and_backward_match_reference() {
        for &(rows, d) in &[(1, 1), (3, 7), (70, 192), (33, 768)] {
            let c = case(rows, d, 1);
            let (y, m, r) = fwd(&c);
            let (mut ry, mut rm, mut rr) = (vec![0.0; y.len()], vec![0.0; rows], vec![0.0; rows]);
            layernorm_fwd_reference(&mut ry, &mut rm, &mut rr, &c.x, &c.gamma, &c.beta, 1e-5, d);
            close(&y, &ry, 1e-5, "y");
            close(&m, &rm, 1e-6, "mean");
            close(&r, &rr, 1e-5, "rstd");
            let dx0 = randn(c.x.len(), 9);
            let (dx, dg, db) = bwd(&c, &m, &r, &dx0);
            let (mut rdx, mut rdg, mut rdb) = (dx0.clone(), vec![0.5; d], vec![-0.25; d]);
            layernorm_bwd_reference(
                &mut rdx, &mut rdg, &mut rdb, &c.dy, &c.x, &m, &r, &c.gamma, d,
            );
            close(&dx, &rdx, 1e-5, "dx");
            // dγ, dβ sum `rows` terms of size ~1 in f32.
            close(&dg, &rdg, 1e-5 * rows as f32, "dgamma");
            close(&db, &rdb, 1e-5 * rows as f32, "dbeta");
        }
    }

    /// LayerNorm in f64 for the finite differences: Σ y⊙dy.
    fn loss64(x: &[f64], gamma: &[f64], beta: &[f64], dy: &[f32], d: usize) -> f64 {
        let mut l = 0.0;
        for (r, xr) in x.chunks_exact(d).enumerate() {
            let mu = xr.iter().sum::<f64>() / d as f64;
            let var = xr.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / d as f64;
            let rs = 1.0 / (var + 1e-5).sqrt();
            for i in 0..d {
                l += ((xr[i] - mu) * rs * gamma[i] + beta[i]) * dy[r * d + i] as f64;
            }
        }
        l
    }

    /// The f32 backward against central differences of the forward's formula in f64.
    #[test]
    fn backward_matches_finite_differences() {
        let (rows, d) = (5, 9);
        let c = case(rows, d, 20);
        let (_, m, r) = fwd(&c);
        let (dx, dg, db) = bwd(&c, &m, &r, &vec![0.0; c.x.len()]);
        let x: Vec<f64> = c.x.iter().map(|&v| v as f64).collect();
        let g: Vec<f64> = c.gamma.iter().map(|&v| v as f64).collect();
        let b: Vec<f64> = c.beta.iter().map(|&v| v as f64).collect();
        let h = 1e-6;
        let fd = |v: &[f64], i: usize, f: &dyn Fn(&[f64]) -> f64| {
            let (mut p, mut q) = (v.to_vec(), v.to_vec());
            p[i] += h;
            q[i] -= h;
            (f(&p) - f(&q)) / (2.0 * h)
        };
        for (i, &a) in dx.iter().enumerate() {
            let n = fd(&x, i, &|v| loss64(v, &g, &b, &c.dy, d));
            assert!(
                (n - a as f64).abs() < 1e-4 * (1.0 + n.abs()),
                "dx[{i}] {n} vs {a}"
            );
        }
        for (i, &a) in dg.iter().enumerate() {
            let n = fd(&g, i, &|v| loss64(&x, v, &b, &c.dy, d)) + 0.5;
            assert!(
                (n - a as f64).abs() < 1e-4 * (1.0 + n.abs()),
                "dgamma[{i}] {n} vs {a}"
            );
        }
        for (i, &a) in db.iter().enumerate() {
            let n = fd(&b, i, &|v| loss64(&x, &g, v, &c.dy, d)) - 0.25;
            assert!(
                (n - a as f64).abs() < 1e-4 * (1.0 + n.abs()),
                "dbeta[{i}] {n} vs {a}"
            );
        }
    }

    #[test]
    fn thread_independent() {
        let c = case(1000, 192, 30);
        let dx0 = randn(c.x.len(), 31);
        let outs: Vec<_> = pools()
            .iter()
            .map(|p| {
                p.install(|| {
                    let (y, m, r) = fwd(&c);
                    (y, bwd(&c, &m, &r, &dx0))
                })
            })
            .collect();
        assert!(outs.iter().all(|o| o == &outs[0]));
    }
}
