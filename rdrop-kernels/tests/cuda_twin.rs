//! The CUDA kernels' arithmetic (`src/cuda/math.cuh`, built for the host by `cc` as
//! `src/cuda/twin.cpp`, replaying each kernel's lane order) against the Rust kernels, on every
//! CI run, without a GPU. What is held bitwise: Philox words and masks, GELU/erf and GELU's
//! derivative, LayerNorm forward and backward rows, softmax rows with dropout, the residual /
//! GELU dropout rows, SGD and AdamW elements and the clip coefficient. What is held within a
//! tolerance: the softmax backward (against f64), the R-Drop loss (f64 both sides, summed in a
//! different order: 1e-12 relative on the terms, 1 ulp-ish on the f32 gradients).

use rdrop_kernels::attention::softmax_row;
use rdrop_kernels::cuda_twin as twin;
use rdrop_kernels::dropout::{dropout_apply_keep, residual_dropout_add_keep, RowKey, Site};
use rdrop_kernels::gelu::{erf_f32, gelu_bwd_inplace, gelu_fwd, gelu_grad_scalar, gelu_scalar};
use rdrop_kernels::layernorm::{
    layernorm_bwd, layernorm_bwd_reference, layernorm_bwd_scratch_len, layernorm_fwd,
    layernorm_fwd_reference,
};
use rdrop_kernels::loss::{rdrop_loss, LossConfig, LossMode};
use rdrop_kernels::optim::{adamw_step, clip_coef, sgd_step, AdamWHyper, SgdHyper};
use rdrop_kernels::patch::im2col;
use rdrop_kernels::philox::{drop_threshold, keep_scale, philox4x32_10, MaskKey};

/// xorshift64*: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn u32(&mut self) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }
    /// Uniform in [lo, hi).
    fn f(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.u32() >> 8) as f32 / (1u32 << 24) as f32
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.f(lo, hi)).collect()
    }
}

fn site(p: f32, id: u32) -> Site {
    Site {
        seed: 0x1234_5678_9abc_def0,
        update: 7,
        site: id,
        p,
    }
}

/// Bitwise equality of f32 slices, naming the first difference.
fn same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            x.to_bits() == y.to_bits(),
            "{what}: element {i}: twin {x:e} vs Rust {y:e}"
        );
    }
}

