//! Patch extraction for the patch embedding (a stride-p, kernel-p convolution written as a
//! GEMM): images `(B, C, S, S)` → patch rows `(B·g², C·p·p)`, `g = S/p`,
//! ```text
//! rows[b·g² + gy·g + gx,  c·p·p + py·p + px] = img[b, c, gy·p + py, gx·p + px]
//! ```
//! The column order is that of a `(D, C, p, p)` convolution kernel reshaped to `(D, C·p·p)`,
//! so the embedding is [`crate::linear::linear_fwd`] with that kernel as W. The images are
//! inputs, so no backward (col2im) is needed: the kernel's gradient is `linear_bwd` on these rows.

use rayon::prelude::*;

/// Fills the patch rows of `b` images of `c` channels, `s×s` pixels, patch size `p`.
///
/// # Panics
/// If `p` is 0 or does not divide `s`, or on mismatched lengths.
pub fn im2col(rows: &mut [f32], img: &[f32], b: usize, c: usize, s: usize, p: usize) {
    let g = check(rows.len(), img.len(), b, c, s, p);
    let width = c * p * p;
    if width == 0 {
        return;
    }
    rows.par_chunks_mut(width)
        .enumerate()
        .for_each(|(ri, row)| {
            let (bi, gy, gx) = (ri / (g * g), ri / g % g, ri % g);
            for (ci, dst) in row.chunks_exact_mut(p * p).enumerate() {
                let plane = &img[(bi * c + ci) * s * s..][..s * s];
                for (py, d) in dst.chunks_exact_mut(p).enumerate() {
                    let at = (gy * p + py) * s + gx * p;
                    d.copy_from_slice(&plane[at..at + p]);
                }
            }
        });
}

fn check(rows_len: usize, img_len: usize, b: usize, c: usize, s: usize, p: usize) -> usize {
    assert!(
        s.checked_rem(p) == Some(0),
        "im2col: patch size {p} does not divide image size {s}"
    );
    let g = s / p;
    assert_eq!(img_len, b * c * s * s, "im2col: img is not B×C×S×S");
    assert_eq!(
        rows_len,
        b * g * g * c * p * p,
        "im2col: rows is not (B·g²)×(C·p·p)"
    );
    g
}

/// Plain twin of [`im2col`]: walks the image pixel by pixel and scatters each one.
pub fn im2col_reference(rows: &mut [f32], img: &[f32], b: usize, c: usize, s: usize, p: usize) {
    let g = check(rows.len(), img.len(), b, c, s, p);
    for bi in 0..b {
        for ci in 0..c {
            for y in 0..s {
                for x in 0..s {
                    let row = bi * g * g + (y / p) * g + x / p;
                    let col = ci * p * p + (y % p) * p + x % p;
                    rows[row * c * p * p + col] = img[((bi * c + ci) * s + y) * s + x];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::{linear_fwd, test_util::randn};

    #[test]
    fn matches_reference() {
        for &(b, c, s, p) in &[(2, 3, 8, 4), (1, 1, 5, 1), (3, 2, 6, 3), (1, 3, 4, 4)] {
            let img = randn(b * c * s * s, 1);
            let n = b * (s / p) * (s / p) * c * p * p;
            let mut a = vec![f32::NAN; n];
            im2col(&mut a, &img, b, c, s, p);
            let mut r = vec![f32::NAN; n];
            im2col_reference(&mut r, &img, b, c, s, p);
            assert_eq!(a, r);
        }
    }

    /// im2col + linear_fwd with a (D, C, p, p) kernel equals a direct stride-p convolution
    /// (NCHW, as torch's Conv2d), token order gy·g + gx.
    #[test]
    fn embedding_is_the_strided_convolution() {
        let (b, c, s, p, dm) = (2, 3, 8, 4, 5);
        let g = s / p;
        let img = randn(b * c * s * s, 2);
        let kernel = randn(dm * c * p * p, 3); // (D, C, p, p)
        let bias = randn(dm, 4);
        let mut rows = vec![0.0; b * g * g * c * p * p];
        im2col(&mut rows, &img, b, c, s, p);
        let mut y = vec![0.0; b * g * g * dm];
        linear_fwd(
            &mut y,
            &rows,
            &kernel,
            Some(&bias),
            b * g * g,
            c * p * p,
            dm,
        );
        for bi in 0..b {
            for o in 0..dm {
                for gy in 0..g {
                    for gx in 0..g {
                        let mut acc = bias[o] as f64;
                        for ci in 0..c {
                            for ky in 0..p {
                                for kx in 0..p {
                                    let w = kernel[((o * c + ci) * p + ky) * p + kx] as f64;
                                    let v =
                                        img[((bi * c + ci) * s + gy * p + ky) * s + gx * p + kx];
                                    acc += w * v as f64;
                                }
                            }
                        }
                        let got = y[(bi * g * g + gy * g + gx) * dm + o] as f64;
                        assert!((got - acc).abs() < 1e-5, "{got} vs {acc}");
                    }
                }
            }
        }
    }
}
