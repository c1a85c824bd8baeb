//! Flat optimiser steps and the global gradient norm, with the semantics of
//! `rdrop_core::optim` (PyTorch's `torch.optim.SGD` and `torch.optim.AdamW`) and
//! `rdrop_core::clip` (`torch.nn.utils.clip_grad_norm_`), op by op in f32 like rdrop-core.
//!
//! **SGD** (dampening 0), gradient `g`, scale `c` (the clipping coefficient):
//! ```text
//! d = c·g (+ wd·θ)
//! b = d (first step)    b = μ·b + d (later)          (skipped when μ = 0)
//! d = d + μ·b (nesterov)    d = b (otherwise)
//! θ = θ − lr·d
//! ```
//! **AdamW**, `t` = this parameter's step count after increment, `g' = c·g`:
//! ```text
//! θ = θ·(1 − lr·wd)
//! m = m + (1 − β1)·(g' − m)                v = β2·v + (1 − β2)·g'²
//! θ = θ − (m / (√v · (1/√(1 − β2^t)) + ε)) · lr/(1 − β1^t)
//! ```
//! (With zero-initialised moments the first step equals rdrop-core's `m = (1−β1)·g'`,
//! `v = (1−β2)·g'²` exactly.) Scalar coefficients are derived in f64 from the f32
//! hyper-parameters and rounded to f32 once, as candle's `affine` does with rdrop-core's f64
//! configuration. SGD therefore equals rdrop-core bitwise when its hyper-parameters are the
//! f32 roundings of rdrop-core's; AdamW agrees to a few ulp only, because `1 − β` from an f32
//! β differs from `1 − β` in f64 (β2 = 0.999: relative 1.3e-5 in `1 − β2`, which the bias
//! correction, computed from the same β, largely cancels).
//!
//! Everything runs over fixed-size chunks in parallel; element updates are independent and the
//! norm's partial sums combine in a fixed tree, so results do not depend on the thread count.

use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `Σ x²` of one chunk in f64 (eight lanes, combined in a fixed order).
fn chunk_sum_squares(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            let v = v as f64;
            *a += v * v;
        }
    }
    for (a, &v) in acc.iter_mut().zip(it.remainder()) {
        let v = v as f64;
        *a += v * v;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// `Σ x²` in f64 (for the global gradient norm `√(Σ_tensors Σ g²)`). Chunks of a fixed size,
/// combined in a binary tree fixed by the length: bitwise the same on any thread count.
pub fn sum_squares(x: &[f32]) -> f64 {
    if x.len() <= CHUNK {
        return chunk_sum_squares(x);
    }
    let mid = x.len().div_ceil(CHUNK) / 2 * CHUNK;
    let (a, b) = x.split_at(mid);
    let (sa, sb) = rayon::join(|| sum_squares(a), || sum_squares(b));
    sa + sb
}

/// Plain twin of [`sum_squares`]: one f64 accumulator, no threads.
pub fn sum_squares_reference(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum()
}

/// `clip_grad_norm_`'s factor for the global norm `total_norm`, as `rdrop_core::clip` computes
/// it in f32: `min(1, max_norm / (total_norm + 1e-6))`; `1` when `max_norm` is infinite
/// (measure only). A NaN norm gives NaN, which then propagates into the gradients as in torch.
pub fn clip_coef(total_norm: f64, max_norm: f64) -> f32 {
    if max_norm.is_infinite() {
        return 1.0;
    }
    let denom = total_norm as f32 * 1.0 + 1e-6f32;
    let coef = max_norm as f32 / denom;
    // candle's clamp(f32::MIN, 1) is max(min(x, 1), MIN) and keeps NaN.
    if coef.is_nan() {
        coef
    } else {
        coef.min(1.0)
    }
}

/// SGD hyper-parameters (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdHyper {
    /// Learning rate.
    pub lr: f32,
    /// Momentum μ (0: plain SGD, no buffer).
    pub momentum: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
}

