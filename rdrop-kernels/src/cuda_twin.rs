//! The CUDA kernels' math on the host: `src/cuda/math.cuh` compiled by the C++ compiler
//! (build.rs, `src/cuda/twin.cpp`) behind a C ABI, with safe wrappers. Each wrapper replays one
//! kernel over a row or a buffer in the kernel's own order (lanes looped over in place of a
//! warp's), so `tests/cuda_twin.rs` can hold the GPU code's arithmetic to the Rust kernels on
//! every CI run without CUDA. Not for production use: the kernels themselves run on the GPU.
//!
//! # Panics
//! Every wrapper panics on mismatched lengths (a programming error, as in the CPU kernels).
#![allow(unsafe_code)] // FFI declarations of the twin shim; each call has a SAFETY note

use crate::dropout::{KernelSite, RowKey, Site};
use crate::optim::{AdamCoef, AdamWHyper, SgdHyper};
use crate::philox::keep_scale;

mod ffi {
    extern "C" {
        pub fn rd_twin_philox(ctr: *const u32, k0: u32, k1: u32, out: *mut u32);
        pub fn rd_twin_mask_word(
            seed_lo: u32,
            seed_hi: u32,
            update: u32,
            site: u32,
            sample: u32,
            pass: u32,
            e: u32,
        ) -> u32;
        pub fn rd_twin_erf(z: f32) -> f32;
        pub fn rd_twin_gelu(x: f32) -> f32;
        pub fn rd_twin_gelu_grad(x: f32) -> f32;
        pub fn rd_twin_sample_row(
            mode: i32,
            out: *mut f32,
            keep: *mut u8,
            a: *const f32,
            b: *const f32,
            n: i32,
            site: *const super::KernelSite,
            sample: u32,
            pass: u32,
        );
        pub fn rd_twin_gelu_dropout_bwd(
            dh: f32,
            pre: f32,
            use_keep: i32,
            kept: i32,
            scale: f32,
        ) -> f32;
        pub fn rd_twin_layernorm_fwd(
            y: *mut f32,
            mean: *mut f32,
            rstd: *mut f32,
            x: *const f32,
            w: *const f32,
            b: *const f32,
            eps: f32,
            n: i32,
            d: i32,
        );
        pub fn rd_twin_layernorm_bwd(
            dx: *mut f32,
            dw: *mut f32,
            db: *mut f32,
            dy: *const f32,
            x: *const f32,
            w: *const f32,
            mean: *const f32,
            rstd: *const f32,
            n: i32,
            d: i32,
        );
        pub fn rd_twin_softmax_fwd_row(
            s: *mut f32,
            a: *mut f32,
            keep: *mut u8,
            t: i32,
            scale: f32,
            site: *const super::KernelSite,
            sample: u32,
            pass: u32,
            base: u32,
        );
        pub fn rd_twin_softmax_bwd_row(
            ds: *mut f32,
            da: *const f32,
            p: *const f32,
            keep: *const u8,
            use_keep: i32,
            ks: f32,
            scale: f32,
            t: i32,
        );
        pub fn rd_twin_rdrop_loss(
            dl: *mut f32,
            out: *mut f64,
            logits: *const f32,
            labels: *const u32,
            m: i32,
            c: i32,
            eps: f64,
            ce_w: f64,
            kl_w: f64,
            alpha: f64,
            w: f64,
        );
        pub fn rd_twin_sgd(
            p: *mut f32,
            g: *const f32,
            mom: *mut f32,
            n: i32,
            coef: f32,
            lr: f32,
            mu: f32,
            wd: f32,
            nesterov: i32,
            first: i32,
        );
        pub fn rd_twin_adamw(
            p: *mut f32,
            g: *const f32,
            m: *mut f32,
            v: *mut f32,
            n: i32,
            coef: f32,
            k7: *const f32,
            do_decay: i32,
        );
        pub fn rd_twin_clip_coef(norm: f64, max_norm: f32) -> f32;
        pub fn rd_twin_im2col(out: *mut f32, img: *const f32, b: i32, c: i32, s: i32, p: i32);
        pub fn rd_twin_heads_to_rows(idx: i64, tokens: i32, heads: i32, hd: i32, row: i32) -> i64;
    }
}

/// `n` as the shim's `int`.
fn int(n: usize) -> i32 {
    i32::try_from(n).unwrap_or_else(|_| panic!("cuda_twin: {n} exceeds i32"))
}