#[test]
fn philox_known_answers_and_rust_equality() {
    // Random123's kat_vectors (listed in docs/engine.md)
    assert_eq!(
        twin::philox([0; 4], [0; 2]),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
    assert_eq!(
        twin::philox([u32::MAX; 4], [u32::MAX; 2]),
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    );
    assert_eq!(
        twin::philox(
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0]
        ),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
    let mut r = Rng(99);
    for _ in 0..10_000 {
        let c = [r.u32(), r.u32(), r.u32(), r.u32()];
        let k = [r.u32(), r.u32()];
        assert_eq!(twin::philox(c, k), philox4x32_10(c, k));
    }
}

#[test]
fn mask_words_match_mask_key() {
    let mut r = Rng(5);
    for _ in 0..200 {
        let s = Site {
            seed: ((r.u32() as u64) << 32) | r.u32() as u64,
            update: r.u32(),
            site: r.u32() >> 1,
            p: 0.1,
        };
        let row = RowKey {
            sample: r.u32(),
            pass: r.u32() & 1,
        };
        let key = s.key(row);
        for _ in 0..50 {
            let e = r.u32() >> 4;
            assert_eq!(twin::mask_word(&s, row, e), key.word(e as usize));
        }
    }
}

/// dropout_fwd / residual_dropout_add rows against the CPU's recorded-mask kernels: masks and
/// values bitwise, for lengths that are and are not multiples of 4, and without dropout.
#[test]
fn dropout_and_residual_rows_are_the_cpu_ones() {
    let mut r = Rng(11);
    let rows = [
        RowKey { sample: 0, pass: 0 },
        RowKey { sample: 0, pass: 1 },
        RowKey { sample: 9, pass: 1 },
    ];
    for &n in &[1usize, 3, 4, 197 * 7, 4099] {
        for &p in &[0.0f32, 0.1, 0.5] {
            let s = site(p, 3);
            let x = r.vec(rows.len() * n, -2.0, 2.0);
            let y = r.vec(rows.len() * n, -2.0, 2.0);
            // dropout_fwd
            let mut cpu = x.clone();
            let mut cpu_keep = vec![7u8; x.len()];
            dropout_apply_keep(&mut cpu, &mut cpu_keep, n, &s, &rows);
            // residual
            let mut res = x.clone();
            let mut res_keep = vec![7u8; x.len()];
            residual_dropout_add_keep(&mut res, &mut res_keep, &y, n, &s, &rows);
            for (ri, &rk) in rows.iter().enumerate() {
                let sl = ri * n..(ri + 1) * n;
                let mut keep = vec![7u8; n];
                let out = twin::sample_row(
                    twin::SampleOp::Dropout,
                    &mut keep,
                    &x[sl.clone()],
                    &[],
                    Some(s),
                    rk,
                );
                same_bits("dropout row", &out, &cpu[sl.clone()]);
                assert_eq!(keep, cpu_keep[sl.clone()], "dropout mask n={n} p={p}");
                let mut keep = vec![7u8; n];
                let out = twin::sample_row(
                    twin::SampleOp::Residual,
                    &mut keep,
                    &x[sl.clone()],
                    &y[sl.clone()],
                    Some(s),
                    rk,
                );
                same_bits("residual row", &out, &res[sl.clone()]);
                if p != 0.0 {
                    assert_eq!(keep, res_keep[sl.clone()], "residual mask n={n} p={p}");
                    let dropped = keep.iter().filter(|&&k| k == 0).count();
                    if n > 1000 {
                        let rate = dropped as f64 / n as f64;
                        assert!((rate - p as f64).abs() < 0.05, "rate {rate} for p {p}");
                    }
                } else {
                    assert!(
                        keep.iter().all(|&k| k == 7),
                        "p = 0 must not write the mask"
                    );
                }
            }
        }
    }
}

#[test]
fn gelu_and_erf_are_the_rust_ones_bitwise() {
    let mut xs: Vec<f32> = (-20_000..=20_000).map(|i| i as f32 * 6e-4).collect();
    xs.extend([
        0.0, -0.0, 1.0, -1.0, 4.0, -4.0, 4.000_001, -9.0, 30.0, -87.0, 1e-30,
    ]);
    let mut r = Rng(3);
    xs.extend(r.vec(20_000, -40.0, 40.0));
    for &x in &xs {
        assert_eq!(twin::erf(x).to_bits(), erf_f32(x).to_bits(), "erf({x:e})");
        assert_eq!(
            twin::gelu(x).to_bits(),
            gelu_scalar(x).to_bits(),
            "gelu({x:e})"
        );
        assert_eq!(
            twin::gelu_grad(x).to_bits(),
            gelu_grad_scalar(x).to_bits(),
            "gelu'({x:e})"
        );
    }
    // ... and the slice kernels the CPU engine runs (FMA dispatch) give the same bits
    let mut y = vec![0f32; xs.len()];
    gelu_fwd(&mut y, &xs);
    let tw: Vec<f32> = xs.iter().map(|&x| twin::gelu(x)).collect();
    same_bits("gelu_fwd", &tw, &y);
    // accuracy against f64, independently of the Rust kernels (crate::gelu's documented
    // bound for x ≥ −5.5: relative 5e-7 + 1.2e-7·x²; below, 1 + erf is 0 past z = −4)
    for &x in xs.iter().filter(|x| **x >= -5.5 && **x < 6.0) {
        let e = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / std::f64::consts::SQRT_2));
        let g = twin::gelu(x) as f64;
        assert!(
            (g - e).abs() <= (5e-7 + 1.2e-7 * (x as f64).powi(2)) * e.abs().max(1e-30),
            "gelu({x}) = {g}, f64 {e}"
        );
    }
}