/// One SGD update of `params` from `grads` scaled by `grad_scale` (see the module docs).
/// `momentum_buf` (same length; may be empty when `momentum == 0`) is overwritten on the first
/// step and updated in place afterwards.
///
/// # Panics
/// If the lengths differ (or the buffer is empty with momentum).
pub fn sgd_step(
    params: &mut [f32],
    grads: &[f32],
    momentum_buf: &mut [f32],
    first_step: bool,
    grad_scale: f32,
    h: &SgdHyper,
) {
    assert_eq!(params.len(), grads.len(), "sgd: params and grads differ");
    if h.momentum == 0.0 {
        let f = if h.weight_decay != 0.0 {
            sgd_plain::<true>
        } else {
            sgd_plain::<false>
        };
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .for_each(|(p, g)| f(p, g, grad_scale, h));
        return;
    }
    assert_eq!(
        momentum_buf.len(),
        params.len(),
        "sgd: momentum buffer and params differ"
    );
    // One monomorphised loop per case, so that the element loop has no branches and vectorises.
    let f = match (first_step, h.nesterov, h.weight_decay != 0.0) {
        (false, false, false) => sgd_momentum::<false, false, false>,
        (false, false, true) => sgd_momentum::<false, false, true>,
        (false, true, false) => sgd_momentum::<false, true, false>,
        (false, true, true) => sgd_momentum::<false, true, true>,
        (true, false, false) => sgd_momentum::<true, false, false>,
        (true, false, true) => sgd_momentum::<true, false, true>,
        (true, true, false) => sgd_momentum::<true, true, false>,
        (true, true, true) => sgd_momentum::<true, true, true>,
    };
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(momentum_buf.par_chunks_mut(CHUNK))
        .for_each(|((p, g), b)| f(p, g, b, grad_scale, h));
}

fn sgd_plain<const WD: bool>(p: &mut [f32], g: &[f32], c: f32, h: &SgdHyper) {
    let (lr, wd) = (h.lr, h.weight_decay);
    for (p, &g) in p.iter_mut().zip(g) {
        let mut d = c * g;
        if WD {
            d += *p * wd;
        }
        *p -= d * lr;
    }
}

fn sgd_momentum<const FIRST: bool, const NESTEROV: bool, const WD: bool>(
    p: &mut [f32],
    g: &[f32],
    b: &mut [f32],
    c: f32,
    h: &SgdHyper,
) {
    let (lr, mu, wd) = (h.lr, h.momentum, h.weight_decay);
    for ((p, &g), b) in p.iter_mut().zip(g).zip(b) {
        let mut d = c * g;
        if WD {
            d += *p * wd;
        }
        *b = if FIRST { d } else { *b * mu + d };
        let d = if NESTEROV { d + *b * mu } else { *b };
        *p -= d * lr;
    }
}

/// Plain twin of [`sgd_step`]: the same formula, one element at a time, no threads.
pub fn sgd_step_reference(
    params: &mut [f32],
    grads: &[f32],
    momentum_buf: &mut [f32],
    first_step: bool,
    grad_scale: f32,
    h: &SgdHyper,
) {
    assert_eq!(params.len(), grads.len());
    for i in 0..params.len() {
        let g = grads[i] * grad_scale;
        let d = if h.weight_decay != 0.0 {
            g + params[i] * h.weight_decay
        } else {
            g
        };
        let d = if h.momentum != 0.0 {
            momentum_buf[i] = if first_step {
                d
            } else {
                momentum_buf[i] * h.momentum + d
            };
            if h.nesterov {
                d + momentum_buf[i] * h.momentum
            } else {
                momentum_buf[i]
            }
        } else {
            d
        };
        params[i] -= d * h.lr;
    }
}

/// AdamW hyper-parameters (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    /// Learning rate.
    pub lr: f32,
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