/// Philox4x32-10 (`rd::philox4x32_10`).
pub fn philox(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut out = [0u32; 4];
    // SAFETY: `ctr` and `out` are four u32 each, as the shim reads and writes.
    unsafe { ffi::rd_twin_philox(ctr.as_ptr(), key[0], key[1], out.as_mut_ptr()) };
    out
}

/// The mask word of element `e` of `(site, row)` (`rd::mask_word`).
pub fn mask_word(site: &Site, row: RowKey, e: u32) -> u32 {
    // SAFETY: scalars only.
    unsafe {
        ffi::rd_twin_mask_word(
            site.seed as u32,
            (site.seed >> 32) as u32,
            site.update,
            site.site,
            row.sample,
            row.pass,
            e,
        )
    }
}

/// erf (`rd::erf32`).
pub fn erf(z: f32) -> f32 {
    // SAFETY: scalars only.
    unsafe { ffi::rd_twin_erf(z) }
}

/// GELU (`rd::gelu`).
pub fn gelu(x: f32) -> f32 {
    // SAFETY: scalars only.
    unsafe { ffi::rd_twin_gelu(x) }
}

/// GELU's derivative (`rd::gelu_grad`).
pub fn gelu_grad(x: f32) -> f32 {
    // SAFETY: scalars only.
    unsafe { ffi::rd_twin_gelu_grad(x) }
}

/// What a per-sample kernel does to one sample row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleOp {
    /// `dropout_fwd`: `out = mask ⊙ a`.
    Dropout,
    /// `residual_dropout_add`: `out = a + mask ⊙ b`.
    Residual,
    /// `gelu_dropout_fwd`: `out = mask ⊙ gelu(a)`.
    Gelu,
}

/// One sample row of `dropout_fwd` / `residual_dropout_add` / `gelu_dropout_fwd` (Philox block
/// by block, as the kernels' threads): returns `out`; `keep` written when the site drops.
pub fn sample_row(
    op: SampleOp,
    keep: &mut [u8],
    a: &[f32],
    b: &[f32],
    site: Option<Site>,
    row: RowKey,
) -> Vec<f32> {
    let n = a.len();
    assert_eq!(keep.len(), n, "cuda_twin: keep length");
    if op == SampleOp::Residual {
        assert_eq!(b.len(), n, "cuda_twin: b length");
    }
    let mut out = vec![0f32; n];
    let k = KernelSite::of(site);
    let mode = match op {
        SampleOp::Dropout => 0,
        SampleOp::Residual => 1,
        SampleOp::Gelu => 2,
    };
    let bp = if op == SampleOp::Residual {
        b.as_ptr()
    } else {
        a.as_ptr()
    };
    // SAFETY: `out`, `keep`, `a` (and `b` for Residual, else `a` again) hold `n` elements, the
    // shim's row length.
    unsafe {
        ffi::rd_twin_sample_row(
            mode,
            out.as_mut_ptr(),
            keep.as_mut_ptr(),
            a.as_ptr(),
            bp,
            int(n),
            &k,
            row.sample,
            row.pass,
        )
    };
    out
}

/// `gelu_dropout_bwd` of one element: `(keep ? dh/(1−p) : 0)·gelu'(pre)` (`p == 0`: no mask).
pub fn gelu_dropout_bwd(dh: f32, pre: f32, kept: bool, p: f32) -> f32 {
    let scale = if p == 0.0 { 1.0 } else { keep_scale(p) };
    // SAFETY: scalars only.
    unsafe { ffi::rd_twin_gelu_dropout_bwd(dh, pre, (p != 0.0) as i32, kept as i32, scale) }
}

/// `layernorm_fwd` over the rows of `x` (width `d`): returns `(y, mean, rstd)`.
pub fn layernorm_fwd(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    d: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "cuda_twin: x is not rows × d"
    );
    assert!(w.len() == d && b.len() == d, "cuda_twin: w/b are not d");
    let n = x.len() / d;
    let (mut y, mut mean, mut rstd) = (vec![0f32; x.len()], vec![0f32; n], vec![0f32; n]);
    // SAFETY: y, x hold n·d elements, w, b d, mean, rstd n: what the shim indexes.
    unsafe {
        ffi::rd_twin_layernorm_fwd(
            y.as_mut_ptr(),
            mean.as_mut_ptr(),
            rstd.as_mut_ptr(),
            x.as_ptr(),
            w.as_ptr(),
            b.as_ptr(),
            eps,
            int(n),
            int(d),
        )
    };
    (y, mean, rstd)
}

