//! Inverted dropout with masks regenerated from [`crate::philox`] keys (never stored).
//!
//! An activation of a batch is `rows` samples of `n` elements each (row-major); row `r` is
//! sample `rows[r].sample` in R-Drop pass `rows[r].pass`. Element `i` of row `r` is kept with
//! probability `1 − p` and then multiplied by `1/(1−p)`:
//! ```text
//! y[r, i] = x[r, i] · mask(key(site, rows[r]), i)        mask ∈ {0, 1/(1−p)}
//! ```
//! The backward is the same operation on the gradient (`dx = dy ⊙ mask`).

use rayon::prelude::*;

use crate::philox::{drop_threshold, keep_scale, MaskKey};

/// Which sample and which R-Drop pass a row of the batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RowKey {
    /// The sample's index in the update's global batch.
    pub sample: u32,
    /// R-Drop's pass (0 or 1).
    pub pass: u32,
}

/// One dropout site of one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Site {
    /// The run's seed.
    pub seed: u64,
    /// The update.
    pub update: u32,
    /// The site's number in the network.
    pub site: u32,
    /// Drop probability in `[0, 1)`.
    pub p: f32,
}

impl Site {
    /// The Philox key of `row`.
    pub fn key(&self, row: RowKey) -> MaskKey {
        MaskKey {
            seed: self.seed,
            update: self.update,
            site: self.site,
            sample: row.sample,
            pass: row.pass,
        }
    }
}

/// Applies the site's mask in place to `x` (`rows.len()` rows of `n` elements). A no-op when
/// `p == 0`. Parallel over rows; the result does not depend on the thread count.
pub fn dropout_apply(x: &mut [f32], n: usize, site: &Site, rows: &[RowKey]) {
    assert_eq!(x.len(), n * rows.len(), "dropout: buffer is not rows × n");
    if site.p == 0.0 || n == 0 {
        return;
    }
    let (thr, scale) = (drop_threshold(site.p), keep_scale(site.p));
    x.par_chunks_mut(n)
        .zip(rows.par_iter())
        .for_each(|(row, &rk)| apply_row(row, &site.key(rk), thr, scale));
}

#[inline]
fn apply_row(row: &mut [f32], key: &MaskKey, thr: u32, scale: f32) {
    for (b, chunk) in row.chunks_mut(4).enumerate() {
        let w = key.block(b as u32);
        for (v, &w) in chunk.iter_mut().zip(w.iter()) {
            *v = if w < thr { 0.0 } else { *v * scale };
        }
    }
}

/// Plain twin of [`dropout_apply`]: one element at a time, no threads.
pub fn dropout_apply_reference(x: &mut [f32], n: usize, site: &Site, rows: &[RowKey]) {
    assert_eq!(x.len(), n * rows.len());
    if site.p == 0.0 {
        return;
    }
    for (r, &rk) in rows.iter().enumerate() {
        let key = site.key(rk);
        for i in 0..n {
            let keep = key.word(i) >= drop_threshold(site.p);
            let v = &mut x[r * n + i];
            *v = if keep { *v * keep_scale(site.p) } else { 0.0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_equals_reference_and_is_thread_independent() {
        let rows: Vec<RowKey> = (0..6)
            .map(|i| RowKey {
                sample: i % 3,
                pass: i / 3,
            })
            .collect();
        let n = 1001;
        let x: Vec<f32> = (0..n * rows.len()).map(|i| (i as f32).sin()).collect();
        let site = Site {
            seed: 9,
            update: 4,
            site: 2,
            p: 0.25,
        };
        let mut a = x.clone();
        dropout_apply(&mut a, n, &site, &rows);
        let mut b = x.clone();
        dropout_apply_reference(&mut b, n, &site, &rows);
        assert_eq!(a, b);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut c = x.clone();
        one.install(|| dropout_apply(&mut c, n, &site, &rows));
        assert_eq!(a, c);
        // The two passes of a sample get different masks.
        assert_ne!(a[..n], a[3 * n..4 * n]);
    }
}