/// The f32 coefficients of one AdamW step (also passed to the CUDA kernel, so both engines
/// update with the same values).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamCoef {
    /// `1 − lr·wd`.
    pub decay: f32,
    /// `1 − β1`.
    pub one_m_b1: f32,
    /// β2.
    pub b2: f32,
    /// `1 − β2`.
    pub one_m_b2: f32,
    /// `1/√(1 − β2^t)`.
    pub inv_bc2_sqrt: f32,
    /// ε.
    pub eps: f32,
    /// `lr/(1 − β1^t)`.
    pub step_size: f32,
}

impl AdamCoef {
    /// The coefficients of step `step` (≥ 1), derived in f64 and rounded to f32 once.
    pub fn new(step: u64, h: &AdamWHyper) -> Self {
        let (lr, b1, b2) = (h.lr as f64, h.beta1 as f64, h.beta2 as f64);
        let t = step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        Self {
            decay: (1.0 - lr * h.weight_decay as f64) as f32,
            one_m_b1: (1.0 - b1) as f32,
            b2: h.beta2,
            one_m_b2: (1.0 - b2) as f32,
            inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
            eps: h.eps,
            step_size: (lr / bc1) as f32,
        }
    }

    #[inline(always)]
    fn update<const DECAY: bool>(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        if DECAY {
            *p *= self.decay;
        }
        *m += (g - *m) * self.one_m_b1;
        *v = *v * self.b2 + g * g * self.one_m_b2;
        let denom = v.sqrt() * self.inv_bc2_sqrt + self.eps;
        *p -= *m / denom * self.step_size;
    }

    fn chunk<const DECAY: bool>(
        &self,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        c: f32,
    ) {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
            self.update::<DECAY>(p, c * g, m, v);
        }
    }
}

/// One AdamW update (see the module docs). `step` is this parameter's step count after the
/// increment (1 on the first update); `exp_avg` and `exp_avg_sq` start at zero and are updated
/// in place.
///
/// # Panics
/// If the lengths differ or `step == 0`.
pub fn adamw_step(
    params: &mut [f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    step: u64,
    grad_scale: f32,
    h: &AdamWHyper,
) {
    let n = params.len();
    assert!(
        grads.len() == n && exp_avg.len() == n && exp_avg_sq.len() == n,
        "adamw: buffer lengths differ"
    );
    assert!(step > 0, "adamw: step counts from 1");
    let k = AdamCoef::new(step, h);
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(exp_avg.par_chunks_mut(CHUNK))
        .zip(exp_avg_sq.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            if h.weight_decay != 0.0 {
                k.chunk::<true>(p, g, m, v, grad_scale);
            } else {
                k.chunk::<false>(p, g, m, v, grad_scale);
            }
        });
}