/// `layernorm_bwd`: `dx += …`, `dw += …`, `db += …` (all accumulate).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd(
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    d: usize,
) {
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "cuda_twin: x is not rows × d"
    );
    let n = x.len() / d;
    assert!(
        dx.len() == x.len() && dy.len() == x.len(),
        "cuda_twin: dx/dy"
    );
    assert!(
        w.len() == d && dw.len() == d && db.len() == d,
        "cuda_twin: w/dw/db"
    );
    assert!(mean.len() == n && rstd.len() == n, "cuda_twin: mean/rstd");
    // SAFETY: lengths checked above are those the shim indexes (n rows of d).
    unsafe {
        ffi::rd_twin_layernorm_bwd(
            dx.as_mut_ptr(),
            dw.as_mut_ptr(),
            db.as_mut_ptr(),
            dy.as_ptr(),
            x.as_ptr(),
            w.as_ptr(),
            mean.as_ptr(),
            rstd.as_ptr(),
            int(n),
            int(d),
        )
    };
}

/// `softmax_dropout_fwd` of one row: `s` becomes P; returns `A` (all NaN without dropout: the
/// kernel leaves `attn` untouched then, A = P); `keep` written when the site drops. `base` is the row's first element in the sample's mask stream (`h·T·T + i·T`).
pub fn softmax_fwd_row(
    s: &mut [f32],
    keep: &mut [u8],
    scale: f32,
    site: Option<Site>,
    row: RowKey,
    base: u32,
) -> Vec<f32> {
    let t = s.len();
    assert_eq!(keep.len(), t, "cuda_twin: keep length");
    let mut a = vec![f32::NAN; t];
    let k = KernelSite::of(site);
    // SAFETY: s, a, keep hold t elements, the shim's row length.
    unsafe {
        ffi::rd_twin_softmax_fwd_row(
            s.as_mut_ptr(),
            a.as_mut_ptr(),
            keep.as_mut_ptr(),
            int(t),
            scale,
            &k,
            row.sample,
            row.pass,
            base,
        )
    };
    a
}

/// `softmax_dropout_bwd` of one row: returns dS (`keep` read when `p > 0`).
pub fn softmax_bwd_row(da: &[f32], p: &[f32], keep: &[u8], drop_p: f32, scale: f32) -> Vec<f32> {
    let t = p.len();
    assert_eq!(da.len(), t, "cuda_twin: da length");
    let use_keep = drop_p != 0.0;
    if use_keep {
        assert_eq!(keep.len(), t, "cuda_twin: keep length");
    }
    let mut ds = vec![0f32; t];
    let dummy = [0u8; 1];
    let kp = if use_keep {
        keep.as_ptr()
    } else {
        dummy.as_ptr()
    };
    let ks = if use_keep { keep_scale(drop_p) } else { 1.0 };
    // SAFETY: ds, da, p hold t elements; keep is read (t elements) only when use_keep.
    unsafe {
        ffi::rd_twin_softmax_bwd_row(
            ds.as_mut_ptr(),
            da.as_ptr(),
            p.as_ptr(),
            kp,
            use_keep as i32,
            ks,
            scale,
            int(t),
        )
    };
    ds
}

/// The R-Drop loss as the two kernels compute it: `logits` `(2m, C)`; returns `(dlogits,
/// out)` with `out = [loss, ce, kl, bad, (ce_i, D_i, bad_i)…]`. `(ce_w, kl_w)` are the
/// reduction's weights (as the launcher derives them).
#[allow(clippy::too_many_arguments)]
pub fn rdrop_loss(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    label_smoothing: f64,
    ce_w: f64,
    kl_w: f64,
    alpha: f64,
    weight: f32,
) -> (Vec<f32>, Vec<f64>) {
    let m = labels.len();
    assert!(classes > 0, "cuda_twin: no classes");
    assert_eq!(logits.len(), 2 * m * classes, "cuda_twin: logits");
    let mut dl = vec![0f32; logits.len()];
    let mut out = vec![0f64; 4 + 3 * m];
    // SAFETY: dl and logits hold 2·m·C elements, labels m, out 4 + 3m.
    unsafe {
        ffi::rd_twin_rdrop_loss(
            dl.as_mut_ptr(),
            out.as_mut_ptr(),
            logits.as_ptr(),
            labels.as_ptr(),
            int(m),
            int(classes),
            label_smoothing,
            ce_w,
            kl_w,
            alpha,
            weight as f64,
        )
    };
    (dl, out)
}

