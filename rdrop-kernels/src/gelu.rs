//! Exact GELU, `y = x·Φ(x) = ½·x·(1 + erf(x/√2))`, and its backward
//! `dx = dy ⊙ (Φ(x) + x·φ(x))`, `φ(x) = exp(−x²/2)/√(2π)`.
//!
//! The forward is candle's `gelu_erf` for f32 term for term (`libm::erff`, the same operation
//! order), so the engine and the autograd model agree to the bit on the same input.

use rayon::prelude::*;

/// Elements per rayon task (a function of nothing: results are elementwise anyway).
const CHUNK: usize = 1 << 14;

/// `1/√(2π)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// GELU of one value, exactly candle's `gelu_erf` for f32:
/// `(erff(x·(1/√2)) + 1)·½·x`.
#[inline]
pub fn gelu_scalar(x: f32) -> f32 {
    (libm::erff(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

/// `d gelu / dx = Φ(x) + x·φ(x)` of one value.
#[inline]
pub fn gelu_grad_scalar(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
}

/// `y = gelu(x)` elementwise.
///
/// # Panics
/// If `y` and `x` differ in length.
pub fn gelu_fwd(y: &mut [f32], x: &[f32]) {
    assert_eq!(y.len(), x.len(), "gelu: y and x differ in length");
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = gelu_scalar(x);
            }
        });
}

/// `dx = dy ⊙ gelu'(x)` (dx overwritten).
///
/// # Panics
/// If the lengths differ.
pub fn gelu_bwd(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    assert_eq!(dx.len(), x.len(), "gelu_bwd: dx and x differ in length");
    assert_eq!(dy.len(), x.len(), "gelu_bwd: dy and x differ in length");
    dx.par_chunks_mut(CHUNK)
        .zip(dy.par_chunks(CHUNK).zip(x.par_chunks(CHUNK)))
        .for_each(|(dx, (dy, x))| {
            for ((dx, &dy), &x) in dx.iter_mut().zip(dy).zip(x) {
                *dx = dy * gelu_grad_scalar(x);
            }
        });
}

/// [`gelu_bwd`] in place: `d` holds dy on entry and dx on return.
///
/// # Panics
/// If the lengths differ.
pub fn gelu_bwd_inplace(d: &mut [f32], x: &[f32]) {
    assert_eq!(d.len(), x.len(), "gelu_bwd: d and x differ in length");
    d.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(d, x)| {
            for (d, &x) in d.iter_mut().zip(x) {
                *d *= gelu_grad_scalar(x);
            }
        });
}

/// GELU in f64 (`libm::erf`): the reference the f32 kernels are held to.
pub fn gelu_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

/// `gelu'(x)` in f64.
pub fn gelu_grad_f64(x: f64) -> f64 {
    0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
        + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// Plain twin of [`gelu_fwd`], computed in f64.
pub fn gelu_fwd_reference(y: &mut [f32], x: &[f32]) {
    assert_eq!(y.len(), x.len());
    for (y, &x) in y.iter_mut().zip(x) {
        *y = gelu_f64(x as f64) as f32;
    }
}

/// Plain twin of [`gelu_bwd`], computed in f64.
pub fn gelu_bwd_reference(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    assert_eq!(dx.len(), x.len());
    assert_eq!(dy.len(), x.len());
    for ((dx, &dy), &x) in dx.iter_mut().zip(dy).zip(x) {
        *dx = (dy as f64 * gelu_grad_f64(x as f64)) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::test_util::{pools, randn};

    /// Inputs over the range a pre-activation takes, plus exact points and tails.
    fn inputs() -> Vec<f32> {
        let mut x: Vec<f32> = randn(50_000, 1).iter().map(|v| v * 8.0).collect();
        x.extend([
            0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8, 5.5, -5.5, 10.0, -10.0, 30.0, -30.0,
        ]);
        x
    }

    /// Forward: |fast − f64| ≤ 3e-7·|x| (+ 1e-12) over the whole range. Relative to y this is
    /// ≤ 1e-6 wherever |y| ≥ 0.3·|x| (x ≥ −0.5); for very negative x, ½x(1 + erf) cancels in
    /// f32 (candle's formula, kept on purpose) and only the absolute bound holds.
    #[test]
    fn forward_matches_f64() {
        let x = inputs();
        let mut y = vec![0f32; x.len()];
        gelu_fwd(&mut y, &x);
        let mut r = vec![0f32; x.len()];
        gelu_fwd_reference(&mut r, &x);
        for ((&x, &y), &r) in x.iter().zip(&y).zip(&r) {
            assert!(
                (y - r).abs() <= 3e-7 * x.abs() + 1e-12,
                "gelu({x}) = {y} vs {r}"
            );
            if x >= -0.5 && x.abs() > 1e-30 {
                assert!((y - r).abs() <= 1e-6 * r.abs(), "gelu({x}) rel: {y} vs {r}");
            }
        }
        assert_eq!(gelu_scalar(0.0), 0.0);
        assert_eq!(gelu_scalar(30.0), 30.0);
        assert_eq!(gelu_scalar(-30.0), 0.0);
    }

    #[test]
    fn backward_matches_f64_and_inplace() {
        let x = inputs();
        let dy = randn(x.len(), 2);
        let mut dx = vec![f32::NAN; x.len()];
        gelu_bwd(&mut dx, &dy, &x);
        let mut r = vec![0f32; x.len()];
        gelu_bwd_reference(&mut r, &dy, &x);
        for (i, (&a, &b)) in dx.iter().zip(&r).enumerate() {
            assert!((a - b).abs() <= 1e-6 * dy[i].abs(), "x={} {a} vs {b}", x[i]);
        }
        let mut d = dy.clone();
        gelu_bwd_inplace(&mut d, &x);
        assert_eq!(d, dx);
    }

    /// The f64 derivative against central differences of the f64 forward (the f32 kernels
    /// are held to both above).
    #[test]
    fn derivative_matches_finite_differences() {
        let h = 1e-5;
        for &x in &inputs()[..2000] {
            let x = x as f64;
            let fd = (gelu_f64(x + h) - gelu_f64(x - h)) / (2.0 * h);
            assert!((fd - gelu_grad_f64(x)).abs() < 1e-8, "x={x}: {fd}");
            let fd32 = (gelu_scalar((x + 1e-2) as f32) as f64
                - gelu_scalar((x - 1e-2) as f32) as f64)
                / 2e-2;
            assert!(
                (fd32 - gelu_grad_scalar(x as f32) as f64).abs() < 1e-3 * (1.0 + x.abs()),
                "x={x}"
            );
        }
    }

    #[test]
    fn thread_independent() {
        let x = inputs();
        let dy = randn(x.len(), 3);
        let outs: Vec<_> = pools()
            .iter()
            .map(|p| {
                p.install(|| {
                    let mut y = vec![0f32; x.len()];
                    gelu_fwd(&mut y, &x);
                    let mut dx = vec![0f32; x.len()];
                    gelu_bwd(&mut dx, &dy, &x);
                    (y, dx)
                })
            })
            .collect();
        assert!(outs.iter().all(|o| o == &outs[0]));
    }
}
