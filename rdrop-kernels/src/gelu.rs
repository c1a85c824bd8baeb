//! Exact GELU, `y = x·Φ(x) = ½·x·(1 + erf(x/√2))`, and its backward
//! `dx = dy ⊙ (Φ(x) + x·φ(x))`, `φ(x) = exp(−x²/2)/√(2π)`.
//!
//! The kernels evaluate candle's `gelu_erf` formula for f32, `(1 + erf(x·(1/√2)))·½·x`, with a
//! branch-free, vectorisable erf in place of `libm::erff` (scalar, branchy, two `expf` calls:
//! about 10× slower in `examples/kernels_bench.rs`); its polynomials use `mul_add`, FMA under
//! the AVX2 dispatch ([`simd`]; `fmaf` elsewhere, exactly rounded too, so every path gives the
//! same bits). [`erf_f32`] is within 2 ulp of `libm::erff` and of erf, and `1 + erf` is
//! taken as erfc(|z|) itself for z ≤ −1, so it does not cancel. Tests hold the kernels' GELU to
//! candle's within 1e-6 relative for x ≥ −1.5 and 2e-7·|x| absolute everywhere (for x ≪ 0
//! candle's own value cancels to that accuracy), and to f64 within 1e-6 relative for x ≥ −5.5.
//! [`gelu_candle`] is candle's op itself (`libm::erff`), kept to hold the kernels to it.

use rayon::prelude::*;

/// Elements per rayon task (results are elementwise: the split changes nothing).
const CHUNK: usize = 1 << 14;

/// `1/√(2π)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

// Polynomials fitted by `scripts/fit_erf_f32.py` (mpmath, Chebyshev nodes); highest degree
// first. ERF_P(u) ≈ erf(√u)/√u on u ∈ [0, 1]; ERFC_R(t) ≈ erfc(a)·exp(a²), a = 2.5 + 1.5·t.
/// degree 6 on [0, 1], max relative error 1.33e-9
const ERF_P: [f32; 7] = [
    7.875875e-05,
    -0.00080168643,
    0.0051890872,
    -0.026854211,
    0.11283594,
    -0.37612626,
    // The fit's constant term (1.12837916585) is 2/√π to 1e-9: its own f32 is used.
    std::f32::consts::FRAC_2_SQRT_PI,
];
/// degree 11 on [-1, 1], max relative error 3.4e-8
const ERFC_R: [f32; 12] = [
    -3.566418e-05,
    9.62912e-05,
    -0.00014741614,
    0.0003681511,
    -0.0010136625,
    0.002425639,
    -0.0055688377,
    0.012484123,
    -0.027005458,
    0.05611095,
    -0.11152102,
    0.21080635,
];

/// Horner's rule, highest-degree coefficient first.
#[inline(always)]
fn horner(c: &[f32], x: f32) -> f32 {
    let mut acc = c[0];
    for &ci in &c[1..] {
        acc = acc.mul_add(x, ci);
    }
    acc
}

