//! Multi-head self-attention (softmax, dropout on the probabilities, both matmuls), forward
//! and backward, on the fused `qkv` projection.
//!
//! Per sample `b` and head `h`, with `Q, K, V` the head's `(T, dh)` slices of `qkv` and
//! `s = 1/√dh`:
//! ```text
//! S = s · Q Kᵀ                 (T, T)
//! P = softmax(S)               over the last axis, f32, max subtracted     (saved in `probs`)
//! A = dropout(P) = P ⊙ M       M ∈ {0, 1/(1−p)}, regenerated from Philox keys, never stored
//! O = A V                      (T, dh), written to columns h·dh .. (h+1)·dh of `out`
//! ```
//! Backward, from `dO`:
//! ```text
//! dV = Aᵀ dO    dA = dO Vᵀ    dP = dA ⊙ M    dS = P ⊙ (dP − Σ_j dP_j P_j)
//! dQ = s · dS K                 dK = s · dSᵀ Q
//! ```
//! The mask element of `(h, i, j)` is element `h·T·T + i·T + j` of the sample's key (see
//! [`crate::dropout`]): one mask covers the sample's whole `(H, T, T)` block of probabilities.
//!
//! Threads: forward and backward run one sample per rayon task (so `B` should be at least a
//! few times the thread count); the small per-head products call `gemm` single-threaded. Every
//! output element is computed by one task in a fixed order, so results do not depend on the
//! rayon thread count. With dropout, the forward computes `s_keep·(P V − Σ_dropped P_ij V_j)`
//! (a GEMM plus a correction over the dropped elements), which equals `(P ⊙ M) V` up to rounding.

use rayon::prelude::*;

use crate::dropout::{RowKey, Site};
use crate::philox::{drop_threshold, keep_scale, MaskKey};

/// Attention shapes: `batch` samples of `tokens` tokens, `heads` heads of `head_dim`;
/// the model width is `D = heads · head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    /// Samples `B`.
    pub batch: usize,
    /// Tokens per sample `T`.
    pub tokens: usize,
    /// Heads `H`.
    pub heads: usize,
    /// Per-head width `dh`.
    pub head_dim: usize,
}

impl AttnDims {
    /// Model width `D = H · dh`.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn check(&self, out: usize, probs: usize, qkv: usize, rows: Option<usize>) {
        let (b, t, d) = (self.batch, self.tokens, self.width());
        assert!(
            t > 0 && d > 0,
            "attention: tokens and width must be positive"
        );
        assert_eq!(out, b * t * d, "attention: out/dout is not (B, T, D)");
        assert_eq!(
            probs,
            b * self.heads * t * t,
            "attention: probs is not (B, H, T, T)"
        );
        assert_eq!(qkv, b * t * 3 * d, "attention: qkv is not (B, T, 3D)");
        if let Some(r) = rows {
            assert_eq!(r, b, "attention: dropout rows must number B");
        }
    }
}

/// `dst = (accumulate ? dst : 0) + alpha · lhs · rhs` for `(m, k) · (k, n)` strided views:
/// element `(i, j)` of a view with row stride `rs` and column stride `cs` is `x[i·rs + j·cs]`.
/// `dst` must have column stride 1 and row stride ≥ `n` (its elements are distinct).
///
/// # Panics
/// If a view reaches past its slice or `dst` is not laid out as above.
#[allow(clippy::too_many_arguments)]
#[allow(unsafe_code)]
fn small_gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
    alpha: f32,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let extent = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst_rs >= n && extent(m, n, dst_rs, 1) < dst.len());
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(extent(m, k, lhs_rs, lhs_cs) < lhs.len());
    assert!(extent(k, n, rhs_rs, rhs_cs) < rhs.len());
    // SAFETY: every element the three views address lies inside its slice (asserted above);
    // `dst` is a unique borrow whose view has distinct elements (column stride 1, row stride
    // ≥ n), so gemm's writes neither alias each other nor the shared `lhs`/`rhs`; strides
    // fit in isize because they index inside slices; single-threaded (Parallelism::None).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Mask values (`0` or `scale`) of elements `e0 .. e0 + out.len()` of `key`'s stream.