/// `sgd_update` over the buffers (`mom` may be empty when μ = 0).
pub fn sgd(
    params: &mut [f32],
    grads: &[f32],
    mom: &mut [f32],
    coef: f32,
    first_step: bool,
    h: &SgdHyper,
) {
    let n = params.len();
    assert_eq!(grads.len(), n, "cuda_twin: grads");
    let mut dummy = [0f32; 1];
    let mp = if h.momentum != 0.0 {
        assert_eq!(mom.len(), n, "cuda_twin: mom");
        mom.as_mut_ptr()
    } else {
        dummy.as_mut_ptr()
    };
    // SAFETY: params, grads (and mom when μ ≠ 0, the only case the shim reads it) hold n.
    unsafe {
        ffi::rd_twin_sgd(
            params.as_mut_ptr(),
            grads.as_ptr(),
            mp,
            int(n),
            coef,
            h.lr,
            h.momentum,
            h.weight_decay,
            h.nesterov as i32,
            first_step as i32,
        )
    };
}

/// `adamw_update` over the buffers, with the coefficients the launcher passes.
pub fn adamw(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    coef: f32,
    step: u64,
    h: &AdamWHyper,
) {
    let n = params.len();
    assert!(
        grads.len() == n && m.len() == n && v.len() == n,
        "cuda_twin: adamw lengths"
    );
    let k = AdamCoef::new(step, h);
    let k7 = [
        k.decay,
        k.one_m_b1,
        k.b2,
        k.one_m_b2,
        k.inv_bc2_sqrt,
        k.eps,
        k.step_size,
    ];
    // SAFETY: params, grads, m, v hold n elements; k7 seven.
    unsafe {
        ffi::rd_twin_adamw(
            params.as_mut_ptr(),
            grads.as_ptr(),
            m.as_mut_ptr(),
            v.as_mut_ptr(),
            int(n),
            coef,
            k7.as_ptr(),
            (h.weight_decay != 0.0) as i32,
        )
    };
}

/// `clip_coef` (the kernel's; `max_norm` infinite is passed as −1 as the launcher does).
pub fn clip_coef(norm: f64, max_norm: f64) -> f32 {
    let mx = if max_norm.is_infinite() {
        -1.0
    } else {
        max_norm as f32
    };
    // SAFETY: scalars only.
    unsafe { ffi::rd_twin_clip_coef(norm, mx) }
}

/// `im2col` as the kernel indexes it (`rd::im2col_src`): patch rows `(B·g², C·p·p)` of
/// `img` `(B, C, S, S)`.
pub fn im2col(img: &[f32], b: usize, c: usize, s: usize, p: usize) -> Vec<f32> {
    assert!(
        p > 0 && s.is_multiple_of(p),
        "cuda_twin: p does not divide s"
    );
    assert_eq!(img.len(), b * c * s * s, "cuda_twin: img");
    let g = s / p;
    let mut out = vec![0f32; b * g * g * c * p * p];
    // SAFETY: img holds B·C·S·S elements and out B·g²·C·p·p, what the shim indexes.
    unsafe {
        ffi::rd_twin_im2col(
            out.as_mut_ptr(),
            img.as_ptr(),
            int(b),
            int(c),
            int(s),
            int(p),
        )
    };
    out
}

/// The kernels' head layout: position in `(B, Tk, row)` of element `idx` of `(B, H, Tk, Dh)`
/// (`rd::heads_to_rows`).
pub fn heads_to_rows(idx: usize, tokens: usize, heads: usize, hd: usize, row: usize) -> usize {
    let i = i64::try_from(idx).unwrap_or_else(|_| panic!("cuda_twin: {idx} exceeds i64"));
    // SAFETY: scalars only.
    let r = unsafe { ffi::rd_twin_heads_to_rows(i, int(tokens), int(heads), int(hd), int(row)) };
    usize::try_from(r).unwrap_or_else(|_| panic!("cuda_twin: negative index {r}"))
}