/// `exp(v)` for `v ≤ 0` (clamped below at −87, where it is ~1.6e−38), within ~2 ulp:
/// `v = n·ln2 + r`, `|r| ≤ ln2/2`, `exp(r)` by its degree-7 Taylor polynomial (error
/// < 6e−9 relative), `2ⁿ` written into the exponent bits. Branch-free, so loops vectorise.
#[inline(always)]
fn exp_nonpos(v: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact (Cody–Waite).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2²³ rounds to the nearest integer and leaves it in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let v = v.max(-87.0);
    let shifted = v * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let ni = (shifted.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (v - n * LN2_HI) - n * LN2_LO;
    const INV_FACT: [f32; 8] = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let p = horner(&INV_FACT[..7], r).mul_add(r, INV_FACT[7]);
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

/// `erf(z)` for `|z| < 1` and `erfc(a)`, `a = |z|` clamped to [1, 4], both branch-free:
/// `z·P(z²)` and `exp(−a²)·R((a − 2.5)/1.5)`.
#[inline(always)]
fn erf_parts(z: f32) -> (f32, f32) {
    let u = z * z;
    // z·P(u) as z + z·(P(u) − 1): z is exact and the rest is < 0.13·z, so the result is
    // rounded about once (z·P(u) directly loses ~2 ulp to the rounding of z·P(0)).
    const C0_MINUS_1: f32 = 0.128_379_17; // 2/√π − 1
    let small = z.mul_add(horner(&ERF_P[..6], u).mul_add(u, C0_MINUS_1), z);
    let ac = z.abs().clamp(1.0, 4.0);
    let erfc = exp_nonpos(-(ac * ac)) * horner(&ERFC_R, (ac - 2.5) * (1.0 / 1.5));
    (small, erfc)
}

/// erf in f32 without branches or calls (vectorises): `|z| < 1`: `z·P(z²)`; otherwise
/// `sign(z)·(1 − erfc(min(|z|, 4)))` (beyond 4, erf rounds to ±1 in f32). Within 2 ulp of
/// `libm::erff` and of erf (tests; 1 ulp measured on a sweep of 10⁷ values).
#[inline(always)]
pub fn erf_f32(z: f32) -> f32 {
    let (small, erfc) = erf_parts(z);
    if z.abs() < 1.0 {
        small
    } else {
        (1.0 - erfc).copysign(z)
    }
}

/// `1 + erf(z)` without the cancellation of `1 + erf_f32(z)` for z ≤ −1: there it is erfc(|z|)
/// itself (0 beyond |z| = 4, where 1 + erf(z) < 1.6e−8, as candle's f32 value is).
#[inline(always)]
fn one_plus_erf(z: f32) -> f32 {
    let (small, erfc) = erf_parts(z);
    let a = z.abs();
    if a < 1.0 {
        1.0 + small
    } else if z > 0.0 {
        2.0 - erfc
    } else if a <= 4.0 {
        erfc
    } else {
        0.0
    }
}

/// GELU of one value in candle's `gelu_erf` order, `(1 + erf(x·(1/√2)))·½·x`, with `1 + erf`
/// taken as erfc(|z|) for z ≤ −1 (accurate also where it is small). For loops use the slice
/// kernels: outside an FMA-enabled function its `mul_add`s are `fmaf` calls (right but slow).
#[inline(always)]
pub fn gelu_scalar(x: f32) -> f32 {
    one_plus_erf(x * std::f32::consts::FRAC_1_SQRT_2) * 0.5 * x
}

/// `d gelu / dx = Φ(x) + x·φ(x)` of one value (see [`gelu_scalar`] on calling it in loops).
#[inline(always)]
pub fn gelu_grad_scalar(x: f32) -> f32 {
    let cdf = 0.5 * one_plus_erf(x * std::f32::consts::FRAC_1_SQRT_2);
    cdf + x * INV_SQRT_2PI * exp_nonpos(-0.5 * x * x)
}

/// candle's `gelu_erf` for f32 exactly (`libm::erff`): the value the autograd model computes.
pub fn gelu_candle(x: f32) -> f32 {
    (libm::erff(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

/// Runs `f` compiled for the best instruction set the CPU has (pulp's runtime dispatch: AVX2
/// and FMA on x86-64 where present), so that the loops in it vectorise 8 wide instead of
/// SSE2's 4. Only for code without `mul_add` (LLVM inlines the closure at its discretion, and
/// a `mul_add` left outside the FMA-enabled function becomes a slow `fmaf` call): the GELU
/// loops, which use `mul_add`, are [`pulp::WithSimd`] items whose `with_simd` is
/// `#[inline(always)]` instead.
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// `y[i] = gelu(x[i])`.
struct Fwd<'a> {
    y: &'a mut [f32],
    x: &'a [f32],
}

impl pulp::WithSimd for Fwd<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for (y, &x) in self.y.iter_mut().zip(self.x) {
            *y = gelu_scalar(x);
        }
    }
}

/// `dx[i] = dy[i]·gelu'(x[i])`; `dy` is `None` in place (dx holds dy on entry).
struct Bwd<'a> {
    dx: &'a mut [f32],
    dy: Option<&'a [f32]>,
    x: &'a [f32],
}

impl pulp::WithSimd for Bwd<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        match self.dy {
            Some(dy) => {
                for ((dx, &dy), &x) in self.dx.iter_mut().zip(dy).zip(self.x) {
                    *dx = dy * gelu_grad_scalar(x);
                }
            }
            None => {
                for (d, &x) in self.dx.iter_mut().zip(self.x) {
                    *d *= gelu_grad_scalar(x);
                }
            }
        }
    }
}

/// Rows of `pre` (width `bias.len()`): `pre += bias`, then `y = gelu(pre)`.
struct BiasGelu<'a> {
    pre: &'a mut [f32],
    y: &'a mut [f32],
    bias: &'a [f32],
}

impl pulp::WithSimd for BiasGelu<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let d = self.bias.len();
        for (prow, yrow) in self.pre.chunks_exact_mut(d).zip(self.y.chunks_exact_mut(d)) {
            for ((p, yv), &bv) in prow.iter_mut().zip(yrow.iter_mut()).zip(self.bias) {
                *p += bv;
                *yv = gelu_scalar(*p);
            }
        }
    }
}

/// `pre += bias` row by row (rows of width `bias.len()`), then `y = gelu(pre)`: the epilogue
/// of [`crate::linear::linear_gelu_fwd`], on one block of rows (no threads).
pub(crate) fn bias_gelu_rows(pre: &mut [f32], y: &mut [f32], bias: &[f32]) {
    pulp::Arch::new().dispatch(BiasGelu { pre, y, bias });
}