/// erf in f64 (Abramowitz–Stegun 7.1.26 is too coarse; a series/continued fraction instead).
fn libm_erf(x: f64) -> f64 {
    // Taylor series for |x| < 3, continued fraction for erfc beyond: ample for a 1e-6 check.
    let a = x.abs();
    let v = if a < 3.0 {
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (a + f);
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
    };
    v.copysign(x)
}

#[test]
fn gelu_dropout_rows_forward_and_backward() {
    let mut r = Rng(17);
    let rows = [RowKey { sample: 3, pass: 0 }, RowKey { sample: 3, pass: 1 }];
    let n = 65 * 37;
    for &p in &[0.0f32, 0.1] {
        let s = site(p, 5);
        let pre = r.vec(rows.len() * n, -5.0, 5.0);
        let mut h = vec![0f32; pre.len()];
        gelu_fwd(&mut h, &pre);
        let mut keep = vec![1u8; pre.len()];
        dropout_apply_keep(&mut h, &mut keep, n, &s, &rows);
        for (ri, &rk) in rows.iter().enumerate() {
            let sl = ri * n..(ri + 1) * n;
            let mut k = vec![1u8; n];
            let out = twin::sample_row(
                twin::SampleOp::Gelu,
                &mut k,
                &pre[sl.clone()],
                &[],
                Some(s),
                rk,
            );
            same_bits("gelu dropout row", &out, &h[sl.clone()]);
            assert_eq!(k, keep[sl.clone()]);
        }
        // backward: apply_keep then gelu_bwd_inplace, element by element
        let dh = r.vec(pre.len(), -1.0, 1.0);
        let mut d = dh.clone();
        rdrop_kernels::dropout::apply_keep(&mut d, &keep, p);
        gelu_bwd_inplace(&mut d, &pre);
        let tw: Vec<f32> = (0..pre.len())
            .map(|i| twin::gelu_dropout_bwd(dh[i], pre[i], keep[i] != 0, p))
            .collect();
        same_bits("gelu dropout bwd", &tw, &d);
    }
}