#[inline(never)]
fn mask_range(key: &MaskKey, thr: u32, scale: f32, e0: usize, out: &mut [f32]) {
    let (mut e, mut i) = (e0, 0);
    while i < out.len() {
        let w = key.block((e / 4) as u32);
        let off = e % 4;
        let take = (4 - off).min(out.len() - i);
        for t in 0..take {
            out[i + t] = if w[off + t] < thr { 0.0 } else { scale };
        }
        i += take;
        e += take;
    }
}

/// The per-sample dropout parameters, `None` when there is nothing to drop.
fn active<'a>(dropout: Option<(&'a Site, &'a [RowKey])>) -> Option<(&'a Site, &'a [RowKey])> {
    dropout.filter(|(s, _)| s.p != 0.0)
}

/// `e^x` in f32 for the softmax: Cephes' `expf` (range reduction by ln 2 in two parts, degree-6
/// polynomial, relative error ≈ 2 ulp), branch-free so that loops over it vectorise; `0` below
/// −87.3 (the smallest normal), which a max-subtracted softmax can only round away.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    let xc = if x > 88.0 { 88.0 } else { x };
    let xc = if xc < -87.0 { -87.0 } else { xc };
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let bits = ((t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23) as u32;
    let e = y * f32::from_bits(bits);
    if x < -87.0 {
        0.0
    } else {
        e
    }
}

/// Sums eight lanes in a fixed tree.
#[inline(always)]
fn lanes_sum(a: [f32; 8]) -> f32 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// `Σ x·y` in eight lanes (fixed order: the result depends only on the inputs).
#[inline]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in xc.zip(yc) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    lanes_sum(acc) + tail
}