/// `y = gelu(x)` elementwise.
///
/// # Panics
/// If `y` and `x` differ in length.
pub fn gelu_fwd(y: &mut [f32], x: &[f32]) {
    assert_eq!(y.len(), x.len(), "gelu: y and x differ in length");
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| pulp::Arch::new().dispatch(Fwd { y, x }));
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
            pulp::Arch::new().dispatch(Bwd {
                dx,
                dy: Some(dy),
                x,
            })
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
        .for_each(|(d, x)| pulp::Arch::new().dispatch(Bwd { dx: d, dy: None, x }));
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

    /// The slice kernel against its f64 twin, with the bounds of `gelu_matches_candle_and_f64`:
    /// relative ≤ 5e-7 + 1.2e-7·x² for x ≥ −5.5 (and |y| > 1e-30), absolute ≤ 1e-7 beyond.
    #[test]
    fn forward_matches_f64() {
        let x = inputs();
        let mut y = vec![0f32; x.len()];
        gelu_fwd(&mut y, &x);
        let mut r = vec![0f32; x.len()];
        gelu_fwd_reference(&mut r, &x);
        for ((&x, &y), &r) in x.iter().zip(&y).zip(&r) {
            let t = gelu_f64(x as f64);
            if x >= -5.5 && t.abs() > 1e-30 {
                let bound = (5e-7 + 1.2e-7 * (x as f64).powi(2)) * t.abs();
                assert!((y as f64 - t).abs() <= bound, "gelu({x}) = {y} vs {t}");
            } else {
                assert!((y as f64 - t).abs() <= 1e-7, "gelu({x}) = {y} vs {t}");
            }
            assert_eq!(r, t as f32, "the twin is the f64 value rounded");
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

    /// Every 101st f32 in [0, 6] (≈ 1e7 values), and the odd symmetry.
    fn sweep() -> impl Iterator<Item = f32> {
        (0..6f32.to_bits()).step_by(101).map(f32::from_bits)
    }

    #[test]
    fn erf_within_two_ulp_of_libm_and_f64() {
        let mut worst = (0u32, 0f32);
        let mut worst_true = 0;
        for z in sweep() {
            let (a, b) = (erf_f32(z), libm::erff(z));
            let ulp = a.to_bits().abs_diff(b.to_bits());
            if ulp > worst.0 {
                worst = (ulp, z);
            }
            assert_eq!(erf_f32(-z), -a);
            let t = (libm::erf(z as f64) as f32).to_bits().abs_diff(a.to_bits());
            worst_true = worst_true.max(t);
        }
        eprintln!(
            "erf_f32 vs erff: {} ulp at {}; vs erf: {worst_true}",
            worst.0, worst.1
        );
        assert!(
            worst.0 <= 2 && worst_true <= 2,
            "erf_f32 is {} ulp from erff at {}",
            worst.0,
            worst.1
        );
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert!(erf_f32(f32::NAN).is_nan());
    }

    #[test]
    fn exp_within_two_ulp() {
        for v in (0..87f32.to_bits()).step_by(97).map(|b| -f32::from_bits(b)) {
            let (a, b) = (exp_nonpos(v) as f64, (v as f64).exp());
            assert!((a - b).abs() <= 2.4e-7 * b, "exp({v}) = {a} vs {b}");
        }
    }

    /// The kernels' GELU against candle's (`libm::erff`) and against f64 on ±√2·[0, 6]:
    /// - vs candle: ≤ 1e-6 relative for x ≥ −1.5 (|y| ≥ 0.1·|x|; measured 4.4e-7), ≤ 2e-7·|x|
    ///   absolute everywhere (measured 1.2e-7: candle's ½x(1 + erff) cancels for x ≪ 0);
    /// - vs f64, for x ≥ −5.5 and |y| > 1e-30 (1 + erf ≥ 3e-8, not subnormal): relative error
    ///   ≤ 5e-7 + 1.2e-7·x² (the x² term: f32's rounding of x/√2 and of its square moves
    ///   exp(−x²/2) by that much, relatively; candle has the same); ≤ 1e-7 absolute beyond.
    #[test]
    fn gelu_matches_candle_and_f64() {
        let (mut vs_candle_rel, mut vs_candle_abs, mut vs_f64_rel) = (0f32, 0f32, 0f64);
        for x in sweep().flat_map(|x| [x * std::f32::consts::SQRT_2, -x * std::f32::consts::SQRT_2])
        {
            let (a, b) = (gelu_scalar(x), gelu_candle(x));
            vs_candle_abs = vs_candle_abs.max((a - b).abs() / x.abs().max(1e-30));
            if x >= -1.5 && b != 0.0 {
                vs_candle_rel = vs_candle_rel.max((a - b).abs() / b.abs());
            }
            let t = gelu_f64(x as f64);
            if x >= -5.5 {
                if t.abs() > 1e-30 {
                    let rel = (a as f64 - t).abs() / t.abs();
                    vs_f64_rel = vs_f64_rel.max(rel / (5e-7 + 1.2e-7 * (x * x) as f64));
                }
            } else {
                assert!((a as f64 - t).abs() <= 1e-7, "gelu({x}) = {a} vs {t}");
            }
        }
        eprintln!("gelu vs candle: rel {vs_candle_rel:e} (x ≥ −1.5), abs/|x| {vs_candle_abs:e}; vs f64: rel / bound {vs_f64_rel:e}");
        assert!(vs_candle_rel <= 1e-6, "relative to candle {vs_candle_rel}");
        assert!(
            vs_candle_abs <= 2e-7,
            "absolute / |x| to candle {vs_candle_abs}"
        );
        assert!(vs_f64_rel <= 1.0, "relative to f64 / bound {vs_f64_rel}");
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