#[test]
fn layernorm_rows_are_the_cpu_ones_bitwise() {
    let mut r = Rng(23);
    for &(n, d) in &[(70usize, 768usize), (33, 192), (5, 37), (1, 1), (64, 16)] {
        let x: Vec<f32> = r.vec(n * d, -3.0, 3.0).iter().map(|v| v + 0.5).collect();
        let w = r.vec(d, 0.5, 1.5);
        let b = r.vec(d, -0.5, 0.5);
        let eps = 1e-12f32.max(1e-6);
        let (ty, tm, trs) = twin::layernorm_fwd(&x, &w, &b, eps, d);
        let (mut y, mut m, mut rs) = (vec![0f32; n * d], vec![0f32; n], vec![0f32; n]);
        layernorm_fwd(&mut y, &mut m, &mut rs, &x, &w, &b, eps, d);
        same_bits("ln y", &ty, &y);
        same_bits("ln mean", &tm, &m);
        same_bits("ln rstd", &trs, &rs);
        let (mut yr, mut mr, mut rr) = (vec![0f32; n * d], vec![0f32; n], vec![0f32; n]);
        layernorm_fwd_reference(&mut yr, &mut mr, &mut rr, &x, &w, &b, eps, d);
        for (a, e) in ty.iter().zip(&yr) {
            assert!(
                (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                "ln y {a} vs f64 {e}"
            );
        }

        let dy = r.vec(n * d, -1.0, 1.0);
        let dx0 = r.vec(n * d, -1.0, 1.0); // dx accumulates into the residual gradient
        let dw0 = r.vec(d, -1.0, 1.0);
        let db0 = r.vec(d, -1.0, 1.0);
        let (mut tdx, mut tdw, mut tdb) = (dx0.clone(), dw0.clone(), db0.clone());
        twin::layernorm_bwd(&mut tdx, &mut tdw, &mut tdb, &dy, &x, &w, &m, &rs, d);
        let (mut dx, mut dw, mut db) = (dx0.clone(), dw0.clone(), db0.clone());
        let mut scratch = vec![0f32; layernorm_bwd_scratch_len(n, d)];
        layernorm_bwd(
            &mut dx,
            &mut dw,
            &mut db,
            &mut scratch,
            &dy,
            &x,
            &m,
            &rs,
            &w,
            d,
        );
        same_bits("ln dx", &tdx, &dx);
        same_bits("ln dw", &tdw, &dw);
        same_bits("ln db", &tdb, &db);
        // and against the f64 reference (which overwrites: compare the increments)
        let (mut rdx, mut rdw, mut rdb) = (vec![0f32; n * d], vec![0f32; d], vec![0f32; d]);
        layernorm_bwd_reference(&mut rdx, &mut rdw, &mut rdb, &dy, &x, &m, &rs, &w, d);
        for i in 0..n * d {
            let got = tdx[i] - dx0[i];
            assert!(
                (got - rdx[i]).abs() <= 2e-4 * (1.0 + rdx[i].abs()),
                "ln dx[{i}] {got} vs {}",
                rdx[i]
            );
        }
    }
}

#[test]
fn softmax_rows_are_the_cpu_ones_bitwise() {
    let mut r = Rng(31);
    for &t in &[197usize, 65, 17, 8, 5, 1] {
        for &p in &[0.0f32, 0.1] {
            let s = site(p, 40);
            let row = RowKey { sample: 2, pass: 1 };
            let (h, i) = (3u32, (t / 2) as u32);
            let base = h * (t * t) as u32 + i * t as u32;
            let scores = r.vec(t, -8.0, 8.0);
            let mut cpu = scores.clone();
            softmax_row(&mut cpu);
            let mut tp = scores.clone();
            let mut keep = vec![9u8; t];
            let a = twin::softmax_fwd_row(&mut tp, &mut keep, 1.0, Some(s), row, base);
            same_bits("softmax P", &tp, &cpu);
            let sum: f64 = tp.iter().map(|&v| v as f64).sum();
            assert!((sum - 1.0).abs() < 1e-5, "Σ P = {sum}");
            let key = s.key(row);
            for j in 0..t {
                if p == 0.0 {
                    assert_eq!(keep[j], 9, "p = 0 must not write the mask");
                    assert!(a[j].is_nan(), "p = 0 must not write attn (A = P)");
                } else {
                    let kept = key.word(base as usize + j) >= drop_threshold(p);
                    assert_eq!(keep[j] != 0, kept, "mask element (h, i, {j})");
                    let want = if kept { keep_scale(p) * tp[j] } else { 0.0 };
                    assert_eq!(a[j].to_bits(), want.to_bits(), "A element {j}");
                }
            }
            // backward against f64: dS = s·P ⊙ (dP − Σ dP P), dP = keep·dA/(1−p)
            let da = r.vec(t, -1.0, 1.0);
            let scale = 0.125f32;
            let ds = twin::softmax_bwd_row(&da, &tp, &keep, p, scale);
            let dp: Vec<f64> = (0..t)
                .map(|j| {
                    if p == 0.0 {
                        da[j] as f64
                    } else if keep[j] != 0 {
                        da[j] as f64 * keep_scale(p) as f64
                    } else {
                        0.0
                    }
                })
                .collect();
            let dot: f64 = dp.iter().zip(&tp).map(|(a, &b)| a * b as f64).sum();
            for j in 0..t {
                let want = scale as f64 * tp[j] as f64 * (dp[j] - dot);
                assert!(
                    (ds[j] as f64 - want).abs() <= 1e-6 * (1e-3 + want.abs()) + 1e-9,
                    "dS[{j}] {} vs {want}",
                    ds[j]
                );
            }
        }
    }
}

#[test]
fn rdrop_loss_matches_the_cpu_loss() {
    let mut r = Rng(41);
    for &(m, c) in &[(5usize, 10usize), (33, 1000), (1, 2)] {
        for reduction in [LossMode::Mean, LossMode::Reference] {
            for &eps in &[0.0f64, 0.1] {
                let cfg = LossConfig {
                    alpha: 0.3,
                    mode: reduction,
                    label_smoothing: eps,
                };
                let logits = r.vec(2 * m * c, -6.0, 6.0);
                let labels: Vec<u32> = (0..m).map(|_| r.u32() % c as u32).collect();
                let weight = 0.25f32;
                let mut dp = vec![0f32; m * c];
                let mut dq = vec![0f32; m * c];
                let v = rdrop_loss(
                    &mut dp,
                    &mut dq,
                    &logits[..m * c],
                    &logits[m * c..],
                    &labels,
                    c,
                    &cfg,
                    weight,
                )
                .unwrap();
                let mm = m as f64;
                let (ce_w, kl_w) = match reduction {
                    LossMode::Mean => (0.5 / mm, 0.5 / mm),
                    LossMode::Reference => (1.0 / mm, 1.0),
                };
                let (dl, out) =
                    twin::rdrop_loss(&logits, &labels, c, eps, ce_w, kl_w, cfg.alpha, weight);
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * (1.0 + b.abs());
                assert!(close(out[0], v.loss), "loss {} vs {}", out[0], v.loss);
                assert!(close(out[1], v.ce), "ce {} vs {}", out[1], v.ce);
                assert!(close(out[2], v.kl), "kl {} vs {}", out[2], v.kl);
                assert_eq!(out[3], 0.0);
                let scale = dp.iter().chain(&dq).fold(0f32, |a, &b| a.max(b.abs()));
                for (i, (&a, &b)) in dl.iter().zip(dp.iter().chain(&dq)).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * scale,
                        "dlogits[{i}] {a} vs {b} (m {m}, c {c})"
                    );
                }
            }
        }
    }
    // a label out of range is counted and poisons its row, nothing else
    let (m, c) = (3usize, 4usize);
    let logits = r.vec(2 * m * c, -1.0, 1.0);
    let (dl, out) = twin::rdrop_loss(&logits, &[1, 4, 0], c, 0.0, 0.5, 0.5, 1.0, 1.0);
    assert_eq!(out[3], 1.0);
    assert!(out[0].is_nan());
    assert!(dl[c..2 * c].iter().all(|v| v.is_nan()));
    assert!(dl[..c].iter().all(|v| v.is_finite()));
}