/// In-place softmax of one row (f32, max subtracted), vectorisable and in a fixed order.
#[inline]
pub fn softmax_row(row: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for c in chunks {
        for k in 0..8 {
            mx[k] = if c[k] > mx[k] { c[k] } else { mx[k] };
        }
    }
    for m in mx {
        max = if m > max { m } else { max };
    }
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for k in 0..8 {
            c[k] = exp_f32(c[k] - max);
            acc[k] += c[k];
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_f32(*v - max);
        tail += *v;
    }
    let inv = 1.0 / (lanes_sum(acc) + tail);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Attention forward (see the module docs).
/// - `out` `(B, T, D)`: overwritten with `O`, heads concatenated (column `h·dh + j`);
/// - `probs` `(B, H, T, T)`: overwritten with `P` (before dropout), kept for the backward;
/// - `qkv` `(B, T, 3D)`: each row `[q | k | v]`, head `h` at columns `h·dh .. (h+1)·dh` of each;
/// - `dropout`: `None`, or the site and one [`RowKey`] per sample (`rows.len() == B`).
///
/// # Panics
/// If a buffer does not have the size `dims` gives, or `rows.len() != B`.
pub fn attention_fwd(
    out: &mut [f32],
    probs: &mut [f32],
    qkv: &[f32],
    dims: AttnDims,
    dropout: Option<(&Site, &[RowKey])>,
) {
    dims.check(
        out.len(),
        probs.len(),
        qkv.len(),
        dropout.map(|(_, r)| r.len()),
    );
    let (t, h_n, d) = (dims.tokens, dims.heads, dims.width());
    let drop = active(dropout);
    // One sample per task: its heads interleave in `out`, and its (H, T, T) block of `probs`
    // stays in cache between the softmax and the P·V product.
    probs
        .par_chunks_mut(h_n * t * t)
        .zip(out.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(b, (p, o))| {
            let mask = drop.map(|(site, rows)| SampleMask::new(site, rows[b]));
            fwd_sample(
                o,
                p,
                &qkv[b * t * 3 * d..][..t * 3 * d],
                dims,
                mask.as_ref(),
            );
        });
}

/// One sample's dropout mask: key, threshold and keep scale.
struct SampleMask {
    key: MaskKey,
    thr: u32,
    scale: f32,
}

impl SampleMask {
    fn new(site: &Site, row: RowKey) -> Self {
        Self {
            key: site.key(row),
            thr: drop_threshold(site.p),
            scale: keep_scale(site.p),
        }
    }
}

/// The forward of one sample: `o` `(T, D)`, `p` `(H, T, T)`, `x` its `(T, 3D)` rows of `qkv`.
/// Per head, `S = s·Q Kᵀ` into `p`, the softmax in place, then
/// `O = (P ⊙ M) V = s_keep·(P V − Σ_{dropped j} P_ij V_j)`: a GEMM on `P` and a correction over
/// the few dropped elements.
#[inline(never)]
fn fwd_sample(o: &mut [f32], p: &mut [f32], x: &[f32], dims: AttnDims, mask: Option<&SampleMask>) {
    let (t, dh, d) = (dims.tokens, dims.head_dim, dims.width());
    let row3 = 3 * d;
    let scale = 1.0 / (dh as f32).sqrt();
    for (h, ph) in p.chunks_mut(t * t).enumerate() {
        let c = h * dh;
        small_gemm(
            (t, t, dh),
            ph,
            t,
            (&x[c..], row3, 1),
            (&x[d + c..], 1, row3),
            scale,
            false,
        );
        ph.chunks_mut(t).for_each(softmax_row);
        small_gemm(
            (t, dh, t),
            &mut o[c..],
            d,
            (ph, t, 1),
            (&x[2 * d + c..], row3, 1),
            1.0,
            false,
        );
        if let Some(m) = mask {
            for (i, prow) in ph.chunks(t).enumerate() {
                drop_correction(
                    &mut o[i * d + c..][..dh],
                    prow,
                    &x[2 * d..],
                    (row3, c),
                    &m.key,
                    (m.thr, m.scale),
                    (h * t + i) * t,
                );
            }
        }
    }
}

/// `o ← s·(o − Σ_{j dropped} p_j · V_j)` for one output row `o = Σ_j p_j V_j`: mask elements
/// `e0 ..` of `key`, `V_j = v[j·rs + c ..][..o.len()]`.
#[inline(never)]
fn drop_correction(
    o: &mut [f32],
    p: &[f32],
    v: &[f32],
    (rs, c): (usize, usize),
    key: &MaskKey,
    (thr, scale): (u32, f32),
    e0: usize,
) {
    const J: usize = 64;
    let mut m = [0f32; J];
    for j0 in (0..p.len()).step_by(J) {
        let n = J.min(p.len() - j0);
        mask_range(key, thr, 1.0, e0 + j0, &mut m[..n]);
        for (jj, (&mk, &pv)) in m[..n].iter().zip(&p[j0..]).enumerate() {
            if mk == 0.0 && pv != 0.0 {
                let vrow = &v[(j0 + jj) * rs + c..][..o.len()];
                for (o, &vv) in o.iter_mut().zip(vrow) {
                    *o -= pv * vv;
                }
            }
        }
    }
    for o in o.iter_mut() {
        *o *= scale;
    }
}

/// Scratch length [`attention_bwd`] needs: two `(T, T)` blocks per sample.
pub fn attention_bwd_scratch_len(dims: AttnDims) -> usize {
    dims.batch * 2 * dims.tokens * dims.tokens
}

/// Attention backward (see the module docs).
/// - `dqkv` `(B, T, 3D)`: overwritten with `[dQ | dK | dV]` in `qkv`'s layout;
/// - `scratch`: at least [`attention_bwd_scratch_len`] floats (contents irrelevant, clobbered);
/// - `dout` `(B, T, D)`: `dO`; `qkv`, `probs`: as saved by [`attention_fwd`];
/// - `dropout`: the same as in the forward (the mask is regenerated).
///
/// # Panics
/// If a buffer does not have the size `dims` gives, `scratch` is too short, or
/// `rows.len() != B`.
pub fn attention_bwd(
    dqkv: &mut [f32],
    scratch: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    probs: &[f32],
    dims: AttnDims,
    dropout: Option<(&Site, &[RowKey])>,
) {
    dims.check(
        dout.len(),
        probs.len(),
        qkv.len(),
        dropout.map(|(_, r)| r.len()),
    );
    assert_eq!(dqkv.len(), qkv.len(), "attention: dqkv is not (B, T, 3D)");
    let need = attention_bwd_scratch_len(dims);
    assert!(scratch.len() >= need, "attention: scratch too short");
    let (t, h_n, d) = (dims.tokens, dims.heads, dims.width());
    let drop = active(dropout);
    dqkv.par_chunks_mut(t * 3 * d)
        .zip(scratch[..need].par_chunks_mut(2 * t * t))
        .enumerate()
        .for_each(|(b, (dx, sc))| {
            let mask = drop.map(|(site, rows)| SampleMask::new(site, rows[b]));
            bwd_sample(
                dx,
                sc,
                &dout[b * t * d..][..t * d],
                &qkv[b * t * 3 * d..][..t * 3 * d],
                &probs[b * h_n * t * t..][..h_n * t * t],
                dims,
                mask.as_ref(),
            );
        });
}

/// The backward of one sample: `dx` `(T, 3D)`, `sc` two `(T, T)` scratch blocks, `go` `(T, D)`,
/// `x` `(T, 3D)`, `p` `(H, T, T)`.
#[inline(never)]
fn bwd_sample(
    dx: &mut [f32],
    sc: &mut [f32],
    go: &[f32],
    x: &[f32],
    p: &[f32],
    dims: AttnDims,
    mask: Option<&SampleMask>,
) {
    let (t, dh, d) = (dims.tokens, dims.head_dim, dims.width());
    let row3 = 3 * d;
    let scale = 1.0 / (dh as f32).sqrt();
    let (da, am) = sc.split_at_mut(t * t);
    for (h, p) in p.chunks(t * t).enumerate() {
        let c = h * dh;
        // dA = dO Vᵀ
        small_gemm(
            (t, t, dh),
            da,
            t,
            (&go[c..], d, 1),
            (&x[2 * d + c..], 1, row3),
            1.0,
            false,
        );
        // A = P ⊙ M and dP = dA ⊙ M
        let a: &[f32] = match mask {
            None => p,
            Some(m) => {
                mask_range(&m.key, m.thr, m.scale, h * t * t, am);
                for ((m, &pv), g) in am.iter_mut().zip(p).zip(da.iter_mut()) {
                    *g *= *m;
                    *m *= pv;
                }
                am
            }
        };
        // dV = Aᵀ dO
        small_gemm(
            (t, dh, t),
            &mut dx[2 * d + c..],
            row3,
            (a, 1, t),
            (&go[c..], d, 1),
            1.0,
            false,
        );
        // dS = P ⊙ (dP − Σ_j dP_j P_j), in place of dP
        for (g, pr) in da.chunks_mut(t).zip(p.chunks(t)) {
            let dot = dot(g, pr);
            for (g, &pv) in g.iter_mut().zip(pr) {
                *g = pv * (*g - dot);
            }
        }
        // dQ = s·dS K,  dK = s·dSᵀ Q
        small_gemm(
            (t, dh, t),
            &mut dx[c..],
            row3,
            (da, t, 1),
            (&x[d + c..], row3, 1),
            scale,
            false,
        );
        small_gemm(
            (t, dh, t),
            &mut dx[d + c..],
            row3,
            (da, 1, t),
            (&x[c..], row3, 1),
            scale,
            false,
        );
    }
}

/// f64 core of the reference: returns `(out, probs)` for `qkv` (same layouts as the fast one).
fn fwd_f64(
    qkv: &[f64],
    dims: AttnDims,
    dropout: Option<(&Site, &[RowKey])>,
) -> (Vec<f64>, Vec<f64>) {
    let (b_n, t, h_n, dh, d) = (
        dims.batch,
        dims.tokens,
        dims.heads,
        dims.head_dim,
        dims.width(),
    );
    let s = 1.0 / (dh as f64).sqrt();
    let mut out = vec![0.0; b_n * t * d];
    let mut probs = vec![0.0; b_n * h_n * t * t];
    for b in 0..b_n {
        for h in 0..h_n {
            let q = |i: usize, c: usize| qkv[(b * t + i) * 3 * d + h * dh + c];
            let k = |i: usize, c: usize| qkv[(b * t + i) * 3 * d + d + h * dh + c];
            let v = |i: usize, c: usize| qkv[(b * t + i) * 3 * d + 2 * d + h * dh + c];
            for i in 0..t {
                let sr: Vec<f64> = (0..t)
                    .map(|j| s * (0..dh).map(|c| q(i, c) * k(j, c)).sum::<f64>())
                    .collect();
                let max = sr.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sr.iter().map(|x| (x - max).exp()).sum();
                for j in 0..t {
                    probs[((b * h_n + h) * t + i) * t + j] = (sr[j] - max).exp() / z;
                }
                for c in 0..dh {
                    let mut acc = 0.0;
                    for j in 0..t {
                        acc += a_elem(&probs, dims, dropout, b, h, i, j) * v(j, c);
                    }
                    out[(b * t + i) * d + h * dh + c] = acc;
                }
            }
        }
    }
    (out, probs)
}

/// The mask value (`0`, `1/(1−p)`, or `1` without dropout) of element `(b, h, i, j)`.
fn mask_elem(
    dims: AttnDims,
    dropout: Option<(&Site, &[RowKey])>,
    b: usize,
    h: usize,
    i: usize,
    j: usize,
) -> f64 {
    match dropout {
        None => 1.0,
        Some((site, rows)) => {
            let t = dims.tokens;
            let keep = site.key(rows[b]).word((h * t + i) * t + j) >= drop_threshold(site.p);
            if keep {
                keep_scale(site.p) as f64
            } else {
                0.0
            }
        }
    }
}

fn a_elem(
    probs: &[f64],
    dims: AttnDims,
    dropout: Option<(&Site, &[RowKey])>,
    b: usize,
    h: usize,
    i: usize,
    j: usize,
) -> f64 {
    let t = dims.tokens;
    probs[((b * dims.heads + h) * t + i) * t + j] * mask_elem(dims, dropout, b, h, i, j)
}

/// f64 core of the reference backward: `dqkv` from `dout` (probabilities recomputed).
fn bwd_f64(
    dout: &[f64],
    qkv: &[f64],
    dims: AttnDims,
    dropout: Option<(&Site, &[RowKey])>,
) -> Vec<f64> {
    let (b_n, t, h_n, dh, d) = (
        dims.batch,
        dims.tokens,
        dims.heads,
        dims.head_dim,
        dims.width(),
    );
    let s = 1.0 / (dh as f64).sqrt();
    let (_, probs) = fwd_f64(qkv, dims, dropout);
    let mut dqkv = vec![0.0; qkv.len()];
    let idx = |b: usize, i: usize, part: usize, h: usize, c: usize| {
        (b * t + i) * 3 * d + part * d + h * dh + c
    };
    for b in 0..b_n {
        for h in 0..h_n {
            let p = |i: usize, j: usize| probs[((b * h_n + h) * t + i) * t + j];
            let go = |i: usize, c: usize| dout[(b * t + i) * d + h * dh + c];
            let mut ds = vec![0.0; t * t];
            for i in 0..t {
                let dp: Vec<f64> = (0..t)
                    .map(|j| {
                        let da: f64 = (0..dh).map(|c| go(i, c) * qkv[idx(b, j, 2, h, c)]).sum();
                        da * mask_elem(dims, dropout, b, h, i, j)
                    })
                    .collect();
                let dot: f64 = (0..t).map(|j| dp[j] * p(i, j)).sum();
                for j in 0..t {
                    ds[i * t + j] = p(i, j) * (dp[j] - dot);
                }
            }
            for i in 0..t {
                for c in 0..dh {
                    let mut dv = 0.0;
                    let mut dq = 0.0;
                    let mut dk = 0.0;
                    for j in 0..t {
                        dv += a_elem(&probs, dims, dropout, b, h, j, i) * go(j, c);
                        dq += ds[i * t + j] * qkv[idx(b, j, 1, h, c)];
                        dk += ds[j * t + i] * qkv[idx(b, j, 0, h, c)];
                    }
                    dqkv[idx(b, i, 2, h, c)] = dv;
                    dqkv[idx(b, i, 0, h, c)] = s * dq;
                    dqkv[idx(b, i, 1, h, c)] = s * dk;
                }
            }
        }
    }
    dqkv
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Plain twin of [`attention_fwd`]: one element at a time in f64, no threads.
///
/// # Panics
/// As [`attention_fwd`].
pub fn attention_fwd_reference(
    out: &mut [f32],
    probs: &mut [f32],
    qkv: &[f32],
    dims: AttnDims,
    dropout: Option<(&Site, &[RowKey])>,
) {
    dims.check(
        out.len(),
        probs.len(),
        qkv.len(),
        dropout.map(|(_, r)| r.len()),
    );
    let (o, p) = fwd_f64(&to_f64(qkv), dims, active(dropout));
    out.iter_mut().zip(o).for_each(|(d, s)| *d = s as f32);
    probs.iter_mut().zip(p).for_each(|(d, s)| *d = s as f32);
}

/// Plain twin of [`attention_bwd`] in f64 (recomputes the probabilities from `qkv`; `probs`
/// is only checked for size).
///
/// # Panics
/// As [`attention_bwd`] (without the scratch).
pub fn attention_bwd_reference(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    probs: &[f32],
    dims: AttnDims,
    dropout: Option<(&Site, &[RowKey])>,
) {
    dims.check(
        dout.len(),
        probs.len(),
        qkv.len(),
        dropout.map(|(_, r)| r.len()),
    );
    assert_eq!(dqkv.len(), qkv.len());
    let g = bwd_f64(&to_f64(dout), &to_f64(qkv), dims, active(dropout));
    dqkv.iter_mut().zip(g).for_each(|(d, s)| *d = s as f32);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32, amp: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let w = crate::philox::philox4x32_10([i as u32, seed, 7, 1], [3, 4])[0];
                amp * ((w as f64 / 4_294_967_296.0) as f32 * 2.0 - 1.0)
            })
            .collect()
    }

    fn rows(b: usize) -> Vec<RowKey> {
        (0..b as u32)
            .map(|i| RowKey {
                sample: 10 + i / 2,
                pass: i % 2,
            })
            .collect()
    }

    const SITE: Site = Site {
        seed: 77,
        update: 3,
        site: 5,
        p: 0.2,
    };

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    fn run_fwd(
        qkv: &[f32],
        dims: AttnDims,
        drop: Option<(&Site, &[RowKey])>,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![f32::NAN; dims.batch * dims.tokens * dims.width()];
        let mut probs = vec![f32::NAN; dims.batch * dims.heads * dims.tokens * dims.tokens];
        attention_fwd(&mut out, &mut probs, qkv, dims, drop);
        (out, probs)
    }

    fn run_bwd(
        dout: &[f32],
        qkv: &[f32],
        probs: &[f32],
        dims: AttnDims,
        drop: Option<(&Site, &[RowKey])>,
    ) -> Vec<f32> {
        let mut dqkv = vec![f32::NAN; qkv.len()];
        let mut scratch = vec![f32::NAN; attention_bwd_scratch_len(dims)];
        attention_bwd(&mut dqkv, &mut scratch, dout, qkv, probs, dims, drop);
        dqkv
    }

    #[test]
    fn fast_matches_reference_with_and_without_dropout() {
        // T = 13 (odd: mask rows straddle Philox blocks), T = 70 (> one 64-wide mask chunk),
        // and degenerate sizes.
        for dims in [
            AttnDims {
                batch: 1,
                tokens: 1,
                heads: 1,
                head_dim: 1,
            },
            AttnDims {
                batch: 3,
                tokens: 2,
                heads: 1,
                head_dim: 3,
            },
            AttnDims {
                batch: 4,
                tokens: 13,
                heads: 3,
                head_dim: 8,
            },
            AttnDims {
                batch: 2,
                tokens: 70,
                heads: 2,
                head_dim: 16,
            },
        ] {
            let qkv = data(dims.batch * dims.tokens * 3 * dims.width(), 1, 2.0);
            let dout = data(dims.batch * dims.tokens * dims.width(), 2, 1.0);
            let r = rows(dims.batch);
            for drop in [None, Some((&SITE, r.as_slice()))] {
                let (out, probs) = run_fwd(&qkv, dims, drop);
                let mut out_r = vec![0f32; out.len()];
                let mut probs_r = vec![0f32; probs.len()];
                attention_fwd_reference(&mut out_r, &mut probs_r, &qkv, dims, drop);
                assert!(
                    max_rel(&probs, &probs_r) < 1e-5,
                    "probs {}",
                    max_rel(&probs, &probs_r)
                );
                assert!(
                    max_rel(&out, &out_r) < 1e-5,
                    "out {}",
                    max_rel(&out, &out_r)
                );
                let dq = run_bwd(&dout, &qkv, &probs, dims, drop);
                let mut dq_r = vec![0f32; dq.len()];
                attention_bwd_reference(&mut dq_r, &dout, &qkv, &probs, dims, drop);
                // Each third (dQ, dK, dV) on its own scale.
                for part in 0..3 {
                    let pick = |x: &[f32]| -> Vec<f32> {
                        x.chunks(dims.width())
                            .skip(part)
                            .step_by(3)
                            .flatten()
                            .copied()
                            .collect()
                    };
                    let e = max_rel(&pick(&dq), &pick(&dq_r));
                    assert!(e < 1e-4, "part {part} dropout {}: {e}", drop.is_some());
                }
            }
        }
    }

    #[test]
    fn dropout_changes_output_and_p_zero_is_identity() {
        let dims = AttnDims {
            batch: 2,
            tokens: 9,
            heads: 2,
            head_dim: 4,
        };
        let qkv = data(dims.batch * dims.tokens * 3 * dims.width(), 3, 1.0);
        let r = rows(2);
        let (plain, p0) = run_fwd(&qkv, dims, None);
        let (dropped, p1) = run_fwd(&qkv, dims, Some((&SITE, &r)));
        assert_eq!(p0, p1, "probs are saved before dropout");
        assert_ne!(plain, dropped);
        let zero = Site { p: 0.0, ..SITE };
        let (same, _) = run_fwd(&qkv, dims, Some((&zero, &r)));
        assert_eq!(plain, same);
        // Rows of P sum to 1.
        for row in p0.chunks(dims.tokens) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    /// The f64 reference backward against central differences of the f64 reference forward,
    /// for L = Σ O ⊙ R.
    #[test]
    fn reference_backward_matches_finite_differences() {
        let dims = AttnDims {
            batch: 2,
            tokens: 5,
            heads: 2,
            head_dim: 3,
        };
        let qkv = to_f64(&data(dims.batch * dims.tokens * 3 * dims.width(), 4, 1.5));
        let r = to_f64(&data(dims.batch * dims.tokens * dims.width(), 5, 1.0));
        let keys = rows(2);
        let site = Site { p: 0.3, ..SITE };
        for drop in [None, Some((&site, keys.as_slice()))] {
            let g = bwd_f64(&r, &qkv, dims, drop);
            let loss = |x: &[f64]| -> f64 {
                let (o, _) = fwd_f64(x, dims, drop);
                o.iter().zip(&r).map(|(a, b)| a * b).sum()
            };
            let eps = 1e-5;
            for i in 0..qkv.len() {
                let mut x = qkv.clone();
                x[i] += eps;
                let up = loss(&x);
                x[i] -= 2.0 * eps;
                let dn = loss(&x);
                let fd = (up - dn) / (2.0 * eps);
                assert!((fd - g[i]).abs() < 1e-8, "element {i}: fd {fd} vs {}", g[i]);
            }
        }
    }

    #[test]
    fn bitwise_independent_of_thread_count() {
        let dims = AttnDims {
            batch: 6,
            tokens: 17,
            heads: 3,
            head_dim: 8,
        };
        let qkv = data(dims.batch * dims.tokens * 3 * dims.width(), 6, 2.0);
        let dout = data(dims.batch * dims.tokens * dims.width(), 7, 1.0);
        let r = rows(dims.batch);
        let pool = |n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        };
        for drop in [None, Some((&SITE, r.as_slice()))] {
            let res: Vec<_> = [1, 2]
                .map(|n| {
                    pool(n).install(|| {
                        let (o, p) = run_fwd(&qkv, dims, drop);
                        let g = run_bwd(&dout, &qkv, &p, dims, drop);
                        (o, p, g)
                    })
                })
                .into();
            assert_eq!(res[0], res[1]);
        }
    }

    #[test]
    fn mask_range_matches_philox_words() {
        let key = MaskKey {
            seed: 0xDEAD_BEEF_0123_4567,
            update: 9,
            site: 11,
            sample: 3,
            pass: 1,
        };
        for (e0, n) in [(0, 1), (7, 37), (4, 8), (130, 3)] {
            let mut m = vec![f32::NAN; n];
            mask_range(&key, drop_threshold(0.5), 2.0, e0, &mut m);
            for (i, &v) in m.iter().enumerate() {
                let keep = key.word(e0 + i) >= drop_threshold(0.5);
                assert_eq!(v, if keep { 2.0 } else { 0.0 });
            }
        }
    }

    #[test]
    fn exp_f32_is_within_a_few_ulp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -90.0 + 100.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            if x < -87.0 {
                assert_eq!(got, 0.0);
            } else {
                worst = worst.max((got - want).abs() / want);
            }
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    #[should_panic(expected = "dropout rows")]
    fn wrong_row_count_panics() {
        let dims = AttnDims {
            batch: 2,
            tokens: 3,
            heads: 1,
            head_dim: 2,
        };
        let qkv = vec![0f32; 2 * 3 * 6];
        let _ = run_fwd(&qkv, dims, Some((&SITE, &rows(3))));
    }
}