/// Plain twin of [`adamw_step`]: the textbook formula in f64 per element, rounded to f32 on
/// store (so it agrees with the fast kernel to rounding, not bitwise).
pub fn adamw_step_reference(
    params: &mut [f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    step: u64,
    grad_scale: f32,
    h: &AdamWHyper,
) {
    let (lr, b1, b2) = (h.lr as f64, h.beta1 as f64, h.beta2 as f64);
    let t = step as i32;
    for i in 0..params.len() {
        let g = grads[i] as f64 * grad_scale as f64;
        let mut p = params[i] as f64 * (1.0 - lr * h.weight_decay as f64);
        let m = b1 * exp_avg[i] as f64 + (1.0 - b1) * g;
        let v = b2 * exp_avg_sq[i] as f64 + (1.0 - b2) * g * g;
        let m_hat = m / (1.0 - b1.powi(t));
        let v_hat = v / (1.0 - b2.powi(t));
        p -= lr * m_hat / (v_hat.sqrt() + h.eps as f64);
        params[i] = p as f32;
        exp_avg[i] = m as f32;
        exp_avg_sq[i] = v as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let w = crate::philox::philox4x32_10([i as u32, seed, 1, 2], [5, 6])[0];
                (w as f64 / 4_294_967_296.0 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    }

    #[test]
    fn sum_squares_matches_reference_and_thread_count() {
        let x = data(3 * CHUNK + 123, 1);
        let a = pool(1).install(|| sum_squares(&x));
        let b = pool(2).install(|| sum_squares(&x));
        assert_eq!(a.to_bits(), b.to_bits());
        let r = sum_squares_reference(&x);
        assert!((a - r).abs() < 1e-12 * r, "{a} vs {r}");
        assert_eq!(sum_squares(&[3.0, 4.0]), 25.0);
        assert_eq!(sum_squares(&[]), 0.0);
    }

    #[test]
    fn clip_coef_as_torch() {
        assert_eq!(clip_coef(0.5, 1.0), 1.0);
        let c = clip_coef(5.0, 1.0);
        assert_eq!(c, 1.0f32 / (5.0f32 + 1e-6));
        assert_eq!(clip_coef(5.0, f64::INFINITY), 1.0);
        assert!(clip_coef(f64::NAN, 1.0).is_nan());
    }

    fn hypers() -> Vec<SgdHyper> {
        let mut v = Vec::new();
        for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
            for weight_decay in [0.0, 0.05] {
                v.push(SgdHyper {
                    lr: 0.1,
                    momentum,
                    nesterov,
                    weight_decay,
                });
            }
        }
        v
    }

    /// Fast and plain SGD agree bitwise over three steps on 1 and 2 threads.
    #[test]
    fn sgd_fast_equals_reference_bitwise() {
        let n = 2 * CHUNK + 77;
        for h in hypers() {
            let run = |fast: bool, threads: usize| {
                let (mut p, mut b) = (data(n, 2), vec![0f32; n]);
                for s in 0..3 {
                    let g = data(n, 10 + s);
                    if fast {
                        pool(threads).install(|| sgd_step(&mut p, &g, &mut b, s == 0, 0.5, &h));
                    } else {
                        sgd_step_reference(&mut p, &g, &mut b, s == 0, 0.5, &h);
                    }
                }
                p
            };
            let r = run(false, 1);
            assert_eq!(run(true, 1), r, "{h:?}");
            assert_eq!(run(true, 2), r, "{h:?}");
            assert_ne!(r, data(n, 2));
        }
        // Plain SGD needs no buffer.
        let mut p = vec![1.0f32; 3];
        let h = SgdHyper {
            lr: 0.5,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        };
        sgd_step(&mut p, &[1.0, 2.0, -2.0], &mut [], true, 1.0, &h);
        assert_eq!(p, vec![0.5, 0.0, 2.0]);
    }

    #[test]
    fn adamw_fast_matches_reference_and_thread_count() {
        let n = 2 * CHUNK + 77;
        let h = AdamWHyper {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
        };
        let run = |fast: bool, threads: usize| {
            let (mut p, mut m, mut v) = (data(n, 3), vec![0f32; n], vec![0f32; n]);
            for s in 1..=4u64 {
                let g = data(n, 20 + s as u32);
                if fast {
                    pool(threads).install(|| adamw_step(&mut p, &g, &mut m, &mut v, s, 0.7, &h));
                } else {
                    adamw_step_reference(&mut p, &g, &mut m, &mut v, s, 0.7, &h);
                }
            }
            p
        };
        let (a, b, r) = (run(true, 1), run(true, 2), run(false, 1));
        assert_eq!(a, b);
        for (x, y) in a.iter().zip(&r) {
            // Each step moves θ by about lr; agree to well below that.
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        let p0 = data(n, 3);
        let moved: f32 = a.iter().zip(&p0).map(|(x, z)| (x - z).abs()).sum::<f32>() / n as f32;
        assert!(moved > 1e-3, "{moved}");
    }
}