#[test]
fn sgd_and_adamw_elements_are_the_cpu_ones_bitwise() {
    let mut r = Rng(53);
    let n = 1000;
    for &mu in &[0.0f32, 0.9] {
        for &nesterov in &[false, true] {
            for &wd in &[0.0f32, 1e-4] {
                for &first in &[true, false] {
                    let h = SgdHyper {
                        lr: 0.03,
                        momentum: mu,
                        nesterov,
                        weight_decay: wd,
                    };
                    let p0 = r.vec(n, -1.0, 1.0);
                    let g = r.vec(n, -1.0, 1.0);
                    let b0 = r.vec(n, -0.1, 0.1);
                    let coef = 0.7f32;
                    let (mut p, mut b) = (p0.clone(), b0.clone());
                    sgd_step(&mut p, &g, &mut b, first, coef, &h);
                    let (mut tp, mut tb) = (p0.clone(), b0.clone());
                    twin::sgd(&mut tp, &g, &mut tb, coef, first, &h);
                    same_bits("sgd params", &tp, &p);
                    if mu != 0.0 {
                        same_bits("sgd momentum", &tb, &b);
                    }
                }
            }
        }
    }
    for &wd in &[0.0f32, 0.05] {
        for &step in &[1u64, 2, 7, 1000] {
            let h = AdamWHyper {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: wd,
            };
            let p0 = r.vec(n, -1.0, 1.0);
            let g = r.vec(n, -1.0, 1.0);
            let m0 = r.vec(n, -0.1, 0.1);
            let v0: Vec<f32> = r.vec(n, 0.0, 0.01);
            let coef = 0.9f32;
            let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
            adamw_step(&mut p, &g, &mut m, &mut v, step, coef, &h);
            let (mut tp, mut tm, mut tv) = (p0.clone(), m0.clone(), v0.clone());
            twin::adamw(&mut tp, &g, &mut tm, &mut tv, coef, step, &h);
            same_bits("adamw params", &tp, &p);
            same_bits("adamw m", &tm, &m);
            same_bits("adamw v", &tv, &v);
        }
    }
}

#[test]
fn clip_coefficient_is_the_cpu_one() {
    for &(norm, max) in &[
        (0.0, 1.0),
        (0.5, 1.0),
        (3.7, 1.0),
        (1e30, 2.5),
        (12.0, f64::INFINITY),
        (f64::NAN, 1.0),
    ] {
        let (a, b) = (twin::clip_coef(norm, max), clip_coef(norm, max));
        assert!(
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            "clip_coef({norm}, {max}): twin {a} vs {b}"
        );
    }
}

/// The mask numbering of an attention row: the same words as MaskKey over the sample's whole
/// `(H, T, T)` block (a guard on the `base` the kernel computes).
#[test]
fn attention_mask_base_numbering() {
    let s = site(0.2, 12);
    let row = RowKey { sample: 4, pass: 0 };
    let key: MaskKey = s.key(row);
    let t = 13usize;
    for h in 0..3u32 {
        for i in 0..t as u32 {
            let base = h * (t * t) as u32 + i * t as u32;
            let mut scores = vec![0.5f32; t];
            let mut keep = vec![0u8; t];
            twin::softmax_fwd_row(&mut scores, &mut keep, 1.0, Some(s), row, base);
            for (j, &k) in keep.iter().enumerate() {
                let e = (h as usize * t + i as usize) * t + j;
                assert_eq!(k != 0, key.word(e) >= drop_threshold(0.2));
            }
        }
    }
}

/// The kernels' layout arithmetic: im2col against crate::patch, the head layout against the
/// definition `q[b, h, t, e] = qkv[b, t, h·Dh + e]` (row 3D; k, v at +D, +2D; attention
/// output rows of D).
#[test]
fn im2col_and_head_layouts() {
    let mut r = Rng(61);
    for &(b, c, s, p) in &[
        (2usize, 3usize, 32usize, 4usize),
        (1, 1, 6, 3),
        (3, 2, 16, 16),
    ] {
        let img = r.vec(b * c * s * s, -1.0, 1.0);
        let mut cpu = vec![0f32; b * (s / p) * (s / p) * c * p * p];
        im2col(&mut cpu, &img, b, c, s, p);
        same_bits("im2col", &twin::im2col(&img, b, c, s, p), &cpu);
    }
    let (b, t, h, hd) = (3usize, 7usize, 4usize, 5usize);
    let d = h * hd;
    let mut seen = vec![false; b * t * d];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                for e in 0..hd {
                    let idx = ((bi * h + hi) * t + ti) * hd + e;
                    let want = (bi * t + ti) * 3 * d + hi * hd + e;
                    assert_eq!(twin::heads_to_rows(idx, t, h, hd, 3 * d), want);
                    let o = twin::heads_to_rows(idx, t, h, hd, d);
                    assert_eq!(o, (bi * t + ti) * d + hi * hd + e);
                    assert!(!seen[o], "two heads' elements at {o}");
                    seen[o] = true;
                }
            }
        }
    }
    assert!(seen.iter().all(|&v| v), "the head layout is a permutation");
}
